"""The exact-top forecast from the command line (``--linearize top``): what it costs on the
default example, and the block product written as two matrix-vector products.

One run, one machine, ratios measured in the same process (interleaved repeats):

1. ``ExactTopKernel._apply`` with a projected block Φ ``[N q, k]``: the library's two
   matrix-vector products against the einsum form it replaced (kept here as the
   reference, ``_apply_einsum``); the two agree to float32 rounding. Full batch and a
   minibatch of 32 rows.
2. The default example's forecast as ``tangentlab forecast --example fashion-lite0
   --linearize top`` runs it (N = 500, 64 px, k = 4096, q = 2C P² for z's 2 x 2 map =
   320; 80 before, 2C per position): seconds of the kernel, of the default learning rate
   (``exact_top.stable_lr``: Lanczos) and of 300 steps, against the head-exact default's
   kernel and forecast on the same model and data.
3. The sharpness S of the exact-top model (``exact_top.sharpness``) against λ_max/N of
   the head-exact kernel (``tl.stable_lr``'s): both the curvature of the same network's
   trained weights at w0. And the Lanczos of ``sharpness`` against the power iteration it
   replaced (kept here as the reference, ``_power_sharpness``): iterations, seconds, S.

4. ``--part directions`` (development: the default example): the real run of the default
   example's first 40 steps (``tl.finetune``, the command's rate) against the exact-top
   forecast with q = 20 (2C, the first default), 64, 80 (2C per position of the 2 x 2 map
   of z, the default after it) and 128 directions of z kept exact, k = 4096, 4 probes
   (the default is now 2C P² = 320, chosen on ``twolayer.py --dev64``).

5. ``--part plan``: the exact-top kernel (default example, N = 100) with its read-outs'
   chunks planned one output at a time (the plan now) against the plan before, which
   counted every sample's [C, P] Jacobian and (C + 2) x 2 activations: chunks of 3 samples
   at q = 200-320 (NOTE [memory model]).

6. ``--part k``: the default example's forecast at k = 4096 and 1024 in one run, against the
   real run's seconds a step timed in the same process.

7. ``--part sweep``: the README's sweep (``tangentlab sweep --example fashion-lite0
   --momentum 0,0.9 --batch-size 32,full``: 16 settings, the exact top's default rates,
   ``exact_top.sweep_exact_top`` at k = 1024, each setting stopped at its target) against
   the head-exact model's ``tl.sweep`` of the same 16 settings (300 steps each), and the
   real run's seconds a step at each batch size, timed in the same process.

8. ``--part minibatch``: minibatch forecasts (B = 32) of the default example at k = 1024
   along the step-by-step path in z (``_path(reference=True)``, the library's before) and
   along the minibatch path (NOTE [exact-top minibatch path]), interleaved, against the
   real run's seconds a step at B = 32 timed in the same process; the two paths' losses
   and steps to the 50% and 80% drops compared.

9. ``--part capture``: the exact-top kernel (default example, N = 200, k = 1024) with the
   capture's eval-mode batch norm as an affine map (``structured._eval_batch_norm``, now)
   and as ``F.batch_norm`` (before), interleaved; the features' largest difference per
   sample (NOTE [float32 and activation kinks] in structured.py).

10. ``--part chunk``: the exact-top kernel (default example, N = 500, k = 1024) with its
   chunks planned as before (the 512 MiB cap of a pass counting all 1.9M activations of a
   forward pass: 69 samples) and now (counting the 43K a pass reaches, chunks of equal
   size: 2 x 250), interleaved, the features compared; then on that kernel the default
   rate (Lanczos) and 60 full-batch steps with the top's eval-mode batch norm run as
   ``F.batch_norm`` (before) and as its affine map (``structured.AffineBatchNorm``, now),
   interleaved, the losses compared.

11. ``--part layout``: the exact-top kernel (default example, N = 500, k = 1024) with the
   capture's depthwise convolution as before (NCHW input, per-sample einsum), with its
   back-propagated input in channels-last layout (NOTE [depthwise channels-last] in
   structured.py), with also the signed unfold (now: NOTE [depthwise sketch]) and with
   every convolution's input channels-last (a variant); each run a fresh process (in one
   process the layout's gain was smaller: 1.00-1.08x), interleaved, the features compared.

12. ``--part pointwise``: the default example's whole forecast (N = 500, k = 1024: the
   kernel, the default rate and 300 full-batch steps, MSE) with 1 x 1 convolutions run as
   convolutions and J w0 computed (before), with 1 x 1 convolutions as matrix products (NOTE
   [pointwise convolution] in structured.py), with also the read-out kernel's J w0 not
   computed (``Tangent.without_jw0``), and with also a channels-last map's batch norm on
   its rows (now: ``structured._channels_last_affine``); each run a fresh process,
   interleaved; the features and the losses compared; the real run's seconds a step timed
   in this process.

13. ``--part trunk``: the default example's whole forecast (as part 12) with the body run
   from the images at each of the kernel's forward passes (before) and with its frozen
   trunk (the stem and blocks 0-14, ``examples.split_trunk``) run once (now: NOTE [frozen
   trunk] in exact_top.py); each run a fresh process, interleaved; the features and the
   losses compared; the real run's seconds a step timed in this process.

   ``--part trunk-text``: the same two kernels on the text example (rt-minilm, N = 128),
   in one process, interleaved, and a forecast on each.

14. ``--part split``: the default example's whole forecast (as part 13, with the trunk) with
   the simulation's and the rate's products of Φ and a vector as one BLAS call each (before)
   and as a batched product over blocks of Φ's rows (now: NOTE [split matrix-vector
   products] in linalg.py); each run a fresh process, interleaved; the two products alone
   timed on the kernel's Φ in each child.

15. ``--part reliable``: the text example's ``reliable_lr`` as the command line runs it where
   the check flags its default forecast (rt-minilm, its default N, k = 1024, the frozen
   trunk; MSE, the default rate, 300 steps, drops 50% and 80%, stopped below the 80% drop's
   target) with every try run in full (before) and with a try stopped at the first
   excursion that flags it for certain (now: ``forecast_exact_top(stop_if_flagged=)``), in
   one process, interleaved; the rates and forecasts compared.

16. ``--part ops``: the default example's exact-top kernel (N = 250: one chunk, k = 1024,
   the frozen trunk) with every torch operation inside its passes
   (``structured.structured_projected``) timed by a dispatch-mode timer: seconds and calls
   by operation.

    .venv/bin/python benchmarks/exact_top_speed.py [--part NAME]  # directions, plan, k, sweep,
    #                      minibatch, capture, chunk, layout, pointwise, trunk, trunk-text,
    #                      split, reliable, ops

Results: sections "exact-top-speed", "exact-top-directions", "exact-top-plan",
"exact-top-k", "exact-top-sweep", "exact-top-minibatch", "exact-top-capture",
"exact-top-chunk", "exact-top-layout", "exact-top-pointwise", "exact-top-trunk",
"exact-top-trunk-text", "exact-top-split", "exact-top-reliable" and "exact-top-ops" of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.examples import LITE0_DEFAULT_PARAMS, load_example, split_model  # noqa: E402
from tangentlab.experimental import exact_top as et  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/exact_top_speed.py"
N, STEPS, REPEATS = 500, 300, 7


def _report(section: str, text: list[str]) -> None:
    """Writes ``text`` (lines) to RESULTS.md's ``section`` and prints it."""
    write_section(section, "\n".join(text))
    print("\n".join(text))


def _apply_einsum(kernel: et.ExactTopKernel, gamma: torch.Tensor,
                  rows: torch.Tensor | None) -> torch.Tensor:
    """The block product as the library wrote it before (einsum), the rest as now."""
    n, q = kernel.num_samples, kernel.rank
    qb = kernel.basis.to(gamma.dtype)
    c = gamma @ qb
    phi = kernel.features.to(gamma.dtype).reshape(n, q, -1)
    sub = phi if rows is None else phi[rows]
    v = torch.einsum("baK,ba->K", sub, c)
    out = torch.einsum("iaK,K->ia", phi, v) @ qb.T
    rest = kernel.rest.to(gamma.dtype)
    rest = rest if rows is None else rest[:, rows]
    return out + rest @ (gamma - c @ qb.T)


def _power_sharpness(kernel: et.ExactTopKernel, loss: str = "mse", tol: float = 1e-5,
                     max_iter: int = 300) -> tuple[float, int]:
    """``(S, iterations)``: the power iteration ``exact_top.sharpness`` ran before its
    Lanczos, stopped when the Rayleigh quotient moves by less than ``tol`` (relative)."""
    lossf = tl.training.as_loss(loss, "exact_top_speed")
    w = dict(kernel.top.named_parameters())
    power = et._Sharpness(kernel, lossf, [w[a].detach() for a in kernel.top_params], warm=0)
    last, its = None, 0
    while its < max_iter:
        s, _ = power.step(kernel.z0.detach(), 1.0)
        its += 1
        if last is not None and abs(s - last) <= tol * abs(s):
            break
        last = s
    return float(s), its


def _lanczos_calls(kernel: et.ExactTopKernel, loss: str = "mse") -> int:
    """The Gauss-Newton products ``exact_top.sharpness`` takes (its Lanczos iterations)."""
    calls, real = [0], et._gn_apply

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    et._gn_apply = counted
    try:
        et.sharpness(kernel, loss=loss)
    finally:
        et._gn_apply = real
    return calls[0]


def _timed(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=N)
    model = ex.model.eval()
    body, top, _ = split_model(model)
    t0 = time.perf_counter()
    etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                      top_params=LITE0_DEFAULT_PARAMS, projection=4096,
                                      progress=False)  # fmt: skip
    kernel_s = time.perf_counter() - t0
    assert etk.features is not None, "N q <= k: no projected block to time"
    g = torch.Generator().manual_seed(0)
    rows_b = torch.randperm(N, generator=g)[:32]
    lines = []
    for label, rows in (("full batch", None), ("B = 32", rows_b)):
        gamma = torch.randn(N if rows is None else 32, etk.z0.shape[1], generator=g)
        new, old = etk._apply(gamma, rows), _apply_einsum(etk, gamma, rows)
        err = float((new - old).abs().max() / old.abs().max())
        t_new, t_old = [], []
        for _ in range(REPEATS):  # interleaved: the machine's load hits both alike
            t_old.append(_timed(lambda: _apply_einsum(etk, gamma, rows), 1))  # noqa: B023
            t_new.append(_timed(lambda: etk._apply(gamma, rows), 1))  # noqa: B023
        a, b = statistics.median(t_old), statistics.median(t_new)
        lines.append(f"| {label} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.1f}x | {err:.1e} |")
    t0 = time.perf_counter()
    lr = et.stable_lr(etk, loss="mse")  # the command's default rate: one Lanczos
    sharp_s = time.perf_counter() - t0
    s = et.sharpness(etk, loss="mse")
    lanczos_it = _lanczos_calls(etk)
    t0 = time.perf_counter()
    s_power, power_it = _power_sharpness(etk)
    power_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fc = et.forecast_exact_top(etk, tl.SGD(lr), STEPS, progress=False)
    fc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hb = tl.compute_head_body_kernel(model, ex.data, params=LITE0_DEFAULT_PARAMS,
                                     projection=4096, progress=False)  # fmt: skip
    hb_kernel_s = time.perf_counter() - t0
    lam = hb.top_eigenvalue("mse") / hb.num_samples
    hb_lr = tl.stable_lr(hb)
    t0 = time.perf_counter()
    hfc = tl.forecast(hb, tl.SGD(hb_lr), STEPS)
    hb_fc_s = time.perf_counter() - t0
    # the real run's price on this machine, in the same process: 3 timed full-batch steps of
    # the whole network (tl.finetune, the command's rate), as holdout.py's plain runs
    real = tl.finetune(load_example("fashion-lite0", num_samples=N).model.eval(), ex.data,
                       tl.SGD(lr), 3, params=LITE0_DEFAULT_PARAMS, log_every=3,
                       progress=False)  # fmt: skip
    step_s = real.train_seconds / 3
    total = kernel_s + sharp_s + fc_s
    drop = 0.8
    text = [
        f"Command: `{COMMAND}`. Machine: {machine()}.",
        "",
        f"The block product Σ_j K(i, j) γ_j of the exact-top model, projected block Φ "
        f"[N q, k] = [{N * etk.rank}, {etk.features.shape[1]}] (fashion-lite0, N = {N}, "
        f"64 px, q = {etk.rank}: the default 2C P² of z's 2 x 2 map), milliseconds (median of "
        f"{REPEATS} interleaved repeats); *error*: max |new − einsum| / max |einsum|.",
        "",
        "| batch | einsum (before) | two matrix-vector products (now) | speed-up | error |",
        "|---|---|---|---|---|",
        *lines,
        "",
        f"The default example as `tangentlab forecast --example fashion-lite0 --linearize top` "
        f"runs it ({STEPS} steps, full batch, MSE, the default rate), against the head-exact "
        "default (`--linearize auto`) on the same model and data, seconds:",
        "",
        "| model | kernel | learning rate | forecast | total | steps to an 80% drop: "
        "forecast (estimate, interval) |",
        "|---|---|---|---|---|---|",
        f"| exact top, block linear | {kernel_s:.1f} | {sharp_s:.1f} (sharpness S = {s:.4g}, "
        f"lr = {lr:.4g}) | {fc_s:.1f} | {kernel_s + sharp_s + fc_s:.1f} | "
        f"{fc.steps_to_drop(drop)} ({fc.steps_estimate(drop):.1f}, "
        f"{fc.steps_interval(drop)[0]:.0f}-{fc.steps_interval(drop)[1]:.0f}) |",
        f"| head exact, body linear (default) | {hb_kernel_s:.1f} | (λ_max/N = {lam:.4g}, "
        f"lr = {hb_lr:.4g}) | {hb_fc_s:.1f} | {hb_kernel_s + hb_fc_s:.1f} | "
        f"{hfc.steps_to((1 - drop) * float(hfc.loss[0]))} "
        f"({hfc.steps_interval((1 - drop) * float(hfc.loss[0]))}) |",
        "",
        f"The real run, timed in the same process (3 full-batch steps of the whole network, "
        f"`tl.finetune`): {step_s:.2f} s a step, so {STEPS} steps take about "
        f"{STEPS * step_s:.0f} s. The exact-top forecast (kernel, rate, {STEPS} steps) costs "
        f"**{total / (STEPS * step_s):.0%}** of that run; once its kernel is computed, each "
        f"further setting of a sweep costs its simulation: {fc_s / (STEPS * step_s):.1%} of a "
        f"{STEPS}-step run. The head-exact default costs "
        f"{(hb_kernel_s + hb_fc_s) / (STEPS * step_s):.1%}.",
        "",
        "The two curvatures are of the same network's trained weights at w0 "
        f"and agree to {abs(s / lam - 1):.1%}. The exact top's forecast simulates the top "
        "step by step on all N (a forward and backward of the head conv at every step), which "
        "the head-exact forecast does not; that, and the curvature for its rate, is its "
        "price over the default here.",
        "",
        "The curvature S for the default rate (`exact_top.sharpness`, relative tolerance "
        "1e-5), in the same run:",
        "",
        "| method | iterations | seconds | S |",
        "|---|---|---|---|",
        f"| power iteration (before) | {power_it} | {power_s:.1f} | {s_power:.6g} |",
        f"| Lanczos in the P inner product (now) | {lanczos_it} | {sharp_s:.1f} | {s:.6g} |",
        "",
        f"Lanczos takes {power_s / sharp_s:.1f}x fewer seconds; the two S differ by "
        f"{abs(s / s_power - 1):.1e} (relative; Lanczos's Ritz value approaches S from below, "
        "so the larger is the closer).",
    ]
    _report("exact-top-speed", text)


def directions(qs: tuple[int, ...] = (20, 64, 80, 128), steps: int = 40) -> None:
    """Part 4: the forecast's steps and curve against one real run, per q."""
    import numpy as np

    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=N)
    model = ex.model.eval()
    body, top, _ = split_model(model)
    lr = 0.000426  # the command's default rate (exact_top.stable_lr; tl.stable_lr: the same)
    t0 = time.perf_counter()
    run = tl.finetune(load_example("fashion-lite0", num_samples=N).model.eval(), ex.data,
                      tl.SGD(lr), steps, params=LITE0_DEFAULT_PARAMS, progress=False)
    real_s = time.perf_counter() - t0
    real = np.asarray(run.loss, dtype=np.float64)
    big_t = run.steps_to(0.2 * float(real[0]))
    rows = []
    for q in qs:
        t0 = time.perf_counter()
        etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                          top_params=LITE0_DEFAULT_PARAMS, projection=4096,
                                          directions=q, progress=False)  # fmt: skip
        ks = time.perf_counter() - t0
        t0 = time.perf_counter()
        fc = et.forecast_exact_top(etk, tl.SGD(lr), steps, progress=False)
        fs = time.perf_counter() - t0
        est, iv = fc.steps_estimate(0.8), fc.steps_interval(0.8)
        inside = iv is not None and iv[0] <= big_t <= iv[1]
        curve = float(np.mean(np.abs(fc.loss - real)) / real[0])
        rows.append(f"| {q} | {fc.steps_to_drop(0.8)} | {est:.1f} | {iv[0]:.1f}-{iv[1]:.1f} "
                    f"| {'yes' if inside else 'no'} | {abs(est - big_t) / big_t:.0%} | "
                    f"{curve:.4f} | {ks:.0f} | {fs:.1f} |")
    text = [
        f"Command: `{COMMAND} --part directions` (development: the default example, "
        f"fashion-lite0, N = {N}, 64 px, z = [320, 2, 2], D = 1,280; MSE, full batch, "
        f"lr = {lr}). Machine: {machine()}.",
        "",
        f"The real run (`tl.finetune`, {steps} steps, {real_s:.0f} s) reaches an 80% drop at "
        f"step **T = {big_t}**. The exact-top forecast per q (the directions of z kept "
        "exact; k = 4096, 4 probes); *curve*: mean |L̂ − L| / L0 over the steps; seconds of "
        "the kernel and of the forecast.",
        "",
        "| q | T̂ | estimate T̃ | interval | T inside | abs(T̃ − T) / T | curve | kernel s | "
        "forecast s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    _report("exact-top-directions", text)


def plan_part(n: int = 100, repeats: int = 2) -> None:
    """Part 5: the read-out kernel's chunks planned one output at a time (``by_output``,
    NOTE [memory model]) against the plan before, which counted (C + 2) x 2 activations per
    sample; interleaved repeats in one process, the same features."""
    import tangentlab.compute as tc
    from tangentlab.tangent import Tangent

    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=n)
    body, top, _ = split_model(ex.model.eval())
    real_by, real_plan = Tangent.by_output, tc.plan
    chunks: dict[bool, set] = {True: set(), False: set()}

    def kernel(by_output: bool) -> tuple[float, et.ExactTopKernel]:
        def planned(**kw):
            mp = real_plan(**kw)
            if kw["c"] > 4:  # the read-outs (q outputs), not the rest kernel's 4 probes
                chunks[by_output].add(mp.chunk)
            return mp

        Tangent.by_output = real_by if by_output else (lambda self, x: False)
        tc.plan = planned
        try:
            t0 = time.perf_counter()
            etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                              top_params=LITE0_DEFAULT_PARAMS, projection=4096,
                                              progress=False)  # fmt: skip
            return time.perf_counter() - t0, etk
        finally:
            Tangent.by_output, tc.plan = real_by, real_plan

    times: dict[bool, list[float]] = {True: [], False: []}
    feats = {}
    for _ in range(repeats):
        for by in (False, True):
            sec, etk = kernel(by)
            times[by].append(sec)
            feats[by] = etk.features if etk.features is not None else etk.block
    old, new = statistics.median(times[False]), statistics.median(times[True])
    err = float((feats[True] - feats[False]).abs().max() / feats[False].abs().max())
    text = [
        f"Command: `{COMMAND} --part plan`. Machine: {machine()}.",
        "",
        f"The exact-top kernel of the default example at N = {n} (64 px, the default q, "
        f"k = 4096), seconds (median of {repeats} interleaved repeats), with the read-outs' "
        "chunks planned as before (every sample's Jacobian [C, P] and (C + 2) x 2 "
        "activations) and one output at a time (`by_output`, NOTE [memory model] in "
        "memory.py: structured_projected back-propagates the q outputs one after the other "
        "through one graph); *error*: max |Δ features| / max |features|.",
        "",
        "| plan | chunk (samples) | kernel s |",
        "|---|---|---|",
        f"| before: [b, C, P] Jacobians | {sorted(chunks[False])} | {old:.1f} |",
        f"| one output at a time (now) | {sorted(chunks[True])} | {new:.1f} |",
        "",
        f"Speed-up **{old / new:.1f}x**, the same features (error {err:.1e}).",
    ]
    _report("exact-top-plan", text)


def k_part(ks: tuple[int, ...] = (4096, 1024)) -> None:
    """Part 6: the default example's forecast (as part 2) at each projection k, in one
    run, against the real run's seconds a step timed in the same process."""
    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=N)
    body, top, _ = split_model(ex.model.eval())
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                          top_params=LITE0_DEFAULT_PARAMS, projection=k,
                                          progress=False)  # fmt: skip
        ks_ = time.perf_counter() - t0
        t0 = time.perf_counter()
        lr = et.stable_lr(etk, loss="mse")
        lr_s = time.perf_counter() - t0
        fc = et.forecast_exact_top(etk, tl.SGD(lr), STEPS, progress=False)
        rows.append((k, ks_, lr_s, fc.seconds, lr, fc.steps_to_drop(0.8),
                     fc.steps_estimate(0.8), fc.steps_interval(0.8)))
        del etk
    real = tl.finetune(load_example("fashion-lite0", num_samples=N).model.eval(), ex.data,
                       tl.SGD(rows[0][4]), 3, params=LITE0_DEFAULT_PARAMS, log_every=3,
                       progress=False)  # fmt: skip
    run_s = STEPS * real.train_seconds / 3
    lines = [f"| {k} | {a:.1f} | {b:.1f} | {c:.1f} | {a + b + c:.1f} | "
             f"{(a + b + c) / run_s:.0%} | {c / run_s:.1%} | {lr:.4g} | {t} ({e:.1f}, "
             f"{iv[0]:.0f}-{iv[1]:.0f}) |" for k, a, b, c, lr, t, e, iv in rows]
    text = [
        f"Command: `{COMMAND} --part k`. Machine: {machine()}.",
        "",
        f"The default example's exact-top forecast (N = {N}, 64 px, the default q, "
        f"{STEPS} steps, full batch, MSE, the default rate) at each projection k, seconds, "
        f"in one run; the real run timed in the same process: {real.train_seconds / 3:.2f} s "
        f"a full-batch step of the whole network, {run_s:.0f} s for {STEPS} steps. *sweep*: "
        "a further setting's simulation against that run.",
        "",
        "| k | kernel | rate | simulation | total | total / real run | sweep | lr | steps to "
        "an 80% drop: T̂ (estimate, interval) |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]
    _report("exact-top-k", text)


def sweep_part() -> None:
    """Part 7: the README's sweep, exact top against head exact, and the real steps' price,
    in one run."""
    from tangentlab.cli import TOP_PROJECTION, TOP_SWEEP_FRACTIONS

    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=N)
    model = ex.model.eval()
    body, top, _ = split_model(model)
    sizes = [32, None]
    t0 = time.perf_counter()
    etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                      top_params=LITE0_DEFAULT_PARAMS,
                                      projection=TOP_PROJECTION, progress=False)  # fmt: skip
    kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    limit = et.stable_lr(etk, loss="mse", fraction=1.0)
    lr_s = time.perf_counter() - t0
    opts = [tl.SGD(float(f"{f * limit * (1.0 - m):.3g}"), momentum=m)
            for m in (0.0, 0.9) for f in TOP_SWEEP_FRACTIONS]  # fmt: skip
    t0 = time.perf_counter()
    sw = et.sweep_exact_top(etk, opts, STEPS, batch_sizes=sizes, progress=False)
    sweep_s = time.perf_counter() - t0
    simulated = sum(int(fc.steps[-1]) for fc in sw.forecasts)
    del etk
    t0 = time.perf_counter()
    hb = tl.compute_head_body_kernel(model, ex.data, params=LITE0_DEFAULT_PARAMS,
                                     projection=4096, progress=False)  # fmt: skip
    hb_kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hsw = tl.sweep(hb, opts, STEPS, batch_sizes=sizes)
    hb_sweep_s = time.perf_counter() - t0
    step_s = {}
    for b, n_steps in ((None, 3), (32, 10)):
        real = tl.finetune(load_example("fashion-lite0", num_samples=N).model.eval(), ex.data,
                           opts[0], n_steps, params=LITE0_DEFAULT_PARAMS, batch_size=b,
                           log_every=n_steps, progress=False)  # fmt: skip
        step_s[b] = real.train_seconds / n_steps
    est = [(row["estimate"], row["batch_size"]) for _, row in sw.table.iterrows()]
    to_target = sum(e * step_s[None if b != b or b is None else int(b)] for e, b in est
                    if e == e and e is not None)  # fmt: skip
    run_s = STEPS * step_s[None]
    top_total, hb_total = kernel_s + lr_s + sweep_s, hb_kernel_s + hb_sweep_s
    best = sw.table.iloc[0]
    fracs = ", ".join(f"{f:g}" for f in TOP_SWEEP_FRACTIONS)
    b0 = best["batch_size"]
    best_b = "full" if b0 is None or b0 != b0 else int(b0)
    text = [
        f"Command: `{COMMAND} --part sweep`. Machine: {machine()}.",
        "",
        f"The README's sweep on the default example (N = {N}, 64 px, MSE, {STEPS} steps, "
        f"target an 80% drop): {len(opts)} optimizers ({fracs} of the exact top's "
        "stability limit at momentum 0 and 0.9) x "
        "B = 32 and full batch, one run, seconds:",
        "",
        "| model | kernel | rate | sweep | total | steps simulated |",
        "|---|---|---|---|---|---|",
        f"| exact top (k = {TOP_PROJECTION}, each setting stopped at its target) | "
        f"{kernel_s:.1f} | {lr_s:.1f} | {sweep_s:.1f} | {top_total:.1f} | {simulated} |",
        f"| head exact (k = 4096, {STEPS} steps each) | {hb_kernel_s:.1f} | - | "
        f"{hb_sweep_s:.1f} | {hb_total:.1f} | {len(hsw.table) * STEPS} |",
        "",
        f"The real run, timed in the same process (`tl.finetune` of the whole network): "
        f"{step_s[None]:.2f} s a full-batch step, {step_s[32]:.2f} s a step at B = 32. "
        f"Training every setting to its estimated steps would take {to_target:.0f} s; one "
        f"{STEPS}-step full-batch run {run_s:.0f} s. The exact-top sweep costs "
        f"**{top_total / to_target:.0%}** of the former and {top_total / run_s:.0%} of the "
        f"latter ({sweep_s / run_s:.0%} with its kernel cached, as `make demo` leaves it); the "
        f"head-exact sweep {hb_total / to_target:.0%} and {hb_total / run_s:.0%}. Its pick: "
        f"{best['optimizer']}, batch {best_b}, "
        f"estimate {best['estimate']:.0f} steps (interval {best['interval_low']:.0f}-"
        f"{best['interval_high']:.0f}, check {best['check']}).",
    ]
    _report("exact-top-sweep", text)


def _example(n: int):
    """``(example, body, top)``: the default example's N = n samples, split as the command
    line splits it; warnings off (the parts time, they do not advise)."""
    warnings.simplefilter("ignore")
    ex = load_example("fashion-lite0", num_samples=n)
    body, top, _ = split_model(ex.model.eval())
    return ex, body, top


def _kernel(data, body, top, trunk=None) -> tuple[float, et.ExactTopKernel]:
    """``(seconds, kernel)``: the default example's exact-top kernel of ``data`` as the
    command line computes it (k = ``cli.TOP_PROJECTION``; ``trunk``: as
    ``compute_exact_top_kernel``'s, with ``body`` the rest above it)."""
    from tangentlab.cli import TOP_PROJECTION

    t0 = time.perf_counter()
    etk = et.compute_exact_top_kernel(body, top, data, params=LITE0_DEFAULT_PARAMS,
                                      top_params=LITE0_DEFAULT_PARAMS, projection=TOP_PROJECTION,
                                      progress=False, trunk=trunk)  # fmt: skip
    return time.perf_counter() - t0, etk


def minibatch_part(steps: int = 150, repeats: int = 2) -> None:
    """Part 8: the minibatch path against the step-by-step path, and the real step."""
    from tangentlab import dynamics as dyn
    from tangentlab.cli import TOP_PROJECTION

    ex, body, top = _example(N)
    etk = et.compute_exact_top_kernel(body, top, ex.data, params=LITE0_DEFAULT_PARAMS,
                                      top_params=LITE0_DEFAULT_PARAMS,
                                      projection=TOP_PROJECTION, progress=False)  # fmt: skip
    rows = []
    for loss in ("mse", "ce"):
        lossf = tl.training.as_loss(loss, "exact_top_speed")
        limit = et.stable_lr(etk, loss=loss, fraction=1.0)
        l0 = etk.initial_loss(loss)
        for frac, m in ((0.15, 0.0), (0.5, 0.0), (0.15, 0.9)):
            lr = float(f"{frac * limit * (1 - m):.3g}")
            rates = np.full(steps, lr)
            batches = dyn.batch_schedule(N, 32, steps, sampling="epoch",
                                         rng=dyn.path_rngs(0, 1)[0])  # fmt: skip
            secs: dict[bool, list[float]] = {True: [], False: []}
            out = {}
            for _ in range(repeats):
                for ref in (True, False):
                    t0 = time.perf_counter()
                    out[ref] = et._path(etk, lossf, rates, m, 0.0, batches, 1, None, False,
                                        et.CATAPULT, [], reference=ref)  # fmt: skip
                    secs[ref].append(time.perf_counter() - t0)
            a, b = np.asarray(out[True][1]), np.asarray(out[False][1])
            hits = []
            for d in (0.5, 0.8):
                hit = [next((int(t) for t, v in zip(o[0], o[1]) if v <= (1 - d) * l0), None)
                       for o in (out[True], out[False])]  # fmt: skip
                hits.append("/".join("-" if h is None else str(h) for h in hit))
            ref_s, new_s = statistics.median(secs[True]), statistics.median(secs[False])
            rows.append(f"| {loss.upper()} | {frac:g} | {m:g} | {lr:.3g} | "
                        f"{1e3 * ref_s / steps:.0f} | {1e3 * new_s / steps:.0f} | "
                        f"{ref_s / new_s:.2f}x | {np.max(np.abs(a - b) / np.abs(a)):.1e} | "
                        f"{hits[0]} | {hits[1]} |")

    real = tl.finetune(load_example("fashion-lite0", num_samples=N).model.eval(), ex.data,
                       tl.SGD(1e-4), 20, params=LITE0_DEFAULT_PARAMS, batch_size=32,
                       log_every=20, progress=False)  # fmt: skip
    real_ms = 1e3 * real.train_seconds / 20
    text = [
        f"Command: `{COMMAND} --part minibatch`. Machine: {machine()}.",
        "",
        f"Minibatch forecasts of the default example (N = {N}, 64 px, the default q = 320, "
        f"k = {TOP_PROJECTION}, B = 32, {steps} steps, the loss read at every step, the "
        "catapult on): the step-by-step path in z (``_path(reference=True)``, the library's "
        "before) against the minibatch path (NOTE [exact-top minibatch path]: Φ read once a "
        f"chunk of {et.MINIBATCH_CHUNK} steps), milliseconds a step (median of {repeats} "
        "interleaved runs); *a*: fraction of the exact top's stability limit of that loss "
        "(the rate a (1 − m) limit, as the sweep's); *differ*: the largest relative "
        "difference of the two paths' losses; steps to a 50% and an 80% drop of L0 along "
        "each (before/now).",
        "",
        "| loss | a | m | lr | ms a step before | now | speed-up | differ | 50% | 80% |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"A real step at B = 32 (`tl.finetune` of the whole network, timed in the same "
        f"process): {real_ms:.0f} ms.",
    ]
    _report("exact-top-minibatch", text)


def capture_part(n: int = 200, repeats: int = 3) -> None:
    """Part 9: the kernel with the capture's batch norm as an affine map, and as before."""
    from tangentlab import structured
    from tangentlab.cli import TOP_PROJECTION

    ex, body, top = _example(n)
    affine = structured._eval_batch_norm
    secs: dict[bool, list[float]] = {True: [], False: []}
    feats = {}
    for _ in range(repeats):
        for now in (True, False):
            structured._eval_batch_norm = affine if now else (lambda a, kw: None)
            try:
                seconds, etk = _kernel(ex.data, body, top)
                secs[now].append(seconds)
            finally:
                structured._eval_batch_norm = affine
            feats[now] = etk.features
    d = ((feats[True] - feats[False]).reshape(n, -1).abs().amax(1)
         / feats[False].abs().max()).sort(descending=True).values
    now_s, before_s = statistics.median(secs[True]), statistics.median(secs[False])
    text = [
        f"Command: `{COMMAND} --part capture`. Machine: {machine()}.",
        "",
        f"The exact-top kernel of the default example at N = {n} (64 px, the default q, "
        f"k = {TOP_PROJECTION}), seconds (median of {repeats} interleaved runs), with the "
        "capture's eval-mode batch norm computed as the affine map it is, x s + (b − μ s) "
        "(`structured._eval_batch_norm`: its backward is one product) and as `F.batch_norm` "
        "(before: `native_batch_norm_backward` took about half of each reverse pass through "
        "the block):",
        "",
        "| batch norm | kernel s |",
        "|---|---|",
        f"| `F.batch_norm` (before) | {before_s:.1f} |",
        f"| affine map (now) | {now_s:.1f} |",
        "",
        f"Speed-up **{before_s / now_s:.2f}x**. The features' largest difference per sample, "
        f"relative to the largest feature: the largest {float(d[0]):.1e}, the next "
        f"{float(d[1]):.1e}, the median {float(d[len(d) // 2]):.1e}; "
        f"{int((d > 1e-4).sum())} of {n} samples above 1e-4 (a pre-activation within "
        "float32 rounding of a ReLU6 kink takes the other one-sided derivative: NOTE "
        "[float32 and activation kinks] in structured.py).",
    ]
    _report("exact-top-capture", text)


def chunk_part(n: int = 500, repeats: int = 3, steps: int = 60) -> None:
    """Part 10: the kernel's chunks as planned before and now; the top's batch norm in the
    rate and the steps as ``F.batch_norm`` and as its affine map."""
    import contextlib
    import dataclasses

    from tangentlab import compute
    from tangentlab.cli import TOP_PROJECTION
    from tangentlab.data import take
    from tangentlab.memory import _CHUNK_JACOBIAN_BYTES

    ex, body, top = _example(n)
    plan, chunks = compute.plan, {}

    def planned_before(**kw):  # the cap counting every activation, chunks not evened out
        got = plan(**kw)
        if not kw.get("by_output") or kw.get("moved_act") is None:
            return got
        cap = _CHUNK_JACOBIAN_BYTES // (kw["itemsize"] * (kw["p"] + kw["act"]))
        room = (got.budget - got.fixed) // got.per_sample
        return dataclasses.replace(got, chunk=int(max(1, min(kw["n"], room, cap))))

    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top)  # warm-up: no run pays it
    secs: dict[bool, list[float]] = {True: [], False: []}
    feats = {}
    for _ in range(repeats):
        for now in (True, False):
            seen: list[int] = []

            def spy(now=now, seen=seen, **kw):
                got = plan(**kw) if now else planned_before(**kw)
                seen.append(got.chunk)
                return got

            compute.plan = spy
            try:
                seconds, etk = _kernel(ex.data, body, top)
                secs[now].append(seconds)
            finally:
                compute.plan = plan
            feats[now], chunks[now] = etk.features, seen[0]
    d = float((feats[True] - feats[False]).abs().max() / feats[False].abs().max())
    rows = ((feats[True] - feats[False]).abs().amax(1) / feats[False].abs().max()).reshape(n, -1)
    off = int((rows.amax(1) > 1e-4).sum())
    del feats
    now_s, before_s = statistics.median(secs[True]), statistics.median(secs[False])
    affine = et.AffineBatchNorm
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    curves = {}
    for _ in range(repeats):
        for now in (True, False):
            et.AffineBatchNorm = affine if now else contextlib.nullcontext
            try:
                t0 = time.perf_counter()
                lr = et.stable_lr(etk, loss="mse")
                t1 = time.perf_counter()
                fc = et.forecast_exact_top(etk, tl.SGD(lr), steps, progress=False)
                runs[now].append((t1 - t0, time.perf_counter() - t1))
            finally:
                et.AffineBatchNorm = affine
            curves[now] = (lr, fc)
    med = {k: [statistics.median(a) for a in zip(*v)] for k, v in runs.items()}
    (lr1, f1), (lr0, f0) = curves[True], curves[False]
    rel = float(np.nanmax(np.abs(f1.loss - f0.loss) / f0.loss))
    same = all(f1.steps_to_drop(a) == f0.steps_to_drop(a) for a in (0.5, 0.8, 0.9))
    text = [
        f"Command: `{COMMAND} --part chunk`. Machine: {machine()}.",
        "",
        f"The exact-top kernel of the default example (N = {n}, 64 px, the default q, "
        f"k = {TOP_PROJECTION}), seconds (median of {repeats} interleaved runs), its read-outs' "
        "chunks planned as before (a pass capped at 512 MiB counting every activation of a "
        "forward pass, 1.9M a sample, most of them in the frozen layers below the block) and "
        "now (counting the activations a pass reaches, `Tangent.reached_activations`, and "
        "chunks of equal size; NOTE [memory model]):",
        "",
        "| plan | chunk (samples) | kernel s |",
        "|---|---|---|",
        f"| before | {chunks[False]} | {before_s:.1f} |",
        f"| now | {chunks[True]} | {now_s:.1f} |",
        "",
        f"Speed-up **{before_s / now_s:.2f}x** (runs: before "
        f"{', '.join(f'{a:.1f}' for a in secs[False])}; now "
        f"{', '.join(f'{a:.1f}' for a in secs[True])}). The features' largest difference "
        f"{d:.1e} of the largest feature; {off} of {n} samples above 1e-4 (a batch of another "
        "size rounds its convolutions differently: NOTE [float32 and activation kinks]).",
        "",
        f"On that kernel, the default rate (`stable_lr`, Lanczos) and {steps} full-batch steps "
        "(MSE) with the top's eval-mode batch norm as `F.batch_norm` (before) and as its affine "
        "map (`structured.AffineBatchNorm`, now: its backward to the trained scale and shift "
        f"is a sum over rows), seconds (median of {repeats} interleaved runs):",
        "",
        f"| top's batch norm | rate s | {steps} steps s | a step ms |",
        "|---|---|---|---|",
        f"| `F.batch_norm` (before) | {med[False][0]:.1f} | {med[False][1]:.1f} | "
        f"{1e3 * med[False][1] / steps:.0f} |",
        f"| affine map (now) | {med[True][0]:.1f} | {med[True][1]:.1f} | "
        f"{1e3 * med[True][1] / steps:.0f} |",
        "",
        f"The steps **{med[False][1] / med[True][1]:.2f}x**, the rate "
        f"{med[False][0] / med[True][0]:.2f}x faster; the rates {lr0:.4g} and {lr1:.4g}, the "
        f"losses within {rel:.1e} (relative), the steps to the 50, 80 and 90% drops "
        f"{'the same' if same else 'different'} ({f1.steps_to_drop(0.5)}, "
        f"{f1.steps_to_drop(0.8)}, {f1.steps_to_drop(0.9)}).",
    ]
    _report("exact-top-chunk", text)


_LAYOUTS = ("NCHW, per-sample einsum (before)", "depthwise input channels-last, einsum",
            "depthwise input channels-last, signed unfold (now)",
            "every convolution's input channels-last, signed unfold")


def _set_layout(name: str) -> None:
    """Set the capture's hooks for a layout of part 11: ``structured._depthwise_channels_last``
    and ``structured.DEPTHWISE_SKETCH_POSITIONS`` (0: the per-sample einsum)."""
    from tangentlab import structured

    def every(args, kwargs):  # the variant: every back-propagated 4-D input
        u = args[0] if args else kwargs.get("input")
        if not (isinstance(u, torch.Tensor) and u.ndim == 4 and u.requires_grad):
            return args, kwargs
        u = u.contiguous(memory_format=torch.channels_last)
        return ((u, *args[1:]), kwargs) if args else (args, {**kwargs, "input": u})

    i = _LAYOUTS.index(name)
    if i == 0:
        structured._depthwise_channels_last = lambda args, kwargs: (args, kwargs)
    elif i == 3:
        structured._depthwise_channels_last = every
    if i < 2:
        structured.DEPTHWISE_SKETCH_POSITIONS = 0


def layout_child(name: str, n: int, out: str) -> None:
    """One kernel of part 11 in this process (a fresh one, as a command-line run): its
    seconds printed, its features saved to ``out``."""
    from tangentlab.data import take

    ex, body, top = _example(n)
    _set_layout(name)
    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top)  # warm-up
    seconds, etk = _kernel(ex.data, body, top)
    torch.save(etk.features, out)
    print(f"SECONDS {seconds}")


def layout_part(n: int = 500, repeats: int = 3) -> None:
    """Part 11: the kernel with the capture's depthwise convolution as before (NCHW input,
    per-sample einsum), with its input in channels-last layout, with also the signed
    unfold (now), and with every convolution's input channels-last (a variant): each run
    a fresh process, interleaved."""
    import subprocess
    import tempfile

    from tangentlab.cli import TOP_PROJECTION

    secs: dict[str, list[float]] = {a: [] for a in _LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for i, name in enumerate(_LAYOUTS):
                got = subprocess.run([sys.executable, __file__, "--layout-child", str(i),
                                      str(n), f"{tmp}/{i}.pt"], capture_output=True, text=True,
                                     check=True)  # fmt: skip
                secs[name].append(float(got.stdout.split("SECONDS")[-1]))
        feats = [torch.load(f"{tmp}/{i}.pt", weights_only=True) for i in range(len(_LAYOUTS))]
    scale, base = feats[0].abs().max(), statistics.median(secs[_LAYOUTS[0]])
    rows = []
    for name, f in zip(_LAYOUTS, feats):
        med = statistics.median(secs[name])
        rows.append(f"| {name} | {med:.1f} | {', '.join(f'{a:.1f}' for a in secs[name])} | "
                    f"{base / med:.2f}x | {float((f - feats[0]).abs().max() / scale):.1e} |")
    text = [
        f"Command: `{COMMAND} --part layout`. Machine: {machine()}.",
        "",
        f"The exact-top kernel of the default example (N = {n}, 64 px, the default q, "
        f"k = {TOP_PROJECTION}), seconds (median of {repeats} runs, each in a fresh process "
        "as a command-line run is, the variants interleaved). The capture's depthwise "
        "convolution (the block's 3 x 3, stride 2, on a 2 x 2 output map) as before: its "
        "input NCHW and its weight's per-sample gradient an einsum over B C tiny matrices, "
        "then multiplied by the sketch's signs and scattered; with its back-propagated input "
        "in channels-last layout (NOTE [depthwise channels-last] in structured.py: on CPU the "
        "NCHW backward of a depthwise convolution takes a slow path); with also the signs "
        "folded into its unfolded input once a chunk, stored position-major, so that a "
        "pass forms the signed gradient as L = 4 fused multiply-adds (NOTE [depthwise "
        "sketch]); and a variant with every back-propagated convolution input in "
        "channels-last layout. The features' largest difference from before, relative to "
        "the largest feature:",
        "",
        "| layout | kernel s | runs | speed-up | features' difference |",
        "|---|---|---|---|---|",
        *rows,
    ]
    _report("exact-top-layout", text)


_POINTWISE = ("1 x 1 convolutions as convolutions, J w0 computed (before)",
              "1 x 1 convolutions as matrix products, J w0 computed",
              "1 x 1 convolutions as matrix products, J w0 not computed",
              "also a channels-last map's batch norm on its rows (now)")


def _set_pointwise(i: int) -> None:
    """Part 12's variant ``i`` (``_POINTWISE``): ``structured._pointwise_conv`` off below 1,
    ``Tangent.without_jw0`` a no-op below 2, ``structured._channels_last_affine`` off
    below 3."""
    from tangentlab import structured
    from tangentlab.tangent import Tangent

    if i < 1:
        structured._pointwise_conv = lambda args, kwargs: None
    if i < 2:
        Tangent.without_jw0 = lambda self: self
    if i < 3:
        structured._channels_last_affine = lambda x, scale, shift: None


def _rate_and_forecast(etk: et.ExactTopKernel, kernel_s: float, out: str) -> str:
    """A child of parts 12 and 13 after its kernel: the default rate and the forecast, the
    features and losses saved to ``out``; the ``SECONDS`` line its parent reads (print it
    last)."""
    t0 = time.perf_counter()
    lr = et.stable_lr(etk, loss="mse")
    rate_s = time.perf_counter() - t0
    fc = et.forecast_exact_top(etk, tl.SGD(lr), STEPS, progress=False)
    torch.save({"features": etk.features, "loss": torch.as_tensor(fc.loss),
                "lr": torch.tensor(lr)}, out)  # fmt: skip
    return f"SECONDS {kernel_s} {rate_s} {fc.seconds} {fc.steps_to_drop(0.8)}"


def pointwise_child(i: int, n: int, out: str) -> None:
    """One whole forecast of part 12 in this process (a fresh one, as a command-line run):
    the seconds of its kernel, rate and simulation printed; its features and losses saved
    to ``out``."""
    from tangentlab.data import take

    ex, body, top = _example(n)
    _set_pointwise(i)
    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top)  # warm-up
    kernel_s, etk = _kernel(ex.data, body, top)
    print(_rate_and_forecast(etk, kernel_s, out))


def _whole_forecasts(flag: str, names: tuple[str, ...], n: int, repeats: int
                     ) -> tuple[list[str], float, float, dict[int, list[str]]]:
    """Parts 12 and 13: each variant's whole forecast in a fresh process (its child,
    ``flag``), ``repeats`` rounds interleaved, then the real run timed here: ``(the table's
    rows, seconds a real step, seconds of the real run, each variant's children's
    outputs)``."""
    import subprocess
    import tempfile

    secs: dict[int, list[tuple[float, ...]]] = {i: [] for i in range(len(names))}
    steps: dict[int, set] = {i: set() for i in range(len(names))}
    outs: dict[int, list[str]] = {i: [] for i in range(len(names))}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for i in range(len(names)):
                got = subprocess.run([sys.executable, __file__, flag, str(i), str(n),
                                      f"{tmp}/{i}.pt"], capture_output=True, text=True,
                                     check=True)  # fmt: skip
                outs[i].append(got.stdout)
                *parts, t80 = got.stdout.split("SECONDS")[-1].split()
                secs[i].append(tuple(float(a) for a in parts))
                steps[i].add(t80)
        runs = [torch.load(f"{tmp}/{i}.pt", weights_only=True) for i in range(len(names))]
    ex, _, _ = _example(n)
    real = tl.finetune(load_example("fashion-lite0", num_samples=n).model.eval(), ex.data,
                       tl.SGD(float(runs[0]["lr"])), 3, params=LITE0_DEFAULT_PARAMS,
                       log_every=3, progress=False)  # fmt: skip
    run_s = STEPS * real.train_seconds / 3
    f0, l0 = runs[0]["features"], runs[0]["loss"]
    total0 = statistics.median(sum(t) for t in secs[0])
    rows = []
    for i, name in enumerate(names):
        med = [statistics.median(t[j] for t in secs[i]) for j in range(3)]
        total = statistics.median(sum(t) for t in secs[i])
        feat = float((runs[i]["features"] - f0).abs().max() / f0.abs().max())
        loss = float(((runs[i]["loss"] - l0).abs() / l0.abs()).max())
        rows.append(f"| {name} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {total:.1f} | "
                    f"{', '.join(f'{sum(t):.1f}' for t in secs[i])} | {total0 / total:.2f}x | "
                    f"{total / run_s:.1%} | {feat:.1e} | {loss:.1e} | "
                    f"{', '.join(sorted(steps[i]))} |")
    return rows, real.train_seconds / 3, run_s, outs


def _whole_table(step_s: float, run_s: float, rows: list[str]) -> list[str]:
    """The end of parts 12 and 13's text: the real run's sentence, then the table."""
    return [
        f"The real run timed in this process after them: {step_s:.2f} s a full-batch step "
        f"of the whole network, {run_s:.0f} s for {STEPS} steps. The features' and the "
        "losses' largest differences from before (relative to the largest feature; to each "
        "step's loss), and the steps to an 80% drop in every run:",
        "",
        "| variant | kernel | rate | simulation | total | runs (total) | speed-up | "
        "/ real run | features' difference | losses' difference | T̂ (80%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def pointwise_part(n: int = N, repeats: int = 3) -> None:
    """Part 12: the whole forecast before, with 1 x 1 convolutions as matrix products, and
    with also J w0 not computed (now), each run a fresh process, interleaved; the real
    run's seconds a step timed here."""
    from tangentlab.cli import TOP_PROJECTION

    rows, step_s, run_s, _ = _whole_forecasts("--pointwise-child", _POINTWISE, n, repeats)
    text = [
        f"Command: `{COMMAND} --part pointwise`. Machine: {machine()}.",
        "",
        f"The default example's whole exact-top forecast (N = {n}, 64 px, the default q, "
        f"k = {TOP_PROJECTION}: the kernel, the default rate (Lanczos) and {STEPS} full-batch "
        f"steps, MSE), seconds (median of {repeats} runs, each in a fresh process as a "
        "command-line run is, the variants interleaved): 1 x 1 convolutions (the block's "
        "expansion and projection in the kernel's capture, the top's head convolution at "
        "every step) run as convolutions or as one matrix product over positions (NOTE "
        "[pointwise convolution] in structured.py), the read-out kernel's J w0, which the "
        "exact top never uses, computed or not (`Tangent.without_jw0`), and the capture's "
        "eval-mode batch norm of a channels-last map (after the depthwise convolution) "
        "computed on the map's [B h w, C] rows or on a copy in NCHW layout "
        "(`structured._channels_last_affine`). " + _whole_table(step_s, run_s, rows)[0],
        *_whole_table(step_s, run_s, rows)[1:],
    ]
    _report("exact-top-pointwise", text)


_TRUNK = ("the body run from the images at each forward pass (before)",
          "its frozen trunk run once (now)")


def trunk_child(i: int, n: int, out: str) -> None:
    """One whole forecast of part 13 in this process (a fresh one, as a command-line run):
    variant ``i`` of ``_TRUNK``; the seconds of its kernel, rate and simulation printed; its
    features and losses saved to ``out``."""
    from tangentlab import headbody, structured
    from tangentlab.data import take
    from tangentlab.examples import split_trunk

    ex, body, top = _example(n)
    trunk = None
    if i == 1:
        trunk, body = split_trunk(body, LITE0_DEFAULT_PARAMS)
    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top, trunk)  # warm-up
    parts: dict[str, float] = {}
    inside = ["other"]  # the read-out kernel whose capture runs: "block" or "rest"

    def timer(f, key: str):
        def timed(*a, **k):
            name = f"capture ({inside[-1]})" if key == "capture" else key
            if key in ("block", "rest"):
                inside.append(key)
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
                if key in ("block", "rest"):
                    inside.pop()
        return timed

    for mod, name, key in ((et, "_trunk_outputs", "trunk"),
                           (structured, "capture_calls", "capture"),
                           (et, "compute_kernel", "block"),
                           (headbody, "compute_kernel", "rest")):  # fmt: skip
        setattr(mod, name, timer(getattr(mod, name), key))
    kernel_s, etk = _kernel(ex.data, body, top, trunk)
    seconds = _rate_and_forecast(etk, kernel_s, out)
    cap = parts.get("capture (block)", 0.0)
    print(f"PARTS {parts.get('trunk', 0.0)} {cap} {parts.get('block', 0.0) - cap} "
          f"{parts.get('rest', 0.0)}")  # fmt: skip
    print(seconds)


def trunk_part(n: int = N, repeats: int = 5) -> None:
    """Part 13: the whole forecast with the body run from the images (before) and with its
    frozen trunk run once (now), each run a fresh process, interleaved; the real run's
    seconds a step timed here."""
    from tangentlab.cli import TOP_PROJECTION

    rows, step_s, run_s, outs = _whole_forecasts("--trunk-child", _TRUNK, n, repeats)
    kparts = {i: [tuple(float(a) for a in out.split("PARTS")[-1].split("\n")[0].split())
                  for out in outs[i]] for i in outs}  # fmt: skip
    text = [
        f"Command: `{COMMAND} --part trunk`. Machine: {machine()}.",
        "",
        f"The default example's whole exact-top forecast (N = {n}, 64 px, the default q, "
        f"k = {TOP_PROJECTION}: the kernel, the default rate (Lanczos) and {STEPS} full-batch "
        f"steps, MSE), seconds (median of {repeats} runs, each in a fresh process as a "
        "command-line run is, the variants interleaved): the body (the stem and all 16 "
        "blocks) run from the images at each of the kernel's three forward passes (z0, the "
        "block's read-out kernel, the rest's trace kernel), or its frozen trunk (the stem "
        "and blocks 0-14, below the first trained weight: `examples.split_trunk`) run once "
        "and block 15 from its output (NOTE [frozen trunk] in exact_top.py), as the "
        "command line now does. " + _whole_table(step_s, run_s, rows)[0],
        *_whole_table(step_s, run_s, rows)[1:],
        "",
        "The kernel's parts (medians, seconds): the trunk run once; the block's read-out "
        "kernel's forward passes under the capture (one a chunk: through the whole body, or "
        "block 15 alone); its reverse passes (the read-out kernel's seconds less those "
        "forwards: q = 320 passes a chunk); the rest's trace kernel (its own forward passes "
        "and 4 reverse passes a sample):",
        "",
        "| variant | trunk | block's forwards | block's reverse passes | rest kernel |",
        "|---|---|---|---|---|",
        *(f"| {name} | " + " | ".join(f"{statistics.median(t[j] for t in kparts[i]):.1f}"
                                      for j in range(4)) + " |"
          for i, name in enumerate(_TRUNK)),
    ]
    _report("exact-top-trunk", text)


def trunk_text_part(n: int = 128, repeats: int = 3) -> None:
    """Part 13 on the text example: the exact-top kernel of rt-minilm (MiniLM-L6, N = n) with
    the body run from the tokens (before) and with its frozen trunk (the embeddings and
    layers 0-4) run once (now), in this process, interleaved; then one forecast of 300
    full-batch steps on each kernel and the real run's seconds a step."""
    import os

    from tangentlab.cli import TOP_PROJECTION
    from tangentlab.data import take
    from tangentlab.examples import MINILM_DEFAULT_PARAMS, split_trunk

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    ex = load_example("rt-minilm", num_samples=n)
    body, top, _ = split_model(ex.model.eval())
    trunk, rest = split_trunk(body, MINILM_DEFAULT_PARAMS)
    kw = dict(params=MINILM_DEFAULT_PARAMS, top_params=MINILM_DEFAULT_PARAMS,
              projection=TOP_PROJECTION, progress=False)  # fmt: skip
    variants = (("the body run from the tokens (before)", body, {}),
                ("its frozen trunk run once (now)", rest, {"trunk": trunk}))  # fmt: skip
    small = tuple(take(a, slice(0, 4)) for a in ex.data)
    for _, b, extra in variants:  # warm-up
        et.compute_exact_top_kernel(b, top, small, **kw, **extra)
    secs: list[list[float]] = [[], []]
    kernels = [None, None]
    for _ in range(repeats):
        for i, (_, b, extra) in enumerate(variants):
            t0 = time.perf_counter()
            kernels[i] = et.compute_exact_top_kernel(b, top, ex.data, **kw, **extra)
            secs[i].append(time.perf_counter() - t0)
    lr = et.stable_lr(kernels[0], loss="mse")
    fcs = [et.forecast_exact_top(k, tl.SGD(lr), STEPS, progress=False) for k in kernels]
    real = tl.finetune(load_example("rt-minilm", num_samples=n).model.eval(), ex.data,
                       tl.SGD(lr), 3, params=MINILM_DEFAULT_PARAMS, log_every=3,
                       progress=False)  # fmt: skip
    run_s = STEPS * real.train_seconds / 3
    def block(k):  # Φ, or M where N q <= k
        return k.block if k.features is None else k.features

    f0, l0 = block(kernels[0]), torch.as_tensor(fcs[0].loss)
    rows = []
    for i, (name, _, _) in enumerate(variants):
        med = statistics.median(secs[i])
        feat = float((block(kernels[i]) - f0).abs().max() / f0.abs().max())
        loss = float(((torch.as_tensor(fcs[i].loss) - l0).abs() / l0.abs()).max())
        rows.append(f"| {name} | {med:.1f} | {', '.join(f'{t:.1f}' for t in secs[i])} | "
                    f"{statistics.median(secs[0]) / med:.2f}x | {fcs[i].seconds:.1f} | "
                    f"{(med + fcs[i].seconds) / run_s:.1%} | {feat:.1e} | {loss:.1e} | "
                    f"{fcs[i].steps_to_drop(0.8)} |")
    text = [
        f"Command: `{COMMAND} --part trunk-text`. Machine: {machine()}.",
        "",
        f"The text example's exact-top kernel (rt-minilm: MiniLM-L6, N = {n}, 64 tokens, "
        f"the default q = 2C, k = {TOP_PROJECTION}), seconds ({repeats} runs in one process, "
        "the variants interleaved, after a warm-up): the body (embeddings and all six "
        "layers, the last one's attention) run from the tokens at each of the kernel's "
        "forward passes, or its frozen trunk (the embeddings and layers 0-4: "
        "`examples.split_trunk`) run once. Then on each kernel one forecast of "
        f"{STEPS} full-batch steps (MSE, the default rate {lr:.3g}) and the real run timed "
        f"here: {real.train_seconds / 3:.2f} s a full-batch step, {run_s:.0f} s for {STEPS} "
        "steps. '/ real run': kernel and forecast (without the rate) against it:",
        "",
        "| variant | kernel | runs | speed-up | forecast | / real run | block's difference "
        "| losses' difference | T̂ (80%) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    _report("exact-top-trunk-text", text)


_SPLIT = ("Φ's products with a vector as one BLAS call each (before)",
          "as a batched product over blocks of Φ's rows (now)")


def split_child(i: int, n: int, out: str) -> None:
    """One whole forecast of part 14 in this process (a fresh one, as a command-line run):
    variant ``i`` of ``_SPLIT``; the two products alone timed on the kernel's Φ (``PRODUCTS``
    line, milliseconds: a @ v and v @ a, plain then split); the seconds of the kernel, rate
    and simulation printed; its features and losses saved to ``out``."""
    from tangentlab.data import take
    from tangentlab.examples import split_trunk
    from tangentlab.linalg import split_mv, split_vm

    if i == 0:
        et.split_mv, et.split_vm = (lambda a, v: a @ v), (lambda v, a: v @ a)
    ex, body, top = _example(n)
    trunk, body = split_trunk(body, LITE0_DEFAULT_PARAMS)
    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top, trunk)  # warm-up
    kernel_s, etk = _kernel(ex.data, body, top, trunk)
    phi = etk.features
    gen = torch.Generator().manual_seed(0)
    v, w = torch.randn(phi.shape[1], generator=gen), torch.randn(phi.shape[0], generator=gen)
    ms = []
    for f in (lambda: phi @ v, lambda: w @ phi, lambda: split_mv(phi, v),
              lambda: split_vm(w, phi)):  # fmt: skip
        f()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            f()
            times.append(1e3 * (time.perf_counter() - t0))
        ms.append(statistics.median(times))
    print(f"PHI [{phi.shape[0]}, {phi.shape[1]}]")
    print("PRODUCTS " + " ".join(f"{t:.2f}" for t in ms))
    print(_rate_and_forecast(etk, kernel_s, out))


def split_part(n: int = N, repeats: int = 5) -> None:
    """Part 14: the whole forecast with Φ's products with a vector as one BLAS call each
    (before) and split over blocks of rows (now), each run a fresh process, interleaved; the
    real run's seconds a step timed here."""
    from tangentlab.cli import TOP_PROJECTION

    rows, step_s, run_s, outs = _whole_forecasts("--split-child", _SPLIT, n, repeats)
    prods = [tuple(float(a) for a in out.split("PRODUCTS")[-1].split("\n")[0].split())
             for i in outs for out in outs[i]]  # fmt: skip
    med = [statistics.median(p[j] for p in prods) for j in range(4)]
    shape = outs[0][0].split("PHI")[-1].split("\n")[0].strip()
    text = [
        f"Command: `{COMMAND} --part split`. Machine: {machine()}.",
        "",
        f"The default example's whole exact-top forecast (N = {n}, 64 px, the default q, "
        f"k = {TOP_PROJECTION}, the frozen trunk: the kernel, the default rate (Lanczos) and "
        f"{STEPS} full-batch steps, MSE), seconds (median of {repeats} runs, each in a fresh "
        "process as a command-line run is, the variants interleaved): the products of the "
        "block's Φ [N q, k] with a vector (two a step and two a Lanczos iteration: "
        "`ExactTopKernel._apply`) as one BLAS call each (`phi @ v`, `w @ phi`) or as a "
        "batched product over as many blocks of Φ's rows as torch has threads (NOTE [split "
        "matrix-vector products] in linalg.py). " + _whole_table(step_s, run_s, rows)[0],
        *_whole_table(step_s, run_s, rows)[1:],
        "",
        f"The two products alone on the kernel's Φ {shape}, milliseconds (median "
        f"of 10 calls in each child, then over the {len(prods)} children): Φ v "
        f"{med[0]:.1f} as one call, {med[2]:.1f} split ({med[0] / med[2]:.2f}x); wᵀ Φ "
        f"{med[1]:.1f} as one call, {med[3]:.1f} split ({med[1] / med[3]:.2f}x).",
    ]
    _report("exact-top-split", text)


def reliable_part(repeats: int = 3) -> None:
    """Part 15: reliable_lr on the text example with its tries in full (before) and stopped
    at a certain flag (now), in this process, interleaved."""
    import os

    from tangentlab.cli import _EXAMPLE_DEFAULTS, TOP_PROJECTION
    from tangentlab.examples import MINILM_DEFAULT_PARAMS, split_trunk

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    ex = load_example("rt-minilm", num_samples=_EXAMPLE_DEFAULTS["rt-minilm"]["samples"])
    body, top, _ = split_model(ex.model.eval())
    trunk, rest = split_trunk(body, MINILM_DEFAULT_PARAMS)
    etk = et.compute_exact_top_kernel(rest, top, ex.data, params=MINILM_DEFAULT_PARAMS,
                                      top_params=MINILM_DEFAULT_PARAMS, trunk=trunk,
                                      projection=TOP_PROJECTION, progress=False)  # fmt: skip
    lr = et.stable_lr(etk, loss="mse")
    l0 = etk.initial_loss("mse")
    real_forecast = et.forecast_exact_top
    tries: list[tuple[float, int, float]] = []

    def forecast(*a, full: bool, **k):
        if full:
            k["stop_if_flagged"] = None
        fc = real_forecast(*a, **k)
        tries.append((fc.settings["lr"], int(fc.steps[-1]), fc.seconds))
        return fc

    names = ("every try run in full (before)", "a try stopped at a certain flag (now)")
    secs: list[list[float]] = [[], []]
    got: list = [None, None]
    runs: list[list] = [[], []]
    for _ in range(repeats):
        for i in range(2):
            et.forecast_exact_top = lambda *a, _f=i == 0, **k: forecast(*a, full=_f, **k)
            tries.clear()
            t0 = time.perf_counter()
            got[i] = et.reliable_lr(etk, tl.SGD(lr), STEPS, drops=(0.5, 0.8), loss="mse",
                                    stop_below=0.2 * l0, progress=False)  # fmt: skip
            secs[i].append(time.perf_counter() - t0)
            runs[i] = list(tries)
    et.forecast_exact_top = real_forecast
    same = got[0] is not None and got[1] is not None and np.array_equal(got[0].loss, got[1].loss)
    rows = [f"| {name} | {statistics.median(secs[i]):.1f} | "
            f"{', '.join(f'{t:.1f}' for t in secs[i])} | "
            f"{statistics.median(secs[0]) / statistics.median(secs[i]):.2f}x | "
            f"{', '.join(f'{lr_:.4g}: {last}' for lr_, last, _ in runs[i])} | "
            f"{'-' if got[i] is None else format(got[i].settings['lr'], '.4g')} |"
            for i, name in enumerate(names)]  # fmt: skip
    text = [
        f"Command: `{COMMAND} --part reliable`. Machine: {machine()}.",
        "",
        f"`reliable_lr` on the text example's exact-top kernel (rt-minilm, N = "
        f"{etk.num_samples}, q = {etk.rank}, k = {TOP_PROJECTION}, the frozen trunk) as the "
        f"command line runs it where the check flags the default forecast: MSE, the default "
        f"rate {lr:.4g}, {STEPS} steps, drops 50% and 80%, each try stopped below the 80% "
        f"drop's target; seconds ({repeats} runs in one process, the variants interleaved), "
        "each try's rate and last simulated step, and the rate returned. The returned "
        f"forecasts are {'identical' if same else 'NOT identical'} (every logged loss).",
        "",
        "| variant | seconds | runs | speed-up | tries (rate: last step) | rate returned |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    _report("exact-top-reliable", text)


def ops_part(n: int = 250, top_rows: int = 12) -> None:
    """Part 16: the seconds of each torch operation inside the exact-top kernel's passes
    (default example, N = n, after a warm-up), by a dispatch-mode timer."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from tangentlab import structured, tangent
    from tangentlab.data import take
    from tangentlab.examples import split_trunk

    ex, body, top = _example(n)
    trunk, body = split_trunk(body, LITE0_DEFAULT_PARAMS)
    _kernel(tuple(take(a, slice(0, 8)) for a in ex.data), body, top, trunk)  # warm-up
    secs: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            secs[str(func)] += time.perf_counter() - t0
            calls[str(func)] += 1
            return out

    real = structured.structured_projected
    inside = [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        with Timer():
            out = real(*a, **k)
        inside[0] += time.perf_counter() - t0
        return out

    structured.structured_projected = tangent.structured_projected = timed
    try:
        kernel_s, etk = _kernel(ex.data, body, top, trunk)
    finally:
        structured.structured_projected = tangent.structured_projected = real
    total = sum(secs.values())
    rows = [f"| `{name}` | {t:.2f} | {t / total:.0%} | {calls[name]} |"
            for name, t in sorted(secs.items(), key=lambda kv: -kv[1])[:top_rows]]
    text = [
        f"Command: `{COMMAND} --part ops`. Machine: {machine()}.",
        "",
        f"The default example's exact-top kernel (N = {n}: one chunk, q = {etk.rank}, k = "
        f"{etk.features.shape[1]}, the frozen trunk) took {kernel_s:.1f} s with the timer on, "
        f"{inside[0]:.1f} s of it in the passes (`structured.structured_projected`: the "
        "read-out kernel's q backward passes and the rest kernel's 4), where the torch "
        f"operations timed one by one (a dispatch-mode timer) add up to {total:.1f} s. The "
        f"{top_rows} largest, seconds, share of the operations' sum and calls:",
        "",
        "| operation | seconds | share | calls |",
        "|---|---|---|---|",
        *rows,
    ]
    _report("exact-top-ops", text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speed", "directions", "plan", "k", "sweep", "minibatch",
                                       "capture", "chunk", "layout", "pointwise",
                                       "trunk", "trunk-text", "split", "reliable",
                                       "ops"],
                    default="speed")
    ap.add_argument("--layout-child", nargs=3, help=argparse.SUPPRESS)  # part 11's runs
    ap.add_argument("--pointwise-child", nargs=3, help=argparse.SUPPRESS)  # part 12's runs
    ap.add_argument("--trunk-child", nargs=3, help=argparse.SUPPRESS)  # part 13's runs
    ap.add_argument("--split-child", nargs=3, help=argparse.SUPPRESS)  # part 14's runs
    cli = ap.parse_args()
    part = "layout-child" if cli.layout_child else cli.part
    part = "pointwise-child" if cli.pointwise_child else part
    part = "trunk-child" if cli.trunk_child else part
    part = "split-child" if cli.split_child else part
    if part == "layout-child":
        i, n_, out = cli.layout_child
        layout_child(_LAYOUTS[int(i)], int(n_), out)
    elif part == "pointwise-child":
        i, n_, out = cli.pointwise_child
        pointwise_child(int(i), int(n_), out)
    elif part == "trunk-child":
        i, n_, out = cli.trunk_child
        trunk_child(int(i), int(n_), out)
    elif part == "split-child":
        i, n_, out = cli.split_child
        split_child(int(i), int(n_), out)
    elif part == "directions":
        directions()
    elif part == "plan":
        plan_part()
    elif part == "k":
        k_part()
    elif part == "sweep":
        sweep_part()
    elif part == "minibatch":
        minibatch_part()
    elif part == "capture":
        capture_part()
    elif part == "chunk":
        chunk_part()
    elif part == "layout":
        layout_part()
    elif part == "pointwise":
        pointwise_part()
    elif part == "trunk":
        trunk_part()
    elif part == "trunk-text":
        trunk_text_part()
    elif part == "split":
        split_part()
    elif part == "reliable":
        reliable_part()
    elif part == "ops":
        ops_part()
    else:
        main()

"""Speed of the head-exact forecast: its state in S = span(Q, φ0, W0) and the block's Gram
matrix, against the d-dimensional state and products through the projected features.

    .venv/bin/python benchmarks/headbody_speed.py          # writes RESULTS.md "headbody-speed"
    .venv/bin/python benchmarks/headbody_speed.py --cost   # issue 13's cost goal, the same way
    .venv/bin/python benchmarks/headbody_speed.py --sweep  # the goal for a whole grid, alone

(needs ``make bench-deps`` and the stored rounds of ``holdout_kind.py`` / ``holdout_hybrid.py``.)

**What changed** (NOTE [head-body in span Q] in ``tangentlab.dynamics``, NOTE [head-body
features] in ``tangentlab.headbody``). (1) The head-exact model never leaves S = span(Q,
φ0, W0), so ``head_body_trajectory`` carries its state in S's r' = N + C coordinates
instead of the features' d (before: only when Q spanned φ0). (2) A forecast of at least
N r k / (4k - 2 N r) steps multiplies a projected block through its Gram matrix Θ = Φ Φᵀ
``[N r, N r]`` (when N r <= k; float32 as Φ, formed once per kernel and kept) instead of
through Φ ``[N r, k]`` twice per step; minibatch paths share one GEMM (NOTE [head-body
Gram]). The threshold rests on the break-even measured here (``balance``: seconds to form
Θ over the seconds one product saves, for N r = 512 to 4000 at k = 4096).
Both are exact reformulations, up to float32 round-off in the order of the block's sums.

**How it is measured.** The library's ``tl.forecast`` of stored cells of two held-out tasks
(a MiniLM text task and an EfficientNet-Lite0 image task; the rounds' kernels, recomputed
as ``benchmarks/loss_interval.py`` does), each cell forecast by the new code and by the old
one (the same library with ``HeadBodyProblem.in_basis`` restricted to a Q that spans φ0 and
the block kept as its float32 features: what the code did before), in one process,
alternating which goes first, the cell's settings and horizon (twice the real run's
steps). Ratios are within one run (the machine is noisy). Each timed forecast starts from
a fresh problem, so the new one includes forming Θ (``--cost``: the kernel too). Both are
checked against an independent float64 reference (the d-dimensional state, products
through Φ cast to float64): both should match it to float32 round-off, until a
forecast's own instability (a chaotic stretch of the head-exact model near its stability
limit) amplifies any round-off; the step where each first departs by 1e-3 is reported.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout_limit as hl  # noqa: E402
import loss_interval as li  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab import dynamics as dyn  # noqa: E402

hbm = sys.modules["tangentlab.headbody"]
_NEW_LOGIT = hbm._logit_block

TASKS = ("fortunes6-minilm", "pics-lite0")
CELLS = ("mse-full-m0-a0.3", "ce-full-m0.9-a0.3", "mse-B32-m0.9-a0.3", "ce-B32-m0-a0.3")
OUT = Path(__file__).resolve().parent / "results" / "headbody_speed.json"
COMMAND = ".venv/bin/python benchmarks/headbody_speed.py"


def _old_cols_paths(op, batches, x):
    """The block's minibatch products before 9f2fa3d: each path's batch rows of Φ gathered
    (one einsum a path), Θ's scattered with ``np.add.at``."""
    paths = x.shape[0]
    if batches is None:
        return op.matvec(x.reshape(paths, -1).T).T
    if isinstance(op, dyn.FeatureKernelOperator):
        xs = op.cast(x)
        v = np.stack([np.einsum("bc,bck->k", xs[p], op._rows[batches[p]]) for p in range(paths)])
        return (op.features @ v.T).T.astype(np.float64, copy=False)
    if isinstance(op, dyn.TraceKernelOperator):
        return np.matmul(op.k[batches].transpose(0, 2, 1), x).reshape(paths, -1)
    if isinstance(op, dyn.DenseKernelOperator) and 2 * batches.size >= op._rows.shape[0]:
        dense = np.zeros((paths, op._rows.shape[0], x.shape[2]), dtype=op.theta.dtype)
        for p in range(paths):
            np.add.at(dense[p], batches[p], x[p])
        return (op.theta @ dense.reshape(paths, -1).T).T.astype(np.float64, copy=False)
    return np.stack([op.cols_matvec(batches[p], x[p]) for p in range(paths)])


def _old_logit_block(block, a, n):
    """The tangent model's logit block before 9f2fa3d: a float32 sketch contracted in
    float64."""
    c, r = a.shape
    if block.theta is not None:
        return _NEW_LOGIT(block, a, n)
    phi = block.features.detach().cpu()
    psi = torch.cat([torch.einsum("ca,iak->ick", a, phi[i * r:(i + hbm._CHUNK) * r].double()
                                  .reshape(-1, r, phi.shape[1])).reshape(-1, phi.shape[1])
                     for i in range(0, n, hbm._CHUNK)])  # fmt: skip
    return psi @ psi.T


def _fresh(hb) -> None:
    """Drop what a forecast caches on the kernel (its problem, the reliability check's
    tangent model and top eigenvalues), so that each timed forecast pays for it."""
    for key in ("_problem", "_tangent", "_top"):
        hb.__dict__.pop(key, None)


class _Old:
    """The previous code path: the d-dimensional state unless Q spans φ0, the block's
    products through its features Φ, each path's batch rows gathered, the tangent model's
    logit block in float64."""

    def __enter__(self):
        self.in_basis = dyn.HeadBodyProblem.in_basis
        self.pays = dyn.FeatureKernelOperator.gram_pays
        self.cols = dyn._cols_paths
        new_in_basis = self.in_basis

        def in_basis(p, **kw):
            return new_in_basis(p, **kw) if p.spans_features else None

        dyn.HeadBodyProblem.in_basis = in_basis
        dyn.FeatureKernelOperator.gram_pays = lambda op, products: False
        dyn._cols_paths = _old_cols_paths
        hbm._logit_block = _old_logit_block
        return self

    def __exit__(self, *exc):
        dyn.HeadBodyProblem.in_basis = self.in_basis
        dyn.FeatureKernelOperator.gram_pays = self.pays
        dyn._cols_paths = self.cols
        hbm._logit_block = _NEW_LOGIT


class _Reference(_Old):
    """An independent reference: the d-dimensional state, products through Φ in float64."""

    def __enter__(self):
        super().__enter__()
        dyn.HeadBodyProblem.in_basis = lambda p, **kw: None
        self.features = hbm._np_features
        hbm._np_features = lambda t: t.detach().double().cpu().numpy()
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        hbm._np_features = self.features


def _time(hb, c) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    fc = hl.rerun(hb, c)
    return time.perf_counter() - t0, np.asarray(fc.loss)


def balance(k: int = 4096) -> list[dict]:
    """Break-even of the Gram matrix (NOTE [head-body Gram]): for N r rows of float32
    features Φ ``[N r, k]`` (random), the seconds to form Θ = Φ Φᵀ over the seconds one
    full-batch product saves through Θ instead of Φ (Φᵀ x); one thread."""
    import threadpoolctl

    def each(f, n: int) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n

    def one(nr: int, rng) -> dict:
        phi = rng.standard_normal((nr, k)).astype(np.float32)
        x = rng.standard_normal((nr, 1)).astype(np.float32)
        t_phi = each(lambda: phi @ (phi.T @ x), 20)
        t_form = each(lambda: phi @ phi.T, 2)
        theta = phi @ phi.T
        t_theta = each(lambda: theta @ x, 20)
        return dict(nr=nr, k=k, phi=t_phi, theta=t_theta, form=t_form,
                    break_even=t_form / max(t_phi - t_theta, 1e-12),
                    threshold=nr * k / (4 * k - 2 * nr))  # fmt: skip

    rng, out = np.random.default_rng(0), []
    with threadpoolctl.threadpool_limits(1):
        for nr in (512, 1536, 2560, 4000):
            out.append(one(nr, rng))
            print(out[-1], flush=True)
    return out


def main() -> None:
    torch.set_num_threads(1)
    bal = balance()
    rows = []
    for name in TASKS:
        src = json.loads((li.ALL[name][1] / f"{name}.json").read_text())["cells"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hb = li._hb(name)
        r = hb.basis.shape[1]
        n, d = hb.features.shape
        red = hb.problem().in_basis()
        for k, key in enumerate(CELLS):
            c = src[key]
            order = ("new", "old") if k % 2 == 0 else ("old", "new")
            out = {}
            for which in order:
                hb.__dict__.pop("_problem", None)
                if which == "old":
                    with _Old():
                        hb.problem()
                        out[which] = _time(hb, c)
                    hb.__dict__.pop("_problem", None)
                else:
                    hb.problem()
                    out[which] = _time(hb, c)
            hb.__dict__.pop("_problem", None)
            with _Reference():
                hb.problem()
                ref = _time(hb, c)[1]
            hb.__dict__.pop("_problem", None)
            old, new = out["old"][1], out["new"][1]
            far = np.flatnonzero(np.abs(old - ref) > 1e-3 * np.abs(ref))
            far_new = np.flatnonzero(np.abs(new - ref) > 1e-3 * np.abs(ref))
            upto = min([len(ref)] + [int(f[0]) for f in (far, far_new) if f.size])
            ok = (np.isfinite(ref) & np.isfinite(new) & np.isfinite(old))[:upto]
            diff = float(np.max(np.abs(new[:upto][ok] - ref[:upto][ok]) / np.abs(ref[:upto][ok])))
            diff_old = float(np.max(np.abs(old[:upto][ok] - ref[:upto][ok])
                                    / np.abs(ref[:upto][ok])))  # fmt: skip
            rows.append(dict(task=name, cell=key, steps=len(c["hb_loss"]) - 1, n=n, d=d, r=r,
                             r_reduced=None if red is None else red.phi0.shape[1],
                             nr=n * r, k=None if hb.block is None or hb.block.features is None
                             else int(hb.block.features.shape[1]),
                             old=out["old"][0], new=out["new"][0], diff=diff,
                             diff_old=diff_old,
                             apart=int(far[0]) if far.size else None,
                             apart_new=int(far_new[0]) if far_new.size else None,
                             nan_match=bool((np.isfinite(old) == np.isfinite(new)).all()),
                             ))  # fmt: skip
            print(rows[-1], flush=True)
    st = json.loads(OUT.read_text()) if OUT.exists() else {}
    st.update(rows=rows, balance=bal, machine=machine(), date=datetime.date.today().isoformat())
    OUT.write_text(json.dumps(st, indent=1))
    report()


def cost() -> None:
    """Issue 13's cost goal on holdout.py's cost check (its four tasks, COST_CELLS): the
    head-exact forecast (kernel + the problem's set-up + forecast, the cell's horizon) by the
    new and the old code, against the plain full-network run of the cell's steps (seconds
    per step x steps, as holdout.py measures it), all in one process. Each timed forecast
    starts from nothing cached on the kernel (``_fresh``: its set-up, the reliability
    check's tangent model), so that neither code's first forecast pays for the other's."""
    import holdout as ho

    rows = []
    for name in ho.TASKS:
        state = json.loads((ho.OUT / f"{name}.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task, _, hb, _, hb_s = ho._kernels(name)
            for k, key in enumerate(ho.COST_CELLS):
                c = state["cells"][key]
                opt = ho.tl.SGD(c["lr"], momentum=c["momentum"])
                plain = ho._plain_step_seconds(task, c["batch_size"]) * c["steps"]
                out = {}
                for which in (("new", "old") if k % 2 == 0 else ("old", "new")):
                    _fresh(hb)  # each forecast pays its set-up and reliability check
                    with _Old() if which == "old" else _Nothing():
                        t0 = time.perf_counter()
                        ho.tl.forecast(hb, opt, c["fc_steps"], loss=c["loss"],
                                       batch_size=c["batch_size"], seed=ho.SEED)  # fmt: skip
                        out[which] = time.perf_counter() - t0
                    _fresh(hb)
                rows.append(dict(task=name, cell=key, steps=c["steps"], kernel=hb_s,
                                 plain=plain, **out))  # fmt: skip
                print(rows[-1], flush=True)
    st = json.loads(OUT.read_text()) if OUT.exists() else {}
    st["cost"] = dict(rows=rows, machine=machine(), date=datetime.date.today().isoformat())
    OUT.write_text(json.dumps(st, indent=1))
    report()


def sweep(threads: int = 2) -> None:
    """Issue 13's cost goal for a sweep (the product's use: one kernel, many settings), on
    holdout.py's four tasks, alone: the head-exact kernel once (with the frozen trunk's
    forward pass, which the kernel is computed on) and ``tl.forecast`` of all 24 stored
    cells at their horizons (twice the real run's steps), against the plain full-network
    run of every cell's real steps (seconds per step, measured once per batch size, x steps)
    and against the trunk-cached real run (trunk once, then the stored cell's steps at the
    cached run's measured seconds per step). Per cell: the kernel counted in full and shared
    over the grid. Written to ``OUT["sweep"]``."""
    import holdout as ho

    torch.set_num_threads(threads)
    tasks = {}
    for name in ho.TASKS:
        state = json.loads((ho.OUT / f"{name}.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task, _, hb, _, hb_s = ho._kernels(name)
            data = (task["x"], task["y"])
            step = {b: ho._plain_step_seconds(task, b) for b in (None, ho.BATCH)}
            cached = {}
            for b in (None, ho.BATCH):  # the trunk-cached run's seconds per step
                run = ho.tl.finetune(task["top"], data, ho.tl.SGD(1e-6), 5, batch_size=b,
                                     params=task["params"], log_every=5, progress=False)
                cached[b] = run.train_seconds / 5
            cells = {}
            for key, c in state["cells"].items():
                opt = ho.tl.SGD(c["lr"], momentum=c["momentum"])
                t0 = time.perf_counter()
                ho.tl.forecast(hb, opt, c["fc_steps"], loss=c["loss"],
                               batch_size=c["batch_size"], seed=ho.SEED)  # fmt: skip
                cells[key] = dict(steps=c["steps"], forecast=time.perf_counter() - t0,
                                  reached=li._reached(c),
                                  plain=step[c["batch_size"]] * c["steps"],
                                  cached=cached[c["batch_size"]] * c["steps"])  # fmt: skip
                print(f"[{name}] {key}: {cells[key]}", flush=True)
        tasks[name] = dict(kernel=hb_s, trunk=task["trunk_seconds"], cells=cells,
                           step={str(b): v for b, v in step.items()},
                           cached_step={str(b): v for b, v in cached.items()})  # fmt: skip
    st = json.loads(OUT.read_text()) if OUT.exists() else {}
    st["sweep"] = dict(tasks=tasks, machine=machine(), threads=threads, code=li._commit(),
                       date=datetime.date.today().isoformat())  # fmt: skip
    OUT.write_text(json.dumps(st, indent=1))
    report()


def _sweep_lines(sw: dict) -> list[str]:
    lines = ["", f"Issue 13's cost goal for a sweep (`{COMMAND} --sweep`, {sw['date']}; "
             f"{sw['machine']}; {sw['threads']} threads, alone; code {sw['code']}): "
             "holdout.py's four tasks, all 24 cells each. Forecast = the frozen trunk's "
             "forward pass + the head-exact kernel, once + `tl.forecast` of every cell "
             "(horizon twice the real steps); plain = the whole network, seconds per step x "
             "the cell's real steps; cached = the trunk once + the trunk-cached run's "
             "seconds per step x steps. *Reached*: only the cells whose real run dropped "
             "90% (a run that stalls runs to its horizon, 1500 steps, and dominates the sum). "
             "Per cell: median over the 24 of forecast / plain with the kernel in full, and "
             "with the kernel shared by the grid.", "",
             "| task | kernel + trunk s | forecasts s (24) | plain s (24) | cached s (24) | "
             "sweep: forecast / plain | sweep: forecast / cached | reached: cells, forecast "
             "/ plain | per cell, kernel in full: median, <= 10% | per cell, kernel shared: "
             "median, <= 10% |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    tot = dict(fixed=0.0, fc=0.0, plain=0.0, cached=0.0, fc_r=0.0, plain_r=0.0)
    for name, t in sw["tasks"].items():
        cs = t["cells"].values()
        fixed = t["kernel"] + t["trunk"]
        fc = sum(c["forecast"] for c in cs)
        plain = sum(c["plain"] for c in cs)
        cached = t["trunk"] + sum(c["cached"] for c in cs)
        full = [(fixed + c["forecast"]) / c["plain"] for c in cs]
        shared = [(fixed / len(cs) + c["forecast"]) / c["plain"] for c in cs]
        reached = [c for c in cs if c["reached"]]
        fc_r, plain_r = (sum(c[k] for c in reached) for k in ("forecast", "plain"))
        for k, v in (("fixed", fixed), ("fc", fc), ("plain", plain), ("cached", cached),
                     ("fc_r", fc_r), ("plain_r", plain_r)):
            tot[k] += v
        lines.append(f"| {name} | {fixed:.1f} | {fc:.1f} | {plain:.0f} | {cached:.0f} | "
                     f"**{(fixed + fc) / plain:.1%}** | {(fixed + fc) / cached:.1%} | "
                     f"{len(reached)}, {(fixed + fc_r) / plain_r:.1%} | "
                     f"{np.median(full):.1%}, {sum(r <= 0.1 for r in full)}/{len(full)} | "
                     f"{np.median(shared):.1%}, {sum(r <= 0.1 for r in shared)}/{len(shared)} |")
    lines.append(f"| **all** | {tot['fixed']:.1f} | {tot['fc']:.1f} | {tot['plain']:.0f} | "
                 f"{tot['cached']:.0f} | **{(tot['fixed'] + tot['fc']) / tot['plain']:.1%}** | "
                 f"{(tot['fixed'] + tot['fc']) / tot['cached']:.1%} | "
                 f"{(tot['fixed'] + tot['fc_r']) / tot['plain_r']:.1%} | | |")
    return lines


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def report() -> None:
    st = json.loads(OUT.read_text())
    lines = [f"Command: `{COMMAND}` ({st['date']}; {st['machine']}; run beside other work, "
             "so read the ratios, measured in one process, not the seconds). Rules in the "
             "script's docstring. Seconds of `tl.forecast` per cell (its reliability check "
             "and stability estimate included; the horizon as the round's: twice the real "
             "run's steps; B = 32 with 10 paths).", "",
             "| task | N, d, r -> r' | N r, k | cell | steps | old s | new s | old / new | "
             "max rel. difference of the loss curves from the float64 reference, new / old "
             "(before either is 1e-3 apart) | first step 1e-3 apart from it, new / old |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in st["rows"]:
        diff = f"{x['diff']:.1e} / {x['diff_old']:.1e}"
        apart = " / ".join("never" if v is None else str(v) for v in (x["apart_new"], x["apart"]))
        lines.append(f"| {x['task']} | {x['n']}, {x['d']}, {x['r']} -> {x['r_reduced']} | "
                     f"{x['nr']}, {x['k']} | {x['cell']} | {x['steps']} | {x['old']:.2f} | "
                     f"{x['new']:.2f} | {x['old'] / x['new']:.1f}x | {diff} | {apart} |")
    if "balance" in st:
        lines += ["", "Break-even of the Gram matrix (`balance`, one thread, random float32 "
                  "features, k = 4096): ms per full-batch product through Φ and through Θ, "
                  "seconds to form Θ, products it takes to pay for it, and the library's "
                  "threshold N r k / (4k - 2 N r) steps.", "",
                  "| N r | through Φ ms | through Θ ms | form Θ s | break-even products | "
                  "threshold steps |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['nr']} | {1e3 * b['phi']:.1f} | {1e3 * b['theta']:.1f} | "
                  f"{b['form']:.2f} | {b['break_even']:.0f} | {b['threshold']:.0f} |"
                  for b in st["balance"]]
    if "cost" in st:
        cs = st["cost"]
        lines += ["", f"Issue 13's cost goal (`{COMMAND} --cost`, {cs['date']}; {cs['machine']}; "
                  "one thread, alone; each timed forecast pays its own set-up and reliability "
                  "check): holdout.py's cost-check "
                  "cells, the head-exact forecast (kernel + set-up + forecast over twice the "
                  "real steps) against the plain full-network run of the real steps (seconds "
                  "per step x steps).", "",
                  "| task | cell | steps | kernel s | forecast s: old / new | plain s | "
                  "forecast / plain: old / new |", "|---|---|---|---|---|---|---|"]
        for x in cs["rows"]:
            o, n = x["kernel"] + x["old"], x["kernel"] + x["new"]
            lines.append(f"| {x['task']} | {x['cell']} | {x['steps']} | {x['kernel']:.1f} | "
                         f"{x['old']:.1f} / {x['new']:.1f} | {x['plain']:.1f} | "
                         f"{o / x['plain']:.1%} / {n / x['plain']:.1%} |")
        ro = sorted((x["kernel"] + x["old"]) / x["plain"] for x in cs["rows"])
        rn = sorted((x["kernel"] + x["new"]) / x["plain"] for x in cs["rows"])
        lines += ["", f"Median forecast / plain: old {np.median(ro):.1%}, new {np.median(rn):.1%};"
                  f" at most 10%: old {sum(r <= 0.1 for r in ro)} of {len(ro)}, new "
                  f"{sum(r <= 0.1 for r in rn)} of {len(rn)}."]
    if "sweep" in st:
        lines += _sweep_lines(st["sweep"])
    lines += ["", READING]
    write_section("headbody-speed", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading.** The head-exact forecast's state lives in S = span(Q, φ0, W0) (since
a8f796c): r' = 66 coordinates instead of d = 384 on the MiniLM task, 117 instead of 1,280 on
the Lite0 task. With the Gram matrix for long runs, and since 9f2fa3d for minibatch runs
whose paths make enough products (P paths x T steps; many batch rows scattered and
multiplied at once), the same forecasts ran 4.2-5.1x faster than the code before a8f796c
on the text task and 1.0-6.6x on the image task (first table; one process, one thread,
beside a round-11 run). The smallest gains are a short CE run, where fixed costs dominate
(1.7x), and a 3,000-step CE forecast that blows up early and is rerun at stable fractions
of its rate (1.0x). The new curves agree with an independent float64 reference to float32
round-off wherever the forecast is stable; in the two MSE cells at a = 0.3 without momentum
the head-exact model itself turns chaotic after ~230 steps, and any round-off, old or new,
is amplified past 1e-3 within a few steps of the same place (230-242).

**Issue 13's cost goal.** One forecast (kernel, set-up, reliability check and forecast)
costs a median 12.2% of the plain full-network run it predicts on holdout.py's twelve
cost-check cells (5 of 12 within 10%; the old code 12.8%, `--cost`). The minibatch
change shows in the short minibatch image cells: 62.9% and 136.4% of their 78- and 24-step
runs, against 139.8% and 204.9% by the old code in the same process. The rest is the
kernel: the frozen trunk's forward pass and the head-exact kernel cost 4.0-6.5 plain
full-batch steps on these tasks (`--sweep`), and the runs that reach a 90% drop there take
a median 78 steps (10-90%: 24-360), so a single short run cannot be forecast for 10% of
its cost. A single
forecast meets the goal once the run is longer than about ten times that, 40-65 full-batch
steps (more for minibatch runs, whose steps are cheaper).

For what the product is for, forecasting many settings from one kernel, the goal is met
(`--sweep`, two threads, alone): the 24 settings of each task forecast for **2.3%** of
their plain runs pooled (text 0.6% and 0.6%, image 3.1% and 8.5%), 3.4% counting only the
cells whose real run dropped 90% (a stalled run goes to its 1,500-step horizon). With the
kernel shared, 77 of the 96 cells cost at most 10% of their own run (text 48 of 48). Against
a run that caches the frozen trunk (what a careful user of a one-block fine-tune can do)
the text grids cost 1.6-1.7%, the image grids 23.6% and 48.7%. There the long minibatch
forecasts dominate (up to 38 s for 3,000 steps x 10 paths): half in the head-exact
trajectory (the Θ product, [1536, 1536] x 10 paths a step, memory-bound) and half in the
reliability check's tangent model, simulated path by path in float64. What it would take
for a single short run: a kernel of at most about one plain step, that is fewer read-out
directions and probes (r + S backward passes through the trained block per sample) or a
cheaper sketch of them; for the image grids, the reliability check in float32 over all
paths at once."""

if __name__ == "__main__":
    if "--report" in sys.argv:
        report()
    elif "--sweep" in sys.argv:
        sweep()
    elif "--cost" in sys.argv:
        torch.set_num_threads(1)
        cost()
    else:
        main()

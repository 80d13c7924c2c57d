"""Scale benchmark (issue 4): forecast a large data set from a subsample, kernel cost and
memory as N, C and k grow, and the trace kernel against the full kernel.

    .venv/bin/python benchmarks/scale.py                     # all parts (~30 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --part memory       # one part: forecast|memory|trace
    .venv/bin/python benchmarks/scale.py --quick             # small sizes, to check it runs
    .venv/bin/python benchmarks/scale.py --render            # rebuild the section from JSON

Model: EfficientNet-Lite0 (ImageNet weights, fresh 10-class head), Fashion-MNIST at 64 px,
trainable weights = the example's default (last MBConv block + head, 1.03M weights, batch
norm frozen). The frozen trunk (blocks 0-14) is run once per data set
(``benchmarks/_split.py``); kernels and real runs use the top with the cached inputs —
the same weights, logits and gradients — and the trunk pass is counted in every time.
Kernels: tensor-sketch projection k = 4096 (the CLI's automatic choice at these sizes),
``jacobian_mode="structured"`` (the fastest mode in ``benchmarks/kernel.py``; fixed here
because ``auto`` times the modes on one chunk and is noisy on a busy machine).

Parts (each writes ``benchmarks/results/scale-<part>.json``; ``--quick``: ``-quick.json``):

- ``forecast``: N = 20,000 training images; kernels on the first n of a fixed random
  permutation (n = 500, 1,000, 2,000); ``forecast(kernel, lr, steps, dataset_size=N)``
  with and without the power-law tail; a real full-batch GD run (``tl.finetune``) on all
  N with the same lr (half the stability limit, as the CLI picks it, from the n = 2,000
  kernel). Errors from ``tl.compare`` (target: 80% drop of the run's initial loss).
  Cost ratio = real (trunk over N + training steps) / forecast (trunk over n + kernel +
  eigendecomposition + forecast), all measured in this run.
- ``memory``: one fresh process per row (its peak memory is its own), explicit
  ``memory_budget``: kernel time, samples/s, peak resident memory during the kernel call,
  its growth over the resident memory before the call, the planner's estimate.
- ``trace``: N = 1,000: full projected kernel vs trace kernels (``trace=S`` random output
  probes, ``trace=True`` exact trace) at the same k: time, ‖K⊗I − Θ̂‖/‖Θ̂‖, steps to target
  against the full kernel's forecast and against a real full-batch run on the same data.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, rss, run_job, write_section  # noqa: E402
from _split import cached_inputs, split  # noqa: E402

SCRIPT = Path(__file__).resolve()
RESULTS_DIR = SCRIPT.parent / "results"
EXAMPLE = "fashion-lite0"
K = 4096
SEED = 0
BUDGET = 1 << 30  # memory part: the configured budget of every row (1 GiB)
PARTS = ("forecast", "memory", "trace")

SIZES = {
    False: dict(
        N=20000,
        ns=[2000, 1000, 500],
        min_steps=25,
        max_steps=60,
        horizon=200,
        full_model_slice=2000,
        full_model_steps=2,
        mem_N=[250, 500, 1000, 2000, 4000],
        mem_k=[512, 1024, 4096, 16384],
        mem_kN=1000,
        mem_C=[2, 10, 100],
        mem_CN=500,
        refuse_N=8000,
        trace_N=1000,
        trace_S=[1, 2, 4],
        trace_steps=60,
    ),
    True: dict(
        N=2000,
        ns=[400, 200, 100],
        min_steps=10,
        max_steps=30,
        horizon=100,
        full_model_slice=100,
        full_model_steps=2,
        mem_N=[50, 100, 200],
        mem_k=[512, 1024],
        mem_kN=100,
        mem_C=[2, 10],
        mem_CN=50,
        refuse_N=8000,
        trace_N=100,
        trace_S=[1, 2],
        trace_steps=30,
    ),
}


# ------------------------------------------------------------------------------- helpers
def _say(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(num_samples: int):
    from tangentlab.examples import load_example

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_example(EXAMPLE, num_samples=num_samples, seed=SEED)


def _perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED))


def _tangent(top, params, k: int = K):
    import tangentlab as tl

    return tl.Tangent(
        top,
        params=params,
        projection=tl.Projection(k, kind="tensor", seed=SEED),
        jacobian_mode="structured",
    )


def _cli_lr(kernel) -> float:
    """The CLI's default: half the stability limit, eta * lambda_max / N = 1, 3 digits."""
    lam_max = float(kernel.eigh()[0].max())
    return float(f"{kernel.num_samples / lam_max:.3g}")


def _reset_peak() -> bool:
    """Reset the process's peak resident memory (VmHWM) to its current value (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _out_path(part: str, quick: bool) -> Path:
    return RESULTS_DIR / f"scale-{part}{'-quick' if quick else ''}.json"


def _curve(a) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=float)]


# ------------------------------------------------------------------- part 1: forecast N
def part_forecast(sz: dict, shared: dict) -> dict:
    import tangentlab as tl

    N, ns = sz["N"], sz["ns"]
    t0 = time.perf_counter()
    ex = _load(N)
    X, y = ex.data
    load_s = time.perf_counter() - t0
    _say(f"loaded {N} images {tuple(X.shape)} in {load_s:.1f} s")
    perm = _perm(N)
    params = ex.default_params
    rows = []
    lr = None
    spectra = {}
    for n in sorted(ns, reverse=True):  # n = max first: it sets the learning rate
        idx = perm[:n]
        top, xt, trunk_s = cached_inputs(EXAMPLE, ex.model, X[idx])
        t0 = time.perf_counter()
        kernel = tl.compute_kernel(
            _tangent(top, params), (xt, y[idx]), keep_theta=False, progress=False
        )
        kernel_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lam, _ = kernel.eigh()  # cached on the kernel: the forecasts below reuse it
        eigh_s = time.perf_counter() - t0
        if lr is None:
            lr = _cli_lr(kernel)
            _say(
                f"lr = {lr:g} (half the stability limit of the n={n} kernel, "
                f"lambda_max/n = {float(lam.max()) / n:.4g})"
            )
        row = dict(
            n=n,
            trunk_seconds=trunk_s,
            kernel_seconds=kernel_s,
            eigh_seconds=eigh_s,
            lambda_max_over_n=float(lam.max()) / n,
            forecasts={},
        )
        for tail in ("none", "powerlaw"):
            t0 = time.perf_counter()
            spec = tl.extrapolate(kernel, N, tail=tail)
            fc = tl.forecast(spec, tl.SGD(lr), sz["horizon"], loss="mse")
            fc_s = time.perf_counter() - t0
            spectra[(n, tail)] = fc
            row["forecasts"][tail] = dict(
                forecast_seconds=fc_s,
                loss=_curve(fc.loss),
                accuracy=_curve(fc.accuracy),
                steps_to_target_own=fc.steps_to(0.2 * float(fc.loss[0])),
                alpha=None if tail == "none" else float(spec.alpha),
                beta=None if tail == "none" else float(spec.beta),
                modes=int(spec.num_modes),
                tail_note=spec.info.get("note"),
            )
        rows.append(row)
        t_own = [f["steps_to_target_own"] for f in row["forecasts"].values()]
        _say(
            f"n={n}: trunk {trunk_s:.1f} s, kernel {kernel_s:.1f} s, eigh {eigh_s:.1f} s, "
            f"T_hat(80%) {t_own}"
        )
        del kernel, top, xt
        gc.collect()

    t_hat = [
        f["steps_to_target_own"] or sz["max_steps"] for r in rows for f in r["forecasts"].values()
    ]
    steps = int(min(sz["max_steps"], max(sz["min_steps"], math.ceil(1.6 * max(t_hat)))))

    # The real run: trunk once over all N, then full-batch GD of the top.
    top, xt_all, trunk_all_s = cached_inputs(EXAMPLE, ex.model, X)
    _say(f"trunk over all {N}: {trunk_all_s:.1f} s")
    shared.update(xt=xt_all[perm], y=y[perm], params=params)  # permuted: first n = subsample

    # A user's plain run on the full network (estimate): a few full-batch steps on a slice.
    m = sz["full_model_slice"]
    fm = tl.finetune(
        ex.model,
        (X[:m], y[:m]),
        tl.SGD(lr),
        sz["full_model_steps"],
        params=params,
        log_every=sz["full_model_steps"],
        progress=False,
    )
    full_step_s = fm.train_seconds / sz["full_model_steps"] * (N / m)
    _say(
        f"full network: {fm.train_seconds:.1f} s for {sz['full_model_steps']} steps on {m} "
        f"-> {full_step_s:.1f} s per full-batch step on {N} (linear scaling)"
    )
    fm_train_s = fm.train_seconds
    del X, fm
    ex.data = None
    gc.collect()

    _say(f"real run: {steps} full-batch steps on {N} (log every step)")
    run = tl.finetune(
        top, (xt_all, y), tl.SGD(lr), steps, params=params, log_every=1, progress=False
    )
    step_s = run.train_seconds / max(1, run.steps_done)
    _say(
        f"real run: train {run.train_seconds:.1f} s, eval {run.eval_seconds:.1f} s, "
        f"T(80%) = {run.steps_to(0.2 * float(run.loss[0]))}"
    )
    real_s = trunk_all_s + run.train_seconds

    for row in rows:
        for tail, f in row["forecasts"].items():
            cmp = tl.compare(spectra[(row["n"], tail)], run)
            cost = (
                row["trunk_seconds"]
                + row["kernel_seconds"]
                + row["eigh_seconds"]
                + f["forecast_seconds"]
            )
            t_run = cmp.steps_to_target_run
            f.update(
                steps_to_target=cmp.steps_to_target_forecast,
                steps_error=cmp.steps_to_target_error,
                curve_error=cmp.curve_error,
                final_accuracy_forecast=cmp.final_accuracy_forecast,
                notes=list(cmp.notes),
                cost_seconds=cost,
                ratio_run=real_s / cost,
                ratio_to_target=None if t_run is None else (trunk_all_s + t_run * step_s) / cost,
                ratio_full_model_est=steps * full_step_s / cost,
                ratio_full_model_to_target_est=None
                if t_run is None
                else t_run * full_step_s / cost,
            )
    return dict(
        machine=machine(),
        N=N,
        k=K,
        lr=lr,
        steps=steps,
        load_seconds=load_s,
        params=params,
        num_params=tl.Tangent(top, params=params).num_params,
        real=dict(
            trunk_seconds=trunk_all_s,
            train_seconds=run.train_seconds,
            eval_seconds=run.eval_seconds,
            step_seconds=step_s,
            total_seconds=real_s,
            loss=_curve(run.loss),
            accuracy=_curve(run.accuracy),
            steps_to_target=run.steps_to(0.2 * float(run.loss[0])),
            target=0.2 * float(run.loss[0]),
            initial_loss=float(run.loss[0]),
            final_accuracy=float(run.accuracy[-1]),
        ),
        full_model=dict(
            slice=m,
            steps=sz["full_model_steps"],
            train_seconds=fm_train_s,
            step_seconds_N=full_step_s,
        ),
        rows=rows,
    )


# ----------------------------------------------------------------- part 2: memory rows
def _top_inputs(sz: dict, shared: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Cached trunk outputs of the first n samples of the fixed permutation of N images."""
    if "xt" not in shared or shared["xt"].shape[0] < n:
        ex = _load(sz["N"])
        X, y = ex.data
        idx = _perm(sz["N"])[:n]
        _top, xt, s = cached_inputs(EXAMPLE, ex.model, X[idx])
        _say(f"trunk over {n} images: {s:.1f} s")
        shared.update(xt=xt, y=y[idx], params=ex.default_params)
    return shared["xt"][:n], shared["y"][:n], shared["params"]


def job_kernel_row(xfile: str, n: int, c: int, k: int, budget: int) -> dict:
    """One kernel in this (fresh) process: time, peak memory during the call, the plan."""
    import tangentlab as tl
    from tangentlab.errors import MemoryBudgetError
    from tangentlab.memory import activation_elements, plan

    saved = torch.load(xfile, weights_only=True)
    xt, y = saved["xt"], saved["y"]
    if n > xt.shape[0]:  # the refused row: only the plan runs, so repeated rows will do
        reps = math.ceil(n / xt.shape[0])
        xt, y = xt.repeat(reps, 1, 1, 1), y.repeat(reps)
    xt, y = xt[:n].contiguous(), y[:n].clone()
    ex = _load(10)
    _trunk, top = split(EXAMPLE, ex.model)
    ex.data = None
    if c != 10:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            top._fc = torch.nn.Linear(top._fc.in_features, c)
        y = y % c
    t = _tangent(top, ex.default_params, k)
    x1 = xt[:1]
    act = activation_elements(t.model, lambda: t.f0(x1))
    p_held = t.materialized_params(x1)
    out = dict(num_params=t.num_params, materialized_params=p_held, activation_elements=act)
    try:
        mp = plan(n=n, c=c, p=p_held, k=k, itemsize=4, act=act, budget=budget)
        out.update(
            chunk=mp.chunk,
            keep_theta=mp.keep_theta,
            estimate=mp.estimate,
            fixed=mp.fixed,
            per_sample=mp.per_sample,
        )
    except MemoryBudgetError as exc:
        out.update(plan_error=str(exc))
    gc.collect()
    before = rss()
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    try:
        kernel = tl.compute_kernel(t, (xt, y), memory_budget=budget, progress=False)
    except MemoryBudgetError as exc:
        out.update(refused=str(exc), refused_after=time.perf_counter() - t0)
        return out
    sec = time.perf_counter() - t0
    peak = _hwm() if exact_peak else None
    from _common import peak_rss

    out.update(
        seconds=sec,
        samples_per_s=n / sec,
        rss_before=before,
        peak_rss=peak if peak is not None else peak_rss(),
        peak_is_call_only=exact_peak,
        process_peak_rss=peak_rss(),
        jacobian_mode=str(t.jacobian_mode),
        has_theta=kernel.theta is not None,
    )
    out["delta"] = out["peak_rss"] - before
    return out


def part_memory(sz: dict, shared: dict) -> dict:
    n_max = max(sz["mem_N"] + [sz["mem_kN"], sz["mem_CN"]])
    xt, y, _params = _top_inputs(sz, shared, n_max)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tangentlab-scale-") as tmp:
        xfile = str(Path(tmp) / "xtop.pt")
        torch.save({"xt": xt.contiguous(), "y": y.clone()}, xfile)
        grid = [("N", n, 10, K) for n in sz["mem_N"]]
        grid += [("k", sz["mem_kN"], 10, k) for k in sz["mem_k"] if k != K]
        grid += [("C", sz["mem_CN"], c, K) for c in sz["mem_C"] if c != 10]
        grid += [("refused", sz["refuse_N"], 10, K)]
        for axis, n, c, k in grid:
            _say(f"memory row: N={n} C={c} k={k} budget={BUDGET / 2**30:.2f} GiB")
            job = dict(job="kernel_row", xfile=xfile, n=n, c=c, k=k, budget=BUDGET)
            r = run_job(SCRIPT, job, timeout=1800)
            r.update(axis=axis, n=n, c=c, k=k, budget=BUDGET)
            if "seconds" in r:
                _say(
                    f"  {r['seconds']:.1f} s, delta {r['delta'] / 2**20:.0f} MiB, "
                    f"estimate {r['estimate'] / 2**20:.0f} MiB, chunk {r['chunk']}"
                )
            else:
                _say(f"  refused: {r.get('refused', '')[:120]}")
            rows.append(r)
    return dict(machine=machine(), budget=BUDGET, rows=rows)


# ------------------------------------------------------------------- part 3: trace kernel
def trace_supported() -> bool:
    import tangentlab as tl

    return "trace" in inspect.signature(tl.compute_kernel).parameters


def part_trace(sz: dict, shared: dict) -> dict:
    import tangentlab as tl

    if not trace_supported():
        _say("compute_kernel(trace=...) does not exist yet: part 'trace' skipped")
        return dict(machine=machine(), pending="compute_kernel has no trace= argument yet")
    n = sz["trace_N"]
    xt, y, params = _top_inputs(sz, shared, n)
    ex = _load(10)
    _trunk, top = split(EXAMPLE, ex.model)
    data = (xt, y)
    t0 = time.perf_counter()
    full = tl.compute_kernel(_tangent(top, params), data, keep_theta=False, progress=False)
    full_s = time.perf_counter() - t0
    c = full.num_classes
    lam, _ = full.eigh()
    lr = _cli_lr(full)
    steps = sz["trace_steps"]
    fc_full = tl.forecast(full, tl.SGD(lr), steps)
    _say(f"trace part: full kernel {full_s:.1f} s, lr {lr:g}")
    # Frobenius norms through Phi (never forming Theta [NC, NC]):
    # ||Theta||^2 = sum lam^2; <K (x) I, Theta> = sum_ij K_ij tr(Theta_ij), tr(Theta_ij) =
    # sum_a phi_ia . phi_ja; the best K in Frobenius norm is K* = tr-blocks / C.
    phi = full.features.double().reshape(n, c, -1)
    theta_sq = float((lam.double() ** 2).sum())
    tr_blocks = torch.einsum("iak,jak->ij", phi, phi)
    del phi

    def rel_err(kmat: torch.Tensor) -> float:
        kmat = kmat.double()
        sq = theta_sq - 2 * float((kmat * tr_blocks).sum()) + c * float((kmat**2).sum())
        return math.sqrt(max(sq, 0.0) / theta_sq)

    run = tl.finetune(top, data, tl.SGD(lr), steps, params=params, log_every=1, progress=False)
    target = 0.2 * float(run.loss[0])
    cmp_full = tl.compare(fc_full, run)
    rows = [
        dict(
            kernel=f"full, projected k={K}",
            trace=None,
            seconds=full_s,
            rel_frobenius=0.0,
            steps_to_target=cmp_full.steps_to_target_forecast,
            error_vs_run=cmp_full.steps_to_target_error,
            error_vs_full=0.0,
            curve_error=cmp_full.curve_error,
            loss=_curve(fc_full.loss),
        )
    ]
    rows.append(
        dict(
            kernel="best K⊗I (K = tr-blocks/C of the full kernel)",
            trace="oracle",
            seconds=None,
            rel_frobenius=rel_err(tr_blocks / c),
        )
    )
    t_full = cmp_full.steps_to_target_forecast
    for s in [*sz["trace_S"], True]:
        t0 = time.perf_counter()
        kt = tl.compute_kernel(
            _tangent(top, params), data, trace=s, keep_theta=False, progress=False
        )
        sec = time.perf_counter() - t0
        fc = tl.forecast(kt, tl.SGD(lr), steps)
        cmp = tl.compare(fc, run)
        t_hat = cmp.steps_to_target_forecast
        rows.append(
            dict(
                kernel="exact trace" if s is True else f"trace, S={s} probes",
                trace=s,
                seconds=sec,
                rel_frobenius=rel_err(kt.gram()),
                steps_to_target=t_hat,
                error_vs_run=cmp.steps_to_target_error,
                error_vs_full=None if t_hat is None or not t_full else abs(t_hat - t_full) / t_full,
                curve_error=cmp.curve_error,
                loss=_curve(fc.loss),
                structure=getattr(kt, "structure", None),
            )
        )
        _say(f"trace={s}: {sec:.1f} s, T_hat {t_hat}, rel err {rows[-1]['rel_frobenius']:.3f}")
    return dict(
        machine=machine(),
        N=n,
        C=c,
        k=K,
        lr=lr,
        steps=steps,
        target=target,
        real=dict(
            loss=_curve(run.loss),
            steps_to_target=cmp_full.steps_to_target_run,
            train_seconds=run.train_seconds,
        ),
        rows=rows,
    )


# ------------------------------------------------------------------------------- render
def _f(v, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def plot_forecast(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    real = np.array([np.nan if v is None else v for v in r["real"]["loss"]])
    ax.plot(np.arange(real.size), real, "k-", lw=2.2, label=f"real run, N={r['N']:,}")
    colors = {n: f"C{i}" for i, n in enumerate(sorted(x["n"] for x in r["rows"]))}
    for row in r["rows"]:
        for tail, ls in (("none", "--"), ("powerlaw", ":")):
            lo = np.array([np.nan if v is None else v for v in row["forecasts"][tail]["loss"]])
            lo = lo[: real.size + 20]
            ax.plot(
                np.arange(lo.size),
                lo,
                ls,
                color=colors.get(row["n"]),
                label=f"forecast n={row['n']:,}"
                + (" + power-law tail" if tail == "powerlaw" else ""),
            )
    ax.axhline(r["real"]["target"], color="grey", lw=0.8, label="target (80% drop)")
    ax.set_yscale("log")
    ax.set_xlabel("full-batch GD step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"EfficientNet-Lite0 / Fashion-MNIST, N={r['N']:,}, lr={r['lr']:g}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [x for x in r["rows"] if "seconds" in x]
    n_rows = sorted([x for x in ok if x["c"] == 10 and x["k"] == K], key=lambda x: x["n"])
    kn = max((x["n"] for x in ok if x["axis"] == "k"), default=None)
    k_rows = sorted([x for x in ok if x["c"] == 10 and x["n"] == kn], key=lambda x: x["k"])
    cn = max((x["n"] for x in ok if x["axis"] == "C"), default=None)
    c_rows = sorted([x for x in ok if x["k"] == K and x["n"] == cn], key=lambda x: x["c"])
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharey="row")
    for col, (rows, key, label) in enumerate(
        (
            (n_rows, "n", "N (C=10, k=4096)"),
            (k_rows, "k", f"k (N={kn}, C=10)"),
            (c_rows, "c", f"C (N={cn}, k=4096)"),
        )
    ):
        xs = [x[key] for x in rows]
        at, am = axes[0, col], axes[1, col]
        at.loglog(xs, [x["seconds"] for x in rows], "o-", label="kernel time")
        at.set_xlabel(label)
        am.loglog(xs, [x["delta"] / 2**20 for x in rows], "o-", label="peak − before (measured)")
        am.loglog(xs, [x["estimate"] / 2**20 for x in rows], "s--", label="planner estimate")
        am.axhline(r["budget"] / 2**20, color="r", lw=1, label="budget")
        for a in (at, am):
            a.set_xticks(xs, [str(v) for v in xs])
            a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        am.set_xlabel(label)
    axes[0, 0].set_ylabel("seconds")
    axes[1, 0].set_ylabel("MiB")
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("Projected kernel of EfficientNet-Lite0's last block + head (tensor sketch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trace(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    real = np.array([np.nan if v is None else v for v in r["real"]["loss"]])
    ax.plot(np.arange(real.size), real, "k-", lw=2.2, label=f"real run, N={r['N']}")
    for row in r["rows"]:
        if "loss" not in row:
            continue
        lo = np.array([np.nan if v is None else v for v in row["loss"]])
        ax.plot(np.arange(lo.size), lo, "--", label=row["kernel"])
    ax.axhline(r["target"], color="grey", lw=0.8, label="target (80% drop)")
    ax.set_yscale("log")
    ax.set_xlabel("full-batch GD step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"Trace vs full kernel, Lite0 top, N={r['N']}, k={r['k']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict, quick: bool) -> str:
    sfx = "-quick" if quick else ""
    lines = [
        "## Scale: subsample forecasts, kernel memory, trace kernels (`benchmarks/scale.py`)",
        "",
        "Command: `.venv/bin/python benchmarks/scale.py` (all parts; `--part forecast|memory|"
        "trace` reruns one, `--render` rebuilds this section from the JSON in "
        "`benchmarks/results/scale-*.json`). Run as `flock /tmp/tangentlab-bench.lock nice -n 5 "
        ".venv/bin/python benchmarks/scale.py` on a machine shared with other work (2 cores), "
        "so absolute times are noisy; every ratio compares timings of the same run.",
        "",
        "Model: EfficientNet-Lite0 (ImageNet weights, fresh 10-class head), Fashion-MNIST "
        "at 64 px; trainable = the example's default (last MBConv block + head conv/BN + fc, "
        "1,030,410 weights, batch norm frozen). The frozen trunk runs once per data set "
        "(`benchmarks/_split.py`) and its time is counted; kernels and real runs use the top "
        "with the cached inputs (same weights, logits and gradients). Kernels: tensor sketch "
        f'k = {K}, `jacobian_mode="structured"`.',
        "",
    ]
    fr = res.get("forecast")
    if fr:
        plot_forecast(fr, RESULTS_DIR / f"scale-forecast{sfx}.png")
        real = fr["real"]
        lines += [
            f"### 1. Forecast N = {fr['N']:,} from n ≪ N samples vs a real run on all N",
            "",
            f"Machine: {fr['machine']}.",
            "",
            f"Full-batch GD, MSE, lr = {fr['lr']:g} (half the stability limit of the "
            f"n = {max(x['n'] for x in fr['rows']):,} kernel, as the CLI picks it; the same lr "
            f"for every n and the real run), {fr['steps']} steps. Real run "
            f"(`tl.finetune` on the top, all {fr['N']:,} samples, loss logged every step): "
            f"L_0 = {real['initial_loss']:.3f}, target ε = 0.2 L_0 = {real['target']:.3f} "
            f"reached at step T = {real['steps_to_target']}; trunk pass over N "
            f"{real['trunk_seconds']:.0f} s + training {real['train_seconds']:.0f} s "
            f"({real['step_seconds']:.1f} s/step) = {real['total_seconds']:.0f} s "
            f"(the per-step full-loss evaluations, {real['eval_seconds']:.0f} s, are not "
            "counted: a full-batch step computes that loss anyway). Forecast cost = trunk "
            "pass over n + kernel + eigendecomposition (k × k) + forecast.",
            "",
            "| n | tail | T̂ | steps error | curve error | trunk | kernel | eigh | forecast | "
            "forecast total | cost ratio (run) | cost ratio (to T) | est. × full network "
            "(run) | est. × full network (to T) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(fr["rows"], key=lambda x: x["n"]):
            for tail, f in row["forecasts"].items():
                lines.append(
                    f"| {row['n']:,} | {tail} | {_f(f['steps_to_target'], '{}')} | "
                    f"{_f(f['steps_error'], '{:.1%}')} | {f['curve_error']:.4f} | "
                    f"{row['trunk_seconds']:.1f} s | {row['kernel_seconds']:.1f} s | "
                    f"{row['eigh_seconds']:.1f} s | {f['forecast_seconds']:.1f} s | "
                    f"{f['cost_seconds']:.1f} s | {f['ratio_run']:.1f}× | "
                    f"{_f(f['ratio_to_target'], '{:.1f}×')} | "
                    f"{f['ratio_full_model_est']:.0f}× | "
                    f"{_f(f['ratio_full_model_to_target_est'], '{:.0f}×')} |"
                )
        fm = fr["full_model"]
        lines += [
            "",
            f"Cost ratio (run) = real run as executed ({fr['steps']} steps) / forecast total; "
            "(to T) = trunk + the T steps needed to see the target / forecast total. "
            '**Estimates**, labelled as such: "× full network" replaces the real run by a '
            "user's plain run on the full network without trunk caching "
            f"(`tl.finetune(model, ...)`; {fm['steps']} full-batch steps measured on "
            f"{fm['slice']:,} samples, scaled linearly to {fr['N']:,}: "
            f"{fm['step_seconds_N']:.0f} s/step).",
            "",
            f"![forecast vs real run](results/scale-forecast{sfx}.png)",
            "",
        ]
    mr = res.get("memory")
    if mr:
        plot_memory(mr, RESULTS_DIR / f"scale-memory{sfx}.png")
        lines += [
            "### 2. Kernel cost and peak memory as N, C and k grow",
            "",
            f"Machine: {mr['machine']}.",
            "",
            f"Each row in a fresh process, `memory_budget` = {mr['budget'] / 2**30:.2f} GiB; "
            "peak = peak resident memory during the `compute_kernel` call (VmHWM reset just "
            "before it), before = resident memory before the call (model, cached inputs, "
            "torch), Δ = peak − before, the memory the computation took; estimate = the "
            "planner's planned peak (`memory.plan`, same inputs as `compute_kernel`). "
            "Θ kept = whether the plan formed Θ = ΦΦᵀ [NC, NC] within the budget.",
            "",
            "| N | C | k | time | samples/s | peak | before | Δ | estimate | budget | Δ/budget "
            "| Δ/estimate | chunk | Θ kept |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        over = []
        for x in mr["rows"]:
            if "seconds" not in x:
                continue
            if x["delta"] > x["budget"]:
                over.append(x)
            lines.append(
                f"| {x['n']:,} | {x['c']} | {x['k']:,} | {x['seconds']:.1f} s | "
                f"{x['samples_per_s']:.1f} | {_mib(x['peak_rss'])} | {_mib(x['rss_before'])} | "
                f"{_mib(x['delta'])} | {_mib(x['estimate'])} | {_mib(x['budget'])} | "
                f"{x['delta'] / x['budget']:.0%} | {x['delta'] / x['estimate']:.2f} | "
                f"{x['chunk']} | {'yes' if x['has_theta'] else 'no'} |"
            )
        for x in mr["rows"]:
            if "refused" in x:
                lines += [
                    "",
                    f"N = {x['n']:,}, C = {x['c']}, k = {x['k']:,} under the same budget is "
                    f"refused before allocating (after {x['refused_after']:.1f} s): "
                    f'"{x["refused"]}"',
                ]
        lines += [
            "",
            "Rows over budget (Δ > budget): "
            + (
                "none."
                if not over
                else ", ".join(f"N={x['n']} C={x['c']} k={x['k']}" for x in over)
            ),
            "",
            f"![kernel time and memory, log-log](results/scale-memory{sfx}.png)",
            "",
        ]
    tr = res.get("trace")
    if tr and "pending" in tr:
        lines += ["### 3. Trace kernel vs full kernel", "", f"Not run: {tr['pending']}.", ""]
    elif tr:
        plot_trace(tr, RESULTS_DIR / f"scale-trace{sfx}.png")
        lines += [
            "### 3. Trace kernel vs full kernel",
            "",
            f"Machine: {tr['machine']}.",
            "",
            f"N = {tr['N']:,} (top + cached inputs), C = {tr['C']}, k = {tr['k']:,}; "
            f"full-batch GD, MSE, lr = {tr['lr']:g} (half the stability limit of the full "
            f"kernel), target = 80% drop. Real run on the same {tr['N']:,} samples: "
            f"T = {tr['real']['steps_to_target']}. Relative error ‖K⊗I − Θ̂‖_F/‖Θ̂‖_F against "
            "the full projected kernel Θ̂ (computed through Φ, without forming Θ̂); the "
            '"best K⊗I" row is the smallest this error can be for any K.',
            "",
            "| kernel | time | ‖K⊗I − Θ̂‖/‖Θ̂‖ | T̂ | error vs real run | error vs full "
            "kernel's T̂ | curve error |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in tr["rows"]:
            lines.append(
                f"| {x['kernel']} | {_f(x['seconds'], '{:.1f} s')} | {x['rel_frobenius']:.3f} "
                f"| {_f(x.get('steps_to_target'), '{}')} | "
                f"{_f(x.get('error_vs_run'), '{:.1%}')} | {_f(x.get('error_vs_full'), '{:.1%}')}"
                f" | {_f(x.get('curve_error'), '{:.4f}')} |"
            )
        lines += ["", f"![trace vs full kernel](results/scale-trace{sfx}.png)", ""]
    reading = res.get("reading")
    if reading:
        lines += [f"**Reading (scale).** {reading}", ""]
    return "\n".join(lines)


READING = RESULTS_DIR / "scale-reading.md"


def _load_all(quick: bool) -> dict:
    res = {}
    for part in PARTS:
        p = _out_path(part, quick)
        if p.exists():
            res[part] = json.loads(p.read_text())
    if READING.exists() and not quick:
        res["reading"] = " ".join(READING.read_text().split())
    return res


JOBS = {"kernel_row": job_kernel_row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--render", action="store_true", help="only rebuild the section from JSON")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(JOBS[job.pop("job")](**job)))
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    if not args.render:
        sz = SIZES[args.quick]
        shared: dict = {}
        parts = PARTS if args.part == "all" else (args.part,)
        t_all = time.perf_counter()
        for part in parts:
            t0 = time.perf_counter()
            fn = {"forecast": part_forecast, "memory": part_memory, "trace": part_trace}[part]
            out = fn(sz, shared)
            out.update(quick=args.quick, seconds=time.perf_counter() - t0)
            _out_path(part, args.quick).write_text(json.dumps(out, indent=1))
            _say(f"part {part} done in {out['seconds']:.0f} s")
            gc.collect()
        _say(f"all done in {time.perf_counter() - t_all:.0f} s")
    text = render(_load_all(args.quick), args.quick)
    print(text)
    if not args.no_write and not args.quick:
        write_section("scale", text)


if __name__ == "__main__":
    main()

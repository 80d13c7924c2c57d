"""Eigendecomposition of a projected kernel: speed and forecast error of each method (issue 9).

    .venv/bin/python benchmarks/eigh.py            # full run (~20-30 min on 2 loaded cores)
    .venv/bin/python benchmarks/eigh.py --quick    # small sizes, to check it runs

For features Phi [NC, k] (float32) every method of tangentlab.linalg.projected_eigh, plus a
partial eigensolver (top r = k/8 pairs by randomized SVD) with and without a tail mode, is
compared with the float64 Gram path (the reference, method "float64"):

- time: CPU seconds of the whole call (Gram, eigensolver, U) with ONE torch thread. On a
  machine shared with other jobs wall-clock times of multi-threaded LAPACK varied 20x
  between repeats; single-thread CPU time is stable to ~10%. Ratios are within one run.
  ``--wall`` adds a 2-thread wall-clock comparison (min of repeats) of float64,
  float64-scipy and float32.
- eigenvalue error: max_j |lam^_j - lam_j| / lam_max (sorted, missing modes = 0), and the
  median relative error over the modes with lam_j > 1e-6 lam_max;
- orthogonality: max |u_i^T u_j| (i != j) over the 64 modes of smallest lam (the worst);
- forecast error: the full-batch MSE curve (DESIGN.md §3, discrete GD)
  L_t = (1/2N) [ sum_j (1 - eta lam_j / N)^(2t) (u_j^T r0)^2 + |r0 - U U^T r0|^2 ],
  eta at half the stability limit (eta lam_max / N = 1), t = 0..1000:
  max_t |L^_t - L_t| / L_0, and the steps to an 80% drop (L_t <= 0.2 L_0), T^ - T.

Spectra: synthetic Phi = G diag(j^(-alpha/2)) H (G Gaussian [NC, k] / sqrt(NC), H a random
rotation), r0 = G (j^(-1/2) xi) + an isotropic part (C = 10, N = NC / 10); and a real
projected NTK: digits-cnn, 400 samples, k = 2048 (NC = 4000).
Results: benchmarks/results/eigh.json and benchmarks/results/eigh.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
STEPS = 1000
METHODS = (
    "float64", "float64-scipy", "float32", "float32-nocheck", "svd32", "svd64", "partial",
    "partial+tail",
)  # fmt: skip


def synthetic(nc: int, k: int, alpha: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(nc, k, generator=g, dtype=torch.float64) / nc**0.5
    h, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    j = torch.arange(1, k + 1, dtype=torch.float64)
    phi = ((gauss * j ** (-alpha / 2)) @ h.T).float()
    r0 = gauss @ (j**-0.5 * torch.randn(k, generator=g, dtype=torch.float64))
    iso = torch.randn(nc, generator=g, dtype=torch.float64)
    r0 = r0 / r0.norm() + 0.3 * iso / iso.norm()
    return phi, r0.numpy(), nc // 10


def real_digits(n: int, k: int):
    import tangentlab as tl
    from tangentlab.examples import load_example

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example("digits-cnn", num_samples=n)
        kern = tl.compute_kernel(
            ex.model, ex.data, params=ex.default_params, projection=k, progress=False
        )
    f0 = kern.f0.double()
    y = torch.nn.functional.one_hot(kern.targets, f0.shape[1]).double()
    return kern.features.float(), (f0 - y).reshape(-1).numpy(), kern.num_samples


def run_method(name: str, phi: torch.Tensor, r: int):
    from tangentlab.linalg import projected_eigh

    if name.startswith("partial"):
        u, s, _ = torch.svd_lowrank(phi, q=r + 16, niter=2)
        lam = s[:r].double().flip(0) ** 2
        return lam, u[:, :r].double().flip(1)
    tol = float("inf") if name == "float32-nocheck" else 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lam, u = projected_eigh(phi, method=name.removesuffix("-nocheck"), tol=tol)
    fell_back = any("float32 round-off check failed" in str(w.message) for w in caught)
    return lam, u, fell_back


def loss_curve(lam, u, r0, n, eta, tail=None, steps=STEPS):
    """L_t at t = 0..steps (or at given int array ``steps``); tail = (lam, energy) mode."""
    z = u.T @ r0
    perp = float(((r0 - u @ z) ** 2).sum())
    mu, energy = eta * lam / n, z**2
    if tail is not None:
        mu = np.append(mu, eta * tail[0] / n)
        energy = np.append(energy, tail[1])
        perp -= tail[1]
    t = np.arange(steps + 1) if np.isscalar(steps) else np.asarray(steps)
    out = np.empty(t.shape)
    for i in range(0, len(t), 256):
        decay = np.power(1.0 - mu[:, None], 2.0 * t[None, i : i + 256])
        out[i : i + 256] = (energy @ decay + perp) / (2 * n)
    return out


def steps_to_drop(curve_at, l0, drop=0.8, cap=10**7):
    """min t with L_t <= (1 - drop) L_0 (L_t is non-increasing at eta mu <= 1); None if > cap."""
    goal = (1 - drop) * l0
    if curve_at(cap) > goal:
        return None
    lo, hi = 0, 1
    while curve_at(hi) > goal:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if curve_at(mid) <= goal else (mid, hi)
    return hi


def t80_of(lam, u, r0, n, eta, tail, l0):
    return steps_to_drop(lambda t: loss_curve(lam, u, r0, n, eta, tail=tail, steps=[t])[0], l0)


def case(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", 1))
    if spec["kind"] == "synthetic":
        phi, r0, n = synthetic(spec["nc"], spec["k"], spec["alpha"])
    else:
        phi, r0, n = real_digits(spec["n"], spec["k"])
    nc, k = phi.shape
    r = max(1, k // 8)
    for name in spec["methods"]:  # warm-up: library loading and first-call costs
        if name != "partial+tail":
            run_method(name, phi[:256, :64].contiguous(), 8)
    rows = []
    ref = None
    for name in spec["methods"]:
        if name == "partial+tail":
            continue  # shares the partial solve
        cpu, wall = float("inf"), float("inf")
        for _ in range(3 if nc * k * k < 1.1e10 else 1):  # small cases: min of 3
            c0, w0 = time.process_time(), time.perf_counter()
            out = run_method(name, phi, r)
            cpu = min(cpu, time.process_time() - c0)
            wall = min(wall, time.perf_counter() - w0)
        lam, u = out[0].numpy(), out[1].numpy()
        row = dict(method=name, cpu_s=cpu, wall_s=wall, modes=int(lam.size))
        row["fallback"] = bool(out[2]) if len(out) > 2 else False
        if ref is None:  # float64 first: the reference
            ref = dict(lam=lam, u=u, cpu=cpu)
            eta = n / lam[-1]  # eta lam_max / N = 1: half the stability limit
            ref["curve"] = loss_curve(lam, u, r0, n, eta)
            ref["l0"] = ref["curve"][0]
            ref["t80"] = t80_of(lam, u, r0, n, eta, None, ref["l0"])
            ref["z2"] = float(((u.T @ r0) ** 2).sum())
        variants = [(name, None)]
        if name == "partial":
            # oracle tail: the in-span energy left out (from the reference) as one mode at
            # the mean of the left-out eigenvalues (trace of G minus the top r)
            trace = float((phi.double() ** 2).sum())
            tail_lam = (trace - float(lam.sum())) / max(1, ref["lam"].size - r)
            tail_energy = ref["z2"] - float(((u.T @ r0) ** 2).sum())
            variants.append(("partial+tail", (tail_lam, tail_energy)))
        for vname, tail in variants:
            vr = dict(row, method=vname)
            curve = loss_curve(lam, u, r0, n, eta, tail=tail)
            vr["time_ratio"] = cpu / ref["cpu"]
            vr["forecast_err"] = float(np.abs(curve - ref["curve"]).max() / ref["l0"])
            vr["forecast_err_mean"] = float(np.abs(curve - ref["curve"]).mean() / ref["l0"])
            t80 = t80_of(lam, u, r0, n, eta, tail, ref["l0"])
            vr["t80"], vr["t80_ref"] = t80, ref["t80"]
            m = max(lam.size, ref["lam"].size)
            a = np.zeros(m)
            b = np.zeros(m)
            a[m - lam.size :], b[m - ref["lam"].size :] = lam, ref["lam"]
            vr["eig_err_abs"] = float(np.abs(a - b).max() / b[-1])
            big = b > 1e-6 * b[-1]
            vr["eig_err_rel_median"] = float(np.median(np.abs(a - b)[big] / b[big]))
            low = u[:, : min(64, lam.size)]
            ov = low.T @ u
            ov[np.arange(low.shape[1]), np.arange(low.shape[1])] = 0.0
            vr["ortho_err"] = float(np.abs(ov).max())
            rows.append(vr)
    return dict(
        spec=spec, nc=nc, k=k, n=n, partial_r=r, lam_spread=float(ref["lam"][-1] / ref["lam"][0]),
        l0=float(ref["l0"]), rows=rows,
    )  # fmt: skip


def wall_pair(spec: dict, repeats: int) -> dict:
    """2-thread wall-clock times of float64 and float32, interleaved, min of repeats."""
    from tangentlab.linalg import projected_eigh

    torch.set_num_threads(2)
    phi, _, _ = synthetic(spec["nc"], spec["k"], spec["alpha"])
    times = {"float64": [], "float64-scipy": [], "float32": []}
    for _ in range(repeats):
        for name in times:
            t0 = time.perf_counter()
            projected_eigh(phi, method=name)
            times[name].append(time.perf_counter() - t0)
    ratio = {m: min(t) / min(times["float64"]) for m, t in times.items()}
    return dict(spec=spec, threads=2, times=times, ratio_min=ratio)


def subprocess_job(job: dict) -> dict:
    threads = str(2 if job.get("wall") else 1)  # torch (OpenMP/MKL) and scipy's OpenBLAS
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               OPENBLAS_NUM_THREADS=threads)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(job)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x, spec=".1e"):
    return "n/a" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    head = (
        "| case | NC | k | spread | method | time / float64 | eig err (abs/λmax) | "
        "eig err (median rel) | ortho | forecast err max | forecast err mean | T80 (ref) |"
    )
    lines = [head, "|" + "---|" * 12]
    for res in results:
        s = res["spec"]
        label = f"power α={s['alpha']}" if s["kind"] == "synthetic" else "digits-cnn (real)"
        for r in res["rows"]:
            fb = " (fell back)" if r["fallback"] else ""
            lines.append(
                f"| {label} | {res['nc']} | {res['k']} | {res['lam_spread']:.0e} | "
                f"{r['method']}{fb} | {r['time_ratio']:.2f} | {fmt(r['eig_err_abs'])} | "
                f"{fmt(r['eig_err_rel_median'])} | {fmt(r['ortho_err'])} | "
                f"{fmt(r['forecast_err'])} | {fmt(r['forecast_err_mean'])} | "
                f"{r['t80']} ({r['t80_ref']}) |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--no-real", action="store_true", help="skip the real digits-cnn kernel")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at the same time")
    ap.add_argument("--wall", type=int, default=2, help="repeats of the 2-thread wall pair")
    ap.add_argument("--out", default=str(OUT / "eigh"), help="output stem (.json, .md)")
    args = ap.parse_args()
    if args.job:
        job = json.loads(args.job)
        res = wall_pair(job, job["repeats"]) if job.get("wall") else case(job)
        print(json.dumps(res))
        return
    if args.quick:
        sizes, alphas, real = [(2000, 256), (2000, 512)], [1.0, 2.0], (100, 256)
        big = dict(nc=2000, k=512, alpha=1.0)
    else:
        sizes = [(5000, 1024), (5000, 2048), (10000, 2048), (10000, 4096)]
        alphas, real = [1.0, 2.0], (400, 2048)
        big = dict(nc=10000, k=4096, alpha=1.0)

    def methods(k):  # svd64 at k = 4096 costs minutes and is never faster than float64
        return [m for m in METHODS if not (m == "svd64" and k >= 4096)]

    jobs = [dict(kind="synthetic", nc=nc, k=k, alpha=a, methods=methods(k))
            for a in alphas for nc, k in sizes]  # fmt: skip
    if not args.no_real:
        jobs.insert(0, dict(kind="real", n=real[0], k=real[1], methods=list(METHODS)))
    t0 = time.perf_counter()

    def one(job):
        res = subprocess_job(job)
        print(f"[{time.perf_counter() - t0:6.0f}s] {job}\n{table([res])}", flush=True)
        return res

    # CPU time is the measure, so two jobs may share the machine (--jobs 1 to serialize)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    wall = None
    if args.wall:
        wall = subprocess_job(dict(big, wall=True, repeats=args.wall))
        print("wall (2 threads):", wall, flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), "unknown")  # fmt: skip
    meta = dict(
        command="benchmarks/eigh.py" + (" --quick" if args.quick else ""),
        machine=f"{model}, {torch.get_num_threads()} cores (shared with other jobs)",
        torch=torch.__version__, steps=STEPS, date=time.strftime("%Y-%m-%d %H:%M"),
    )  # fmt: skip
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, cases=results, wall=wall),
                                                    indent=1))  # fmt: skip
    md = [
        "## eigh: eigendecomposition of a projected kernel (issue 9)",
        "",
        f"Command: `.venv/bin/python {meta['command']}` ({meta['date']}).  ",
        f"Machine: {meta['machine']}, torch {meta['torch']}.  ",
        "Time: CPU seconds with one torch thread (stable under load), ratio to float64 in the "
        "same process. Forecast error: max_t |ΔL_t| / L_0 over t ≤ 1000 GD steps at η λ_max/N "
        "= 1 (half the stability limit); T80: steps to an 80% drop (reference in brackets).",
        "",
        table(results),
        "",
    ]
    if wall:
        t = wall["times"]
        parts = [f"{m} {', '.join(f'{x:.1f}' for x in v)} s (ratio of minima "
                 f"{wall['ratio_min'][m]:.2f})" for m, v in t.items()]  # fmt: skip
        md.append(
            f"2-thread wall clock, power α={wall['spec']['alpha']}, NC={wall['spec']['nc']}, "
            f"k={wall['spec']['k']}: " + "; ".join(parts) + "."
        )
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

"""Kernel benchmark: throughput, peak memory, projection error, cost in fine-tuning epochs.

    .venv/bin/python benchmarks/kernel.py            # full run (~15-25 min on 2 cores)
    .venv/bin/python benchmarks/kernel.py --quick    # small sizes, to check it runs
    .venv/bin/python benchmarks/kernel.py --part naive  # only: naive loop vs library, 50 samples

Every figure is measured in this run, each configuration in its own process (its peak
resident memory is its own). Ratios compare measurements of the same run:
- speed-up = tangentlab samples/s / naive per-sample autograd loop samples/s (the loop
  does one forward + backward per (sample, output), as one would write it by hand);
- cost in epochs = kernel seconds / seconds of one real fine-tuning epoch over the same
  samples (torch SGD, batch 32, same trainable weights, BN frozen);
- naive vs library (``--part naive``, also part of the full run): in one process, on the
  same 50 samples, the naive loop (one forward + ``torch.autograd.grad`` per sample and
  output, Θ = J Jᵀ) and then ``tl.compute_kernel`` (exact, and tensor sketch k = 4096),
  each timed whole; the ratio is naive seconds / library seconds, and the exact kernel is
  checked against the naive Θ. ``--part naive`` stores it in kernel.json next to the other
  rows (which keep the date of their own run) and re-renders the section.
Results: benchmarks/results/kernel.json and the "kernel" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gib, machine, peak_rss, rss, run_job, write_section  # noqa: E402

CASES = {
    "lite0": dict(example="fashion-lite0", options={"image_size": 64}),
    "minilm": dict(example="rt-minilm", options={"seq_len": 64}),
}


def _load(case: str, n: int, seed: int = 0):
    from tangentlab.examples import load_example

    spec = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_example(spec["example"], num_samples=n, seed=seed, **spec["options"])


def _rows(x, i):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def _logits(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def job_kernel(case: str, n: int, projection, kind: str) -> dict:
    import tangentlab as tl

    ex = _load(case, n)
    before = rss()
    proj = None if projection is None else tl.Projection(projection, kind=kind)
    t0 = time.perf_counter()
    t = tl.Tangent(ex.model, params=ex.default_params, projection=proj)
    k = tl.compute_kernel(t, ex.data, progress=False)
    sec = time.perf_counter() - t0
    return {
        "seconds": sec,
        "samples_per_s": n / sec,
        "peak_rss": peak_rss(),
        "rss_before": before,
        "jacobian_mode": str(t.jacobian_mode),
        "num_params": t.num_params,
        "num_classes": k.num_classes,
    }


def _naive_theta(ex, n: int) -> torch.Tensor:
    """Per-sample Jacobians by one forward + backward per (sample, output); Theta = J J^T."""
    import tangentlab as tl

    model = ex.model.eval()
    names = tl.Tangent(model, params=ex.default_params).param_names
    named = dict(model.named_parameters())
    params = [named[nm] for nm in names]
    x, _ = ex.data
    rows = []
    for i in range(n):
        xi = _rows(x, i)
        for a in range(ex.num_classes):
            out = _logits(model, xi)[0, a]
            g = torch.autograd.grad(out, params)
            rows.append(torch.cat([gi.reshape(-1) for gi in g]))
    jac = torch.stack(rows)
    return jac @ jac.T


def job_naive(case: str, n: int) -> dict:
    """The naive loop alone (:func:`_naive_theta`), timed."""
    ex = _load(case, n)
    t0 = time.perf_counter()
    theta = _naive_theta(ex, n)
    sec = time.perf_counter() - t0
    assert torch.isfinite(theta).all()
    return {"seconds": sec, "samples_per_s": n / sec, "peak_rss": peak_rss()}


def job_epoch(case: str, n: int, batch: int = 32) -> dict:
    """One real fine-tuning epoch (torch SGD, MSE as DESIGN.md §2, BN frozen)."""
    import tangentlab as tl

    ex = _load(case, n)
    model = ex.model.eval()
    names = set(tl.Tangent(model, params=ex.default_params).param_names)
    for nm, p in model.named_parameters():
        p.requires_grad_(nm in names)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = ex.data
    onehot = torch.nn.functional.one_hot(y, ex.num_classes).float()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        idx = perm[s : s + batch]
        xb = {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]
        loss = 0.5 * ((_logits(model, xb) - onehot[idx]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sec = time.perf_counter() - t0
    return {"seconds": sec, "samples_per_s": n / sec}


def job_error(case: str, m: int, configs: list) -> dict:
    """Projection error against the exact kernel on the same m samples, and its cost."""
    import tangentlab as tl

    ex = _load(case, m)
    t0 = time.perf_counter()
    exact = tl.compute_kernel(ex.model, ex.data, params=ex.default_params, progress=False)
    exact_sec = time.perf_counter() - t0
    lam, _ = exact.eigh()
    lr = exact.num_samples / float(lam.max())  # stability 1: half the limit
    steps = 300
    ref = tl.forecast(exact, tl.SGD(lr), steps)
    target = 0.2 * float(ref.loss[0])
    t_ref = ref.steps_to(target)
    out = {"exact_seconds": exact_sec, "t_ref": t_ref, "rows": []}
    for kind, k in configs:
        t0 = time.perf_counter()
        pk = tl.compute_kernel(ex.model, ex.data, params=ex.default_params,
                               projection=tl.Projection(k, kind=kind), progress=False)  # fmt: skip
        sec = time.perf_counter() - t0
        th, te = pk.theta.double(), exact.theta.double()
        fc = tl.forecast(pk, tl.SGD(lr), steps)
        t_hat = fc.steps_to(target)
        out["rows"].append({
            "kind": kind, "k": k, "seconds": sec,
            "rel_frobenius": float((th - te).norm() / te.norm()),
            "rel_lambda_max": float(abs(pk.eigh()[0].max() - lam.max()) / lam.max()),
            "steps_to_80pct_drop": t_hat,
            "steps_error": None if t_hat is None or not t_ref else abs(t_hat - t_ref) / t_ref,
            "curve_error": float(abs(fc.loss - ref.loss).mean() / ref.loss[0]),
        })  # fmt: skip
    return out


def job_naive_vs_kernel(case: str, n: int, k: int = 4096) -> dict:
    """Naive loop and library kernels on the same n samples, timed in one process."""
    import tangentlab as tl

    ex = _load(case, n)
    model = ex.model.eval()
    t0 = time.perf_counter()
    theta = _naive_theta(ex, n)
    naive_sec = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = tl.compute_kernel(model, ex.data, params=ex.default_params, progress=False)
    exact_sec = time.perf_counter() - t0
    te = exact.theta.to(theta.dtype)
    rel = float((te - theta).norm() / theta.norm())
    del exact, te
    t0 = time.perf_counter()
    tl.compute_kernel(model, ex.data, params=ex.default_params,
                      projection=tl.Projection(k, kind="tensor"), progress=False)  # fmt: skip
    proj_sec = time.perf_counter() - t0
    return {
        "n": n, "k": k, "num_classes": ex.num_classes, "naive_seconds": naive_sec,
        "exact_seconds": exact_sec, "tensor_seconds": proj_sec,
        "exact_vs_naive_rel_frobenius": rel, "threads": torch.get_num_threads(),
    }  # fmt: skip


JOBS = {
    "kernel": job_kernel,
    "naive": job_naive,
    "epoch": job_epoch,
    "error": job_error,
    "naive_vs_kernel": job_naive_vs_kernel,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument(
        "--part",
        choices=["all", "naive", "render"],
        default="all",
        help="naive: only the naive-loop-vs-library timing (50 samples); "
        "render: rebuild the RESULTS section from kernel.json",
    )
    args = ap.parse_args()
    if args.job:
        job = json.loads(args.job)
        kind = job.pop("job")
        print(json.dumps(JOBS[kind](**job)))
        return
    script = Path(__file__).resolve()
    naive_n = 8 if args.quick else 50
    if args.part in ("naive", "render"):
        out = script.parent / "results" / ("kernel-quick.json" if args.quick else "kernel.json")
        results = json.loads(out.read_text())
        for case in CASES if args.part == "naive" else ():
            print(f"[{case}] naive loop vs library on {naive_n} samples", flush=True)
            r = run_job(script, {"job": "naive_vs_kernel", "case": case, "n": naive_n},
                        timeout=3600)  # fmt: skip
            r.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
            print(json.dumps(r), flush=True)
            results["cases"][case]["naive_vs_kernel"] = r
        out.write_text(json.dumps(results, indent=1))
        text = render(results)
        print(text)
        if not args.no_write and not args.quick:
            write_section("kernel", text)
        return

    q = args.quick
    sizes = {
        "lite0": dict(n=40 if q else 1000, exact_n=16 if q else 100, naive_n=4 if q else 12,
                      err_m=16 if q else 100),
        "minilm": dict(n=16 if q else 100, exact_n=8 if q else 40, naive_n=2 if q else 6,
                       err_m=8 if q else 40),
    }  # fmt: skip
    results: dict = {"machine": machine(), "quick": q, "cases": {}}
    for case, sz in sizes.items():
        res: dict = {"sizes": sz, "kernels": []}
        print(f"[{case}] projection error on {sz['err_m']} samples", flush=True)
        res["error"] = run_job(
            script,
            {
                "job": "error",
                "case": case,
                "m": sz["err_m"],
                "configs": [
                    ["tensor", 1024],
                    ["tensor", 4096],
                    ["sparse", 1024],
                    ["sparse", 4096],
                    ["gaussian", 1024],
                    ["rademacher", 1024],
                ],
            },
        )
        print(json.dumps(res["error"]), flush=True)
        print(f"[{case}] fine-tuning epoch on {sz['n']} samples", flush=True)
        res["epoch"] = run_job(script, {"job": "epoch", "case": case, "n": sz["n"]})
        print(f"[{case}] naive loop on {sz['naive_n']} samples", flush=True)
        res["naive"] = run_job(script, {"job": "naive", "case": case, "n": sz["naive_n"]})
        print(f"[{case}] naive loop vs library on {naive_n} samples", flush=True)
        res["naive_vs_kernel"] = run_job(
            script, {"job": "naive_vs_kernel", "case": case, "n": naive_n}, timeout=3600
        )
        res["naive_vs_kernel"].update(machine=machine(), date=time.strftime("%Y-%m-%d"))
        configs = [
            (sz["exact_n"], None, "exact"),
            (sz["n"], 1024, "tensor"),
            (sz["n"], 4096, "tensor"),
            (sz["n"], 1024, "sparse"),
            (sz["n"], 4096, "sparse"),
            (sz["exact_n"], 1024, "gaussian"),
            (sz["exact_n"], 1024, "rademacher"),
        ]
        for n, k, kind in configs:
            print(f"[{case}] kernel n={n} {kind} k={k}", flush=True)
            r = run_job(script, {"job": "kernel", "case": case, "n": n, "projection": k,
                                 "kind": kind})  # fmt: skip
            r.update(n=n, k=k, kind=kind)
            res["kernels"].append(r)
        results["cases"][case] = res
    out = script.parent / "results" / ("kernel-quick.json" if q else "kernel.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = render(results)
    print(text)
    if not args.no_write and not q:
        write_section("kernel", text)


def render(r: dict) -> str:
    lines = [
        "## Kernel throughput, memory and projection error (`benchmarks/kernel.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/kernel.py` — machine: {r['machine']}.",
        "Each row ran in its own process; peak = peak resident memory of that process "
        "(model and data included), Δ = peak − resident memory before the kernel.",
        "",
    ]
    if any("naive_vs_kernel" in res for res in r["cases"].values()):
        lines += [
            "The **naive loop vs library** lines are a later, separate measurement "
            "(`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernel.py --part naive`; date and "
            "thread count on the line; both sides timed one after the other in one process, "
            "on the same samples); the tables are from the earlier full run and keep its "
            "own ratios.",
            "",
        ]
    names = {"lite0": "EfficientNet-Lite0, 64 px, Fashion-MNIST",
             "minilm": "MiniLM-L6, length 64, Rotten Tomatoes"}  # fmt: skip
    for case, res in r["cases"].items():
        ep = res["epoch"]
        nv = res["naive"]
        k0 = res["kernels"][0]
        lines += [
            f"### {names[case]} — P = {k0['num_params']:,} trainable weights "
            f"(the example's default: last block + head), C = {k0['num_classes']}",
            "",
            f"- one real fine-tuning epoch on {res['sizes']['n']} samples: {ep['seconds']:.1f} s "
            f"({ep['samples_per_s']:.1f} samples/s)",
            f"- naive per-sample autograd loop (exact Jacobians, {res['sizes']['naive_n']} "
            f"samples): {nv['samples_per_s']:.2f} samples/s (the `× naive loop` column below)",
        ]
        vs = res.get("naive_vs_kernel")
        if vs:
            lines += [
                f"- **naive loop vs library, measured on the same {vs['n']} samples in one "
                f"process** ({vs['date']}, {vs['machine']}, run with {vs['threads']} torch "
                f"thread(s)): naive loop (one "
                f"`torch.autograd.grad` per sample and output, {vs['n'] * vs['num_classes']} "
                f"backward passes) {vs['naive_seconds']:.1f} s; `tl.compute_kernel` exact "
                f"{vs['exact_seconds']:.1f} s (**{vs['naive_seconds'] / vs['exact_seconds']:.1f}× "
                f"faster**, ‖Θ − Θ_naive‖/‖Θ_naive‖ = {vs['exact_vs_naive_rel_frobenius']:.1e}); "
                f"tensor sketch k = {vs['k']} {vs['tensor_seconds']:.1f} s "
                f"(**{vs['naive_seconds'] / vs['tensor_seconds']:.1f}×**)",
            ]
        lines += [
            "",
            "| kernel | N | samples/s | × naive loop | time | epochs of fine-tuning | peak | Δ |"
            " Jacobian mode |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        per_sample_epoch = ep["seconds"] / res["sizes"]["n"]
        for row in res["kernels"]:
            what = "exact" if row["k"] is None else f"{row['kind']} k={row['k']}"
            epochs = row["seconds"] / (per_sample_epoch * row["n"])
            lines.append(
                f"| {what} | {row['n']} | {row['samples_per_s']:.2f} | "
                f"{row['samples_per_s'] / nv['samples_per_s']:.1f}× | {row['seconds']:.1f} s | "
                f"{epochs:.1f} | {gib(row['peak_rss'])} | "
                f"{gib(row['peak_rss'] - row['rss_before'])} | {row['jacobian_mode']} |"
            )
        er = res["error"]
        lines += [
            "",
            f"Projection error against the exact kernel on the same {res['sizes']['err_m']} "
            f"samples (exact: {er['exact_seconds']:.1f} s; MSE full-batch forecast at half the "
            f"stability limit, steps to an 80% loss drop: exact {er['t_ref']}):",
            "",
            "| projection | time | ‖Θ̂−Θ‖_F/‖Θ‖_F | λ_max error | steps to 80% drop | "
            "steps error | curve error |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in er["rows"]:
            se = "–" if e["steps_error"] is None else f"{e['steps_error']:.1%}"
            lines.append(
                f"| {e['kind']} k={e['k']} | {e['seconds']:.1f} s | {e['rel_frobenius']:.3f} | "
                f"{e['rel_lambda_max']:.3f} | {e['steps_to_80pct_drop']} | {se} | "
                f"{e['curve_error']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

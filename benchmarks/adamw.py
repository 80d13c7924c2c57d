"""AdamW forecasts against real AdamW fine-tuning (issue 10, part 2).

    .venv/bin/python benchmarks/adamw.py                  # both cases, resumable
    .venv/bin/python benchmarks/adamw.py --case rt-minilm
    .venv/bin/python benchmarks/adamw.py --report         # RESULTS.md section only

Cases: the built-in examples ``rt-minilm`` (MiniLM-L6, last encoder layer + pooler + head,
64 tokens) and ``fashion-lite0`` (EfficientNet-Lite0 at 32 px, last block + head, batch norm
frozen), N = 64 samples each, the frozen trunk run once (``_split.py``). The usual recipe:
``tl.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)``, cross-entropy, B = 16 or
32. Grid (12 cells a case): lr (MiniLM 1e-5, 3e-5, 1e-4; Lite0 1e-4, 3e-4, 1e-3) x B {16, 32}
x schedule {constant, 10% linear warmup then linear decay to 0 over the horizon}; horizon
T = 150 steps (MiniLM) / 100 (Lite0).

Forecasts (each exact in its own model; one path, the real run's batch order: ``seed`` 0
on both sides, so SGD noise is matched, not averaged):

- ``exact``: AdamW on the tangent model in weight space (``tl.compute_weight_space_tangent``:
  the explicit J, N·C·P·8 bytes);
- ``per-tensor``: per-tensor second moments in function space (``tl.compute_block_kernel``,
  tensors above 4096 weights projected to k = 4096);
- ``factored``: a frozen Adafactor-style (row x column) preconditioner estimated from the
  first epoch of gradients at w0 (the real run's first batches, per B), forecast as SGD on
  the exact preconditioned kernel J P Jᵀ (``tl.compute_factored_kernel``,
  ``tl.adam_as_sgd``; one kernel per batch size);
- ``signgd``: the early-time limit, the asymmetric SignGD kernel J sign(J)ᵀ of Malladi et
  al. 2023 (``tl.compute_sign_kernel`` from the explicit J, ``tl.forecast_signgd``);
- ``signgd-w``: exact SignGD of the tangent model in weight space (``tl.forecast_signgd`` of
  the explicit J): what the kernel form approximates, to separate the error of the SignGD
  limit from that of its kernel form.

Cached cells (``results/adamw/<case>.json``, with the real run's losses) are completed with
the methods they lack, without rerunning the real runs.

Scoring as in ``forecast_accuracy.py``: targets at 50% and 80% drops of the real initial
loss, T = first step of the real run below it, T̂ = the same for the forecast over the same
horizon; |T̂ − T|/T, a miss (the real run reaches the target, the forecast does not within
the horizon) counts as +∞; targets the real run does not reach are counted apart.
Results: ``benchmarks/results/adamw/<case>.json`` and the "adamw" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import write_section  # noqa: E402
from _split import cached_inputs  # noqa: E402
from forecast_accuracy import _open_state, _save, _targets  # noqa: E402
from headbody import _fmt  # noqa: E402
from tangentlab.examples import load_example  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "adamw"
COMMAND = ".venv/bin/python benchmarks/adamw.py"
DROPS = (0.5, 0.8)
CASES = {
    "rt-minilm": dict(options={"seq_len": 64}, lrs=(1e-5, 3e-5, 1e-4), steps=150),
    "fashion-lite0": dict(options={"image_size": 32}, lrs=(1e-4, 3e-4, 1e-3), steps=100),
}
NUM_SAMPLES = 64
BATCHES = (16, 32)
SCHEDULES = ("constant", "warmup-linear")
WST_BUDGET = "8GB"  # J of fashion-lite0: 4.9 GiB in float64
METHODS = ("exact", "per-tensor", "factored", "signgd", "signgd-w")


def _cells(cfg: dict) -> list[dict]:
    return [dict(lr=lr, batch_size=b, schedule=s) for lr in cfg["lrs"] for b in BATCHES
            for s in SCHEDULES]  # fmt: skip


def _key(c: dict) -> str:
    return f"lr{c['lr']:g}-B{c['batch_size']}-{c['schedule']}"


def _optimizer(c: dict, steps: int) -> tl.AdamW:
    if c["schedule"] == "constant":
        return tl.AdamW(c["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = tl.make_schedule("warmup-linear", steps, warmup_fraction=0.1)
    return tl.AdamW(c["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule=sched)


def targets(c: dict, which: str) -> dict:
    """Per drop: T, T̂ (every step logged, the same horizon), err, status (misses = +∞)."""
    return _targets(dict(c, run_steps=list(range(len(c["run_loss"])))), DROPS, which)


def _kernels(name: str, state: dict, need: set[str]) -> dict:
    """The forecast sources the missing methods need (timings into ``state["kernels"]``)."""
    cfg = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example(name, num_samples=NUM_SAMPLES, **cfg["options"])
    x, y = ex.data
    top, xt, trunk_s = cached_inputs(name, ex.model, x)
    data, params = (xt, y), ex.default_params
    kk = state.setdefault("kernels", {})
    kk.update(trunk_seconds=trunk_s, num_params=tl.Tangent(top, params=params).num_params)
    src: dict = dict(top=top, data=data, params=params)
    if "factored" in need:
        opt = _optimizer(dict(lr=cfg["lrs"][0], schedule="constant"), cfg["steps"])
        for b in BATCHES:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src[f"factored-B{b}"] = tl.compute_factored_kernel(
                    top, data, opt, loss="ce", params=params, batch_size=b, seed=0,
                    progress=False,
                )  # fmt: skip
            kk[f"factored_B{b}_seconds"] = time.perf_counter() - t0
    if need & {"exact", "signgd", "signgd-w"}:
        t0 = time.perf_counter()
        src["exact"] = tl.compute_weight_space_tangent(
            top, data, params=params, memory_budget=WST_BUDGET, progress=False
        )
        kk["exact_seconds"] = time.perf_counter() - t0
    if "signgd" in need:
        t0 = time.perf_counter()
        src["signgd"] = tl.compute_sign_kernel(src["exact"])
        kk["signgd_seconds"] = kk["exact_seconds"] + time.perf_counter() - t0
    if "per-tensor" in need:
        t0 = time.perf_counter()
        src["per-tensor"] = tl.compute_block_kernel(top, data, params=params, projection=4096,
                                                    progress=False)  # fmt: skip
        kk["per_tensor_seconds"] = time.perf_counter() - t0
    print(f"[{name}] {kk}", flush=True)
    return src


def _forecast(which: str, src: dict, opt: tl.AdamW, c: dict, steps: int):
    b = c["batch_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "factored":
            return tl.forecast(src[f"factored-B{b}"], tl.adam_as_sgd(opt), steps, loss="ce",
                               batch_size=b, paths=1, seed=0)  # fmt: skip
        if which in ("signgd", "signgd-w"):
            source = src["signgd" if which == "signgd" else "exact"]
            return tl.forecast_signgd(source, opt, steps, loss="ce", batch_size=b, paths=1,
                                      seed=0)  # fmt: skip
        return tl.forecast(src[which], opt, steps, loss="ce", batch_size=b, paths=1, seed=0)


def run_case(name: str) -> dict:
    cfg = CASES[name]
    path = OUT / f"{name}.json"
    state = _open_state(path)
    cells = state.setdefault("cells", {})
    steps = cfg["steps"]
    need = {m for c in _cells(cfg) for m in METHODS
            if f"{m}_loss" not in cells.get(_key(c), {})}  # fmt: skip
    if not need:
        return state
    src = _kernels(name, state, need)
    for c in _cells(cfg):
        key = _key(c)
        out = cells.get(key)
        missing = [m for m in METHODS if out is None or f"{m}_loss" not in out]
        if not missing:
            continue
        opt = _optimizer(c, steps)
        if out is None:
            t0 = time.perf_counter()
            run = tl.finetune(src["top"], src["data"], opt, steps, loss="ce",
                              batch_size=c["batch_size"], params=src["params"], log_every=1,
                              seed=0, progress=False)  # fmt: skip
            real_s = time.perf_counter() - t0 + state["kernels"]["trunk_seconds"]
            losses = [None if not np.isfinite(v) else float(v) for v in run.loss]
            out = dict(**c, steps=steps, real_seconds=real_s, run_loss=losses)
        for which in missing:
            t0 = time.perf_counter()
            fc = _forecast(which, src, opt, c, steps)
            out[f"{which}_seconds"] = time.perf_counter() - t0
            out[f"{which}_loss"] = [None if not np.isfinite(v) else float(v) for v in fc.loss]
            if abs(out[f"{which}_loss"][0] - out["run_loss"][0]) > 1e-3 * out["run_loss"][0]:
                raise SystemExit(f"{name}/{key}: initial losses differ ({which})")
        cells[key] = out
        ts = {m: targets(out, f"{m}_loss") for m in METHODS}
        print(f"[{name}] {key}: " + " ".join(
            f"T{d}={ts['exact'][d]['T']} " + " ".join(f"{m}={ts[m][d]['T_hat']}" for m in METHODS)
            for d in ts["exact"]
        ) + " | " + " ".join(f"{m} {out[f'{m}_seconds']:.2f}s" for m in missing),
              flush=True)  # fmt: skip
        _save(path, state)
    return state


LABELS = {
    "exact": "exact AdamW on the tangent model",
    "per-tensor": "per-tensor AdamW",
    "factored": "frozen factored P (SGD on J P Jᵀ)",
    "signgd": "A-SignGD kernel",
    "signgd-w": "SignGD in weight space",
}


def _errs(cells: list[dict], which: str, drop: str | None = None) -> list[float]:
    return [t["err"] for c in cells if f"{which}_loss" in c
            for d, t in targets(c, f"{which}_loss").items()
            if drop in (None, d) and t["status"] != "unreached"]  # fmt: skip


def _median(cells: list[dict], key: str) -> str:
    vals = [c[key] for c in cells if key in c]
    return f"{np.median(vals):.2f}" if vals else "–"


def _kernel_cost(kk: dict, which: str) -> str:
    if which == "factored":
        parts = [kk.get(f"factored_B{b}_seconds") for b in BATCHES]
        return " / ".join("–" if v is None else f"{v:.1f}" for v in parts)
    key = {"per-tensor": "per_tensor_seconds", "signgd-w": "exact_seconds"}
    v = kk.get(key.get(which, f"{which}_seconds"))
    return "–" if v is None else f"{v:.1f}"


def _gap(c: dict, which: str) -> float | None:
    """max_t |L_which(t) − L_exact(t)| / L_0 over the horizon (NaN-free steps), or None."""
    if f"{which}_loss" not in c or "exact_loss" not in c:
        return None
    a, b = (np.array([np.nan if v is None else v for v in c[f"{m}_loss"]], dtype=float)
            for m in (which, "exact"))  # fmt: skip
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok])) / b[0]) if ok.all() else float("inf")


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = [
        "## AdamW (`benchmarks/adamw.py`, issue 10)",
        "",
        f"Command: `{COMMAND}` (then `--report`). Grid, solvers and scoring: the script's "
        "docstring (12 cells a case: 3 learning rates x B 16/32 x constant / 10% warmup then "
        "linear decay; CE, AdamW betas (0.9, 0.999), weight decay 0.01; one path, the real "
        "run's batch order). Entries: median / p90 of |T̂ − T|/T (targets scored, misses).",
        "",
        "| case | trained weights | drop | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for k, s in states.items():
        kk, cs = s["kernels"], list(s["cells"].values())
        for d in (None, "0.5", "0.8"):
            label = "both" if d is None else f"{float(d):.0%}"
            lines.append(f"| {k} | {kk['num_params']:,} | {label} | "
                         + " | ".join(_fmt(_errs(cs, m, d)) for m in METHODS) + " |")  # fmt: skip
    lines += [
        "",
        "Costs (seconds): the forecast sources once per case (exact: the explicit J, "
        "N·C·P·8 bytes in float64; per-tensor: the per-tensor kernels; factored: estimate P "
        "+ the exact kernel J P Jᵀ, one per B = 16 / 32; signgd: J + J sign(J)ᵀ), and per "
        "cell the median of the real run (trunk once + training) and of each forecast "
        "(sources not included):",
        "",
        "| case | real run | " + " | ".join(f"{m} source | forecast" for m in METHODS) + " |",
        "|---|---|" + "---|---|" * len(METHODS),
    ]
    for k, s in states.items():
        kk, cs = s["kernels"], list(s["cells"].values())
        cols = [f"{_kernel_cost(kk, m)} | {_median(cs, f'{m}_seconds')}" for m in METHODS]
        lines.append(f"| {k} | {_median(cs, 'real_seconds')} | " + " | ".join(cols) + " |")
    approx = [m for m in METHODS if m != "exact"]
    lines += [
        "",
        "Against the exact tangent AdamW (what each approximation stands for; the real runs "
        "also leave the tangent regime): max_t |L̂(t) − L̂_exact(t)| / L_0 per cell, median / "
        "max over the 12 cells:",
        "",
        "| case | " + " | ".join(approx) + " |",
        "|---|" + "---|" * len(approx),
    ]
    for k, s in states.items():
        cs = list(s["cells"].values())
        cols = []
        for m in approx:
            g = [v for v in (_gap(c, m) for c in cs) if v is not None]
            cols.append(f"{np.median(g):.1%} / {np.max(g):.1%}" if g else "–")
        lines.append(f"| {k} | " + " | ".join(cols) + " |")
    lines += [
        "",
        "Per cell (T = real steps to the drop; T̂ of " + " / ".join(METHODS) + "):",
        "",
        "| case | cell | T₅₀ | T̂₅₀ | T₈₀ | T̂₈₀ |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        for ck, c in s["cells"].items():
            ts = {m: targets(c, f"{m}_loss") for m in METHODS if f"{m}_loss" in c}
            first = next(iter(ts.values()))
            row = [f"{first[d]['T'] or '–'} | "
                   + " / ".join(f"{ts[m][d]['T_hat'] or '–'}" for m in ts)
                   for d in ("0.5", "0.8")]  # fmt: skip
            lines.append(f"| {k} | {ck} | " + " | ".join(row) + " |")
    lines += ["", f"Machine: {next(iter(states.values()))['machine'] if states else '–'}."]
    write_section("adamw", "\n".join(lines))
    print("\n".join(lines[:16]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES))
    ap.add_argument("--report", action="store_true", help="only rebuild the RESULTS section")
    a = ap.parse_args()
    if not a.report:
        for name in a.case or list(CASES):
            run_case(name)
    report()


if __name__ == "__main__":
    main()

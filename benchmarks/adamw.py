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

Forecasts (both exact-in-their-model solvers of ``tangentlab.adam``; one path, the real
run's batch order: ``seed`` 0 on both sides, so SGD noise is matched, not averaged):

- ``exact``: AdamW on the tangent model in weight space (``tl.compute_weight_space_tangent``:
  the explicit J, N·C·P·8 bytes);
- ``per-tensor``: per-tensor second moments in function space (``tl.compute_block_kernel``,
  tensors above 4096 weights projected to k = 4096).

Scoring as in ``forecast_accuracy.py``: targets at 50% and 80% drops of the real initial
loss, T = first step of the real run below it, T̂ = the same for the forecast over the same
horizon; |T̂ − T|/T, a miss (the real run reaches the target, the forecast does not within
the horizon) counts as +∞; targets the real run does not reach are counted apart.
Results: ``benchmarks/results/adamw/<case>.json`` and the "adamw" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from _split import cached_inputs  # noqa: E402
from forecast_accuracy import _commit, _save, _targets  # noqa: E402
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
METHODS = ("exact", "per-tensor")


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


def run_case(name: str) -> dict:
    cfg = CASES[name]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("code", _commit())
    state.setdefault("machine", machine())
    state.setdefault("date", datetime.date.today().isoformat())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example(name, num_samples=NUM_SAMPLES, **cfg["options"])
    x, y = ex.data
    top, xt, trunk_s = cached_inputs(name, ex.model, x)
    data = (xt, y)
    t0 = time.perf_counter()
    wst = tl.compute_weight_space_tangent(top, data, params=ex.default_params, progress=False)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blocks = tl.compute_block_kernel(top, data, params=ex.default_params, projection=4096,
                                     progress=False)  # fmt: skip
    block_s = time.perf_counter() - t0
    state["kernels"] = dict(
        trunk_seconds=trunk_s,
        exact_seconds=exact_s,
        per_tensor_seconds=block_s,
        num_params=tl.Tangent(top, params=ex.default_params).num_params,
    )
    print(f"[{name}] {state['kernels']}", flush=True)
    cells = state.setdefault("cells", {})
    steps = cfg["steps"]
    for c in _cells(cfg):
        key = _key(c)
        if key in cells:
            continue
        opt = _optimizer(c, steps)
        t0 = time.perf_counter()
        run = tl.finetune(
            top,
            data,
            opt,
            steps,
            loss="ce",
            batch_size=c["batch_size"],
            params=ex.default_params,
            log_every=1,
            seed=0,
            progress=False,
        )
        real_s = time.perf_counter() - t0
        out = dict(
            **c,
            steps=steps,
            real_seconds=real_s + trunk_s,
            run_loss=[None if not np.isfinite(v) else float(v) for v in run.loss],
        )
        for which, src in (("exact", wst), ("per-tensor", blocks)):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fc = tl.forecast(src, opt, steps, loss="ce", batch_size=c["batch_size"],
                                 paths=1, seed=0)  # fmt: skip
            out[f"{which}_seconds"] = time.perf_counter() - t0
            out[f"{which}_loss"] = [None if not np.isfinite(v) else float(v) for v in fc.loss]
        if abs(out["exact_loss"][0] - out["run_loss"][0]) > 1e-3 * out["run_loss"][0]:
            raise SystemExit(f"{name}/{key}: initial losses differ")
        cells[key] = out
        te, tp = targets(out, "exact_loss"), targets(out, "per-tensor_loss")
        print(f"[{name}] {key}: real {real_s:.1f}s " + " ".join(
            f"T{d}={te[d]['T']} exact={te[d]['T_hat']} per-tensor={tp[d]['T_hat']}" for d in te
        ) + f" fc {out['exact_seconds']:.1f}s / {out['per-tensor_seconds']:.1f}s",
              flush=True)  # fmt: skip
        _save(path, state)
    return state


def _errs(cells: list[dict], which: str, drop: str | None = None) -> list[float]:
    return [t["err"] for c in cells for d, t in targets(c, f"{which}_loss").items()
            if drop in (None, d) and t["status"] != "unreached"]  # fmt: skip


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
        "| case | trained weights | exact J s (N·C·P·8 bytes in float64) | per-tensor kernels s "
        "| drop | exact AdamW on the tangent model | per-tensor AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        kk, cs = s["kernels"], list(s["cells"].values())
        for d in (None, "0.5", "0.8"):
            label = "both" if d is None else f"{float(d):.0%}"
            lines.append(
                f"| {k} | {kk['num_params']:,} | {kk['exact_seconds']:.1f} | "
                f"{kk['per_tensor_seconds']:.1f} | {label} | {_fmt(_errs(cs, 'exact', d))} | "
                f"{_fmt(_errs(cs, 'per-tensor', d))} |"
            )
    lines += [
        "",
        "Costs per cell (median seconds): real run (trunk once + training), "
        "forecast (exact / per-tensor, kernels not included):",
        "",
        "| case | real | exact forecast | per-tensor forecast |",
        "|---|---|---|---|",
    ]
    for k, s in states.items():
        cs = list(s["cells"].values())
        lines.append(f"| {k} | {np.median([c['real_seconds'] for c in cs]):.1f} | "
                     f"{np.median([c['exact_seconds'] for c in cs]):.1f} | "
                     f"{np.median([c['per-tensor_seconds'] for c in cs]):.2f} |")  # fmt: skip
    lines += [
        "",
        "Per cell (T = real steps to the drop; exact / per-tensor T̂):",
        "",
        "| case | cell | T₅₀ | T̂₅₀ | T₈₀ | T̂₈₀ |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        for ck, c in s["cells"].items():
            te, tp = targets(c, "exact_loss"), targets(c, "per-tensor_loss")
            row = [f"{te[d]['T'] or '–'} | {te[d]['T_hat'] or '–'} / {tp[d]['T_hat'] or '–'}"
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

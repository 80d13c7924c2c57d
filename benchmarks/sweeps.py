"""Held-out curves and sweeps against real grids (issue 10, parts 3 and 4).

    .venv/bin/python benchmarks/sweeps.py                    # all three examples, resumable
    .venv/bin/python benchmarks/sweeps.py --case rt-minilm
    .venv/bin/python benchmarks/sweeps.py --report           # RESULTS.md section only

Cases: the three built-in examples, ``digits-cnn``, ``fashion-lite0`` (32 px, last block +
head, batch norm frozen) and ``rt-minilm`` (64 tokens, last encoder layer + pooler + head):
N = 128 training samples and M = 250 held-out samples from the example's test split (the
same pre-trained model and fresh head), T = 150 steps, held-out set logged every 5 steps;
MiniLM (a full-batch step of its top costs ~1.8 s here) N = 64, M = 200, T = 100, every 10
steps. The frozen trunk is run once (``_split.py``).

Grid (24 cells a case, what ``tl.sweep`` ranks from one kernel): SGD with momentum m in {0,
0.9} x peak rate a in {0.1, 0.25, 0.5} of the cross-entropy stability limit of that
momentum (``tl.stable_lr(kernel, momentum=m, fraction=a, loss="ce")``; a = 0.5 is the edge of
the validity region) x schedule {constant, 10% warmup then cosine decay to 0} x batch size
{16, full}; cross-entropy.

One kernel and one cross kernel Θ(X_eval, X) per case; ``tl.sweep(kernel, grid, T,
batch_sizes=[16, None], eval_data=cross, paths=8)`` forecasts all 24 cells with their held-out
curves. Every cell is also fine-tuned for real (``tl.finetune(..., eval_data=(X_eval,
y_eval), log_every=..., seed=0)``).

Part 3 (held-out curves): per cell, ``tl.compare(forecast, run).eval``: held-out accuracy
error in points at the last step and at each side's best step (minimum held-out loss, on the
logged steps), and what stopping the real run at the forecast's best step costs (real
accuracy there minus the real run's accuracy at its own best step).

Part 4 (sweeps): Spearman rank correlation between forecast and real over the 24 cells, for
the held-out accuracy at the last step (the sweep's default ranking with a held-out set),
the best held-out accuracy along the run, and the steps to an 80% drop of the training loss
(never reached = ranked last on both sides; diverged cells rank last, accuracy counted as 0);
the steps also from the head-exact, body-linear model (``tl.compute_head_body_kernel``,
default subspace and probes; it has no held-out curves).
And whether the configuration the sweep ranks first (valid rows first) is within 1 point of
the real best. Goal: Spearman >= 0.8 on each example; the chosen configuration within 1 point.

Results: ``benchmarks/results/sweeps/<case>.json`` and the "sweeps" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import write_section  # noqa: E402
from _split import cached_inputs  # noqa: E402
from forecast_accuracy import _open_state, _save  # noqa: E402
from tangentlab.examples import load_example  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sweeps"
COMMAND = ".venv/bin/python benchmarks/sweeps.py"
# options of the example; N, M, T and the held-out logging interval
CASES = {
    "digits-cnn": dict(options={}, n=128, m=250, steps=150, log_every=5),
    "fashion-lite0": dict(options={"image_size": 32}, n=128, m=250, steps=150, log_every=5),
    "rt-minilm": dict(options={"seq_len": 64}, n=64, m=200, steps=100, log_every=10),
}
PATHS = 8
MOMENTA = (0.0, 0.9)
FRACTIONS = (0.1, 0.25, 0.5)
SCHEDULES = ("constant", "warmup-cosine")
BATCHES = (16, None)
DROP = 0.8


def _schedule(kind: str, steps: int) -> tl.Schedule:
    return tl.make_schedule(kind, steps, warmup_fraction=0.1 if "warmup" in kind else None)


def _key(m: float, a: float, sched: str, b: int | None) -> str:
    return f"m{m:g}-a{a:g}-{sched}-B{'full' if b is None else b}"


def _inputs(name: str):
    """Model top, training and held-out inputs after the frozen trunk, trunk seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = CASES[name]
        ex = load_example(name, num_samples=cfg["n"], **cfg["options"])
        ev = load_example(name, num_samples=cfg["m"], split="test", **cfg["options"])
    (x, y), (xe, ye) = ex.data, ev.data
    top, xt, s1 = cached_inputs(name, ex.model, x)
    _, xet, s2 = cached_inputs(name, ex.model, xe)
    return ex, top, (xt, y), (xet, ye), s1 + s2


def _curve(v) -> list[float | None]:
    return [None if not np.isfinite(t) else float(t) for t in np.asarray(v, dtype=float)]


def run_case(name: str) -> dict:
    path = OUT / f"{name}.json"
    state = _open_state(path)
    ex, top, data, held, trunk_s = _inputs(name)
    steps, log_every = CASES[name]["steps"], CASES[name]["log_every"]
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(top, data, params=ex.default_params, progress=False)
    kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cross = tl.compute_cross_kernel(top, held, kernel, train_data=data, params=ex.default_params)
    cross_s = time.perf_counter() - t0
    grid = {}
    for m in MOMENTA:
        for a in FRACTIONS:
            lr = tl.stable_lr(kernel, momentum=m, fraction=a, loss="ce")
            for sched in SCHEDULES:
                grid[(m, a, sched)] = tl.SGD(lr, momentum=m, schedule=_schedule(sched, steps))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sw = tl.sweep(kernel, list(grid.values()), steps, loss="ce", batch_sizes=list(BATCHES),
                      eval_data=cross, paths=PATHS, seed=0)  # fmt: skip
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the head-exact, body-linear model, with its held-out curves
    hb = tl.compute_head_body_kernel(top, data, params=ex.default_params, progress=False)
    hb_kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hb_cross = tl.compute_head_body_cross_kernel(top, held, hb, train_data=data,
                                                 params=ex.default_params)  # fmt: skip
    hb_cross_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sw_hb = tl.sweep(hb, list(grid.values()), steps, loss="ce", batch_sizes=list(BATCHES),
                         eval_data=hb_cross, paths=PATHS, seed=0)  # fmt: skip
    hb_sweep_s = time.perf_counter() - t0
    params = tl.Tangent(top, params=ex.default_params).num_params
    state["costs"] = dict(trunk_seconds=trunk_s, kernel_seconds=kernel_s,
                          cross_kernel_seconds=cross_s, sweep_seconds=sweep_s,
                          head_body_kernel_seconds=hb_kernel_s,
                          head_body_cross_kernel_seconds=hb_cross_s,
                          head_body_sweep_seconds=hb_sweep_s, num_params=params)  # fmt: skip
    print(f"[{name}] {state['costs']}", flush=True)
    by_key = _by_key(sw, grid)
    hb_by_key = _by_key(sw_hb, grid)
    cells = state.setdefault("cells", {})
    for key, (m, a, sched, b, row, fc) in by_key.items():
        out = cells.get(key)
        if out is None:
            opt = grid[(m, a, sched)]
            t0 = time.perf_counter()
            run = tl.finetune(top, data, opt, steps, loss="ce", batch_size=b,
                              params=ex.default_params, log_every=log_every, seed=0,
                              eval_data=held, progress=False)  # fmt: skip
            out = dict(momentum=m, fraction=a, schedule=sched, batch_size=b, lr=opt.lr,
                       real_seconds=time.perf_counter() - t0, run_steps=[int(s) for s in run.steps],
                       run_loss=_curve(run.loss), run_eval_loss=_curve(run.eval_loss),
                       run_eval_accuracy=_curve(run.eval_accuracy),
                       comparison=tl.compare(fc, run).to_dict())  # fmt: skip
            cells[key] = out
            _save(path, state)
        if b is not None and "run_seed1_eval_accuracy" not in out:  # the noise ceiling
            run = tl.finetune(top, data, grid[(m, a, sched)], steps, loss="ce", batch_size=b,
                              params=ex.default_params, log_every=log_every, seed=1,
                              eval_data=held, progress=False)  # fmt: skip
            out.update(run_seed1_loss=_curve(run.loss),
                       run_seed1_eval_accuracy=_curve(run.eval_accuracy))  # fmt: skip
            _save(path, state)
        out.update(rank=int(row["rank"]), valid=bool(row["valid"]),
                   forecast_loss=_curve(fc.loss), forecast_eval_loss=_curve(fc.eval_loss),
                   forecast_eval_accuracy=_curve(fc.eval_accuracy),
                   head_body_loss=_curve(hb_by_key[key][5].loss),
                   head_body_eval_loss=_curve(hb_by_key[key][5].eval_loss),
                   head_body_eval_accuracy=_curve(hb_by_key[key][5].eval_accuracy),
                   head_body_rank=int(hb_by_key[key][4]["rank"]),
                   head_body_valid=bool(hb_by_key[key][4]["valid"]))  # fmt: skip
        ev = out["comparison"]["eval"] or {}
        print(f"[{name}] {key}: rank {out['rank']} real {out['real_seconds']:.1f}s final acc "
              f"real {ev.get('final_accuracy_run')} fc {ev.get('final_accuracy_forecast')}; "
              f"best step real {ev.get('best_step_run')} fc {ev.get('best_step_forecast')}",
              flush=True)  # fmt: skip
    _save(path, state)
    return state


def _by_key(sw, grid: dict) -> dict:
    """The sweep's rows and forecasts by cell key."""
    out = {}
    for (_, row), fc in zip(sw.table.iterrows(), sw.forecasts):
        hp = fc.hyperparameters
        m, a, sched = next(k for k, o in grid.items() if o.lr == hp["lr"] and o.momentum ==
                           hp["momentum"] and o.schedule.describe() == hp["schedule"])  # fmt: skip
        b = None if pd.isna(row["batch_size"]) else int(row["batch_size"])
        out[_key(m, a, sched, b)] = (m, a, sched, b, row, fc)
    return out


# ---------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------


def _acc(v: float | None) -> float:
    return 0.0 if v is None or not math.isfinite(v) else float(v)


def _steps_to(loss: list, steps: list, target: float) -> float:
    for s, v in zip(steps, loss):
        if v is not None and v <= target:
            return float(s)
    return math.inf


MODELS = {"forecast": "tangent model", "head_body": "head exact, body linear"}


def scores(state: dict, model: str = "forecast") -> dict:
    """Part 3 errors per cell and part 4 rank statistics of one case, for one model
    (``"forecast"``: the tangent model; ``"head_body"``), from the logged curves."""
    cells = list(state["cells"].values())
    if not all(f"{model}_eval_accuracy" in c for c in cells):
        return {}
    rank_key, valid_key = ("rank", "valid") if model == "forecast" else (
        f"{model}_rank", f"{model}_valid")  # fmt: skip
    fc_final, run_final, fc_best, run_best, fc_t, run_t = [], [], [], [], [], []
    run1_final, run1_best = [], []  # a second real grid: minibatch cells rerun with seed 1
    final_pts, best_pts, best_err, regret = [], [], [], []
    for c in cells:
        steps = c["run_steps"]
        fe = [c[f"{model}_eval_accuracy"][s] for s in steps]
        fl = [c[f"{model}_eval_loss"][s] for s in steps]
        ra, rl = c["run_eval_accuracy"], c["run_eval_loss"]
        valid = c[valid_key]
        fc_final.append(_acc(fe[-1]) if valid else 0.0)
        run_final.append(_acc(ra[-1]))
        fc_best.append(max(_acc(v) for v in fe) if valid else 0.0)
        run_best.append(max(_acc(v) for v in ra))
        again = c.get("run_seed1_eval_accuracy", ra)  # full batch: the same run
        run1_final.append(_acc(again[-1]))
        run1_best.append(max(_acc(v) for v in again))
        target = (1 - DROP) * c["run_loss"][0]
        fc_t.append(_steps_to([c[f"{model}_loss"][s] for s in steps], steps, target))
        run_t.append(_steps_to(c["run_loss"], steps, target))
        if fe[-1] is not None and ra[-1] is not None:
            final_pts.append(100 * abs(fe[-1] - ra[-1]))
        finite_f = [i for i, v in enumerate(fl) if v is not None]
        finite_r = [i for i, v in enumerate(rl) if v is not None]
        if finite_f and finite_r:
            bf = min(finite_f, key=lambda i: fl[i])
            br = min(finite_r, key=lambda i: rl[i])
            best_pts.append(100 * abs(_acc(fe[bf]) - _acc(ra[br])))
            best_err.append(abs(steps[bf] - steps[br]) / max(steps[br], 1))
            regret.append(100 * (_acc(ra[br]) - _acc(ra[bf])))
    big = 10**9  # never reached: ranked last (ties among themselves)

    def rho(a, b):
        a = [big if math.isinf(v) else v for v in a]
        b = [big if math.isinf(v) else v for v in b]
        if len(set(a)) < 2 or len(set(b)) < 2:
            return None  # a constant ranking: undefined
        return float(spearmanr(a, b).statistic)

    keys = list(state["cells"])
    chosen = min(range(len(cells)), key=lambda i: cells[i][rank_key])
    best_real = max(run_final)
    return dict(
        cells=len(cells), final_points=final_pts, best_points=best_pts,
        best_step_error=best_err, regret_points=regret,
        rho_final=rho(fc_final, run_final), rho_best=rho(fc_best, run_best),
        rho_steps=rho(fc_t, run_t),
        reached=(sum(math.isfinite(v) for v in fc_t), sum(math.isfinite(v) for v in run_t)),
        rho_real_final=rho(run1_final, run_final), rho_real_best=rho(run1_best, run_best),
        chosen=keys[chosen], chosen_real=run_final[chosen], best_real=best_real,
        best_real_cell=keys[int(np.argmax(run_final))],
        gap_points=100 * (best_real - run_final[chosen]),
    )  # fmt: skip


def _q(v: list[float]) -> str:
    if not v:
        return "–"
    return f"{np.median(v):.1f} / {np.percentile(v, 90):.1f}"


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: s for k, s in states.items() if len(s.get("cells", {})) == 24}
    lines = [
        "## Held-out curves and sweeps against real grids (`benchmarks/sweeps.py`, issue 10)",
        "",
        f"Command: `{COMMAND}` (then `--report`). Grid, sizes and scoring: the script's "
        "docstring (24 cells a case: SGD m 0/0.9 x peak rate 0.1/0.25/0.5 of the CE "
        "stability limit x constant / warmup-cosine x B 16/full; CE; N, M, T per case in "
        "the docstring). Per case one kernel and one cross kernel per model, and one "
        "`tl.sweep(..., eval_data=...)` each, against 24 real runs: the tangent model "
        "(`tl.compute_cross_kernel`) and the head-exact, body-linear model "
        "(`tl.compute_head_body_cross_kernel`).",
        "",
        "**Part 3, held-out curves** (median / p90 over the 24 cells; accuracy in points; "
        "best step = minimum held-out loss on the logged steps):",
        "",
        "| case | model | final accuracy error | accuracy-at-best error | best-step error "
        "(relative) | cost of stopping the real run at the forecast best step |",
        "|---|---|---|---|---|---|",
    ]
    sc = {(k, m): scores(s, m) for k, s in states.items() for m in MODELS}
    sc = {km: r for km, r in sc.items() if r}
    for (k, m), r in sc.items():
        lines.append(f"| {k} | {MODELS[m]} | {_q(r['final_points'])} | {_q(r['best_points'])} "
                     f"| {_q(r['best_step_error'])} | {_q(r['regret_points'])} |")  # fmt: skip
    lines += [
        "",
        "**Part 4, sweeps** (Spearman ρ between forecast and real over the 24 cells; the "
        "sweep's first-ranked configuration (held-out accuracy at the last step, valid rows "
        "first) against the real best). The real-vs-real column is the ceiling set by SGD "
        "noise: the same grid trained again with another batch order (seed 1; full-batch "
        "cells are deterministic), ranked against the first:",
        "",
        "| case | model | ρ final held-out accuracy | ρ best held-out accuracy | ρ steps to 80% "
        "train drop (cells reaching it: forecast / real; – = undefined) | real vs real "
        "(seed 1): ρ final / best | sweep's choice (real accuracy) | real best | gap (points) "
        "| goals (ρ ≥ 0.8, gap ≤ 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (k, m), r in sc.items():
        ok = r["rho_final"] is not None and r["rho_final"] >= 0.8 and r["gap_points"] <= 1.0
        lines.append(
            f"| {k} | {MODELS[m]} | {_r(r['rho_final'])} | {_r(r['rho_best'])} | "
            f"{_r(r['rho_steps'])} ({r['reached'][0]} / {r['reached'][1]}) | "
            f"{_r(r['rho_real_final'])} / {_r(r['rho_real_best'])} | "
            f"{r['chosen']} ({r['chosen_real']:.1%}) | {r['best_real_cell']} "
            f"({r['best_real']:.1%}) | {r['gap_points']:.1f} | {'met' if ok else 'NOT met'} |"
        )
    lines += [
        "",
        "Cost (seconds; real = the 24 training runs with their held-out evaluations):",
        "",
        "| case | trunk once | tangent: kernel + cross kernel + sweep | head-exact: kernel + "
        "cross + sweep | real grid | real / tangent | real / head-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        c = s["costs"]
        real = sum(v["real_seconds"] for v in s["cells"].values())
        tan = (c["kernel_seconds"], c["cross_kernel_seconds"], c["sweep_seconds"])
        hb = (c.get("head_body_kernel_seconds", math.nan),
              c.get("head_body_cross_kernel_seconds", math.nan),
              c.get("head_body_sweep_seconds", math.nan))  # fmt: skip
        lines.append(f"| {k} | {c['trunk_seconds']:.1f} | {' + '.join(f'{v:.1f}' for v in tan)} "
                     f"| {' + '.join(f'{v:.1f}' for v in hb)} | {real:.0f} | "
                     f"{real / sum(tan):.1f}x | {real / sum(hb):.1f}x |")  # fmt: skip
    first = next(iter(states.values()), {})
    lines += ["", f"Machine: {first.get('machine', '?')}; code {first.get('code', '?')}, "
              f"{first.get('date', '?')}."]  # fmt: skip
    write_section("sweeps", "\n".join(lines))
    print("\n".join(lines))


def _r(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--report", action="store_true", help="only rewrite the RESULTS.md section")
    args = ap.parse_args()
    if not args.report:
        for name in args.case or list(CASES):
            run_case(name)
    report()


if __name__ == "__main__":
    main()

"""A steps interval of its own for the full-span head-exact forecast of convolutional bodies
(issue 13, round 8): chosen on the fourteen image development tasks, reported once on two
fresh ones.

    .venv/bin/python benchmarks/fullspan.py --collect     # the development pass (resumable)
    .venv/bin/python benchmarks/fullspan.py --calibrate   # the choice, frozen
    .venv/bin/python benchmarks/fullspan.py --fetch       # where the fresh data is
    .venv/bin/python benchmarks/fullspan.py --task NAME   # one fresh task's real runs
    .venv/bin/python benchmarks/fullspan.py --library     # the library on the fresh cells
                                                          # (--task NAME: one task)
    .venv/bin/python benchmarks/fullspan.py --report      # RESULTS.md section only
    .venv/bin/python benchmarks/fullspan.py --speed       # Q's coordinates against d, timed

(needs ``make bench-deps``.)

**Why.** On the EfficientNet-Lite bodies most of the library's raw error is its subspace:
with Q spanning all of φ0 (``directions`` >= N) the head-exact forecast scored 25% / 99%
against 86% / miss for the default Q = W0's rows + C principal directions (RESULTS.md
"subspace", 8 development tasks, full batch), and 11% / 44% after a per-cell correction.
But the library's steps interval was calibrated on the default Q, whose forecasts lag the
real runs ~2x: applied to a full-span forecast it corrects a lag that is no longer there.

**Development pass** (``--collect``): every full-batch cell of the fourteen image
development tasks' stored grids ({mse, ce} x m {0, 0.9} x a {0.1, 0.3, 1}), forecast
through the library twice — the full span (``directions=N``, ``projection=1024``, k of
RESULTS "subspace") and the default (``projection=4096``, as the rounds), over 3x the real
run's steps to its deepest reached drop (the default lags: it misses targets there that it
reaches later; the fresh round gives it 10x, as the earlier rounds; its development rows
are also scored on the targets it reaches). Per target reached by the real run:
T, T̂, the library's interval (for the full span: the default's calibration, what a user
got before this round) and the ten columns of ``steps_features`` of the full-span forecast.

**The choice** (``--calibrate``; leave one task out over the fourteen; the rule was fixed
after a first look at seven of the tasks had shown the default's calibration doing about
as well on the full span as a refit, so that it is a candidate too): the default's
calibration as it stands, or quantile regressions of log(T / T̂) (median; band at level q
and 1 − q) over three column sets — per drop (the three hats), + [m > 0] and log a, all
nine (the tenth, conv body, is constant here) — each at the narrowest band level in 4-10%
whose left-out band covers at least 80% of the targets; then the lowest left-out p90 of
the median estimate (ties within a point: lower median, then fewer columns: no refit
first). Targets whose forecast blows up first keep the library's stabilized estimate in
every row. A refit is adopted (``tangentlab.forecast.STEPS_CALIBRATION_FULL``) only if its
left-out median and p90 both beat the default subspace's library estimate on the same
targets, and on those the default reaches within its horizon; frozen in
``results/fullspan/calibration.json`` and committed before any fresh result was read
(the fresh tasks' real runs ran alongside the development pass: they do not depend on
the choice).

**Fresh tasks** (data no round used, chosen before any of it was looked at; N = 128 at
32 px as the image development tasks; the full-batch cells of ``holdout.py``'s grid, real
runs to a 90% drop or 1,500 steps):

- ``mpl-lite0``: 64-px crops of matplotlib's three sample photographs and drawings
  (grace_hopper.jpg, Minduka_Present_Blue_Pack.png, logo2.png), which one a crop comes
  from, EfficientNet-Lite0;
- ``stereo-lite1``: 64-px crops of OpenCV's stereo chessboard pairs 11-14 (left11-14,
  right11-14: eight photographs, each pair two views of one pose), which one a crop comes
  from, EfficientNet-Lite1.

``--library`` then forecasts every fresh cell as the development pass did and scores the
library's estimate (full span with the frozen calibration; the default subspace with its
own) once. Results: ``benchmarks/results/fullspan/`` and the "fullspan" section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deephead as dh  # noqa: E402
import holdout as ho  # noqa: E402
import holdout_features as hf  # noqa: E402
import holdout_limit as hl  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.headbody import compute_head_body_kernel  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "fullspan")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/fullspan.py"
FULL_K = 1024  # the full span's projection (RESULTS.md "subspace": k = 1024 beat 512)
# forecasts run this many times the real run's steps to its deepest reached drop: 3x in the
# development pass (as RESULTS.md "subspace"); in the fresh round the default 10x (as the
# earlier rounds: it lags, and misses at 3x targets it reaches later)
HORIZON = {"full": 3, "default": 3}
FRESH_HORIZON = {"full": 3, "default": 10}
COLSETS = {"per drop": (0, 1, 2), "drop, m, log a": (0, 1, 2, 3, 4),
           "all nine": (0, 1, 2, 3, 4, 5, 6, 7, 8)}  # fmt: skip
LEVELS = (0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04)
MPL_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
STEREO_FILES = tuple(f"{side}{i}.jpg" for i in (11, 12, 13, 14) for side in ("left", "right"))


# ---------------------------------------------------------------------------------------
# Forecasting a cell (the development pass and the fresh round alike).
# ---------------------------------------------------------------------------------------


def kernels(task: dict, cfg: dict) -> dict:
    """{"full": full-span kernel, "default": the rounds' default} and their seconds."""
    out = {}
    n = int(task["y"].shape[0])
    for which, kw in (("full", dict(directions=n, projection=FULL_K)),
                      ("default", dict(projection=cfg["projection"]))):  # fmt: skip
        t0 = time.perf_counter()
        hb = compute_head_body_kernel(task["top"], (task["x"], task["y"]),
                                      params=task["params"], progress=False, **kw)  # fmt: skip
        hb.problem()
        out[which] = (hb, time.perf_counter() - t0)
    return out


def _x(fc, eps: float) -> list[float]:
    """The ten columns of ``steps_features`` that ``Forecast.steps_interval(eps)`` uses."""
    point = fc.steps_to(eps)
    t_hat = point if point is not None else fc.loss.shape[0]
    x, _ = fc._interval_features(eps, 1.0 - eps / float(fc.loss[0]), t_hat)
    return [float(v) for v in x]


def cell_rows(task: str, key: str, c: dict, hbs: dict, curve: str = "hb_loss",
              horizons: dict = HORIZON) -> list[dict]:  # fmt: skip
    """Per target the real run reaches: T and, for each kernel, T̂, the library's interval
    (and for the full span the features x); ``curve``: the stored forecast's key (only its
    length and the run's logging grid are used)."""
    tg = {d: t for d, t in ho.targets(c, curve).items() if t["status"] != "unreached"}
    if not tg:
        return []
    deepest = max(t["T"] for t in tg.values())
    rows = [dict(task=task, cell=key, loss=c["loss"], drop=float(d), m=c["momentum"],
                 a=c["lr_factor"], T=t["T"]) for d, t in tg.items()]  # fmt: skip
    for which, (hb, _) in hbs.items():
        horizon = horizons[which] * deepest
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), horizon,
                             loss=c["loss"])  # fmt: skip
        secs = time.perf_counter() - t0
        for r in rows:
            eps = (1.0 - r["drop"]) * c["run_loss"][0]
            iv = fc.steps_interval(eps)
            r[which] = dict(point=iv.point, median=iv.median, low=iv.low, high=iv.high,
                            stabilized=iv.stabilized, diverges=bool(fc.diverges),
                            seconds=secs)  # fmt: skip
            if which == "full":
                r["x"] = _x(fc, eps)
    return rows


def collect(names: list[str] | None = None) -> None:
    """The development pass, one file per task in ``OUT / "dev"`` (resumable)."""
    dev = dh.dev_tasks()
    (OUT / "dev").mkdir(parents=True, exist_ok=True)
    for name in names or dh.image_tasks():
        path = OUT / "dev" / f"{name}.json"
        if path.exists():
            continue
        cells = dev[name][0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = ho.load_task(name)
        hbs = kernels(task, ho.TASKS[name])
        rows = []
        for key, c in cells.items():
            if c.get("batch_size") is None and "lr" in c:
                rows += cell_rows(name, key, c, hbs, dev[name][1])
                print(name, key, [(r["T"], r["full"]["point"], r["default"]["point"])
                                  for r in rows if r["cell"] == key], flush=True)  # fmt: skip
        path.write_text(json.dumps(dict(task=name, machine=machine(), rows=rows,
                                        kernel_seconds={k: v[1] for k, v in hbs.items()})))


# ---------------------------------------------------------------------------------------
# The choice.
# ---------------------------------------------------------------------------------------


def _y(r: dict) -> float:
    return math.log(r["T"] / r["full"]["point"])


def _fit(rows: list[dict], cols: tuple, level: float, width: int = 10) -> dict:
    """Quantile regressions (median, ``level``, 1 − ``level``) of log(T / T̂) on the columns
    ``cols`` of the rows' ``x`` (``width`` columns: 10, or 11 with a pilot's)."""
    ok = [r for r in rows if r["full"]["point"] is not None]
    x = np.array([r["x"] for r in ok])[:, cols]
    y = np.array([_y(r) for r in ok])
    out = {}
    for k, q in (("mid", 0.5), ("lo", level), ("hi", 1.0 - level)):
        w = np.zeros(width)
        w[list(cols)] = hf.quantile_fit(x, y, q)
        out[k] = w
    return out


def estimate(r: dict, w: dict | None) -> tuple[float | None, float | None, float | None]:
    """(low, median, high) of a row under coefficients ``w`` (``None``: the library's
    stored full-span interval); a forecast that blew up first keeps the library's
    stabilized interval, one that did not reach the target within its horizon is a miss."""
    lib = r["full"]
    if w is None or lib["point"] is None:
        return lib["low"], lib["median"], lib["high"]
    x = np.array(r["x"])
    lo, mid, hi = (float(x @ w[k]) for k in ("lo", "mid", "hi"))
    lo, hi = min(lo, mid), max(hi, mid)
    t = lib["point"]
    return t * math.exp(lo), t * math.exp(mid), t * math.exp(hi)


def _err(r: dict, est: float | None) -> float:
    return math.inf if est is None else abs(est - r["T"]) / r["T"]


def _inside(r: dict, lo, hi) -> bool:
    return lo is not None and lo - 1e-9 <= r["T"] and (hi is None or r["T"] <= hi + 1e-9)


def loto(rows: list[dict], cols: tuple, level: float, width: int = 10) -> list[dict]:
    out = []
    for r in rows:
        w = _fit([o for o in rows if o["task"] != r["task"]], cols, level, width)
        lo, mid, hi = estimate(r, w)
        out.append(dict(err=_err(r, mid), inside=_inside(r, lo, hi),
                        width=math.log(hi / lo) if lo and hi else math.inf))  # fmt: skip
    return out


def _fmt(errs: list[float]) -> str:
    from headbody import _fmt as fmt

    return fmt(errs)


def _q(errs: list[float], p: float) -> float:
    from headbody import _quantile

    return _quantile(errs, p)


def dev_rows() -> list[dict]:
    return [r for p in sorted((OUT / "dev").glob("*.json"))
            for r in json.loads(p.read_text())["rows"]]  # fmt: skip


def _references(rows: list[dict], chosen: list[float]) -> dict:
    """The estimates the choice (its left-out errors ``chosen``) is compared with, on the
    same targets, and on those the default reaches within its horizon."""
    reach = [i for i, r in enumerate(rows) if r["default"]["point"] is not None]
    return dict(
        reached=len(reach),
        default_reached=_fmt([_err(rows[i], rows[i]["default"]["median"]) for i in reach]),
        chosen_reached=_fmt([chosen[i] for i in reach]),
        default_library=_fmt([_err(r, r["default"]["median"]) for r in rows]),
        full_raw=_fmt([_err(r, r["full"]["point"]) for r in rows]),
        default_covered=sum(_inside(r, r["default"]["low"], r["default"]["high"])
                            for r in rows) / len(rows),
    )  # fmt: skip


def calibrate() -> dict:
    rows = dev_rows()
    cands = []
    # the default's calibration as it stands (no refit): the library before this round
    lib = [estimate(r, None) for r in rows]
    errs = [_err(r, m) for r, (_, m, _) in zip(rows, lib)]
    cands.append(dict(name="the default's calibration (no refit)", cols=[], level=None,
                      cover=sum(_inside(r, lo, hi) for r, (lo, _, hi) in zip(rows, lib))
                      / len(rows), p90=_q(errs, 0.9), median=_q(errs, 0.5), errs=_fmt(errs),
                      width=float(np.median([math.log(hi / lo) for lo, _, hi in lib
                                             if lo and hi]))))  # fmt: skip
    per = {cands[0]["name"]: errs}
    for name, cols in COLSETS.items():
        for level in LEVELS:  # 10% first (the narrowest band): the first covering 80%
            res = loto(rows, cols, level)
            cover = sum(e["inside"] for e in res) / len(res)
            if cover >= 0.8:
                break
        errs = per[name] = [e["err"] for e in res]
        cands.append(dict(name=name, cols=list(cols), level=level, cover=cover,
                          p90=_q(errs, 0.9), median=_q(errs, 0.5), errs=_fmt(errs),
                          width=float(np.median([e["width"] for e in res]))))  # fmt: skip
    chosen = sorted(cands, key=lambda c: (round(c["p90"], 2), round(c["median"], 2),
                                          len(c["cols"])))[0]  # fmt: skip
    # adopted only if it beats the default subspace's estimate in median and p90 over all
    # targets and over those the default reaches within its horizon
    mine = per[chosen["name"]]
    adopt = True
    for keep in (range(len(rows)), [i for i, r in enumerate(rows)
                                    if r["default"]["point"] is not None]):  # fmt: skip
        a = [mine[i] for i in keep]
        b = [_err(rows[i], rows[i]["default"]["median"]) for i in keep]
        adopt &= _q(a, 0.5) < _q(b, 0.5) and _q(a, 0.9) < _q(b, 0.9)
    coef: dict = {}
    if chosen["cols"]:  # a refit: its coefficients on all development tasks
        w = _fit(rows, tuple(chosen["cols"]), chosen["level"])
        # without a reference curve (no reliability check) the library drops ρ and ρ50
        w_no = _fit(rows, tuple(c for c in chosen["cols"] if c not in (5, 8)), chosen["level"])
        coef = {k: [round(float(v), 4) for v in w[k]] for k in w}
        coef.update({k + "_no_rho": [round(float(v), 4) for v in w_no[k]] for k in w_no})
    out = dict(candidates=cands, chosen=chosen["name"], level=chosen["level"], adopt=adopt,
               coefficients=coef, reference=_references(rows, mine), targets=len(rows),
               tasks=len({r["task"] for r in rows}))  # fmt: skip
    (OUT / "calibration.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "coefficients"}, indent=1))
    return out


# ---------------------------------------------------------------------------------------
# The fresh round.
# ---------------------------------------------------------------------------------------


def _mpl(n: int, size: int, seed: int):
    """Crops of matplotlib's three sample photographs and drawings."""
    import matplotlib

    base = Path(matplotlib.get_data_path()) / "sample_data"
    return hl._crops([base / f for f in MPL_FILES], n, size, seed)


def _stereo(n: int, size: int, seed: int):
    """Crops of OpenCV's stereo chessboard pairs 11-14 (left and right views)."""
    return hl._crops([ho._opencv_dir() / f for f in STEREO_FILES], n, size, seed)


TASKS = {
    "mpl-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                      projection=4096, num_classes=3, images=_mpl),
    "stereo-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                         projection=4096, num_classes=8, images=_stereo),
}  # fmt: skip


def fresh_task(name: str) -> dict:
    """Real runs of the full-batch cells of ``holdout.py``'s grid (its own cell function:
    lr from the tangent kernel's stability limit, real run to a 90% drop or H_CAP, the
    default head-exact and tangent forecasts), resumable per cell."""
    ho.TASKS.update(TASKS)
    ho.OUT = OUT / "fresh"
    ho.OUT.mkdir(parents=True, exist_ok=True)
    full = [c for c in ho._cells() if c["batch_size"] is None]
    original = ho._cells
    ho._cells = lambda: full
    try:
        return ho.run_task(name)
    finally:
        ho._cells = original


def library(names: list[str] | None = None) -> None:
    """The library's forecasts of every fresh cell (``fresh/<task>-library.json``)."""
    ho.TASKS.update(TASKS)
    for name in names or TASKS:
        src, dst = OUT / "fresh" / f"{name}.json", OUT / "fresh" / f"{name}-library.json"
        if not src.exists() or dst.exists():
            continue
        state = json.loads(src.read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = ho.load_task(name)
        hbs = kernels(task, TASKS[name])
        rows = []
        for key, c in state["cells"].items():
            rows += cell_rows(name, key, c, hbs, horizons=FRESH_HORIZON)
        dst.write_text(json.dumps(dict(task=name, machine=machine(), rows=rows,
                                       kernel_seconds={k: v[1] for k, v in hbs.items()})))


SPEED_CELLS = ("mse-full-m0-a0.3", "ce-full-m0.9-a0.1", "ce-B32-m0.9-a0.3")


def speed(name: str = "graphics-lite1") -> dict:
    """NOTE [head-body in span Q]: the full-span forecast of three stored cells in Q's
    coordinates and in d coordinates (``HeadBodyProblem.in_basis`` switched off), timed in
    one process after the kernel's cached parts were computed, each over the real run's
    steps; ``speed.json``."""
    from tangentlab import dynamics as dyn

    cells = dh.dev_tasks()[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ho.load_task(name)
    hb = kernels(task, ho.TASKS[name])["full"][0]
    with warnings.catch_warnings():  # the kernel's cached parts (tangent NTK, λ_max) first
        warnings.simplefilter("ignore")
        tl.forecast(hb, tl.SGD(1e-6), 1)
        tl.forecast(hb, tl.SGD(1e-6), 1, loss="ce")
    rows, original = [], dyn.HeadBodyProblem.in_basis
    for key in SPEED_CELLS:
        c = cells[key]
        steps = sum(v is not None for v in c["run_loss"]) - 1
        row = dict(cell=key, steps=steps)
        for mode in ("r coordinates", "d coordinates"):
            dyn.HeadBodyProblem.in_basis = original if mode[0] == "r" else (
                lambda self, **kw: None)  # fmt: skip
            try:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), steps,
                                     loss=c["loss"], batch_size=c["batch_size"], seed=ho.SEED)
                row[mode] = time.perf_counter() - t0
                row[mode + " loss"] = [float(v) for v in fc.loss]
            finally:
                dyn.HeadBodyProblem.in_basis = original
        a, b = np.array(row["r coordinates loss"]), np.array(row["d coordinates loss"])
        row["max_rel_diff"] = float(np.nanmax(np.abs(a - b) / np.abs(b)))
        rows.append(row)
        print(key, row["r coordinates"], row["d coordinates"], row["max_rel_diff"], flush=True)
    out = dict(task=name, machine=machine(), r=int(hb.basis.shape[1]),
               d=int(hb.basis.shape[0]), rows=rows)  # fmt: skip
    (OUT / "speed.json").write_text(json.dumps(out))
    return out


def _speed_lines() -> list[str]:
    path = OUT / "speed.json"
    if not path.exists():
        return []
    sp = json.loads(path.read_text())
    lines = ["", f"The full span's forecasts in Q's r = {sp['r']} coordinates against d = "
             f"{sp['d']} (NOTE [head-body in span Q]; `{COMMAND} --speed`, {sp['task']}, "
             "timed in one process, alone; full batch unless B32, 10 paths):", "",
             "| cell | steps | r coordinates s | d coordinates s | speed-up | max rel. difference "
             "of the loss curves |", "|---|---|---|---|---|---|"]
    for r in sp["rows"]:
        lines.append(f"| {r['cell']} | {r['steps']} | {r['r coordinates']:.2f} | "
                     f"{r['d coordinates']:.2f} | {r['d coordinates'] / r['r coordinates']:.1f}x"
                     f" | {r['max_rel_diff']:.1e} |")
    return lines


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------


def report() -> list[str]:
    cal = json.loads((OUT / "calibration.json").read_text())
    lines = [
        "## A steps interval for the full-span head-exact forecast of convolutional bodies "
        "(`benchmarks/fullspan.py`, issue 13, round 8)",
        "",
        f"Command: `{COMMAND} --collect && {COMMAND} --calibrate` (development), then "
        f"`{COMMAND} --fetch`, `{COMMAND} --task NAME` per fresh task, `{COMMAND} --library`, "
        f"`{COMMAND} --report`. Rules in the script's docstring. Entries median / p90 of "
        "|T̂ − T|/T (targets, misses), a miss counts as +∞. Machine: " + machine() + ".",
        "",
        f"Development: {cal['tasks']} image tasks, {cal['targets']} targets, full batch, "
        "left out by task:",
        "",
        "| estimate | error | band covers | median log-width |",
        "|---|---|---|---|",
        f"| default subspace, the library's estimate | {cal['reference']['default_library']} "
        f"| {cal['reference']['default_covered']:.0%} | – |",
        f"| full span, T̂ | {cal['reference']['full_raw']} | – | – |",
    ]
    for c in cal["candidates"]:
        mark = " **(chosen)**" if c["name"] == cal["chosen"] else ""
        label = (f"refitted: {c['name']} (level {c['level']:.0%})" if c["cols"]
                 else c["name"])  # fmt: skip
        lines.append(f"| full span, {label}{mark} | {c['errs']} | {c['cover']:.0%} | "
                     f"{c['width']:.2f} |")
    ref = cal["reference"]
    lines += ["", f"On the {ref['reached']} targets the default subspace reaches within 3x the "
              f"real steps: default {ref['default_reached']}, chosen {ref['chosen_reached']}.",
              "", f"Adopted: {'yes' if cal['adopt'] else 'no'} (rule: the docstring)."]
    lines += _speed_lines()
    fresh = {p.stem[: -len("-library")]: json.loads(p.read_text())["rows"]
             for p in sorted((OUT / "fresh").glob("*-library.json"))}  # fmt: skip
    if fresh:
        w = {k: np.array(v) for k, v in cal["coefficients"].items() if "_no_rho" not in k}
        lines += ["", "Fresh tasks (scored once):", "",
                  "| task | targets | default subspace (library) | its band covers | full span, "
                  "T̂ | full span, refitted | refitted band covers |",
                  "|---|---|---|---|---|---|---|"]
        pooled = []
        for name, rows in fresh.items():
            pooled += rows
            lines.append(_fresh_line(name, rows, w))
        lines.append(_fresh_line("all", pooled, w))
        lines += _cost_lines(fresh)
    return lines + ["", READING]


READING = """**Reading.** *Development* (14 image tasks, 428 full-batch targets, left out by task).
Forecasting with Q spanning all of φ0 and reading the interval from a calibration refitted
on those forecasts (all nine columns, band level 6%) scores 19% / 58% (6 misses), its band
covering 80.8% at a median log-width of 0.86; the same forecasts read through the default's
calibration score 29% / 71% (covering 76%), their T̂ itself 27% / 118%, and the default
subspace's library estimate 28% / miss (it misses 72 targets within 3x the real steps; on
the 346 it reaches, 23% / 58% against 18% / 42%). Adopted by the rule
(``STEPS_CALIBRATION_FULL``, for a convolutional body whose Q spans φ0, without a pilot;
never `trusted`). *Fresh* (two image tasks, 63 targets, scored once). Pooled, the refitted
full-span estimate scores 27% / 50% against 32% / 63% for the default subspace's: better in
median and p90, as on development, and far from issue 13's goals (15% / 35%). On
matplotlib's images it wins clearly (7% / 34% against 11% / 51%); on OpenCV's stereo
chessboards both are poor (40% / 53% against 44% / 65%) and there the full span's T̂ itself
was best (26% / 31%): those real runs were *slower* than the full-span forecast (median
log(T / T̂) +0.3, where development runs were mostly faster), and the refitted band
(narrower: median log-width 0.86 on development against 1.44) covered 20% of them (the
default's 73%). Pooled the new band covered 62%: **below the 80% it was chosen for**, so the
interval goal is not met by this option on fresh tasks; the default subspace's band covered
87%. What changes: the full span is an option (``directions="all"``, ``--directions all``)
with its own calibration, not the default; the default subspace keeps its calibration.
*Cost*: the full span's kernel took 4-9x the default's here, and its read-out kernel grows
as N (N + C); in Q's coordinates a forecast step is 1.3-1.7x cheaper than in d (table
above)."""


def _cost_lines(fresh: dict) -> list[str]:
    """Seconds of the fresh round (other runs beside it on the 2 cores: indicative)."""
    lines = ["", "Cost on the fresh tasks (seconds; two to four processes shared the two cores, "
             "so only the ratios within a row mean much): kernels; forecasts, median per "
             "cell (the full span over 3x the real steps, the default over 10x); the real "
             "run of a cell (trunk once + the top on cached trunk outputs, median):", "",
             "| task | kernel: full span / default | forecast per cell: full span / default | "
             "real run per cell |", "|---|---|---|---|"]
    for name, rows in fresh.items():
        lib = json.loads((OUT / "fresh" / f"{name}-library.json").read_text())
        state = json.loads((OUT / "fresh" / f"{name}.json").read_text())
        per = {k: float(np.median([r[k]["seconds"] for r in rows])) for k in ("full", "default")}
        real = float(np.median([c["real_seconds"] for c in state["cells"].values()]))
        ks = lib["kernel_seconds"]
        lines.append(f"| {name} | {ks['full']:.1f} / {ks['default']:.1f} | {per['full']:.1f} / "
                     f"{per['default']:.1f} | {real:.1f} |")
    return lines


def _fresh_line(name: str, rows: list[dict], w: dict) -> str:
    est = [estimate(r, w) for r in rows]
    cover = sum(_inside(r, lo, hi) for r, (lo, _, hi) in zip(rows, est)) / max(len(rows), 1)
    base = sum(_inside(r, r["default"]["low"], r["default"]["high"]) for r in rows) / max(
        len(rows), 1)  # fmt: skip
    return (f"| {name} | {len(rows)} | {_fmt([_err(r, r['default']['median']) for r in rows])}"
            f" | {base:.0%} | {_fmt([_err(r, r['full']['point']) for r in rows])} | "
            f"{_fmt([_err(r, m) for r, (_, m, _) in zip(rows, est)])} | {cover:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--fetch", action="store_true")
    ap.add_argument("--task", action="append")
    ap.add_argument("--library", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--speed", action="store_true", help="r against d coordinates, timed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.collect:
        collect(args.task)
    elif args.calibrate:
        calibrate()
    elif args.fetch:
        ho._opencv_dir(fetch=True)
        for f in (*MPL_FILES,):
            import matplotlib

            assert (Path(matplotlib.get_data_path()) / "sample_data" / f).exists(), f
    elif args.library:
        library(args.task)
    elif args.task:
        for name in args.task:
            fresh_task(name)
    elif args.speed:
        speed()
    else:
        lines = report()
        print("\n".join(lines))
        write_section("fullspan", "\n".join(lines))


if __name__ == "__main__":
    main()

"""Does the advice of the exact-top ValidityWarning work? ``reliable_lr`` against real runs
(issue 13).

Where the reliability check flags a forecast (NOTE [exact-top reliability check]), the
warning tells the user to lower the learning rate, and ``exact_top.reliable_lr`` returns
the first rate down a grid (η 0.8^k, the horizon stretched by 0.8^-k) whose forecast
passes the check at the 50% and 80% drops. This script takes every image cell with a
target flagged at those drops, asks ``reliable_lr`` for its rate (the cell's momentum,
loss, batch size and forecast batches, as the grid's forecast), fine-tunes the real network
at that rate (``holdout._real``: to a 90% drop, the cap stretched as the horizon), and
scores the forecast's estimate T̃ (``steps_estimate``, with the drift) of the new run's
targets, and its interval, as the grids are scored. Next to it: the flagged targets at the
cell's own rate, and the price, how many more steps the real run takes at the lower rate.

    .venv/bin/python benchmarks/twolayer_reliable.py --run --which dev [--task NAME]
    .venv/bin/python benchmarks/twolayer_reliable.py --report

Results: ``results/twolayer/reliable/<which>-<task>.json`` (resumable per cell); section
"twolayer-reliable" of RESULTS.md.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
import twolayer as tw  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.experimental import exact_top as et  # noqa: E402

OUT = tw.OUT / "reliable"
COMMAND = ".venv/bin/python benchmarks/twolayer_reliable.py"
WHICH = ("dev", "fresh5", "fresh6",  # held out once each: PLAN-fresh5.md's addendum, PLAN-fresh6
         "fresh11_q32C", "fresh12_q32C")  # at q = 32C, held out once: PLAN-reliable32.md
STOP = 0.19  # each try stops just below the 80% drop's target: the check reads no further
MAX_CAP = 4000  # the real run's cap at the lower rate: H_CAP / 0.8^k, at most this


def cells(which: str) -> dict[str, list[str]]:
    """``{task: [cell]}``: the cells with a target flagged at a drop ``reliable_lr`` checks."""
    out: dict[str, set] = {}
    for r in tw.check_rows(which):
        if r["R"] > et.REBOUND_MAX and float(r["drop"]) in et.RELIABILITY_DROPS:
            out.setdefault(r["task"], set()).add(r["cell"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def _options(c: dict) -> dict:
    """The forecast options of grid cell ``c``, as the grid's forecast (its loss, batch size
    and batches, logged as the check reads it), stopped just past the 80% drop."""
    return dict(loss=c["loss"], batch_size=c["batch_size"], seed=tw.GRID_SEED,
                log_every=1 if c["batch_size"] is None else 2, progress=False,
                stop_below=STOP * float(c["run_loss"][0]))


def _variant(which: str) -> str:
    """The q of ``which``'s grid ("<set>_q<variant>"; the others: 2C)."""
    return which.split("_q", 1)[1] if "_q" in which else "2C"


def run(which: str, only: list[str] | None = None) -> None:
    _, tasks = tw._task_set(which)
    for name, keys in cells(which).items():
        if only and name not in only:
            continue
        path = OUT / f"{which}-{name}.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        todo = [k for k in keys if k not in state]
        if not todo:
            continue
        task, top, h, y, params = tw._task(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            etk = tw._library_kernel(name, top, h, y, params, _variant(which))
            real_task = ho.load_task(name)
        for key in todo:
            c = tasks[name][0][key]
            t0 = time.perf_counter()
            fc = et.reliable_lr(etk, tl.SGD(c["lr"], momentum=c["momentum"]), c["fc_steps"],
                                **_options(c))  # fmt: skip
            fc_seconds = time.perf_counter() - t0
            out: dict = dict(fc_seconds=fc_seconds, lr=None)
            if fc is not None:
                lr = float(fc.settings["lr"])
                cap = min(MAX_CAP, math.ceil(ho.H_CAP * c["lr"] / lr))
                t0 = time.perf_counter()
                r = ho._real(real_task, tl.SGD(lr, momentum=c["momentum"]), cap, c)
                out.update(lr=lr, cap=cap, real_seconds=time.perf_counter() - t0,
                           run_steps=[int(s) for s in r.steps], run_loss=ho._curve(r.loss),
                           estimate={f"{d:g}": fc.steps_estimate(d) for d in ho.DROPS},
                           interval={f"{d:g}": fc.steps_interval(d) for d in ho.DROPS},
                           flagged={f"{d:g}": fc.flagged(d) for d in ho.DROPS},
                           rebound={f"{d:g}": fc.rebound(d) for d in ho.DROPS},
                           fc_steps=int(fc.settings["steps"]))  # fmt: skip
            state[key] = out
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(state))
            print(which, name, key, "lr", out["lr"], f"{fc_seconds:.1f}s",
                  f"{out.get('real_seconds', 0):.1f}s", flush=True)


def backfill(which: str) -> None:
    """Add the rebound R (``fc.rebound``) at each drop to the stored cells that predate it:
    the forecast at the stored rate rerun as ``reliable_lr`` ran it (the same horizon and
    options; its estimates checked against the stored ones)."""
    _, tasks = tw._task_set(which)
    for path in sorted(OUT.glob(f"{which}-*.json")):
        state = json.loads(path.read_text())
        todo = [k for k, v in state.items() if v["lr"] is not None and "rebound" not in v]
        if not todo:
            continue
        name = path.stem[len(which) + 1:]
        _, top, h, y, params = tw._task(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            etk = tw._library_kernel(name, top, h, y, params, _variant(which))
        for key in todo:
            c, st = tasks[name][0][key], state[key]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fc = et.forecast_exact_top(etk, tl.SGD(st["lr"], momentum=c["momentum"]),
                                           st["fc_steps"], **_options(c))  # fmt: skip
            for d in ho.DROPS:
                if fc.steps_estimate(d) != st["estimate"][f"{d:g}"]:
                    raise SystemExit(f"{which} {name} {key}: the rerun forecast differs at "
                                     f"drop {d:g} ({fc.steps_estimate(d)} against "
                                     f"{st['estimate'][f'{d:g}']})")
            st["rebound"] = {f"{d:g}": fc.rebound(d) for d in ho.DROPS}
            path.write_text(json.dumps(state))
            print(which, name, key, st["rebound"], flush=True)


def _first(steps: list[int], loss: list, target: float) -> int | None:
    return next((int(t) for t, v in zip(steps, loss) if v is not None and v <= target), None)


def scored(which: str) -> list[dict]:
    """One row per (cell, drop in 50%, 80%) whose target ``check_rows`` flags at the cell's
    rate: the original T and T̃; and at ``reliable_lr``'s rate, the new real run's T'
    (None: not reached within its cap), the forecast's T̃', its interval and flag."""
    states = {p.stem[len(which) + 1:]: json.loads(p.read_text())
              for p in OUT.glob(f"{which}-*.json")}  # fmt: skip
    out = []
    for r in tw.check_rows(which):
        if r["R"] <= et.REBOUND_MAX or float(r["drop"]) not in et.RELIABILITY_DROPS:
            continue
        st = states.get(r["task"], {}).get(r["cell"])
        if st is None:
            continue
        row = dict(r, lr_ratio=None, T_new=None, et_new=None, inside=None)
        if st["lr"] is not None:
            d = f"{float(r['drop']):g}"
            loss = st["run_loss"]
            t_new = _first(st["run_steps"], loss, (1 - float(r["drop"])) * loss[0])
            lo_hi = st["interval"][d]
            est = st["estimate"][d]
            lo, hi = et.STEPS_BAND_FLAGGED if st["flagged"][d] else et.STEPS_BAND_ADVISED
            row.update(lr_ratio=st["lr"] / tw._task_set(which)[1][r["task"]][0][r["cell"]]["lr"],
                       T_new=t_new, et_new=est, flagged_new=st["flagged"][d],
                       inside=(t_new is not None and lo_hi is not None
                               and lo_hi[0] <= t_new <= lo_hi[1]),
                       inside_now=(t_new is not None and est is not None
                                   and est * math.exp(lo) <= t_new <= est * math.exp(hi)),
                       )  # fmt: skip
        out.append(row)
    return out


def choose_advised_band(which: str = "dev") -> dict:
    """NOTE [exact-top steps interval], ``STEPS_BAND_ADVISED``: the band of the targets of a
    forecast at the rate ``reliable_lr`` lowered to, one band pooled over the losses and
    batch sizes (76 development targets are too few to split), T ∈ [T̃' e^lo, T̃' e^hi]:
    (lo, hi) the (p, 1 − p) quantiles of log(T' / T̃') over ``which``'s targets that the new
    run reaches, p the largest of ``twolayer.BAND_LEVELS`` whose left-out-task coverage (each
    task scored on the band of the others) reaches ``twolayer.BAND_COVER``, as the grid's
    bands are chosen (``twolayer.choose_band``)."""
    rows = [r for r in scored(which) if r["T_new"] is not None]
    res = {id(r): (math.log(r["T_new"] / r["et_new"]) if r["et_new"] else None) for r in rows}
    tasks = sorted({r["task"] for r in rows})
    out = {}
    for levels in tw.BAND_LEVELS:
        hit = []
        for t in tasks:
            x = [res[id(r)] for r in rows if r["task"] != t and res[id(r)] is not None]
            lo, hi = np.quantile(x, levels[0]), np.quantile(x, levels[1])
            hit += [res[id(r)] is not None and lo <= res[id(r)] <= hi
                    for r in rows if r["task"] == t]  # fmt: skip
        x = [v for v in res.values() if v is not None]
        out[levels] = dict(lo=float(np.quantile(x, levels[0])),
                           hi=float(np.quantile(x, levels[1])), loto=float(np.mean(hit)))
    chosen = next((lv for lv in tw.BAND_LEVELS if out[lv]["loto"] >= tw.BAND_COVER), None)
    return dict(candidates=out, chosen=chosen, n=len(rows), tasks=len(tasks))


def _err(t: float | None, big_t: int | None) -> float:
    if big_t is None:
        return math.nan
    return math.inf if t is None or not math.isfinite(t) else abs(t - big_t) / big_t


def _fmt(errs: list[float]) -> str:
    e = np.array([v for v in errs if not math.isnan(v)], dtype=float)
    if not len(e):
        return "-"
    q = lambda p: "miss" if np.quantile(e, p, method="higher") == math.inf else (  # noqa: E731
        f"{np.quantile(e, p, method='higher'):.0%}")
    return (f"{q(0.5)} / {q(0.9)}; {np.mean(e > tw.BAD):.0%} bad ({len(e)}, "
            f"{int(np.isinf(e).sum())} miss)")


def report() -> list[str]:
    lines = [f"Command: `{COMMAND} --run --which dev`, `--run --which fresh5`, `--run "
             f"--which fresh6`, `--run --which fresh11_q32C`, `--run --which fresh12_q32C`, "
             f"then `--report`. Machine: {machine()}.", "",
             "The advice of the exact-top ValidityWarning, tested against real runs (see the "
             "module docstring): on every image cell with a target the check flags at the "
             "50% or 80% drop, `exact_top.reliable_lr` picks a lower rate whose forecast "
             "passes; the real network is fine-tuned at that rate and the forecast scored on "
             "its targets. Entries: median / p90 of |T̃ − T|/T; bad: > 25% or a miss "
             "(targets, misses). *At its own rate*: the flagged targets as scored in the "
             "grid; *at the lower rate*: the new run's targets at the same drops (a target "
             "the new run does not reach within its cap is left out, counted apart); "
             "*interval*: the new run's T inside the forecast's ``steps_interval`` as it "
             "was run (stored; before PLAN-fresh6.md the grid's passed band); *advised "
             "band*: inside the band of a lowered rate, ``STEPS_BAND_ADVISED`` (x0.83 to "
             "x1.21 of T̃, chosen on the development rows, PLAN-fresh6.md); "
             "*rate*, *steps*: median ratio of the lower rate to the cell's and of the new "
             "run's T to the old.", "",
             "| tasks | loss | targets | no rate found | at its own rate | at the lower rate "
             "| interval | advised band | rate | steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for which in WHICH:
        rows = scored(which)
        if not rows:
            continue
        for loss in (*ho.LOSSES, "all"):
            sub = [r for r in rows if loss in ("all", r["loss"])]
            if not sub:
                continue
            found = [r for r in sub if r["lr_ratio"] is not None]
            reached = [r for r in found if r["T_new"] is not None]
            old = _fmt([_err(r["et"], r["T"]) for r in sub])
            new = _fmt([_err(r["et_new"], r["T_new"]) for r in reached])
            inside = f"{np.mean([r['inside'] for r in reached]):.0%}" if reached else "-"
            now = f"{np.mean([r['inside_now'] for r in reached]):.0%}" if reached else "-"
            rate = f"{np.median([r['lr_ratio'] for r in found]):.2f}" if found else "-"
            slow = (f"{np.median([r['T_new'] / r['T'] for r in reached]):.2f}" if reached
                    else "-")  # fmt: skip
            lines.append(f"| {which} | {loss} | {len(sub)} ({len(found) - len(reached)} not "
                         f"reached) | {len(sub) - len(found)} | {old} | {new} | {inside} | {now} | "
                         f"{rate} | {slow} |")
    return lines + READING.splitlines()


READING = """
*Reading.* On the image development tasks (52 cells, 76 flagged targets) the advice works:
at the rate ``reliable_lr`` picks (median 0.41x the cell's), the forecast scores 5% / 20%
with 7% of the targets bad, against 25% / miss with 51% bad at the cell's own rate, and the
real run needs about as many steps as at the higher rate (median 1.01x): at the edge of
stability a higher rate buys nothing. Held out once on the fifth fresh round (PLAN-fresh5.md,
addendum, frozen before its run; 25 cells, 36 flagged targets): ``reliable_lr`` found no
passing rate within its 10 tries for 3 cells (6 targets: it returns None, as documented);
on the other 30 targets the forecast at the lower rate scores **9% / 23% with 7% bad**
(issue 13's goals met; 18% / 56% with 44% bad at the cells' own rates). Two parts of the
frozen claim failed: the interval held only 67% of the new targets (claim: at least 80%),
and the real runs at the lower rate took 1.41x the steps (median; claim: at most 1.3x). So
on fresh tasks the lower rate makes the estimate reliable, at a price in steps that the
development tasks did not show, and its band is too narrow there.
*The band of a lowered rate* (PLAN-fresh6.md, chosen on the 76 development targets by the
grids' band rule: ``STEPS_BAND_ADVISED``, x0.83 to x1.21 of T̃, left-out coverage 87%): it
holds 89% of the development targets (the passed bands 83%); on fresh5, a second look (its
failure prompted the change), 87%. *Held out once on the sixth fresh round*
(PLAN-fresh6.md, frozen before any forecast of it; 25 cells, 36 flagged targets):
``reliable_lr`` found a passing rate for every cell (median 0.33x the cell's); at that rate
the forecast scores **8% / 20% with 3% bad** (19% / 44% with 44% bad at the cells' own
rates), and the new band holds **94%** of the targets: every part of the frozen claim held
(goals met, at most 10% bad, the band >= 80%). The real runs at the lower rate took 1.23x
the steps (median; reported, no claim: 1.01x on the development tasks, 1.41x on fresh5).
*At q = 32C* (PLAN-reliable32.md, frozen before any run; the library's q for a vector z
since PLAN-fresh12.md, with its own drift; ``STEPS_BAND_ADVISED`` unchanged), held out once
on the flagged cells of the eleventh and twelfth rounds (25 cells, 38 flagged targets):
``reliable_lr`` found no passing rate for 2 cells of each round (4 targets); at its rate
(median 0.33x the cell's) the forecast scores **6% / 16% with 3% bad** on the other 34
(23% / 62% with 45% bad at the cells' own rates), and the advised band holds **94%**: every
part of the frozen claim held (goals met, at most 10% bad, the band >= 80%). The real runs
at the lower rate took 1.21x the steps (median; reported, no claim).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="reliable_lr and the real runs")
    ap.add_argument("--which", default="dev", choices=WHICH)
    ap.add_argument("--task", action="append", help="with --run: only this task (repeat)")
    ap.add_argument("--choose-band", action="store_true",
                    help="the band of a lowered rate, chosen on the development rows")
    ap.add_argument("--backfill", action="store_true",
                    help="add the rebound R of the stored forecasts at the lower rate")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run:
        run(args.which, args.task)
        return
    if args.choose_band:
        res = choose_advised_band()
        for lv, c in res["candidates"].items():
            print(f"p = {lv[0]:g}: x{math.exp(c['lo']):.2f} to x{math.exp(c['hi']):.2f} "
                  f"(log {c['lo']:+.4f}, {c['hi']:+.4f}), left-out coverage {c['loto']:.0%}")
        print(f"chosen: p = {res['chosen'][0]:g} ({res['n']} targets, {res['tasks']} tasks)")
        return
    if args.backfill:
        backfill(args.which)
        return
    lines = report()
    print("\n".join(lines))
    write_section("twolayer-reliable", "\n".join(lines))


if __name__ == "__main__":
    main()

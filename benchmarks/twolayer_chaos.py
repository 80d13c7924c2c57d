"""How predictable is a real run at all? The noise floor of the exact-top targets (issue 13).

Where the exact-top reliability check flags a target (NOTE [exact-top reliability check]:
the forecast's own loss climbs back by more than 0.15 L0 before it), the forecast misses
issue 13's goals. This script asks how well *another real run* predicts the real run there:
the same network, data and optimizer, perturbed in a way no forecast can know or should
depend on,

- ``seed`` (minibatch cells): the batch order of seed 1 instead of 0. The benchmark's
  forecasts use yet another order (``twolayer.GRID_SEED``), so this is the floor that any
  one-path forecast of these grids has;
- ``lr+1%`` (every cell): the learning rate times 1.01, the conditioning of T on the
  learning rate (a model whose curvature is off by 1% is off by as much).

Each perturbed run is scored as a forecast of the stored real run (``twolayer.grid_rows``'s
targets: 50%, 80%, 90% of L0, a run that never gets there is a miss), separately on the
targets the check flags and on a control sample of cells it passes (as many cells as are
flagged, drawn with a fixed seed). Measured on the development tasks, image (``dev``) and
text (``text-ffn``), then once on the fourth, fifth and sixth fresh rounds (``fresh4``,
``fresh5``, ``fresh6``: PLAN-fresh4.md, PLAN-fresh5.md, PLAN-fresh6.md's addendum).

    .venv/bin/python benchmarks/twolayer_chaos.py --run --which dev
    .venv/bin/python benchmarks/twolayer_chaos.py --report

Results: ``results/twolayer/chaos/<which>-<task>.json`` (resumable per run); section
"twolayer-chaos" of RESULTS.md.
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

OUT = tw.OUT / "chaos"
COMMAND = ".venv/bin/python benchmarks/twolayer_chaos.py"
WHICH = ("dev", "text-ffn", "fresh4", "fresh5", "fresh6",  # fresh4-6: held out once (PLANs)
         "fresh11_q32C", "fresh12_q32C", "fresh13_q32Cmax128",  # 32 px at the library's q
         "fresh14_q32Cmax128")  # (PLAN-chaos32.md)
CONTROL_SEED = 37
PERTURB = {"seed": dict(seed=ho.SEED + 1, lr=1.0), "lr+1%": dict(seed=ho.SEED, lr=1.01)}


def cells(which: str) -> dict[str, dict[str, str]]:
    """``{task: {cell: "flagged" | "control"}}``: every cell with a flagged target, and as
    many cells without one, drawn per task with ``CONTROL_SEED``."""
    rows = tw.check_rows(which)
    out: dict[str, dict[str, str]] = {}
    for name in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == name]
        flagged = sorted({r["cell"] for r in mine if r["R"] > et.REBOUND_MAX})
        calm = sorted({r["cell"] for r in mine} - set(flagged))
        rng = np.random.default_rng([CONTROL_SEED, len(name), sum(map(ord, name))])
        pick = rng.choice(len(calm), size=min(len(flagged), len(calm)), replace=False)
        out[name] = {**{k: "flagged" for k in flagged},
                     **{calm[i]: "control" for i in sorted(pick)}}  # fmt: skip
    return out


def _perturbations(c: dict, primary: bool) -> list[str]:
    """``seed`` for minibatch cells, ``lr+1%`` for all; ``primary``: one per cell (``seed``
    for minibatch cells)."""
    out = [p for p in PERTURB if p != "seed" or c["batch_size"] is not None]
    return out[:1] if primary else out


def run(which: str, primary: bool = False, only: list[str] | None = None) -> None:
    """The perturbed real runs of ``cells(which)``, the flagged cells first, resumable per
    (cell, perturbation); ``primary``: one perturbation per cell; ``only``: these tasks."""
    _, tasks = tw._task_set(which)
    chosen = {k: v for k, v in cells(which).items() if only is None or k in only}
    for group in ("flagged", "control"):
        for name, mine in chosen.items():
            path = OUT / f"{which}-{name}.json"
            state = json.loads(path.read_text()) if path.exists() else {}
            todo = [(k, p) for k, g in mine.items() if g == group
                    for p in _perturbations(tasks[name][0][k], primary)
                    if p not in state.get(k, {})]  # fmt: skip
            if not todo:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                task = ho.load_task(name)
            for key, p in todo:
                c = tasks[name][0][key]
                opt = tl.SGD(c["lr"] * PERTURB[p]["lr"], momentum=c["momentum"])
                t0 = time.perf_counter()
                r = ho._real(task, opt, ho.H_CAP, c, seed=PERTURB[p]["seed"])
                state.setdefault(key, {"group": group})[p] = dict(
                    run_steps=[int(s) for s in r.steps], run_loss=ho._curve(r.loss),
                    seconds=time.perf_counter() - t0)  # fmt: skip
                OUT.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(state))
                print(which, name, key, p, f"{state[key][p]['seconds']:.1f}s", flush=True)


def _per_step(steps: list[int], loss: list) -> list:
    out = [None] * (int(steps[-1]) + 1)
    for t, v in zip(steps, loss):
        out[int(t)] = v
    return out


def scored(which: str) -> list[dict]:
    """One row per target of ``grid_rows(which)`` whose cell ran: the stored row with
    ``group`` and ``pert``: {perturbation: the perturbed run's steps to the target or
    None}."""
    from forecast_accuracy import _targets

    _, tasks = tw._task_set(which)
    states = {p.stem[len(which) + 1:]: json.loads(p.read_text())
              for p in OUT.glob(f"{which}-*.json")}  # fmt: skip
    out = []
    for r in tw.check_rows(which):
        st = states.get(r["task"], {}).get(r["cell"])
        if st is None:
            continue
        c = dict(tasks[r["task"]][0][r["cell"]])
        pert = {}
        for p in PERTURB:
            if p in st:
                c[p] = _per_step(st[p]["run_steps"], st[p]["run_loss"])
                pert[p] = _targets(c, ho.DROPS, p)[f"{float(r['drop']):g}"]["T_hat"]
        out.append(dict(r, group=st["group"], pert=pert))
    return out


def _err(t: float | None, big_t: int) -> float:
    return math.inf if t is None or not math.isfinite(t) else abs(t - big_t) / big_t


def _fmt(errs: list[float]) -> str:
    e = np.array(errs, dtype=float)
    if not len(e):
        return "-"
    q = lambda p: "miss" if np.quantile(e, p, method="higher") == math.inf else (  # noqa: E731
        f"{np.quantile(e, p, method='higher'):.0%}")
    share = np.mean(e > tw.BAD)
    return f"{q(0.5)} / {q(0.9)}; {share:.0%} > 25% ({len(e)}, {int(np.isinf(e).sum())} miss)"


def report() -> list[str]:
    lines = [f"Command: `{COMMAND} --run --which dev`, `--run --which text-ffn --primary`, "
             f"`--run --which fresh4`, `--run --which fresh5`, `--run --which fresh6`, "
             "`--run --which SET` for the four 32-px sets of PLAN-chaos32.md, then "
             "`--report`. "
             f"Machine: {machine()}.", "",
             "The noise floor of the targets (the development tasks, then the fourth, "
             "fifth and sixth fresh rounds once each, PLAN-fresh4.md, PLAN-fresh5.md, "
             "PLAN-fresh6.md; see the module "
             "docstring): another real run, "
             "perturbed in a way no forecast can know, scored as a forecast of the stored "
             "real run, on the targets the exact-top check flags and on a control sample of "
             "cells it passes, next to the library's estimate T̃ on the same targets. "
             "Entries: median / p90 of |T' − T|/T; the share off by more than 25% (targets, "
             "misses).", "",
             "| tasks | group | loss | batch | perturbation | another real run | "
             "exact-top T̃ |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for which in WHICH:
        rows = scored(which)
        for group in ("flagged", "control"):
            if group == "flagged":
                sub_g = [r for r in rows if r["R"] > et.REBOUND_MAX]
            else:
                sub_g = [r for r in rows if r["group"] == "control"]
            for loss in (*ho.LOSSES, "all"):
                for batch in ("full", "B32", "all"):
                    sub = [r for r in sub_g if loss in ("all", r["loss"])
                           and batch in ("all", r["batch"])]  # fmt: skip
                    for p in PERTURB:
                        have = [r for r in sub if p in r["pert"]]
                        if not have:
                            continue
                        lines.append(
                            f"| {which} | {group} | {loss} | {batch} | {p} | "
                            f"{_fmt([_err(r['pert'][p], r['T']) for r in have])} | "
                            f"{_fmt([_err(r['et'], r['T']) for r in have])} |")
    return lines + pooled_lines(WHICH[5:]) + READING.splitlines()


def pooled_lines(sets: tuple[str, ...]) -> list[str]:
    """The sets' targets pooled (PLAN-chaos32.md: the four 32-px rounds at the library's
    q), per group, loss and perturbation."""
    rows = [r for which in sets for r in scored(which)]
    if not rows:
        return []
    lines = ["", f"Pooled over {', '.join(sets)} (PLAN-chaos32.md): entries as above.", "",
             "| group | loss | perturbation | another real run | exact-top T̃ |",
             "|---|---|---|---|---|"]  # fmt: skip
    for group in ("flagged", "control"):
        for loss in (*ho.LOSSES, "all"):
            sub = [r for r in rows if (r["R"] > et.REBOUND_MAX if group == "flagged"
                                       else r["group"] == "control")
                   and loss in ("all", r["loss"])]  # fmt: skip
            for p in PERTURB:
                have = [r for r in sub if p in r["pert"]]
                if have:
                    lines.append(f"| {group} | {loss} | {p} | "
                                 f"{_fmt([_err(r['pert'][p], r['T']) for r in have])} | "
                                 f"{_fmt([_err(r['et'], r['T']) for r in have])} |")
    return lines


READING = """
*Reading.* On the image development tasks the targets the check passes are as predictable
as a rerun can tell: a learning rate 1% higher moves 1% of them by more than 25%, another
batch order 4% (the forecast: 3% and 5%). Where the check flags, the real runs are
chaotic: 21% and 39% of the targets move by more than 25% (p90 44% and 900%), so any
forecast that does not know the batch order, or whose curvature is off by 1%, has that
floor there; the forecast itself is off by that much on 47% and 46%. The claim frozen in
PLAN-fresh4.md before the fourth fresh round's reruns holds for the passed targets (0% and
0% move by more than 25%) and only in part for the flagged ones: 10% and 19% move that much
(p90 26% and 29%, within issue 13's p90 goal), while the forecast is off by that much on
47% and 35% of the same targets. So the chaos where the check flags is real but smaller
than the forecast's error there, most of which is the model's. The text development tasks
point the same way (one perturbation per cell, ``--primary``): where the check flags,
another batch order moves 23% of 86 targets by more than 25% and a learning rate 1% higher
26% of 50, against 50% and 58% for the forecast; where it passes, 0% of 99 and of 113 (the
forecast 0% and 0%).
On the fifth fresh round (PLAN-fresh5.md, once; the claim written before its reruns: at most
5% of the passed targets off by more than 25%, and fewer of the flagged ones than the
forecast) both parts held: 0% of the 30 and 72 control targets moved that much, and on the
flagged targets another batch order moved 0% of 31 (p90 13%) and a learning rate 1% higher
8% of 61 (p90 20%, 1 miss), against 45% and 46% for the forecast. Two held-out rounds now
agree that the flagged targets are far more predictable from another real run than from the
forecast: the chaos of the development tasks (21% and 39%) was not typical of fresh tasks.
On the sixth fresh round (PLAN-fresh6.md's addendum, once; the same claim written before
its reruns) both parts held again: 0% of the 35 and 70 control targets moved by more than
25%; on the flagged targets another batch order moved 0% of 29 (p90 17%) and a learning
rate 1% higher 17% of 60 (p90 29%), against 28% and 38% for the forecast. Three held-out
rounds agree.
*The 32-px rounds at the library's q* (PLAN-chaos32.md, frozen before the reruns; rounds
11-14 at q = min(32C, 128) with its calibration, the estimate as the library makes it now):
both claims held on each of the four sets. Another real run moved 0-2% of the control
targets by more than 25% (pooled: 0% of 62 with another batch order, 1% of 129 with the
rate 1% higher; the forecast 8% and 4%), and on the flagged targets fewer than the forecast
on every set (pooled 17% of 59 and 13% of 111, the forecast 41% and 48%). On the flagged CE
targets, the tail issue 13's CE goal fails on, another real run is 14% / 42% (batch order,
37 targets) and 8% / 38% (rate, 72 targets, 4 misses, all on round 14: hebrew10-lite0's CE
full-batch run at a = 0.3, which the stored run took 58 steps to halve, stayed above L0 / 2
for all 1,500 steps with the rate 1% higher, and thaidigits10-lite1's CE B = 32 run at a =
1 did so with either change), against 23-28% / 65-67% for the forecast on the same targets, bad on
49-50% of them: the noise floor there sits near the 35% goal, and the forecast's error is
about twice it, most of it the model's. ``twolayer_weights.py`` asks which of the model's
approximations it is.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="the perturbed real runs")
    ap.add_argument("--which", default="dev", choices=WHICH)
    ap.add_argument("--primary", action="store_true",
                    help="one perturbation per cell (seed for minibatch cells, lr+1%% else)")
    ap.add_argument("--task", action="append", help="with --run: only this task (repeat)")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run:
        run(args.which, args.primary, args.task)
        return
    lines = report()
    print("\n".join(lines))
    write_section("twolayer-chaos", "\n".join(lines))


if __name__ == "__main__":
    main()

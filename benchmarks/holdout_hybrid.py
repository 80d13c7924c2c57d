"""A hybrid steps interval: the calibrated estimate conditioned on one short real pilot run
per loss (issue 13, round 7): chosen on twenty-four development tasks, reported once on
four fresh tasks.

    .venv/bin/python benchmarks/holdout_hybrid.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_hybrid.py --fetch        # where the fresh data is
    .venv/bin/python benchmarks/holdout_hybrid.py --task NAME    # one fresh task, resumable
    .venv/bin/python benchmarks/holdout_hybrid.py --library      # the library's intervals
    .venv/bin/python benchmarks/holdout_hybrid.py --report       # RESULTS.md section only

**Why.** After round 6 the training-free estimate met issue 13's goals on the text tasks
(MiniLM) but not on the image tasks (EfficientNet-Lite0/1), whose real runs are off the
estimate by a per-task factor that keeps its sign across settings and that no feature known
before training explained (RESULTS.md "holdout-curves", "holdout-kind"). A real run
measures it: issue 13's candidate 3 ("kernel evolution from a pilot") and its hybrid.

**The pilot.** Per loss, one real full-batch run of the task at one setting (momentum m,
a fraction a of the stability limit, ``tl.stable_lr``) until its loss has dropped by D,
and the head-exact forecast of the same run; its feature is log(T_pilot / T̂_pilot) at that
drop (0 when either curve does not get there). The feature joins round 6's ten columns as
an eleventh; the band and the median are refitted on all development targets except the
pilot cells' own. Its cost is the pilot's sample-gradients (steps x N) over the whole grid's
(every cell's steps x N or B), median over tasks.

**The choice** (``--calibrate``; leave-one-task-out over the twenty-four development tasks:
the twenty of round 6 and round 6's four fresh ones; the benchmarks' stored curves). The
candidates: pilot settings full batch with (m, a) in {(0, 0.1), (0, 0.3), (0.9, 0.1),
(0.9, 0.3), (0.9, 1)} and D in {50%, 80%}, each at band levels 4-7%. The rule, stated
before the table was read: pilots costing at most 5% of the grid; for each, the narrowest
band level whose left-out band covers at least 80% of each kind's targets; then the lowest
pooled left-out p90 of the median estimate, ties (within a point) by the lower median, then
the lower cost. The same rows without the pilot column are the training-free reference.
Frozen (``results/holdout_hybrid/calibration.json``) and committed before any fresh data
was loaded; its coefficients, fitted on all twenty-four tasks, become
``tangentlab.forecast.STEPS_CALIBRATION_PILOT`` (``Forecast.steps_interval(ε, pilot=)``).

**Fresh tasks** (data no round used, chosen before any of it was looked at; the examples'
networks; N, grid, horizons (10x), drops and scoring of ``holdout_fresh.py``):

- ``fortunes6-minilm``: which of four other files of Debian's fortune cookies (art, drugs,
  kids, literature) a fortune comes from, MiniLM-L6 at 16 tokens;
- ``fortunes7-minilm``: the same with three more (people, riddles, news);
- ``chess-lite0``: 64-px crops of eight of OpenCV's chessboard calibration photographs
  (left02-left09: the same board in eight poses), which one a crop comes from,
  EfficientNet-Lite0 at 32 px;
- ``misc-lite1``: 64-px crops of six OpenCV images no task used (aero1, gradient, mask,
  templ, tmpl, left; none the other view of a used pair), which one a crop comes from,
  EfficientNet-Lite1 at 32 px.

``--library`` then reruns ``tl.forecast`` and ``Forecast.steps_interval`` on every stored
cell (what a user gets), without and with the pilot (the stored real run of the pilot cell
as ``tl.pilot_feature``'s input). Results: ``benchmarks/results/holdout_hybrid/`` and the
"holdout-hybrid" section of RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_curves as hc  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import holdout_kind as hk  # noqa: E402
import holdout_limit as hl  # noqa: E402
from _common import write_section  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_hybrid")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_hybrid.py"

# ---------------------------------------------------------------------------------------
# The choice (development only).
# ---------------------------------------------------------------------------------------

PILOTS = tuple((f"full-m{m:g}-a{a:g}", d) for m, a in ((0, 0.1), (0, 0.3), (0.9, 0.1),
                                                      (0.9, 0.3), (0.9, 1)) for d in (0.5, 0.8))
LEVELS = (0.04, 0.05, 0.06, 0.07)
MAX_COST = 0.05
NCOLS = 11  # steps_features' ten columns + the pilot's log(T / T̂)
EXTRA = (*hk.VARIANTS["conv"], "pilot")
hl.TASK_FEATURES["pilot"] = lambda k: k["pilot"]


def dev_cells() -> dict:
    """The twenty-four development tasks: ``holdout_curves._all_cells`` and round 6's."""
    cells = hc._all_cells()
    for name, cfg in hk.TASKS.items():
        state = json.loads((hk.OUT / f"{name}.json").read_text())
        cells[name] = (state["cells"], "hb_loss", cfg["kind"], cfg["num_samples"])
    return cells


def _x(r: dict, extra: tuple = EXTRA) -> np.ndarray:
    """The eleven columns for a development row (the variant's columns; the others 0)."""
    x = np.zeros(NCOLS)
    cols = hl._cand_x(r, extra)
    x[: len(cols)] = cols
    return x


def _summary(rows: list[dict], res: list[dict]) -> dict:
    from tangentlab.forecast import STEPS_TRUST_WIDTH

    for e in res:
        e["trusted"] = e["width"] <= STEPS_TRUST_WIDTH
    s = hk._summary(rows, res)
    errs = sorted(e["err"] for e in res)
    s["p90"] = float(np.quantile(errs, 0.9)) if errs else math.inf
    return s


def _best_level(rows: list[dict], extra: tuple) -> tuple[float, dict] | None:
    """The narrowest level whose left-out band covers 80% of each kind (None: none does)."""
    for level in sorted(LEVELS, reverse=True):  # higher level: narrower band
        s = _summary(rows, hl._cand_loto(rows, extra, q=level))
        if all(s["cover"][k] >= 0.8 for k in hk.KINDS):
            return level, s
    return None


def _row(label: str, cost: float, level: float, s: dict) -> str:
    return (f"| {label} | {cost:.1%} | {level:.2f} | {s['err']} | {s['kind_err']['text']} | "
            f"{s['kind_err']['image']} | {s['cover']['text']:.1%} / {s['cover']['image']:.1%} "
            f"| {s['width']:.2f} ({s['kind_width']['text']:.2f} / "
            f"{s['kind_width']['image']:.2f}) |")  # fmt: skip


def calibrate() -> dict:
    """Every pilot left-out (table), the rule's choice, its coefficients."""
    cells = dev_cells()
    lines = [
        "| pilot (full batch), drop D | cost | band level | median estimate | text tasks | "
        "image tasks | band covers: text / image | median log-width: all (text / image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = None
    for ref, drop in PILOTS:
        rows = hc.pilot_rows(cells, ref, drop)
        cost = hc._pilot_cost(cells, ref, drop)
        label = ref.removeprefix("full-").replace("-", ", ") + f", {drop:.0%}"
        base = _best_level(rows, hk.VARIANTS["conv"])
        if base is not None:
            lines.append(_row(f"{label}: without the pilot column", 0.0, *base))
        got = _best_level(rows, EXTRA)
        if got is None:
            lines.append(f"| {label} | {cost:.1%} | – | no level covers 80% of each kind | |||||")
            continue
        lines.append(_row(f"**{label}**" if cost <= MAX_COST else f"{label} (> 5%)", cost,
                          *got))  # fmt: skip
        level, s = got
        key = (round(s["p90"], 2), round(s["median"], 2), cost)
        if cost <= MAX_COST and (best is None or key < best[0]):
            best = (key, ref, drop, level, rows)
    _, ref, drop, level, rows = best
    coef = _fit(rows, level)
    coef.update({f"{k}_no_rho": v for k, v in _fit(rows, level, rho=False).items()})
    out = dict(pilot=ref, drop=drop, level=level, table=lines, cost=_cost_table(cells, ref, drop),
               coef={k: np.round(v, 4).tolist() for k, v in coef.items()})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines))
    print(f"chosen: pilot {ref} to {drop:.0%}, band level {level}")
    print(json.dumps(out["coef"]))
    return out


def _fit(rows: list[dict], level: float, *, rho: bool = True) -> dict:
    """Quantile fits (level, 50%, 1 − level) of log(T / T̂) over the eleven columns."""
    return hk.fit(rows, EXTRA, level, rho=rho, xf=_x, ncols=NCOLS)


def _cost_table(cells: dict, ref: str, drop: float) -> dict:
    """The chosen pilot's cost per task: over the grid, and over its median cell's run."""
    out = {}
    for name, (cs, _, _, n) in cells.items():
        runs = [c["steps"] * (c["batch_size"] or n) for c in cs.values()]
        pilot = 0
        for loss in ho.LOSSES:
            c = cs[f"{loss}-{ref}"]
            t = hc._first_below(c["run_loss"], (1.0 - drop) * c["run_loss"][0])
            pilot += (c["steps"] if t is None else t) * n
        out[name] = dict(grid=pilot / sum(runs), median_cell=pilot / float(np.median(runs)))
    return out

PREFIX = OUT / "prefix.json"


def prefix_variant() -> list[str]:
    """Development only (issue 13's hybrid on a run's own prefix): per cell, the real run's
    first p% of steps (p = 5, 10) in place of a pilot; its feature is log(T / T̂) at the
    lowest loss the prefix reached (0 when it dropped less than 5%, or the forecast never
    gets there), left out like the pilot; targets the prefix already reached count as exact.
    Saved to ``results/holdout_hybrid/prefix.json``; the report shows it."""
    from headbody import _fmt

    cells = dev_cells()
    lines = ["| prefix of each run | columns | median estimate | text tasks | image tasks | "
             "targets inside the prefix |", "|---|---|---|---|---|---|"]  # fmt: skip
    for frac in (0.05, 0.10):
        rows = []
        for name, (cs, key, kind, _) in cells.items():
            for ck, c in cs.items():
                run, steps = hl._arr(c["run_loss"]), np.asarray(c["run_steps"])
                cut = max(1, math.ceil(frac * steps[-1]))
                low = float(np.nanmin(run[steps <= cut]))
                feat = 0.0
                if 1.0 - low / run[0] > 0.05:
                    t = int(steps[np.flatnonzero(run <= low)[0]])
                    t_hat = hc._first_below(c[key], low)
                    feat = 0.0 if t_hat is None else math.log(max(t, 1) / max(t_hat, 1))
                kern = dict(kind=kind, pilot=feat, **hl._cell_features(c, key, "tangent_loss"))
                rows += [dict(r, kernel=kern, cell=ck,
                              known=r["T"] is not None and r["T"] <= cut)
                         for r in hf_target_rows(name, c, key)]  # fmt: skip
        for label, extra in (("round 6's", hk.VARIANTS["conv"]), ("+ the prefix's", EXTRA)):
            res = hl._cand_loto(rows, extra, q=0.06)
            err = [0.0 if r["known"] else e["err"] for e, r in zip(res, rows)]
            by = {k: [e for e, r in zip(err, rows) if r["kernel"]["kind"] == k] for k in hk.KINDS}
            lines.append(f"| {frac:.0%} | {label} | {_fmt(err)} | {_fmt(by['text'])} | "
                         f"{_fmt(by['image'])} | {sum(r['known'] for r in rows)} |")
    OUT.mkdir(parents=True, exist_ok=True)
    PREFIX.write_text(json.dumps(lines, indent=1))
    print("\n".join(lines))
    return lines


VARIANTS_AFTER = OUT / "variants.json"


def variants_after() -> list[str]:
    """After the round (development only, nothing adopted): the pilot column against one per
    loss and one clipped to [-0.4, 0.4], left out over twenty-eight tasks (this round's four
    now among them); goal cells with a = 1 without momentum left out. Saved to
    ``results/holdout_hybrid/variants.json``; the report shows it."""
    from headbody import _fmt

    cells = dev_cells()
    for name, cfg in TASKS.items():
        state = json.loads((OUT / f"{name}.json").read_text())
        cells[name] = (state["cells"], "hb_loss", cfg["kind"], cfg["num_samples"])
    cal = json.loads((OUT / "calibration.json").read_text())
    rows = hc.pilot_rows(cells, cal["pilot"], cal["drop"])
    for r in rows:
        r["kernel"] = dict(r["kernel"], ce=float(r["loss"] == "ce"))
    hl.TASK_FEATURES.update({
        "pilot, MSE": lambda k: k["pilot"] * (1.0 - k["ce"]),
        "pilot, CE": lambda k: k["pilot"] * k["ce"],
        "pilot, clipped": lambda k: float(np.clip(k["pilot"], -0.4, 0.4)),
    })  # fmt: skip
    conv = hk.VARIANTS["conv"]
    goal = [(loss, d) for loss in ho.LOSSES for d in (0.5, 0.8)]
    lines = [f"| columns ({len(rows)} targets, {len(cells)} tasks) | median estimate | text "
             "tasks | image tasks | band covers: text / image | "
             + " | ".join(f"{loss.upper()} {d:.0%}" for loss, d in goal) + " |",
             "|---|---|---|---|---|" + "---|" * len(goal)]  # fmt: skip
    for label, extra in (("round 6's", conv), ("+ pilot (round 7's)", (*conv, "pilot")),
                         ("+ pilot per loss", (*conv, "pilot, MSE", "pilot, CE")),
                         ("+ pilot clipped", (*conv, "pilot, clipped"))):
        res = hl._cand_loto(rows, extra, q=cal["level"])
        s = _summary(rows, res)
        cells_ = [_fmt([e["err"] for e, r in zip(res, rows) if (r["loss"], r["drop"]) == g
                        and (r["a"], r["m"]) != (1, 0)]) for g in goal]  # fmt: skip
        lines.append(f"| {label} | {s['err']} | {s['kind_err']['text']} | "
                     f"{s['kind_err']['image']} | {s['cover']['text']:.1%} / "
                     f"{s['cover']['image']:.1%} | " + " | ".join(cells_) + " |")  # fmt: skip
    VARIANTS_AFTER.write_text(json.dumps(lines, indent=1))
    print("\n".join(lines))
    return lines


def hf_target_rows(name: str, c: dict, key: str) -> list[dict]:
    import holdout_features as hf

    return hf._target_rows(name, c, key, "tangent_loss", ho.targets)


# ---------------------------------------------------------------------------------------
# The fresh tasks.
# ---------------------------------------------------------------------------------------

FORTUNES6 = ("art", "drugs", "kids", "literature")
FORTUNES7 = ("people", "riddles", "news")
CHESS = tuple(f"left0{i}.jpg" for i in range(2, 10))
MISC = ("aero1.jpg", "gradient.png", "mask.png", "templ.png", "tmpl.png", "left.jpg")


def _fortunes6() -> tuple[list[str], np.ndarray, list[str]]:
    return hl._fortunes(FORTUNES6)


def _fortunes7() -> tuple[list[str], np.ndarray, list[str]]:
    return hl._fortunes(FORTUNES7)


def _chess(n: int, size: int, seed: int):
    """Crops of eight of OpenCV's chessboard calibration photographs."""
    return hl._crops([ho._opencv_dir() / f for f in CHESS], n, size, seed)


def _misc(n: int, size: int, seed: int):
    """Crops of six OpenCV images no task used."""
    return hl._crops([ho._opencv_dir() / f for f in MISC], n, size, seed)


TASKS = {
    "fortunes6-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                             num_classes=4, texts=_fortunes6),
    "fortunes7-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                             num_classes=3, texts=_fortunes7),
    "chess-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                        projection=4096, num_classes=8, images=_chess),
    "misc-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                       projection=4096, num_classes=6, images=_misc),
}  # fmt: skip


def _pilot_of(c: dict, fc):
    """``tl.Pilot.from_run`` of a stored full-batch cell: its real run (logged at every
    step) up to one step past its first loss at the pilot's drop (where
    ``tl.measure_pilot``'s run stops: ``finetune(stop_below=)``) as a ``TrainingRun``, and
    the library's forecast of it."""
    import tangentlab as tl
    from tangentlab.hybrid import PILOT_DROP

    steps, loss = np.asarray(c["run_steps"], dtype=np.int64), hl._arr(c["run_loss"])
    hit = np.flatnonzero(loss <= (1.0 - PILOT_DROP) * loss[0])
    if hit.size:
        steps, loss = steps[: hit[0] + 2], loss[: hit[0] + 2]
    run = tl.TrainingRun(
        steps=steps, loss=loss, accuracy=np.full(loss.size, np.nan), train_seconds=0.0,
        eval_seconds=0.0, wall_seconds=0.0, steps_done=int(steps[-1]),
        hyperparameters=dict(tl.SGD(c["lr"], momentum=c["momentum"]).hyperparameters(),
                             batch_size=None, num_samples=fc.hyperparameters["num_samples"],
                             log_every=1),
        optimizer=tl.SGD(c["lr"], momentum=c["momentum"]), loss_function=fc.loss_function,
    )  # fmt: skip
    return tl.Pilot.from_run(run, fc)


def library_part(name: str) -> dict:
    """``tl.forecast`` + ``Forecast.steps_interval`` on every stored cell of a fresh task,
    without and with the pilot (``<task>-library.json``, ``<task>-library-pilot.json``)."""
    cal = json.loads((OUT / "calibration.json").read_text())
    ho.TASKS.update(TASKS)
    state = json.loads((OUT / f"{name}.json").read_text())
    hb = ho._kernels(name)[2]
    fcs = {key: hl.rerun(hb, dict(c, hb_loss=[None] * (c["fc_steps"] + 1)))
           for key, c in state["cells"].items()}  # fmt: skip
    pilots = {loss: _pilot_of(state["cells"][f"{loss}-{cal['pilot']}"],
                              fcs[f"{loss}-{cal['pilot']}"]) for loss in ho.LOSSES}  # fmt: skip
    out: dict = {"": {}, "-pilot": {}}
    for key, c in state["cells"].items():
        fc = fcs[key]
        for tail, pilot in (("", None), ("-pilot", pilots[c["loss"]])):
            ivs = {}
            for d in ho.targets(c, "hb_loss"):
                iv = fc.steps_interval((1.0 - float(d)) * c["run_loss"][0], pilot=pilot)
                ivs[d] = dict(low=iv.low, median=iv.median, point=iv.point, high=iv.high,
                              trusted=iv.trusted, stabilized=iv.stabilized, note=iv.note)
            out[tail][key] = dict(intervals=ivs, diverges=bool(fc.diverges),
                                  stabilized=fc.method.get("stabilized"))  # fmt: skip
        print(f"[{name}] library {key}", flush=True)
    out["-pilot"]["pilots"] = {loss: dict(feature=p.feature, steps=p.steps, cost=p.cost,
                                          forecast_steps=p.forecast_steps, note=p.note)
                               for loss, p in pilots.items()}  # fmt: skip
    for tail, lib in out.items():
        (OUT / f"{name}-library{tail}.json").write_text(json.dumps(lib))
    return out


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------

SHOWN = ("tangent", "head-body", "prefix 10%", "library", "library + pilot")


def fresh_rows(name: str) -> list[dict]:
    """Scored rows of a fresh task (the pilot cells' own targets left out: the pilot ran
    them) with the library's intervals without (``lib``) and with the pilot
    (``lib_pilot``), and the 10% power-law prefix baseline."""
    cal = json.loads((OUT / "calibration.json").read_text())
    state = json.loads((OUT / f"{name}.json").read_text())
    lib = json.loads((OUT / f"{name}-library-pilot.json").read_text())
    rows = []
    for r in hc.library_rows(name, OUT, TASKS, {}):
        if r["cell"].endswith(cal["pilot"]):
            continue
        iv = lib[r["cell"]]["intervals"].get(f"{r['drop']:g}")
        r["lib_pilot"] = iv
        r["est"]["library + pilot"] = None if iv is None else iv["median"]
        pre = ho.targets(ho._with_curves(state["cells"][r["cell"]]), "prefix10_loss")
        r["est"]["prefix 10%"] = pre[f"{r['drop']:g}"]["T_hat"]
        rows.append(r)
    return rows


def _covered_by(rows: list[dict], which: str) -> str:
    inside = sum(hl._inside(dict(r, lib=r[which])) for r in rows)
    return f"{inside}/{len(rows)} ({inside / max(len(rows), 1):.0%})"


def report() -> None:
    from headbody import _fmt

    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: fresh_rows(k) for k in states}
    groups = hk._groups(per_task)
    pooled = groups[-1][1]
    first = next(iter(states.values()), {})
    cal = json.loads((OUT / "calibration.json").read_text())
    lines = [
        "## A hybrid steps interval: the estimate conditioned on one real pilot run "
        "(`benchmarks/holdout_hybrid.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --calibrate` (development), then `{COMMAND} --fetch && "
        f"{COMMAND} && {COMMAND} --library && {COMMAND} --report`. Chosen on twenty-four "
        "development tasks (the script's docstring; NOTE [pilot feature] in "
        "`tangentlab.hybrid`), then run once on four fresh tasks and reported as they came; "
        "grid, horizons (10x) and scoring of `holdout_fresh.py`. *library*: `tl.forecast` + "
        "`Forecast.steps_interval` on every stored cell (round 6's calibration, no training); "
        "*library + pilot*: the same with `pilot=tl.Pilot.from_run(...)` of the stored real run "
        f"of the cell `<loss>-{cal['pilot']}` to its {cal['drop']:.0%} drop, one per loss; "
        "*prefix 10%*: a power law fitted to the first 10% of each real run (issue 13's "
        "baseline for a hybrid). The pilot cells' own targets are left out of every column. "
        "Entries: median / p90 of |T̂' − T|/T (targets, misses); a miss counts as +∞. "
        f"Machine: {first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        "The choice, leave-one-task-out over the twenty-four development tasks (`--calibrate`;"
        f" frozen: the pilot `{cal['pilot']}` to {cal['drop']:.0%}, band level "
        f"{cal['level']:.2f}; cost: the pilots' sample-gradients over the whole grid's, median "
        "over tasks):",
        "",
        *cal["table"],
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(SHOWN) + " | interval covers: library | "
        "with the pilot |",
        "|---|---|---|" + "---|" * (len(SHOWN) + 2),
    ]  # fmt: skip
    for head, sel in hf_slices(groups):
        cells = [_fmt(hl._errors(sel, m)) for m in SHOWN]
        lines.append(f"| {head} | " + " | ".join(cells) + f" | {_covered_by(sel, 'lib')} | "
                     f"{_covered_by(sel, 'lib_pilot')} |")  # fmt: skip
    lines += ["", "Issue 13's goal cells (median / p90), by kind, all settings and with a = 1 "
              "without momentum (the edge of stability) left out:",
              "", "| kind | settings | method | MSE 50% | MSE 80% | CE 50% | CE 80% |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for head, rows in groups[-3:]:
        for label, keep in (("all", lambda r: True),
                            ("a = 1 with m = 0 left out", lambda r: (r["a"], r["m"]) != (1, 0))):
            for m in ("library", "library + pilot"):
                cells = [_fmt(hl._errors([r for r in rows if keep(r) and r["loss"] == loss
                                          and r["drop"] == d], m))
                         for loss in ho.LOSSES for d in (0.5, 0.8)]  # fmt: skip
                lines.append(f"| {head} | {label} | {m} | " + " | ".join(cells) + " |")
    if PREFIX.exists():
        lines += ["", "A hybrid on each run's own prefix instead of a pilot (`--prefix`, "
                  "development tasks only, leave-one-task-out; the prefix's log(T / T̂) at the "
                  "lowest loss it reached as the eleventh column):", "",
                  *json.loads(PREFIX.read_text())]  # fmt: skip
    if VARIANTS_AFTER.exists():
        lines += ["", "After the round (development only, nothing adopted; `--variants`): the "
                  "pilot column against one per loss and one clipped to [-0.4, 0.4], "
                  "leave-one-task-out over the twenty-eight tasks (this round's four among "
                  "them); the goal cells with a = 1 without momentum left out:", "",
                  *json.loads(VARIANTS_AFTER.read_text())]  # fmt: skip
    lines += ["", *_pilot_lines(states, cal), "", _trusted_line(pooled), "",
              hk._blowups(states, pooled, OUT), "", READING]
    write_section("holdout-hybrid", "\n".join(lines))
    print("\n".join(lines))


def hf_slices(groups):
    import holdout_features as hf

    return hf.slices({}, [], groups)


def _pilot_lines(states: dict, cal: dict) -> list[str]:
    """Per task and loss: the pilot's T, T̂, feature; its cost against the grid and the
    median cell."""
    lines = ["The pilots (library forecast of the pilot cell; cost = the pilot run's "
             "sample-gradients, to one step past its 50% drop, over all 24 cells' and over the "
             "median cell's):", "",
             "| task | loss | T (real, 50%) | T̂ | log(T / T̂) | cost: grid | cost: median cell |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, state in states.items():
        lib = json.loads((OUT / f"{name}-library-pilot.json").read_text())
        n = TASKS[name]["num_samples"]
        runs = [c["steps"] * (c["batch_size"] or n) for c in state["cells"].values()]
        for loss, p in lib["pilots"].items():
            t = p["cost"]
            lines.append(f"| {name} | {loss} | {p['steps']} | {p['forecast_steps']} | "
                         f"{p['feature']:+.2f}{' (' + p['note'] + ')' if p['note'] else ''} | "
                         f"{t / sum(runs):.1%} | {t / float(np.median(runs)):.2f}x |")
    return lines


def _trusted_line(pooled: list[dict]) -> str:
    from headbody import _fmt

    parts = []
    for label, which, m in (("library", "lib", "library"),
                            ("library + pilot", "lib_pilot", "library + pilot")):
        tr = [r for r in pooled if r[which] and r[which]["trusted"]]
        bad = [e > 0.25 for e in hl._errors(pooled, m)]
        others = [r for r in pooled if not (r[which] and r[which]["trusted"])]
        flagged = sum(b and not (r[which] and r[which]["trusted"]) for r, b in zip(pooled, bad))
        parts.append(f"{label}: {len(tr)} of {len(pooled)} trusted at "
                     f"{_fmt(hl._errors(tr, m))}, \"not trusted\" as a check for an error above "
                     f"25%: precision {flagged / max(len(others), 1):.0%}, recall "
                     f"{flagged / max(sum(bad), 1):.0%}")
    return "Trusted intervals: " + "; ".join(parts) + "."


READING = """**Reading** (the first and only run of these tasks, 2026-11-30; the pilot, the band
level and the library's coefficients were frozen, and committed, before they ran (54752fa);
the library code before its pass (c233a26); other work shared the machine, so the seconds
above are inflated). **The hybrid met issue 13's four goal cells pooled outside
the edge of stability**: with one real pilot per loss, and a = 1 without momentum left out,
MSE 50% 11% / 30%, MSE 80% 8% / 20%, CE 50% 12% / 30%, CE 80% 10% / 24% (the training-free
library: 17% / 41%, 13% / 29%, 10% / 27%, 9% / 26%, MSE 50% not met). Over all 243 targets
(the pilot cells' own left out) it scored 11% / 44% against 14% / 47% without the pilot,
and its interval covered 95% (96% without); it trusted 129 targets at 7% / 21% (without:
75 at 6% / 18%). The gain is where it was meant to be, on the convolutional bodies'
MSE targets (image tasks, MSE 50% 34% -> 23%, MSE 80% 26% -> 15%, MSE 90% 22% -> 11%); on
their CE targets it lost at the 50% drop (12% / 47% -> 24% / 59%: chess-lite0's CE pilot ran
1.8x faster than its forecast, log -0.59, and the cells did not follow it that far), and
the image tasks stayed short of the goals (17% / 44%). On the text tasks the pilot changed
little but the p90 (8% / 59% -> 7% / 25%, the fall on the cells at a = 1 without
momentum: without them both are at 3-9% / 11-21% per goal cell). The prefix
power law fitted to the first 10% of each run missed 201 of the 243 targets, so the hybrid
beats issue 13's 10% baseline by far; so does the training-free library. The pilots cost
0.8-3.5% of each task's 24-setting grid, but 0.5-2.4x the median setting's own run: a
pilot is for planning a sweep, not for forecasting one run. The training-free interval
stays the default; the pilot is an option (`tl.measure_pilot`, `--pilot`). This round
also scored the round-6 calibration a second time, fresh: 14% / 47% with no miss, covering
96% (text 98%, image 94%); text 8% / 59% (with a = 1 without momentum left out all four
goal cells met again: 7% / 18%, 3% / 14%, 9% / 21%, 8% / 21%), image 21% / 47% (Lite0 on
chessboard photographs 33% / 63%, Lite1 on assorted OpenCV images 16% / 30%). A calibrated
per-run prefix instead of a pilot did not help on the development tasks (`--prefix`:
15% / 80-85% either way). After the round, with these four tasks among twenty-eight
development tasks (`--variants`), a pilot column per loss did no better than the single
one (13% / 81% against 12% / 81%) and a clipped one lowered the p90 a little at a higher
median (13% / 75%): nothing adopted."""

def main() -> None:
    fr.round_main(__doc__, TASKS, OUT, calibrate=calibrate, report=report,
                  frozen=(OUT / "calibration.json").exists(),
                  library=library_part,
                  extra={"--prefix": ("the per-run prefix variant (development only)",
                                      prefix_variant),
                         "--variants": ("after the round: other pilot columns (development "
                                        "only)", variants_after)},
                  fetch=lambda: f"{hl.FORTUNES} {ho._opencv_dir()}")


if __name__ == "__main__":
    main()

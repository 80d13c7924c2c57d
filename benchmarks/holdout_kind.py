"""The steps interval with a band that depends on the kind of body (issue 13, round 6):
chosen on twenty development tasks, reported once on four fresh tasks.

    .venv/bin/python benchmarks/holdout_kind.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_kind.py --fetch        # where the fresh data is
    .venv/bin/python benchmarks/holdout_kind.py --task NAME    # one fresh task, resumable
    .venv/bin/python benchmarks/holdout_kind.py --library      # the library's intervals
    .venv/bin/python benchmarks/holdout_kind.py --report       # RESULTS.md section only

**Why.** After round 5, leave-one-task-out over all twenty tasks with the image and text
columns recomputed (``holdout_curves.py --candidates``; the first version of that table
had paired them with the wrong targets): the calibrated median estimate is 12% / 92% on the
ten text tasks (MiniLM: a transformer body) and 28% / 117% on the ten image tasks
(EfficientNet-Lite0/1: a convolutional body), and the round-5 band (level 6%) covers 88% of
the text tasks' targets but 76% of the image tasks': the pooled 82% hid a shortfall on
one kind and a band wider than needed on the other. On the text tasks, with a = 1 without
momentum left out, the goals of issue 13 were met in all four cells.

**The choice** (``--calibrate``; leave-one-task-out over the 1267 targets of the twenty
tasks, the benchmarks' stored curves): the round-5 columns (*curves*) against the same
plus an indicator of a convolutional trainable body (*conv*: in the library,
``compute_head_body_kernel`` records whether a trainable body weight belongs to a
convolution), each at band levels 3-7%. The rule, stated before anything was fitted: the
variant and level with the narrowest median log-width among those whose left-out band
covers at least 80% of the targets of each kind; ties by the lower median error. Frozen
(``results/holdout_kind/calibration.json``) and committed before any fresh data was
loaded; its coefficients, fitted on all twenty tasks, become
``tangentlab.forecast.STEPS_CALIBRATION``.

**Fresh tasks** (data no round used, chosen before any of it was looked at; the examples'
networks; N, grid, horizons (10x), drops and scoring of ``holdout_fresh.py``):

- ``fortunes4-minilm``: which of three other files of Debian's fortune cookies (politics,
  work, wisdom) a fortune comes from, MiniLM-L6 at 16 tokens;
- ``fortunes5-minilm``: the same with four more (pets, medicine, songs-poems, platitudes);
- ``pics-lite0``: 64-px crops of OpenCV's six shape test pictures (pic1-pic6), which one a
  crop comes from, EfficientNet-Lite0 at 32 px;
- ``marks-lite1``: 64-px crops of eight logos, documents and calibration photographs no
  task used (OpenCV's LinuxLogo, WindowsLogo, opencv-logo, text_defocus, ela_original,
  left01 and detect_blob; scikit-image's chessboard_RGB; none the other view of a used
  pair), which one a crop comes from, EfficientNet-Lite1 at 32 px.

``--library`` then reruns ``tl.forecast`` and ``Forecast.steps_interval`` on every stored
cell (what a user gets). Results: ``benchmarks/results/holdout_kind/`` and the
"holdout-kind" section of RESULTS.md.
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
import holdout_features as hf  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import holdout_limit as hl  # noqa: E402
from _common import write_section  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_kind")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_kind.py"

# ---------------------------------------------------------------------------------------
# The choice (development only).
# ---------------------------------------------------------------------------------------

VARIANTS = {"curves": hc.EXTRAS["curves"], "conv": (*hc.EXTRAS["curves"], "image")}
LEVELS = (0.03, 0.04, 0.05, 0.06, 0.07)
KINDS = ("text", "image")
NCOLS = 10  # steps_features: nine columns + [convolutional body]
RHO_COLS = (5, 8)  # log ρ and ρ50: dropped by the "no ρ" fit
BAND_DROP = 6  # log T̂: the median's only


def _x(r: dict, extra: tuple = VARIANTS["conv"]) -> np.ndarray:
    """The ten columns of ``tangentlab.forecast.steps_features`` for a development row
    (the variant's columns; the others 0)."""
    x = np.zeros(NCOLS)
    x[: 7 + len(extra)] = hl._cand_x(r, extra)
    return x


def fit(rows: list[dict], extra: tuple, level: float, *, rho: bool = True, xf=None,
        ncols: int = NCOLS) -> dict:  # fmt: skip
    """Quantile fits (level, 50%, 1 − level) of log(T / T̂) over the variant's columns
    (``xf(row, extra)``: the ``ncols`` columns of a row, default ``_x``)."""
    xf = _x if xf is None else xf
    cols = list(range(7 + len(extra)))
    if not rho:
        cols = [i for i in cols if i not in RHO_COLS]
    band = [i for i in cols if i != BAND_DROP]
    ok = [r for r in rows if r["hb"] is not None]
    x = np.stack([xf(r, extra) for r in ok])
    y = np.array([math.log(r["T"] / r["hb"]) for r in ok])
    out = {}
    for k, cc, q in (("mid", cols, 0.5), ("lo", band, level), ("hi", band, 1 - level)):
        out[k] = np.zeros(ncols)
        out[k][cc] = hf.quantile_fit(x[:, cc], y, q)
    return out


def loto(rows: list[dict], extra: tuple, level: float) -> list[dict]:
    """Leave one task out, in the order of ``rows``: error, inside the band, width."""
    from tangentlab.forecast import STEPS_TRUST_WIDTH

    out: list[dict] = [{} for _ in rows]
    for held in sorted({r["task"] for r in rows}):
        w = fit([r for r in rows if r["task"] != held], extra, level)
        for i in (i for i, r in enumerate(rows) if r["task"] == held):
            r = rows[i]
            if r["hb"] is None:
                out[i] = dict(err=math.inf, inside=False, width=math.inf, trusted=False)
                continue
            x, lr = _x(r, extra), math.log(r["T"] / r["hb"])
            mid, lo, hi = x @ w["mid"], x @ w["lo"], x @ w["hi"]
            lo, hi = min(lo, mid), max(hi, mid)
            out[i] = dict(err=abs(math.exp(mid - lr) - 1), inside=lo - 1e-9 <= lr <= hi + 1e-9,
                          width=hi - lo, trusted=hi - lo <= STEPS_TRUST_WIDTH)  # fmt: skip
    return out


def _summary(rows: list[dict], res: list[dict]) -> dict:
    kind = {k: [e for e, r in zip(res, rows) if r["kernel"]["kind"] == k] for k in KINDS}
    width = [e["width"] for e in res if math.isfinite(e["width"])]
    return dict(
        err=_fmt([e["err"] for e in res]),
        cover={k: float(np.mean([e["inside"] for e in v])) for k, v in kind.items()},
        kind_err={k: _fmt([e["err"] for e in v]) for k, v in kind.items()},
        kind_width={k: float(np.median([e["width"] for e in v if math.isfinite(e["width"])]))
                    for k, v in kind.items()},  # fmt: skip
        width=float(np.median(width)), median=float(np.median([e["err"] for e in res])),
        trusted=_fmt([e["err"] for e in res if e["trusted"]]),
        n_trusted=sum(e["trusted"] for e in res),
    )


def calibrate() -> dict:
    """Every variant and level left-out (table), the rule's choice, its coefficients."""
    rows = hc.pilot_rows(hc._all_cells())
    lines = [
        f"| variant, band level | median estimate ({len(rows)} targets) | text tasks | "
        "image tasks | band covers: text / image | median log-width: all (text / image) | "
        "trusted: targets, error |",
        "|---|---|---|---|---|---|---|",
    ]
    best = None
    for name, extra in VARIANTS.items():
        for level in LEVELS:
            s = _summary(rows, loto(rows, extra, level))
            ok = all(s["cover"][k] >= 0.8 for k in KINDS)
            lines.append(
                f"| {name}, {level:.2f} | {s['err']} | {s['kind_err']['text']} | "
                f"{s['kind_err']['image']} | {s['cover']['text']:.1%} / "
                f"{s['cover']['image']:.1%}{'' if ok else ' ✗'} | {s['width']:.2f} "
                f"({s['kind_width']['text']:.2f} / {s['kind_width']['image']:.2f}) | "
                f"{s['n_trusted']}: {s['trusted']} |")  # fmt: skip
            if ok and (best is None or (s["width"], s["median"]) < best[0]):
                best = ((s["width"], s["median"]), name, level)
    _, name, level = best
    extra = VARIANTS[name]
    coef = fit(rows, extra, level)
    coef.update({f"{k}_no_rho": v for k, v in fit(rows, extra, level, rho=False).items()})
    out = dict(variant=name, level=level, table=lines,
               coef={k: np.round(v, 4).tolist() for k, v in coef.items()})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines))
    print(f"chosen: {name} at level {level}")
    print(json.dumps(out["coef"]))
    return out


# ---------------------------------------------------------------------------------------
# The fresh tasks.
# ---------------------------------------------------------------------------------------

FORTUNES4 = ("politics", "work", "wisdom")
FORTUNES5 = ("pets", "medicine", "songs-poems", "platitudes")
PICS = tuple(f"pic{i}.png" for i in range(1, 7))
MARKS_OCV = ("LinuxLogo.jpg", "WindowsLogo.jpg", "opencv-logo.png", "text_defocus.jpg",
             "ela_original.jpg", "left01.jpg", "detect_blob.png")  # fmt: skip
MARKS_SKIMAGE = ("chessboard_RGB.png",)


def _fortunes4() -> tuple[list[str], np.ndarray, list[str]]:
    return hl._fortunes(FORTUNES4)


def _fortunes5() -> tuple[list[str], np.ndarray, list[str]]:
    return hl._fortunes(FORTUNES5)


def _pics(n: int, size: int, seed: int):
    """Crops of OpenCV's six shape test pictures."""
    return hl._crops([ho._opencv_dir() / f for f in PICS], n, size, seed)


def _marks(n: int, size: int, seed: int):
    """Crops of eight logos, documents and calibration photographs (OpenCV, scikit-image)."""
    files = [ho._opencv_dir() / f for f in MARKS_OCV]
    files += [fr._skimage_dir() / f for f in MARKS_SKIMAGE]
    return hl._crops(files, n, size, seed)


TASKS = {
    "fortunes4-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                             num_classes=3, texts=_fortunes4),
    "fortunes5-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                             num_classes=4, texts=_fortunes5),
    "pics-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                       projection=4096, num_classes=6, images=_pics),
    "marks-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                        projection=4096, num_classes=8, images=_marks),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------

SHOWN = ("tangent", "head-body", "round 5", "round 6", "library")


def fresh_rows(name: str) -> list[dict]:
    """``holdout_features.scored`` rows of a fresh task: the library's intervals, and the
    median estimates of the round-5 and the frozen round-6 calibrations on the benchmark's
    own curves."""
    old = json.loads((hc.OUT / "calibration.json").read_text())["coef"]
    new = json.loads((OUT / "calibration.json").read_text())["coef"]
    return hc.library_rows(name, OUT, TASKS, {"round 5": (hc._x, old), "round 6": (_x, new)})


def _groups(per_task: dict) -> list[tuple[str, list[dict]]]:
    pooled = [r for rows in per_task.values() for r in rows]
    kinds = [(f"**{k} tasks**", [r for r in pooled if r["kernel"]["kind"] == k]) for k in KINDS]
    return [*per_task.items(), *kinds, ("**all fresh**", pooled)]


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: fresh_rows(k) for k in states}
    groups = _groups(per_task)
    pooled = groups[-1][1]
    first = next(iter(states.values()), {})
    cal = json.loads((OUT / "calibration.json").read_text())
    lines = [
        "## The steps interval with a band per kind of body (`benchmarks/holdout_kind.py`, "
        "issue 13)",
        "",
        f"Command: `{COMMAND} --calibrate` (development), then `{COMMAND} --fetch && "
        f"{COMMAND} && {COMMAND} --library && {COMMAND} --report`. Chosen on twenty "
        "development tasks (the script's docstring; NOTE [steps interval] in "
        "`tangentlab.forecast`), then run once on four fresh tasks and reported as they came; "
        "grid, horizons (10x) and scoring of `holdout_fresh.py`. *round 5*: the previous "
        "calibration (seventeen tasks, nine columns) on the stored curves; *round 6*: the "
        "frozen one on the stored curves; *library*: `tl.forecast` + "
        "`Forecast.steps_interval` on every stored cell (what a user gets). Entries: median "
        "/ p90 of |T̂' − T|/T (targets, misses); a miss counts as +∞. "
        f"Machine: {first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        "The choice, leave-one-task-out over the twenty development tasks "
        f"(`--calibrate`; frozen: *{cal['variant']}* at level {cal['level']:.2f}; ✗: a kind "
        "covered below 80%):",
        "",
        *cal["table"],
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(SHOWN) + " | interval covers |",
        "|---|---|---|" + "---|" * (len(SHOWN) + 1),
    ]  # fmt: skip
    for head, sel in hf.slices({}, [], groups):
        cells = [_fmt(hl._errors(sel, m)) for m in SHOWN]
        lines.append(f"| {head} | " + " | ".join(cells) + f" | {hl._covered(sel)} |")
    lines += ["", "Issue 13's goal cells through the library (median / p90), by kind, all "
              "settings and with a = 1 without momentum (the edge of stability) left out:", "",
              "| kind | settings | MSE 50% | MSE 80% | CE 50% | CE 80% |",
              "|---|---|---|---|---|---|"]
    for head, rows in groups[-3:-1]:
        for label, keep in (("all", lambda r: True),
                            ("a = 1 with m = 0 left out", lambda r: (r["a"], r["m"]) != (1, 0))):
            cells = [_fmt(hl._errors([r for r in rows if keep(r) and r["loss"] == loss
                                      and r["drop"] == d], "library"))
                     for loss in ho.LOSSES for d in (0.5, 0.8)]  # fmt: skip
            lines.append(f"| {head} | {label} | " + " | ".join(cells) + " |")
    trusted = [r for r in pooled if r["lib"] and r["lib"]["trusted"]]
    others = [r for r in pooled if not (r["lib"] and r["lib"]["trusted"])]
    bad = [e > 0.25 for e in hl._errors(pooled, "library")]
    flagged = sum(b and not (r["lib"] and r["lib"]["trusted"]) for r, b in zip(pooled, bad))
    kinds_trusted = ", ".join(
        f"{head.strip('*')} {sum(bool(r['lib'] and r['lib']['trusted']) for r in rows)}"
        for head, rows in groups[-3:-1])  # fmt: skip
    lines += [
        "",
        f"Trusted intervals (library): {len(trusted)} of {len(pooled)} targets "
        f"({kinds_trusted}) at {_fmt(hl._errors(trusted, 'library'))}, the others "
        f"{_fmt(hl._errors(others, 'library'))}; \"not trusted\" as a check for an error "
        f"above 25%: precision {flagged / max(len(others), 1):.0%}, recall "
        f"{flagged / max(sum(bad), 1):.0%}.",
        "",
        _blowups(states, pooled),
        "",
        READING,
    ]
    write_section("holdout-kind", "\n".join(lines))
    print("\n".join(lines))


def _blowups(states: dict, pooled: list[dict], out_dir: Path = OUT) -> str:
    """Targets the library's forecasts blew up before, reached, stabilized, held (the
    fresh states of ``out_dir``)."""
    missed, reached, rescued = hl._diverging(states, out_dir)
    st = [r for r in pooled if r["lib"] and r["lib"]["stabilized"]]
    inside = sum(hl._inside(r) for r in st)
    return (f"Blow-ups (library): the head-exact forecasts blew up before {missed} targets; "
            f"the real runs reached {reached} of them, {rescued} got a stabilized interval, "
            f"{inside} of the {len(st)} stabilized intervals held the real steps.")


READING = """**Reading** (the first and only run of these tasks, 2026-11-30; the choice and the
library's coefficients were frozen, and committed, before they ran). **Through the library
the round went better than any before**: median estimate 10% / 83% over 253 targets with 4
misses (round 5: 17% / 89%, round 4: 29% / 115%, round 3: 16% / 133%), against 100% / 402%
for the head-exact T̂ and 420% / miss for the tangent model; the interval covered 94% (text
98%, image 91%). **On the two text tasks (MiniLM) issue 13's goals were met**, as the
development tasks said they would be outside the edge of stability: 8% / 23% over their
133 targets, and with a = 1 without momentum left out all four goal cells (MSE 50% 10% /
23%, MSE 80% 5% / 18%, CE 50% 5% / 11%, CE 80% 7% / 19%); with it, MSE's p90 fails (47%
and 65%). Their intervals were trusted for 94 targets, at 7% / 16%. **On the two image
tasks (EfficientNet-Lite0/1) they were not**: 25% / 115%; the band, widened for
convolutional bodies as chosen, covered 91% of their targets and trusted none. Lite1 on
logos and documents was fair (22% / 50%); Lite0 on OpenCV's shape pictures was off again
(43% / 125%, real runs 1.4x faster than the median estimate: median log(T / estimate)
-0.34), the same direction and size as one image task in every round since round 3. On the
same stored curves the frozen round-6 coefficients scored 11% / 92% against 16% / 97% for
round 5's: the refit on twenty tasks lowered the median. Pooled, only CE at the 50% drop
met the goals (6% / 21%; MSE 50% 22% / 41%, MSE 80% 8% / 113%, CE 80% 8% / 40%). The
blow-ups: 39 targets, 6 reached by the real runs, 5 of them inside their stabilized
interval. What is left is the convolutional bodies' per-task offset: no feature known
before training has explained it (RESULTS.md "holdout-curves": the curve features, task
statistics and a line probe; a short real pilot run helps a little)."""


def main() -> None:
    fr.round_main(__doc__, TASKS, OUT, calibrate=calibrate, report=report,
                  library=lambda name: hl.library_part(name, OUT, TASKS),
                  fetch=lambda: f"{hl.FORTUNES} {ho._opencv_dir()} {fr._skimage_dir(fetch=True)}")


if __name__ == "__main__":
    main()

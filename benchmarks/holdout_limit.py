"""Forecasts that diverge at the stability limit (issue 13): a stabilized estimate, chosen
on seventeen development tasks, reported once on three fresh tasks.

    .venv/bin/python benchmarks/holdout_limit.py --collect      # dev: the library's reruns
    .venv/bin/python benchmarks/holdout_limit.py --calibrate    # the choice, on the dev tasks
    .venv/bin/python benchmarks/holdout_limit.py --fetch        # where the fresh data is
    .venv/bin/python benchmarks/holdout_limit.py --task NAME    # one fresh task, resumable
    .venv/bin/python benchmarks/holdout_limit.py --library      # the library's intervals
    .venv/bin/python benchmarks/holdout_limit.py --report       # RESULTS.md section only

**Why.** 13 of the 14 misses of ``holdout_features.py``'s fresh round, and 28 of the 41 of
its development tasks, are head-exact forecasts of plain SGD at a = 1 of the stability
limit that blow up (the head x body growth pushes the model's sharpness past 2 / η) while
the real network spikes, recovers and reaches the target (edge of stability). A miss counts
as a failure, and no calibration of T̂ repairs a forecast that has none. ``holdout_eos.py``
measured a way out on seven development tasks: rerun the forecast at c·lr for the largest c
in 0.7, 0.5, 0.35, 0.25 that does not diverge, and rescale its steps by c (the real run at
the limit progresses like a stable one); 23 of 25 missed targets got an estimate, but
2.3x too slow at the median. This round calibrates that estimate like the steps interval
(quantile regressions of log(T / c·T̂_c)) and reports it on tasks nobody used.

**What the library does** (NOTE [stabilized estimate] in ``tangentlab.forecast``): a
head-exact forecast of a constant SGD rate that blows up carries ``Forecast.stabilized``
(the rerun at c·lr over ceil(T / c) steps), and
``Forecast.steps_interval`` reads its steps when the forecast itself diverges before the
target.

**Development set** (``--collect``): every cell of the seventeen development tasks whose
stored head-exact forecast blows up (``holdout.py``'s four at 10x horizons, the four of
``holdout_fresh.py``, the three of ``holdout_depth.py``, the three of
``holdout_features.py``; the examples' cells never miss): ``tl.forecast`` of the task's
head-exact kernel with the cell's settings, and per drop (50 / 80 / 90% of the real run's
initial loss) the real run's steps T (or unreached), the forecast's T̂ (None: diverged
first), c, the stabilized steps T̂_c (and, in the stored rows, its tangent reference's
steps: the collection ran while the rerun still had one; the choice does not use them). Saved as
``results/holdout_limit/dev.json``.

**The choice** (``--calibrate``, leave-one-task-out over the 45 development targets the
real runs reached and the diverging forecasts missed, nine tasks): quantile regressions of
log(T / c·T̂_c) on a constant, on the target's depth (hat functions at 50 / 80 / 90%), or on
the depth and log c, at levels 5-15%; frozen: per depth at 7% / 93% (the lowest left-out
error whose band reached 80%: 44% / 99%, 36 of 45 covered, median log-width 2.08), the
coefficients in ``tangentlab.forecast.STABILIZED_CALIBRATION``. Of the 130 targets those
forecasts missed, the real runs reached 45.

**Fresh tasks** (data no round used, chosen before any of it was looked at; the examples'
networks; N, grid, horizons (10x), drops and scoring of ``holdout_fresh.py``):

- ``fortunes-minilm``: which of four files of Debian's fortune cookies (package
  ``fortunes``: computers, love, science, sports) a fortune comes from, MiniLM-L6 at 16
  tokens;
- ``scenetext-lite0``: 64-px crops of OpenCV's six street photographs with text
  (``examples/text/scenetext0[1-6].jpg``), which one a crop comes from, EfficientNet-Lite0
  at 32 px;
- ``samples-lite1``: crops of eight photographs no task used (scikit-learn's china and
  flower; scikit-image's camera, clock_motion, microaneurysms and horse; OpenCV's aloeL and
  alphamat plant), EfficientNet-Lite1 at 32 px.

``--library`` then reruns ``tl.forecast`` and ``Forecast.steps_interval`` on every stored
cell (what a user gets, stabilized rerun included).

Results: ``benchmarks/results/holdout_limit/`` and the "holdout-limit" section of
RESULTS.md.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_depth as hd  # noqa: E402
import holdout_features as hf  # noqa: E402
import holdout_fresh as fr  # noqa: E402
from _common import write_section  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "holdout_limit")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/holdout_limit.py"
DEV_ROUNDS = (("holdout", ho.TASKS, hf.HOLDOUT4), ("holdout_fresh", fr.TASKS, None),
              ("holdout_depth", hd.TASKS, None), ("holdout_features", hf.TASKS, None))


# ---------------------------------------------------------------------------------------
# Fresh tasks (data no round used; chosen before any of it was looked at).
# ---------------------------------------------------------------------------------------

FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("computers", "love", "science", "sports")
SCENETEXT = ("scenetext01.jpg", "scenetext02.jpg", "scenetext03.jpg", "scenetext04.jpg",
             "scenetext05.jpg", "scenetext06.jpg")  # fmt: skip


def _fortunes(files: tuple[str, ...] = FORTUNE_FILES) -> tuple[list[str], np.ndarray, list[str]]:
    """Debian's fortune cookies (package ``fortunes``): which of ``files`` a fortune comes
    from."""
    if not (FORTUNES / files[0]).exists():
        raise SystemExit("holdout: Debian's fortunes not found; apt-get install fortunes")
    texts, labels = [], []
    for k, f in enumerate(files):
        raw = (FORTUNES / f).read_text(encoding="utf-8", errors="replace")
        for t in raw.split("\n%\n"):
            t = " ".join(t.split())
            if t:
                texts.append(t)
                labels.append(k)
    return texts, np.array(labels), list(files)


def _opencv_examples() -> Path:
    return ho._opencv_dir().parent  # .../examples: data/, text/, alphamat/


def _crops(files: list[Path], n: int, size: int, seed: int, *,
           fetch: str = "holdout.py --fetch and holdout_fresh.py --fetch"):  # fmt: skip
    """64-px crops of ``files`` at ``size`` px (which file a crop comes from); a missing
    file stops the script with the ``fetch`` commands that bring it."""
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"{Path(sys.argv[0]).name}: missing {missing}; run {fetch}")
    crops, labels = ho.random_crops(Path("/"), [str(f) for f in files], n, seed)
    x = torch.as_tensor(crops.transpose(0, 3, 1, 2).copy())
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    return ((x - 127.0) / 128.0).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def _scenetext(n: int, size: int, seed: int):
    """Crops of OpenCV's six street photographs with text (examples/text/scenetext0*.jpg)."""
    return _crops([_opencv_examples() / "text" / f for f in SCENETEXT], n, size, seed)


def _samples(n: int, size: int, seed: int):
    """Crops of eight photographs from three libraries no task used: scikit-learn's china
    and flower, scikit-image's camera, clock_motion, microaneurysms and horse, OpenCV's
    aloeL and alphamat plant."""
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    si = fr._skimage_dir()
    ex = _opencv_examples()
    files = [sk / "china.jpg", sk / "flower.jpg", si / "camera.png", si / "clock_motion.png",
             si / "microaneurysms.png", si / "horse.png", ex / "data" / "aloeL.jpg",
             ex / "alphamat" / "input_images" / "plant.jpg"]  # fmt: skip
    return _crops(files, n, size, seed, fetch="holdout_depth.py --fetch and holdout.py --fetch")


TASKS = {
    "fortunes-minilm": dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                            num_classes=4, texts=_fortunes),
    "scenetext-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                            projection=4096, num_classes=6, images=_scenetext),
    "samples-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                          projection=4096, num_classes=8, images=_samples),
}  # fmt: skip


def _arr(v: list) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def dev_cells() -> list[tuple[str, str, dict]]:
    """(task, key, cell with ``hb_loss`` at the round's horizon) of every development cell
    whose stored head-exact forecast blows up (NaN in its curve)."""
    import holdout_pilot as hp

    out = []
    for sub, tasks, names in DEV_ROUNDS:
        ho.TASKS.update(tasks)
        names = names or sorted(p.stem for p in (ho.OUT.parent / sub).glob("*.json")
                                if not p.stem.endswith("-library"))  # fmt: skip
        for name in names:
            if sub == "holdout":
                state = json.loads((hp.OUT / f"{name}.json").read_text())
                cells = {c["key"]: dict(c, hb_loss=list(c["hb10_loss"]))
                         for c in hp._scored(name, state)}  # fmt: skip
            else:
                cells = json.loads((ho.OUT.parent / sub / f"{name}.json").read_text())["cells"]
            for key, c in cells.items():
                if np.isnan(_arr(c["hb_loss"])).any():
                    out.append((name, key, c))
    return out


def rerun(hb, c: dict):
    """``tl.forecast`` of the head-exact kernel with the cell's settings and horizon."""
    import tangentlab as tl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), len(c["hb_loss"]) - 1,
                           loss=c["loss"], batch_size=c["batch_size"], seed=ho.SEED)  # fmt: skip


def target_rows(task: str, key: str, c: dict, fc) -> list[dict]:
    """Per drop: the real steps T (None: unreached), T̂, c, T̂_c, its tangent steps."""
    tg = ho.targets(c, "hb_loss")
    st = fc.stabilized
    factor = None if st is None else fc.method["stabilized"]["factor"]
    out = []
    for d, t in tg.items():
        eps = (1.0 - float(d)) * c["run_loss"][0]
        t_c = t_tan = None
        if st is not None:
            t_c = st.steps_to(eps)
            hit = np.flatnonzero(st.reference_loss <= eps) if st.reference_loss is not None else []
            t_tan = int(hit[0]) if len(hit) else None
        out.append(dict(task=task, cell=key, loss=c["loss"], drop=float(d), m=c["momentum"],
                        a=c["lr_factor"], B=c["batch_size"] or 0,
                        T=None if t["status"] == "unreached" else t["T"],
                        hb=fc.steps_to(eps), factor=factor, t_c=t_c, t_tan=t_tan,
                        horizon_c=None if st is None else len(st.loss) - 1,
                        stability_c=None if st is None else st.stability,
                        diverged_run=bool(c.get("diverged_run", False))))  # fmt: skip
    return out


def collect(rounds: list[str] | None = None) -> list[dict]:
    """Rerun every diverging development cell through the library (resumable: one file per
    task in ``OUT / "dev"``); the rows of all tasks go to ``OUT / "dev.json"``."""
    done_dir = OUT / "dev"
    done_dir.mkdir(parents=True, exist_ok=True)
    todo: dict[str, list] = {}
    for name, key, c in dev_cells():
        todo.setdefault(name, []).append((key, c))
    for name, cells in todo.items():
        path = done_dir / f"{name}.json"
        if path.exists() or (rounds and not any(name in r for r in rounds)):
            continue
        hb, rows = ho._kernels(name)[2], []
        for key, c in cells:
            fc = rerun(hb, c)
            rows += target_rows(name, key, c, fc)
            print(f"[{name}] {key}: diverges at {fc.divergence_step}, "
                  f"c = {fc.method.get('stabilized')}", flush=True)
        path.write_text(json.dumps(rows))
    rows = [r for name in todo if (done_dir / f"{name}.json").exists()
            for r in json.loads((done_dir / f"{name}.json").read_text())]  # fmt: skip
    (OUT / "dev.json").write_text(json.dumps(rows))
    return rows


# ---------------------------------------------------------------------------------------
# The choice (development tasks only).
# ---------------------------------------------------------------------------------------

LEVELS = (0.05, 0.07, 0.10, 0.15)
KIND, LEVEL = "drop", 0.07  # frozen (the docstring); tangentlab.forecast.STABILIZED_CALIBRATION


def stabilized_rows(rows: list[dict]) -> list[dict]:
    """The targets the real run reaches and the forecast, diverging first, does not."""
    return [r for r in rows if r["T"] is not None and r["hb"] is None]


def _design(r: dict, kind: str) -> np.ndarray:
    from tangentlab.forecast import steps_features

    if kind == "const":
        return np.ones(1)
    x = steps_features(r["drop"], momentum=r["m"], fraction=r["a"], rho=None, steps=1.0)
    return x[:3] if kind == "drop" else np.concatenate([x[:3], [math.log(r["factor"])]])


def estimate(r: dict, kind: str, coef: dict | None) -> tuple[float, float, float] | None:
    """(median estimate, low, high) of the real steps, or None (no stabilized steps)."""
    if r["t_c"] is None or r["factor"] is None:
        return None
    base = r["factor"] * max(r["t_c"], 1)
    if kind == "raw":
        return base, base, base
    x = _design(r, kind)
    lo, mid, hi = (float(x @ coef[k]) for k in ("lo", "mid", "hi"))
    return base * math.exp(mid), base * math.exp(min(lo, mid)), base * math.exp(max(hi, mid))


def fit_stabilized(rows: list[dict], kind: str, level: float) -> dict:
    """Quantile regressions (level, 50%, 1 − level) of log(T / c·T̂_c) on ``kind``'s design."""
    rows = [r for r in rows if r["t_c"] is not None and r["factor"] is not None]
    x = np.stack([_design(r, kind) for r in rows])
    y = np.array([math.log(r["T"] / (r["factor"] * max(r["t_c"], 1))) for r in rows])
    return {k: hf.quantile_fit(x, y, q) for k, q in (("lo", level), ("mid", 0.5),
                                                     ("hi", 1 - level))}  # fmt: skip


def _loto(rows: list[dict], kind: str, level: float) -> list[dict]:
    out = []
    for task in sorted({r["task"] for r in rows}):
        coef = None if kind == "raw" else fit_stabilized(
            [r for r in rows if r["task"] != task], kind, level)  # fmt: skip
        for r in rows:
            if r["task"] == task:
                out.append(dict(r, est=estimate(r, kind, coef)))
    return out


def _summary(res: list[dict]) -> str:
    errs = [math.inf if r["est"] is None else abs(r["est"][0] - r["T"]) / r["T"] for r in res]
    inside = sum(r["est"] is not None and r["est"][1] <= r["T"] <= r["est"][2] for r in res)
    widths = [math.log(r["est"][2] / r["est"][1]) for r in res if r["est"] is not None]
    return (f"{_fmt(errs)}; band covers {inside}/{len(res)} ({inside / len(res):.0%}), "
            f"median log-width {np.median(widths) if widths else float('nan'):.2f}")


def calibrate() -> None:
    """Every variant, leave-one-task-out on the development tasks."""
    rows = [r for f in sorted((OUT / "dev").glob("*.json")) for r in json.loads(f.read_text())]
    cells = {(r["task"], r["cell"]) for r in rows}
    div = stabilized_rows(rows)
    print(f"{len(cells)} diverging cells of {len({r['task'] for r in rows})} tasks; "
          f"{sum(r['hb'] is None for r in rows)} targets the forecast misses, of which the "
          f"real run reaches {len(div)} ({sum(r['T'] is None and r['hb'] is None for r in rows)}"
          f" unreached); {sum(r['t_c'] is not None for r in div)} have a stabilized T̂_c")
    missed = [r for r in rows if r["hb"] is None]
    for d in (0.5, 0.8, 0.9):
        sel = [r for r in missed if r["drop"] == d]
        print(f"  {d:.0%} drop: the real run reaches {sum(r['T'] is not None for r in sel)} of "
              f"{len(sel)} targets the diverging forecast misses")
    factors = collections.Counter(r["factor"] for r in div)
    print(f"  c: {dict(sorted(factors.items(), key=str))}")
    y = [math.log(r["T"] / (r["factor"] * max(r["t_c"], 1))) for r in div if r["t_c"] is not None]
    print(f"  log(T / c T̂_c): median {np.median(y):.2f}, 10/90% "
          f"{np.quantile(y, 0.1):.2f} / {np.quantile(y, 0.9):.2f}")
    print(f"raw c·T̂_c: {_summary(_loto(div, 'raw', 0.1))}")
    for kind in ("const", "drop", "drop+c"):
        for level in LEVELS:
            print(f"{kind:7s} q={level:.2f}: {_summary(_loto(div, kind, level))}")
    from tangentlab.forecast import STABILIZED_CALIBRATION

    coef = fit_stabilized(div, KIND, LEVEL)
    print(f"frozen ({KIND}, q = {LEVEL}):", {k: np.round(v, 4).tolist() for k, v in coef.items()})
    print("library:", STABILIZED_CALIBRATION)


# ---------------------------------------------------------------------------------------
# After the round: candidates for the next one (development only, nothing adopted).
# ---------------------------------------------------------------------------------------

TASK_FEATURES = {
    "image": lambda k: float(k["kind"] == "image"),
    "log lambda/N": lambda k: math.log(k["lam_max_over_n"]),
    "head share": lambda k: k["head_share"],
    # per cell, read off the forecast curves before training (stored in r["kernel"] too)
    "hb 80/50": lambda k: k["accel"],
    "rho 50": lambda k: k["rho50"],
}


def _curve_steps(curve: list, frac: float) -> int | None:
    c = _arr(curve)
    hit = np.flatnonzero(c <= frac * c[0])
    return int(hit[0]) if hit.size else None


def _cell_features(c: dict, hb: str, tan: str) -> dict:
    """log(T̂(80%) / T̂(50%)) of the head-exact curve (how much it speeds up by itself) and
    log ρ at the 50% drop (the tangent curve's steps over it), on the forecasts' own L0."""
    horizon = len(c[hb]) - 1
    t50, t80 = _curve_steps(c[hb], 0.5), _curve_steps(c[hb], 0.2)
    tt50 = _curve_steps(c[tan], 0.5)
    accel = math.log((t80 or 2 * horizon) / max(t50 or 2 * horizon, 1))
    rho50 = math.log((tt50 or 2 * horizon) / max(t50 or 2 * horizon, 1))
    return dict(accel=accel, rho50=rho50)


def candidate_rows() -> list[dict]:
    """The per-configuration calibration's targets on every task with stored kernel
    statistics: the fourteen held-out tasks of the earlier rounds and this round's three
    (now development), each with its task-level statistics (``kind`` and the kernel's)."""
    rounds = [("holdout_fresh", fr.TASKS), ("holdout_depth", hd.TASKS),
              ("holdout_features", hf.TASKS), ("holdout_limit", TASKS)]  # fmt: skip
    rows = []
    import holdout_pilot as hp

    for name in hf.HOLDOUT4:
        state = json.loads((ho.OUT.parent / "holdout" / f"{name}.json").read_text())
        kern = dict(state["kernel"], kind=ho.TASKS[name]["kind"])
        for c in hp._scored(name, json.loads((hp.OUT / f"{name}.json").read_text())):
            cell = dict(kern, **_cell_features(c, "hb10_loss", "tangent_loss"))
            for r in hf._target_rows(name, c, "hb10_loss", "tangent_loss", ho.targets):
                rows.append(dict(r, kernel=cell))
    for sub, tasks in rounds:
        for name, cfg in tasks.items():
            path = ho.OUT.parent / sub / f"{name}.json"
            if not path.exists():
                continue
            state = json.loads(path.read_text())
            kern = dict(state["kernel"], kind=cfg["kind"])
            for c in state["cells"].values():
                cell = dict(kern, **_cell_features(c, "hb_loss", "tangent_loss"))
                for r in hf._target_rows(name, c, "hb_loss", "tangent_loss", ho.targets):
                    rows.append(dict(r, kernel=cell))
    return rows


def _cand_x(r: dict, extra: tuple) -> np.ndarray:
    return np.concatenate([hf.features(r), [TASK_FEATURES[e](r["kernel"]) for e in extra]])


def _cand_loto(rows: list[dict], extra: tuple, q: float = 0.07) -> list[dict]:
    """Leave one task out with the frozen variant's columns (median: all seven; band:
    without log T̂) plus the task-level features ``extra``."""
    n = 7 + len(extra)
    mid_cols = list(range(n))
    band_cols = [i for i in mid_cols if i != 6]
    out: list[dict] = [{} for _ in rows]  # in the order of ``rows`` (callers zip the two)
    for held in sorted({r["task"] for r in rows}):
        ok = [r for r in rows if r["task"] != held and r["hb"] is not None]
        x = np.stack([_cand_x(r, extra) for r in ok])
        y = np.array([math.log(r["T"] / r["hb"]) for r in ok])
        w = {}
        for k, cols, qq in (("mid", mid_cols, 0.5), ("lo", band_cols, q), ("hi", band_cols, 1 - q)):
            w[k] = np.zeros(n)
            w[k][cols] = hf.quantile_fit(x[:, cols], y, qq)
        for i in (i for i, r in enumerate(rows) if r["task"] == held):
            r = rows[i]
            if r["hb"] is None:
                out[i] = dict(task=held, err=math.inf, inside=False, width=math.inf)
                continue
            xr, lr = _cand_x(r, extra), math.log(r["T"] / r["hb"])
            mid, lo, hi = xr @ w["mid"], xr @ w["lo"], xr @ w["hi"]
            lo, hi = min(lo, mid), max(hi, mid)
            out[i] = dict(task=held, err=abs(math.exp(mid - lr) - 1),
                          inside=lo - 1e-9 <= lr <= hi + 1e-9, width=hi - lo)  # fmt: skip
    return out


def candidates() -> list[str]:
    """Task-level features added to the per-configuration calibration, leave-one-task-out
    over seventeen tasks: table lines (nothing adopted: a next round must score it fresh)."""
    rows = candidate_rows()
    lines = [
        f"| added to the per-configuration features ({len(rows)} targets, "
        f"{len({r['task'] for r in rows})} tasks, {sum(r['hb'] is None for r in rows)} misses)"
        " | median estimate | image tasks | text tasks | band covers | median log-width |",
        "|---|---|---|---|---|---|",
    ]
    for extra in ((), ("image",), ("log lambda/N",), ("head share",),
                  ("image", "log lambda/N"), ("image", "head share"), ("hb 80/50",),
                  ("rho 50",), ("hb 80/50", "rho 50")):
        res = _cand_loto(rows, extra)
        cover = sum(r["inside"] for r in res) / len(res)
        width = float(np.median([r["width"] for r in res if math.isfinite(r["width"])]))
        img = [r["err"] for r, x in zip(res, rows) if x["kernel"]["kind"] == "image"]
        txt = [r["err"] for r, x in zip(res, rows) if x["kernel"]["kind"] != "image"]
        lines.append(f"| {', '.join(extra) or 'nothing (as the library)'} | "
                     f"{_fmt([r['err'] for r in res])} | {_fmt(img)} | {_fmt(txt)} | "
                     f"{cover:.1%} | {width:.2f} |")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------
# The fresh round.
# ---------------------------------------------------------------------------------------


def library_part(name: str, out_dir: Path | None = None, tasks: dict | None = None) -> dict:
    """``tl.forecast`` + ``Forecast.steps_interval`` on every stored cell of a fresh task (the
    library as a user gets it, stabilized rerun included); ``<task>-library.json`` in
    ``out_dir`` (default: this round's folder; ``tasks``: the round's task table)."""
    out_dir = OUT if out_dir is None else out_dir
    ho.TASKS.update(TASKS if tasks is None else tasks)
    state = json.loads((out_dir / f"{name}.json").read_text())
    hb = ho._kernels(name)[2]
    out = {}
    for key, c in state["cells"].items():
        fc = rerun(hb, dict(c, hb_loss=[None] * (c["fc_steps"] + 1)))
        ivs = {}
        for d in ho.targets(c, "hb_loss"):
            iv = fc.steps_interval((1.0 - float(d)) * c["run_loss"][0])
            ivs[d] = dict(low=iv.low, median=iv.median, point=iv.point, high=iv.high,
                          trusted=iv.trusted, stabilized=iv.stabilized, note=iv.note)  # fmt: skip
        out[key] = dict(intervals=ivs, diverges=bool(fc.diverges),
                        stabilized=fc.method.get("stabilized"))  # fmt: skip
        print(f"[{name}] library {key}: {fc.method.get('stabilized', '')}", flush=True)
    (out_dir / f"{name}-library.json").write_text(json.dumps(out))
    return out


def fresh_rows(name: str) -> list[dict]:
    """``holdout_features.scored`` rows of a fresh task with the library's intervals."""
    state = json.loads((OUT / f"{name}.json").read_text())
    lib = json.loads((OUT / f"{name}-library.json").read_text())
    rows = []
    for key, c in state["cells"].items():
        for r in hf.scored(name, c, key):
            iv = lib[key]["intervals"].get(f"{r['drop']:g}")
            r["lib"] = iv
            r["est"]["library"] = None if iv is None else iv["median"]
            r["est"]["library, no rerun"] = None if iv is None or iv["stabilized"] else (
                iv["median"])  # fmt: skip
            rows.append(r)
    return rows


SHOWN = ("tangent", "head-body", "head-body, features", "library, no rerun", "library")


def _errors(rows: list[dict], method: str) -> list[float]:
    return [math.inf if r["est"][method] is None else abs(r["est"][method] - r["T"]) / r["T"]
            for r in rows]  # fmt: skip


def _inside(r: dict, rerun: bool = True) -> bool:
    iv = r.get("lib")
    if not iv or iv["low"] is None or (iv["stabilized"] and not rerun):
        return False
    return iv["low"] <= r["T"] and (iv["high"] is None or r["T"] <= iv["high"])


def _covered(rows: list[dict], rerun: bool = True) -> str:
    inside = sum(_inside(r, rerun) for r in rows)
    return f"{inside}/{len(rows)} ({inside / max(len(rows), 1):.0%})"


def _diverging(states: dict, out_dir: Path | None = None) -> tuple[int, int, int]:
    """Over the fresh cells whose library forecast blows up: targets it misses, how many
    the real run reaches, and how many of those get a stabilized interval (the library's
    results in ``out_dir``, default this round's folder)."""
    missed = reached = rescued = 0
    for name, st in states.items():
        lib = json.loads(((out_dir or OUT) / f"{name}-library.json").read_text())
        for key, c in st["cells"].items():
            for d, t in ho.targets(c, "hb_loss").items():
                iv = lib[key]["intervals"][d]
                if iv["point"] is not None or not lib[key]["diverges"]:
                    continue
                if iv["stabilized"] is None and iv["low"] is not None:
                    continue  # beyond the horizon, not a blow-up
                missed += 1
                reached += t["status"] != "unreached"
                rescued += t["status"] != "unreached" and iv["stabilized"] is not None
    return missed, reached, rescued


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS and v.get("cells")}
    per_task = {k: fresh_rows(k) for k in states}
    pooled = [r for rows in per_task.values() for r in rows]
    first = next(iter(states.values()), {})
    lines = [
        "## Forecasts that diverge at the stability limit: a stabilized estimate "
        "(`benchmarks/holdout_limit.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --collect && {COMMAND} --calibrate` (development), then "
        f"`{COMMAND} --fetch && {COMMAND} && {COMMAND} --library && {COMMAND} --report`. "
        "Chosen on the development tasks (the script's docstring; NOTE [stabilized estimate] "
        "in `tangentlab.forecast`), then run once on three fresh tasks and reported as they "
        "came; grid, horizons (10x) and scoring of `holdout_fresh.py`. *features*: the "
        "benchmark's calibrated median estimate (holdout_features.py; stored curves, ρ from "
        "its sketched tangent kernel); *library*: `tl.forecast` + `Forecast.steps_interval` "
        "on every stored cell, with the rerun at c·lr where the forecast blows up; *library, "
        "no rerun*: the same without it (the library before this round). Entries: median / "
        "p90 of |T̂' − T|/T (targets, misses); a miss counts as +∞. Machine: "
        f"{first.get('machine', '')}; code {first.get('code', '')}.",
        "",
        *ho.task_table(states),
        "",
        "| task | loss | drop | " + " | ".join(SHOWN)
        + " | interval covers, no rerun | interval covers |",
        "|---|---|---|" + "---|" * (len(SHOWN) + 2),
    ]  # fmt: skip
    for head, sel in hf.slices(per_task, pooled):
        cells = [_fmt(_errors(sel, m)) for m in SHOWN]
        lines.append(f"| {head} | " + " | ".join(cells)
                     + f" | {_covered(sel, False)} | {_covered(sel)} |")  # fmt: skip
    res = [r for r in pooled if r["lib"] and r["lib"]["stabilized"]]
    missed, reached, rescued = _diverging(states)
    widths = [math.log(r["lib"]["high"] / r["lib"]["low"]) for r in res
              if r["lib"]["high"] is not None]  # fmt: skip
    trusted = [r for r in pooled if r["lib"] and r["lib"]["trusted"]]
    others = [r for r in pooled if not (r["lib"] and r["lib"]["trusted"])]
    bad = [e > 0.25 for e in _errors(pooled, "library")]
    flagged = sum(b and not (r["lib"] and r["lib"]["trusted"]) for r, b in zip(pooled, bad))
    lines += [
        "",
        f"Forecasts that blow up before a target: {missed} targets missed that way over the "
        f"fresh cells; the real run reached {reached} of them "
        f"({reached / max(missed, 1):.0%}; development: 45 of 130, 35%), and {rescued} got a "
        f"stabilized interval. Those {len(res)}: median estimate "
        f"{_fmt(_errors(res, 'library'))}, interval covers {_covered(res)}, median log-width "
        f"{np.median(widths) if widths else math.nan:.2f}.",
        "",
        f"Trusted intervals (library): {len(trusted)} of {len(pooled)} targets at "
        f"{_fmt(_errors(trusted, 'library'))}, the others {_fmt(_errors(others, 'library'))}; "
        f"\"not trusted\" as a check for an error above 25%: precision "
        f"{flagged / max(len(others), 1):.0%}, recall {flagged / max(sum(bad), 1):.0%}.",
        "",
        READING,
        "",
        f"**After the round** (`{COMMAND} --candidates`; development only, nothing adopted): "
        "does a task-level statistic separate the image tasks whose real runs beat the "
        "estimate, or a feature of the configuration's own forecast curves? "
        "Leave-one-task-out over the seventeen held-out tasks of all rounds (this "
        "round's three now among them; the frozen variant's columns plus the feature; ρ "
        "from the benchmarks' sketched tangent kernels):",
        "",
        *candidates(),
        "",
        CANDIDATES_READING,
    ]  # fmt: skip
    write_section("holdout-limit", "\n".join(lines))
    print("\n".join(lines))


CANDIDATES_READING = """No task-level statistic does: image, log λ_max/N and the head
share of tr Θ, alone or in pairs, move the left-out median by at most two points (20%
without; 18% with image and log λ_max/N) and the p90 between 92% and 110% (106% without),
at the same coverage. Two per-configuration features read off the forecasts before training
do a little better: how much the head-exact curve speeds up by itself, log(T̂(80%) /
T̂(50%)), and ρ at the 50% drop, together 17% / 103%, at the same coverage and width. That
is the candidate for a next round, not a fix: what made this round's two image tasks
1.3-1.6x faster than the calibrated estimate is still unexplained (a feature measured along
the first steps of the head-exact model, such as its kernel's growth, is the next thing to
try). *Correction (2026-11-30, after round 5)*: the first version of this table paired the
left-out errors with the wrong targets in its image and text columns (``_cand_loto``
returned them task by task in sorted order, the table zipped them with the targets in load
order; the pooled columns were right). It read "the image tasks as a whole are not worse
than the text ones (19% against 20%)" and "text 16%, images 17%"; the columns above are
recomputed: the image tasks are far worse (29-31% against 12-15%)."""


READING = """**Reading** (the first and only run of these tasks, 2026-11-30; the
stabilized estimate was frozen, and committed, before they ran). **The stabilized estimate
mattered once.** Over the three fresh tasks the head-exact forecasts blew up before 28
targets, and the real runs reached only one of them (4%; development: 45 of 130, 35%): that
one got a stabilized interval, which held it (median estimate exact), so the library's
misses fell from 2 to 1 and its p90 from 122% to 115%. The working hypothesis behind it —
the real network spikes and recovers where the head-exact model blows up — held for a
third of such targets in development and for almost none here: pooled, the real runs
reached 46 of 158 (29%). A blow-up of the head-exact forecast is better read as "the real
run will probably not get there either", which is what the library now says, with the
count, and the stabilized interval as what to expect if it does. **The per-configuration
interval, on its second fresh round, did worse than on its first**: median estimate 27% /
114% (through the library 29% / 115%) against 113% / 334% for the head-exact T̂ and 358% /
miss for the tangent model (42 misses); round 3 had 15% / 129%. It was good on the text
task (fortunes 10% / 43%, interval covering 97%) and poor on the two image tasks (samples
36% / 129%, scenetext 57% / 116%): there the real runs were faster than the median
estimate by e^0.25 to e^0.45 (1.3-1.6x) at the median, most at a = 0.1, as on round 3's
photographs (30%); the calibration has no feature that separates these tasks (a
candidate for the next round: the head share of tr Θ or λ_max/N). The interval covered
79% of the targets (143 of 180; goal 80%), weakest at the 90% CE drop (56%) and on
scenetext (57%). The trusted flag did not hold: its 57 targets had 16% / 104% (round 3: 8% /
32%); "not trusted" flagged errors above 25% with precision 57% and recall 73%. Issue 13's
accuracy goals are not met on this round in any pooled cell."""


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--only", nargs="*", help="--collect: only these development tasks")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--candidates", action="store_true", help="after the round (dev only)")
    ap.add_argument("--fetch", action="store_true", help="where the fresh data is, then exit")
    ap.add_argument("--task", action="append", choices=list(TASKS), help="default: all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--library", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.collect:
        collect(args.only)
    elif args.calibrate:
        calibrate()
    elif args.candidates:
        print("\n".join(candidates()))
    elif args.fetch:
        print(FORTUNES, _opencv_examples(), fr._skimage_dir(fetch=True))
    elif args.library:
        torch.set_num_threads(args.threads)
        for name in args.task or list(TASKS):
            library_part(name)
    elif args.report:
        report()
    else:
        torch.set_num_threads(args.threads)
        fr.run_tasks(TASKS, args.task or list(TASKS), OUT)


if __name__ == "__main__":
    main()

"""A band for the real loss at every step: how often the real curve lies in
``Forecast.loss_interval()`` (issue 13: "the minibatch band held the real loss on only 0-14%
of steps, where about 80% is expected").

    .venv/bin/python benchmarks/loss_interval.py --dev NAME    # a development task (repeat)
    .venv/bin/python benchmarks/loss_interval.py --choose      # the depth range, on those
    .venv/bin/python benchmarks/loss_interval.py --fetch       # where the rounds' data is
    .venv/bin/python benchmarks/loss_interval.py               # every task (resumable per task)
    .venv/bin/python benchmarks/loss_interval.py --task NAME   # one task
    .venv/bin/python benchmarks/loss_interval.py --report      # RESULTS.md section only

(needs ``make bench-deps``.)

**Why.** ``Forecast.loss_band`` is the spread of SGD's sample paths of the model itself: it
has no width at full batch and, on the first held-out tasks, held the real minibatch loss on
0-14% of steps. The real run departs from the model more than SGD's noise does. The steps
interval (NOTE [steps interval]) is calibrated for that departure; ``loss_interval`` reads
it at every depth from 50% to 90% (NOTE [loss interval]) and turns it into a band for the
loss at every step. Nothing is fitted for it but the range of depths it reads, chosen on
development tasks (``--dev NAME`` for tasks of rounds 1-3, which the calibration was
fitted on; ``--choose``): among RANGES, the one with the most steps bounded on both sides
among those whose band held the raw real loss on at least 80% of such steps, pooled over
the cells whose real run dropped 90%. Frozen in ``results/loss_interval/choice.json`` and
``tangentlab.forecast.LOSS_INTERVAL_DROPS`` and committed before the held-out run.

**The second choice, per kind of body** (``--choose-kind``). The held-out run below found
the text tasks' band at 73%, every miss at a depth below 50% (where the steps interval
extrapolates), the image tasks' at 88%. So the range is chosen again, per kind of body
(transformer: MiniLM; convolutional: EfficientNet-Lite; the library's ``conv_body``), on
more development tasks (the four text tasks of the steps interval's twenty-task
calibration not run before: ``--dev debates-minilm`` etc.), among RANGES and three ranges
that start nearer the calibrated 50% (RANGES_KIND), by a rule that treats the task as the
unit: the most two-sided steps among the ranges whose pooled coverage is >= 80% in at least
80% of 1000 resamples of the kind's development tasks (``choose_kind``). Frozen in
``choice_kind.json`` and ``LOSS_INTERVAL_DROPS`` and committed, then scored once on round
10 (``--fresh NAME``): three text tasks no round used (FRESH_FILES: Debian's fortune files,
as rounds 4-7), their real runs by holdout.py's runner, the first choice (30-95%) beside
it; run in the order of FRESH_FILES until a time set in advance; ``--report-kind``.

**Tasks.** The eight tasks of rounds 6 and 7 (``holdout_kind.py``, ``holdout_hybrid.py``):
the steps interval's training-free calibration (``STEPS_CALIBRATION``, twenty development
tasks) never saw them; each round scored its steps intervals once. This is the first
measurement of the loss band on any task. Every stored cell (24 a task: MSE and CE, full
batch and B = 32, m 0 and 0.9, a 0.1, 0.3 and 1 of the stability limit), rerun through
``tl.forecast`` as a user gets it (``holdout_limit.rerun``: the cell's horizon, twice the
real run's steps), against the stored real run (logged at every step, until its loss
dropped 90%).

**What is counted.** Over the steps 0..T of a real run (T: its 90% drop or its horizon)
that the band bounds on both sides: the fraction where the real loss lies in
[low_t, high_t] (raw loss, what a plot shows), and separately above high_t (slower than the
band) and below low_t (faster). Also the running minimum of the real loss (what the steps
intervals are calibrated on: a loss that climbs back above a target it reached counts as
above), the fraction of steps that have both sides, the median log-width log(high/low),
and for minibatch cells ``loss_band``'s own coverage on the same steps. Results:
``benchmarks/results/loss_interval/`` and the "loss-interval" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_curves as hc  # noqa: E402
import holdout_depth as hd  # noqa: E402
import holdout_features as hf  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import holdout_hybrid as hh  # noqa: E402
import holdout_kind as hk  # noqa: E402
import holdout_limit as hl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.headbody import compute_head_body_kernel  # noqa: E402

# The band ignores the stabilized rerun of a forecast that blows up (NOTE [loss interval]:
# those depths bound nothing), so it is not computed here: the bands are the same, and the
# cells at the stability limit cost minutes less each.
tlf = importlib.import_module("tangentlab.forecast")  # the module (tl.forecast: the function)
tlf._stabilize = lambda prep, s, fc: None

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "loss_interval")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/loss_interval.py"
ROUNDS = {"round 6": (hk.OUT, hk.TASKS), "round 7": (hh.OUT, hh.TASKS)}
TASKS = {name: (rnd, out) for rnd, (out, tasks) in ROUNDS.items() for name in tasks}
# Development tasks (rounds 1-3, in the calibration), where the depth range is chosen:
# ``--dev NAME`` writes to OUT / "dev"; ``--choose`` reads them.
DEV_ROUNDS = {"round 1": (fr.OUT, fr.TASKS), "round 2": (hd.OUT, hd.TASKS),
              "round 3": (hf.OUT, hf.TASKS), "first held-out round": (ho.OUT, ho.TASKS),
              "round 4": (hl.OUT, hl.TASKS), "round 5": (hc.OUT, hc.TASKS)}  # fmt: skip
ROUNDS.update(DEV_ROUNDS)
DEV = {name: (rnd, out) for rnd, (out, tasks) in DEV_ROUNDS.items() for name in tasks}

# Round 10: fresh text tasks for the per-kind choice (choose_kind), named before it was
# made; Debian's fortune files no task used, 64 samples, 16 tokens, as rounds 4-7. Their
# real runs (holdout.py's runner) go to FRESH_OUT, the band's scores to OUT / "round10".
FRESH_FILES = {"fortunes8-minilm": ("startrek", "men-women", "humorists"),
               "fortunes9-minilm": ("linux", "zippy", "ethnic", "definitions"),
               "fortunes10-minilm": ("perl", "knghtbrd", "disclaimer")}  # fmt: skip
FRESH_OUT = OUT / "fresh"


def _fortunes_of(files: tuple[str, ...]):
    return lambda: hl._fortunes(files)


FRESH = {name: dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                    num_classes=len(files), texts=_fortunes_of(files))
         for name, files in FRESH_FILES.items()}  # fmt: skip
ROUNDS["round 10"] = (FRESH_OUT, FRESH)
FRESH_TASKS = {name: ("round 10", FRESH_OUT) for name in FRESH}

# Round 11: fresh text tasks for the third choice (``--choose-third``: the transformer
# bodies' range chosen again with round 10 among the development tasks), named before it
# was made; Debian's fortune files no round used (each with at least 30 fortunes), 64
# samples, 16 tokens, as round 10. Real runs to FRESH_OUT, the band's scores to
# OUT / "round11".
FRESH11_FILES = {"fortunes11-minilm": ("cookie", "tao", "magic"),
                 "fortunes12-minilm": ("miscellaneous", "debian", "goedel"),
                 "fortunes13-minilm": ("fortunes", "linuxcookie", "paradoxum")}  # fmt: skip
FRESH11 = {name: dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                      num_classes=len(files), texts=_fortunes_of(files))
           for name, files in FRESH11_FILES.items()}  # fmt: skip
ROUNDS["round 11"] = (FRESH_OUT, FRESH11)
FRESH_TASKS.update({name: ("round 11", FRESH_OUT) for name in FRESH11})
ALL = {**TASKS, **DEV, **FRESH_TASKS}


def _commit() -> str:
    return ho._commit()


def _hb(name: str):
    """The task's head-exact kernel, as the rounds computed it (deterministic)."""
    ho.TASKS.update(ROUNDS[ALL[name][0]][1])
    cfg = ho.TASKS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ho.load_task(name)
        return compute_head_body_kernel(task["top"], (task["x"], task["y"]),
                                        params=task["params"], projection=cfg["projection"],
                                        progress=False)  # fmt: skip


GRID = tuple(round(0.01 * k, 2) for k in range(1, 100))  # depths whose intervals are stored
# The depth ranges compared on the development tasks (fixed before any was scored; the
# library's is the first): the rule is in the module docstring.
RANGES = ((0.5, 0.9), (0.3, 0.9), (0.3, 0.95), (0.1, 0.95), (0.1, 0.98), (0.01, 0.99))


def intervals(fc) -> dict:
    """The cell's steps intervals at every depth of GRID: ``{d: (low, high)}``, ``None`` for a
    side that is unknown (or from the stabilized rerun, which bounds nothing)."""
    l0, out = float(fc.loss[0]), {}
    for d in GRID:
        iv = fc.steps_interval((1.0 - d) * l0)
        ok = iv.low is not None and iv.stabilized is None
        out[f"{d:g}"] = (iv.low if ok else None, iv.high if ok else None)
    return out


def band(ivs: dict, size: int, l0: float, lo_d: float, hi_d: float):
    """NOTE [loss interval] over the depths of ``ivs`` in [lo_d, hi_d] (the library's
    algorithm, on stored intervals): ``(low, high)``, ``[size]`` each."""
    low, high = np.full(size, np.nan), np.full(size, np.nan)
    for key, (t_lo, t_hi) in ivs.items():
        d = float(key)
        if not lo_d - 1e-9 <= d <= hi_d + 1e-9 or t_lo is None:
            continue
        eps = (1.0 - d) * l0
        low[: min(t_lo, size)] = np.fmax(low[: min(t_lo, size)], eps)
        if t_hi is not None and t_hi < size:
            high[t_hi:] = np.fmin(high[t_hi:], eps)
    return low, high


def counts(c: dict, low: np.ndarray, high: np.ndarray, path_band=None) -> dict:
    """Per-step counts of one cell's real run against a band (module docstring)."""
    real = np.asarray(c["run_loss"], dtype=np.float64)
    steps = np.asarray(c["run_steps"], dtype=np.int64)  # every step (full batch) or every 2nd
    keep = steps < low.shape[0]
    real, steps = real[keep], steps[keep]
    lo, hi = low[steps], high[steps]
    both = np.isfinite(lo) & np.isfinite(hi)
    inside = (np.isnan(lo) | (real >= lo)) & (np.isnan(hi) | (real <= hi)) & np.isfinite(real)
    best = np.minimum.accumulate(np.where(np.isfinite(real), real, np.inf))
    out = dict(steps=int(steps.shape[0]), two_sided=int(both.sum()),
               covered=int((inside & both).sum()),
               above=int((both & ~(real <= hi)).sum()), below=int((both & (real < lo)).sum()),
               covered_best=int((both & (best >= lo) & (best <= hi)).sum()),
               low_only=int((np.isfinite(lo) & np.isnan(hi)).sum()),
               low_only_covered=int((np.isfinite(lo) & np.isnan(hi) & (real >= lo)).sum()),
               high_only=int((np.isnan(lo) & np.isfinite(hi)).sum()),
               high_only_covered=int((np.isnan(lo) & np.isfinite(hi) & (real <= hi)).sum()),
               crossed=int((both & (lo > hi)).sum()),
               log_width=(float(np.median(np.log(hi[both] / lo[both]))) if both.any()
                          else None))  # fmt: skip
    if path_band is not None:
        b0, b1 = (np.asarray(x)[steps] for x in path_band)
        held = (real >= b0) & (real <= b1)
        out.update(path_band_two_sided=int((held & both).sum()),
                   path_band_all=int(held[1:].sum()), path_band_steps=int(steps.shape[0] - 1))
    return out


def score_cell(c: dict, fc) -> dict:
    """The stored intervals, and the counts of the library's band (``fc.loss_interval()``,
    checked against ``band`` over the library's range) and of every range of RANGES."""
    ivs, size, l0 = intervals(fc), fc.loss.shape[0], float(fc.loss[0])
    lib = fc.loss_interval()
    mine = band(ivs, size, l0, *lib.drops)  # the library's range for this kind of body
    for a, b in zip((lib.low, lib.high), mine):
        np.testing.assert_allclose(a, b, rtol=1e-12)  # the replica is the library's
    return dict(intervals=ivs, size=size, l0=l0, diverges=bool(fc.diverges), note=lib.note,
                library=counts(c, lib.low, lib.high, fc.loss_band),
                ranges={f"{a:g}-{b:g}": counts(c, *band(ivs, size, l0, a, b), fc.loss_band)
                        for a, b in RANGES})  # fmt: skip


def _reached(c: dict) -> bool:
    """The stored real run dropped 90% (it stops there; else it stalled or blew up and ran
    to its horizon)."""
    real = np.asarray(c["run_loss"], dtype=np.float64)
    return bool(np.isfinite(real).all() and real.min() <= 0.1 * real[0])


def _with_reached(name: str, state: dict) -> dict:
    """``state``'s cells with ``reached`` (read from the stored round when missing)."""
    if all("reached" in c for c in state["cells"].values()):
        return state
    src = json.loads((ALL[name][1] / f"{name}.json").read_text())["cells"]
    for key, c in state["cells"].items():
        c.setdefault("reached", _reached(src[key]))
    return state


def run_task(name: str, out: Path = OUT) -> dict:
    rnd, src = ALL[name]
    path = out / f"{name}.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    stored = json.loads((src / f"{name}.json").read_text())
    t0 = time.perf_counter()
    hb = _hb(name)
    state.setdefault("meta", dict(round=rnd, machine=machine(), code=_commit(),
                                  date=datetime.date.today().isoformat(),
                                  kernel_seconds=time.perf_counter() - t0))  # fmt: skip
    cells = state.setdefault("cells", {})
    for key, c in stored["cells"].items():
        if key in cells:
            continue
        t0 = time.perf_counter()
        fc = hl.rerun(hb, c)
        cells[key] = dict(score_cell(c, fc), loss=c["loss"], batch_size=c["batch_size"],
                          momentum=c["momentum"], a=c["lr_factor"], reached=_reached(c),
                          seconds=time.perf_counter() - t0)  # fmt: skip
        if key in EXAMPLE_CELLS.get(name, ()):
            band = fc.loss_interval()
            cells[key]["curves"] = dict(real=c["run_loss"], real_steps=c["run_steps"],
                                        forecast=fc.loss.tolist(), low=band.low.tolist(),
                                        high=band.high.tolist())  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, allow_nan=True))
        tmp.replace(path)
        x = cells[key]["library"]
        print(f"[{name}] {key}: {x['covered']}/{x['two_sided']} covered, above {x['above']}, "
              f"below {x['below']} ({cells[key]['seconds']:.1f} s)", flush=True)
    return state


# Cells whose curves are kept for the figure (chosen before any result: one full-batch and
# one minibatch cell of one text and one image task, at a = 0.3).
EXAMPLE_CELLS = {"fortunes6-minilm": ("mse-full-m0-a0.3", "ce-B32-m0.9-a0.3"),
                 "chess-lite0": ("mse-full-m0-a0.3", "ce-B32-m0.9-a0.3")}  # fmt: skip


def _pool(cells: list[dict]) -> dict:
    s = {k: sum(c.get(k, 0) for c in cells) for k in (
        "steps", "two_sided", "covered", "above", "below", "covered_best", "low_only",
        "low_only_covered", "high_only", "high_only_covered", "crossed",
        "path_band_two_sided", "path_band_all", "path_band_steps")}  # fmt: skip
    per = [c["covered"] / c["two_sided"] for c in cells if c["two_sided"]]
    s.update(cells=len(cells), with_band=len(per),
             cell_median=float(np.median(per)) if per else float("nan"),
             cells_80=sum(p >= 0.8 for p in per),
             width=float(np.median([c["log_width"] for c in cells if c["log_width"] is not None]
                                   or [np.nan])))  # fmt: skip
    return s


def _pct(a: int, b: int) -> str:
    return f"{a / b:.0%} ({a}/{b})" if b else "–"


def _cols(s: dict) -> str:
    """The columns after ``cells`` of a row: the pooled counts ``s`` (``_group``)."""
    mb = (_pct(s["path_band_two_sided"], s["two_sided_mb"]) if s.get("two_sided_mb") else "–")
    return (f"{_pct(s['two_sided'], s['steps'])} | "
            f"**{_pct(s['covered'], s['two_sided'])}** | {_pct(s['above'], s['two_sided'])} | "
            f"{_pct(s['below'], s['two_sided'])} | {_pct(s['covered_best'], s['two_sided'])} | "
            f"{s['cell_median']:.0%}, {s['cells_80']}/{s['with_band']} | {s['width']:.2f} | "
            f"{_pct(s['low_only_covered'], s['low_only'])} | "
            f"{_pct(s['high_only_covered'], s['high_only'])} | {mb} |")


def _row(label: str, s: dict) -> str:
    return f"| {label} | {s['cells']} ({s['with_band']}) | {_cols(s)}"


def _group(cells: list[dict]) -> dict:
    s = _pool(cells)
    mb = [c for c in cells if c["batch_size"]]
    s["two_sided_mb"] = sum(c["two_sided"] for c in mb)
    return s


def _lib(c: dict) -> dict:
    """A cell's counts for the library's band, with the fields ``_group`` splits by."""
    return dict(c["library"], loss=c["loss"], batch_size=c["batch_size"])


def report() -> None:
    states = {n: json.loads((OUT / f"{n}.json").read_text()) for n in TASKS
              if (OUT / f"{n}.json").exists()}  # fmt: skip
    if not states:
        raise SystemExit(f"no results in {OUT}: run {COMMAND} first")
    metas = sorted({s["meta"]["machine"] for s in states.values()})
    codes = sorted({s["meta"]["code"] for s in states.values()})
    choice = json.loads((OUT / "choice.json").read_text())
    head = ("| scope | cells | two-sided steps | inside | above | below | running min inside | "
            "per cell: median, >= 80% | log-width | low only: inside | high only: inside | "
            "minibatch: loss_band inside |")  # fmt: skip
    lines = [
        f"Command: `{COMMAND}` (first and only run on these tasks; code {', '.join(codes)}; "
        f"{'; '.join(metas)}). Steps 0..T of each real run (T: its 90% drop), logged at "
        "every step (full batch) or every second (B = 32), counted where "
        "`Forecast.loss_interval()` bounds the real loss on both sides unless named. "
        "Columns: cells (those with any two-sided step); share of steps two-sided; real loss "
        "inside the band; above it (slower than the band); below it (faster); the running "
        "minimum of the real loss inside; per cell, the median coverage and how many cells "
        "reach 80%; the median log-width log(high / low); late steps bounded only from below "
        "(inside); early steps bounded only from above (inside); minibatch cells: "
        "`loss_band` (SGD's 10-90% paths of the model) on the same two-sided steps.",
        "",
        "Held-out: the cells whose real run dropped 90% (the band's depths 30-95%, "
        "`LOSS_INTERVAL_DROPS`):",
        "",
        head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reached = {n: [_lib(c) for c in s["cells"].values() if c["reached"]]
               for n, s in states.items()}  # fmt: skip
    pooled = [c for cs in reached.values() for c in cs]
    for name, cs in reached.items():
        run = len(states[name]["cells"])
        lines.append(_row(f"{name} ({states[name]['meta']['round']}; {run} of 24 cells run)",
                          _group(cs)))  # fmt: skip
    for kind, test in (("text (MiniLM)", "minilm"), ("image (EfficientNet-Lite)", "lite")):
        lines.append(_row(kind, _group([c for n, cs in reached.items() if test in n
                                        for c in cs])))  # fmt: skip
    for loss in ("mse", "ce"):
        for b, bl in ((None, "full batch"), (32, "B = 32")):
            cs = [c for c in pooled if c["loss"] == loss and (c["batch_size"] or None) == b]
            lines.append(_row(f"{loss.upper()}, {bl}", _group(cs)))
    lines.append(_row("**all**", _group(pooled)))
    rest = [_lib(c) for s in states.values() for c in s["cells"].values() if not c["reached"]]
    if rest:
        lines.append(_row("cells whose real run stalled or blew up (not in **all**; T: the "
                          "horizon)", _group(rest)))  # fmt: skip
    lines += [
        "",
        f"The choice of the depth range (`{COMMAND} --choose`, before the held-out run; "
        f"{choice['cells']} cells of {len(choice['tasks'])} development tasks whose real run "
        f"dropped 90%: {', '.join(choice['tasks'])}; chosen: **{choice['choice']}**):",
        "",
        *choice["lines"],
        "",
        READING,
    ]
    _figure(states)
    if (OUT / "examples.png").exists():
        lines += ["", "![loss interval examples](results/loss_interval/examples.png)"]
    write_section("loss-interval", "\n".join(lines))
    print("\n".join(lines))


def _figure(states: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(n, k, c["curves"]) for n, s in states.items() for k, c in s["cells"].items()
             if "curves" in c]  # fmt: skip
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    for ax, (name, key, cv) in zip(np.atleast_1d(axes), shown):
        t = np.arange(len(cv["forecast"]))
        lo, hi = (np.array(cv[k], dtype=float) for k in ("low", "high"))
        ax.plot(t, cv["forecast"], color="C0", lw=1.5, label="head-exact forecast")
        ax.fill_between(t, lo, hi, color="C0", alpha=0.25, lw=0, label="loss_interval")
        ax.plot(t, lo, color="C0", lw=0.6, ls="--")
        ax.plot(t, hi, color="C0", lw=0.6, ls="--")
        ax.plot(cv["real_steps"], cv["real"], color="k", lw=1.2, label="real run")
        ax.set_yscale("log")
        ax.set_title(f"{name}\n{key}", fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("training loss")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "examples.png", dpi=110)


def choose() -> dict:
    """The depth range, on the development tasks (``--dev``): among RANGES whose band holds
    the raw real loss on at least 80% of the pooled two-sided steps, the one with the most
    two-sided steps (ties: the narrower range); none: the calibrated (0.5, 0.9). Written to
    ``OUT / "choice.json"``; the library's LOSS_INTERVAL_DROPS is set from it by hand."""
    dev = OUT / "dev"
    states = {p.stem: _with_reached(p.stem, json.loads(p.read_text()))
              for p in sorted(dev.glob("*.json"))}  # fmt: skip
    if not states:
        raise SystemExit(f"no development results in {dev}: run {COMMAND} --dev NAME first")
    cells = [c for s in states.values() for c in s["cells"].values() if c["reached"]]
    table = {}
    for a, b in RANGES:
        key = f"{a:g}-{b:g}"
        table[key] = dict(_group([dict(c["ranges"][key], loss=c["loss"],
                                       batch_size=c["batch_size"]) for c in cells]),
                          depths=(a, b))  # fmt: skip
    ok = [k for k, v in table.items() if v["covered"] >= 0.8 * v["two_sided"] > 0]
    pick = max(ok, key=lambda k: (table[k]["two_sided"], -(table[k]["depths"][1]
                                                           - table[k]["depths"][0])),
               default="0.5-0.9")  # fmt: skip
    lines = ["| depths | two-sided steps | inside | above | below | running min inside | "
             "per cell: median, >= 80% | log-width | low only: inside | high only: inside | "
             "minibatch: loss_band inside |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {_cols(v)}" for k, v in table.items()]
    out = dict(tasks=sorted(states), cells=len(cells), choice=pick, table=table,
               lines=lines, date=datetime.date.today().isoformat(), code=_commit())
    (OUT / "choice.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines))
    print("choice:", pick)
    return out


# The second choice, per kind of body (after the held-out run of rounds 6-7 found the text
# tasks' misses at depths below 50%, where the steps interval extrapolates): the six
# ranges and three that keep the calibrated end (fixed before any development result of
# the four added development tasks was read).
RANGES_KIND = RANGES + ((0.4, 0.95), (0.45, 0.95), (0.5, 0.95))
KINDS = {"transformer": lambda name: name.endswith("-minilm"),
         "conv": lambda name: not name.endswith("-minilm")}  # the library's conv_body
BOOT, BOOT_SHARE, LEVEL = 1000, 0.8, 0.8


def _range_counts(c: dict, src: dict, a: float, b: float) -> dict:
    """A stored cell's counts for the band over depths [a, b] (from its stored intervals)."""
    return counts(src, *band(c["intervals"], c["size"], c["l0"], a, b))


def _dev_cells(sub: str = "dev") -> dict[str, list[tuple[dict, dict]]]:
    """``{task: [(cell, stored real run), ...]}`` of the cells whose real run dropped 90%."""
    out = {}
    for p in sorted((OUT / sub).glob("*.json")):
        if p.stem not in ALL:
            continue
        state = _with_reached(p.stem, json.loads(p.read_text()))
        src = json.loads((ALL[p.stem][1] / f"{p.stem}.json").read_text())["cells"]
        out[p.stem] = [(c, src[k]) for k, c in state["cells"].items() if c["reached"]]
    return out


def _pick(per_task: dict[str, dict[str, tuple[int, int]]], ranges, rng) -> tuple[str, dict]:
    """The rule of ``choose_kind`` on ``{task: {range: (covered, two_sided)}}``: among
    ``ranges`` whose pooled coverage is >= LEVEL in at least BOOT_SHARE of BOOT resamples of
    the tasks (with replacement), the most two-sided steps (ties: the narrower); none:
    ``None``. Also ``{range: (covered, two_sided, share of resamples >= LEVEL)}``."""
    names = sorted(per_task)
    keys = [f"{a:g}-{b:g}" for a, b in ranges]
    cov = np.array([[per_task[n][k][0] for k in keys] for n in names], dtype=float)
    two = np.array([[per_task[n][k][1] for k in keys] for n in names], dtype=float)
    draws = rng.integers(0, len(names), size=(BOOT, len(names)))
    c_b, t_b = cov[draws].sum(axis=1), two[draws].sum(axis=1)  # [BOOT, ranges]
    share = ((c_b >= LEVEL * t_b) & (t_b > 0)).mean(axis=0)
    stats = {k: (int(cov[:, j].sum()), int(two[:, j].sum()), float(share[j]))
             for j, k in enumerate(keys)}  # fmt: skip
    ok = [j for j in range(len(keys)) if share[j] >= BOOT_SHARE]
    if not ok:
        return None, stats
    j = max(ok, key=lambda j: (two[:, j].sum(), -(ranges[j][1] - ranges[j][0])))
    return keys[j], stats


def choose_kind() -> dict:
    """The depth range per kind of body, on the development tasks (``--dev``; the twenty
    tasks of the steps interval's calibration, those run): for each kind (transformer body:
    MiniLM; convolutional: EfficientNet-Lite), among RANGES_KIND whose pooled coverage of
    the two-sided steps is >= 80% in at least 80% of 1000 resamples of that kind's
    development tasks (the task is the unit a user's next task is drawn like), the one with
    the most two-sided steps; none: the kind keeps the first choice (``choice.json``). Also
    the rule left out by task (chosen on the others, scored on the task). Written to
    ``OUT / "choice_kind.json"``; the library's LOSS_INTERVAL_DROPS (keyed by conv_body) is
    set from it by hand."""
    first = json.loads((OUT / "choice.json").read_text())["choice"]
    cells = _dev_cells()
    rng = np.random.default_rng(0)
    out = dict(date=datetime.date.today().isoformat(), code=_commit(), first=first, kinds={})
    for kind, test in KINDS.items():
        tasks = {n: v for n, v in cells.items() if test(n)}
        out["kinds"][kind] = _choose(kind, tasks, first, rng)
    (OUT / "choice_kind.json").write_text(json.dumps(out, indent=1))
    return out


def _choose(kind: str, tasks: dict, fallback: str, rng) -> dict:
    """``_pick`` on one kind's development ``tasks`` (``_dev_cells``), and the rule left out
    by task; ``fallback`` where no range passes. Printed as it goes."""
    per_task = {n: {f"{a:g}-{b:g}": (lambda s: (s["covered"], s["two_sided"]))(
        _pool([_range_counts(c, src, a, b) for c, src in v]))
        for a, b in RANGES_KIND} for n, v in tasks.items()}  # fmt: skip
    pick, stats = _pick(per_task, RANGES_KIND, rng)
    loto = {}
    for n in tasks:
        p, _ = _pick({m: x for m, x in per_task.items() if m != n}, RANGES_KIND, rng)
        loto[n] = (p or fallback, *per_task[n][p or fallback])
    lo_cov, lo_two = sum(v[1] for v in loto.values()), sum(v[2] for v in loto.values())
    out = dict(tasks=sorted(tasks), cells=sum(map(len, tasks.values())),
               choice=pick or fallback, fallback=pick is None, stats=stats, left_out=loto,
               left_out_coverage=(lo_cov, lo_two))  # fmt: skip
    print(f"{kind}: {len(tasks)} tasks, {out['cells']} cells; choice {out['choice']}"
          f"{' (fallback: none passed)' if pick is None else ''}")
    for k, (c, t, sh) in stats.items():
        print(f"  {k}: {_pct(c, t)} of {t} two-sided steps; resamples >= 80%: {sh:.0%}")
    print(f"  left out by task: {_pct(lo_cov, lo_two)}", {n: v[0] for n, v in loto.items()})
    return out


def choose_third() -> dict:
    """The third choice, transformer bodies only: ``choose_kind``'s rule (RANGES_KIND, the
    task as the unit, 1000 resamples) on the ten text development tasks and round 10's
    three (scored once and reported before this choice, so development tasks now). The
    convolutional bodies have no new task and keep the second choice. Written to
    ``OUT / "choice_third.json"``; LOSS_INTERVAL_DROPS[False] is set from it by hand and
    committed before any round-11 run."""
    second = json.loads((OUT / "choice_kind.json").read_text())
    cells = {**_dev_cells("dev"), **_dev_cells("round10")}
    tasks = {n: v for n, v in cells.items() if KINDS["transformer"](n)}
    fallback = second["kinds"]["transformer"]["choice"]
    out = dict(date=datetime.date.today().isoformat(), code=_commit(), second=fallback,
               **_choose("transformer", tasks, fallback, np.random.default_rng(0)))
    (OUT / "choice_third.json").write_text(json.dumps(out, indent=1))
    return out


def report_kind() -> None:
    """The RESULTS.md section "loss-interval-kind": the per-kind choice on the development
    tasks and its first and only scoring on round 10 (with the first choice beside it)."""
    ck = json.loads((OUT / "choice_kind.json").read_text())
    states = {n: _with_reached(n, json.loads((OUT / "round10" / f"{n}.json").read_text()))
              for n in FRESH if (OUT / "round10" / f"{n}.json").exists()}  # fmt: skip
    head = ("| depths | two-sided steps | inside | above | below | running min inside | "
            "per cell: median, >= 80% | log-width | low only: inside | high only: inside | "
            "minibatch: loss_band inside |")  # fmt: skip
    lines = [f"Command: `{COMMAND} --dev NAME` (the development tasks not run before: "
             "debates-minilm, convention-minilm, fortunes-minilm, fortunes3-minilm), "
             f"`{COMMAND} --choose-kind`, then `{COMMAND} --fresh NAME` per round-10 task "
             f"and `{COMMAND} --report-kind` (code {ck['code']} for the choice). Rules: "
             "`choose_kind`'s docstring; columns as in \"loss-interval\".", ""]
    for kind, v in ck["kinds"].items():
        lo_c, lo_t = v["left_out_coverage"]
        lines += [f"Development, {kind} bodies ({len(v['tasks'])} tasks, {v['cells']} cells "
                  f"whose real run dropped 90%): choice **{v['choice']}**"
                  f"{' (fallback to the first choice: no range passed)' if v['fallback'] else ''}"
                  f"; the rule left out by task held {_pct(lo_c, lo_t)} of the steps.", "",
                  "| depths | inside (two-sided steps) | resamples of the tasks at >= 80% |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_pct(c, t)} | {sh:.0%} |" for k, (c, t, sh) in v["stats"].items()]
        lines.append("")
    if states:
        choice = ck["kinds"]["transformer"]["choice"]
        first = ck["first"]
        shown = [choice] + [k for k in (first,) if k != choice]
        lines += ["Round 10 (fresh text tasks, scored once; the cells whose real run dropped "
                  "90%):", "", head.replace("| depths |", "| task, depths |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        src = {n: json.loads((FRESH_OUT / f"{n}.json").read_text())["cells"] for n in states}
        pooled = {k: [] for k in shown}
        for name, st in states.items():
            for k in shown:
                a, b = (float(x) for x in k.split("-"))
                cs = [dict(_range_counts(c, src[name][key], a, b), loss=c["loss"],
                           batch_size=c["batch_size"])
                      for key, c in st["cells"].items() if c["reached"]]  # fmt: skip
                pooled[k] += cs
                tag = " (library)" if k == choice else " (first choice)"
                lines.append(f"| {name}, {k}{tag} | {_cols(_group(cs))}")
        for k in shown:
            tag = " (library)" if k == choice else " (first choice)"
            lines.append(f"| **all**, {k}{tag} | {_cols(_group(pooled[k]))}")
    lines += ["", READING_KIND]
    write_section("loss-interval-kind", "\n".join(lines))
    print("\n".join(lines))


def report_third() -> None:
    """The RESULTS.md section "loss-interval-third": the third choice on the thirteen text
    development tasks and its first and only scoring on round 11 (the second choice and the
    first beside it)."""
    ck = json.loads((OUT / "choice_third.json").read_text())
    states = {n: _with_reached(n, json.loads((OUT / "round11" / f"{n}.json").read_text()))
              for n in FRESH11 if (OUT / "round11" / f"{n}.json").exists()}  # fmt: skip
    lo_c, lo_t = ck["left_out_coverage"]
    lines = [f"Command: `{COMMAND} --choose-third`, then `{COMMAND} --fresh11 NAME` per "
             f"round-11 task and `{COMMAND} --report-third` (code {ck['code']} for the "
             "choice). Rules: `choose_third`'s docstring; columns as in \"loss-interval\".",
             "", f"Development, transformer bodies ({len(ck['tasks'])} tasks: the ten of "
             f"\"loss-interval-kind\" and round 10's three; {ck['cells']} cells whose real run "
             f"dropped 90%): choice **{ck['choice']}**"
             f"{' (fallback to the second choice: no range passed)' if ck['fallback'] else ''}"
             f"; the rule left out by task held {_pct(lo_c, lo_t)} of the steps.", "",
             "| depths | inside (two-sided steps) | resamples of the tasks at >= 80% |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {_pct(c, t)} | {sh:.0%} |" for k, (c, t, sh) in ck["stats"].items()]
    lines.append("")
    if states:
        first = json.loads((OUT / "choice.json").read_text())["choice"]
        shown = {ck["choice"]: "library", ck["second"]: "second choice", first: "first choice"}
        lines += ["Round 11 (fresh text tasks, scored once; the cells whose real run dropped "
                  "90%):", "", "| task, depths | two-sided steps | inside | above | below | "
                  "running min inside | per cell: median, >= 80% | log-width | low only: "
                  "inside | high only: inside | minibatch: loss_band inside |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        src = {n: json.loads((FRESH_OUT / f"{n}.json").read_text())["cells"] for n in states}
        pooled = {k: [] for k in shown}
        for name, st in states.items():
            for k, tag in shown.items():
                a, b = (float(x) for x in k.split("-"))
                cs = [dict(_range_counts(c, src[name][key], a, b), loss=c["loss"],
                           batch_size=c["batch_size"])
                      for key, c in st["cells"].items() if c["reached"]]  # fmt: skip
                pooled[k] += cs
                lines.append(f"| {name}, {k} ({tag}) | {_cols(_group(cs))}")
        for k, tag in shown.items():
            lines.append(f"| **all**, {k} ({tag}) | {_cols(_group(pooled[k]))}")
    lines += ["", READING_THIRD]
    write_section("loss-interval-third", "\n".join(lines))
    print("\n".join(lines))


READING_THIRD = """**Reading** (round 11, scored once, 2026-12-01; all three tasks ran, by 18:25,
before the stop time set in advance, 19:45, in `round11/PLAN.md`). Round 10 joined the
development tasks once it had been reported, and `choose_kind`'s rule, unchanged, chose
45-95% on the thirteen text tasks (87% of its two-sided steps; 98% of the resamples). The
choice was committed (b0aff7d) and the plan (6acb68b) before any round-11 run. The three
fresh tasks ran from that code: fortunes11 and fortunes12 in two processes started at
6acb68b, which kept it loaded (their JSON stamps show the repository's head when each
finished); fortunes13 from a worktree of 6acb68b, because library commits (the minibatch
products, not the band) landed while it waited.

On the three fresh text tasks the band held the real loss on **88%** of the steps it bounds
on both sides (24% of all steps two-sided), above the 80% it was chosen for. The second
choice (40-95%) held 80% and the first (30-95%) 73% on the same tasks. By task: 77%, 96%
and 91%, so one task of three is still below 80%. The misses are real runs slower than the
band (11% of the steps above it, 0% below). Per cell the median coverage was 100% and 29 of
33 cells reached 80%. The price is fewer two-sided steps: a range that starts deeper bounds
fewer early steps on both sides (24% against 31% and 43%); the one-sided stretches held
100% (late steps, bounded below) and 99% (early steps, bounded above). `loss_band` (SGD's
paths) again held none of the minibatch cells' two-sided steps (0 of 241)."""


READING_KIND = """**Reading** (round 10, scored once, 2026-12-01; all three tasks ran, before the
time set in advance). The text tasks' band was chosen again, per kind of body. The depth range
(40-95% for a body without a convolution) was frozen and committed (7dd899e) before any
round-10 run. On the three fresh text tasks it held the real loss on **74%** of the steps
it bounds on both sides (33% of all steps two-sided). The first choice, 30-95%, held 66% of
its steps on the same tasks (46% two-sided). It is better, and it is still below the 80%
it was chosen for: on development, left out by task, the rule held 84%. The misses are
again real runs slower than the band (24% above, 2% below), and by task they spread from
62% to 82%.

After the fact, and only as a description: round 10's ranges starting at the calibrated
depths held more. 45-95% held 86%, 50-95% held 95% (with 25% and 18% of the steps
two-sided), and the calibrated 50-90% held 82%, but only 74 steps are bounded on both sides
there. So the depths between 40% and 50% are where the text band still fails, as 30-40%
did before: the steps interval's depth terms, held at their 50% values below 50%, give
real runs too little time there. The next candidate is a range that starts at 50%. Choosing
it now would make round 10 a development round, so it would need another fresh one. The
library keeps 40-95%: it beat the first choice on these tasks. `loss_band` (SGD's paths)
held none of the minibatch cells' two-sided steps (0 of 340)."""


READING = """**Reading** (the first and only run of the band on these tasks, 2026-12-01). Protocol:
the depth range was chosen on the development tasks and committed (8d22f7f) before the
held-out run. That run was restarted once (96e787a: text tasks first; the band's code
unchanged) and stopped at a time set in advance (14:30). A second session resumed the
unfinished tasks on the same band (30-95% for every body; that part of the library did
not change until 7dd899e). It stopped early, at 15:39, to free a core for round 10
("loss-interval-kind"); nothing was chosen from its output. So chess-lite0 has all 24 of
its cells, marks-lite1 has 7 and misc-lite1 none. The cells run in the stored rounds'
order, fixed before any result.

On the 129 held-out cells whose real run dropped 90%, the band has both edges on 55% of the
steps, and there it held the real loss on **84%** of them (it was chosen for 80% on the
development tasks, where it held 81%). The rest were 11% of the steps above the band (the
real run slower than the band) and 5% below. Per cell the median coverage was 98%; 65 of
101 cells reached 80% or more.

By kind it is uneven: **image tasks 90%, text tasks 73%**. On the text tasks the real runs
were above the band on 26% of their steps, though the steps intervals at the 50/80/90%
drops covered 98% of round 6's text targets and 96% of round 7's. The misses fall at
depths below 50%, where the steps interval extrapolates ("loss-interval-kind").

By loss: MSE 83% (full batch) and 84% (B = 32); CE 94% and 85%, with fewer two-sided
steps under CE (21% and 27%: CE runs are short and their intervals wide). The one-sided
stretches held: 100% of the late steps bounded only from below and 93% of the early ones
bounded only from above. SGD's sample-path band of the same forecasts (`loss_band`) held
the real minibatch loss on 1% of the same steps, as issue 13 found for the tangent model
(0-14%): it measures the model's noise, not its error.

Where the real run stalled or blew up (22 cells, not in the pooled row), the band says the
loss will have dropped, and mostly it has only its upper edge there: the real loss was
below that edge on 26% of those 11,138 steps. The band does not predict divergence or
stalling; `Forecast.diverges` and the reliability check speak to that."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", choices=sorted(TASKS), help="one task (repeat)")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    ap.add_argument("--report-kind", action="store_true",
                    help="RESULTS.md section of the per-kind choice and round 10 only")
    ap.add_argument("--choose", action="store_true", help="the depth range, on the --dev tasks")
    ap.add_argument("--choose-kind", action="store_true",
                    help="the depth range per kind of body, on the --dev tasks")
    ap.add_argument("--dev", action="append", choices=sorted(DEV),
                    help="a development task (repeat)")
    ap.add_argument("--fetch", action="store_true", help="print where the rounds' data is")
    ap.add_argument("--fresh", action="append", choices=sorted(FRESH),
                    help="a round-10 task: its real runs, then its band (repeat)")
    ap.add_argument("--choose-third", action="store_true",
                    help="the transformer bodies' range again, round 10 among the development")
    ap.add_argument("--fresh11", action="append", choices=sorted(FRESH11),
                    help="a round-11 task: its real runs, then its band (repeat)")
    ap.add_argument("--report-third", action="store_true",
                    help="RESULTS.md section of the third choice and round 11 only")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.fetch:
        print(f"{hl.FORTUNES} {ho._opencv_dir(fetch=True)} {fr._skimage_dir(fetch=True)}")
        return
    if a.choose:
        choose()
        return
    if a.choose_kind:
        choose_kind()
        return
    if a.report_kind:
        report_kind()
        return
    if a.choose_third:
        choose_third()
        return
    if a.report_third:
        report_third()
        return
    if a.dev:
        for name in a.dev:
            run_task(name, OUT / "dev")
        return
    for names, tasks, sub in ((a.fresh, FRESH, "round10"), (a.fresh11, FRESH11, "round11")):
        for name in names or ():
            fr.run_tasks(tasks, [name], FRESH_OUT)  # the real runs, then the band's scores
            run_task(name, OUT / sub)
    if a.fresh or a.fresh11:
        return
    if not a.report:
        for name in a.task or TASKS:
            run_task(name)
    report()


if __name__ == "__main__":
    main()

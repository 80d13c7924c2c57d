"""The frozen pilot-clock method on the four held-out tasks of ``holdout.py`` (issue 13), once.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/holdout_pilot.py --calibrate
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/holdout_pilot.py --task NAME
        [--pilots-only: kernels and pilots only | --verify: also every other cell]
    .venv/bin/python benchmarks/holdout_pilot.py --report         # RESULTS.md section only

**What was frozen, and where.** The method was chosen on the three development examples
only (``benchmarks/pilot.py``, RESULTS.md "pilot": variant "head-body + clock sweep n25,
stop at 90%"), before these tasks were touched by it:

- per loss (MSE, CE) ONE real pilot: full batch, momentum 0, the lr of the task's
  ``<loss>-full-m0-a1`` cell (``tl.stable_lr(kernel, momentum=0, fraction=1, loss=loss)``
  on the full-N tangent kernel, as ``holdout.py``), on a random 25% of the N samples
  (``pilot_subset(..., 0.25, seed=0)``), stopped at its first logged loss <= 0.1 L0 (the
  90% drop) or at ``holdout.H_CAP`` = 1,500 steps (the held-out protocol's cap on a run;
  in the development runs the cap was the cell's fixed horizon);
- the head-body forecast of that same pilot on the subset's own head-body kernel
  (``compute_head_body_kernel`` with the task's projection), over ``pilot.FC_FACTOR`` = 4x
  the cap;
- ``fit_pilot_clock(real, forecast, knots=16, scale="loss")`` and, for every cell of that
  loss, ``apply_clock(head-body forecast of the cell, clock, mode="rate")``.

**The cells' forecasts.** The stored head-body forecasts of ``holdout.py`` stop at 2x the
real run's steps, so a crossing later than that is unknown and no clock can bring it in.
Each cell's head-body forecast is recomputed on the full-N head-body kernel (recomputed
here with ``holdout._kernels``: same task, samples, seeds, options) over H = min(10 x the
real run's steps, ``FC_CAP`` = 3,000) steps, same seed and (minibatch) paths. The forecast
is causal (path p's batches come from its own generator, step by step), so its first 2x
steps must equal the stored curve: the maximum difference is recorded per cell. Cells
whose stored 2x curve already crosses every level a score needs (every drop the real run
reaches, or it diverged first) have the same scores on any longer horizon; they are
recomputed last (``--verify``), and scored on the stored curve until they are. A
recomputed curve is stored up to its first step at or below 0.1 L0 of the real run (the
deepest target) plus a margin of 100 + half as many steps (the scores read every 2nd step
with B = 32, and the corrected curve interpolates between warped steps); nothing later
changes a score.

**Scoring** (``holdout.targets``: targets at 50%, 80%, 90% drops of the real initial loss,
T = first logged real step below, T̂ = the same on the forecast on the run's grid, a miss
= +inf). Horizons: stored rows as in ``holdout.py`` (2x); "10x" rows: plain head-body up
to H forecast steps, the clock-corrected curve on steps 0..10x the real run's steps (the
part of it the H forecast steps cover).

**Interval**: [T̂ e^{q10}, T̂ e^{q90}] with q10 / q90 the 10% / 90% quantiles of
log(T / T̂) of the frozen variant on the development examples (``--calibrate``, from
``benchmarks/results/pilot/*.json`` only; printed, then frozen in ``BAND``).

Results: ``benchmarks/results/holdout_pilot/<task>.json``; RESULTS.md "holdout-pilot".
"""

from __future__ import annotations

import argparse
import datetime
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
import pilot as dev  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from forecast_accuracy import _commit  # noqa: E402
from forecast_accuracy import _targets as _dev_targets  # noqa: E402
from headbody import _fmt  # noqa: E402
from holdout import _errs  # noqa: E402
from tangentlab.experimental.pilot import apply_clock, fit_pilot_clock, pilot_subset  # noqa: E402
from tangentlab.headbody import compute_head_body_kernel  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "holdout_pilot"
COMMAND = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/holdout_pilot.py"
PILOT_FRACTION, PILOT_SEED = dev.SIZES["n25"]  # (0.25, 0)
KNOTS, FC_FACTOR, STOP = dev.KNOTS, dev.FC_FACTOR, dev.STOP  # 16, 4, 0.9
SCALE, MODE = "loss", "rate"
HORIZON = 10  # the cells' forecasts: 10x the real run's steps ...
FC_CAP = 3000  # ... capped at this many steps
DEEPEST = max(ho.DROPS)

# Frozen from the development examples (``--calibrate``, run before any held-out pilot):
# 10% / 90% quantiles of log(T / T̂) of "head-body + clock sweep n25, stop at 90%" over the
# examples' 120 scored targets (50% and 80% drops); --calibrate printed (2026-11-30, before
# any held-out pilot ran) q10 = -0.2404, q90 = 0.0645 (dev check: 2% / 27%, no miss).
BAND = (-0.2404, 0.0645)


def _r6(x) -> list[float | None]:
    """A curve for JSON: 6 significant digits, None for non-finite values."""
    return [float(f"{v:.6g}") if np.isfinite(v) else None for v in np.asarray(x, dtype=float)]


def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, separators=(",", ":")))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# The development band (examples only).
# ---------------------------------------------------------------------------------------


def calibrate() -> tuple[float, float]:
    """q10 / q90 of log(T / T̂) of the frozen variant on the development examples."""
    v = ("head-body + clock sweep n25, stop at 90%", "head_body", "sweep", "n25", MODE, SCALE,
         STOP)  # fmt: skip
    r, errs = [], []
    for name in dev.CASES:
        st = json.loads((dev.OUT / f"{name}.json").read_text())
        ref, hb = dev._cells_for(name)
        for key, c in ref.items():
            curve = dev._curve(st, key, c, hb[key], v)
            for t in _dev_targets(dict(c, fc_loss=curve)).values():
                if t["status"] == "unreached":
                    continue
                errs.append(t["err"])
                r.append(math.log(t["T"] / t["T_hat"]) if t["T_hat"] else -math.inf)
    lo, hi = np.quantile(np.asarray(r), [0.1, 0.9])
    print(f"dev check: {v[0]}: {_fmt(errs)} (RESULTS.md 'pilot' reports 2% / 27%, no miss)")
    print(f"dev band from {len(r)} targets: log(T/T̂) q10 = {lo:.4f}, q90 = {hi:.4f}")
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------


def _no_reliability() -> None:
    """Skip the head-body forecast's reliability side-forecast (NOTE [reliability check] in
    tangentlab.forecast): it only annotates ``fc.method`` and may warn; the loss curve is
    unchanged. Saves a second (tangent) forecast per call."""
    sys.modules["tangentlab.forecast"]._reliability = lambda *a, **k: None


def _levels_needed(c: dict) -> list[float]:
    """Loss levels of the drops the real run reaches (the only ones a score reads)."""
    l0 = c["run_loss"][0]
    return [(1.0 - float(d)) * l0 for d, t in ho.targets(c, "hb_loss").items()
            if t["status"] != "unreached"]  # fmt: skip


def _decided(c: dict) -> bool:
    """Whether the stored 2x head-body curve already decides every score: it crosses every
    level the real run reaches, or it diverged before (any longer horizon changes nothing)."""
    fc = _arr(c["hb_loss"])
    if not np.all(np.isfinite(fc)):
        return True
    return all(np.nanmin(fc) <= lev for lev in _levels_needed(c))


def _horizon(c: dict) -> int:
    return min(HORIZON * c["steps"], FC_CAP)


def _truncate(fc: np.ndarray, l0: float) -> np.ndarray:
    """The forecast up to its first step at or below the deepest target, plus a margin of
    100 + half that many steps: scores read the curve on the run's grid (every 2nd step
    with B = 32) and the clock-corrected curve interpolates between warped steps, so a few
    points past the crossing are needed; nothing further changes a score."""
    hit = np.flatnonzero(fc <= (1.0 - DEEPEST) * l0)
    return fc[: hit[0] + 101 + hit[0] // 2] if hit.size else fc


class _Reached(KeyboardInterrupt):
    """Raised from the logged loss once the pilot has made the progress it needs (as
    ``holdout._Reached``: ``finetune``'s interruption path returns the run so far)."""


def _run_to(task: dict, data: tuple, opt, loss: str, drop: float):
    """``holdout._real`` on ``data``, full batch, stopped at the first logged loss <=
    (1 - drop) L0 or at ``holdout.H_CAP`` steps (``_real`` hard-codes drop = 90%)."""
    ftm = sys.modules["tangentlab.finetune"]
    original = ftm._Run.log

    def log(run, step, *args, **kwargs):  # holdout._real's hook predates the ``held`` arg
        ok = original(run, step, *args, **kwargs)
        if ok and step > 0 and run.losses[-1] <= (1.0 - drop) * run.losses[0]:
            raise _Reached
        return ok

    ftm._Run.log = log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tl.finetune(task["top"], data, opt, ho.H_CAP, loss=loss, batch_size=None,
                               params=task["params"], log_every=1, seed=ho.SEED,
                               progress=False)  # fmt: skip
    finally:
        ftm._Run.log = original


def _pilot(task: dict, sub: tuple, hb_sub, loss: str, lr: float) -> dict:
    """One sweep pilot: its head-body forecast over FC_FACTOR x H_CAP, the real run on the
    subset (stopped at the 90% drop or H_CAP), the clock.

    NOTE [pilot early stop]. The clock reads the real pilot only up to the progress its
    forecast reaches (p_K = min of the two curves' progress). When the forecast's own
    progress p_f stays below the 90% drop (a forecast that diverges or stalls), the real
    pilot is stopped at its first step with progress >= p_f instead: every real step
    after that is ignored by the fit, so the clock is the one of the frozen rule (run to
    the 90% drop or H_CAP); only the time is saved. Its cost as the frozen rule would run
    it is then at most H_CAP steps (``cost_cap_*``, an upper bound)."""
    xs, ys = sub
    opt = tl.SGD(lr, momentum=0.0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = np.asarray(tl.forecast(hb_sub, opt, FC_FACTOR * ho.H_CAP, loss=loss).loss, float)
    fc_s = time.perf_counter() - t0
    fin = np.isfinite(fc)
    end = int(np.flatnonzero(~fin)[0]) if not fin.all() else fc.size
    p_f = float(1.0 - np.min(fc[:end]) / fc[0])
    drop = min(STOP, p_f)
    t0 = time.perf_counter()
    run = _run_to(task, (xs, ys), opt, loss, drop)
    wall = time.perf_counter() - t0
    real = np.asarray(run.loss, dtype=float)
    steps = int(run.steps[-1])
    out = dict(loss=loss, lr=lr, n=int(ys.shape[0]), steps=steps, stop_drop=drop,
               forecast_progress=p_f, early_stop=drop < STOP,
               reached_stop=bool(real[-1] <= (1.0 - drop) * real[0]),
               diverged=bool(run.diverged), train_seconds=run.train_seconds,
               eval_seconds=run.eval_seconds, wall_seconds=wall, forecast_seconds=fc_s,
               real_loss=_r6(real))  # fmt: skip
    if drop < STOP and out["reached_stop"]:  # the frozen rule would have run on
        out["cost_cap_steps"] = ho.H_CAP
        out["cost_cap_wall_seconds"] = wall * ho.H_CAP / max(steps, 1)
    try:
        clock = fit_pilot_clock(real, fc, real_steps=run.steps, knots=KNOTS, scale=SCALE)
        out["clock"] = clock.to_dict()
        top = clock.progress[-1]
        # keep the forecast up to its first step at the clock's last knot: refitting on
        # it gives the same clock (the fit reads nothing later)
        q = 1.0 - np.minimum.accumulate(fc[:end]) / fc[0]
        hit = np.flatnonzero(q >= top)
        keep = fc[: hit[0] + 1] if hit.size else fc[:end]
    except tl.TangentlabError as e:  # recorded: the method then has no clock for this loss
        out["clock_error"] = str(e)
        keep = fc[:end]
    out["forecast_loss"] = _r6(keep)
    return out


def run_task(name: str, verify: bool = False, pilots_only: bool = False) -> dict:
    hold = json.loads((ho.OUT / f"{name}.json").read_text())["cells"]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("code", _commit())
    state.setdefault("machine", machine())
    state.setdefault("date", datetime.date.today().isoformat())
    task, kernel, hb, tan_s, hb_s = ho._kernels(name)
    n_total = int(task["y"].shape[0])
    if "kernel" not in state:
        lrs = {}
        for loss in ho.LOSSES:
            for key, c in hold.items():
                if c["loss"] != loss:
                    continue
                lr = tl.stable_lr(kernel, momentum=c["momentum"], fraction=c["lr_factor"],
                                  loss=loss)  # fmt: skip
                lrs[key] = abs(lr / c["lr"] - 1.0)
        state["kernel"] = dict(num_samples=n_total, tangent_seconds=tan_s,
                               head_body_seconds=hb_s, trunk_seconds=task["trunk_seconds"],
                               lr_max_rel_diff=max(lrs.values()))  # fmt: skip
        print(f"[{name}] kernels: tangent {tan_s:.1f}s, head-body {hb_s:.1f}s; stored vs "
              f"recomputed lr: max rel diff {max(lrs.values()):.2e}", flush=True)  # fmt: skip
        _save(path, state)
    pilots = state.setdefault("pilots", {})
    if any(loss not in pilots for loss in ho.LOSSES):
        cfg = ho.TASKS[name]
        sub, idx = pilot_subset((task["x"], task["y"]), PILOT_FRACTION, seed=PILOT_SEED)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hb_sub = compute_head_body_kernel(task["top"], sub, params=task["params"],
                                              projection=cfg["projection"],
                                              progress=False)  # fmt: skip
            hb_sub.problem()
        state["subset"] = dict(n=int(idx.size), seed=PILOT_SEED, indices=idx.tolist(),
                               head_body_kernel_seconds=time.perf_counter() - t0)  # fmt: skip
        for loss in ho.LOSSES:
            if loss in pilots:
                continue
            lr = hold[f"{loss}-full-m0-a1"]["lr"]
            pilots[loss] = p = _pilot(task, sub, hb_sub, loss, lr)
            ck = p.get("clock")
            print(f"[{name}] pilot {loss}: n = {p['n']}, {p['steps']} steps, real "
                  f"{p['real_loss'][0]:.4g} -> {min(x for x in p['real_loss'] if x):.4g}, "
                  f"wall {p['wall_seconds']:.1f}s, forecast {p['forecast_seconds']:.1f}s; "
                  + (f"clock progress {ck['progress'][-1]:.3f}, speed-ups "
                     + ", ".join(f"{1 / s:.2f}" for s in np.diff(ck['real_steps'])
                                 / np.diff(ck['forecast_steps']))
                     if ck else f"NO CLOCK: {p['clock_error']}"), flush=True)  # fmt: skip
            _save(path, state)
    cells = state.setdefault("cells", {})
    if pilots_only:
        return state
    # cells whose stored curve leaves a reached target uncrossed and whose horizon grows
    # (a real run capped at H_CAP already had FC_CAP = 2x), cheapest first
    longer = [k for k, c in hold.items() if not _decided(c) and _horizon(c) > c["fc_steps"]]
    longer.sort(key=lambda k: _horizon(hold[k]) * (hold[k]["batch_size"] is not None))
    todo = longer + ([k for k in hold if k not in longer] if verify else [])
    _no_reliability()
    for key in todo:
        if key in cells and "hb_loss" in cells[key]:
            continue
        c = hold[key]
        h = _horizon(c)
        opt = tl.SGD(c["lr"], momentum=c["momentum"])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = tl.forecast(hb, opt, h, loss=c["loss"], batch_size=c["batch_size"],
                             seed=ho.SEED)  # fmt: skip
        secs = time.perf_counter() - t0
        x = np.asarray(fc.loss, dtype=float)
        old = _arr(c["hb_loss"])
        m = min(old.size, x.size)
        same_nan = bool(np.array_equal(np.isfinite(old[:m]), np.isfinite(x[:m])))
        ok = np.isfinite(old[:m]) & np.isfinite(x[:m])
        diff = float(np.max(np.abs(old[:m][ok] - x[:m][ok]) / abs(old[0]), initial=0.0))
        cells[key] = dict(horizon=h, seconds=secs, decided_by_stored=_decided(c),
                          prefix_points=m, max_rel_diff=diff, same_nan=same_nan,
                          diverges=bool(fc.diverges),
                          hb_loss=_r6(_truncate(x, c["run_loss"][0])))  # fmt: skip
        print(f"[{name}] {key}: H = {h} ({secs:.1f}s), max |new - stored| / L0 over "
              f"{m} steps = {diff:.2e}{'' if same_nan else ' (NaN pattern differs)'}",
              flush=True)  # fmt: skip
        _save(path, state)
    return state


# ---------------------------------------------------------------------------------------
# Scoring and report.
# ---------------------------------------------------------------------------------------


def _clock_of(state: dict, loss: str):
    from tangentlab.experimental.pilot import PilotClock

    d = state["pilots"][loss].get("clock")
    if d is None:
        return None
    return PilotClock(progress=np.array(d["progress"]), real_steps=np.array(d["real_steps"]),
                      forecast_steps=np.array(d["forecast_steps"]), scale=d["scale"],
                      info=d["info"])  # fmt: skip


def _scored(name: str, state: dict) -> list[dict]:
    """Every stored cell with the curves of each method (keys of METHODS)."""
    hold = json.loads((ho.OUT / f"{name}.json").read_text())["cells"]
    clocks = {loss: _clock_of(state, loss) for loss in ho.LOSSES}
    out = []
    for key, c in hold.items():
        new = state.get("cells", {}).get(key)
        if new is not None and "hb_loss" not in new:
            new = None  # only checked (an earlier pass): the stored curve
        hb10 = _arr(new["hb_loss"]) if new else _arr(c["hb_loss"])
        ck = clocks[c["loss"]]
        stored = _arr(c["hb_loss"])
        if ck is None:  # no clock: the method leaves the forecast as it is
            c2, c10 = stored, hb10
        else:
            c2 = apply_clock(stored, ck, horizon=c["fc_steps"], mode=MODE)
            c10 = apply_clock(hb10, ck, horizon=HORIZON * c["steps"], mode=MODE)
        out.append(dict(c, key=key, hb10_loss=hb10, clock2_loss=c2, clock10_loss=c10,
                        recomputed=new is not None))  # fmt: skip
    return out


METHODS = {
    "tangent (stored, 2x)": "tangent_loss",
    "head-body (stored, 2x)": "hb_loss",
    "head-body, 10x": "hb10_loss",
    "head-body + clock, 2x": "clock2_loss",
    "head-body + clock, 10x": "clock10_loss",
}


def _coverage(cells: list[dict], band, drops=("0.5", "0.8", "0.9")) -> tuple[int, int]:
    inside = total = 0
    for c in cells:
        for d, t in ho.targets(c, "clock10_loss").items():
            if d not in drops or t["status"] == "unreached":
                continue
            total += 1
            if t["T_hat"] is not None:
                inside += (t["T_hat"] * math.exp(band[0]) - 1e-9 <= t["T"]
                           <= t["T_hat"] * math.exp(band[1]) + 1e-9)  # fmt: skip
    return inside, total


def _reliability(cells: list[dict]) -> dict:
    """holdout.py's check (ρ = T̂_tangent / T̂_head-body > 2, stored 2x forecasts, no
    training) against the clock-corrected error > 25% (a miss is bad)."""
    return ho.reliability(cells, judged="clock10_loss")


def _cost_lines(states: dict, scored: dict) -> list[str]:
    lines = [
        "| task | n / N | loss | pilot steps | pilot samples (n x steps) | vs each cell's "
        "real run: full batch, median (range) | minibatch | vs the loss's 12 real runs | "
        "pilot seconds (run, kernel / 2, forecast) | vs each cell's real seconds, median "
        "(range) | vs the 12 runs' seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in states.items():
        n_total = st["kernel"]["num_samples"]
        ks = st["subset"]["head_body_kernel_seconds"]
        for loss in ho.LOSSES:
            p = st["pilots"][loss]
            cs = [c for c in scored[name] if c["loss"] == loss]
            samples = p["n"] * p["steps"]
            share = 0.5 * ks  # the subset's kernel serves both pilots
            secs = p["wall_seconds"] + share + p["forecast_seconds"]
            full = np.array([samples / (c["steps"] * n_total) for c in cs
                             if c["batch_size"] is None])  # fmt: skip
            mini = np.array([samples / (c["steps"] * c["batch_size"]) for c in cs
                             if c["batch_size"] is not None])  # fmt: skip
            tot = sum(c["steps"] * (c["batch_size"] or n_total) for c in cs)
            rs = np.array([secs / c["real_seconds"] for c in cs])
            tot_s = sum(c["real_seconds"] for c in cs)
            real = _arr(p["real_loss"])
            at_stop = bool(real[-1] <= (1.0 - STOP) * real[0])  # the frozen rule's stop too
            if at_stop:
                how = "90% drop"
            elif p["early_stop"] and p["reached_stop"]:
                how = f"forecast's progress {p['forecast_progress']:.2f}, NOTE [pilot early stop]"
            else:
                how = "cap"
            sweep = f"{samples / tot:.1%}"
            sweep_s = f"{secs / tot_s:.1%}"
            if "cost_cap_steps" in p and not at_stop:  # the frozen rule's upper bound
                cap_s = p["cost_cap_wall_seconds"] + share + p["forecast_seconds"]
                sweep += f" (frozen rule <= {p['n'] * p['cost_cap_steps'] / tot:.1%})"
                sweep_s += f" (<= {cap_s / tot_s:.1%})"

            def rng(a, fmt="{:.1%}"):
                return (f"{fmt.format(np.median(a))} ({fmt.format(a.min())}–"
                        f"{fmt.format(a.max())})")  # fmt: skip

            lines.append(
                f"| {name} | {p['n']} / {n_total} | {loss} | {p['steps']} ({how}) | "
                f"{samples:,} | {rng(full)} | {rng(mini)} | {sweep} | "
                f"{p['wall_seconds']:.1f} + {share:.1f} + {p['forecast_seconds']:.1f} | "
                f"{rng(rs, '{:.2f}x')} | {sweep_s} |"
            )
    return lines


def report() -> None:
    states = {}
    for name in ho.TASKS:
        p = OUT / f"{name}.json"
        if p.exists():
            st = json.loads(p.read_text())
            if all(loss in st.get("pilots", {}) for loss in ho.LOSSES):
                states[name] = st
    if not states:
        raise SystemExit("holdout_pilot: no finished task yet; run the benchmark first")
    scored = {name: _scored(name, st) for name, st in states.items()}
    pooled = [c for cs in scored.values() for c in cs]
    s0 = next(iter(states.values()))
    missing = [t for t in ho.TASKS if t not in states]
    lines = [
        "## Held-out tasks: the frozen pilot clock (`benchmarks/holdout_pilot.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --calibrate`, then per task, one at a time, `{COMMAND} --task "
        "T --pilots-only` (all four), `--task T` (the cells that need a longer forecast) and "
        f"`--task T --verify` (the rest), then `--report`. Machine: {s0['machine']}, shared "
        "with other work (seconds "
        f"are inflated by a varying load). Code {s0['code']}. Date {s0['date']}."
        + (f" **Not run (out of time): {', '.join(missing)}.**" if missing else ""),
        "",
        "**What ran.** The method chosen on the three development examples only "
        '(`benchmarks/pilot.py`, section "pilot": "head-body + clock sweep n25, stop at '
        '90%"), frozen, applied once to the four held-out tasks of `benchmarks/holdout.py` '
        "(same samples, seeds, trainable weights, trunk cache, real runs — read from "
        "`benchmarks/results/holdout/`): per loss ONE real full-batch pilot (momentum 0, lr "
        "of the task's `<loss>-full-m0-a1` cell, a random 25% of the N samples, seed 0, "
        f"stopped at its first 90% drop or at {ho.H_CAP} steps), its head-body forecast on "
        f"the subset's own kernel ({FC_FACTOR}x {ho.H_CAP} steps), `fit_pilot_clock` "
        f"({KNOTS} knots, p = 1 − L/L0), `apply_clock` (local slope) to every cell of that "
        "loss. Nothing was tuned on these tasks. These four tasks were used once before, to "
        'score the tangent and head-body methods (section "holdout"); they were not used '
        "while developing the pilot method, but its authors had seen those results.",
        "",
        f"Horizons: each cell's head-body forecast recomputed over H = min({HORIZON}x the "
        f"real run's steps, {FC_CAP}) steps (cells whose stored 2x curve already decides "
        "every score keep it, see the check below); the clock-corrected curve is scored on "
        f"steps 0..{HORIZON}x the real run's steps (the part the H forecast steps cover), "
        "plain head-body 10x on its H steps, the stored rows on 2x as in `holdout.py`. "
        "Entries: median / p90 of |T̂ − T|/T (targets scored, misses); a miss = +∞.",
        "",
    ]
    # forecasts check: every recomputation (a first pass recomputed all 96 cells)
    checks = {}
    for n, st in states.items():
        for k, c in st.get("first_recompute_check", {}).items():
            checks[(n, k)] = dict(c, decided_by_stored=False)
        for k, c in st.get("cells", {}).items():
            checks[(n, k)] = c
    if checks:
        used = sum(c["recomputed"] for c in pooled)
        big = sorted(((c["max_rel_diff"], f"{n}/{k}") for (n, k), c in checks.items()
                      if c["max_rel_diff"] > 1e-4), reverse=True)  # fmt: skip
        small = max((c["max_rel_diff"] for c in checks.values() if c["max_rel_diff"] <= 1e-4),
                    default=0.0)  # fmt: skip
        nan_bad = [f"{n}/{k}" for (n, k), c in checks.items() if not c["same_nan"]]
        used_keys = {(n, c["key"]) for n, cs in scored.items() for c in cs if c["recomputed"]}
        dec = max((c["max_rel_diff"] for nk, c in checks.items() if nk not in used_keys),
                  default=0.0)  # fmt: skip
        if used == len(pooled):
            which_used = f". The scores use the recomputed curves (all {used} cells). Stored vs "
        else:
            which_used = (f". The scores use the recomputed curve for {used} cells and the "
                          "stored curve for the others (their recomputed curves differ from the "
                          f"stored by <= {dec:.1e} L0). Stored vs ")  # fmt: skip
        lines += [
            f"Re-forecast check: {len(checks)} of {len(pooled)} cells recomputed over H with "
            "the recomputed full-N head-body kernel and compared with the stored curves over "
            f"their 2x steps: max |new − stored| / L0 <= {small:.1e} except "
            + ", ".join(f"{k} {d:.2g}" for d, k in big)
            + (f"; NaN pattern differs in {', '.join(nan_bad)}" if nan_bad else "")
            + which_used
            + "recomputed lr of every cell (tangent kernel), max relative difference: "
            + ", ".join(f"{n} {st['kernel']['lr_max_rel_diff']:.0e}" for n, st in states.items())
            + ".",
            "",
        ]
    lines += ["| task | loss | drop | " + " | ".join(METHODS) + " |",
              "|---|---|---|" + "---|" * len(METHODS)]  # fmt: skip
    groups = list(scored.items()) + [("**all held-out**", pooled)]
    for k, cs in groups:
        for loss in ho.LOSSES:
            for d in ("0.5", "0.8", "0.9"):
                row = [_fmt(_errs(cs, w, loss, d)) for w in METHODS.values()]
                lines.append(f"| {k} | {loss} | {float(d):.0%} | " + " | ".join(row) + " |")
        row = [_fmt(_errs(cs, w)) for w in METHODS.values()]
        lines.append(f"| {k} | all | all | " + " | ".join(row) + " |")
    lines += ["", "Pooled by method, 50% and 80% drops only (issue 13's goals: median <= 15%, "
              "p90 <= 35% at each, for each loss):", "",
              "| method | " + " | ".join(f"{loss} {d}" for loss in ho.LOSSES
                                         for d in ("50%", "80%")) + " |",
              "|---|" + "---|" * 4]  # fmt: skip
    for lab, w in METHODS.items():
        row = [_fmt(_errs(pooled, w, loss, d)) for loss in ho.LOSSES for d in ("0.5", "0.8")]
        lines.append(f"| {lab} | " + " | ".join(row) + " |")
    # clocks
    lines += ["", "The pilots and their clocks (speed-up c = 1/σ of the real pilot over its "
              "head-body forecast, at 0.1, 0.3, 0.5, 0.7, 0.9 of the knots' progress range):",
              "", "| task | loss | lr | n | steps | real min L / L0 | real / forecast progress "
              "| knots up to p = | speed-up c(p) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, st in states.items():
        for loss in ho.LOSSES:
            p = st["pilots"][loss]
            real = _arr(p["real_loss"])
            ck = _clock_of(st, loss)
            if ck is None:
                tail = f"– | – | no clock: {p['clock_error'][:120]} |"
            else:
                cc = 1.0 / ck.slope_at(np.array([0.1, 0.3, 0.5, 0.7, 0.9]) * ck.progress[-1])
                tail = (
                    f"{ck.info['real_progress']:.3f} / {ck.info['forecast_progress']:.3f} "
                    f"| {ck.progress[-1]:.3f} | " + ", ".join(f"{v:.2f}" for v in cc) + " |"
                )
            lines.append(f"| {name} | {loss} | {p['lr']:.3g} | {p['n']} | {p['steps']} | "
                         f"{np.nanmin(real) / real[0]:.3f} (max {np.nanmax(real) / real[0]:.3g}) "
                         f"| " + tail)  # fmt: skip
    # interval and reliability
    band = BAND
    lines += ["", f"Interval [T̂ e^{{q10}}, T̂ e^{{q90}}] on the clock-corrected (10x) curve, "
              f"q10 = {band[0]:.3f}, q90 = {band[1]:.3f} (frozen from the development "
              "examples' pilot-corrected head-body targets, `--calibrate`): coverage of the "
              "real T (a miss is not covered; issue 13 asks >= 80%). Reliability: "
              f"`holdout.py`'s check ρ = T̂_tangent / T̂_head-body > {ho.RHO_FLAG:g} (no "
              "training) against a clock-corrected error > 25%.", "",
              "| task | covered, 50% + 80% | covered, all drops | flagged | bad | flagged and "
              "bad | precision | recall |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, cs in groups:
        a, at = _coverage(cs, band, ("0.5", "0.8"))
        b, bt = _coverage(cs, band)
        r = _reliability(cs)
        prec = f"{r['hit'] / r['flagged']:.0%}" if r["flagged"] else "–"
        rec_ = f"{r['hit'] / r['bad']:.0%}" if r["bad"] else "–"
        lines.append(f"| {k} | {a}/{at} ({a / max(at, 1):.0%}) | "
                     f"{b}/{bt} ({b / max(bt, 1):.0%}) | {r['flagged']} | {r['bad']} | "
                     f"{r['hit']} | {prec} | {rec_} |")  # fmt: skip
    ratios = ho.log_ratios(pooled, "clock10_loss")
    if ratios:
        q = np.quantile(ratios, [0.1, 0.5, 0.9])
        lines += ["", f"Held-out log(T / T̂) of the corrected forecast (reached targets, no "
                  f"miss; {len(ratios)}): q10 {q[0]:.3f}, median {q[1]:.3f}, q90 {q[2]:.3f} "
                  f"(T / T̂ = {math.exp(q[0]):.2f}, {math.exp(q[1]):.2f}, "
                  f"{math.exp(q[2]):.2f})."]  # fmt: skip
    # what the clock did against what was needed
    lines += ["", "What the clock did, per task and loss: medians over the targets both curves "
              "reach of T / T̂ (the factor a perfect correction applies to the head-body "
              "forecast) and of T̂_clock / T̂ (the factor the pilot's clock applied); T̂ = "
              "head-body 10x.", "",
              "| task | loss | targets | needed T / T̂ | applied T̂_clock / T̂ | |log error| "
              "head-body → + clock, median |", "|---|---|---|---|---|---|"]  # fmt: skip
    for k, cs in groups:
        for loss in ho.LOSSES:
            need, done, e0, e1 = [], [], [], []
            for c in cs:
                if c["loss"] != loss:
                    continue
                th, tc = ho.targets(c, "hb10_loss"), ho.targets(c, "clock10_loss")
                for d, t in th.items():
                    if t["status"] != "ok" or tc[d]["status"] != "ok":
                        continue
                    need.append(t["T"] / t["T_hat"])
                    done.append(tc[d]["T_hat"] / t["T_hat"])
                    e0.append(abs(math.log(t["T"] / t["T_hat"])))
                    e1.append(abs(math.log(t["T"] / tc[d]["T_hat"])))
            if need:
                lines.append(f"| {k} | {loss} | {len(need)} | {np.median(need):.2f} | "
                             f"{np.median(done):.2f} | {np.median(e0):.2f} → "
                             f"{np.median(e1):.2f} |")  # fmt: skip
    # cost
    lines += ["", "Cost of the pilots. Samples = n x pilot steps (each step also evaluates the "
              "n-sample loss once, as the real full-batch runs do) against each real run's "
              "steps x N (full batch) or x 32; seconds = the pilot's run (training and its "
              "logged evaluations), half the subset's head-body kernel, and its forecast, "
              "measured here, against the stored real runs' seconds (trunk + training; "
              "measured on other machines or loads: see `holdout.py`'s notes and cost check). "
              "The full-N head-body kernel (needed by the head-body forecast anyway) is "
              "not counted; recomputed here: "
              + ", ".join(f"{n} {st['kernel']['head_body_seconds']:.1f}s" for n, st
                          in states.items()) + ".", ""]  # fmt: skip
    lines += _cost_lines(states, scored)
    # per cell
    lines += ["", "Per cell: T = real steps to the drop; T̂: head-body stored (2x) / head-body "
              "10x / + clock (10x); `*` = recomputed over H.", "",
              "| task | cell | steps | H | T₅₀ | T̂₅₀ | T₈₀ | T̂₈₀ | T₉₀ | T̂₉₀ |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, cs in scored.items():
        for c in cs:
            t0, t1, t2 = (ho.targets(c, w) for w in ("hb_loss", "hb10_loss", "clock10_loss"))
            row = [f"{t0[d]['T'] or '–'} | {t0[d]['T_hat'] or '–'} / {t1[d]['T_hat'] or '–'} / "
                   f"{t2[d]['T_hat'] or '–'}" for d in ("0.5", "0.8", "0.9")]  # fmt: skip
            h = states[name].get("cells", {}).get(c["key"], {}).get("horizon")
            lines.append(f"| {name} | {c['key']} | {c['steps']} | "
                         f"{f'{h}*' if c['recomputed'] else c['fc_steps']} | "
                         + " | ".join(row) + " |")  # fmt: skip
    lines += ["", READING]
    write_section("holdout-pilot", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading** (the first and only held-out run of the pilot clock, 2026-11-30; the
method and its settings were frozen before it; after it only the scoring bug named
under Protocol was fixed).

- **The frozen method loses on the held-out tasks.** Pooled over the 4 tasks (255 reached
  targets), the head-body forecast on the sweep pilot's clock scores 100% / 488% with 16
  misses, against 88% / 314% with 14 misses for the same head-body forecasts without the
  clock on the same 10x horizon (and 88% / miss, 87 misses, for the stored 2x head-body
  forecasts of `holdout.py`). Issue 13's goals (median <= 15%, p90 <= 35% at the 50% and
  80% drops for both losses) are met by no row pooled over the tasks; per task, only
  scenes-lite1 under MSE meets them (head-body alone 11% / 16% and 8% / 19%; with the
  clock 5% / 8% at the 50% drop but 27% / 36% at the 80% drop). On the development
  examples the same variant gave 2% / 27%; it did not carry over.
- **Most of what looked like a gain is the horizon.** Forecasting 10x instead of 2x the
  real steps turns 73 of the head-body model's 87 misses into scored (late) crossings:
  the head-body forecast is slow, not stuck. The clock cannot do that by itself (on the
  stored 2x curves it misses 112 targets: it slows as many forecasts as it speeds up).
- **MSE: mixed.** The clock helps the deep targets (pooled 80% drop 85% → 62% median,
  90% drop 125% → 45%; convention 76% → 4% at 80%, debates 113% → 68%) and hurts the
  50% drop (20% → 50%). It hurts ocvdigits everywhere (50%: 67% → 209%): its pilot on
  32 of the 128 digits ran *slower* than its own forecast in mid-course (speed-up 0.27–0.39)
  while the full runs are 2.5x faster than theirs, so the clock slows forecasts that were
  already too slow. The text tasks' MSE pilots reach the 90% drop in 9–10 steps on 16
  samples; their clocks jump from 0.13 to 21 between neighbouring knots (16 knots on
  9 steps), so the correction is noisy even where it helps on average (median |log
  error| pooled over MSE 0.46 → 0.36).
- **CE: worse on three of four tasks (better on debates).** The frozen pilot setting (a = 1 of CE's
  stability limit at w0, m = 0) is not stable for the real model on these tasks: three of
  the four CE pilots blew up after 1–3 steps (to 38–754x L0; the full-N real runs at that
  setting never reached a 90% drop either), and ran to the 1,500-step cap, since the frozen
  rule has no divergence stop. Their clocks are measured on the first 1–3 steps (up to
  4–47% progress) and their last slope is held for all later progress: on scenes it slows
  every CE forecast 2.6x (CE 50% drop 28% → 142%), on ocvdigits it is ≈ 1 (the forecast
  diverged as fast as the real pilot). The convention CE pilot converged (90% drop in 10
  steps) but its clock is noisy (0.07–3.2) and slows that task's CE forecasts at the 50%
  and 80% drops. On the
  development examples every n25 CE pilot at a = 1 converged (90% drop in 17–115 steps), so
  nothing there exposed this. Pooled CE: 50% drop 57% → 117%, 80% drop 118% → 187%.
- **Interval.** The band chosen on the development examples, [T̂ e^-0.240, T̂ e^0.065],
  covers 21% of the held-out targets (37 of 175 at the 50% and 80% drops; 53 of 255 with
  the 90% drop); issue 13 asks >= 80%. The corrected forecasts are still mostly slow here
  (median T / T̂ = 0.53; 10% / 90% quantiles 0.27 / 1.00), while on the examples they were
  within -21% / +7%. `holdout.py`'s reliability check (ρ > 2, no training) flags 86
  targets, 77% of them bad after correction (recall 33%).
- **Cost.** MSE pilots stop at the 90% drop after 9–147 steps: 0.2–0.6% of the MSE
  sweep's sample-gradients, a median 2–5% of one full-batch cell (6–19% of a B = 32
  cell), 0.3–3.4% of the sweep's measured seconds. The CE pilots that blew up cost
  24,000–48,000 sample-gradients (8–18% of the CE sweep's; 3.6–14x a median full-batch CE
  cell) and 5–15% of the sweep's seconds; the convention CE pilot, which converged, 0.1%.
  The pilot's seconds are measured on this 2-core machine under load, the real runs' on
  other machines or loads (see `holdout.py`): the sample counts are the reliable figure.
- **Re-forecast check.** The forecasts are causal, and the recomputed curves equal the
  stored ones over the stored 2x steps to <= 9e-5 L0 in 93 of 96 cells. Three ocvdigits
  MSE cells (two full batch at a = 1 and a = 0.3, one B = 32 at a = 1; stored on another
  machine, torch 2.11) differ by 2–27% of L0 after step 150–440, where the head-body
  model's loss bumps (its bilinear dynamics pass near their own stability edge) amplify
  rounding differences of the kernel. All scores use the recomputed curves; the stored
  rows keep the stored curves. One convention cell (mse-full-m0-a1), equal before, is
  marked diverged (NaN) from step 38 in the recomputed curve while the stored one is
  finite to its end (step 42); no score changes.
- **Protocol.** These four tasks had been used once, to score the tangent and head-body
  methods (section "holdout"); they were not used to develop the pilot method, but it was
  developed after those results were known. A fully fresh held-out set would be stronger
  evidence, for or against. Not frozen by `pilot.py` and fixed here before the run: the
  pilot's cap (holdout's 1,500 steps; the examples used the cell's fixed horizon), the
  cells' horizon (10x, capped at 3,000 steps: the 25 cells with more than 300 real steps are
  scored on fewer than 10x) and a compute shortcut for pilots whose forecast stalls or
  diverges below the 90% drop (NOTE [pilot early stop] in the script: same clock, less
  time; it stopped the convention CE pilot at the same step the 90% rule would have).
  The first launch crashed before any pilot trained (`_Run.log` has a new argument), and
  a first scoring pass truncated the recomputed curves too close to the deepest crossing
  (grid and interpolation need a few more steps): fixed and recomputed before this report.
- **What this means.** The pilot clock stays experimental and the default forecast
  unchanged. What a next attempt would need, chosen on development data and tested on
  fresh tasks: a pilot setting that the real model trains stably (CE at a = 1 was not), a
  divergence stop with a fallback to no clock, and a clock smoothed over progress (not 16
  free knots on a 10-step pilot)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", choices=list(ho.TASKS))
    ap.add_argument("--calibrate", action="store_true", help="print the band from the examples")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="also recompute the cells whose stored curve decides every score",
    )
    ap.add_argument("--pilots-only", action="store_true", help="kernels and pilots only")
    ap.add_argument("--report", action="store_true", help="only rebuild the RESULTS section")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.calibrate:
        calibrate()
        return
    if not a.report:
        for name in a.task or list(ho.TASKS):
            run_task(name, verify=a.verify, pilots_only=a.pilots_only)
    report()


if __name__ == "__main__":
    main()

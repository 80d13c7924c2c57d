"""Head exact, body linear vs the tangent model, on the forecast-accuracy cells (issue 13).

    .venv/bin/python benchmarks/headbody.py                   # every case, resumable
    .venv/bin/python benchmarks/headbody.py --case digits-cnn --variant d0
    .venv/bin/python benchmarks/headbody.py --report          # RESULTS.md section only

The real runs are the fresh cells of ``benchmarks/forecast_accuracy.py`` (same examples,
samples, trainable weights, seeds and horizons), read from
``benchmarks/results/forecast_accuracy/fresh/<case>.json``; the loaded data is checked
against them (the same initial loss). Per case and variant, one
``tangentlab.headbody.compute_head_body_kernel`` (the same projection as the tangent
kernel; head = the example's final linear layer), timed next to the tangent kernel and its
eigendecomposition recomputed in the same run (the cost ratio), then every cell is forecast over
the same 2x horizon (``tl.forecast(hb, ...)``, 10 paths for minibatch cells) and scored
with the same rules (``forecast_accuracy._targets``: targets at 50% and 80% drops of the
real initial loss, misses = +∞ counted in medians and p90). Variants (NOTE [head exact,
body linear] in tangentlab.headbody):

- ``default``: Q = rows of W0 + C principal feature directions, 4 probes for κ_⊥;
- ``d0``: Q = rows of W0 only, 4 probes;
- ``p0``: the default Q, no probes (the body does not move outside Q);
- ``d32``: Q = rows of W0 + 32 principal feature directions, 4 probes.

The tangent kernel (and its eigendecomposition) is recomputed and timed in the same run for
the ``default`` variant only (the cost ratio); other variants show "–" there.

These are the examples the method was developed on: the figures choose among variants,
they are not held-out results (issue 13's holdout protocol is separate).
Results: ``benchmarks/results/headbody/<case>-<variant>.json`` and the "headbody" section
of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from _split import cached_inputs  # noqa: E402
from forecast_accuracy import (  # noqa: E402
    CASES,
    DROPS,
    FRESH,
    _commit,
    _pct,
    _quantile,
    _save,
    _stab,
    _targets,
)
from tangentlab.examples import load_example  # noqa: E402
from tangentlab.headbody import compute_head_body_kernel  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "headbody"
COMMAND = ".venv/bin/python benchmarks/headbody.py"
VARIANTS = {
    "default": dict(directions=None, probes=4),
    "d0": dict(directions=0, probes=4),
    "p0": dict(directions=None, probes=0),
    "d32": dict(directions=32, probes=4),
}


def run_case(name: str, variant: str) -> dict:
    ref = json.loads((FRESH / f"{name}.json").read_text())
    cfg = CASES[name]
    path = OUT / f"{name}-{variant}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("code", _commit())
    state.setdefault("machine", machine())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example(name, num_samples=cfg["num_samples"])
    x, y = ex.data
    top, xt, trunk_s = cached_inputs(name, ex.model, x)
    tangent_s = None
    if variant == "default":  # the tangent kernel, timed in this run for the cost ratio
        t0 = time.perf_counter()
        kernel = tl.compute_kernel(top, (xt, y), projection=cfg["projection"],
                                   params=ex.default_params, progress=False)  # fmt: skip
        kernel.eigh()
        tangent_s = time.perf_counter() - t0
        del kernel
    t0 = time.perf_counter()
    hb = compute_head_body_kernel(top, (xt, y), params=ex.default_params,
                                  projection=cfg["projection"], progress=False,
                                  **VARIANTS[variant])  # fmt: skip
    state["kernel"] = dict(seconds=time.perf_counter() - t0, trunk_seconds=trunk_s,
                           tangent_seconds=tangent_s,
                           **hb.metadata)  # fmt: skip
    print(f"[{name}/{variant}] kernel {state['kernel']['seconds']:.1f}s {hb.metadata}", flush=True)
    cells = state.setdefault("cells", {})
    for key, c in ref["cells"].items():
        if key in cells:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), c["fc_steps"],
                             loss=c["loss"], batch_size=c["batch_size"])  # fmt: skip
        l0 = float(fc.loss[0])
        if abs(l0 - c["run_loss"][0]) > 1e-3 * abs(c["run_loss"][0]):
            raise SystemExit(f"{name}: initial loss {l0} differs from the real run's "
                             f"{c['run_loss'][0]}: not the same data/model")  # fmt: skip
        cell = {k: c[k] for k in ("loss", "batch_size", "momentum", "lr_factor", "lr", "steps",
                                  "fc_steps", "run_steps", "run_loss", "fc_loss")}  # fmt: skip
        cell["tangent_fc_loss"] = cell.pop("fc_loss")
        cell["fc_loss"] = [None if not np.isfinite(v) else float(v) for v in fc.loss]
        cell["forecast_seconds"] = time.perf_counter() - t0
        cell["real_seconds"] = c["real_seconds"]
        cell["diverges"] = bool(fc.diverges)
        cells[key] = cell
        t = _targets(cell)
        print(f"[{name}/{variant}] {key}: " + " ".join(
            f"T{d}={t[d]['T']} T^{d}={t[d]['T_hat']} {_pct(t[d]['err'])}" for d in t
        ) + f" fc {cell['forecast_seconds']:.2f}s", flush=True)  # fmt: skip
        _save(path, state)
    return state


def _errs(cells: list[dict], which: str, loss: str | None = None, drop: str | None = None):
    out = []
    for c in cells:
        if loss is not None and c["loss"] != loss:
            continue
        cc = dict(c, fc_loss=c[which])
        for d, t in _targets(cc).items():
            if (drop is None or d == drop) and t["status"] != "unreached":
                out.append(t["err"])
    return out


def _fmt(errs: list[float]) -> str:
    miss = sum(not math.isfinite(e) for e in errs)
    return f"{_pct(_quantile(errs, 0.5))} / {_pct(_quantile(errs, 0.9))} ({len(errs)}, {miss} miss)"


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = [
        "## Head exact, body linear vs the tangent model (`benchmarks/headbody.py`, issue 13)",
        "",
        f"Command: `{COMMAND}` (then `--report`). Real runs: the fresh cells of the forecast "
        "accuracy benchmark (same data, weights, seeds; checked by the initial loss). "
        "Procedure and variants: the script's docstring. **Development examples, not "
        "held-out tasks.** Entries: median / p90 of |T̂ − T|/T (targets scored, misses); "
        "misses (the real run reaches the target, the forecast does not within 2× the "
        "run's steps) count as +∞.",
        "",
        "| case / variant | kernel s (tangent kernel + eigh s, same run) | forecast s (median "
        "cell) | "
        "loss | drop | tangent model | head exact, body linear |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, s in states.items():
        cells = list(s["cells"].values())
        k = s["kernel"]
        ts = k.get("tangent_seconds")
        cost = f"{k['seconds']:.1f} ({'–' if ts is None else f'{ts:.1f}'})"
        fcs = f"{np.median([c['forecast_seconds'] for c in cells]):.2f}"
        for loss in ("mse", "ce"):
            for d in (f"{x:g}" for x in DROPS):
                lines.append(
                    f"| {key} (r = {k['rank']}, probes {k['probes']}) | {cost} | {fcs} | {loss} "
                    f"| {float(d):.0%} | {_fmt(_errs(cells, 'tangent_fc_loss', loss, d))} | "
                    f"{_fmt(_errs(cells, 'fc_loss', loss, d))} |"
                )
        lines.append(
            f"| {key} | | | all | both | {_fmt(_errs(cells, 'tangent_fc_loss'))} | "
            f"**{_fmt(_errs(cells, 'fc_loss'))}** |"
        )
    lines += ["", "Per cell (s = a/(1 − m); T = real steps to the drop, T̂ = forecast):", ""]
    lines += ["| case / variant | cell | s | T₅₀ | T̂₅₀ tangent | T̂₅₀ head-body | T₈₀ | "
              "T̂₈₀ tangent | T̂₈₀ head-body |", "|---|---|---|---|---|---|---|---|---|"]
    for key, s in states.items():
        for ck, c in s["cells"].items():
            tt = _targets(dict(c, fc_loss=c["tangent_fc_loss"]))
            th = _targets(c)
            row = [f"{tt[d]['T'] or '–'} | {tt[d]['T_hat'] or '–'} | {th[d]['T_hat'] or '–'}"
                   for d in ("0.5", "0.8")]  # fmt: skip
            lines.append(f"| {key} | {ck} | {_stab(c):g} | {row[0]} | {row[1]} |")
    write_section("headbody", "\n".join(lines))
    print("\n".join(lines[:40]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES))
    ap.add_argument("--variant", action="append", choices=list(VARIANTS))
    ap.add_argument("--report", action="store_true", help="only rebuild the RESULTS section")
    a = ap.parse_args()
    if not a.report:
        for name in a.case or list(CASES):
            for variant in a.variant or ["default"]:
                run_case(name, variant)
    report()


if __name__ == "__main__":
    main()

"""Do the held-out rounds' minibatch forecasts change with the minibatch path?

NOTE [exact-top minibatch path] (``tangentlab.experimental.exact_top``) changed how a
minibatch forecast on a projected block is computed (s kept, Φ read once a chunk), and the
kernel's capture now computes an eval-mode batch norm as its affine map
(``structured._eval_batch_norm``). Both change the numbers by rounding only, but the
flagged paths are chaotic. This script measures what that does to the forecasts that the
held-out figures were scored on.

For every minibatch cell of the 64-px rounds at the command line's setting (q = 32C,
k = 1024: ``fresh7_now``, ``fresh9_k1024``, ``fresh10_k1024`` of ``twolayer.py``; the
32-px rounds keep M exact, N q <= k, and never take the new path): the library's kernel
computed now, then the cell's forecast exactly as ``twolayer.grid_task`` made it (seed
``GRID_SEED``, the loss read every 2 steps, stopped at the deepest target the real run
reaches) along the step-by-step path (``_path(reference=True)``) and along the minibatch
path; each target's T̂ (the first read step below it) compared between the two, and with
the stored grid's curve (the kernel and path of the round's own run).

    .venv/bin/python benchmarks/minibatch_path.py

Results: section "minibatch-path" of RESULTS.md; per cell in
``results/twolayer/minibatch-path.json`` (resumable per task).
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
import twolayer as tw  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.experimental import exact_top as et  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/minibatch_path.py"
SETS = ("fresh7_now", "fresh9_k1024", "fresh10_k1024")
STATE = tw.OUT / "minibatch-path.json"


def _curve(fc) -> list[float | None]:
    curve: list[float | None] = [None] * (int(fc.steps[-1]) + 1)
    for t, v in zip(fc.steps, fc.loss):
        curve[int(t)] = float(v) if np.isfinite(v) else None
    return curve


def _forecast(etk, c: dict, stop: float, reference: bool):
    real = et._path
    if reference:
        et._path = functools.partial(real, reference=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return et.forecast_exact_top(etk, tl.SGD(c["lr"], momentum=c["momentum"]),
                                         c["fc_steps"], loss=c["loss"],
                                         batch_size=c["batch_size"], seed=tw.GRID_SEED,
                                         stop_below=stop, progress=False,
                                         log_every=2)  # fmt: skip
    finally:
        et._path = real


def run_set(which: str, state: dict) -> None:
    folder, tasks = tw._task_set(which)
    for name, (cells, _) in tasks.items():
        key = f"{which}/{name}"
        if key in state:
            continue
        stored = json.loads((folder / f"{name}-grid.json").read_text())
        task, top, h, y, params = tw._task(name)
        t0 = time.perf_counter()
        etk = tw._library_kernel(name, top, h, y, params, tw.ROUND_Q[which])
        assert etk.features is not None, "a projected block: the minibatch path applies"
        out = dict(kernel_seconds=time.perf_counter() - t0, cells={})
        for ck, c in cells.items():
            if "lr" not in c or c["batch_size"] is None:
                continue
            l0 = float(c["run_loss"][0])
            run = [v for v in c["run_loss"] if v is not None]
            reached = [d for d in ho.DROPS if min(run) <= (1 - d) * l0]
            if not reached:
                continue
            stop = (1 - max(reached)) * l0
            row = dict(reached=reached, l0=l0, stored=stored["cells"][ck]["et_loss"])
            for label, ref in (("reference", True), ("minibatch", False)):
                t1 = time.perf_counter()
                fc = _forecast(etk, c, stop, ref)
                row[label] = _curve(fc)
                row[f"{label}_seconds"] = time.perf_counter() - t1
                row[f"{label}_flagged"] = {f"{d:g}": bool(fc.flagged(d)) for d in reached}
            out["cells"][ck] = row
            print(key, ck, f"{row['reference_seconds']:.1f}s / {row['minibatch_seconds']:.1f}s",
                  flush=True)  # fmt: skip
        state[key] = out
        STATE.write_text(json.dumps(state))


def _t(curve: list, target: float) -> int | None:
    return tw._first_below(curve, target)


def report(state: dict) -> list[str]:
    lines, tot = [], dict(n=0, same=0, stored=0, flag=0, flagged=0)
    diffs, sdiffs = [], []
    for which in SETS:
        s = dict(n=0, same=0, stored=0, flag=0, flagged=0, cells=0)
        for key, out in state.items():
            if not key.startswith(which + "/"):
                continue
            for row in out["cells"].values():
                s["cells"] += 1
                for d in row["reached"]:
                    target = (1 - d) * row["l0"]
                    a, b, st = (_t(row[k], target) for k in ("reference", "minibatch", "stored"))
                    s["n"] += 1
                    s["flagged"] += row["minibatch_flagged"][f"{d:g}"]
                    s["same"] += a == b
                    s["stored"] += st == b
                    s["flag"] += (row["reference_flagged"][f"{d:g}"]
                                  == row["minibatch_flagged"][f"{d:g}"])  # fmt: skip
                    if a != b:
                        diffs.append(np.inf if a is None or b is None else abs(b - a) / a)
                    if st != b:
                        sdiffs.append(np.inf if st is None or b is None else abs(b - st) / st)
        for k in tot:
            tot[k] += s[k]
        lines.append(f"| {which} | {s['cells']} | {s['n']} | {s['flagged']} | {s['same']} | "
                     f"{s['flag']} | {s['stored']} |")
    lines.append(f"| **all** | - | {tot['n']} | {tot['flagged']} | {tot['same']} | "
                 f"{tot['flag']} | {tot['stored']} |")
    worst = max(diffs) if diffs else 0.0
    sworst = max(sdiffs) if sdiffs else 0.0
    return [
        f"Command: `{COMMAND}`. Machine: {machine()}.",
        "",
        "Every minibatch cell (B = 32) of the 64-px rounds at the command line's setting "
        "(q = 32C, k = 1024) whose real run reaches a target: the forecast as "
        "`twolayer.grid_task` made it, with the library's kernel computed now, along the "
        "step-by-step path in z (*reference*, the library's before) and the minibatch path "
        "(NOTE [exact-top minibatch path]); T̂ of each target (50%, 80%, 90% of the real "
        "drop). *flagged*: targets whose check flags (the chaotic ones); "
        "*same T̂*: targets whose T̂ is the same step along both; *same check*: "
        "whose reliability check reads the same; *as stored*: whose T̂ along the minibatch "
        "path equals the stored grid's (the round's own kernel and path, which the held-out "
        "figures scored). (The paths' seconds, stored in the JSON, were taken with other "
        "jobs on the machine: RESULTS.md \"exact-top-minibatch\" times them.)",
        "",
        "| set | cells | targets | flagged | same T̂ | same check | as stored |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"Where T̂ differs between the paths: {len(diffs)} targets, the largest |Δ|/T̂ "
        f"{worst:.2f}; from the stored curves: {len(sdiffs)} targets, the largest "
        f"{sworst:.2f}.",
    ]


def main() -> None:
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    for which in SETS:
        run_set(which, state)
    text = "\n".join(report(state))
    write_section("minibatch-path", text)
    print(text)


if __name__ == "__main__":
    main()

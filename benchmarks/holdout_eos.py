"""Two attempts at the head-exact forecast's misses at the stability limit (issue 13),
measured on development tasks only; neither is adopted.

    .venv/bin/python benchmarks/holdout_eos.py            # both parts, then the report
    .venv/bin/python benchmarks/holdout_eos.py --report   # RESULTS.md section only

**Why.** 13 of the 14 misses of ``holdout_features.py``'s fresh round (and most of the 41 of
the fourteen development tasks) are head-exact forecasts that diverge with plain SGD at
a = 1 of the stability limit, while the real run spikes, recovers and reaches the target
(edge of stability). No calibration of T̂ can repair a forecast that has no T̂.

- **tanh**: is it the unbounded linearized features? MiniLM's head reads the pooler's
  tanh(z). One development cell (``whissell-minilm`` CE, full batch, m = 0, a = 1) trained
  in weight space with autograd, float64, 40 steps of the cell's SGD: the network itself,
  the head-exact model (body linear up to the features tanh(z)) and a model that keeps the
  tanh exact too (body linear up to z).
- **stabilized**: where the head-exact forecast diverges, rerun it at c x lr for the first
  c in 0.7, 0.5, 0.35, 0.25 that does not diverge (horizon min(fc_steps / c, 4 x real
  steps + 50)) and rescale its steps by c (the real run at the limit progresses like a
  stable one), on every diverging cell of the seven development tasks of
  ``holdout_fresh.py`` and ``holdout_depth.py``.

Results: ``benchmarks/results/holdout_eos/*.json`` and the "holdout-eos" section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_depth as hd  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from forecast_accuracy import _commit  # noqa: E402
from headbody import _fmt  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "holdout_eos"
COMMAND = ".venv/bin/python benchmarks/holdout_eos.py"
TANH_CELL = ("whissell-minilm", "ce-full-m0-a1", 40)
FACTORS = (0.7, 0.5, 0.35, 0.25)
ROUNDS = (("holdout_fresh", fr.TASKS), ("holdout_depth", hd.TASKS))


def _cell(name: str, key: str) -> dict:
    sub = "holdout_depth" if name in hd.TASKS else "holdout_fresh"
    return json.loads((OUT.parent / sub / f"{name}.json").read_text())["cells"][key]


def tanh_part() -> dict:
    """The three models of the tanh cell, trained in weight space (the docstring)."""
    name, key, steps = TANH_CELL
    ho.TASKS.update(fr.TASKS)
    ho.TASKS.update(hd.TASKS)
    cell, task = _cell(name, key), ho.load_task(name)
    top, y = task["top"].double(), task["y"]
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in task["x"].items()}
    pat = re.compile(task["params"])
    p0 = {n: p.detach().clone() for n, p in top.named_parameters()}
    body = [n for n in p0 if pat.search(n) and not n.startswith("classifier.")]
    wb0 = {n: p0[n] for n in body}

    def pre(wb: dict) -> torch.Tensor:  # the pooler's pre-activation z [N, H]
        seen = {}
        hook = top.bert.pooler.dense.register_forward_hook(lambda m, i, o: seen.update(z=o))
        try:
            functional_call(top, {**p0, **wb}, (x["hidden_states"], x["attention_mask"]))
        finally:
            hook.remove()
        return seen["z"]

    def run(kind: str) -> list[float]:
        w = p0["classifier.weight"].clone().requires_grad_()
        b = p0["classifier.bias"].clone().requires_grad_()
        d = {n: torch.zeros_like(p0[n], requires_grad=True) for n in body}
        curve = []
        for _ in range(steps + 1):
            if kind == "network":
                phi = torch.tanh(pre({n: wb0[n] + d[n] for n in body}))
            elif kind == "head exact":
                base, tan = jvp(lambda wb: torch.tanh(pre(wb)), (wb0,), (d,))
                phi = base + tan
            else:
                base, tan = jvp(pre, (wb0,), (d,))
                phi = torch.tanh(base + tan)
            loss = torch.nn.functional.cross_entropy(phi @ w.T + b, y)
            curve.append(float(loss.detach()))
            if not math.isfinite(curve[-1]) or curve[-1] > 1e4 * curve[0]:
                break
            grads = torch.autograd.grad(loss, [w, b, *d.values()])
            with torch.no_grad():
                for v, g in zip([w, b, *d.values()], grads):
                    v -= cell["lr"] * g
        return curve

    out = {k: run(k) for k in ("network", "head exact", "tanh exact")}
    out["stored run"] = cell["run_loss"][: steps + 1]
    return dict(cell=f"{name} {key}", lr=cell["lr"], curves=out)


def stabilized_part() -> list[dict]:
    """Per target of every diverging development cell: T, the head-exact T̂ (None: missed)
    and the stabilized estimate c x T̂(c x lr)."""
    rows = []
    for sub, tasks in ROUNDS:
        ho.TASKS.update(tasks)
        for name in tasks:
            cells = json.loads((OUT.parent / sub / f"{name}.json").read_text())["cells"]
            cells = {k: c for k, c in cells.items() if c["hb_diverges"]}
            if not cells:
                continue
            _, _, hb, _, _ = ho._kernels(name)
            for key, c in cells.items():
                for factor in FACTORS:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fc = tl.forecast(hb, tl.SGD(c["lr"] * factor, momentum=c["momentum"]),
                                         min(int(c["fc_steps"] / factor), 4 * c["steps"] + 50),
                                         loss=c["loss"], batch_size=c["batch_size"],
                                         seed=ho.SEED)  # fmt: skip
                    if not fc.diverges:
                        break
                for d, t in ho.targets(c, "hb_loss").items():
                    if t["status"] == "unreached":
                        continue
                    t_c = None if fc.diverges else fc.steps_to((1 - float(d)) * c["run_loss"][0])
                    rows.append(dict(task=name, cell=key, drop=d, T=t["T"], hb=t["T_hat"],
                                     factor=factor, est=None if t_c is None else t_c * factor))
                print(f"[{name}] {key}: c = {factor}", flush=True)
    return rows


def _errs(rows: list[dict], k: str) -> list[float]:
    return [math.inf if r[k] is None else abs(r[k] - r["T"]) / r["T"] for r in rows]


def report() -> None:
    tanh = json.loads((OUT / "tanh.json").read_text())
    rows = json.loads((OUT / "stabilized.json").read_text())
    meta = json.loads((OUT / "meta.json").read_text())
    cur = tanh["curves"]
    lines = [
        "## Misses at the stability limit: two attempts (`benchmarks/holdout_eos.py`, issue 13)",
        "",
        f"Command: `{COMMAND}`. Development tasks only (the script's docstring); neither "
        f"attempt is adopted. Machine: {meta['machine']}; code {meta['code']}.",
        "",
        f"**Pooler tanh kept exact** ({tanh['cell']}, lr {tanh['lr']:.3g}, loss every 4 steps "
        "of 40, weight space, float64):",
        "",
        "| model | " + " | ".join(str(s) for s in range(0, 41, 4)) + " |",
        "|---|" + "---|" * 11,
    ]  # fmt: skip
    for k, v in cur.items():
        gone = "stopped (90% drop)" if k == "stored run" else "diverged"
        shown = [f"{v[s]:.3g}" if s < len(v) and v[s] is not None else gone
                 for s in range(0, 41, 4)]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(shown) + " |")
    miss = [r for r in rows if r["hb"] is None]
    hit = [r for r in rows if r["hb"] is not None]
    finite = [math.log(r["T"] / r["est"]) for r in miss if r["est"]]
    lines += [
        "",
        "**Stabilized rate** (targets of the diverging cells of the seven development tasks; "
        "median / p90 of |T̂ − T|/T, a miss = +∞):",
        "",
        "| targets | head-exact T̂ | stabilized c·T̂(c·lr) |",
        "|---|---|---|",
        f"| missed by the head-exact forecast | {_fmt(_errs(miss, 'hb'))} | "
        f"{_fmt(_errs(miss, 'est'))} |",
        f"| reached before it diverged | {_fmt(_errs(hit, 'hb'))} | {_fmt(_errs(hit, 'est'))} |",
        "",
        "log(T / estimate) of the rescued misses: median "
        f"{np.median(finite):.2f}, 10% / 90% quantiles {np.quantile(finite, 0.1):.2f} / "
        f"{np.quantile(finite, 0.9):.2f} ({len(finite)} of {len(miss)}).",
        "",
        READING,
    ]  # fmt: skip
    write_section("holdout-eos", "\n".join(lines))
    print("\n".join(lines))


READING = """**Reading** (2026-11-30). Keeping the tanh exact bounds the features, so the
forecast no longer blows up, but it does not recover either: the loss sits at 10-16 from
step 20 on, where the network spikes to 1.0, falls back to ln 2 (it forgets its first
steps), then learns and reaches 0.006 at step 40. What the network does at the limit is
not in the head and its last nonlinearity; it is the body's own dynamics. Rerunning a
diverging forecast at a stable fraction of the rate and rescaling its steps gives 23 of the
25 missed targets an estimate, but a poor one: 139% / 308%, the real runs e^0.85 ≈ 2.3x
faster at the median (10-90%: 1.2-3.5x); the steps interval would need its own calibration
for these cells and no fresh tasks are left to score it on. Neither is adopted: the library
keeps saying "unknown (the forecast diverges before the target)" for these cells, and its
CLI explains the case (the head x body growth; real runs there often spike and recover)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="write the RESULTS.md section only")
    args = ap.parse_args()
    if not args.report:
        torch.set_num_threads(2)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "meta.json").write_text(json.dumps(dict(machine=machine(), code=_commit())))
        (OUT / "tanh.json").write_text(json.dumps(tanh_part()))
        (OUT / "stabilized.json").write_text(json.dumps(stabilized_part()))
    report()


if __name__ == "__main__":
    main()

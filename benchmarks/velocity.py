"""Does the feature kernel's velocity at w0 predict the convolutional bodies' per-task factor?
(issue 13, development only: the stored image development tasks, nothing fresh, nothing
adopted.)

    .venv/bin/python benchmarks/velocity.py              # every image development task
    .venv/bin/python benchmarks/velocity.py --task NAME  # one task (resumable per task)
    .venv/bin/python benchmarks/velocity.py --report     # RESULTS.md section only

(needs ``make bench-deps`` and ``benchmarks/deephead.py``'s results.)

**Why.** ``deephead.py`` found that the head-exact model (f = W φ_lin + b, the body
linearized) misses a per-task factor on the EfficientNet-Lite bodies — its median
log(T / T̂) spreads over [-0.54, +0.23] across the fourteen image development tasks — and
that keeping the head conv exact too takes it away. The head-exact model's feature kernel
K_φ(i, j) = J_i J_jᵀ is constant; the real network's moves. Issue 13 suggests "kernel
velocity along the first gradient step" as a number computed without training. This
measures it, in float64, and asks whether it predicts the factor, left out by task.

**What is measured.** With δ = ∂L/∂f at w0 (the cell's loss, full batch) held fixed, the
rate at which the loss falls under gradient flow is the NTK's quadratic form

.. math::
    R(θ) = \\lVert ∇_θ ⟨δ, f(θ)⟩ \\rVert^2 .

Along the first gradient step θ(ε) = θ0 − ε g0 (g0 = ∇_θ L at w0), with ε = s η / (1 − m)
(s steps of gradient flow at the cell's learning rate η and momentum m), R is evaluated for
the real top (R_real) and for the head-exact model (R_hb: its head moves, its J does not),
s = 1, 2, 4, ..., 128. Their ratio is the kernel growth the head-exact model lacks. The
statistics of a target are log(R_real / R_hb) at s = 1, 4 and 16 steps and at s = T̂ (the
exact head-exact model's steps to that target, ``deephead.py``; log-linear between the
grid's points). (A derivative at s → 0 is not usable: central differences at 1e-4 of a step
disagreed in sign between two learning rates on graphics-lite1 — R is only piecewise smooth,
presumably through the ReLU6 gates.)

Each is compared with log(T / T̂) of the exact head-exact model on the same target
(Spearman ρ over targets and over task medians), and a one-coefficient fit
log(T / T̂) ≈ a + b·statistic is scored left out by task against the constant alone (the
per-cell median of the other tasks, ``deephead.py``'s *corrected* column).
Results: ``benchmarks/results/velocity/`` and the "velocity" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deephead as dh  # noqa: E402
import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "velocity")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/velocity.py"
STEPS = (1, 2, 4, 8, 16, 32, 64, 128)  # ε in steps of gradient flow: s η / (1 − m)


def _rate(top, h, delta: torch.Tensor, names: list[str], theta: list[torch.Tensor],
          model: str, base: list[torch.Tensor]) -> float:  # fmt: skip
    """R = ‖∇_θ ⟨δ, f(θ)⟩‖² of ``model`` ("real" or "head exact") at weights ``theta``."""
    theta = [t.detach().clone().requires_grad_(True) for t in theta]
    if model == "real":
        f = functional_call(top, dict(zip(names, theta)), (h,))
    else:
        exact = dh.exact_names(top, "head exact")
        body, head = dh.parts(top, "head exact")
        ib = [i for i, n in enumerate(names) if not n.startswith(exact)]
        ie = [i for i, n in enumerate(names) if n.startswith(exact)]
        b0 = tuple(base[i] for i in ib)
        step = tuple(theta[i] - base[i] for i in ib)
        call = lambda *v: functional_call(body, {"top." + names[i]: t  # noqa: E731
                                                 for i, t in zip(ib, v)}, (h,))
        phi0, dphi = jvp(call, b0, step)
        f = functional_call(head, {"top." + names[i]: theta[i] for i in ie}, (phi0 + dphi,))
    grads = torch.autograd.grad((delta * f).sum(), theta, allow_unused=True)
    return float(sum((g ** 2).sum() for g in grads if g is not None))


def velocities(top, h, y, names: list[str], *, loss: str, lr: float, momentum: float) -> dict:
    """R(θ0) and R(θ(ε)) of the real top and the head-exact model at ε = s η / (1 − m) for s
    in STEPS (module docstring), in float64."""
    fn = tl.training.as_loss(loss, "velocity")
    params = dict(top.named_parameters())
    theta0 = [params[n].detach().clone() for n in names]
    t0 = [t.clone().requires_grad_(True) for t in theta0]
    f0 = functional_call(top, dict(zip(names, t0)), (h,))
    f0d = f0.detach().requires_grad_(True)
    (delta,) = torch.autograd.grad(fn.per_sample(f0d, y).mean(), f0d)
    g0 = torch.autograd.grad((delta * f0).sum(), t0)
    out = dict(R0=float(sum((g ** 2).sum() for g in g0)), steps=list(STEPS))
    for model in ("real", "head exact"):
        out[model] = [_rate(top, h, delta, names,
                            [t - s * lr / (1 - momentum) * g for t, g in zip(theta0, g0)],
                            model, theta0) for s in STEPS]  # fmt: skip
    return out


def run_task(name: str) -> dict:
    path = OUT / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    deep = json.loads((dh.OUT / f"{name}.json").read_text())
    dh.dev_tasks()
    task = ho.load_task(name)
    top = task["top"].double().eval()
    h, y = task["x"].double(), task["y"]
    for p in top.parameters():
        p.requires_grad_(False)
    pat = re.compile(task["params"])
    names = [n for n, _ in top.named_parameters() if pat.search(n)]
    out = dict(task=name, machine=machine(), cells={})
    for key, c in deep["cells"].items():
        t0 = time.perf_counter()
        m = float(key.split("-m")[1].split("-")[0])
        v = velocities(top, h, y, names, loss=key.split("-")[0], lr=c["lr"], momentum=m)
        v["seconds"] = time.perf_counter() - t0
        out["cells"][key] = v
        print(name, key, v["R0"], [f"{a / b:.3g}" for a, b in zip(v["real"], v["head exact"])],
              flush=True)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------


def _log_ratio(v: dict, s: float) -> float:
    """log(R_real / R_hb) at ``s`` steps of gradient flow, linear in log s between STEPS."""
    lr = [math.log(a / b) for a, b in zip(v["real"], v["head exact"])]
    return float(np.interp(math.log(max(s, 1.0)), np.log(v["steps"]), lr))


STATS = ("s1", "s4", "s16", "at T̂")  # log(R_real / R_hb) at 1, 4, 16 steps and at T̂ steps


def rows() -> list[dict]:
    """One row per (task, cell, drop) that the real run and the head-exact model reach."""
    out = []
    for p in sorted(OUT.glob("*.json")):
        vel = json.loads(p.read_text())
        deep = json.loads((dh.OUT / p.name).read_text())
        for key, v in vel["cells"].items():
            c = deep["cells"][key]
            for d, t in c["real"]["steps"].items():
                th = c["head exact"]["steps"][d]
                if not t or not th:
                    continue
                stats = dict(zip(STATS, (_log_ratio(v, 1), _log_ratio(v, 4), _log_ratio(v, 16),
                                         _log_ratio(v, th))))  # fmt: skip
                out.append(dict(task=vel["task"], cell=key, drop=d, T=t, T_hat=th,
                                y=math.log(t / th), **stats))  # fmt: skip
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _centred(row: dict, key: str, pool: list[dict]) -> float:
    """``row[key]`` minus its median over the rows of ``pool`` with the same cell and drop."""
    peers = [p[key] for p in pool if (p["cell"], p["drop"]) == (row["cell"], row["drop"])]
    return row[key] - float(np.median(peers))


def left_out(rs: list[dict], stat: str | None) -> list[float]:
    """|T̂' − T|/T with log T̂' = log T̂ + (the other tasks' per-cell median of log(T/T̂))
    + b·(stat − its per-cell median), b fitted by least squares on the other tasks."""
    errs = []
    for r in rs:
        others = [o for o in rs if o["task"] != r["task"]]
        same = [o for o in others if (o["cell"], o["drop"]) == (r["cell"], r["drop"])]
        shift = float(np.median([o["y"] for o in same])) if same else 0.0
        if stat is not None:
            xs = np.array([_centred(o, stat, others) for o in others])
            ys = np.array([_centred(o, "y", others) for o in others])
            b = float(xs @ ys / max(xs @ xs, 1e-30))
            shift += b * _centred(r, stat, others)
        errs.append(abs(r["T_hat"] * math.exp(shift) - r["T"]) / r["T"])
    return errs


def report() -> list[str]:
    rs = rows()
    tasks = sorted({r["task"] for r in rs})
    med = {t: {k: float(np.median([r[k] for r in rs if r["task"] == t]))
               for k in ("y", *STATS)} for t in tasks}  # fmt: skip
    lines = [
        "## Does the feature kernel's velocity predict the per-task factor? "
        "(`benchmarks/velocity.py`, issue 13, development only)",
        "",
        f"Command: `{COMMAND}` (after `benchmarks/deephead.py`; development only: "
        f"{len(tasks)} stored image development tasks, {len(rs)} targets of the exact "
        "head-exact model, full batch; nothing fresh, nothing adopted). Statistics in the "
        "script's docstring; y = log(T / T̂) of the exact head-exact model. Machine: "
        f"{machine()}.",
        "",
        "| statistic | Spearman ρ with y, targets | Spearman ρ, task medians | left-out "
        "median / p90 of \\|T̂' − T\\|/T |",
        "|---|---|---|---|",
    ]
    base = left_out(rs, None)
    lines.append(f"| none (per-cell median of the other tasks) | – | – | "
                 f"{np.median(base):.0%} / {np.quantile(base, 0.9):.0%} |")
    for stat in STATS:
        e = left_out(rs, stat)
        lines.append(
            f"| {stat} | {_spearman([r[stat] for r in rs], [r['y'] for r in rs]):+.2f} | "
            f"{_spearman([med[t][stat] for t in tasks], [med[t]['y'] for t in tasks]):+.2f}"
            f" | {np.median(e):.0%} / {np.quantile(e, 0.9):.0%} |")
    lines += ["", "Task medians:", "", "| task | y | " + " | ".join(STATS) + " |",
              "|---|---|" + "---|" * len(STATS)]
    lines += [f"| {t} | {med[t]['y']:+.2f} | "
              + " | ".join(f"{med[t][k]:+.2f}" for k in STATS) + " |" for t in tasks]
    return lines + ["", READING]


READING = """**Reading** (development data only; nothing adopted). *No.* Along the first gradient
step the real top's quadratic form R moves away from the head-exact model's with the
expected sign — where it grows more, the real run tends to be faster than the head-exact
model — but weakly: Spearman ρ over the targets is at most 0.33 in size, and over the
fourteen task medians at most 0.49. Fitted as one coefficient left out by task, none of the
four statistics beats the per-cell median of the other tasks by more than the noise (13-15%
median against 15%; the p90 41-43% against 41%). Along the straight line the real model's R falls
below the head-exact model's within 16 steps on twelve of the fourteen tasks (median log
ratio -0.3 to -1.8), while the real runs were faster than the head-exact model on eleven:
the line leaves the region the training path stays in, so it is no proxy for the path;
the derivative at w0 is not usable either (the docstring). What decides the per-task
factor is the head conv's response along the training path itself: `deephead.py`'s
two-layer model follows it, at the cost of training the top, and a pilot measures it
(RESULTS.md "holdout-hybrid"). A number computed at w0 from one gradient does not."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", help="one image development task (repeatable)")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.report:
        names = args.task or sorted(p.stem for p in dh.OUT.glob("*.json")
                                    if not p.stem.endswith("-library"))  # fmt: skip
        for name in names:
            run_task(name)
    lines = report()
    print("\n".join(lines))
    if not args.task:
        write_section("velocity", "\n".join(lines))


if __name__ == "__main__":
    main()

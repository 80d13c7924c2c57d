"""Forecast accuracy and cost against real fine-tuning, over a grid of settings (issue 5).

    .venv/bin/python benchmarks/forecast_accuracy.py            # every case, resumable
    .venv/bin/python benchmarks/forecast_accuracy.py --case rt-minilm --fresh
    .venv/bin/python benchmarks/forecast_accuracy.py --report   # tables/plots from saved cells

For each built-in case (EfficientNet-Lite0 on Fashion-MNIST at 64 px, MiniLM on Rotten
Tomatoes at 64 tokens, the digits CNN): one kernel, then every cell of
learning rate (3, a decade) x batch (full, minibatch) x momentum (0, 0.9) x loss (MSE, CE)
is forecast and really fine-tuned (``tangentlab.finetune``, same trainable weights, BN
frozen), and ``tangentlab.compare`` measures the errors. Learning rates are set per case
from the kernel: η = a N / λ_max with a in {0.1, 0.3, 1} (a = 1 is half the stability
limit of plain GD on MSE), the same η for both losses and both momenta.

Cost. Lite0 and MiniLM train only their top (last block/layer + head) with frozen batch
norm, so the frozen trunk's activations are computed once (``_split.py``) and both the
kernel and the real runs work on the top: the same mathematics, at the cost a careful user
would pay. The trunk pass is counted once on each side. ``cost_ratio`` = real run
(trunk + training steps, evaluations excluded) / (trunk + kernel + eigendecomposition +
forecast); ``sweep_ratio`` charges the kernel once to all cells of the case. A plain
full-network run (no trunk caching) is estimated from its measured per-step time and
reported separately as ``naive_ratio``.

Cells are saved one by one in ``benchmarks/results/forecast_accuracy/<case>.json``: an
interrupted run resumes where it stopped (``--fresh`` starts a case over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from _split import cached_inputs  # noqa: E402
from tangentlab.examples import load_example  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "forecast_accuracy"
COMMAND = ".venv/bin/python benchmarks/forecast_accuracy.py"

CASES = {
    "digits-cnn": dict(
        num_samples=200, projection=None, steps_full=200, steps_mb=200, batch=32, log_mb=2
    ),
    "fashion-lite0": dict(
        num_samples=1000, projection=4096, steps_full=60, steps_mb=80, batch=32, log_mb=4
    ),
    "rt-minilm": dict(
        num_samples=128, projection=4096, steps_full=40, steps_mb=80, batch=16, log_mb=2
    ),
}
LR_FACTORS = (0.1, 0.3, 1.0)  # a in η = a N / λ_max
MOMENTA = (0.0, 0.9)
LOSSES = ("mse", "ce")
DROPS = (0.5, 0.8)  # targets: a 50% and an 80% drop of the real initial loss


def _cells(cfg: dict) -> list[dict]:
    out = []
    for loss in LOSSES:
        for batch in (None, cfg["batch"]):
            for m in MOMENTA:
                for a in LR_FACTORS:
                    out.append(dict(loss=loss, batch_size=batch, momentum=m, lr_factor=a))
    return out


def _key(c: dict) -> str:
    b = "full" if c["batch_size"] is None else f"B{c['batch_size']}"
    return f"{c['loss']}-{b}-m{c['momentum']:g}-a{c['lr_factor']:g}"


def _displacement(model0: torch.nn.Module, model1: torch.nn.Module, names: list[str]) -> float:
    """‖w_T - w_0‖ / ‖w_0‖ over the trained weights."""
    p0, p1 = dict(model0.named_parameters()), dict(model1.named_parameters())
    num = sum(float((p1[n].detach() - p0[n].detach()).double().pow(2).sum()) for n in names)
    den = sum(float(p0[n].detach().double().pow(2).sum()) for n in names)
    return math.sqrt(num / den) if den > 0 else math.nan


def _naive_step_seconds(ex, batch: int | None, steps: int = 2) -> float:
    """Seconds per optimizer step of a plain full-network run (no trunk caching)."""
    X, y = ex.data
    run = tl.finetune(
        ex.model,
        (X, y),
        tl.SGD(1e-06),
        steps,
        batch_size=batch,
        params=ex.default_params,
        log_every=steps,
        progress=False,
    )
    return run.train_seconds / steps


def run_case(name: str, fresh: bool = False) -> dict:
    cfg = CASES[name]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    state = json.loads(path.read_text()) if path.exists() and not fresh else {}
    ex = load_example(name, num_samples=cfg["num_samples"])
    X, y = ex.data
    n = int(y.shape[0])
    print(f"[{name}] {ex.description}", flush=True)
    top, xt, trunk_s = cached_inputs(name, ex.model, X)
    if "kernel" not in state:
        t0 = time.perf_counter()
        kernel = tl.compute_kernel(
            top, (xt, y), projection=cfg["projection"], params=ex.default_params, progress=False
        )
        kernel_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lam = kernel.eigh()[0]
        eigh_s = time.perf_counter() - t0
        lam_max = float(lam[-1])
        state["kernel"] = dict(
            trunk_seconds=trunk_s,
            kernel_seconds=kernel_s,
            eigh_seconds=eigh_s,
            lam_max=lam_max,
            num_samples=n,
            num_classes=kernel.num_classes,
            projection=cfg["projection"],
            num_params=tl.Tangent(top, params=ex.default_params).num_params,
        )
        kernel.save(OUT / f"{name}.kernel.safetensors")
        path.write_text(json.dumps(state, indent=1))
    else:  # resumed: the saved kernel (its eigendecomposition is redone, not timed again)
        kernel = tl.load_kernel(OUT / f"{name}.kernel.safetensors")
        kernel.eigh()
    info = state["kernel"]
    print(
        f"[{name}] kernel {info['kernel_seconds']:.1f}s + eigh {info['eigh_seconds']:.1f}s, "
        f"lambda_max/N = {info['lam_max'] / n:.4g}",
        flush=True,
    )
    names = tl.Tangent(top, params=ex.default_params).param_names
    if "naive" not in state and name != "digits-cnn":
        state["naive"] = {
            "full": _naive_step_seconds(ex, None, 1),
            "mb": _naive_step_seconds(ex, cfg["batch"], 3),
        }
        path.write_text(json.dumps(state, indent=1))
    cells = state.setdefault("cells", {})
    for c in _cells(cfg):
        key = _key(c)
        if key in cells:
            continue
        lr = c["lr_factor"] * n / info["lam_max"]
        full = c["batch_size"] is None
        steps = cfg["steps_full"] if full else cfg["steps_mb"]
        if c["momentum"] > 0:  # 10x the effective rate: half the horizon is plenty
            steps //= 2
        kw = dict(
            lr=lr, steps=steps, batch_size=c["batch_size"], momentum=c["momentum"], loss=c["loss"]
        )
        t0 = time.perf_counter()
        fc = tl.forecast(kernel, **kw)
        fc_s = time.perf_counter() - t0
        run = tl.finetune(
            top,
            (xt, y),
            params=ex.default_params,
            progress=False,
            log_every=1 if full else cfg["log_mb"],
            **kw,
        )
        real_s = trunk_s + run.train_seconds
        cmp = {}
        for drop in DROPS:
            r = tl.compare(fc, run, target_drop=drop)
            cmp[f"{drop:g}"] = dict(
                T=r.steps_to_target_run,
                T_hat=r.steps_to_target_forecast,
                err=r.steps_to_target_error,
                res=r.steps_resolution,
            )
        r = tl.compare(fc, run)
        cells[key] = dict(
            **c,
            lr=lr,
            steps=steps,
            forecast_seconds=fc_s,
            real_seconds=real_s,
            train_seconds=run.train_seconds,
            eval_seconds=run.eval_seconds,
            targets=cmp,
            curve_error=r.curve_error,
            curve_error_max=r.curve_error_max,
            plateau_error=r.steps_to_plateau_error,
            final_accuracy_diff=r.final_accuracy_diff,
            band_coverage=r.band_coverage,
            diverges_forecast=bool(fc.diverges),
            diverged_run=bool(run.diverged),
            stability=float(fc.stability),
            stability_limit=float(fc.stability_limit),
            displacement=_displacement(top, run.model, names),
            run_steps=[int(s) for s in run.steps],
            run_loss=[float(v) for v in run.loss],
            fc_loss=[None if not np.isfinite(v) else float(v) for v in fc.loss],
            fc_low=None if fc.loss_band is None else [float(v) for v in fc.loss_band[0]],
            fc_high=None if fc.loss_band is None else [float(v) for v in fc.loss_band[1]],
        )
        e = cmp["0.5"]["err"]
        print(
            f"[{name}] {key}: lr={lr:.3g} T={cmp['0.5']['T']} T^={cmp['0.5']['T_hat']} "
            f"err={'-' if e is None else f'{e:.0%}'} curve={r.curve_error:.3f} "
            f"real {real_s:.1f}s forecast {fc_s:.2f}s",
            flush=True,
        )
        path.write_text(json.dumps(state, indent=1))
    return state


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def _q(xs: list[float], q: float) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.quantile(xs, q)) if xs else None


def _inside(c: dict) -> bool:
    """η̃ λ_max / N = a / (1 - m) <= 1: the measured validity region (NOTE in forecast.py)."""
    return c["lr_factor"] / (1.0 - c["momentum"]) <= 1.0 + 1e-9


def _costs(state: dict) -> dict:
    info, cells = state["kernel"], list(state["cells"].values())
    base = info["trunk_seconds"] + info["kernel_seconds"] + info["eigh_seconds"]
    single = [c["real_seconds"] / (base + c["forecast_seconds"]) for c in cells]
    per_cfg = (base + sum(c["forecast_seconds"] for c in cells)) / len(cells)
    sweep = [c["real_seconds"] / per_cfg for c in cells]
    out = dict(single=single, sweep=sweep, per_config=per_cfg, base=base)
    if "naive" in state:
        naive = [
            (state["naive"]["full" if c["batch_size"] is None else "mb"]) * c["steps"]
            for c in cells
        ]
        out["naive_single"] = [t / (base + c["forecast_seconds"]) for t, c in zip(naive, cells)]
        out["naive_sweep"] = [t / per_cfg for t in naive]
    return out


def _plot(name: str, state: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cfg = CASES[name]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey="row")
    colors = dict(zip(LR_FACTORS, ("tab:blue", "tab:orange", "tab:green")))
    for i, loss in enumerate(LOSSES):
        for j, (batch, m) in enumerate(
            [(None, 0.0), (None, 0.9), (cfg["batch"], 0.0), (cfg["batch"], 0.9)]
        ):
            ax = axes[i, j]
            for a in LR_FACTORS:
                c = state["cells"].get(
                    _key(dict(loss=loss, batch_size=batch, momentum=m, lr_factor=a))
                )
                if c is None:
                    continue
                col = colors[a]
                ax.plot(
                    c["run_steps"], c["run_loss"], color=col, lw=2, label=f"real, η={c['lr']:.3g}"
                )
                fl = np.array([np.nan if v is None else v for v in c["fc_loss"]])
                ax.plot(np.arange(fl.size), fl, color=col, ls="--", lw=1.5, label="forecast")
                if c["fc_low"] is not None:
                    ax.fill_between(
                        np.arange(fl.size), c["fc_low"], c["fc_high"], color=col, alpha=0.15, lw=0
                    )
            b = "full batch" if batch is None else f"B = {batch}"
            ax.set_title(f"{loss.upper()}, {b}, momentum {m:g}", fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
    fig.suptitle(f"{name}: real fine-tuning (solid) vs tangentlab forecast (dashed, band 10-90%)")
    fig.tight_layout()
    png = OUT.parent / f"forecast_accuracy_{name}.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png.name


def report() -> str:
    lines = [
        "## Forecast accuracy against real fine-tuning (issue 5)",
        "",
        f"Command: `{COMMAND}` (resumable; `--report` rebuilds this section from the saved "
        "cells in `benchmarks/results/forecast_accuracy/`).",
        f"Machine: {machine()}.",
        "",
        "Learning rates η = a·N/λ_max, a ∈ {0.1, 0.3, 1} (a = 1: half the stability limit of "
        "plain GD on MSE). Errors: |T̂ − T|/T for the steps to a 50% and an 80% drop of the real "
        "initial loss (only where both curves reach it), curve error mean|L̂ − L|/L₀. Cost: "
        "`single` = real run / (kernel + forecast) for one forecast, `sweep` = real run / (per-"
        "configuration share of one kernel + its forecast) over the case's 24 cells, both with "
        "the frozen trunk cached on both sides; `naive` = the same against a plain full-network "
        "run, estimated as measured seconds per step × steps.",
        "",
    ]
    summary_rows = []
    all_err: list[float] = []
    all_in: list[float] = []
    for name in CASES:
        p = OUT / f"{name}.json"
        if not p.exists():
            continue
        state = json.loads(p.read_text())
        cells = state.get("cells", {})
        if not cells:
            continue
        info = state["kernel"]
        costs = _costs(state)
        proj = "exact" if info["projection"] is None else f"tensor sketch k = {info['projection']}"
        lines += [
            f"### {name}",
            "",
            f"N = {info['num_samples']}, C = {info['num_classes']}, P = {info['num_params']:,} "
            f"trainable weights, {proj}; trunk {info['trunk_seconds']:.1f} s, kernel "
            f"{info['kernel_seconds']:.1f} s, eigendecomposition {info['eigh_seconds']:.1f} s, "
            f"λ_max/N = {info['lam_max'] / info['num_samples']:.4g}.",
            "",
            "| loss | batch | m | η | T₅₀ real | T̂₅₀ | err₅₀ | T₈₀ real | T̂₈₀ | err₈₀ | curve err "
            "| ‖Δw‖/‖w₀‖ | real s | fc s | single × | sweep × |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        errs, errs_in = [], []
        for c, single, sweep in zip(cells.values(), costs["single"], costs["sweep"]):
            t5, t8 = c["targets"]["0.5"], c["targets"]["0.8"]
            errs += [t5["err"], t8["err"]]
            if _inside(c):
                errs_in += [t5["err"], t8["err"]]
            b = "full" if c["batch_size"] is None else str(c["batch_size"])
            mark = "" if _inside(c) else " ⚠"
            lines.append(
                f"| {c['loss']} | {b} | {c['momentum']:g} | {c['lr']:.3g}{mark} | "
                f"{t5['T'] or '–'} | "
                f"{t5['T_hat'] or '–'} | {_pct(t5['err'])} | {t8['T'] or '–'} | "
                f"{t8['T_hat'] or '–'} | {_pct(t8['err'])} | {c['curve_error']:.3f} | "
                f"{c['displacement']:.3g} | {c['real_seconds']:.1f} | "
                f"{c['forecast_seconds']:.2f} | {single:.1f} | {sweep:.1f} |"
            )
        all_err += errs
        all_in += errs_in
        med, p90 = _q(errs, 0.5), _q(errs, 0.9)
        row = dict(
            name=name,
            med=med,
            p90=p90,
            count=sum(e is not None for e in errs),
            med_in=_q(errs_in, 0.5),
            p90_in=_q(errs_in, 0.9),
            count_in=sum(e is not None for e in errs_in),
            total=len(errs),
            single=_q(costs["single"], 0.5),
            sweep=_q(costs["sweep"], 0.5),
            curve=_q([c["curve_error"] for c in cells.values()], 0.5),
        )
        if "naive_single" in costs:
            row["naive_single"] = _q(costs["naive_single"], 0.5)
            row["naive_sweep"] = _q(costs["naive_sweep"], 0.5)
        summary_rows.append(row)
        png = _plot(name, state)
        lines += [""]
        if png:
            lines += [f"![{name}: real vs forecast](results/{png})", ""]
    if summary_rows:
        lines += [
            "### Summary",
            "",
            "Inside the validity region = cells with η̃λ_max/N = a/(1 − m) ≤ 1 (NOTE [validity "
            "region] in `forecast.py`: the library warns beyond it).",
            "",
            "| case | steps-to-target errors | median | p90 | inside: errors | inside: median "
            "| inside: p90 | median curve err | median single × "
            "| median sweep × | naive single × | naive sweep × |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary_rows:
            lines.append(
                f"| {r['name']} | {r['count']} of {r['total']} | {_pct(r['med'])} | "
                f"{_pct(r['p90'])} | {r['count_in']} | {_pct(r['med_in'])} | "
                f"{_pct(r['p90_in'])} | {r['curve']:.3f} | {r['single']:.1f} | {r['sweep']:.1f} | "
                + (
                    f"{r['naive_single']:.0f} | {r['naive_sweep']:.0f} |"
                    if "naive_single" in r
                    else "– | – |"
                )
            )
        lines.append(
            f"| all | {sum(e is not None for e in all_err)} of {len(all_err)} | "
            f"{_pct(_q(all_err, 0.5))} | {_pct(_q(all_err, 0.9))} | "
            f"{sum(e is not None for e in all_in)} | {_pct(_q(all_in, 0.5))} | "
            f"{_pct(_q(all_in, 0.9))} | | | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES), help="run only these")
    ap.add_argument("--fresh", action="store_true", help="start the chosen cases over")
    ap.add_argument("--report", action="store_true", help="only rebuild the RESULTS section")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.report:
        for name in args.case or list(CASES):
            run_case(name, fresh=args.fresh)
    write_section("forecast-accuracy", report())
    print("wrote benchmarks/RESULTS.md (forecast-accuracy section)")


if __name__ == "__main__":
    main()

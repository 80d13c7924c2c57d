"""Reports: forecast plots (PNG), JSON summaries and a self-contained HTML page.

Everything here only formats results computed elsewhere; no numerics, no model code.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tangentlab.forecast import STABILIZED_REACHED, Forecast, _interval_columns
from tangentlab.kernel import Kernel, atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def label_of(fc: Forecast) -> str:
    """A short legend label from a forecast's hyper-parameters."""
    hp = fc.hyperparameters
    parts = [f"lr={hp.get('lr'):g}"]
    if hp.get("optimizer") == "adamw":
        parts.insert(0, "AdamW")
    bs = hp.get("batch_size")
    parts.append("full batch" if bs is None or bs >= hp.get("num_samples", math.inf) else f"B={bs}")
    if hp.get("momentum"):
        parts.append(f"m={hp['momentum']:g}")
    if hp.get("weight_decay"):
        parts.append(f"wd={hp['weight_decay']:g}")
    if hp.get("schedule") not in (None, "Constant()"):
        parts.append(str(hp["schedule"]))
    parts.append(str(hp.get("loss", "mse")).upper())
    return ", ".join(parts)


def plot_forecasts(
    forecasts: Sequence[tuple[str, Forecast]],
    path: str | Path,
    *,
    target_loss: float | None = None,
    title: str = "Forecast of fine-tuning (tangent model, no training)",
    measured: Sequence[tuple] = (),
    pilot: Any = None,
) -> Path:
    """Loss (log scale, with the stochastic band) and accuracy over steps, saved as PNG.

    Held-out curves (``Forecast.eval_loss``; a measured run's ``eval_loss``) are drawn
    dotted in the same colour, with the best step (minimum held-out loss) marked by a
    triangle.

    Args:
      forecasts: ``(label, Forecast)`` pairs.
      target_loss: drawn as a horizontal line with the forecast steps-to-target marked.
      measured: optional real curves ``(label, steps [T], loss [T], accuracy [T] or None)``,
        optionally followed by the held-out ``eval_loss [T]`` and ``eval_accuracy [T]``.
      pilot: a ``tl.Pilot`` the head-exact forecasts' intervals are conditioned on.

    A head-exact forecast also gets its band for the real loss (``Forecast.loss_interval``)
    when at most two forecasts are drawn, and its steps interval along the target line.
    """
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    held = False
    for i, (label, fc) in enumerate(forecasts):
        col = colors[i % len(colors)]
        steps = fc.steps
        lbl = f"{label} (diverges)" if fc.diverges else label
        ax_l.plot(steps, fc.loss, color=col, lw=1.8, label=lbl)
        if fc.loss_band is not None:
            ax_l.fill_between(steps, fc.loss_band[0], fc.loss_band[1], color=col, alpha=0.2, lw=0)
        ax_a.plot(steps, fc.accuracy, color=col, lw=1.8, label=lbl)
        if fc.eval_loss is not None:
            held = True
            ax_l.plot(steps, fc.eval_loss, ":", color=col, lw=1.8, label=f"{lbl}, held-out")
            if fc.eval_loss_band is not None:
                ax_l.fill_between(steps, *fc.eval_loss_band, color=col, alpha=0.1, lw=0)
            ax_a.plot(steps, fc.eval_accuracy, ":", color=col, lw=1.8)
            if fc.best_step is not None:
                ax_l.plot([fc.best_step], [fc.eval_loss[fc.best_step]], "v", color=col, ms=6)
        if target_loss is not None:
            t = fc.steps_to(target_loss)
            if t is not None:
                ax_l.plot([t], [fc.loss[t]], "o", color=col, ms=5)
            _draw_interval(ax_l, fc, target_loss, col, pilot)
        if len(forecasts) <= 2:
            _draw_loss_interval(ax_l, fc, col, pilot)
    for j, (label, steps, loss, acc, *ev) in enumerate(measured):
        col = colors[(len(forecasts) + j) % len(colors)]
        ax_l.plot(steps, loss, "--", color=col, lw=1.5, label=label)
        if acc is not None:
            ax_a.plot(steps, acc, "--", color=col, lw=1.5, label=label)
        if ev and ev[0] is not None:
            held = True
            ax_l.plot(steps, ev[0], "-.", color=col, lw=1.5, label=f"{label}, held-out")
            if len(ev) > 1 and ev[1] is not None:
                ax_a.plot(steps, ev[1], "-.", color=col, lw=1.5)
            if np.isfinite(ev[0]).any():
                b = int(np.nanargmin(ev[0]))
                ax_l.plot([steps[b]], [ev[0][b]], "v", color=col, ms=6)
    if target_loss is not None:
        ax_l.axhline(target_loss, color="0.4", lw=0.8, ls=":", label=f"target {target_loss:.3g}")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss (training; held-out dotted)" if held else "training loss")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("accuracy (training; held-out dotted)" if held else "training accuracy")
    ax_a.set_ylim(-0.02, 1.02)
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_exact_top(
    forecasts: Sequence[tuple[str, Any]],
    path: str | Path,
    *,
    drop: float | None = 0.8,
    measured: Sequence[tuple] = (),
    title: str = "Forecast of fine-tuning (exact top, block linear; experimental)",
) -> Path:
    """Loss (log scale) and accuracy over steps of exact-top forecasts
    (:func:`tangentlab.experimental.exact_top.forecast_exact_top`), saved as PNG.

    Args:
      forecasts: ``(label, ExactTopForecast)`` pairs.
      drop: a drop of each forecast's L0 (``None``: none): its target line, the estimate
        of the real steps (``ExactTopForecast.steps_estimate``) marked, and
        the steps interval (``ExactTopForecast.steps_interval``) as a bar along the line
        (wide where the reliability check flags the target, NOTE [exact-top reliability
        check]; an arrow where it runs past the plot's last step); a flagged forecast's
        legend says so.
      measured: optional real curves ``(label, steps [T], loss [T], accuracy [T] or None)``.
    """
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    right = max([float(fc.steps[-1]) for _, fc in forecasts]
                + [float(np.max(m[1])) for m in measured if len(m[1])] + [1.0])  # fmt: skip
    for i, (label, fc) in enumerate(forecasts):
        col = colors[i % len(colors)]
        lbl = label + (" (blows up)" if fc.blowup is not None else "")
        if drop is not None and fc.flagged(drop):
            lbl += f", check: flagged (R = {fc.rebound(drop):.2g})"
        ax_l.plot(fc.steps, fc.loss, color=col, lw=1.8, label=lbl)
        ax_a.plot(fc.steps, fc.accuracy, color=col, lw=1.8, label=lbl)
        if drop is None:
            continue
        target = (1.0 - drop) * float(fc.loss[0])
        ax_l.axhline(target, color=col, lw=0.8, ls=":")
        t, iv = fc.steps_estimate(drop), fc.steps_interval(drop)
        if t is None or iv is None:
            continue
        ax_l.plot([t], [target], "o", color=col, ms=5)
        hi = min(iv[1], right)
        ax_l.plot([iv[0], hi], [target] * 2, color=col, lw=4, alpha=0.35,
                  solid_capstyle="butt", label=f"real steps to a {drop:.0%} drop, interval"
                  + (" (past the plot)" if iv[1] > right else ""))  # fmt: skip
        if iv[1] > right:
            ax_l.annotate("", xy=(right, target), xytext=(max(iv[0], 0.9 * right), target),
                          arrowprops=dict(arrowstyle="->", color=col, alpha=0.6))  # fmt: skip
    for j, (label, steps, loss, acc, *_) in enumerate(measured):
        col = colors[(len(forecasts) + j) % len(colors)]
        ax_l.plot(steps, loss, "--", color=col, lw=1.5, label=label)
        if acc is not None:
            ax_a.plot(steps, acc, "--", color=col, lw=1.5, label=label)
    ax_l.set_yscale("log")
    for ax, what in ((ax_l, "training loss"), (ax_a, "training accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_a.set_ylim(-0.02, 1.02)
    ax_l.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _draw_interval(ax: Any, fc: Forecast, target_loss: float, col: str,
                   pilot: Any = None) -> None:  # fmt: skip
    """A head-exact forecast's interval for the real steps to the target (NOTE [steps
    interval]): a bar along the target line, its median estimate a diamond."""
    if fc.method.get("model") != "head-body":
        return
    iv = fc.steps_interval(target_loss, pilot=pilot)
    if iv.low is None or iv.high is None:
        return
    label = "real steps to target, 80% interval" + (" (narrow: trusted)" if iv.trusted
                                                     else " (wide)")  # fmt: skip
    if iv.stabilized is not None:  # NOTE [stabilized estimate]: the rerun, on its c-clock
        c, st = iv.stabilized, fc.stabilized
        ax.plot(c * np.arange(st.loss.shape[0]), st.loss, ":", color=col, alpha=0.7,
                label=f"rerun at {c:g} x lr, steps x {c:g}")  # fmt: skip
        label += ", if the run gets there"
    ax.plot([iv.low, iv.high], [target_loss] * 2, color=col, lw=4, alpha=0.35,
            solid_capstyle="butt", label=label)  # fmt: skip
    ax.plot([iv.median], [target_loss], "D", color=col, ms=5, label="median estimate")


def _loss_interval_json(fc: Forecast, pilot: Any = None) -> dict[str, Any] | None:
    """``Forecast.loss_interval`` as JSON (NaN: that edge unknown), ``None`` off head-exact."""
    if fc.method.get("model") != "head-body":
        return None
    band = fc.loss_interval(pilot=pilot)
    return {"low": band.low.tolist(), "high": band.high.tolist(), "drops": list(band.drops),
            "note": band.note}


def _draw_loss_interval(ax: Any, fc: Forecast, col: str, pilot: Any = None) -> None:
    """A head-exact forecast's band for the real loss (NOTE [loss interval]): shaded where
    both edges are known, an edge alone dashed."""
    if fc.method.get("model") != "head-body":
        return
    band = fc.loss_interval(pilot=pilot)
    steps, both = fc.steps, band.two_sided()
    if both.any():
        ax.fill_between(steps, band.low, band.high, where=both, color=col, alpha=0.12, lw=0,
                        label="real loss, band of the 80% steps intervals")  # fmt: skip
    for edge in (band.low, band.high):
        alone = np.isfinite(edge) & ~both
        if alone.any():
            ax.plot(steps, np.where(alone, edge, np.nan), "--", color=col, lw=0.7, alpha=0.6)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG (110 dpi) atomically to ``path`` (folders made),
    close it, and return the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON (NaN -> null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(obj), indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def summary_row(fc: Forecast, target_loss: float | None, *, pilot: Any = None) -> dict[str, Any]:
    """The numbers a person reads first, for one forecast (a head-exact one's interval
    conditioned on ``pilot``, NOTE [pilot feature], when given)."""
    d = fc.to_dict()
    return {
        "setting": label_of(fc),
        "steps_to_target": None if target_loss is None else fc.steps_to(target_loss),
        "steps_to_plateau_1pct": d["steps_to_plateau_1pct"],
        "initial_loss": d["initial_loss"],
        "final_loss": d["final_loss"],
        "final_accuracy": d["final_accuracy"],
        "diverges": d["diverges"],
        "stability": d["stability"],
        **_interval_summary(fc, target_loss, pilot),
        **_eval_row(d["eval"]),
    }


def _interval_summary(fc: Forecast, target_loss: float | None, pilot: Any = None) -> dict[str, Any]:
    """A head-exact forecast's interval for the real steps (NOTE [steps interval])."""
    if target_loss is None:
        return {}
    return _interval_columns(fc, target_loss, pilot)


def _eval_row(ev: dict[str, Any] | None) -> dict[str, Any]:
    """Held-out columns of a summary row (none without held-out curves)."""
    if ev is None:
        return {}
    return {"eval_final_loss": ev["final_loss"], "eval_final_accuracy": ev["final_accuracy"],
            "best_step (min held-out loss)": ev["best_step"],
            "eval_accuracy_at_best": ev["accuracy_at_best"]}  # fmt: skip


def _cell(v: Any, *, missing: str, escape=str) -> str:
    """One table cell: ``missing`` for None, 4 significant digits for floats."""
    if v is None:
        return missing
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return escape(str(v))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (for the terminal)."""
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        return _cell(v, missing="-")

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        return _cell(v, missing="&ndash;", escape=html.escape)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
.note{color:#555;font-size:13px} img{max-width:100%}
"""


def write_html(
    path: str | Path,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
    images: Sequence[str | Path] = (),
) -> Path:
    """A self-contained HTML page: PNGs embedded as base64, sections as (heading, html)."""
    imgs = "".join(
        f'<img alt="plot" src="data:image/png;base64,'
        f'{base64.b64encode(Path(p).read_bytes()).decode()}">'
        for p in images
    )
    body = "".join(
        f"<details><summary>{html.escape(h[len('Details: '):])}</summary>{content}</details>"
        if h.startswith("Details: ") else f"<h2>{html.escape(h)}</h2>{content}"
        for h, content in sections
    )  # sections headed "Details: ..." are folded (internals: hashes, λ_min)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{imgs}{body}"
        "<p class='note'>Made by tangentlab from the tangent model (linearization at the "
        "pre-trained weights); no training was run for the forecast.</p></body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def kernel_rows(kernel: Kernel) -> list[dict[str, Any]]:
    d = kernel.describe()
    meta = d.pop("metadata")
    rows = [{"quantity": k, "value": v} for k, v in d.items()]
    rows += [{"quantity": k, "value": v} for k, v in meta.items()]
    return rows


def write_forecast_report(
    out_dir: str | Path,
    forecasts: Sequence[Forecast],
    kernel: Kernel,
    *,
    target_loss: float | None = None,
    title: str = "tangentlab forecast",
    info: dict[str, Any] | None = None,
    pilot: Any = None,
) -> dict[str, Path]:
    """Write ``forecast.json``, ``forecast.png`` and ``report.html`` into ``out_dir``
    (head-exact intervals conditioned on ``pilot`` when given: NOTE [pilot feature]).

    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    rows = [summary_row(fc, target_loss, pilot=pilot) for fc in forecasts]
    png = plot_forecasts(
        [(label_of(fc), fc) for fc in forecasts], out / "forecast.png",
        target_loss=target_loss, title=title, pilot=pilot,
    )  # fmt: skip
    js = write_json(
        {
            "title": title,
            "target_loss": target_loss,
            "summary": rows,
            "forecasts": [fc.to_dict() for fc in forecasts],
            "loss_intervals": [_loss_interval_json(fc, pilot) for fc in forecasts],
            "kernel": kernel.describe(),
            "info": info or {},
        },
        out / "forecast.json",
    )
    info_rows = [{"quantity": k, "value": v} for k, v in (info or {}).items()]
    page = write_html(
        out / "report.html",
        title=title,
        images=[png],
        sections=[
            ("What was forecast", _html_table(what_rows(forecasts[0], target_loss, info))),
            ("Summary", _html_table(rows)),
            ("Details: run settings", _html_table(info_rows)),
            ("Details: kernel", _html_table(kernel_rows(kernel))),
        ],
    )
    return {"json": js, "png": png, "html": page}


def exact_top_row(label: str, fc: Any, drop: float) -> dict[str, Any]:
    """One summary row of an exact-top forecast at a ``drop`` of its L0: the forecast's T̂,
    the estimate of the real run's steps T̃ and its interval, and the reliability check."""
    t, est, iv = fc.steps_to_drop(drop), fc.steps_estimate(drop), fc.steps_interval(drop)
    r = fc.rebound(drop)
    return {
        "setting": label,
        "lr": f"{fc.settings['lr']:.4g}",
        "target loss": f"{(1.0 - drop) * float(fc.loss[0]):.4g}",
        "steps (forecast)": t if t is not None else f"not reached in {fc.settings['steps']}",
        "real run: estimate": None if est is None else round(est, 1),
        "real run: interval": None if iv is None else f"{iv[0]:.0f}-{iv[1]:.0f}",
        "check": ("blows up" if fc.blowup is not None else
                  f"{'flagged' if fc.flagged(drop) else 'passed'} (R = {r:.3g})"),
        "final loss": f"{float(fc.loss[-1]):.4g}",
        "final accuracy": f"{float(fc.accuracy[-1]):.3f}",
    }  # fmt: skip


def write_exact_top_report(
    out_dir: str | Path,
    forecasts: Sequence[tuple[str, Any]],
    kernel: Any,
    *,
    drop: float,
    title: str = "tangentlab forecast (exact top, block linear)",
    info: dict[str, Any] | None = None,
    measured: Sequence[tuple] = (),
    stem: str = "forecast",
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.png`` and an HTML page (``report.html``, or
    ``<stem>.html`` for another stem) into ``out_dir`` for exact-top forecasts (``(label,
    ExactTopForecast)``, the first the one asked for; the others e.g. ``reliable_lr``'s
    advice) at a ``drop`` of their initial loss, with real curves ``measured`` as
    :func:`plot_exact_top` draws them (``validate``: stem "validation").

    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    rows = [exact_top_row(label, fc, drop) for label, fc in forecasts]
    png = plot_exact_top(forecasts, out / f"{stem}.png", drop=drop, title=title,
                         measured=measured)  # fmt: skip
    meta = dict(getattr(kernel, "metadata", {}))
    drops = tuple(sorted({0.5, 0.8, float(drop)}))
    js = write_json({"title": title, "drop": drop, "summary": rows,
                     "forecasts": [dict(label=lb, **fc.to_dict(drops)) for lb, fc in forecasts],
                     "measured": [dict(label=m[0], steps=np.asarray(m[1]).tolist(),
                                       loss=np.asarray(m[2], dtype=float).tolist(),
                                       accuracy=None if m[3] is None else
                                       np.asarray(m[3], dtype=float).tolist())
                                  for m in measured],
                     "kernel": meta, "info": info or {}}, out / f"{stem}.json")  # fmt: skip
    info_rows = [{"quantity": k, "value": v} for k, v in (info or {}).items()]
    html_name = "report.html" if stem == "forecast" else f"{stem}.html"
    page = write_html(out / html_name, title=title, images=[png], sections=[
        ("Summary", _html_table(rows)),
        ("Details: run settings", _html_table(info_rows)),
        ("Details: kernel", _html_table([{"quantity": k, "value": v} for k, v in meta.items()])),
    ])  # fmt: skip
    return {"json": js, "png": png, "html": page}


def what_rows(fc: Forecast, target_loss: float | None,
              info: dict[str, Any] | None) -> list[dict[str, Any]]:  # fmt: skip
    """What a reader needs first: optimizer and lr (and how it was chosen), loss, batch,
    steps, target (and its definition), validity verdict, solver."""
    hp, info = fc.hyperparameters, info or {}
    opt = fc.optimizer.describe() if fc.optimizer is not None else f"SGD(lr={hp['lr']:.4g})"
    loss = fc.loss_function.describe() if fc.loss_function is not None else hp["loss"]
    if fc.diverges and fc.method.get("model") == "head-body" and (
        fc.stability < fc.stability_limit
    ):  # fmt: skip
        verdict = ("diverges: the head-exact model blows up after step "
                   f"{fc.divergence_step} though stable at w0 (the head x body product "
                   "sharpens); real runs there reached "
                   f"{STABILIZED_REACHED[0]} of {STABILIZED_REACHED[1]} such targets on "
                   "held-out tasks (NOTE [stabilized estimate])")  # fmt: skip
    elif fc.diverges:
        verdict = "diverges: lower the learning rate"
    elif not math.isfinite(fc.stability):  # AdamW, or stability=False
        verdict = ("no validity region measured for this forecast: "
                   + fc.method.get("stability", "η̃·λ_max/N not computed"))  # fmt: skip
    elif fc.valid:
        verdict = (f"inside the validity region (η̃·λ_max/N = {fc.stability:.3g} <= 1; "
                   "benchmarks/RESULTS.md)")  # fmt: skip
    else:
        verdict = f"OUTSIDE the validity region: {fc.method.get('validity')}"
    target = "-" if target_loss is None else (
        f"{target_loss:.4g} ({info.get('target_definition', 'given')})")  # fmt: skip
    batch = hp["batch_size"] or "full batch"
    return [
        {"quantity": "optimizer", "value": opt},
        {"quantity": "learning-rate schedule",
         "value": f"{hp.get('schedule', 'Constant()')} (step t uses lr·m(t); lr is the peak)"},
        {"quantity": "learning rate chosen by", "value": info.get("lr_choice", "given")},
        {"quantity": "loss", "value": loss},
        {"quantity": "batch size", "value": f"{batch} (N = {hp['num_samples']})"},
        {"quantity": "steps forecast", "value": hp["steps"]},
        {"quantity": "target loss", "value": target},
        {"quantity": "steps to target",
         "value": "-" if target_loss is None else (fc.steps_to(target_loss) or "not reached")},
    ] + _interval_row(fc, target_loss) + [
        {"quantity": "validity", "value": verdict},
        {"quantity": "solver", "value": fc.method.get("solver", "")},
    ] + ([{"quantity": "model of training (--linearize)", "value": info["linearize"]}]
         if info.get("linearize") else []) + _eval_what(fc)  # fmt: skip


def _interval_row(fc: Forecast, target_loss: float | None) -> list[dict[str, Any]]:
    """The real run's steps, 80% interval (head-exact forecasts: NOTE [steps interval])."""
    if target_loss is None or fc.method.get("model") != "head-body":
        return []
    return [{"quantity": "steps to target, real run (80% interval)",
             "value": str(fc.steps_interval(target_loss))}]  # fmt: skip


def _eval_what(fc: Forecast) -> list[dict[str, Any]]:
    if fc.eval_loss is None:
        return []
    ev, best = fc.method.get("eval", {}), fc.best_step
    stop = "-" if best is None else (
        f"step {best} (held-out loss {fc.eval_loss[best]:.4g}, accuracy "
        f"{fc.eval_accuracy[best]:.1%})")  # fmt: skip
    return [
        {"quantity": "held-out set", "value": f"{ev.get('num_eval', '?')} samples, through the "
                                              "cross kernel Θ(X_eval, X)"},
        {"quantity": "early stopping (forecast min held-out loss)", "value": stop},
    ]  # fmt: skip


def write_sweep_report(
    out_dir: str | Path,
    result,
    kernel: Kernel,
    *,
    title: str = "tangentlab sweep",
    top: int = 6,
    info: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``sweep.csv``, ``sweep.json``, ``sweep.png`` (best ``top`` curves), ``report.html``
    for a :class:`~tangentlab.forecast.Sweep`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = flat = result.table
    target = result.target_loss
    csv = out / "sweep.csv"
    atomic_write(csv, lambda tmp: flat.to_csv(tmp, index=False))
    records = json.loads(flat.to_json(orient="records"))
    summary = {"title": title, "target_loss": target, "table": records,
               "kernel": kernel.describe(), "info": info or {}}  # fmt: skip
    js = write_json(summary, out / "sweep.json")
    best = [(label_of(fc), fc) for fc in result.forecasts[:top]]
    png = plot_forecasts(best, out / "sweep.png", target_loss=target,
                         title=f"{title}: best {len(best)} of {len(table)} settings")  # fmt: skip
    page = write_html(
        out / "report.html",
        title=title,
        images=[png],
        sections=[
            (
                f"All settings, ranked by {_ranking(result)}; settings outside the validity "
                "region or diverging rank last",
                _html_table(records),
            ),
            ("Details: run settings",
             _html_table([{"quantity": k, "value": v} for k, v in (info or {}).items()])),
            ("Details: kernel", _html_table(kernel_rows(kernel))),
        ],
    )
    return {"csv": csv, "json": js, "png": png, "html": page}


def plot_exact_top_sweep(result: Any, path: str | Path, *,
                         title: str = "Sweep (exact top, block linear)") -> Path:
    """Each setting of an exact-top sweep (:func:`tangentlab.experimental.exact_top.
    sweep_exact_top`) on one row, ranked from the top: the estimate of the real steps to the
    target (a dot) and its interval (a bar; orange where the reliability check flags the
    setting, an arrow where it runs past the plot), saved as PNG. Settings that do not reach
    the target are listed without a dot."""
    plt = _plt()
    t = result.table
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(t)))
    highs = [v for v in t["interval_high"] if v is not None and math.isfinite(v)]
    right = max([1.0] + [float(v) for v in t["estimate"] if v is not None and v == v])
    right = min(max(highs or [right]), 3.0 * right) * 1.05
    labels = []
    for i, row in enumerate(t.itertuples()):
        b = "full" if row.batch_size is None or row.batch_size != row.batch_size else int(
            row.batch_size)
        labels.append(f"{row.rank}. {row.optimizer}, batch {b}")
        est = row.estimate
        if est is None or est != est:
            ax.text(0.01 * right, i, f"{row.check}: not reached", va="center", fontsize=7,
                    color="0.4")  # fmt: skip
            continue
        col = "tab:orange" if row.check != "passed" else "tab:blue"
        hi = min(row.interval_high, right)
        ax.plot([row.interval_low, hi], [i, i], color=col, lw=5, alpha=0.35,
                solid_capstyle="butt")  # fmt: skip
        if row.interval_high > right:
            ax.annotate("", xy=(right, i), xytext=(0.95 * right, i),
                        arrowprops=dict(arrowstyle="->", color=col))  # fmt: skip
        ax.plot([est], [i], "o", color=col, ms=5)
    ax.set_yticks(range(len(t)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, right)
    ax.set_xlabel(f"real steps to a {result.drop:.0%} drop of L0: estimate and interval "
                  "(orange: flagged)")  # fmt: skip
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def write_exact_top_sweep_report(
    out_dir: str | Path,
    result: Any,
    kernel: Any,
    *,
    title: str = "tangentlab sweep (exact top, block linear)",
    top: int = 6,
    info: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``sweep.csv``, ``sweep.json``, ``sweep.png`` (the best ``top`` curves),
    ``sweep-ranking.png`` (every setting's estimate and interval) and ``report.html`` for an
    :class:`~tangentlab.experimental.exact_top.ExactTopSweep`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "sweep.csv"
    atomic_write(csv, lambda tmp: result.table.to_csv(tmp, index=False))
    records = result.to_dict()["rows"]
    meta = dict(getattr(kernel, "metadata", {}))
    js = write_json({"title": title, "drop": result.drop, "rank_by": result.to_dict()["rank_by"],
                     "best_passed": result.best_passed, "table": records, "kernel": meta,
                     "info": info or {}}, out / "sweep.json")  # fmt: skip
    best = [(row["optimizer"] + ("" if row["batch_size"] is None else
                                 f", batch {int(row['batch_size'])}"), fc)
            for row, fc in zip(records[:top], result.forecasts[:top])]  # fmt: skip
    png = plot_exact_top(best, out / "sweep.png", drop=result.drop,
                         title=f"{title}: best {len(best)} of {len(records)} settings")
    ranking = plot_exact_top_sweep(result, out / "sweep-ranking.png", title=title)
    page = write_html(out / "report.html", title=title, images=[ranking, png], sections=[
        (f"All settings, ranked by the estimated real steps to a {result.drop:.0%} drop "
         "(NOTE [exact-top sweep ranking]: a flagged setting is not demoted; not reached, "
         "then blow-ups, last)", _html_table(records)),
        ("Details: run settings",
         _html_table([{"quantity": k, "value": v} for k, v in (info or {}).items()])),
        ("Details: kernel", _html_table([{"quantity": k, "value": v} for k, v in meta.items()])),
    ])  # fmt: skip
    return {"csv": csv, "json": js, "png": png, "ranking": ranking, "html": page}


def _ranking(result) -> str:
    """How a sweep was ranked, in words."""
    rank_by = getattr(result, "rank_by", "steps")
    if rank_by == "steps":
        return f"steps to loss {result.target_loss:.4g} ({result.target_note})"
    return {
        "eval_accuracy": "forecast held-out accuracy at the last step",
        "best_eval_accuracy": "best forecast held-out accuracy along the run (early stopping)",
        "eval_loss": "forecast held-out loss at the last step",
    }[rank_by]


def write_validation_report(
    out_dir: str | Path,
    forecast: Forecast,
    run,
    comparison,
    kernel: Kernel,
    *,
    title: str = "tangentlab validate",
    info: dict[str, Any] | None = None,
    pilot: Any = None,
) -> dict[str, Path]:
    """Write ``validation.json``, ``validation.png`` and ``validation.html`` into ``out_dir``.

    The plot overlays the forecast (mean and band) and the real run (dashed, at its logged
    steps); the JSON holds the comparison, both curves, the kernel summary and ``info``.

    Args:
      forecast: the :class:`~tangentlab.Forecast`.
      run: the :class:`~tangentlab.finetune.TrainingRun` of the same setting.
      comparison: ``tangentlab.compare.compare(forecast, run)``.
      kernel: the kernel the forecast was computed from.
      pilot: the :class:`tangentlab.hybrid.Pilot` the comparison's interval used, if any.

    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    hp = run.hyperparameters
    target = comparison.target_loss
    run_label = f"real run (BN {hp.get('bn', 'frozen')}, seed {hp.get('seed', '?')})"
    png = plot_forecasts(
        [(f"forecast: {label_of(forecast)}", forecast)], out / "validation.png",
        target_loss=target, title=title, pilot=pilot,
        measured=[(run_label, run.steps, run.loss, run.accuracy,
                   getattr(run, "eval_loss", None), getattr(run, "eval_accuracy", None))],
    )  # fmt: skip
    summary = comparison.summary()
    held = summary.pop("eval", None) or {}
    summary.update({f"held-out: {k}": v for k, v in held.items()})
    js = write_json(
        {
            "title": title,
            "comparison": comparison.to_dict(),
            "forecast": forecast.to_dict(),
            "run": run.to_dict(),
            "kernel": kernel.describe(),
            "info": info or {},
        },
        out / "validation.json",
    )
    rows = [{"quantity": k, "value": "; ".join(map(str, v)) if isinstance(v, list) else v}
            for k, v in summary.items()]  # fmt: skip
    run_rows = [{"quantity": k, "value": v} for k, v in hp.items()]
    run_rows += [
        {"quantity": k, "value": getattr(run, k)}
        for k in ("train_seconds", "eval_seconds", "wall_seconds", "diverged", "interrupted")
    ]
    page = write_html(
        out / "validation.html",
        title=title,
        images=[png],
        sections=[
            ("Forecast vs real run", _html_table(rows)),
            ("Real fine-tuning run", _html_table(run_rows)),
            ("Forecast", _html_table([summary_row(forecast, target, pilot=pilot)])),
            ("Details: run settings",
             _html_table([{"quantity": k, "value": v} for k, v in (info or {}).items()])),
            ("Details: kernel", _html_table(kernel_rows(kernel))),
        ],
    )
    return {"json": js, "png": png, "html": page}

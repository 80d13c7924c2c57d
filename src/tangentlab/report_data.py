"""Reports of per-sample scores (unique information, TracIn influence): JSON, CSV, HTML.

Formatting only: the scores come from :func:`tangentlab.sample_information` and
:func:`tangentlab.influence`; the detection curve from :func:`tangentlab.detection_curve`.
The HTML page shows the samples at both ends of the ranking as images (inputs shaped like
images) or text (when texts are given), with their labels and scores, and, when the
indices of deliberately flipped labels are given, the fraction of them found against the
fraction of samples checked.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tangentlab.information import SampleInformation, detection_curve
from tangentlab.kernel import atomic_write
from tangentlab.report import _html_table, _plt, save_figure, write_html, write_json

_CARD_CSS = (
    "<style>.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ccc;"
    "padding:4px;width:150px;font-size:12px;text-align:center}.card img{width:96px;"
    "image-rendering:pixelated}.card .txt{text-align:left;max-height:7em;overflow:auto}"
    ".flip{border-color:#c00;background:#fee}</style>"
)


def _scores(result: Any) -> list[tuple[str, np.ndarray]]:
    """The result's rankable scores, primary first: ``(name, [N])``."""
    if isinstance(result, SampleInformation):
        return [("weights", result.weights), ("functional", result.functional)]
    out = [("self", result.self_influence)]
    if result.train_to_eval is not None:
        out.append(("eval", result.train_to_eval.sum(axis=0)))
    return out


def _image_png(img: np.ndarray) -> str:
    """A base64 PNG of one image ``[H, W]``, ``[1, H, W]`` or ``[3, H, W]`` (min-max scaled)."""
    plt = _plt()
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    buf = io.BytesIO()
    plt.imsave(buf, a, cmap="gray" if a.ndim == 2 else None, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _is_image(a: np.ndarray) -> bool:
    """``[H, W]`` or ``[1|3, H, W]`` (a channel-first image)."""
    return a.ndim == 2 or (a.ndim == 3 and a.shape[0] in (1, 3))


def sample_cards(
    indices: Sequence[int],
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    inputs: Any = None,
    texts: Sequence[str] | None = None,
    flipped: Sequence[int] = (),
) -> str:
    """HTML cards for ``indices``: the sample as an image or text, its label and score.

    ``inputs``: ``X`` ``[N, ...]`` (shown when a sample is an image ``[H, W]`` or
    ``[1|3, H, W]``); ``texts``: one string per sample (shown instead). Flipped samples
    are outlined in red.
    """
    cards = []
    flipped = set(int(i) for i in flipped)
    for i in indices:
        i = int(i)
        body = ""
        if texts is not None:
            body = f"<div class='txt'>{html.escape(str(texts[i])[:300])}</div>"
        elif inputs is not None and not isinstance(inputs, dict):
            xi = np.asarray(inputs[i].detach().cpu() if hasattr(inputs[i], "detach") else inputs[i])
            if _is_image(xi):
                body = f"<img alt='sample {i}' src='data:image/png;base64,{_image_png(xi)}'>"
        cls = "card flip" if i in flipped else "card"
        note = " (flipped)" if i in flipped else ""
        cards.append(
            f"<div class='{cls}'>{body}<div>#{i} label {int(labels[i])}{note}</div>"
            f"<div>score {float(scores[i]):.4g}</div></div>"
        )
    return "<div class='cards'>" + "".join(cards) + "</div>"


def plot_detection(curves: dict[str, dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """Fraction of flipped labels found vs fraction checked, one line per score (PNG)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in curves.items():
        ax.plot(c["checked"], c["found"], lw=1.8, label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="0.5", lw=1, label="random order")
    ax.set_xlabel("fraction of training samples checked (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def write_data_report(
    out_dir: str | Path,
    result: Any,
    *,
    name: str,
    title: str,
    what: Sequence[tuple[str, Any]] = (),
    inputs: Any = None,
    texts: Sequence[str] | None = None,
    flipped: Sequence[int] | None = None,
    info: dict[str, Any] | None = None,
    show: int = 8,
) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.csv`` and ``NAME.html`` (+ ``NAME-detection.png`` when
    ``flipped`` is given) for a :class:`SampleInformation` or :class:`Influence` result.

    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = _scores(result)
    labels = np.asarray(result.targets)
    payload = {**result.to_dict(), "info": info or {}}
    paths: dict[str, Path] = {}
    images = []
    det_rows = []
    if flipped is not None and len(flipped):
        curves = {key: detection_curve(v, flipped) for key, v in scores}
        payload["flipped"] = [int(i) for i in flipped]
        payload["detection"] = curves
        paths["png"] = plot_detection(
            curves, out / f"{name}-detection.png",
            title=f"{len(flipped)} flipped labels of {labels.size}",
        )  # fmt: skip
        images.append(paths["png"])
        n = labels.size
        for key, c in curves.items():
            row = {"score": key, "AUC": c["auc"]}
            for frac in (0.05, 0.1, 0.2, 0.3):
                row[f"found at {frac:.0%} checked"] = c["found"][int(round(frac * n))]
            det_rows.append(row)
    paths["json"] = write_json(payload, out / f"{name}.json")
    frame = result.to_frame()
    paths["csv"] = out / f"{name}.csv"
    atomic_write(paths["csv"], lambda tmp: frame.to_csv(tmp, index=False))
    key, primary = scores[0]
    order = np.argsort(-primary, kind="stable")
    k = max(1, min(show, labels.size))
    kw = {"inputs": inputs, "texts": texts, "flipped": () if flipped is None else flipped}
    sections = [("What was measured", _html_table([{"quantity": q, "value": v}
                                                   for q, v in what]))]  # fmt: skip
    if isinstance(result, SampleInformation):
        high, low = "Most informative samples", "Least informative samples"
        unit = "unique information in the weights, nats"
    else:
        high, low = "Highest self-influence", "Lowest self-influence"
        unit = "TracIn self-influence"
    sections.append((
        f"{high} ({unit}; red: flipped label)",
        _CARD_CSS + sample_cards(order[:k], labels, primary, **kw),
    ))  # fmt: skip
    sections.append((low, sample_cards(order[::-1][:k], labels, primary, **kw)))
    if det_rows:
        sections.append(("Mislabeled-sample detection (flipped labels)", _html_table(det_rows)))
    top = [{"rank": r, "sample": int(i), "label": int(labels[i]),
            **{s: float(v[i]) for s, v in scores}} for r, i in enumerate(order[:50])]  # fmt: skip
    sections.append(("Details: top 50 samples", _html_table(top)))
    sections.append((
        "Details: settings",
        _html_table([{"quantity": q, "value": v} for q, v in (info or {}).items()]),
    ))  # fmt: skip
    paths["html"] = write_html(out / f"{name}.html", title=title, sections=sections,
                               images=images)  # fmt: skip
    return paths

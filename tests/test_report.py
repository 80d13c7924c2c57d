"""Tests of the report writers (``tangentlab.report``) on a tiny kernel built from arrays."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.image import imread

import tangentlab as tl
from tangentlab.report import (
    format_table,
    label_of,
    plot_forecasts,
    summary_row,
    write_forecast_report,
    write_json,
    write_sweep_report,
)
from tangentlab.training import SGD

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N, C = 12, 3


def strict_json(path: Path):
    def bad(token: str):
        raise AssertionError(f"{path.name} contains {token}")

    return json.loads(path.read_text(), parse_constant=bad)


def assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)  # decodes: a complete image, not just a header
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


@pytest.fixture
def kernel() -> tl.Kernel:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N * C, 20, generator=g, dtype=torch.float64)
    return tl.Kernel(
        f0=0.1 * torch.randn(N, C, generator=g, dtype=torch.float64),
        targets=torch.arange(N) % C,
        theta=a @ a.T,  # random PSD, [N*C, N*C]
    )


def stable_lr(kernel: tl.Kernel, stability: float) -> float:
    """The lr with η λ_max / N = ``stability`` (diverges from 2 on, full batch, no momentum)."""
    return stability * kernel.num_samples / float(kernel.eigh()[0].max())


# --------------------------------------------------------------------------- tables, JSON


def test_format_table_handles_none_and_nan():
    rows = [
        {"setting": "lr=0.1", "steps": None, "loss": float("nan"), "acc": 0.123456},
        {"setting": "lr=1", "steps": 42, "loss": np.float64(1.5), "acc": float("inf")},
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["setting", "steps", "loss", "acc"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["lr=0.1", "-", "nan", "0.1235"]
    assert lines[3].split() == ["lr=1", "42", "1.5", "nan"]
    assert len({len(line) for line in lines}) == 1  # columns aligned
    assert format_table([]) == ""


def test_write_json_turns_nan_into_null(tmp_path):
    obj = {
        "a": float("nan"),
        "b": [1.0, float("inf"), -math.inf],
        "c": np.float64("nan"),
        "d": {"n": np.int64(3), "ok": np.bool_(True), "t": (np.float32(0.5), None)},
    }
    path = write_json(obj, tmp_path / "sub" / "x.json")  # parent created
    assert path == tmp_path / "sub" / "x.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert strict_json(path) == {
        "a": None,
        "b": [1.0, None, None],
        "c": None,
        "d": {"n": 3, "ok": True, "t": [0.5, None]},
    }


def test_summary_row_and_label(kernel):
    fc = tl.forecast(kernel, SGD(stable_lr(kernel, 0.5), momentum=0.5), 30, batch_size=4, paths=2)
    assert label_of(fc) == f"lr={fc.hyperparameters['lr']:g}, B=4, m=0.5, MSE"
    full = tl.forecast(kernel, SGD(stable_lr(kernel, 0.5)), 30)
    assert "full batch" in label_of(full)
    target = float(full.loss[10])
    row = summary_row(full, target)
    assert 0 < row["steps_to_target"] == full.steps_to(target) <= 10
    assert row["diverges"] is False and row["initial_loss"] == pytest.approx(full.loss[0])


# --------------------------------------------------------------------------- plots


@pytest.fixture
def spy_axes(monkeypatch):
    """Record Axes.plot / Axes.fill_between calls made while plotting."""
    calls: dict[str, list] = {"plot": [], "fill_between": []}
    for name in calls:
        orig = getattr(Axes, name)

        def spy(self, *args, _orig=orig, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(Axes, name, spy)
    return calls


def test_plot_stochastic_forecast_draws_band(kernel, tmp_path, spy_axes):
    fc = tl.forecast(kernel, SGD(stable_lr(kernel, 0.5)), 25, batch_size=4, paths=4, seed=1)
    assert fc.loss_band is not None
    target = float(fc.loss[10])
    path = plot_forecasts([("minibatch", fc)], tmp_path / "p" / "band.png", target_loss=target)
    assert path == tmp_path / "p" / "band.png"
    assert_png(path)
    (band,) = spy_axes["fill_between"]
    steps, low, high = band[0]
    np.testing.assert_array_equal(steps, np.arange(26))
    np.testing.assert_array_equal(low, fc.loss_band[0])
    np.testing.assert_array_equal(high, fc.loss_band[1])
    t = fc.steps_to(target)
    assert t is not None  # so the steps-to-target marker is drawn:
    markers = [a for a, _ in spy_axes["plot"] if len(a) == 3 and a[2] == "o"]
    assert markers == [([t], [fc.loss[t]], "o")]


def test_plot_with_measured_curves(kernel, tmp_path, spy_axes):
    fc = tl.forecast(kernel, SGD(stable_lr(kernel, 0.5)), 20)
    steps = np.arange(0, 21, 5)
    loss = fc.loss[steps] * 1.1
    acc = fc.accuracy[steps]
    path = plot_forecasts(
        [("forecast", fc)],
        tmp_path / "measured.png",
        measured=[("run A", steps, loss, acc), ("run B", steps, loss * 0.9, None)],
    )
    assert_png(path)
    assert spy_axes["fill_between"] == []  # deterministic: no band
    dashed = [(a, kw) for a, kw in spy_axes["plot"] if len(a) == 3 and a[2] == "--"]
    assert [kw["label"] for _, kw in dashed] == ["run A", "run A", "run B"]  # B: no accuracy
    np.testing.assert_array_equal(dashed[0][0][1], loss)
    np.testing.assert_array_equal(dashed[1][0][1], acc)


def test_plot_diverging_forecast(kernel, tmp_path):
    fc = tl.forecast(kernel, SGD(stable_lr(kernel, 5.0)), 20)
    assert fc.diverges and np.isnan(fc.loss[-1])
    assert_png(plot_forecasts([(label_of(fc), fc)], tmp_path / "div.png", target_loss=0.1))


# --------------------------------------------------------------------------- sweep report


def _sweep(kernel):
    opts = tl.SGD.grid(lr=[stable_lr(kernel, 0.3), stable_lr(kernel, 1.0), stable_lr(kernel, 5.0)])
    return tl.sweep(kernel, opts, 30, batch_sizes=[4, None], paths=2)


def test_write_sweep_report_writes_all_four_files(kernel, tmp_path):
    result = _sweep(kernel)
    table = result.table
    assert table["diverges"].any()  # a diverging row exercises NaN -> null
    paths = write_sweep_report(tmp_path / "sw", result, kernel, info={"who": "test"}, top=4)
    out = tmp_path / "sw"
    assert paths == {
        "csv": out / "sweep.csv",
        "json": out / "sweep.json",
        "png": out / "sweep.png",
        "html": out / "report.html",
    }
    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and "forecast" not in rows[0]
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))

    js = strict_json(paths["json"])
    assert js["target_loss"] == pytest.approx(result.target_loss)
    assert [r["rank"] for r in js["table"]] == list(range(1, 7))
    assert js["info"] == {"who": "test"} and js["kernel"]["num_samples"] == N
    div = [r for r in js["table"] if r["diverges"]]
    assert div and all(r["loss_limit"] is None for r in div)
    never = [r for r in js["table"] if r["steps_to_target"] is None]
    assert never and all(r["rank"] > len(js["table"]) - len(never) for r in never)

    assert_png(paths["png"])
    page = paths["html"].read_text(encoding="utf-8")
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m and base64.b64decode(m.group(1)) == paths["png"].read_bytes()
    assert "ranked by steps to loss" in page
    assert page.count("<tr>") >= 1 + 6  # header + one row per setting (+ run, kernel tables)


def test_plot_marks_the_head_exact_interval(tmp_path, spy_axes):
    """A head-exact forecast's 80% interval for the real steps (NOTE [steps interval]) is
    drawn along the target line, its median estimate as a diamond; none for the tangent model."""
    import warnings

    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.double), torch.arange(12) % 3
    hb = tl.compute_head_body_kernel(net, (x, y), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, SGD(0.3), 60, loss="ce")
    target = 0.5 * float(fc.loss[0]) + 0.5 * float(fc.loss.min())
    iv = fc.steps_interval(target)
    assert_png(plot_forecasts([("head-exact", fc)], tmp_path / "iv.png", target_loss=target))
    drawn = {kw.get("label"): a for a, kw in spy_axes["plot"]}
    label = "real steps to target, 80% interval " + ("(narrow: trusted)" if iv.trusted
                                                      else "(wide)")  # fmt: skip
    assert drawn[label][:2] == ([iv.low, iv.high], [target] * 2)
    assert drawn["median estimate"] == ([iv.median], [target], "D")
    spy_axes["plot"].clear()
    plain = tl.forecast(tl.compute_kernel(net, (x, y), progress=False), SGD(0.3), 60, loss="ce")
    plot_forecasts([("tangent", plain)], tmp_path / "t.png", target_loss=target)
    assert "median estimate" not in {kw.get("label") for _, kw in spy_axes["plot"]}
    # the band for the real loss (NOTE [loss interval]): shaded where it has both edges
    band = fc.loss_interval()
    fills = [(a, kw) for a, kw in spy_axes["fill_between"]
             if kw.get("label") == "real loss, band of the 80% steps intervals"]  # fmt: skip
    if band.two_sided().any():
        ((args, kw),) = fills
        np.testing.assert_array_equal(args[1], band.low)
        np.testing.assert_array_equal(args[2], band.high)
        np.testing.assert_array_equal(kw["where"], band.two_sided())
    else:
        assert not fills
    assert not [kw for _, kw in spy_axes["fill_between"] if "steps intervals" in
                str(kw.get("label"))][1:]  # one band, for the one forecast
    js = strict_json(write_forecast_report(tmp_path / "r", [fc], hb, target_loss=target)["json"])
    np.testing.assert_allclose(np.array(js["loss_intervals"][0]["low"], dtype=float), band.low)
    spy_axes["fill_between"].clear()
    # a forecast that blows up at the limit: the rerun at c·lr on its rescaled clock
    torch.manual_seed(4)  # test_headbody's TanhBody, whose CE forecast blows up at a = 1
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                        nn.Linear(4, 3)).double().eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=torch.double)
    hb = tl.compute_head_body_kernel(net, (x, torch.randint(0, 3, (10,), generator=g)),
                                     progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = tl.forecast(hb, SGD(tl.stable_lr(hb, fraction=1.0, loss="ce")), 100, loss="ce")
    assert bad.stabilized is not None
    c = bad.method["stabilized"]["factor"]
    deep = 0.2 * float(bad.loss[0])
    ivb = bad.steps_interval(deep)
    assert ivb.stabilized == c and ivb.high is not None
    spy_axes["plot"].clear()
    plot_forecasts([("head-exact", bad)], tmp_path / "b.png", target_loss=deep)
    drawn = {kw.get("label"): a for a, kw in spy_axes["plot"]}
    xs, ys = drawn[f"rerun at {c:g} x lr, steps x {c:g}"][:2]
    np.testing.assert_allclose(xs, c * np.arange(bad.stabilized.loss.shape[0]))
    assert drawn["real steps to target, 80% interval (wide), if the run gets there"][:2] == (
        [ivb.low, ivb.high], [deep] * 2)  # fmt: skip

"""Pilot calibration (tangentlab.experimental.pilot): clocks, warps and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from tangentlab.errors import TangentlabError
from tangentlab.experimental.pilot import (
    PilotClock,
    apply_clock,
    clock_growth,
    fit_pilot_clock,
    pilot_subset,
    progress_of,
    run_pilot,
    warp_steps,
)


def _exp(rate: float, steps: int, l0: float = 2.0) -> np.ndarray:
    return l0 * np.exp(-rate * np.arange(steps + 1))


def test_identity_pilot_leaves_the_forecast_unchanged():
    fc = _exp(0.02, 200) + 0.1 * np.exp(-0.3 * np.arange(201))
    clock = fit_pilot_clock(fc, fc, knots=12)
    np.testing.assert_array_equal(clock.slopes, np.ones(12))
    full = _exp(0.005, 400)
    np.testing.assert_allclose(apply_clock(full, clock), full, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(clock_growth(full, clock), np.ones(400))


@pytest.mark.parametrize("mode", ["rate", "ratio"])
def test_twice_as_fast_real_pilot_is_recovered_exactly(mode):
    # log progress is linear in steps for exponential curves: the crossings are exact
    clock = fit_pilot_clock(_exp(0.04, 100), _exp(0.02, 300), scale="log", knots=8)
    np.testing.assert_allclose(clock.slopes, 0.5, rtol=1e-12)
    np.testing.assert_allclose(clock.speedup, 2.0, rtol=1e-12)
    full = _exp(0.01, 400)  # another forecast (full N): its corrected curve runs at 2x
    np.testing.assert_allclose(warp_steps(full, clock, mode=mode)[:201],
                               np.arange(201) / 2.0, rtol=1e-7, atol=1e-6)  # fmt: skip
    corrected = apply_clock(full, clock, horizon=300, mode=mode)
    np.testing.assert_allclose(corrected[:201], _exp(0.02, 200), rtol=1e-6)
    assert np.all(np.isnan(corrected[201:]))  # past the forecast's warped horizon
    np.testing.assert_allclose(clock_growth(full, clock), 2.0, rtol=1e-12)


def test_progress_dependent_clock_is_read_at_the_forecasts_own_progress():
    # forecast: L = 1 - 0.001 t (loss progress = 0.001 t); real: twice as fast until
    # progress 0.4, then four times as fast
    t = np.arange(801.0)
    fc = 1.0 - 0.001 * t
    real_t = np.arange(301.0)
    real = np.where(real_t <= 200, 1.0 - 0.002 * real_t, 0.6 - 0.004 * (real_t - 200))
    clock = fit_pilot_clock(real, fc, knots=8, max_progress=0.8)
    np.testing.assert_allclose(clock.slopes, [0.5] * 4 + [0.25] * 4, rtol=1e-9)
    # a slower full forecast (progress 0.0005/step) gets the same progress-indexed clock
    full = 1.0 - 0.0005 * np.arange(1601.0)
    w = warp_steps(full, clock)
    assert w[800] == pytest.approx(400.0, abs=0.5)  # progress 0.4 at step 800: 800 x 1/2
    assert w[1600] == pytest.approx(600.0, abs=0.5)  # then 800 more steps at 1/4
    # and beyond the last knot the last slope holds
    assert clock.slope_at(np.array([0.95]))[0] == pytest.approx(0.25)


def test_progress_uses_the_running_minimum_and_stops_at_divergence():
    q = progress_of(np.array([1.0, 0.5, 0.8, 0.25, np.inf, 0.1]))
    np.testing.assert_allclose(q[:4], [0.0, 0.5, 0.5, 0.75])
    assert np.all(np.isnan(q[4:]))
    np.testing.assert_allclose(progress_of(np.array([2.0, 1.0]), scale="log"), [0.0, np.log(2)])


def test_oscillating_curves_give_increasing_knots():
    t = np.arange(300.0)
    real = np.exp(-0.03 * t) * (1 + 0.3 * np.cos(2.5 * t) ** 2)
    real = real / real[0]
    fc = np.exp(-0.01 * np.arange(900.0))
    clock = fit_pilot_clock(real, fc, knots=10)
    assert np.all(clock.slopes > 0)
    assert np.all(np.diff(clock.real_steps) > 0)


def test_diverged_forecast_is_cut_and_warp_is_nan_after():
    fc = _exp(0.02, 100)
    full = _exp(0.01, 50)
    full[30:] = np.nan
    clock = fit_pilot_clock(_exp(0.04, 50), fc, scale="log")
    w = warp_steps(full, clock)
    assert np.all(np.isfinite(w[:30])) and np.all(np.isnan(w[30:]))
    out = apply_clock(full, clock, horizon=40)
    assert np.isfinite(out[14]) and np.all(np.isnan(out[15:]))


def test_logged_steps_of_a_minibatch_run_are_honoured():
    steps = np.arange(0, 101, 4)
    real = 2.0 * np.exp(-0.04 * steps)
    clock = fit_pilot_clock(real, _exp(0.02, 300), real_steps=steps, scale="log", knots=5)
    np.testing.assert_allclose(clock.slopes, 0.5, rtol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(real_losses=np.ones((3, 2)), forecast_losses=np.ones(3)), "1-D loss curve"),
        (dict(real_losses=[1.0], forecast_losses=[1.0, 0.5]), "at least 2 points"),
        (dict(real_losses=[0.0, 0.0], forecast_losses=[0.0, 0.0]), "finite loss > 0"),
        (dict(real_losses=[1.0, 0.5], forecast_losses=[2.0, 0.5]), "same pilot"),
        (dict(real_losses=[1.0, 1.0, 1.0], forecast_losses=[1.0, 0.5]), "no progress"),
        (dict(real_losses=[1.0, 0.5], forecast_losses=[1.0, 0.5], knots=0), "knots"),
        (dict(real_losses=[1.0, 0.5], forecast_losses=[1.0, 0.5], scale="lin"), "scale"),
        (
            dict(real_losses=[1.0, 0.5], forecast_losses=[1.0, 0.5], real_steps=[0, 1, 2]),
            "its steps 3",
        ),
        (dict(real_losses=[1.0, 0.5], forecast_losses=[1.0, 0.5], real_steps=[1, 2]), "start at 0"),
        (
            dict(real_losses=[1.0, 0.5], forecast_losses=[1.0, 0.5], max_progress=-1.0),
            "max_progress",
        ),
    ],
)
def test_fit_errors_say_what_to_fix(kwargs, match):
    with pytest.raises(TangentlabError, match=match):
        fit_pilot_clock(**kwargs)


def test_clock_and_apply_errors():
    with pytest.raises(TangentlabError, match="increase strictly"):
        PilotClock(progress=[0, 0.5, 0.5], real_steps=[0, 1, 2], forecast_steps=[0, 1, 2])
    with pytest.raises(TangentlabError, match="same length"):
        PilotClock(progress=[0, 0.5], real_steps=[0, 1, 2], forecast_steps=[0, 1])
    clock = fit_pilot_clock(_exp(0.04, 50), _exp(0.02, 100))
    with pytest.raises(TangentlabError, match="must be a PilotClock"):
        apply_clock(_exp(0.01, 10), {"slopes": [1.0]})
    with pytest.raises(TangentlabError, match="mode must be one of"):
        apply_clock(_exp(0.01, 10), clock, mode="fast")
    with pytest.raises(TangentlabError, match="horizon"):
        apply_clock(_exp(0.01, 10), clock, horizon=-1)


def test_pilot_subset_and_run_pilot_train_only_the_subset():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    (xs, ys), idx = pilot_subset((x, y), 0.25, seed=1)
    assert idx.size == 10 and np.all(np.diff(idx) > 0)
    torch.testing.assert_close(xs, x[idx])
    (_, _), idx2 = pilot_subset((x, y), 10, seed=1)
    np.testing.assert_array_equal(idx, idx2)
    with pytest.raises(TangentlabError, match="between 2 and N = 40"):
        pilot_subset((x, y), 41)
    with pytest.raises(TangentlabError, match=r"in \(0, 1\)"):
        pilot_subset((x, y), 1.5)
    model = nn.Linear(5, 3)
    run, (xs, ys), idx = run_pilot(model, (x, y), tl.SGD(0.1), 5, size=10, loss="mse")
    ref = tl.finetune(model, (x[idx], y[idx]), tl.SGD(0.1), 5, loss="mse", log_every=1,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(run.loss, ref.loss)
    with pytest.raises(TangentlabError, match="full batch"):
        run_pilot(model, (x, y), tl.SGD(0.1), 5, batch_size=4)

"""The forecast API: divergence, primal/dual execution, sweep, summaries and input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tangentlab.errors import TangentlabError, ValidityWarning
from tangentlab.forecast import Forecast, Sweep, forecast, sweep
from tangentlab.kernel import Kernel
from tangentlab.training import MSE, SGD


def make_kernel(n=20, c=3, p=10, seed=0, *, kind="theta", jw0=True):
    """A linear model's kernel: theta = J J^T (kind='theta'), or features = J (projected)."""
    rng = np.random.default_rng(seed)
    jac = torch.tensor(rng.standard_normal((n * c, p)) / math.sqrt(p))
    kw = {}
    if kind in ("theta", "both"):
        kw["theta"] = jac @ jac.T
    if kind in ("features", "both"):
        kw["features"] = jac
    if jw0:
        kw["jw0"] = (jac @ torch.tensor(rng.standard_normal(p))).reshape(n, c)
    y = torch.tensor(rng.integers(0, c, n))
    return Kernel(f0=torch.tensor(rng.standard_normal((n, c)) * 0.3), targets=y, **kw)


def critical_lr(k, momentum=0.0, weight_decay=0.0):
    """The learning rate at which η/(1-m) (λ_max/N + λ) = 2."""
    lam_max = float(k.eigh()[0][-1])
    return 2.0 * (1.0 - momentum) / (lam_max / k.num_samples + weight_decay)


# ---- divergence -------------------------------------------------------------------------


def test_divergence_flagged_above_stability_limit_and_not_returned():
    k = make_kernel()
    lr_c = critical_lr(k)
    ok = forecast(k, SGD(0.97 * lr_c), 200)
    assert not ok.diverges and ok.divergence_step is None
    assert ok.stability == pytest.approx(1.94, rel=1e-9) and ok.stability_limit == 2.0
    assert np.isfinite(ok.loss).all() and np.isfinite(ok.accuracy).all()

    bad = forecast(k, SGD(1.05 * lr_c), 200)
    assert bad.diverges and bad.stability >= bad.stability_limit
    t = bad.divergence_step
    assert t is not None and 0 < t <= 200
    assert np.isnan(bad.loss[t:]).all() and np.isnan(bad.accuracy[t:]).all()
    assert np.isfinite(bad.loss[:t]).all() and (bad.loss[:t] <= bad.loss[0]).all()
    assert math.isnan(bad.loss_limit) and bad.steps_to_plateau(0.01) is None
    assert bad.to_dict()["loss"][-1] is None  # JSON: null, never a huge number


def test_heavy_ball_stability_limit_is_two_one_plus_m_over_one_minus_m():
    k = make_kernel(seed=1)
    m = 0.5
    lr_c = critical_lr(k, momentum=m) * (1 + m) / (1 - m)  # exact heavy-ball limit
    stable = forecast(k, SGD(0.98 * lr_c, momentum=m), 400)
    unstable = forecast(k, SGD(1.02 * lr_c, momentum=m), 400)
    assert stable.stability_limit == pytest.approx(6.0)
    assert not stable.diverges and np.isfinite(stable.loss).all()
    assert unstable.diverges and np.isnan(unstable.loss[-1])
    # the effective-rate model is unstable already at a third of that rate
    eff = forecast(k, SGD(0.4 * lr_c, momentum=m), 50, momentum_mode="effective")
    assert eff.stability_limit == 2.0 and eff.diverges


def test_gradient_flow_reports_unstable_step_size():
    k = make_kernel(seed=2)
    fc = forecast(k, SGD(1.1 * critical_lr(k)), 50, time="continuous")
    assert fc.diverges and fc.divergence_step == 1 and np.isnan(fc.loss[1:]).all()


@pytest.mark.parametrize("noise", ["simulate", "sde"])
def test_minibatch_blowup_is_flagged_with_nans(noise):
    k = make_kernel(seed=3)
    fc = forecast(k, SGD(5 * critical_lr(k)), 300, batch_size=4, paths=4, noise=noise)
    assert fc.diverges and fc.divergence_step is not None
    t = fc.divergence_step
    assert np.isnan(fc.loss[t:]).all() and np.isnan(fc.loss_paths[:, t:]).all()
    assert np.isnan(fc.loss_band[0][t:]).all()
    assert np.isfinite(fc.loss[:t]).all() and np.nanargmin(fc.loss) == t - 1
    assert fc.loss_paths[np.isfinite(fc.loss_paths)].max() < 1e4 * fc.loss[0]


def test_ce_stability_is_reported_but_large_steps_need_not_diverge():
    k = make_kernel(seed=4)
    fc = forecast(k, SGD(50.0), 100, loss="ce")
    assert math.isfinite(fc.stability) and fc.stability > 2
    assert not fc.diverges and np.isfinite(fc.loss).all()


# ---- primal vs dual ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss="ce", momentum=0.9, weight_decay=0.01),
        dict(loss="ce", time="continuous"),
        dict(loss="mse", batch_size=4, momentum=0.5, weight_decay=0.01),
        dict(loss="ce", batch_size=4, sampling="replacement"),
        dict(loss="mse", batch_size=4, noise="sde"),
    ],
)
def test_primal_and_dual_execution_agree_on_a_projected_kernel(settings):
    k = make_kernel(seed=5, kind="features")  # k = 10 < N*C = 60
    settings = dict(settings)
    opt = SGD(
        1.0, **{key: settings.pop(key) for key in ("momentum", "weight_decay") if key in settings}
    )
    primal = forecast(k, opt, 60, execution="primal", paths=3, **settings)
    dual = forecast(k, opt, 60, execution="dual", paths=3, **settings)
    assert primal.method["execution"] == "primal" and dual.method["execution"] == "dual"
    np.testing.assert_allclose(primal.loss, dual.loss, rtol=1e-7)
    np.testing.assert_allclose(primal.accuracy, dual.accuracy)
    if "batch_size" in settings:
        np.testing.assert_allclose(primal.loss_paths, dual.loss_paths, rtol=1e-7)


def test_mse_iterated_steps_agree_with_the_closed_form():
    k = make_kernel(seed=6, kind="features")
    closed = forecast(k, SGD(0.8, momentum=0.6, weight_decay=0.02), 100)
    steps = forecast(k, SGD(0.8, momentum=0.6, weight_decay=0.02), 100, execution="primal")
    assert closed.method["execution"] == "spectral"
    np.testing.assert_allclose(closed.loss, steps.loss, rtol=1e-9)
    np.testing.assert_array_equal(closed.accuracy, steps.accuracy)


def test_auto_execution_picks_primal_for_small_projections():
    k = make_kernel(n=60, c=4, p=6, seed=7, kind="features")
    assert forecast(k, SGD(0.5), 5, loss="ce").method["execution"] == "primal"
    assert forecast(k, SGD(0.5), 5, batch_size=8).method["execution"] == "primal"
    exact = make_kernel(seed=7)
    assert forecast(exact, SGD(0.5), 5, loss="ce").method["execution"] == "dual"


def test_accuracy_stride_interpolates_between_evaluations():
    k = make_kernel(seed=8)
    every = forecast(k, SGD(1.0), 40)
    strided = forecast(k, SGD(1.0), 40, accuracy_every=10)
    assert strided.method["accuracy_every"] == 10
    for t in (0, 10, 20, 30, 40):  # the evaluated steps
        assert strided.accuracy[t] == every.accuracy[t]
    # in between: linear between evaluations (steps 0..10 climb from 0.25 to 0.4), not the
    # per-step accuracy
    evaluated = np.arange(0, 41, 10)
    want = np.interp(np.arange(41), evaluated, every.accuracy[evaluated])
    np.testing.assert_allclose(strided.accuracy, want, rtol=0, atol=1e-12)
    assert not np.array_equal(strided.accuracy, every.accuracy)
    np.testing.assert_allclose(strided.loss, every.loss)


# ---- Forecast object --------------------------------------------------------------------


def test_forecast_summary_methods_and_json():
    k = make_kernel(seed=9)
    fc = forecast(k, SGD(2.0), 100, batch_size=5, paths=4, seed=3)
    assert isinstance(fc, Forecast)
    assert fc.loss.shape == fc.accuracy.shape == (101,)
    assert fc.loss_paths.shape == (4, 101) and fc.loss_band[0].shape == (101,)
    assert (fc.loss_band[0] <= fc.loss_band[1]).all()
    np.testing.assert_allclose(fc.epochs[[0, 4, 100]], [0.0, 1.0, 25.0])
    target = 0.5 * (fc.loss[0] + np.nanmin(fc.loss))
    t = fc.steps_to(target)
    assert fc.loss[t] <= target and (fc.loss[:t] > target).all()
    assert fc.steps_to(-1.0) is None
    assert fc.steps_to(fc.loss[0]) == 0
    d = json.loads(json.dumps(fc.to_dict()))
    assert d["hyperparameters"]["batch_size"] == 5 and d["hyperparameters"]["paths"] == 4
    assert d["method"]["noise"] == "simulate" and len(d["loss_band"]["low"]) == 101
    assert d["diverges"] is False
    with pytest.raises(TangentlabError, match="steps_to: target_loss must be a finite"):
        fc.steps_to(float("nan"))
    with pytest.raises(TangentlabError, match="steps_to_plateau: rel_eps"):
        fc.steps_to_plateau(0.0)


def test_full_batch_is_deterministic_and_batch_ge_n_is_full_batch():
    k = make_kernel(seed=10)
    a = forecast(k, SGD(1.0), 30)
    b = forecast(k, SGD(1.0), 30, batch_size=20, paths=5, seed=99)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.loss_band is None and b.loss_paths is None and b.hyperparameters["paths"] == 1
    assert forecast(k, SGD(1.0), 0).loss.shape == (1,)


def test_seed_controls_minibatch_paths():
    k = make_kernel(seed=11)
    a = forecast(k, SGD(1.0), 30, batch_size=4, paths=2, seed=1)
    b = forecast(k, SGD(1.0), 30, batch_size=4, paths=5, seed=1)
    c = forecast(k, SGD(1.0), 30, batch_size=4, paths=2, seed=2)
    np.testing.assert_array_equal(a.loss_paths, b.loss_paths[:2])
    assert not np.array_equal(a.loss_paths, c.loss_paths)


def test_decay_to_is_reported():
    k = make_kernel(seed=12)
    fc = forecast(k, SGD(1.0, weight_decay=0.1), 10)
    assert fc.method["decay_to"] == "zero" and "toward 0" in fc.method["decay_note"]
    assert forecast(k, SGD(1.0, weight_decay=0.1, decay_to="w0"), 10).method["decay_to"] == "w0"


# ---- sweep ------------------------------------------------------------------------------


def test_sweep_ranks_by_steps_to_target_and_decomposes_once(monkeypatch):
    k = make_kernel(n=30, seed=13)
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lr_c = critical_lr(k)
    assert len(calls) == 1
    opts = SGD.grid(lr=[0.05 * lr_c, 0.3 * lr_c, 0.45 * lr_c, 3.0 * lr_c], momentum=[0.0, 0.5])
    with pytest.warns(ValidityWarning, match="outside the validity region"):
        default = sweep(k, opts, 200)
    assert default.target_loss == pytest.approx(0.2 * default.forecasts[0].loss[0])  # 80% drop
    ref = forecast(k, SGD(0.45 * lr_c), 200)  # rank 10 < NC: the loss stops at L_inf
    target = ref.loss_limit + 0.5 * (ref.loss[0] - ref.loss_limit)
    with pytest.warns(ValidityWarning, match="outside the validity region"):
        result = sweep(k, opts, 1000, target_loss=target)
    df = result.table
    assert len(calls) == 1  # the cached decomposition served every closed form
    assert isinstance(result, Sweep) and isinstance(df, pd.DataFrame) and len(df) == 8
    assert list(df["rank"]) == list(range(1, 9)) and len(result.forecasts) == 8
    for (_, row), fc in zip(df.iterrows(), result.forecasts):
        want = fc.steps_to(target)
        assert (pd.isna(row["steps_to_target"]) and want is None) or row["steps_to_target"] == want
        ref = forecast(k, SGD(row["lr"], momentum=row["momentum"]), 1000)
        assert ref.steps_to(target) == want and ref.valid == row["valid"]
    # NOTE [sweep ranking]: valid rows first, each group by steps to target; divergence last
    valid = df["valid"].tolist()
    assert valid == sorted(valid, reverse=True) and 0 < sum(valid) < 8
    reached = df[df["valid"]]["steps_to_target"].dropna().tolist()
    assert reached == sorted(reached) and len(reached) >= 2
    diverged = df[df["diverges"]]
    assert len(diverged) >= 1 and diverged.index.min() > df[~df["diverges"]].index.max()
    assert diverged["final_loss"].isna().all()  # never the values before the blow-up
    assert (diverged["note"] == "diverges").all()


def test_sweep_flags_a_loss_that_climbs_back():
    k = make_kernel(n=30, seed=13)
    lr_c = critical_lr(k)
    # heavy-ball momentum overshoots: the loss is not monotone at large momentum (at step 8
    # it is back up by ~0.6 of the drop to its minimum at step 4); plain GD is monotone
    lr = 0.9 * lr_c * 0.1
    result = sweep(k, [SGD(lr, momentum=0.95), SGD(lr)], 8, target_loss=0.0)
    assert len(result.forecasts) == len(result.table) == 2
    flagged = {}
    for (_, row), fc in zip(result.table.iterrows(), result.forecasts):
        assert row["momentum"] == fc.hyperparameters["momentum"]
        climbs = fc.loss[-1] - np.nanmin(fc.loss) > 0.1 * (fc.loss[0] - np.nanmin(fc.loss))
        assert climbs == ("above its minimum" in row["note"])
        flagged[row["momentum"]] = climbs
    assert flagged == {0.95: True, 0.0: False}  # both branches of the check are exercised


def test_sweep_mixes_batch_sizes_with_explicit_target():
    k = make_kernel(seed=14)
    result = sweep(k, SGD.grid(lr=[0.5, 1.0]), 60, batch_sizes=[None, 5], target_loss=0.3,
                   paths=3)  # fmt: skip
    df = result.table
    assert set(df["batch_size"].dropna()) == {5} and df["batch_size"].isna().sum() == 2
    assert result.target_loss == 0.3 and result.target_note == "given"
    assert len(result.forecasts) == len(df) == 4
    for (_, row), fc_row in zip(df.iterrows(), result.forecasts):
        bs = None if pd.isna(row["batch_size"]) else int(row["batch_size"])
        fc = forecast(k, SGD(row["lr"]), 60, batch_size=bs, paths=3)
        np.testing.assert_allclose(fc_row.loss, fc.loss)
    assert result.to_dict()["rows"][0]["rank"] == 1


@pytest.mark.parametrize(
    ("optimizers", "kwargs", "match"),
    [
        ([], {}, "optimizers must be a non-empty list"),
        ([SGD(0.1)], {"batch_sizes": []}, "batch_sizes must be a non-empty list"),
        ([SGD(0.1)], {"learning_rate": 0.2}, "unknown options"),
        ([0.1], {}, r"optimizer must be a tangentlab optimizer .* tl.SGD\(0.1\)"),
        ([SGD(0.1)], {"batch_sizes": [0]}, "sweep: batch_size must be a positive integer"),
        ([SGD(0.1)], {"target_loss": "low"}, "sweep: target_loss must be a number"),
    ],
)
def test_sweep_errors(optimizers, kwargs, match):
    with pytest.raises(TangentlabError, match=match):
        sweep(make_kernel(), optimizers, 5, **kwargs)


# ---- input validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SGD(0.0), r"SGD: lr must be a finite number > 0, got 0.0"),
        (lambda: SGD(float("nan")), r"SGD: lr must be a finite number > 0, got nan"),
        (lambda: SGD(0.5, momentum=1.0), r"SGD: momentum must lie in \[0, 1\), got 1.0"),
        (lambda: SGD(0.5, momentum=-0.1), r"SGD: momentum must lie in \[0, 1\), got -0.1"),
        (lambda: SGD(0.5, weight_decay=-1e-3), r"SGD: weight_decay must be .* got -0.001"),
        (lambda: SGD(0.5, decay_to="one"), r"SGD: decay_to must be one of"),
        (lambda: MSE(0.0), r"MSE: target_scale must be .* > 0, got 0.0"),
        (lambda: SGD.grid(momentum=[0.1]), r"SGD.grid: give lists for lr"),
    ],
)
def test_training_objects_validate_on_construction(make, match):
    with pytest.raises(TangentlabError, match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(optimizer=0.5), r"forecast: optimizer must be a tangentlab optimizer .*SGD\(0.5\)"),
        (dict(steps=-1), r"forecast: steps must be an integer >= 0, got -1"),
        (dict(steps=2.5), r"forecast: steps must be an integer >= 0, got 2.5"),
        (dict(batch_size=0), r"forecast: batch_size must be a positive integer .* got 0"),
        (dict(loss="hinge"), r"forecast: loss must be tl.MSE\(target_scale=1.0\) or"),
        (dict(paths=0), r"forecast: paths must be an integer >= 1, got 0"),
        (dict(noise="ito"), r"forecast: noise must be one of"),
        (dict(sampling="stratified"), r"forecast: sampling must be one of"),
        (dict(time="continuous", batch_size=4), r"time='continuous' .* batch_size=4 < N=20"),
        (dict(time="continuous", momentum_mode="heavy_ball"), r"needs time='discrete'"),
        (dict(execution="primal"), r"execution='primal' needs kernel.features"),
        (dict(execution="spectral", loss="ce"), r"execution='spectral' is the closed form"),
        (dict(band=(0.9, 0.1)), r"forecast: band must be two quantiles"),
        (dict(accuracy_every=0), r"forecast: accuracy_every must be a positive integer"),
        (dict(seed=1.5), r"forecast: seed must be an integer"),
        (dict(stability="yes"), r"forecast: stability must be True or False"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    k = make_kernel()
    args = dict(optimizer=SGD(0.5), steps=10) | kwargs
    with pytest.raises(TangentlabError, match=match):
        forecast(k, args.pop("optimizer"), args.pop("steps"), **args)


def test_settings_are_checked_before_the_kernel_is_touched():
    """A bad option fails even when the kernel would fail too: options come first."""
    with pytest.raises(TangentlabError, match="forecast: steps must be"):
        forecast(np.eye(3), SGD(0.5), -1)


def test_default_target_and_stable_lr():
    import tangentlab as tl

    assert tl.default_target(2.0) == pytest.approx(0.4)
    assert tl.default_target(2.0, drop=0.5) == pytest.approx(1.0)
    with pytest.raises(TangentlabError, match="drop must be in"):
        tl.default_target(2.0, drop=1.0)
    k = make_kernel(n=30, seed=13)
    lr = tl.stable_lr(k, momentum=0.5)
    lam = float(k.eigh()[0].max())
    assert 0.995 <= lr / (0.5 * 30 / lam) <= 1.0  # η̃ λ_max / N = 1, rounded down
    assert forecast(k, SGD(lr, momentum=0.5), 5).valid


def test_weight_decay_without_jw0_names_the_fix():
    k = make_kernel(jw0=False)
    with pytest.raises(TangentlabError, match=r"weight_decay=0.1 .*kernel.jw0.*decay_to='w0'"):
        forecast(k, SGD(0.5, weight_decay=0.1), 10)
    assert forecast(k, SGD(0.5, weight_decay=0.1, decay_to="w0"), 10).method["decay_to"] == "w0"


def test_kernel_must_be_a_kernel():
    with pytest.raises(TangentlabError, match="forecast: kernel must be a tangentlab.Kernel"):
        forecast(np.eye(3), SGD(0.5), 10)


def test_validity_warning_outside_the_measured_region():
    """NOTE [validity region]: η̃ λ_max / N above 1 warns (and says so in ``method``),
    at or below 1 it does not; a diverging forecast has its own flag instead."""
    import warnings

    from tangentlab.errors import ValidityWarning

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(20 * 3, 8, generator=g, dtype=torch.double)
    k = Kernel(f0=torch.zeros(20, 3, dtype=torch.double),
               targets=torch.randint(0, 3, (20,), generator=g), features=phi)  # fmt: skip
    lam_max = float(k.eigh()[0][-1])
    lr = 20 / lam_max  # η λ_max / N = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidityWarning)
        fc = forecast(k, SGD(lr), 10)
    assert "validity" not in fc.method
    with pytest.warns(ValidityWarning, match=r"η̃·λ_max/N = 3 .*above 1"):
        fc = forecast(k, SGD(0.3 * lr, momentum=0.9), 10)
    assert not fc.diverges and "outside the measured validity region" in fc.method["validity"]

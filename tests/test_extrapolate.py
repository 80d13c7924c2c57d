"""Forecasting N samples from a kernel on n << N (DESIGN.md §4, spectral extrapolation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import split_settings
from tangentlab.errors import TangentlabError
from tangentlab.extrapolate import Spectrum, extrapolate
from tangentlab.forecast import forecast, sweep
from tangentlab.kernel import Kernel
from tangentlab.training import MSE, SGD


def make_kernel(n=20, c=3, p=10, seed=0, *, kind="theta"):
    rng = np.random.default_rng(seed)
    jac = torch.tensor(rng.standard_normal((n * c, p)) / math.sqrt(p))
    kw = {"theta": jac @ jac.T} if kind == "theta" else {"features": jac}
    kw["jw0"] = (jac @ torch.tensor(rng.standard_normal(p))).reshape(n, c)
    y = torch.tensor(rng.integers(0, c, n))
    return Kernel(f0=torch.tensor(rng.standard_normal((n, c)) * 0.3), targets=y, **kw)


def linear_data(num, dim=40, classes=2, seed=0):
    """i.i.d. Gaussian inputs with covariance diag(k^-1.5) and a linear model with C outputs:
    the kernel operator is Σ ⊗ I_C, known in closed form."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim)) * np.arange(1, dim + 1) ** -0.75
    w = rng.standard_normal((dim, classes))
    f0 = x @ w + 0.3 * rng.standard_normal((num, classes))
    y = rng.integers(0, classes, num)
    return x, f0, y


def linear_kernel(x, f0, y):
    feats = np.kron(x, np.eye(f0.shape[1]))  # row (i, a) = x_i in output block a
    return Kernel(f0=torch.tensor(f0), targets=torch.tensor(y), features=torch.tensor(feats))


def powerlaw_kernel(m=300, alpha=1.3, beta=1.6, seed=0):
    """Θ = U diag(m j^-α) U^T with residual energies p_j = j^-β exactly (C = 1, s = 1)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    j = np.arange(1, m + 1.0)
    theta = (u * (m * j**-alpha)) @ u.T
    coef = math.sqrt(m) * j ** (-beta / 2) * rng.choice([-1.0, 1.0], m)
    f0 = 1.0 + u @ coef  # r_0 = f0 - 1·onehot(0) = U coef
    return Kernel(
        f0=torch.tensor(f0[:, None]),
        targets=torch.zeros(m, dtype=torch.long),
        theta=torch.tensor(theta),
    )


# ---- N = n reproduces the plain forecast ----------------------------------------------


@pytest.mark.parametrize("kind", ["theta", "features"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.5, "momentum_mode": "effective"},
        {"time": "continuous"},
        {"weight_decay": 0.05},
        {"weight_decay": 0.05, "decay_to": "w0"},
        {"target_scale": 2.0},
    ],
)
def test_dataset_size_n_reproduces_plain_forecast_exactly(kind, opts):
    k = make_kernel(kind=kind)
    opt, opts = split_settings(0.5, opts)
    plain = forecast(k, opt, 60, **opts)
    same = forecast(k, opt, 60, dataset_size=k.num_samples, **opts)
    np.testing.assert_array_equal(same.loss, plain.loss)
    np.testing.assert_array_equal(same.accuracy, plain.accuracy)
    assert same.loss_limit == plain.loss_limit and same.stability == plain.stability
    big = forecast(k, opt, 60, dataset_size=10 * k.num_samples, **opts)
    np.testing.assert_array_equal(big.loss, plain.loss)  # rates η̃ λ_j/n do not depend on N
    assert big.hyperparameters["num_samples"] == 200
    assert big.hyperparameters["subsample_size"] == 20
    assert big.method["extrapolation"]["tail"] == "none"


def test_spectrum_energies_give_initial_loss():
    k = make_kernel(kind="features")  # k = 10 < NC = 60: a residual outside span(U)
    spec = extrapolate(k, 100)
    for s in (1.0, 3.0):
        assert spec.initial_loss(s) == pytest.approx(
            forecast(k, SGD(0.1), 0, loss=MSE(s)).loss[0], rel=1e-12
        )


# ---- convergence to the full-data forecast --------------------------------------------


def test_subsample_forecast_converges_to_full_data_forecast():
    """Full N = 6000 closed form vs extrapolations from n random samples (3 draws each):
    max_t |L̂_t - L_t| / L_0 shrinks with n (measured 0.15, 0.038, 0.012)."""
    big_n = 6000
    x, f0, y = linear_data(big_n)
    full = linear_kernel(x, f0, y)
    lam_max = float(full.eigh()[0].max())
    lr = big_n / lam_max  # η̃ μ_max = 1 on the full data
    ref = forecast(full, SGD(lr), 1500)
    err = {}
    for n in (100, 400, 1600):
        e = []
        for draw in range(3):
            idx = np.random.default_rng(100 + draw).choice(big_n, n, replace=False)
            fc = forecast(linear_kernel(x[idx], f0[idx], y[idx]), SGD(lr), 1500, dataset_size=big_n)
            assert fc.hyperparameters["num_samples"] == big_n
            e.append(np.max(np.abs(fc.loss - ref.loss)) / ref.loss[0])
        err[n] = float(np.mean(e))
    assert err[1600] < err[400] < err[100]
    assert err[100] < 0.25 and err[400] < 0.08 and err[1600] < 0.03, err


# ---- power-law tail --------------------------------------------------------------------


def test_powerlaw_tail_recovers_exponents_and_conserves_energy():
    k = powerlaw_kernel(alpha=1.3, beta=1.6)
    spec = extrapolate(k, 3000, tail="powerlaw")
    assert isinstance(spec, Spectrum)
    assert spec.alpha == pytest.approx(1.3, abs=1e-9)  # exact power law: exact fit
    assert spec.beta == pytest.approx(1.6, abs=0.05)  # from binned mean energies
    assert spec.num_modes == 3000  # N·C modes, C = 1
    assert spec.tail_weight.sum() == pytest.approx(1.0)
    assert spec.tail_mu.size <= 1000 and spec.tail_start == 150
    lr = 1.0 / float(spec.mu[0])
    none = forecast(k, SGD(lr), 3000, dataset_size=3000)
    tail = forecast(spec, SGD(lr), 3000)
    assert tail.loss[0] == pytest.approx(none.loss[0], rel=1e-12)  # redistributed, not added
    # the extension moves energy to slower modes: the loss decays more slowly
    assert np.all(tail.loss[1000:] >= none.loss[1000:])
    assert tail.method["extrapolation"]["alpha"] == spec.alpha
    np.testing.assert_array_equal(tail.accuracy, none.accuracy)  # accuracy: the n points


@pytest.mark.parametrize(
    "opts",
    [{}, {"momentum": 0.9}, {"weight_decay": 0.002, "decay_to": "w0"}, {"time": "continuous"}],
)
def test_powerlaw_tail_on_its_own_size_matches_the_exact_spectrum(opts):
    """N = n: the fitted tail replaces the observed modes 150..300 by the same power law
    (binned), so the curve matches the exact closed form to binning accuracy."""
    k = powerlaw_kernel(m=300, alpha=1.3, beta=1.3, seed=1)
    spec = extrapolate(k, 300, tail="powerlaw", tail_bins=1000)
    lr = 1.0 / float(spec.mu[0])
    opt, opts = split_settings(0.5 * lr, opts)
    exact = forecast(k, opt, 5000, **opts)
    tail = forecast(spec, opt, 5000, **opts)
    # energies of single modes are random signs only; the redistribution smooths them
    assert np.max(np.abs(tail.loss - exact.loss)) / exact.loss[0] < 2e-3


def test_powerlaw_tail_divergence_and_weight_decay():
    k = powerlaw_kernel()
    spec = extrapolate(k, 1000, tail="powerlaw")
    lr_c = 2.0 / float(spec.mu[0])
    bad = forecast(spec, SGD(1.05 * lr_c), 100)
    assert bad.diverges and bad.stability >= 2.0
    assert bad.divergence_step is not None and np.isnan(bad.loss[bad.divergence_step :]).all()
    assert math.isnan(bad.loss_limit)
    ok = forecast(spec, SGD(0.5 * lr_c, weight_decay=0.01, decay_to="w0"), 2000)
    assert not ok.diverges and np.isfinite(ok.loss).all()
    assert ok.loss_limit == pytest.approx(ok.loss[-1], rel=1e-3)


def test_sweep_with_dataset_size():
    k = make_kernel()
    result = sweep(k, SGD.grid(lr=[0.1, 0.5], momentum=[0.0, 0.9]), 50, dataset_size=500)
    assert len(result.table) == len(result.forecasts) == 4
    for fc in result.forecasts:
        assert fc.hyperparameters["num_samples"] == 500
    spec = extrapolate(k, 500, tail="powerlaw", fit_range=(0.2, 0.6))
    result = sweep(spec, SGD.grid(lr=[0.1, 0.5]), 50)
    assert len(result.forecasts) == 2
    assert all(fc.method["extrapolation"]["tail"] == "powerlaw" for fc in result.forecasts)


# ---- errors ----------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    k = make_kernel()
    with pytest.raises(TangentlabError, match="smaller than the kernel's 20 samples"):
        forecast(k, SGD(0.1), 10, dataset_size=10)
    with pytest.raises(TangentlabError, match="dataset_size must be an integer"):
        forecast(k, SGD(0.1), 10, dataset_size=100.5)
    with pytest.raises(TangentlabError, match="dataset_size must be an integer"):
        extrapolate(k, True)
    with pytest.raises(TangentlabError, match="tail must be one of"):
        extrapolate(k, 100, tail="exponential")
    with pytest.raises(TangentlabError, match="fit_range"):
        extrapolate(k, 100, tail="powerlaw", fit_range=(0.5, 0.1))
    with pytest.raises(TangentlabError, match="full-batch training only"):
        forecast(k, SGD(0.1), 10, batch_size=8, dataset_size=100)
    with pytest.raises(TangentlabError, match="full-batch training only"):
        forecast(k, SGD(0.1), 10, batch_size=50, dataset_size=100)  # B >= n but < N
    with pytest.raises(TangentlabError, match="MSE loss only"):
        forecast(k, SGD(0.1), 10, loss="ce", dataset_size=100)
    with pytest.raises(TangentlabError, match="differs from the spectrum"):
        forecast(extrapolate(k, 100), SGD(0.1), 10, dataset_size=200)
    with pytest.raises(TangentlabError, match="at least 3 observed modes"):
        extrapolate(make_kernel(n=2, c=1, p=2), 100, tail="powerlaw")
    with pytest.raises(TangentlabError, match="tangentlab.Kernel"):
        extrapolate("kernel.safetensors", 100)


# ---- command line ----------------------------------------------------------------------


def test_cli_subsample_forecast_and_sweep(tmp_path):
    import json

    from click.testing import CliRunner

    from tangentlab.cli import main

    src = ["--example", "digits-cnn", "--samples", "40", "--subsample", "20", "--no-progress"]
    out = tmp_path / "f"
    res = CliRunner().invoke(main, ["forecast", *src, "--steps", "10", "--out", str(out)])
    assert res.exit_code == 0, res.output
    js = json.loads((out / "forecast.json").read_text())
    assert js["kernel"]["num_samples"] == 20
    assert js["info"]["dataset_size"] == 40 and js["info"]["subsample"] == 20
    assert js["forecasts"][0]["hyperparameters"]["num_samples"] == 40
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            *src,
            "--steps",
            "10",
            "--lr",
            "0.1,0.3",
            "--cache",
            str(out / "kernel"),
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "reusing cached kernel" in res.output  # same seeded subset: same fingerprint
    for bad, says in (
        (["--batch-size", "8"], "full-batch MSE only"),
        (["--subsample", "0"], "positive integer"),
    ):
        res = CliRunner().invoke(main, ["forecast", *src, *bad, "--out", str(tmp_path / "b")])
        assert res.exit_code == 2 and says in res.output, res.output
    res = CliRunner().invoke(
        main,
        [
            "forecast",
            *src[:2],
            "--samples",
            "10",
            "--subsample",
            "20",
            "--no-progress",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 2 and "exceeds the 10 samples" in res.output, res.output

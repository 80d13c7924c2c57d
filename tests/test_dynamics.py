"""Forecast numerics against explicit weight-space training of the linear model (float64).

The reference is always the tangent model itself, f(w) = f0 + J (w - w0) with random J
[N*C, P], trained by an actual ``torch.optim.SGD`` on the weights with the DESIGN §2 losses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tangentlab import dynamics as dyn
from tangentlab.forecast import forecast
from tangentlab.kernel import Kernel
from tangentlab.training import MSE, SGD


def make_linear(n=12, c=3, p=8, seed=0, f0_scale=0.5):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((n * c, p)) / math.sqrt(p)  # [N*C, P]
    w0 = rng.standard_normal(p)
    f0 = rng.standard_normal((n, c)) * f0_scale
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)  # every class present
    return jac, w0, f0, y


def make_kernel(jac, w0, f0, y, *, kind="theta"):
    n, c = f0.shape
    jt = torch.tensor(jac)
    kw = {"theta": jt @ jt.T} if kind == "theta" else {"features": jt}
    return Kernel(
        f0=torch.tensor(f0),
        targets=torch.tensor(y),
        jw0=(jt @ torch.tensor(w0)).reshape(n, c),
        **kw,
    )


def torch_sgd(
    jac,
    w0,
    f0,
    y,
    *,
    loss,
    lr,
    steps,
    momentum=0.0,
    weight_decay=0.0,
    scale=1.0,
    batches=None,
    decay_to="zero",
):
    """Explicit torch.optim.SGD on the weights of f(w) = f0 + J (w - w0); full-set curves."""
    n, c = f0.shape
    jt, f0t, yt = torch.tensor(jac), torch.tensor(f0), torch.tensor(y)
    w0t = torch.tensor(w0)
    # decay toward w0 = plain torch weight decay on u = w - w0
    param = torch.zeros_like(w0t) if decay_to == "w0" else w0t.clone()
    param.requires_grad_(True)
    opt = torch.optim.SGD([param], lr=lr, momentum=momentum, weight_decay=weight_decay)
    target = F.one_hot(yt, c).double() * scale

    def outputs():
        u = param if decay_to == "w0" else param - w0t
        return f0t + (jt @ u).reshape(n, c)

    def loss_of(f, idx):
        if loss == "mse":
            return 0.5 * ((f[idx] - target[idx]) ** 2).sum(dim=1).mean()
        return F.cross_entropy(f[idx], yt[idx])

    full = torch.arange(n)
    losses, accs = [], []
    for t in range(steps + 1):
        with torch.no_grad():
            f = outputs()
            losses.append(float(loss_of(f, full)))
            accs.append(float((f.argmax(1) == yt).double().mean()))
        if t == steps:
            break
        opt.zero_grad()
        idx = full if batches is None else torch.as_tensor(batches[t])
        loss_of(outputs(), idx).backward()
        opt.step()
    return np.array(losses), np.array(accs)


# ---- full batch, MSE closed form -------------------------------------------------------


@pytest.mark.parametrize("kind", ["theta", "features"])
def test_mse_closed_form_equals_weight_space_gd(kind):
    jac, w0, f0, y = make_linear()
    k = make_kernel(jac, w0, f0, y, kind=kind)  # features: k = P = 8 < N*C = 36 (projected)
    fc = forecast(k, SGD(0.7), 80, loss=MSE(2.0))
    ref_loss, ref_acc = torch_sgd(jac, w0, f0, y, loss="mse", lr=0.7, steps=80, scale=2.0)
    assert fc.method["execution"] == "spectral"
    np.testing.assert_allclose(fc.loss, ref_loss, rtol=1e-9)
    np.testing.assert_array_equal(fc.accuracy, ref_acc)
    assert fc.loss[-1] < fc.loss[0] - 0.1  # it actually trains
    assert fc.loss_band is None and not fc.diverges


@pytest.mark.parametrize("kind", ["theta", "features"])
@pytest.mark.parametrize("decay_to", ["zero", "w0"])
def test_heavy_ball_and_weight_decay_equal_torch_sgd(kind, decay_to):
    jac, w0, f0, y = make_linear(seed=1)
    k = make_kernel(jac, w0, f0, y, kind=kind)
    fc = forecast(k, SGD(0.3, momentum=0.9, weight_decay=0.05, decay_to=decay_to), 60)
    ref_loss, ref_acc = torch_sgd(
        jac,
        w0,
        f0,
        y,
        loss="mse",
        lr=0.3,
        steps=60,
        momentum=0.9,
        weight_decay=0.05,
        decay_to=decay_to,
    )
    assert fc.method["momentum_mode"] == "heavy_ball"
    np.testing.assert_allclose(fc.loss, ref_loss, rtol=1e-9)
    np.testing.assert_array_equal(fc.accuracy, ref_acc)
    # the two decay targets give different curves: the J w0 term matters
    other = forecast(
        k,
        SGD(0.3, momentum=0.9, weight_decay=0.05, decay_to="w0" if decay_to == "zero" else "zero"),
        60,
    )
    assert np.abs(other.loss - fc.loss).max() > 1e-3


def test_mse_exact_limit_matches_long_run():
    jac, w0, f0, y = make_linear(seed=2)
    k = make_kernel(jac, w0, f0, y, kind="features")
    fc = forecast(k, SGD(0.5, momentum=0.5, weight_decay=0.02), 3000)
    assert fc.method["loss_limit"] == "exact (closed form)"
    assert fc.loss_limit == pytest.approx(fc.loss[-1], rel=1e-9)
    t = fc.steps_to_plateau(0.01)
    gap = abs(fc.loss[0] - fc.loss_limit)
    assert abs(fc.loss[t] - fc.loss_limit) < 0.01 * gap <= abs(fc.loss[t - 1] - fc.loss_limit)


def test_effective_momentum_is_plain_gd_at_lr_over_one_minus_m():
    jac, w0, f0, y = make_linear(seed=3)
    k = make_kernel(jac, w0, f0, y)
    fc = forecast(k, SGD(0.1, momentum=0.8), 50, momentum_mode="effective")
    ref_loss, _ = torch_sgd(jac, w0, f0, y, loss="mse", lr=0.5, steps=50)
    np.testing.assert_allclose(fc.loss, ref_loss, rtol=1e-9)


def test_mse_flow_agrees_with_discrete_at_small_lr():
    jac, w0, f0, y = make_linear(seed=4)
    k = make_kernel(jac, w0, f0, y)
    lam_max = float(k.eigh()[0][-1])
    lr = 0.01 * k.num_samples / lam_max  # η λ_max / N = 0.01
    disc = forecast(k, SGD(lr, weight_decay=0.01), 300)
    flow = forecast(k, SGD(lr, weight_decay=0.01), 300, time="continuous")
    assert flow.method["solver"].startswith("closed form (flow)")
    # per mode (1-x)^t vs exp(-xt) differ by ~x^2 t/2 <= 1.5e-2 relative
    np.testing.assert_allclose(flow.loss, disc.loss, rtol=1e-2)
    assert np.abs(flow.loss - disc.loss).max() > 0  # not the same code path
    # at a large step the two differ visibly
    big = forecast(k, SGD(150 * lr), 30)
    big_flow = forecast(k, SGD(150 * lr), 30, time="continuous")
    assert np.abs(big.loss - big_flow.loss).max() > 1e-2 * big.loss[0]


# ---- full batch, cross-entropy ----------------------------------------------------------


@pytest.mark.parametrize("execution", ["dual", "primal"])
def test_ce_discrete_steps_equal_weight_space_sgd(execution):
    jac, w0, f0, y = make_linear(seed=5)
    k = make_kernel(jac, w0, f0, y, kind="features")
    fc = forecast(k, SGD(2.0, momentum=0.5, weight_decay=0.01), 60, loss="ce", execution=execution)
    ref_loss, ref_acc = torch_sgd(
        jac, w0, f0, y, loss="ce", lr=2.0, steps=60, momentum=0.5, weight_decay=0.01
    )
    assert fc.method["execution"] == execution
    np.testing.assert_allclose(fc.loss, ref_loss, rtol=1e-9)
    np.testing.assert_array_equal(fc.accuracy, ref_acc)


@pytest.mark.parametrize("ode_method", ["RK45", "LSODA"])
def test_ce_flow_agrees_with_small_lr_steps(ode_method):
    jac, w0, f0, y = make_linear(seed=6)
    k = make_kernel(jac, w0, f0, y)
    flow = forecast(k, SGD(0.05), 200, loss="ce", time="continuous", ode_method=ode_method)
    disc = forecast(k, SGD(0.05), 200, loss="ce")
    assert flow.method["solver"] == f"gradient flow ({ode_method})"
    np.testing.assert_allclose(flow.loss, disc.loss, rtol=2e-3)
    assert flow.loss[-1] < 0.9 * flow.loss[0]


# ---- minibatch --------------------------------------------------------------------------


def test_batch_schedule_epoch_and_replacement():
    rng = np.random.default_rng(0)
    batches = dyn.batch_schedule(10, 4, 9, sampling="epoch", rng=rng)
    assert [len(b) for b in batches] == [4, 4, 2] * 3  # last batch of an epoch is smaller
    for e in range(3):
        assert sorted(np.concatenate(batches[3 * e : 3 * e + 3])) == list(range(10))
    iid = dyn.batch_schedule(10, 4, 500, sampling="replacement", rng=rng)
    assert all(len(b) == 4 for b in iid)
    assert any(len(set(b.tolist())) < 4 for b in iid)  # duplicates occur: i.i.d. draws


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("sampling", ["epoch", "replacement"])
def test_minibatch_simulation_equals_weight_space_sgd(loss, sampling):
    jac, w0, f0, y = make_linear(n=13, seed=7)
    k = make_kernel(jac, w0, f0, y)
    lr, steps, bs = 0.4, 40, 4  # 13 = 3*4 + 1: epoch sampling has a batch of one
    fc = forecast(
        k,
        SGD(lr, momentum=0.9, weight_decay=0.03),
        steps,
        batch_size=bs,
        loss=loss,
        paths=3,
        seed=11,
        sampling=sampling,
    )
    for p, rng in enumerate(dyn.path_rngs(11, 3)):
        batches = dyn.batch_schedule(13, bs, steps, sampling=sampling, rng=rng)
        ref_loss, ref_acc = torch_sgd(
            jac,
            w0,
            f0,
            y,
            loss=loss,
            lr=lr,
            steps=steps,
            momentum=0.9,
            weight_decay=0.03,
            batches=batches,
        )
        np.testing.assert_allclose(fc.loss_paths[p], ref_loss, rtol=1e-9)
        np.testing.assert_array_equal(fc.accuracy_paths[p], ref_acc)
    np.testing.assert_allclose(fc.loss, fc.loss_paths.mean(axis=0))
    assert np.ptp(fc.loss_paths[:, -1]) > 0  # paths differ


def explicit_sgd_runs(jac, w0, f0, y, *, lr, steps, batch_size, runs, sampling, seed):
    """``runs`` independent weight-space minibatch SGD runs (MSE), vectorized; [runs, T+1]."""
    rng = np.random.default_rng(seed)
    n, c = f0.shape
    j3 = jac.reshape(n, c, -1)
    sy = dyn.targets_matrix(y, c)
    u = np.zeros((runs, jac.shape[1]))  # w - w0

    def outputs(u):
        return f0[None] + (u @ jac.T).reshape(runs, n, c)

    out = np.empty((runs, steps + 1))
    out[:, 0] = dyn.loss_value(outputs(u), y, loss="mse")
    pos, perms = n, None
    for t in range(steps):
        if sampling == "replacement":
            idx = rng.integers(0, n, (runs, batch_size))
        else:
            if pos >= n:
                perms, pos = rng.permuted(np.tile(np.arange(n), (runs, 1)), axis=1), 0
            idx, pos = perms[:, pos : pos + batch_size], pos + batch_size
        fb = np.take_along_axis(outputs(u), idx[:, :, None], axis=1)
        u -= lr * np.einsum("rbc,rbcp->rp", fb - sy[idx], j3[idx]) / batch_size
        out[:, t + 1] = dyn.loss_value(outputs(u), y, loss="mse")
    return out


@pytest.mark.parametrize(
    ("noise", "sampling"),
    [("simulate", "epoch"), ("simulate", "replacement"), ("sde", "replacement")],
)
def test_stochastic_forecast_matches_many_explicit_runs(noise, sampling):
    """Mean curve within 4.5 standard errors at every step; 10%/90% band within 6%.

    The SDE matches the first two moments of each SGD step, hence the mean MSE, only for
    i.i.d. batches; with epoch sampling it is biased (next test), which is why 'simulate'
    is the default.
    """
    jac, w0, f0, y = make_linear(n=40, c=3, p=30, seed=8)
    k = make_kernel(jac, w0, f0, y)
    lr = 0.2 * 40 / np.linalg.eigvalsh(jac.T @ jac)[-1]
    steps, bs, runs, paths = 100, 4, 2000, 300
    ref = explicit_sgd_runs(
        jac, w0, f0, y, lr=lr, steps=steps, batch_size=bs, runs=runs, sampling=sampling, seed=1
    )
    fc = forecast(
        k, SGD(lr), steps, batch_size=bs, paths=paths, noise=noise, sampling=sampling, seed=2
    )
    se = np.sqrt(fc.loss_paths.var(axis=0, ddof=1) / paths + ref.var(axis=0, ddof=1) / runs)
    z = np.abs(fc.loss - ref.mean(axis=0))[1:] / se[1:]
    assert z.max() < 4.5, z.max()
    for q, edge in zip((0.1, 0.9), fc.loss_band):
        ref_q = np.quantile(ref, q, axis=0)[1:]
        assert np.max(np.abs(edge[1:] - ref_q) / ref_q) < 0.06
    assert fc.loss[-1] < fc.loss[0]


def test_sde_is_biased_for_epoch_sampling():
    """The measurement behind the default: with epoch sampling the SDE mean is off."""
    jac, w0, f0, y = make_linear(n=40, c=3, p=30, seed=8)
    k = make_kernel(jac, w0, f0, y)
    lr = 0.2 * 40 / np.linalg.eigvalsh(jac.T @ jac)[-1]
    ref = explicit_sgd_runs(
        jac, w0, f0, y, lr=lr, steps=100, batch_size=4, runs=2000, sampling="epoch", seed=1
    )
    sde = forecast(k, SGD(lr), 100, batch_size=4, paths=300, noise="sde", seed=2)
    se = np.sqrt(sde.loss_paths.var(axis=0, ddof=1) / 300 + ref.var(axis=0, ddof=1) / 2000)
    assert (np.abs(sde.loss - ref.mean(axis=0))[1:] / se[1:]).mean() > 5.0


# ---- building blocks --------------------------------------------------------------------


def test_losses_and_gradients_follow_design_definitions():
    rng = np.random.default_rng(9)
    f = rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 1, 2])
    ft, yt = torch.tensor(f, requires_grad=True), torch.tensor(y)
    mse = 0.5 * ((ft - 3.0 * F.one_hot(yt, 4)) ** 2).sum(1).mean()
    mse.backward()
    assert dyn.loss_value(f, y, loss="mse", scale=3.0) == pytest.approx(mse.item(), rel=1e-12)
    np.testing.assert_allclose(
        dyn.loss_grad(f, y, loss="mse", scale=3.0) / 5, ft.grad.numpy(), rtol=1e-12
    )
    ft.grad = None
    ce = F.cross_entropy(ft, yt)
    ce.backward()
    assert dyn.loss_value(f, y, loss="ce") == pytest.approx(ce.item(), rel=1e-12)
    np.testing.assert_allclose(
        dyn.loss_grad(f, y, loss="ce") / 5, ft.grad.numpy(), rtol=1e-10, atol=1e-15
    )


def test_top_eigenvalue_lanczos_and_weighted():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((120, 30))
    theta = a @ a.T
    op = dyn.DenseKernelOperator(theta, 3)
    assert dyn.top_eigenvalue(op, 120) == pytest.approx(np.linalg.eigvalsh(theta)[-1], rel=1e-8)
    w = dyn.softmax_hessian_sqrt(rng.standard_normal((40, 3)))
    wm = np.zeros((120, 120))
    for i in range(40):
        wm[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] = w[i]
    want = np.linalg.eigvalsh(wm @ theta @ wm)[-1]
    assert dyn.top_eigenvalue(op, 120, weight=w) == pytest.approx(want, rel=1e-8)
    prim = dyn.FeatureKernelOperator(a, 3)
    assert dyn.top_eigenvalue(prim, 120) == pytest.approx(np.linalg.eigvalsh(theta)[-1], rel=1e-8)

"""Kernel growth (tangentlab.growth): time-varying kernel scale, trace probes, forecast option."""

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from conftest import make_cnn, make_mlp, split_settings
from tangentlab import dynamics as dyn
from tangentlab import probes as pr
from tangentlab.experimental import growth as gr
from tangentlab.training import SGD


def _kernel(n=12, c=3, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n * c, rank or n * c))
    theta = a @ a.T / (rank or n * c)
    f0 = 0.1 * rng.standard_normal((n, c))
    y = rng.integers(0, c, n)
    return tl.Kernel(
        f0=torch.tensor(f0),
        targets=torch.tensor(y),
        theta=torch.tensor(theta),
        jw0=torch.tensor(0.05 * rng.standard_normal((n, c))),
    )


def _explicit(kernel, sched, *, lr, momentum=0.0, weight_decay=0.0, loss="mse", steps):
    """Step-by-step torch SGD of the linear model in function space with s(t) Θ."""
    theta = kernel.theta.numpy()
    f0 = kernel.f0.numpy()
    n, c = f0.shape
    y = kernel.targets.numpy()
    anchor = (f0 - kernel.jw0.numpy()).reshape(-1)
    f = f0.reshape(-1).copy()
    buf = np.zeros_like(f)
    out = [dyn.loss_value(f0, y, loss=loss)]
    for t in range(steps):
        d = dyn.loss_grad(f.reshape(n, c), y, loss=loss).reshape(-1)
        g = sched[t] * theta @ d / n + weight_decay * (f - anchor)
        buf = momentum * buf + g if momentum else g
        f = f - lr * buf
        out.append(dyn.loss_value(f.reshape(n, c), y, loss=loss))
    return np.asarray(out)


SCHED = gr.KernelGrowth(steps=[0, 10, 30], scale=[1.0, 1.6, 2.2])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_closed_form_with_growth_equals_explicit_simulation(momentum, weight_decay):
    k = _kernel()
    lam_max = float(k.eigh()[0][-1])
    lr = 0.3 * k.num_samples / lam_max * (1 - momentum)
    steps = 60
    fc = gr.forecast(k, SGD(lr, momentum=momentum, weight_decay=weight_decay), steps, growth=SCHED)
    assert fc.method["solver"].startswith("closed form")
    ref = _explicit(
        k, SCHED.schedule(steps), lr=lr, momentum=momentum, weight_decay=weight_decay, steps=steps
    )
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-9, atol=1e-12)
    # and it differs from the plain forecast: the kernel really grew
    plain = tl.forecast(k, SGD(lr, momentum=momentum, weight_decay=weight_decay), steps)
    assert fc.loss[-1] < plain.loss[-1]


def test_product_form_without_momentum():
    """MSE, no momentum: L_t = 1/2N Σ_j Π_τ (1 - η s(τ) λ_j/N)^2 (u_j^T r_0)^2."""
    k = _kernel(rank=7)  # a low-rank kernel: some residual never decays
    lam, u = (x.numpy() for x in k.eigh())
    n, c = k.num_samples, k.num_classes
    r0 = (k.f0.numpy() - dyn.targets_matrix(k.targets.numpy(), c)).reshape(-1)
    lr, steps = 0.5 * n / lam[-1], 40
    s = SCHED.schedule(steps)
    fac = np.cumprod(np.r_[np.ones((1, lam.size)), 1 - lr * s[:, None] * lam[None] / n], 0)
    z0 = u.T @ r0
    ref = 0.5 * ((fac * z0) ** 2).sum(1) / n
    ref += 0.5 * float(r0 @ r0 - z0 @ z0) / n  # the part outside span(U) stays
    fc = gr.forecast(k, SGD(lr), steps, growth=SCHED)
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-9)


@pytest.mark.parametrize("settings", [
    dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.5, weight_decay=0.01),
    dict(loss="ce"), dict(batch_size=4, paths=3), dict(batch_size=4, paths=2, loss="ce"),
    dict(time="continuous"),
])  # fmt: skip
def test_constant_one_reproduces_the_plain_forecast(settings):
    k = _kernel()
    lr = 0.2 * k.num_samples / float(k.eigh()[0][-1])
    opt, settings = split_settings(lr, settings)
    plain = tl.forecast(k, opt, 50, **settings)
    one = gr.forecast(k, opt, 50, growth=gr.KernelGrowth.constant(1.0), **settings)
    np.testing.assert_allclose(one.loss, plain.loss, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(one.accuracy, plain.accuracy, rtol=0, atol=1e-12)
    assert one.stability == pytest.approx(plain.stability)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_iterated_growth_equals_explicit(loss):
    k = _kernel()
    lr = 0.2 * k.num_samples / float(k.eigh()[0][-1])
    fc = gr.forecast(k, SGD(lr, momentum=0.5), 40, loss=loss, growth=SCHED, execution="dual")
    ref = _explicit(k, SCHED.schedule(40), lr=lr, momentum=0.5, loss=loss, steps=40)
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-9)


def test_constant_scale_equals_a_scaled_learning_rate():
    k = _kernel()
    lr = 0.1 * k.num_samples / float(k.eigh()[0][-1])
    a = gr.forecast(k, SGD(lr), 30, growth=gr.KernelGrowth.constant(1.7))
    b = tl.forecast(k, SGD(1.7 * lr), 30)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-10)
    assert a.stability == pytest.approx(b.stability)


def test_growth_forms_and_fit():
    t = np.array([10.0, 20, 40, 80])
    s = 1 + 1.5 * (1 - np.exp(-t / 25))
    sat = gr.fit_growth(t, s, form="saturating")
    assert sat.params["a"] == pytest.approx(1.5, rel=0.05)
    assert sat.params["tau"] == pytest.approx(25, rel=0.05)
    np.testing.assert_allclose(sat.schedule(81)[t.astype(int)], s, rtol=0.01)
    lin = gr.fit_growth(t, s)
    sch = lin.schedule(200)
    assert sch[0] == 1.0 and sch[40] == pytest.approx(s[2]) and sch[150] == pytest.approx(s[-1])
    d = np.linspace(0, 1, 101) ** 0.5
    disp = gr.fit_growth([25, 100], [1.25, 1.5], form="displacement", displacement=3 * d)
    assert disp.params["c"] == pytest.approx(0.5, rel=0.01)


def test_hutchinson_trace_converges_to_exact(mlp_data, cnn_data):
    for model, (x, y) in ((make_mlp(), mlp_data), (make_cnn(), cnn_data)):
        k = tl.compute_kernel(model, (x, y), progress=False)
        exact = float(torch.diagonal(k.theta).sum()) / x.shape[0]
        t = tl.Tangent(model)
        assert pr.kernel_trace(t, (x, y), probes=None, samples=None).trace[0] == pytest.approx(
            exact, rel=1e-10
        )
        errs = []
        for probes in (4, 256):
            p = pr.kernel_trace(t, (x, y), probes=probes, samples=None, seed=1)
            errs.append(abs(p.trace[0] - exact) / exact)
            assert abs(p.trace[0] - exact) < 5 * p.stderr[0] + 1e-12
        assert errs[-1] < 0.03


def test_trace_at_other_weights_matches_a_moved_model(cnn_data):
    x, y = cnn_data
    model = make_cnn()
    t = tl.Tangent(model)
    torch.manual_seed(3)
    w = pr.flat_weights(t) + 0.2 * torch.randn(t.num_params, dtype=torch.double)
    moved = make_cnn()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w, moved.parameters())
    k = tl.compute_kernel(moved, (x, y), progress=False)
    exact = float(torch.diagonal(k.theta).sum()) / x.shape[0]
    p = pr.kernel_trace(t, (x, y), [None, w, moved], probes=None, samples=None)
    assert p.trace[1] == pytest.approx(exact, rel=1e-10)
    assert p.trace[2] == pytest.approx(exact, rel=1e-10)
    assert p.ratio[0] == 1.0


def test_ghost_norms_cover_wide_convolutions_and_sequences():
    """Squared per-sample gradient norms by Gram products equal the materialized ones."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(16, 32, 1),
            nn.Tanh(),
            nn.Conv2d(32, 24, 3, padding=1),
            nn.Flatten(),
            nn.Linear(24 * 9, 3),
        )
        .double()
        .eval()
    )
    x = torch.randn(5, 16, 3, 3, dtype=torch.double)
    y = torch.randint(0, 3, (5,))
    k = tl.compute_kernel(model, (x, y), progress=False)
    exact = float(torch.diagonal(k.theta).sum()) / 5
    p = pr.kernel_trace(model, (x, y), probes=None, samples=None)
    assert p.trace[0] == pytest.approx(exact, rel=1e-10)


def test_displacement_coefficients_match_weight_space_sgd(mlp_data):
    """Δw(t) = J^T a_t equals explicit SGD of the linear model in weight space."""
    x, y = mlp_data
    model = make_mlp()
    t = tl.Tangent(model)
    k = tl.compute_kernel(t, (x, y), progress=False)
    jac = t.jacobian(x).reshape(-1, t.num_params).numpy()  # [NC, P]
    f0 = k.f0.numpy()
    n, c = f0.shape
    sy = dyn.targets_matrix(y.numpy(), c).reshape(-1)
    lr, m = 0.05, 0.9
    w = np.zeros(t.num_params)
    buf = np.zeros_like(w)
    for _ in range(7):
        r = f0.reshape(-1) + jac @ w - sy
        buf = m * buf + jac.T @ r / n
        w = w - lr * buf
    theta = k.theta.numpy()
    coefs, norms = dyn.displacement_coefficients(
        lambda v: theta @ v, f0, y.numpy(), lr=lr, momentum=m, steps=[7]
    )
    dw = pr.tangent_displacement(t, (x, y), coefs[7]).numpy()
    np.testing.assert_allclose(dw, w, rtol=1e-9, atol=1e-12)
    assert norms[7] == pytest.approx(np.linalg.norm(w), rel=1e-9)


def test_estimate_growth_runs_on_a_small_cnn(cnn_data):
    x, y = cnn_data
    model = make_cnn()
    k = tl.compute_kernel(model, (x, y), progress=False)
    lr = 0.5 * x.shape[0] / float(k.eigh()[0][-1])
    g = gr.estimate_growth(model, (x, y), k, SGD(lr), 40, probes=8, samples=None)
    assert g.steps[0] == 0 and g.scale[0] == 1.0 and len(g.steps) == 5
    assert np.all(np.isfinite(g.scale)) and g.info["seconds"] > 0
    fc = gr.forecast(k, SGD(lr), 40, growth=g)
    assert np.all(np.isfinite(fc.loss))
    g2 = gr.estimate_growth(
        model, (x, y), k, SGD(lr), 40, probes=8, samples=None, form="displacement", iterations=2
    )
    assert g2.form == "displacement" and "c" in g2.params


# ---- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_name_the_fix(mlp_data):
    k = _kernel()
    with pytest.raises(tl.TangentlabError, match="growth must be a KernelGrowth"):
        gr.forecast(k, SGD(0.1), 3, growth=[1.0, 2.0])
    with pytest.raises(tl.TangentlabError, match="noise='simulate'"):
        gr.forecast(k, SGD(0.1), 3, batch_size=4, noise="sde", growth=SCHED)
    with pytest.raises(tl.TangentlabError, match="time='discrete'"):
        gr.forecast(k, SGD(0.1), 3, loss="ce", time="continuous", growth=SCHED)
    with pytest.raises(tl.TangentlabError, match="subsample"):
        gr.forecast(k, SGD(0.1), 3, dataset_size=100, growth=SCHED)
    with pytest.raises(tl.TangentlabError, match="increasing"):
        gr.KernelGrowth(steps=[0, 5, 5], scale=[1, 2, 3])
    with pytest.raises(tl.TangentlabError, match="> 0"):
        gr.KernelGrowth(steps=[0, 5], scale=[1, -2])
    with pytest.raises(tl.TangentlabError, match="same non-zero length"):
        gr.KernelGrowth(steps=[0, 5], scale=[1])
    with pytest.raises(tl.TangentlabError, match="form must be one of"):
        gr.KernelGrowth(steps=[0], scale=[1], form="cubic")
    with pytest.raises(tl.TangentlabError, match="estimate_growth"):
        gr.fit_growth([1], [1.1], form="displacement")
    x, y = mlp_data
    model = make_mlp()
    with pytest.raises(tl.TangentlabError, match="probes must be an integer >= 1 or None"):
        pr.kernel_trace(model, (x, y), probes=0)
    with pytest.raises(tl.TangentlabError, match=r"flat \[P\]"):
        pr.kernel_trace(model, (x, y), [torch.zeros(3)])
    kk = tl.compute_kernel(model, (x, y), progress=False)
    with pytest.raises(tl.TangentlabError, match="probe_steps must lie in"):
        gr.estimate_growth(model, (x, y), kk, SGD(0.1), 10, probe_steps=[20])
    with pytest.raises(tl.TangentlabError, match="data the kernel was computed on"):
        gr.estimate_growth(model, (x[:3], y[:3]), kk, SGD(0.1), 10)


@pytest.mark.slow
def test_lite0_probe_ratio_tracks_the_exact_trace():
    """EfficientNet-Lite0 top (32 px): 4 probes on 32 samples estimate the growth ratio."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _split import cached_inputs
    from tangentlab.examples import load_example

    ex = load_example("fashion-lite0", num_samples=32, image_size=32)
    top, xt, _ = cached_inputs("fashion-lite0", ex.model, ex.data[0])
    t = tl.Tangent(top, params=ex.default_params)
    torch.manual_seed(0)
    w = pr.flat_weights(t)
    moved = w + 0.002 * torch.randn_like(w)
    exact = pr.kernel_trace(t, (xt, ex.data[1]), [None, moved], probes=None, samples=None)
    est = pr.kernel_trace(t, (xt, ex.data[1]), [None, moved], probes=4, samples=None)
    assert est.ratio[1] == pytest.approx(exact.ratio[1], rel=0.03)

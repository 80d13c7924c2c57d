"""AdamW approximations (issue 10, candidates 3 and 4): exactness on models linear in their
weights, and clear errors (NOTE [frozen factored preconditioner], NOTE [sign kernels])."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangentlab as tl
from tangentlab import dynamics as dyn
from tangentlab.adam_approx import factor_second_moment

N, D_IN, C = 12, 5, 3
# the exactness tests use rates far outside the tangent regime on purpose
pytestmark = pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")


def _linear(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(D_IN, C).double().eval()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    y = torch.arange(N) % C
    return model, (x, y)


def _batches(b: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    return dyn.batch_schedule(N, b, steps, sampling="epoch", rng=dyn.path_rngs(seed, 1)[0])


def _full_loss(w, b, x, y) -> float:
    return float(F.cross_entropy(x @ w.T + b, y))


def _schedule():
    return tl.make_schedule("warmup-linear", 20, warmup_fraction=0.1)


# ---- candidate 3: frozen (factored) preconditioner -----------------------------------------


def test_factor_second_moment_rank_one_and_sums():
    r, c = torch.rand(4, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    v = torch.outer(r, c)
    assert torch.allclose(factor_second_moment(v), v, rtol=1e-12)
    u = torch.rand(4, 3, 2, dtype=torch.float64)  # conv-like: [out, in, k] -> [4, 6]
    f = factor_second_moment(u)
    assert f.shape == u.shape
    assert torch.allclose(f.reshape(4, -1).sum(1), u.reshape(4, -1).sum(1))
    assert torch.allclose(f.reshape(4, -1).sum(0), u.reshape(4, -1).sum(0))
    vec = torch.rand(5, dtype=torch.float64)
    assert torch.equal(factor_second_moment(vec), vec)


def test_estimate_preconditioner_is_adams_early_v():
    model, (x, y) = _linear()
    opt = tl.AdamW(0.05, betas=(0.9, 0.99))
    pc = tl.estimate_preconditioner(model, (x, y), opt, loss="ce", batch_size=4, warm_steps=5,
                                    factored=False)  # fmt: skip
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for idx in _batches(4, 5):
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        for n, p in model.named_parameters():
            v[n] = 0.99 * v[n] + 0.01 * p.grad**2
    for n in v:
        assert torch.allclose(pc.second_moment[n], v[n] / (1 - 0.99**5), rtol=1e-10)
    fac = tl.estimate_preconditioner(model, (x, y), opt, loss="ce", batch_size=4, warm_steps=5)
    assert torch.allclose(fac.second_moment["weight"],
                          factor_second_moment(pc.second_moment["weight"]))  # fmt: skip
    assert torch.equal(fac.second_moment["bias"], pc.second_moment["bias"])
    assert fac.metadata["warm_steps"] == 5


def test_factored_kernel_is_j_p_jt_with_jw0():
    model, data = _linear()
    opt = tl.AdamW(0.05)
    kp = tl.compute_factored_kernel(model, data, opt, loss="ce", batch_size=4, progress=False)
    wst = tl.compute_weight_space_tangent(model, data, progress=False)
    pc = tl.estimate_preconditioner(model, data, opt, loss="ce", batch_size=4)
    p = torch.cat([pc.precondition()[n].reshape(-1) for n in wst.names])
    jac = wst.jacobian.reshape(N * C, -1)
    assert torch.allclose(kp.gram().double(), (jac * p) @ jac.T, rtol=1e-9)
    assert torch.allclose(kp.jw0.double(), wst.jw0, rtol=1e-9, atol=1e-12)
    assert torch.allclose(kp.f0.double(), wst.f0)
    assert "factored" in kp.metadata["preconditioner"]


@pytest.mark.parametrize("factored", [True, False])
def test_frozen_adam_forecast_equals_torch_loop(factored):
    """Adam with the frozen P (weight_decay 0) on a linear model == forecast of adam_as_sgd."""
    model, (x, y) = _linear()
    steps, bsz, b1 = 20, 4, 0.9
    opt = tl.AdamW(0.05, betas=(b1, 0.999), weight_decay=0.0, schedule=_schedule())
    pc = tl.estimate_preconditioner(model, (x, y), opt, loss="ce", batch_size=bsz,
                                    factored=factored)  # fmt: skip
    kp = tl.compute_factored_kernel(model, (x, y), opt, preconditioner=pc, progress=False)
    fc = tl.forecast(kp, tl.adam_as_sgd(opt), steps, loss="ce", batch_size=bsz, paths=1)
    p = pc.precondition()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    mult = opt.schedule.multipliers(steps)
    losses = [_full_loss(w, b, x, y)]
    for t, idx in enumerate(_batches(bsz, steps)):
        wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(x[idx] @ wv.T + bv, y[idx]), (wv, bv))
        mw, mb = b1 * mw + (1 - b1) * gw, b1 * mb + (1 - b1) * gb
        rate = opt.lr * mult[t] / (1 - b1 ** (t + 1))
        w, b = w - rate * p["weight"] * mw, b - rate * p["bias"] * mb
        losses.append(_full_loss(w, b, x, y))
    np.testing.assert_allclose(fc.loss, losses, rtol=1e-9)
    # the stability number uses the stationary rate η·m(t): the bias correction's (1 - β1)
    # undoes the buffer's gain 1/(1 - β1) (Schedule.includes_momentum_gain)
    lam = float(torch.as_tensor(kp.eigh()[0]).max())
    peak = opt.lr * opt.schedule.peak(steps)
    mse = tl.forecast(kp, tl.adam_as_sgd(opt), steps)
    assert mse.stability == pytest.approx(peak * lam / kp.num_samples, rel=1e-6)


def test_frozen_adam_decay_through_first_moment_equals_torch_loop():
    """With weight decay: B = β1 B + P g + λ w, w -= η_t (1-β1)/(1-β1^k) B (the NOTE)."""
    model, (x, y) = _linear(1)
    steps, bsz, b1, lam = 15, 6, 0.8, 0.5
    opt = tl.AdamW(0.05, betas=(b1, 0.999), weight_decay=lam)
    pc = tl.estimate_preconditioner(model, (x, y), opt, loss="ce", batch_size=bsz)
    kp = tl.compute_factored_kernel(model, (x, y), opt, preconditioner=pc, progress=False)
    fc = tl.forecast(kp, tl.adam_as_sgd(opt), steps, loss="ce", batch_size=bsz, paths=1)
    p = pc.precondition()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    bw, bb = torch.zeros_like(w), torch.zeros_like(b)
    losses = [_full_loss(w, b, x, y)]
    for t, idx in enumerate(_batches(bsz, steps)):
        wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(x[idx] @ wv.T + bv, y[idx]), (wv, bv))
        bw, bb = b1 * bw + p["weight"] * gw + lam * w, b1 * bb + p["bias"] * gb + lam * b
        rate = opt.lr * (1 - b1) / (1 - b1 ** (t + 1))
        w, b = w - rate * bw, b - rate * bb
        losses.append(_full_loss(w, b, x, y))
    np.testing.assert_allclose(fc.loss, losses, rtol=1e-9)


def test_adam_as_sgd_matches_torch_adamw_on_constant_gradients():
    """A loss linear in w has a constant gradient g, so AdamW's v̂ = g² is frozen: torch
    AdamW == torch SGD(momentum=β1) with adam_as_sgd's multipliers in u = w / D."""
    torch.manual_seed(0)
    gvec = torch.randn(7, dtype=torch.float64)
    sched = tl.Warmup(3).then(tl.Cosine(10))
    opt = tl.AdamW(0.1, betas=(0.9, 0.95), eps=0.0, weight_decay=0.0, schedule=sched)
    sgd = tl.adam_as_sgd(opt)
    assert sgd.momentum == 0.9 and sgd.decay_to == "zero"
    d = gvec.abs().rsqrt()  # D = sqrt(P), P = 1/|g|
    w = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    u = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    ta = opt.torch_optimizer([w])
    ts = sgd.torch_optimizer([u])
    sa, ss = opt.torch_scheduler(ta), sgd.torch_scheduler(ts)
    for _ in range(15):
        for o, loss in ((ta, gvec @ w), (ts, gvec @ (d * u))):
            o.zero_grad()
            loss.backward()
            o.step()
        sa.step()
        ss.step()
        torch.testing.assert_close(w.detach(), d * u.detach(), rtol=1e-12, atol=1e-14)
    d = json.loads(json.dumps(sgd.to_dict()["schedule"]))
    assert tl.Schedule.from_dict(d) == sgd.schedule
    assert eval(sgd.schedule.describe(), {k: getattr(tl, k) for k in tl.__all__}) == sgd.schedule
    mult = sgd.schedule.multipliers(15)
    np.testing.assert_allclose(mult, sched.multipliers(15) * 0.1 / (1 - 0.9 ** np.arange(1, 16)))
    assert mult[0] == sched.multiplier(0)


# ---- candidate 4: SignGD and the asymmetric SignGD kernel -------------------------------------


def test_sign_kernel_is_j_sign_jt(monkeypatch):
    model, data = _linear()
    wst = tl.compute_weight_space_tangent(model, data, progress=False)
    sk = tl.compute_sign_kernel(wst)
    jac = wst.jacobian.reshape(N * C, -1)
    assert torch.allclose(sk.theta, jac @ torch.sign(jac).T)
    monkeypatch.setattr("tangentlab.adam_approx._SIGN_CHUNK_BYTES", 7 * jac.shape[1] * 8)
    assert torch.allclose(tl.compute_sign_kernel(wst).theta, sk.theta, rtol=1e-12)  # 7 rows
    assert sk.theta.shape == (N * C, N * C)
    hidden = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, C)).double().eval()
    sk2 = tl.compute_sign_kernel(tl.compute_weight_space_tangent(hidden, data, progress=False))
    assert not torch.allclose(sk2.theta, sk2.theta.T)  # asymmetric


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_signgd_weight_space_equals_torch_loop(decay):
    model, (x, y) = _linear()
    steps, bsz = 20, 4
    opt = tl.AdamW(0.02, weight_decay=decay, schedule=_schedule())
    wst = tl.compute_weight_space_tangent(model, (x, y), progress=False)
    fc = tl.forecast_signgd(wst, opt, steps, loss="ce", batch_size=bsz)
    # the same run, twice in torch: w -= lr*sign(grad), and AdamW with betas (0, 0), eps 0
    w = model.weight.detach().clone().requires_grad_()
    b = model.bias.detach().clone().requires_grad_()
    w2 = model.weight.detach().clone().requires_grad_()
    b2 = model.bias.detach().clone().requires_grad_()
    adam = opt.replace(betas=(0.0, 0.0), eps=0.0).torch_optimizer([w2, b2])
    sched = opt.torch_scheduler(adam)
    mult = opt.schedule.multipliers(steps)
    losses = [_full_loss(w.detach(), b.detach(), x, y)]
    for t, idx in enumerate(_batches(bsz, steps)):
        gw, gb = torch.autograd.grad(F.cross_entropy(x[idx] @ w.T + b, y[idx]), (w, b))
        eta = opt.lr * mult[t]
        with torch.no_grad():
            for p, g in ((w, gw), (b, gb)):
                p.mul_(1 - eta * decay).sub_(eta * torch.sign(g))
        adam.zero_grad()
        F.cross_entropy(x[idx] @ w2.T + b2, y[idx]).backward()
        adam.step()
        sched.step()
        losses.append(_full_loss(w.detach(), b.detach(), x, y))
        torch.testing.assert_close(w2.detach(), w.detach(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fc.loss, losses, rtol=1e-10)
    assert fc.loss.shape == (steps + 1,) and fc.accuracy.shape == (steps + 1,)


def test_first_adamw_step_is_a_sign_step():
    model, (x, y) = _linear()
    opt = tl.AdamW(0.01, weight_decay=0.0)
    wst = tl.compute_weight_space_tangent(model, (x, y), progress=False)
    fc = tl.forecast_signgd(wst, opt, 1, loss="ce")
    ex = tl.forecast(wst, opt, 1, loss="ce")
    np.testing.assert_allclose(fc.loss, ex.loss, rtol=1e-6)


def test_sign_kernel_forecast_equals_sample_wise_signgd():
    """The kernel form is exact for sample-wise SignGD; with B = 1 and a linear head (the
    outputs' gradients have disjoint supports) that is SignGD itself."""
    model, (x, y) = _linear()
    opt = tl.AdamW(0.02, weight_decay=0.1, schedule=_schedule())
    wst = tl.compute_weight_space_tangent(model, (x, y), progress=False)
    sk = tl.compute_sign_kernel(wst)
    one_k = tl.forecast_signgd(sk, opt, 20, loss="ce", batch_size=1, seed=3)
    one_w = tl.forecast_signgd(wst, opt, 20, loss="ce", batch_size=1, seed=3)
    np.testing.assert_allclose(one_k.loss, one_w.loss, rtol=1e-10)
    # B = 4: w -= (η/|b|) Σ_j Σ_c sign(δ_jc) sign(∇f_c(x_j)), in torch
    bsz, steps = 4, 20
    fc = tl.forecast_signgd(sk, opt, steps, loss="mse", batch_size=bsz)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    mult = opt.schedule.multipliers(steps)

    def mse(w, b):
        return 0.5 * ((x @ w.T + b - F.one_hot(y, C)) ** 2).sum(1).mean()

    losses = [float(mse(w, b))]
    for t, idx in enumerate(_batches(bsz, steps)):
        eta = opt.lr * mult[t]
        delta = x[idx] @ w.T + b - F.one_hot(y[idx], C)  # [b, C]
        # ∇_W f_c(x_j) = e_c x_jᵀ, ∇_b f_c = e_c: sign(δ_jc) sign(x_j) in row c
        step_w = (torch.sign(delta)[:, :, None] * torch.sign(x[idx])[:, None, :]).sum(0)
        step_b = torch.sign(delta).sum(0)
        w = w * (1 - eta * 0.1) - eta * step_w / bsz
        b = b * (1 - eta * 0.1) - eta * step_b / bsz
        losses.append(float(mse(w, b)))
    np.testing.assert_allclose(fc.loss, losses, rtol=1e-10)


def test_signgd_paths_band_and_full_batch():
    model, data = _linear()
    wst = tl.compute_weight_space_tangent(model, data, progress=False)
    sk = tl.compute_sign_kernel(wst)
    fc = tl.forecast_signgd(sk, tl.AdamW(0.01), 10, loss="ce", batch_size=4, paths=3)
    assert fc.loss_paths.shape == (3, 11) and fc.loss_band[0].shape == (11,)
    full = tl.forecast_signgd(sk, tl.AdamW(0.01), 10, loss="ce")
    assert full.loss_band is None and full.loss[-1] < full.loss[0]
    assert full.steps_to(full.loss[0]) == 0


# ---- errors --------------------------------------------------------------------------------


def test_clear_errors():
    model, data = _linear()
    wst = tl.compute_weight_space_tangent(model, data, progress=False)
    kernel = tl.compute_kernel(model, data, progress=False)
    with pytest.raises(tl.TangentlabError, match="tl.AdamW"):
        tl.adam_as_sgd(tl.SGD(0.1))
    with pytest.raises(tl.TangentlabError, match="beta1"):
        tl.AdamBiasCorrection(tl.Constant(), 1.0)
    with pytest.raises(tl.TangentlabError, match="optimizer must be a tl.AdamW"):
        tl.compute_factored_kernel(model, data, tl.SGD(0.1), loss="ce")
    with pytest.raises(tl.TangentlabError, match="loss"):
        tl.compute_factored_kernel(model, data, tl.AdamW(0.1))
    with pytest.raises(tl.TangentlabError, match="warm_steps"):
        tl.estimate_preconditioner(model, data, tl.AdamW(0.1), loss="ce", warm_steps=0)
    with pytest.raises(tl.TangentlabError, match="loss must be"):
        tl.estimate_preconditioner(model, data, tl.AdamW(0.1), loss="hinge")
    pc = tl.estimate_preconditioner(model, data, tl.AdamW(0.1), loss="ce")
    with pytest.raises(tl.TangentlabError, match="eps"):
        tl.compute_factored_kernel(model, data, tl.AdamW(0.1, eps=1e-6), preconditioner=pc)
    with pytest.raises(tl.TangentlabError, match="no entry"):
        tl.compute_factored_kernel(
            nn.Linear(D_IN, C).double().eval(), data, tl.AdamW(0.1),
            preconditioner=tl.Preconditioner({"weight": pc.second_moment["weight"]}, 1e-8),
        )  # fmt: skip
    with pytest.raises(tl.TangentlabError, match="WeightSpaceTangent"):
        tl.compute_sign_kernel(kernel)
    with pytest.raises(tl.TangentlabError, match="SignKernel"):
        tl.forecast_signgd(kernel, tl.AdamW(0.1), 5)
    with pytest.raises(tl.TangentlabError, match="tl.AdamW"):
        tl.forecast_signgd(wst, tl.SGD(0.1), 5)
    with pytest.raises(tl.TangentlabError, match="steps"):
        tl.forecast_signgd(wst, tl.AdamW(0.1), -1)
    with pytest.raises(tl.TangentlabError, match="band"):
        tl.forecast_signgd(wst, tl.AdamW(0.1), 5, band=(0.9, 0.1))
    with pytest.raises(tl.TangentlabError, match="paths"):
        tl.forecast_signgd(wst, tl.AdamW(0.1), 5, batch_size=2, paths=0)

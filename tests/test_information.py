"""Smooth unique information against real leave-one-out retraining and hand-derived forms."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import tangentlab as tl
from tangentlab.errors import TangentlabError

HEAD = r"^2\."  # the trained weights: the model is linear in them


def _linear_model(classes=3, seed=0):
    """A frozen random feature map + a linear head: exactly its own tangent model in the
    head's weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


def _data(n, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.double)
    return x, torch.randint(0, classes, (n,), generator=g)


def _head(model):
    return torch.cat([model[2].weight.detach().reshape(-1), model[2].bias.detach()])


def _retrain(model, x, y, opt, steps, drop=None):
    keep = [j for j in range(x.shape[0]) if j != drop]
    run = tl.finetune(model, (x[keep], y[keep]), opt, steps, params=HEAD, log_every=steps,
                      progress=False)  # fmt: skip
    return run.model


@pytest.mark.parametrize(("momentum", "method"), [(0.0, "exact"), (0.5, "simulate")])
def test_leave_one_out_matches_real_retraining(momentum, method):
    """LOO weights, eval predictions and both informations equal those of tl.finetune on
    N-1 samples (a model linear in its trained weights: the tangent model is exact)."""
    model = _linear_model()
    (x, y), ev = _data(6, 0), _data(4, 1)
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)
    ck = tl.compute_cross_kernel(model, ev, k, train_data=(x, y))
    opt = tl.SGD(0.5 * tl.stable_lr(k), momentum=momentum)
    steps, sigma = 25, 0.3
    info = tl.sample_information(k, opt, time=steps, eval_data=ck, sigma=sigma, keep_loo=True,
                                 method=method)  # fmt: skip
    assert info.settings["method"] == method
    full = _retrain(model, x, y, opt, steps)
    f_eval = full(ev[0]).detach().numpy()
    np.testing.assert_allclose(info.outputs, f_eval, rtol=1e-9, atol=1e-10)
    for i in (0, 3, 5):
        loo = _retrain(model, x, y, opt, steps, drop=i)
        dw = _head(full) - _head(loo)
        df = f_eval - loo(ev[0]).detach().numpy()
        np.testing.assert_allclose(info.weight_change[i], float(dw @ dw), rtol=1e-8)
        np.testing.assert_allclose(info.loo_outputs[i], loo(ev[0]).detach().numpy(),
                                   rtol=1e-9, atol=1e-10)  # fmt: skip
        np.testing.assert_allclose(info.weights[i], float(dw @ dw) / (2 * sigma**2), rtol=1e-8)
        fsi = (df**2).sum() / df.shape[0] / (2 * sigma**2)
        np.testing.assert_allclose(info.functional[i], fsi, rtol=1e-8)
    assert info.weights.min() > 0 and info.functional_on == "eval"


def test_sgd_noise_matches_weight_space_lyapunov():
    """SI under the SGD stationary covariance, against the P-dimensional Lyapunov equation
    solved with scipy from autograd Jacobians and the really retrained weights."""
    model = _linear_model(classes=2)
    x, y = _data(6, 2, classes=2)
    n, c, batch, steps = 6, 2, 2, 15
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)
    opt = tl.SGD(0.5 * tl.stable_lr(k), momentum=0.0)
    info = tl.sample_information(k, opt, time=steps, noise="sgd", batch_size=batch)
    full = _retrain(model, x, y, opt, steps)
    t = tl.Tangent(full, params=HEAD)
    jac = t.jacobian(x).reshape(n * c, -1)  # [NC, P] (constant: the model is linear)
    resid = (full(x).detach() - torch.nn.functional.one_hot(y, c)).reshape(n, c)
    g = torch.einsum("ic,icp->ip", resid, jac.reshape(n, c, -1))  # per-sample gradients
    lam_cov = g.T @ g / n - torch.outer(g.mean(0), g.mean(0))  # Λ [P, P]
    hess = jac.T @ jac / n  # H [P, P]
    kappa = (n - batch) / (n - 1)
    # restricted to the row space of J (the support of Σ and of w - w_-i)
    _, s, vt = torch.linalg.svd(jac, full_matrices=False)
    v = vt[s > 1e-10 * s[0]].T.numpy()
    q = opt.lr / batch * kappa * (v.T @ lam_cov.numpy() @ v)
    cov = scipy.linalg.solve_continuous_lyapunov(v.T @ hess.numpy() @ v, q)
    for i in (1, 4):
        dw = (_head(full) - _head(_retrain(model, x, y, opt, steps, drop=i))).numpy() @ v
        ref = 0.5 * dw @ np.linalg.solve(cov, dw)
        np.testing.assert_allclose(info.weights[i], ref, rtol=1e-6)


def test_scalar_model_hand_derived_closed_form():
    """f(x) = w x, targets s: w_T = w* + (w0 - w*) (1 - eta sum x^2 / N)^T with the least
    squares w* = s sum x / sum x^2; removing sample i replaces the sums and N."""
    model = nn.Linear(1, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.fill_(0.2)
    x = torch.tensor([[1.0], [2.0], [-1.5]], dtype=torch.double)
    y = torch.zeros(3, dtype=torch.long)
    s, sigma, eta, steps = 2.0, 0.5, 0.3, 7
    k = tl.compute_kernel(model, (x, y), progress=False)  # Θ = x x^T: rank 1, singular

    def w_t(xs, t):
        xs = xs.reshape(-1).numpy()
        w_star = s * xs.sum() / (xs**2).sum()
        return w_star + (0.2 - w_star) * (1 - eta * (xs**2).sum() / xs.size) ** t

    for t in (steps, math.inf):
        info = tl.sample_information(k, tl.SGD(eta), time=t, loss=tl.MSE(s), sigma=sigma)
        for i in range(3):
            rest = torch.cat([x[:i], x[i + 1 :]])
            dw = w_t(x, t) - w_t(rest, t)
            assert info.weights[i] == pytest.approx(dw**2 / (2 * sigma**2), rel=1e-10)
            # F-SI on the training inputs: mean_j (x_j dw)^2 / (2 sigma^2)
            fsi = float((x.reshape(-1) ** 2).mean()) * dw**2 / (2 * sigma**2)
            assert info.functional[i] == pytest.approx(fsi, rel=1e-10)


def test_converged_run_schur_equals_exact_and_long_runs():
    model = _linear_model()
    x, y = _data(5, 3)
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)  # NC=15 <= P=27
    opt = tl.SGD(tl.stable_lr(k))
    schur = tl.sample_information(k, opt, time=math.inf, method="schur")
    exact = tl.sample_information(k, opt, time=math.inf, method="exact")
    sim = tl.sample_information(k, opt, time=40, method="simulate")
    np.testing.assert_allclose(sim.weights, tl.sample_information(k, opt, time=40,
                               method="exact").weights, rtol=1e-9)  # fmt: skip
    assert schur.settings["method"] == "schur"
    np.testing.assert_allclose(schur.weights, exact.weights, rtol=1e-7)
    np.testing.assert_allclose(schur.functional, exact.functional, rtol=1e-7)
    lam = k.eigh()[0]
    # a run long enough for the slowest mode to converge to 1e-12
    long = int(np.log(1e-12) / np.log(1 - opt.lr * float(lam.min()) / 4)) + 1
    late = tl.sample_information(k, opt, time=long)
    np.testing.assert_allclose(late.weights, exact.weights, rtol=1e-6)


def test_result_object_ranking_frame_and_json():
    model = _linear_model()
    x, y = _data(6, 0)
    y[2] = (y[2] + 1) % 3  # one flipped label
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)
    info = tl.sample_information(k, tl.SGD(tl.stable_lr(k)), time=50)
    order = info.ranking()
    assert sorted(order.tolist()) == list(range(6))
    assert np.all(np.diff(info.weights[order]) <= 0)
    frame = info.to_frame()
    assert list(frame["sample"]) == order.tolist() and list(frame["rank"]) == list(range(6))
    d = info.to_dict()
    assert d["ranking_weights"] == order.tolist() and d["units"] == "nats"
    import json

    json.dumps(d)
    curve = tl.detection_curve(info.weights, [2])
    assert curve["found"][0] == 0.0 and curve["found"][-1] == 1.0
    assert len(curve["checked"]) == 7 and 0.0 <= curve["auc"] <= 1.0


def test_bad_input_is_refused_with_the_fix():
    model = _linear_model()
    x, y = _data(5, 0)
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)
    opt = tl.SGD(0.1)
    with pytest.raises(TangentlabError, match="MSE"):
        tl.sample_information(k, opt, time=10, loss="ce")
    with pytest.raises(TangentlabError, match="batch_size=B"):
        tl.sample_information(k, opt, time=10, noise="sgd")
    with pytest.raises(TangentlabError, match="time must be"):
        tl.sample_information(k, opt, time=-1)
    with pytest.raises(TangentlabError, match="weight decay"):
        tl.sample_information(k, tl.SGD(0.1, weight_decay=0.1), time=10)
    with pytest.raises(TangentlabError, match="sigma"):
        tl.sample_information(k, opt, time=10, sigma=0)
    with pytest.raises(TangentlabError, match="cross kernel"):
        tl.sample_information(k, opt, time=10, eval_data=(x, y))
    with pytest.raises(TangentlabError, match="diverges"):
        tl.sample_information(k, tl.SGD(100 * tl.stable_lr(k)), time=200)
    with pytest.raises(TangentlabError, match="SGD noise vanishes"):
        tl.sample_information(k, opt, time=math.inf, noise="sgd", batch_size=2)
    other = tl.compute_kernel(model, _data(4, 1), params=HEAD, progress=False)
    ck = tl.compute_cross_kernel(model, _data(3, 2), other, train_data=_data(4, 1))
    with pytest.raises(TangentlabError, match="N=4"):
        tl.sample_information(k, opt, time=10, eval_data=ck)


def test_projected_and_oscillating_runs_agree_across_methods():
    """A projected kernel (k < NC: singular Θ) and a learning rate whose top modes
    oscillate (1 < η λ/N < 2): the closed form per leave-one-out run ('exact') equals the
    runs stepped side by side ('simulate')."""
    model = _linear_model()
    x, y = _data(5, 4)
    k = tl.compute_kernel(model, (x, y), params=HEAD, projection=8, progress=False)
    assert k.eigh()[0].numel() == 8  # rank 8 < NC = 15
    opt = tl.SGD(1.4 * tl.stable_lr(k))  # eta lambda_max / N = 1.4 (stable_lr: 1)
    for t in (1, 33):
        sim = tl.sample_information(k, opt, time=t, method="simulate")
        exact = tl.sample_information(k, opt, time=t, method="exact")
        np.testing.assert_allclose(sim.weights, exact.weights, rtol=1e-9)
        np.testing.assert_allclose(sim.functional, exact.functional, rtol=1e-9)
    conv = tl.sample_information(k, tl.SGD(tl.stable_lr(k)), time=math.inf)
    assert conv.settings["method"] == "exact" and np.all(np.isfinite(conv.weights))

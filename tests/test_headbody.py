"""Head exact, body linear (tangentlab.headbody): exact where the model is, against real runs
and an independent weight-space simulation; the logit kernel at w0 is the tangent NTK."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import tangentlab as tl
from tangentlab import dynamics as dyn
from tangentlab.forecast import _HeadBodyPrepared
from tangentlab.headbody import compute_head_body_kernel, feature_basis, find_head


class LinearBody(nn.Module):
    """φ = (A x + a) ⊙ s: linear in its weights; s != 1 makes K(i, j) anisotropic."""

    def __init__(self, anisotropic: bool = True, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(5, 6)
        scale = torch.linspace(0.5, 2.0, 6) if anisotropic else torch.ones(6)
        self.register_buffer("scale", scale)
        self.fc = nn.Linear(6, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x) * self.scale)


class TanhBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(n=10, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.double)
    return x, torch.randint(0, 3, (n,), generator=g)


OPTIMIZERS = [
    tl.SGD(0.05),
    tl.SGD(0.05, momentum=0.9),
    tl.SGD(0.05, momentum=0.5, weight_decay=0.1),
    tl.SGD(0.05, weight_decay=0.1, decay_to="w0"),
]


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.describe())
@pytest.mark.parametrize("batch", [None, 4])  # 4 does not divide N = 10: a short last batch
def test_exact_against_real_runs_of_a_body_linear_in_its_weights(loss, opt, batch):
    net = LinearBody().double().eval()
    data = _data()
    hb = compute_head_body_kernel(net, data, directions=6, progress=False)  # Q spans R^6
    assert hb.rest is None and hb.basis.shape == (6, 6)
    fc = tl.forecast(hb, opt, 25, loss=loss, batch_size=batch, paths=1)
    run = tl.finetune(net, data, opt, 25, loss=loss, batch_size=batch, log_every=1,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss, run.loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fc.accuracy, run.accuracy, atol=1e-12)
    assert fc.method["model"] == "head-body"


@pytest.mark.parametrize("sampling", ["epoch", "replacement"])
def test_every_minibatch_path_is_a_real_run_with_its_seed(sampling):
    net = LinearBody().double().eval()
    data = _data()
    hb = compute_head_body_kernel(net, data, directions=6, progress=False)
    fc = tl.forecast(hb, tl.SGD(0.05, momentum=0.9), 15, loss="ce", batch_size=3, paths=3,
                     seed=7, sampling=sampling)  # fmt: skip
    assert fc.loss_band is not None and fc.loss_paths.shape == (3, 16)
    run = tl.finetune(net, data, tl.SGD(0.05, momentum=0.9), 15, loss="ce", batch_size=3,
                      seed=7, sampling=sampling, log_every=1, progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss_paths[0], run.loss, rtol=1e-10)


def test_isotropic_body_is_exact_with_probes_and_no_feature_directions():
    """K(i, j) = (x_i·x_j + 1) I: the ratio estimator of κ_⊥ is exact with any probes."""
    net = LinearBody(anisotropic=False).double().eval()
    data = _data()
    hb = compute_head_body_kernel(net, data, directions=0, probes=2, progress=False)
    assert hb.basis.shape[1] == 3 and hb.rest is not None
    x = data[0]
    np.testing.assert_allclose(hb.rest.numpy(), (x @ x.T + 1).numpy(), rtol=1e-10)
    opt = tl.SGD(0.05, momentum=0.9)
    fc = tl.forecast(hb, opt, 40, loss="ce")
    run = tl.finetune(net, data, opt, 40, loss="ce", log_every=1, progress=False)
    np.testing.assert_allclose(fc.loss, run.loss, rtol=1e-10)
    # without the probes the body is frozen beside Q: no longer exact
    frozen = tl.forecast(compute_head_body_kernel(net, data, directions=0, probes=0,
                                                  progress=False), opt, 40, loss="ce")
    assert np.abs(frozen.loss - run.loss).max() > 1e-4


def test_linear_probing_is_exact():
    net = TanhBody().double().eval()
    data = _data(dim=4)
    hb = compute_head_body_kernel(net, data, params=r"^head\.", progress=False)
    assert hb.block is None and hb.metadata["body_params"] == 0
    opt = tl.SGD(0.3, momentum=0.5)
    fc = tl.forecast(hb, opt, 30, loss="ce", batch_size=4)
    run = tl.finetune(net, data, opt, 30, loss="ce", batch_size=4, params=r"^head\.",
                      log_every=1, progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss_paths[0], run.loss, rtol=1e-10)


def _weight_space_reference(net, x, y, lr, steps):
    """Full-batch GD of f = W (φ0 + J Δw) + b in weight space, J by autograd (independent
    of the kernels and of the function-space simulation), CE loss."""
    body = dict(net.body.named_parameters())
    names = list(body)
    w0 = {n: p.detach() for n, p in body.items()}

    def phi(w):
        return functional_call(net.body, w, (x,))

    jac = jacrev(phi)(w0)  # name -> [N, d, *shape]
    n = x.shape[0]
    jmat = torch.cat([jac[k].reshape(n, -1, jac[k][0, 0].numel()) for k in names], dim=2)
    phi0 = phi(w0).detach()
    dw = torch.zeros(jmat.shape[2], dtype=torch.double, requires_grad=True)
    w = net.head.weight.detach().clone().requires_grad_(True)
    b = net.head.bias.detach().clone().requires_grad_(True)
    losses = []
    for t in range(steps + 1):
        f = (phi0 + jmat @ dw) @ w.T + b
        loss = torch.nn.functional.cross_entropy(f, y)
        losses.append(float(loss.detach()))
        if t == steps:
            break
        gd, gw, gb = torch.autograd.grad(loss, (dw, w, b))
        with torch.no_grad():
            dw -= lr * gd
            w -= lr * gw
            b -= lr * gb
    return np.array(losses)


def test_nonlinear_body_matches_a_weight_space_simulation_of_the_bilinear_model():
    net = TanhBody().double().eval()
    x, y = _data(dim=4)
    hb = compute_head_body_kernel(net, (x, y), directions=4, progress=False)  # r = d = 4
    fc = tl.forecast(hb, tl.SGD(0.5), 40, loss="ce")
    ref = _weight_space_reference(net, x, y, 0.5, 40)
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-10)
    # ... and it is not the tangent model (which misses the head x body product)
    tangent = tl.forecast(tl.compute_kernel(net, (x, y), progress=False), tl.SGD(0.5), 40,
                          loss="ce")  # fmt: skip
    assert np.abs(tangent.loss - ref).max() > 1e-3


def test_logit_kernel_at_w0_is_the_tangent_ntk():
    net = TanhBody().double().eval()
    data = _data(dim=4)
    hb = compute_head_body_kernel(net, data, directions=0, probes=3, progress=False)
    theta = tl.compute_kernel(net, data, progress=False).theta.numpy()
    op = dyn.HeadBodyLogitOperator(_HeadBodyPrepared(hb).problem)
    v = np.random.default_rng(0).standard_normal(theta.shape[0])
    np.testing.assert_allclose(op.matvec(v), theta @ v, rtol=1e-9)
    np.testing.assert_allclose(hb.f0.numpy(), net(data[0]).detach().numpy(), rtol=1e-12)
    fc = tl.forecast(hb, tl.SGD(0.1), 5)
    lam = np.linalg.eigvalsh(theta)[-1]
    assert fc.stability == pytest.approx(0.1 * lam / 10, rel=1e-6)


def test_feature_basis_is_orthonormal_and_holds_the_head_rows():
    w = torch.randn(3, 8, dtype=torch.double)
    phi = torch.randn(20, 8, dtype=torch.double)
    q = feature_basis(w, phi, directions=2)
    assert q.shape == (8, 5)
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(5), atol=1e-12)
    np.testing.assert_allclose((q @ (q.T @ w.T)).numpy(), w.T.numpy(), atol=1e-12)
    assert feature_basis(w, phi, directions=20).shape == (8, 8)  # never more than d


def test_head_is_found_or_named():
    net = TanhBody()
    assert find_head(net)[0] == "head"
    assert find_head(net, "body.2")[0] == "body.2"
    with pytest.raises(tl.TangentlabError, match="not an nn.Linear"):
        find_head(net, "body.1")


class ScaledOutput(TanhBody):
    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (TanhBody, dict(params=r"^body\."), "is not trained"),
        (ScaledOutput, {}, "is not head"),
        (TanhBody, dict(probes=-1), "probes must be an integer >= 0"),
        (TanhBody, dict(directions=-1), "directions must be an integer >= 0"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(make, kwargs, match):
    with pytest.raises(tl.TangentlabError, match=match):
        compute_head_body_kernel(make().double().eval(), _data(dim=4), progress=False, **kwargs)


@pytest.mark.parametrize(
    "make, kwargs, model, says",
    [
        (TanhBody, {}, "body", "the head 'head' kept exact"),
        (TanhBody, dict(head="body.2"), "all", "the model's output is not body.2"),
        (TanhBody, dict(params=r"^body\."), "all", "the head 'head' is not trained"),
        (TanhBody, dict(params=r"^head\."), "all", "only the head is trained"),
        (ScaledOutput, {}, "all", "the model's output is not head(features)"),
        (TanhBody, dict(optimizer=tl.AdamW(1e-3)), "all", "AdamW"),
        (TanhBody, dict(trace=True), "all", "trace kernels"),
        (TanhBody, dict(dataset_size=1000), "all", "dataset_size"),
        (TanhBody, dict(held_out=True), "all", "held-out curves"),
        (lambda: nn.Sequential(nn.Conv1d(1, 3, 4), nn.Flatten()), {}, "all",
         "no nn.Linear layer"),
    ],
    ids=["head-exact", "named-inner-head", "head-frozen", "linear-probing", "not-last",
         "adamw", "trace", "dataset-size", "held-out", "no-linear"],
)
def test_choose_linearization_picks_head_exact_where_it_applies(make, kwargs, model, says):
    net = make().double()
    x, y = _data(dim=4)
    if isinstance(net[0] if isinstance(net, nn.Sequential) else None, nn.Conv1d):
        x = x[:, None, :]
    net.train()  # the check must leave the model's modes alone
    choice = tl.choose_linearization(net, (x, y), **kwargs)
    assert isinstance(choice, tl.Linearization)
    assert (choice.model, says in choice.reason) == (model, True), choice.reason
    assert choice.head == ("head" if model == "body" else None)
    assert all(m.training for m in net.modules())
    if model == "body":  # what it picked computes
        compute_head_body_kernel(net.eval(), (x, y), head=choice.head, progress=False)


def test_choose_linearization_falls_back_when_the_body_cannot_be_split_off():
    import threading

    net = TanhBody().double()
    net.lock = threading.Lock()  # a model deepcopy cannot copy
    choice = tl.choose_linearization(net, _data(dim=4))
    assert choice.model == "all" and "without its head 'head' failed" in choice.reason
    assert "TypeError" in choice.reason


def test_choose_linearization_refuses_a_wrong_head_name():
    with pytest.raises(tl.TangentlabError, match="not an nn.Linear"):
        tl.choose_linearization(TanhBody(), head="body.1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise="sde", batch_size=3), "noise='sde'"),
        (dict(time="continuous"), "time='continuous'"),
        (dict(execution="dual"), "execution='dual'"),
        (dict(dataset_size=100), "dataset_size"),
    ],
)
def test_unsupported_forecast_options_are_refused(kwargs, match):
    hb = compute_head_body_kernel(TanhBody().double().eval(), _data(dim=4), progress=False)
    with pytest.raises(tl.TangentlabError, match=match):
        tl.forecast(hb, tl.SGD(0.1), 5, **kwargs)


def test_sweep_accepts_a_head_body_kernel():
    hb = compute_head_body_kernel(TanhBody().double().eval(), _data(dim=4), progress=False)
    sw = tl.sweep(hb, tl.SGD.grid(lr=[0.1, 0.5]), 20, loss="ce")
    assert len(sw.forecasts) == 2 and sw.best.method["model"] == "head-body"
    assert sw.best.to_dict()["method"]["solver"].startswith("head exact")
    # each row's interval for the real steps (NOTE [steps interval]), in the table's order
    for (_, row), fc in zip(sw.table.iterrows(), sw.forecasts):
        iv = fc.steps_interval(sw.target_loss)
        got = [None if row[k] is pd.NA else int(row[k])
               for k in ("steps_low", "steps_median", "steps_high")]  # fmt: skip
        assert got == [iv.low, iv.median, iv.high] and row["steps_trusted"] == iv.trusted
    sw.to_dict()  # JSON-able with the new columns


def test_tangent_kernel_is_the_ntk_at_w0_and_forecasts_as_the_tangent_model():
    net = TanhBody().double().eval()
    data = _data(dim=4)
    hb = compute_head_body_kernel(net, data, directions=0, probes=3, progress=False)
    exact = tl.compute_kernel(net, data, progress=False)
    k0 = hb.tangent_kernel()
    np.testing.assert_allclose(k0.theta.numpy(), exact.theta.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(k0.jw0.numpy(), exact.jw0.numpy(), rtol=1e-9, atol=1e-12)
    opt = tl.SGD(0.2, momentum=0.5, weight_decay=0.1)  # decay to 0: uses jw0
    for batch in (None, 4):
        a = tl.forecast(k0, opt, 20, loss="ce", batch_size=batch)
        b = tl.forecast(exact, opt, 20, loss="ce", batch_size=batch)
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-9)
    assert hb.tangent_kernel() is k0  # built once


def test_frozen_model_with_params_named_is_computed_as_the_same_model_unfrozen():
    net = TanhBody().double().eval()
    data = _data(dim=4)
    want = compute_head_body_kernel(net, data, params=r"^(body\.2|head)\.", progress=False)
    for p in net.parameters():  # e.g. frozen before a weight-space loop: params= decides
        p.requires_grad_(False)
    got = compute_head_body_kernel(net, data, params=r"^(body\.2|head)\.", progress=False)
    assert tl.choose_linearization(net, data, params=r"^(body\.2|head)\.").model == "body"
    np.testing.assert_allclose(got.block.theta.numpy(), want.block.theta.numpy(), rtol=1e-12)


def test_tangent_kernel_of_a_projected_block_never_forms_the_read_out_kernel(monkeypatch):
    import tangentlab.headbody as hbm

    monkeypatch.setattr(hbm, "_CHUNK", 3)  # several sample chunks, a short last one
    net = TanhBody().double().eval()
    data = _data(dim=4)
    hb = compute_head_body_kernel(net, data, directions=3, projection=16, progress=False)
    assert hb.block.theta is None  # only Φ [N r, k] is kept
    n, c, r = hb.num_samples, hb.num_classes, hb.basis.shape[1]
    a = hb.weight @ hb.basis
    m = (hb.block.features.double() @ hb.block.features.double().T).reshape(n, r, n, r)
    want = torch.einsum("ca,iajb,db->icjd", a, m, a).reshape(n * c, n * c)
    want += torch.kron(hb.features @ hb.features.T + 1.0, torch.eye(c, dtype=torch.float64))
    np.testing.assert_allclose(hb.tangent_kernel().theta.numpy(), want.numpy(), rtol=1e-10,
                               atol=1e-12)  # fmt: skip


def test_reliability_check_is_quiet_where_the_models_agree():
    net = TanhBody().double().eval()
    data = _data(dim=4)
    probe = compute_head_body_kernel(net, data, params=r"^head\.", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tl.errors.ValidityWarning)
        fc = tl.forecast(probe, tl.SGD(0.3), 60, loss="ce")  # linear probing: both exact
    rel = fc.method["reliability"]
    assert not rel["flagged"] and fc.valid
    assert all(r is None or r == pytest.approx(1.0) for r in rel["rho"].values())


class SmallHead(nn.Module):
    """A fresh head near zero on a wide body: at w0 the body hardly moves the logits (the
    tangent model is slow), but the head grows and the body follows (the head-exact model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.head.weight.mul_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_reliability_check_warns_when_the_head_x_body_product_dominates():
    net = SmallHead().double().eval()
    data = _data(n=12, dim=4)
    hb = compute_head_body_kernel(net, data, progress=False)
    with pytest.warns(tl.errors.ValidityWarning, match="head-exact forecast"):
        fc = tl.forecast(hb, tl.SGD(0.5), 200, loss="ce")
    rel = fc.method["reliability"]
    assert rel["flagged"] and not fc.valid and "reliability" in fc.method["validity"]
    assert max(r for r in rel["rho"].values() if r is not None) > 2
    # a sweep says why the row is not valid: the reliability check, not the stability number
    with pytest.warns(tl.errors.ValidityWarning, match="reliability check"):
        sw = tl.sweep(hb, [tl.SGD(0.5)], 200, loss="ce")
    note = sw.table["note"].iloc[0]
    assert note.startswith("reliability check") and "validity region" not in note


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("case", ["block", "isotropic probes", "minibatch",
                                  "minibatch, probes, with replacement", "linear probing"])
def test_held_out_curves_equal_real_runs_where_the_model_is_exact(case):
    """``compute_head_body_cross_kernel``: held-out features move through the cross feature
    kernel; on a body linear in its weights (Q spanning the features, or an isotropic K with
    probes, or no body trained) the forecast's held-out curves are the real run's."""
    kw, fkw, opt = {}, {}, tl.SGD(0.05, momentum=0.9, weight_decay=0.1)
    net = LinearBody(anisotropic="probes" not in case).double().eval()
    data, held = _data(), _data(n=7, seed=1)
    if "probes" in case:
        kw = dict(directions=0, probes=2)
    elif case == "linear probing":
        net, data, held = TanhBody().double().eval(), _data(dim=4), _data(n=7, dim=4, seed=1)
        kw = dict(params=r"^head\.")
    else:
        kw = dict(directions=6)
    if case.startswith("minibatch"):  # 2 x (2 paths x 2) < N = 10: the gathered columns;
        # with replacement 3 paths x 4 >= 10 / 2: the scattered GEMM (repeated ids add up)
        fkw = dict(batch_size=2, paths=2, seed=3) if case == "minibatch" else dict(
            batch_size=4, paths=3, seed=3, sampling="replacement")  # fmt: skip
    hb = compute_head_body_kernel(net, data, progress=False, **kw)
    ev = tl.compute_head_body_cross_kernel(net, held, hb, train_data=data,
                                           params=kw.get("params"))  # fmt: skip
    assert ev.num_eval == 7 and (ev.rest is not None) == ("probes" in case)
    fc = tl.forecast(hb, opt, 20, loss="ce", eval_data=ev, **fkw)
    run = tl.finetune(net, data, opt, 20, loss="ce", eval_data=held, log_every=1,
                      progress=False, params=kw.get("params"),
                      **{k: v for k, v in fkw.items() if k != "paths"})  # fmt: skip
    mini = case.startswith("minibatch")
    got = fc.eval_loss_paths[0] if mini else fc.eval_loss
    np.testing.assert_allclose(got, run.eval_loss, rtol=1e-9, atol=1e-12)
    acc = fc.eval_accuracy_paths[0] if mini else fc.eval_accuracy
    np.testing.assert_allclose(acc, run.eval_accuracy, atol=1e-12)
    assert fc.best_step is not None and fc.method["eval"]["operator"] == "head-body"
    # the sweep takes it too, and ranks by held-out accuracy
    sw = tl.sweep(hb, [tl.SGD(0.01), tl.SGD(0.05)], 10, loss="ce", eval_data=ev)
    assert sw.rank_by == "eval_accuracy" and "eval_accuracy" in sw.table.columns


def test_head_body_held_out_set_is_checked():
    net = LinearBody().double().eval()
    data, held = _data(), _data(n=7, seed=1)
    hb = compute_head_body_kernel(net, data, directions=6, progress=False)
    k = tl.compute_kernel(net, data, progress=False)
    cross = tl.compute_cross_kernel(net, held, k, train_data=data)
    with pytest.raises(tl.TangentlabError, match="compute_head_body_cross_kernel"):
        tl.forecast(hb, tl.SGD(0.05), 5, eval_data=cross)
    with pytest.raises(tl.TangentlabError, match="train_data is not the data"):
        tl.compute_head_body_cross_kernel(net, held, hb, train_data=_data(seed=5))
    other = compute_head_body_kernel(net, _data(seed=2), directions=6, progress=False)
    ev = tl.compute_head_body_cross_kernel(net, held, other, train_data=_data(seed=2))
    with pytest.raises(tl.TangentlabError, match="another head-body kernel"):
        tl.forecast(hb, tl.SGD(0.05), 5, eval_data=ev)
    proj = compute_head_body_kernel(net, data, directions=6, projection=8, progress=False)
    with pytest.raises(tl.TangentlabError, match="projection=None"):
        tl.compute_head_body_cross_kernel(net, held, proj, train_data=data)


def _ce_forecast_and_target():
    """A head-exact CE forecast of TanhBody and a target halfway down its curve."""
    net = TanhBody().double().eval()
    hb = compute_head_body_kernel(net, _data(dim=4), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, tl.SGD(0.3), 200, loss="ce")
    return net, hb, fc, 0.5 * float(fc.loss[0]) + 0.5 * float(np.nanmin(fc.loss))


def _expected_interval(fc, target):
    """NOTE [steps interval] recomputed from its parts: the features of the target and the
    frozen coefficients (ρ from the reference curve, a from the stability)."""
    from tangentlab.forecast import steps_features, steps_quantiles

    t = fc.steps_to(target)
    hit = np.flatnonzero(fc.reference_loss <= target)
    t_tan = int(hit[0]) if hit.size else 2 * (fc.loss.shape[0] - 1)
    drop = 1 - target / float(fc.loss[0])
    rho = max(t_tan, 1) / max(t, 1)  # as the library
    stretch, rho50 = _curve_features_by_hand(fc.loss, fc.reference_loss)
    x = steps_features(drop, momentum=fc.hyperparameters["momentum"],
                       fraction=fc.stability / 2, rho=rho, steps=t, stretch=stretch,
                       rho50=rho50)  # fmt: skip
    return t, steps_quantiles(x)


def _curve_features_by_hand(loss, ref):
    """stretch = log(T̂(80%) / T̂(50%)), ρ50 = T̂_tangent(50%) / T̂(50%), by a plain loop
    (an unreached drop: 2 x the horizon)."""
    horizon = len(loss) - 1

    def first(curve, frac):
        for t, v in enumerate(curve):
            if v <= frac * curve[0]:
                return max(t, 1)
        return 2 * horizon

    stretch = np.log(first(loss, 0.2) / first(loss, 0.5))
    return stretch, None if ref is None else first(ref, 0.5) / first(loss, 0.5)


def test_curve_features_read_the_forecast_curves():
    """NOTE [steps interval]: the two curve features from toy curves, unreached drops at 2T."""
    from tangentlab.forecast import curve_features

    loss = np.array([1.0, 0.7, 0.45, 0.3, 0.25, 0.19, 0.1])  # 50% at 2, 80% at 5
    ref = np.array([2.0, 1.8, 1.6, 1.4, 1.2, 1.1, 0.9])  # 50% at 6
    stretch, rho50 = curve_features(loss, ref)
    assert stretch == pytest.approx(np.log(5 / 2)) and rho50 == pytest.approx(6 / 2)
    assert curve_features(loss, None) == (pytest.approx(np.log(5 / 2)), None)
    slow = np.array([1.0, 0.9, 0.8, 0.6, 0.45, 0.4, 0.35])  # 50% at 4, 80% never: 2T = 12
    assert curve_features(slow, ref[:7] * 0 + 2.0)[0] == pytest.approx(np.log(12 / 4))
    assert curve_features(slow, ref[:7] * 0 + 2.0)[1] == pytest.approx(12 / 4)
    blown = np.array([1.0, 0.4, np.nan, np.nan])  # NaN after a blow-up: not reached
    assert curve_features(blown, None)[0] == pytest.approx(np.log(6 / 1))


def test_steps_interval_trusts_narrow_bands_and_needs_the_reference_for_it():
    """NOTE [steps interval]: momentum narrows the band (shallow targets: trusted); without
    the tangent reference curve the fit without log ρ is used and nothing is trusted."""
    import dataclasses

    from tangentlab.forecast import STEPS_TRUST_WIDTH, steps_features, steps_quantiles

    net, hb, fc, _ = _ce_forecast_and_target()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        mom = tl.forecast(hb, tl.SGD(0.03, momentum=0.9), 200, loss="ce")
    target = 0.5 * float(mom.loss[0])  # a 50% drop
    t, (lo, mid, hi) = _expected_interval(mom, target)
    iv = mom.steps_interval(target)
    assert hi - lo <= STEPS_TRUST_WIDTH and iv.trusted and "narrow: trusted" in str(iv)
    assert iv.median == round(t * np.exp(mid))
    bare = dataclasses.replace(mom, reference_loss=None).steps_interval(target)
    stretch, _ = _curve_features_by_hand(mom.loss, None)
    x = steps_features(0.5, momentum=0.9, fraction=mom.stability / 2, rho=None, steps=t,
                       stretch=stretch)  # fmt: skip
    lo, mid, hi = steps_quantiles(x, with_rho=False)
    want = (int(np.floor(t * np.exp(lo))), round(t * np.exp(mid)), int(np.ceil(t * np.exp(hi))))
    assert (bare.low, bare.median, bare.high) == want
    assert not bare.trusted and "wide" in str(bare)
    assert fc.to_dict()["reference_loss"][0] == pytest.approx(float(fc.loss[0]))


def test_steps_interval_is_the_calibrated_band_around_the_forecast():
    """NOTE [steps interval]: [T̂ e^lo, T̂ e^hi] (floor / ceil) around steps_to, lo/mid/hi from
    the target's features; open above when the horizon ends first; unknown when the forecast
    diverges first; tangent refused."""
    from tangentlab.forecast import STEPS_TRUST_WIDTH

    net, hb, fc, target = _ce_forecast_and_target()
    data, l0 = _data(dim=4), float(fc.loss[0])
    assert fc.reference_loss is not None and fc.reference_loss.shape == fc.loss.shape
    t, (lo, mid, hi) = _expected_interval(fc, target)
    assert t is not None and t > 3
    iv = fc.steps_interval(target)
    assert iv.drop == pytest.approx(1 - target / l0)
    assert (iv.point, iv.low, iv.high) == (t, int(np.floor(t * np.exp(lo))),
                                           int(np.ceil(t * np.exp(hi))))  # fmt: skip
    assert iv.median == round(t * np.exp(mid))
    assert iv.trusted == (hi - lo <= STEPS_TRUST_WIDTH)
    assert iv.low <= iv.median <= iv.high and iv.low < iv.point and iv.coverage == 0.8
    assert f"{iv.low}-{iv.high} steps, median estimate {iv.median}" in str(iv)
    assert fc.steps_interval(l0) == tl.StepsInterval(0, 0, 0, 0, 0.0)  # there at step 0
    deep = fc.steps_interval(0.05 * l0 + 0.95 * float(np.nanmin(fc.loss)))
    assert deep.drop > iv.drop and deep.median / deep.point < iv.median / iv.point  # deeper: faster
    # beyond the horizon: only a lower bound, from the horizon
    never = fc.steps_interval(0.5 * float(np.nanmin(fc.loss)))
    assert never.point is None and never.high is None and not never.trusted
    assert never.low >= 1 and never.low < fc.loss.shape[0]
    assert "more than" in str(never)
    # a diverging forecast: nothing is known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = tl.forecast(hb, tl.SGD(500.0), 50, loss="mse")
    assert bad.diverges
    assert bad.steps_interval(1e-12).low is None and bad.steps_interval(1e-12).point is None
    assert "unknown" in str(bad.steps_interval(1e-12))
    assert iv.note == "" and "not calibrated" not in str(iv)
    # settings outside the calibration grid are named (the band was not measured there)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd = tl.forecast(hb, tl.SGD(0.3, momentum=0.95, weight_decay=0.01,
                                     schedule=tl.Cosine(200)), 200, loss="ce")  # fmt: skip
    note = odd.steps_interval(target).note
    assert "schedule (Cosine(200))" in note and "weight decay" in note and "momentum 0.95" in note
    assert "not calibrated for" in str(odd.steps_interval(target))
    lr_far = 3.0 * tl.stable_lr(hb, fraction=1.0, loss="ce")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        beyond = tl.forecast(hb, tl.SGD(lr_far), 50, loss="ce").steps_interval(target)
    assert "beyond the stability limit" in beyond.note
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blind = tl.forecast(hb, tl.SGD(0.3), 200, loss="ce", stability=False)
    assert "unknown fraction of the stability limit" in blind.steps_interval(target).note
    assert not blind.steps_interval(target).trusted
    # the tangent model is not calibrated: refused with the fix
    plain = tl.forecast(tl.compute_kernel(net, data, progress=False), tl.SGD(0.3), 20)
    with pytest.raises(tl.TangentlabError, match="compute_head_body_kernel"):
        plain.steps_interval(target)


def test_loss_interval_is_read_from_the_steps_intervals_at_every_depth():
    """NOTE [loss interval]: low_t = the highest target of depth 45-95% (a body without a
    convolution) whose interval has not begun by t, high_t = the lowest whose interval has
    ended; checked against the steps intervals one depth at a time; a real curve is covered
    where it lies in between."""
    net, hb, fc, _ = _ce_forecast_and_target()
    band = fc.loss_interval()
    l0, size = float(fc.loss[0]), fc.loss.shape[0]
    assert band.low.shape == band.high.shape == (size,) and band.note == ""
    assert not fc.method["conv_body"] and band.drops == (0.45, 0.95)
    want_lo, want_hi = np.full(size, np.nan), np.full(size, np.nan)
    for k in range(51):  # by hand: every depth 0.45, 0.46, ..., 0.95 on its own
        eps = (1 - (0.45 + 0.01 * k)) * l0
        iv = fc.steps_interval(eps)
        for t in range(size):
            if t < iv.low and not eps <= want_lo[t]:
                want_lo[t] = eps
            if iv.high is not None and t >= iv.high and not eps >= want_hi[t]:
                want_hi[t] = eps
    np.testing.assert_allclose(band.low, want_lo, rtol=1e-12)  # NaN where unknown, as wanted
    np.testing.assert_allclose(band.high, want_hi, rtol=1e-12)
    both = band.two_sided()
    assert both.any() and np.isnan(band.high[0]) and band.low[0] == pytest.approx(0.55 * l0)
    assert (band.low[both] <= band.high[both]).all()
    inside = np.where(both, 0.5 * (band.low + band.high), fc.loss)
    assert band.covers(inside)[both].all()
    above = np.where(both, 1.01 * band.high, fc.loss)
    assert not band.covers(above)[both].any()
    assert not band.covers(np.full(size, np.nan)).any()  # a run that blew up is not covered
    assert band.covers(fc.loss[:5]).shape == (5,)
    t2 = int(np.flatnonzero(both)[0])
    assert band.at(t2) == f"{band.low[t2]:.4g}-{band.high[t2]:.4g}"
    assert band.at(0) == f"at least {band.low[0]:.4g}"  # high unknown at step 0
    assert np.isnan(band.low[-1]) and band.at(size - 1) == f"at most {band.high[-1]:.4g}"
    with pytest.raises(tl.TangentlabError, match="outside the forecast"):
        band.at(size)
    at = np.array([0, 10, 10_000])  # a logged run: its steps; those past the band dropped
    assert band.covers(inside[[0, 10, 10]], steps=at).tolist() == [True, True]
    with pytest.raises(tl.TangentlabError, match="one step per loss value"):
        band.covers(fc.loss[:3], steps=[0, 1])
    # a diverging forecast bounds nothing after its blow-up; the tangent model is refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = tl.forecast(hb, tl.SGD(500.0), 50, loss="mse")
    assert bad.diverges and not bad.loss_interval().two_sided().any()
    plain = tl.forecast(tl.compute_kernel(net, _data(dim=4), progress=False), tl.SGD(0.3), 20)
    with pytest.raises(tl.TangentlabError, match="loss_band"):
        plain.loss_interval()


@pytest.mark.parametrize("batch", [None, 4])
def test_a_diverging_forecast_is_rerun_at_a_stable_fraction_of_its_rate(batch):
    """NOTE [stabilized estimate]: a head-exact forecast that blows up at the stability limit
    carries the same forecast at c·lr over ceil(T / c) steps (the largest c that does not
    diverge), and steps_interval reads c·T̂_c e^(lo, mid, hi) from it past the blow-up."""
    import math

    from tangentlab.forecast import STABILIZE_FACTORS, stabilized_quantiles

    hb = compute_head_body_kernel(TanhBody().double().eval(), _data(dim=4), progress=False)
    lr = tl.stable_lr(hb, fraction=1.0, loss="ce")

    def fcast(lr, steps, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tl.forecast(hb, tl.SGD(lr, **kw), steps, loss="ce", batch_size=batch)

    fc = fcast(lr, 100)
    assert fc.diverges and fc.divergence_step is not None and fc.stabilized is not None
    c = fc.method["stabilized"]["factor"]
    assert c in STABILIZE_FACTORS and fc.to_dict()["stabilized"]["factor"] == c
    for bigger in STABILIZE_FACTORS[: STABILIZE_FACTORS.index(c)]:  # the largest stable c
        assert fcast(bigger * lr, math.ceil(100 / bigger)).diverges
    ref = fcast(c * lr, math.ceil(100 / c))  # the independent rerun
    assert not ref.diverges
    np.testing.assert_allclose(fc.stabilized.loss, ref.loss, rtol=1e-12)
    assert fc.stabilized.reference_loss is None  # the interval reads only its steps
    l0 = float(fc.loss[0])
    target = l0 - 0.9 * (l0 - float(np.nanmin(ref.loss)))  # beyond the blow-up, reached at c
    assert fc.steps_to(target) is None and ref.steps_to(target) is not None
    iv = fc.steps_interval(target)
    lo, mid, hi = stabilized_quantiles(iv.drop)
    base = c * ref.steps_to(target)
    assert (iv.low, iv.median, iv.high) == (int(np.floor(base * np.exp(lo))),
                                            round(base * np.exp(mid)),
                                            int(np.ceil(base * np.exp(hi))))  # fmt: skip
    assert iv.point is None and iv.stabilized == c and not iv.trusted
    assert f"rerun at {c:g} x lr" in str(iv) and f"median estimate {iv.median}" in str(iv)
    # a target the forecast reaches before the blow-up keeps the ordinary interval
    early = fc.steps_interval(float(fc.loss[1]))
    assert early.stabilized is None and early.point == 1
    # no rerun: a schedule, a rate beyond the limit (not calibrated), a forecast that is fine
    sched = fcast(lr, 100, schedule=tl.Warmup(2))
    assert sched.diverges and sched.stabilized is None
    far = fcast(3 * lr, 100)
    assert far.stabilized is None and "beyond the stability limit" in far.method["stabilized"]
    assert far.steps_interval(target).low is None
    assert fcast(0.3 * lr, 100).stabilized is None


def test_compare_reports_whether_the_real_steps_fall_in_the_interval():
    net, _, fc, eps = _ce_forecast_and_target()
    l0 = float(fc.loss[0])
    iv = fc.steps_interval(eps)

    def run_reaching_at(t: int) -> dict:  # a made-up log crossing eps exactly at step t
        steps = np.arange(0, 201)
        return {"steps": steps, "loss": np.where(steps < t, l0, 0.9 * eps)}

    for t, inside in ((iv.low, True), (iv.high, True), (max(iv.low - 1, 1), iv.low <= 1),
                      (iv.high + 5, False)):  # fmt: skip
        cmp = tl.compare(fc, run_reaching_at(t), target_loss=eps, check_settings=False)
        assert cmp.steps_interval == (iv.low, iv.high)
        assert cmp.steps_in_interval is inside, t
        assert cmp.steps_median == iv.median
        assert cmp.steps_median_error == pytest.approx(abs(iv.median - t) / t)
    # the loss band: the share of the run's logged two-sided steps inside it
    band = fc.loss_interval()
    both = np.flatnonzero(band.two_sided())
    half = 0.5 * (band.low + band.high)
    run = {"steps": np.arange(0, 201, 2), "loss": np.where(np.arange(0, 201, 2) < 60, l0, 0.0)}
    run["loss"] = np.where(band.two_sided()[run["steps"]], half[run["steps"]], run["loss"])
    run["loss"][np.isin(run["steps"], both[:4])] = 10 * l0  # four steps above the band
    want = 1 - np.isin(run["steps"], both[:4]).sum() / band.two_sided()[run["steps"]].sum()
    cmp = tl.compare(fc, run, target_loss=eps, check_settings=False)
    assert 0 < cmp.loss_interval_coverage < 1
    assert cmp.loss_interval_coverage == pytest.approx(want)
    assert cmp.summary()["loss_interval_coverage"] == pytest.approx(want)
    plain = tl.forecast(tl.compute_kernel(net, _data(dim=4), progress=False), tl.SGD(0.3), 200)
    cmp = tl.compare(plain, run_reaching_at(5), target_loss=eps, check_settings=False)
    assert cmp.steps_interval is None and cmp.steps_in_interval is None
    assert cmp.loss_interval_coverage is None


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("batch", [None, 4])
def test_projected_block_keeps_features_only_and_forecasts_as_the_dense_one(batch):
    """NOTE [head-body features]: a projected read-out kernel is kept as Φ (Θ = Φ Φᵀ never
    formed); forecasting through Φ equals forecasting through the dense Θ."""
    import dataclasses

    net = TanhBody().double().eval()
    hb = compute_head_body_kernel(net, _data(dim=4), projection=16, progress=False)
    assert hb.block.theta is None and hb.block.features.shape[1] == 16
    theta = hb.block.features @ hb.block.features.T
    dense = dataclasses.replace(hb, block=dataclasses.replace(hb.block, theta=theta))
    opt = tl.SGD(0.2, momentum=0.5)
    a = tl.forecast(hb, opt, 30, loss="ce", batch_size=batch, seed=1)
    b = tl.forecast(dense, opt, 30, loss="ce", batch_size=batch, seed=1)
    assert "Feature" in type(hb.problem().block).__name__
    assert "Dense" in type(dense.problem().block).__name__
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-9)  # float64 model: Φ float64
    # float32 features (what compute_kernel projects by default): products in float32
    net32 = TanhBody().float().eval()
    x, y = _data(dim=4)
    hb32 = compute_head_body_kernel(net32, (x.float(), y), projection=16, progress=False)
    assert hb32.problem().block.features.dtype == np.float32
    theta = hb32.block.features.double() @ hb32.block.features.double().T
    dense32 = dataclasses.replace(hb32, block=dataclasses.replace(hb32.block, theta=theta))
    a = tl.forecast(hb32, opt, 30, loss="ce", batch_size=batch, seed=1)
    b = tl.forecast(dense32, opt, 30, loss="ce", batch_size=batch, seed=1)
    assert a.loss.dtype == np.float64
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)


def test_features_are_cached_checked_and_recomputed_when_stale(tmp_path, monkeypatch):
    """φ0 and J w0 come from one forward-mode pass, kept in ``features.safetensors``: a
    second call reads them (no pass), another model recomputes them, a damaged file is
    discarded with a CacheWarning."""
    from tangentlab.tangent import Tangent

    calls = []
    real = Tangent.f0_and_jvp
    monkeypatch.setattr(Tangent, "f0_and_jvp",
                        lambda self, x, v: calls.append(1) or real(self, x, v))  # fmt: skip
    net, data = TanhBody().double().eval(), _data(dim=4)
    plain = compute_head_body_kernel(net, data, progress=False)
    assert len(calls) == 1  # φ0 and J w0 together
    first = compute_head_body_kernel(net, data, cache=tmp_path, progress=False)
    again = compute_head_body_kernel(net, data, cache=tmp_path, progress=False)
    assert len(calls) == 2  # the second cached call read them
    # a cached kernel counts what it cost when computed (tangentlab validate's cost ratio)
    assert again.metadata["seconds"] >= float(again.block.metadata["seconds"]) > 0
    for hb in (first, again):
        torch.testing.assert_close(hb.features, plain.features, rtol=0, atol=0)
        torch.testing.assert_close(hb.body_jw0, plain.body_jw0, rtol=0, atol=0)
    other = tmp_path / "other"  # the read-out kernels' caches refuse another model
    other.mkdir()
    path = other / "features.safetensors"
    path.write_bytes((tmp_path / "features.safetensors").read_bytes())
    with torch.no_grad():
        net.body[0].weight.add_(0.1)  # another model: not the cached features
    moved = compute_head_body_kernel(net, data, cache=other, progress=False)
    assert len(calls) == 3 and not torch.allclose(moved.features, plain.features)
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00" * 8  # damage the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.warns(tl.CacheWarning, match="damaged cached features"):
        fixed = compute_head_body_kernel(net, data, cache=other, progress=False)
    assert len(calls) == 4
    torch.testing.assert_close(fixed.features, moved.features, rtol=0, atol=0)


def test_a_convolutional_body_is_recorded_and_widens_the_steps_interval():
    """NOTE [steps interval]: compute_head_body_kernel records whether a trained body weight
    belongs to a convolution; the forecast carries it and the interval uses its column (a
    body with only the head's input layer trained, or a linear body, has none)."""
    from conftest import make_cnn
    from tangentlab.forecast import steps_features, steps_quantiles

    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.double)
    data = (x, torch.randint(0, 3, (12,), generator=g))
    cnn = make_cnn()
    conv = compute_head_body_kernel(cnn, data, progress=False)
    assert conv.metadata["conv_body"] is True
    bn_only = compute_head_body_kernel(cnn, data, params=r"^(1|4)\.", progress=False)
    assert bn_only.metadata["conv_body"] is False  # BatchNorm and head: no convolution
    assert compute_head_body_kernel(TanhBody().double().eval(), _data(dim=4),
                                    progress=False).metadata["conv_body"] is False  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(conv, tl.SGD(0.05, momentum=0.9), 300, loss="ce")
    assert fc.method["conv_body"] is True
    target = 0.5 * float(fc.loss[0])
    t = fc.steps_to(target)
    assert t is not None
    iv = fc.steps_interval(target)
    hit = np.flatnonzero(fc.reference_loss <= target)
    rho = max(int(hit[0]) if hit.size else 2 * (fc.loss.shape[0] - 1), 1) / max(t, 1)
    stretch, rho50 = _curve_features_by_hand(fc.loss, fc.reference_loss)
    bands = {}
    for flag in (True, False):
        xf = steps_features(0.5, momentum=0.9, fraction=fc.stability / 2, rho=rho, steps=t,
                            stretch=stretch, rho50=rho50, conv=flag)  # fmt: skip
        assert xf.shape == (10,) and xf[-1] == float(flag)
        bands[flag] = steps_quantiles(xf)
    lo, mid, hi = bands[True]
    assert (iv.low, iv.median, iv.high) == (int(np.floor(t * np.exp(lo))), round(t * np.exp(mid)),
                                            int(np.ceil(t * np.exp(hi))))  # fmt: skip
    width = {k: v[2] - v[0] for k, v in bands.items()}
    assert width[True] > width[False]  # the convolutional bodies' band is the wider one
    # the loss band of a convolutional body reads the depths 30-95% (NOTE [loss interval])
    band = fc.loss_interval()
    assert band.drops == (0.3, 0.95) and band.low[0] == pytest.approx(0.7 * float(fc.loss[0]))
    shallow = fc.steps_interval(0.7 * float(fc.loss[0]))
    assert np.isnan(band.high[: shallow.high]).all() and band.high[shallow.high] <= 0.7 * float(
        fc.loss[0]) + 1e-12


def test_a_forecast_that_does_not_know_its_body_kind_gets_an_untrusted_interval():
    """A forecast saved before the body kind was recorded (no method["conv_body"]): its
    interval says so and is never trusted."""
    import dataclasses

    _, _, fc, target = _ce_forecast_and_target()
    old = dataclasses.replace(fc, method={k: v for k, v in fc.method.items()
                                          if k != "conv_body"})  # fmt: skip
    iv = old.steps_interval(target)
    assert "a body of unknown kind" in iv.note and not iv.trusted
    assert fc.method["conv_body"] is False and "unknown kind" not in fc.steps_interval(target).note


def test_an_interval_from_another_subspace_names_it_and_is_not_trusted():
    """The steps interval was calibrated on the default subspace (directions = C, probes =
    4); a head-body kernel with other ones gets the note, the default none (an explicit
    directions = C is the default)."""
    import dataclasses

    net, _, fc, target = _ce_forecast_and_target()
    assert fc.method["subspace"] == {"directions": None, "probes": 4, "classes": 3,
                                     "spans_features": True}  # d = 4: Q is all of R^4
    assert "subspace" not in fc.steps_interval(target).note
    for kw, named in ((dict(directions=3), None), (dict(directions=1), "directions=1, probes=4"),
                      (dict(probes=2), "directions=None, probes=2")):  # fmt: skip
        hb = compute_head_body_kernel(net, _data(dim=4), progress=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tl.errors.ValidityWarning)
            iv = tl.forecast(hb, tl.SGD(0.3), 200, loss="ce").steps_interval(target)
        if named is None:
            assert "head-body kernel with" not in iv.note
        else:
            assert f"a head-body kernel with {named}" in iv.note and not iv.trusted
            assert "calibrated with the defaults: directions = C = 3, probes = 4" in iv.note
    old = dataclasses.replace(fc, method={k: v for k, v in fc.method.items()
                                          if k != "subspace"})  # fmt: skip
    assert old.steps_interval(target) == fc.steps_interval(target)  # saved before: defaults


class WideBody(nn.Module):
    """φ = (A x + a) ⊙ s with d = 40 > N + C: Q spanning all of φ0 has r = N + C < d."""

    def __init__(self, anisotropic: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Linear(5, 40)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 40) if anisotropic
                             else torch.ones(40))  # fmt: skip
        self.fc = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x) * self.scale)


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("batch", [None, 4])
def test_a_subspace_spanning_the_features_runs_in_its_coordinates_and_stays_exact(
        batch, monkeypatch):  # fmt: skip
    """NOTE [head-body in span Q]: with Q spanning φ0 (directions >= N) the forecast runs in
    Q's r = N + C coordinates. An isotropic body (K = κ I) is then still exact against real
    runs; an anisotropic one gives the forecast of the d-dimensional state to round-off
    (decay toward 0 included: J w0 = φ0 here); decay toward 0 with J w0 outside Q, and a
    smaller Q, keep the d-dimensional state."""
    data = _data()
    net = WideBody(anisotropic=False).double().eval()
    hb = compute_head_body_kernel(net, data, directions=10, probes=2, progress=False)
    p = hb.problem()
    assert p.basis.shape == (40, 13) and p.in_basis() is not None
    assert p.in_basis().phi0.shape == (10, 13)
    every = compute_head_body_kernel(net, data, directions="all", probes=2, progress=False)
    assert every.metadata["directions"] == 10 and torch.equal(every.basis, hb.basis)
    with pytest.raises(tl.TangentlabError, match="directions must be an integer >= 0 or 'all'"):
        compute_head_body_kernel(net, data, directions="most", progress=False)
    opt = tl.SGD(0.05, momentum=0.9, weight_decay=0.1, decay_to="w0")
    fc = tl.forecast(hb, opt, 30, loss="ce", batch_size=batch, paths=1)
    run = tl.finetune(net, data, opt, 30, loss="ce", batch_size=batch, log_every=1,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss, run.loss, rtol=1e-10, atol=1e-12)

    wide = WideBody(anisotropic=True).double().eval()
    hb = compute_head_body_kernel(wide, data, directions=10, probes=2, projection=64,
                                  progress=False)  # fmt: skip
    p = hb.problem()
    assert p.in_basis(decay_to_zero=True) is not None  # a body linear in its weights: J w0 = φ0
    for o in (tl.SGD(0.05, momentum=0.9), tl.SGD(0.05, weight_decay=0.1)):
        fast = tl.forecast(hb, o, 30, loss="mse", batch_size=batch, paths=2, seed=3)
        with monkeypatch.context() as m:
            m.setattr(dyn.HeadBodyProblem, "in_basis", lambda self, **kw: None)
            slow = tl.forecast(hb, o, 30, loss="mse", batch_size=batch, paths=2, seed=3)
        np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-9)
        if batch is not None:
            np.testing.assert_allclose(fast.loss_paths, slow.loss_paths, rtol=1e-9)
    # a tanh body: J w0 = (1 - φ0²) ⊙ (A x + a) leaves span Q, so decay toward 0 adds it
    bent = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).double().eval()
    bent = compute_head_body_kernel(bent, data, directions=10, progress=False).problem()
    assert bent.in_basis().basis.shape == (13, 13) and bent.in_basis().rest is None
    assert bent.in_basis(decay_to_zero=True).basis.shape == (23, 13)  # + J w0's 10 rows


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("batch", [None, 4])
def test_the_head_exact_model_runs_in_the_span_of_q_features_and_head(batch, monkeypatch):
    """NOTE [head-body in span Q]: with the default Q (r = 2C, κ_⊥ kept) the state never
    leaves S = span(Q, φ0, W0) (+ J w0_body with decay toward 0), so the forecast runs in
    S's r' <= r + N + C coordinates; it equals the d-dimensional forecast to round-off for
    SGD, momentum, decay toward w0 and toward 0, MSE and CE, and with a held-out set (whose
    features join S)."""
    data = _data()  # N = 10, C = 3
    bent = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).double().eval()
    hb = compute_head_body_kernel(bent, data, projection=64, progress=False)  # r = 2C = 6
    p = hb.problem()
    assert p.basis.shape == (40, 6) and p.rest is not None and not p.spans_features
    red = p.in_basis()
    # Q = W0's rows + C principal directions of φ0: S = span(φ0, W0), r' = N + C = 13 < 40
    assert red.basis.shape == (13, 6) and red.rest is p.rest
    assert p.in_basis(decay_to_zero=True).basis.shape == (23, 6)  # + J w0's 10 rows
    opts = (tl.SGD(0.05, momentum=0.9), tl.SGD(0.1, weight_decay=0.1, decay_to="w0"),
            tl.SGD(0.1, momentum=0.5, weight_decay=0.2))  # decay toward 0 (the default)
    for opt in opts:
        for loss in ("mse", "ce"):
            fast = tl.forecast(hb, opt, 25, loss=loss, batch_size=batch, paths=2, seed=3)
            with monkeypatch.context() as m:
                m.setattr(dyn.HeadBodyProblem, "in_basis", lambda self, **kw: None)
                slow = tl.forecast(hb, opt, 25, loss=loss, batch_size=batch, paths=2, seed=3)
            np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-9)
            np.testing.assert_allclose(fast.accuracy, slow.accuracy, rtol=1e-12)
            if batch is not None:
                np.testing.assert_allclose(fast.loss_paths, slow.loss_paths, rtol=1e-9)
    # a held-out set adds its features to S; its curves stay those of the d-dim state
    hb = compute_head_body_kernel(bent, data, progress=False)  # exact (held-out curves)
    ev = tl.compute_head_body_cross_kernel(bent, _data(n=7, seed=1), hb, train_data=data)
    both = hb.problem().with_eval_in_basis(ev.problem())
    assert both is not None and both[0].basis.shape == (20, 6)  # + the 7 held-out rows
    opt = tl.SGD(0.1, momentum=0.5, weight_decay=0.2)
    fast = tl.forecast(hb, opt, 25, loss="ce", eval_data=ev, batch_size=batch, paths=2, seed=3)
    with monkeypatch.context() as m:
        m.setattr(dyn.HeadBodyProblem, "with_eval_in_basis", lambda self, ev, **kw: None)
        slow = tl.forecast(hb, opt, 25, loss="ce", eval_data=ev, batch_size=batch, paths=2,
                           seed=3)  # fmt: skip
    np.testing.assert_allclose(fast.eval_loss, slow.eval_loss, rtol=1e-9)
    np.testing.assert_allclose(fast.eval_accuracy, slow.eval_accuracy, rtol=1e-12)
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-9)
    # d <= r + N + C: nothing to gain, the d-dimensional state is kept
    few = compute_head_body_kernel(nn.Sequential(nn.Linear(5, 12), nn.Tanh(),
                                                 nn.Linear(12, 3)).double().eval(), data,
                                   progress=False).problem()  # fmt: skip
    assert few.in_basis() is None


@pytest.mark.parametrize("paths, b", [(1, 3), (4, 3)])  # 3 < 10 / 2 rows: gathered; 12: scattered
def test_the_paths_batch_columns_of_the_block_match_a_brute_force_sum(paths, b):
    """NOTE [head-body Gram]: Σ_j Θ[:, batch_pj] x_pj for every path p, through Φ and
    through Θ = Φ Φᵀ, gathered (few rows) or scattered (many), against the explicit sum
    over Θ's columns; a sample drawn twice in a batch counts twice."""
    rng = np.random.default_rng(0)
    n, c, k = 10, 2, 16
    phi = rng.standard_normal((n * c, k))
    theta = phi @ phi.T
    batches = rng.integers(0, n, size=(paths, b))
    batches[:, 1] = batches[:, 0]  # a repeated id
    x = rng.standard_normal((paths, b, c))
    want = np.zeros((paths, n * c))
    for q in range(paths):
        for j in range(b):
            i = batches[q, j]
            want[q] += theta[:, i * c:(i + 1) * c] @ x[q, j]
    for op in (dyn.FeatureKernelOperator(phi, c), dyn.DenseKernelOperator(theta, c)):
        np.testing.assert_allclose(dyn._cols_paths(op, batches, x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
@pytest.mark.parametrize("batch", [None, 4])
def test_a_long_forecast_multiplies_through_the_gram_matrix_of_the_features(batch, monkeypatch):
    """NOTE [head-body Gram]: a run of at least N r k / (4k - 2 N r) products (steps x
    paths) multiplies the projected block through Θ = Φ Φᵀ (formed once) instead of Φ (Φᵀ
    x); the same forecast through Φ agrees to float32 round-off, and a short forecast gives
    the same numbers before and after a long one has formed Θ (the choice depends on the
    run alone). Minibatch: three paths of 4 of 10 samples, scattered (3 x 4 >= 10 / 2)."""
    data = _data()  # N = 10, C = 3: r = 6, N r = 60 <= k = 64
    bent = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).double().eval()
    hb = compute_head_body_kernel(bent, data, projection=64, progress=False)
    op = hb.problem().block
    assert isinstance(op, dyn.FeatureKernelOperator) and op.features.shape == (60, 64)
    assert not op.gram_pays(28) and op.gram_pays(29)  # 60 * 64 / (256 - 120) = 28.2
    opt = tl.SGD(0.05, momentum=0.9)

    def fc(steps):
        return tl.forecast(hb, opt, steps, loss="ce", batch_size=batch, paths=3, seed=1)

    n_short, n_long = (20, 30) if batch is None else (9, 10)  # 3 paths: 27 and 30 products
    short = fc(n_short)
    assert "_gram" not in op.__dict__
    long = fc(n_long)
    phi = op.features.astype(np.float64)
    assert "_gram" in op.__dict__
    np.testing.assert_allclose(op.gram().theta, phi @ phi.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fc(n_short).loss, short.loss)  # not history-dependent
    with monkeypatch.context() as m:
        m.setattr(dyn.FeatureKernelOperator, "gram_pays", lambda self, products: False)
        through_phi = fc(n_long)
    np.testing.assert_allclose(long.loss, through_phi.loss, rtol=1e-5)
    if batch is not None:
        np.testing.assert_allclose(long.loss_paths, through_phi.loss_paths, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")
def test_a_convolutional_body_at_the_full_span_gets_the_full_span_calibration():
    """NOTE [full-span interval]: Q spanning all of φ0 (directions >= N) on a convolutional
    body reads the interval from STEPS_CALIBRATION_FULL, never trusted, without the
    other-subspace note at full batch; a minibatch forecast and a pilot get a note; a
    non-convolutional body at the full span keeps the default calibration and its note."""
    from conftest import make_cnn
    from tangentlab.forecast import STEPS_CALIBRATION_FULL, steps_features, steps_quantiles

    assert STEPS_CALIBRATION_FULL  # the calibration exists
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.double)
    data = (x, torch.randint(0, 3, (12,), generator=g))
    hb = compute_head_body_kernel(make_cnn(), data, directions=12, progress=False)
    opt = tl.SGD(tl.stable_lr(hb, fraction=0.3, momentum=0.9, loss="ce"), momentum=0.9)
    fc = tl.forecast(hb, opt, 300, loss="ce")
    assert fc.method["subspace"]["spans_features"] and fc.method["conv_body"]
    target = 0.5 * float(fc.loss[0])
    t = fc.steps_to(target)
    iv = fc.steps_interval(target)
    hit = np.flatnonzero(fc.reference_loss <= target)
    rho = max(int(hit[0]) if hit.size else 2 * (fc.loss.shape[0] - 1), 1) / max(t, 1)
    stretch, rho50 = _curve_features_by_hand(fc.loss, fc.reference_loss)
    xf = steps_features(0.5, momentum=0.9, fraction=fc.stability / 2, rho=rho, steps=t,
                        stretch=stretch, rho50=rho50, conv=True)  # fmt: skip
    lo, mid, hi = steps_quantiles(xf, full=True)
    assert (lo, mid, hi) != steps_quantiles(xf)
    assert (iv.low, iv.median, iv.high) == (int(np.floor(t * np.exp(lo))), round(t * np.exp(mid)),
                                            int(np.ceil(t * np.exp(hi))))  # fmt: skip
    assert iv.note == "" and not iv.trusted
    mini = tl.forecast(hb, opt, 300, loss="ce", batch_size=4, paths=2)
    assert "a minibatch forecast at the full span" in mini.steps_interval(target).note
    # with a pilot: STEPS_CALIBRATION_FULL_PILOT (round 9), the pilot's log(T / T̂) appended
    pilot = tl.Pilot(feature=0.1, loss="ce", steps=5, forecast_steps=5, lr=0.05, cost=60)
    ivp = fc.steps_interval(target, pilot=pilot)
    lo, mid, hi = steps_quantiles(xf, pilot=0.1, full=True)
    assert (lo, mid, hi) not in (steps_quantiles(xf, pilot=0.1), steps_quantiles(xf, full=True))
    assert (ivp.low, ivp.median, ivp.high) == (int(np.floor(t * np.exp(lo))),
                                               round(t * np.exp(mid)),
                                               int(np.ceil(t * np.exp(hi))))  # fmt: skip
    assert ivp.note == "" and not ivp.trusted and ivp.pilot == 0.1
    # a pilot beyond the full span's development pilots (PILOT_RANGE["full"]) is noted
    far = tl.Pilot(feature=0.79, loss="ce", steps=5, forecast_steps=5, lr=0.05, cost=60)
    assert "a pilot whose real run took 2.20x" in fc.steps_interval(target, pilot=far).note
    assert "a minibatch forecast at the full span" in mini.steps_interval(target,
                                                                          pilot=pilot).note
    # a pilot forecast on the default subspace does not condition a full-span forecast
    default = compute_head_body_kernel(make_cnn(), data, progress=False)
    other_pilot = tl.Pilot(feature=0.1, loss="ce", steps=5, forecast_steps=5, lr=0.05, cost=60,
                           forecast=tl.forecast(default, opt, 50, loss="ce"))  # fmt: skip
    with pytest.raises(tl.TangentlabError, match="pilot was forecast on the default subspace"):
        fc.steps_interval(target, pilot=other_pilot)
    tanh = compute_head_body_kernel(TanhBody().double().eval(), _data(dim=4), directions=10,
                                    progress=False)  # fmt: skip
    other = tl.forecast(tanh, tl.SGD(0.3), 200, loss="ce")
    assert other.method["subspace"]["spans_features"] and not other.method["conv_body"]
    assert "a head-body kernel with directions=10" in other.steps_interval(
        0.5 * float(other.loss[0])).note

"""compute_cross_kernel: Theta(X_eval, X) against brute-force autograd Jacobians."""

import pytest
import torch

import tangentlab as tl
from conftest import make_cnn, make_mlp
from tangentlab.errors import TangentlabError


def _brute_jacobian(model, x, names):
    """[B*C, P] per-sample Jacobians by plain autograd, one output at a time."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], [params[n] for n in names], retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _data(n, seed, shape=(4,), classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.double), torch.randint(
        0, classes, (n,), generator=g
    )


def test_exact_cross_kernel_equals_autograd_jacobians():
    model = make_mlp()
    train, ev = _data(7, 0), _data(5, 1)
    k = tl.compute_kernel(model, train, params=r"^2\.", progress=False)
    ck = tl.compute_cross_kernel(model, ev, k, train_data=train, batch_size=3)
    names = ["2.weight", "2.bias"]
    ref = _brute_jacobian(model, ev[0], names) @ _brute_jacobian(model, train[0], names).T
    assert ck.theta.shape == (15, 21)
    torch.testing.assert_close(ck.theta, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ck.f0, model(ev[0]).detach())
    assert ck.targets.tolist() == ev[1].tolist()
    # the cross kernel of the training set against itself is the kernel
    self_ck = tl.compute_cross_kernel(model, train, k, train_data=train)
    torch.testing.assert_close(self_ck.theta, k.theta, rtol=1e-10, atol=1e-12)


def test_exact_cross_kernel_in_strips(monkeypatch):
    """A tiny memory budget cuts the evaluation set into strips: same result."""
    model = make_cnn()
    train, ev = _data(3, 0, (1, 8, 8)), _data(3, 1, (1, 8, 8))
    k = tl.compute_kernel(model, train, progress=False)
    whole = tl.compute_cross_kernel(model, ev, k, train_data=train)
    strips = tl.compute_cross_kernel(model, ev, k, train_data=train, batch_size=2,
                                     memory_budget=1)  # fmt: skip
    torch.testing.assert_close(strips.theta, whole.theta)
    names = [n for n, _ in model.named_parameters()]
    ref = _brute_jacobian(model, ev[0], names) @ _brute_jacobian(model, train[0], names).T
    torch.testing.assert_close(whole.theta, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["tensor", "gaussian"])
def test_projected_cross_kernel_uses_the_kernels_projection(kind):
    model = make_mlp()
    train, ev = _data(7, 0), _data(4, 1)
    proj = tl.Projection(24, kind=kind, seed=3)
    k = tl.compute_kernel(model, train, projection=proj, progress=False)
    ck = tl.compute_cross_kernel(model, ev, k, train_data=train)  # projection from metadata
    t = tl.Tangent(model, projection=proj)
    r = t.projector.matrix(t.param_names)  # [P, k], materialized for this small model
    names = t.param_names
    phi_e = _brute_jacobian(model, ev[0], names) @ r
    phi = _brute_jacobian(model, train[0], names) @ r
    torch.testing.assert_close(ck.features, phi_e, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ck.theta, phi_e @ phi.T, rtol=1e-9, atol=1e-11)
    # no training data needed for a projected kernel (its features are kept)
    torch.testing.assert_close(tl.compute_cross_kernel(model, ev, k).theta, ck.theta)


def test_cross_kernel_refuses_what_does_not_match():
    model = make_mlp()
    train, ev = _data(7, 0), _data(4, 1)
    k = tl.compute_kernel(model, train, params=r"^2\.", progress=False)
    with pytest.raises(TangentlabError, match="pass train_data="):
        tl.compute_cross_kernel(model, ev, k)
    with pytest.raises(TangentlabError, match="trainable weights differ"):
        tl.compute_cross_kernel(model, ev, k, train_data=train, params=r"^0\.")
    other = make_mlp()
    with torch.no_grad():
        other[2].bias.add_(1.0)
    with pytest.raises(TangentlabError, match="weights"):
        tl.compute_cross_kernel(other, ev, k, train_data=train)
    with pytest.raises(TangentlabError, match="not the data the kernel"):
        tl.compute_cross_kernel(model, ev, k, train_data=_data(7, 5))
    kp = tl.compute_kernel(model, train, projection=16, progress=False)
    with pytest.raises(TangentlabError, match="projection"):
        tl.compute_cross_kernel(tl.Tangent(model, projection=tl.Projection(16, seed=9)), ev, kp)
    kt = tl.compute_kernel(model, train, trace=True, progress=False)
    with pytest.raises(TangentlabError, match="trace kernels"):
        tl.compute_cross_kernel(model, ev, kt, train_data=train)
    # a projected kernel without metadata: the features themselves are checked
    bare = tl.Kernel(f0=kp.f0, targets=kp.targets, features=kp.features)
    with pytest.raises(TangentlabError, match="differ from the kernel's features"):
        tl.compute_cross_kernel(tl.Tangent(model, projection=tl.Projection(16, seed=9)), ev,
                                bare, train_data=train)  # fmt: skip


class _Scaled(torch.nn.Module):
    """An MLP with an elementwise scale the gram path does not cover: its cross kernel is
    split (gram part + Jacobian part, NOTE [exact cross kernel paths])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin1, self.lin2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.scale = torch.nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x) * self.scale))


@pytest.mark.parametrize("case", ["gram", "split", "jacobians"])
def test_exact_cross_kernel_paths_agree_with_autograd(case, monkeypatch):
    """The gram path, the split path and the Jacobian path give the brute-force J_e J^T
    and J_e w0."""
    from tangentlab import cross

    calls = []
    for name in ("_gram_cross", "_exact_cross"):
        real = getattr(cross, name)
        monkeypatch.setattr(cross, name, lambda *a, _r=real, _n=name, **k: (
            calls.append((_n, a[0].num_params)), _r(*a, **k))[1])  # fmt: skip
    model = (_Scaled() if case == "split" else make_mlp()).double().eval()
    train, ev = _data(6, 0), _data(5, 1)
    names = [n for n, _ in model.named_parameters()]
    mode = "vmap" if case == "jacobians" else "auto"
    tangent = tl.Tangent(model, jacobian_mode=mode)
    if case != "jacobians":  # the path this case is meant to take
        covered = tangent.gram_covered(train[0][:1])
        assert (len(covered) == len(names)) == (case == "gram") and covered
    k = tl.compute_kernel(model, train, progress=False)
    ck = tl.compute_cross_kernel(tangent, ev, k, train_data=train, batch_size=2)
    je = _brute_jacobian(model, ev[0], names)
    ref = je @ _brute_jacobian(model, train[0], names).T
    torch.testing.assert_close(ck.theta, ref, rtol=1e-10, atol=1e-12)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(ck.jw0.reshape(-1), je @ w0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ck.f0, model(ev[0]).detach())
    p = tangent.num_params
    assert calls == {"gram": [("_gram_cross", p)], "jacobians": [("_exact_cross", p)],
                     "split": [("_gram_cross", p - 6), ("_exact_cross", 6)]}[case]  # fmt: skip

"""Exact Jacobians, JVP/VJP and kernels against a brute-force per-sample autograd loop."""

import warnings

import pytest
import torch
from torch import nn

import tangentlab as tl
from conftest import make_cnn, make_mlp, make_transformer
from tangentlab.errors import ModeSwitchWarning, TangentlabError, VmapFallbackWarning


def brute_force_jacobian(model, x, names=None):
    """[N, C, P] by one autograd.grad call per (sample, output)."""
    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
    rows = []
    for i in range(n):
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        out = model(**xi)[0] if isinstance(xi, dict) else model(xi)[0]
        per = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], [p for _, p in params], retain_graph=True)
            per.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


CASES = [
    ("mlp", make_mlp, "mlp_data"),
    ("cnn_bn", make_cnn, "cnn_data"),
    ("transformer", make_transformer, "text_data"),
]


@pytest.mark.parametrize("name,factory,data", CASES)
def test_exact_jacobian_and_kernel_equal_brute_force(name, factory, data, request):
    x, y = request.getfixturevalue(data)
    model = factory()
    t = tl.Tangent(model)
    jac = t.jacobian(x)
    ref = brute_force_jacobian(model, x)
    assert jac.shape == ref.shape
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)
    k = tl.compute_kernel(model, (x, y), progress=False)
    j2 = ref.reshape(-1, ref.shape[-1])
    torch.testing.assert_close(k.theta, j2 @ j2.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.f0, model(**x) if isinstance(x, dict) else model(x))
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(k.jw0, (ref @ w0))


def test_jvp_vjp_match_jacobian(mlp_data):
    x, _ = mlp_data
    t = tl.Tangent(make_mlp())
    jac = t.jacobian(x)  # [N, C, P]
    v = torch.randn(t.num_params, dtype=torch.double)
    u = torch.randn(x.shape[0], 3, dtype=torch.double)
    torch.testing.assert_close(t.jvp(x, v), jac @ v)
    torch.testing.assert_close(t.vjp(x, u), torch.einsum("ncp,nc->p", jac, u))


def test_jvp_falls_back_when_forward_ad_is_unsupported(text_data):
    x, _ = text_data
    model = make_transformer()
    t = tl.Tangent(model)
    v = torch.randn(t.num_params, dtype=torch.double)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = t.jvp(x, v)
    # nn.TransformerEncoderLayer's fused fast path has no forward-mode AD in eval mode: the
    # fallback is taken (else this test no longer exercises it and must pick another model)
    assert not t.use_forward_ad
    assert any(issubclass(w.category, VmapFallbackWarning) for w in rec)
    torch.testing.assert_close(out, brute_force_jacobian(model, x) @ v)


def test_params_selection_restricts_jacobian(cnn_data):
    x, _ = cnn_data
    model = make_cnn()
    t = tl.Tangent(model, params=r"^4\.")  # only the linear head
    assert t.param_names == ["4.weight", "4.bias"]
    ref = brute_force_jacobian(model, x, names={"4.weight", "4.bias"})
    torch.testing.assert_close(t.jacobian(x), ref)
    t2 = tl.Tangent(model, params=["4.weight", "4.bias"])
    assert t2.param_names == t.param_names


def test_params_selecting_nothing_is_an_error():
    with pytest.raises(TangentlabError, match="selects no parameter"):
        tl.Tangent(make_mlp(), params="^does_not_exist")


def test_batchnorm_in_training_mode_is_switched_with_a_warning(cnn_data):
    model = make_cnn().train()
    with pytest.warns(ModeSwitchWarning, match="eval mode"):
        t = tl.Tangent(model)
    assert not model.training and not model[1].training
    x, _ = cnn_data
    torch.testing.assert_close(t.f0(x), model(x))  # uses running statistics


class ItemModel(nn.Module):
    """A model vmap cannot trace (.item() on a batched tensor)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        scale = 1.0 + 0.0 * float(x.abs().max().item())
        return self.lin(x) * scale


def test_vmap_fallback_warns_and_matches(mlp_data):
    x, y = mlp_data
    model = ItemModel().eval()
    t = tl.Tangent(model)
    with pytest.warns(VmapFallbackWarning, match="per-sample autograd loop"):
        jac = t.jacobian(x)
    assert t.jacobian_mode == "loop-vjp"
    torch.testing.assert_close(jac, brute_force_jacobian(model, x))


def test_non_finite_outputs_are_an_error(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(TangentlabError, match="non-finite"):
        tl.compute_kernel(model, (x, y), progress=False)


def test_output_not_batch_by_classes_is_an_error(mlp_data):
    x, y = mlp_data
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).double()
    with pytest.raises(TangentlabError, match=r"shape \[batch, C\]"):
        tl.compute_kernel(model, (x, y), progress=False)


def test_model_must_be_a_module():
    with pytest.raises(TangentlabError, match="nn.Module"):
        tl.Tangent(lambda x: x)


@pytest.mark.parametrize("mode", ["structured", "vmap", "loop-jacrev", "loop-vjp"])
@pytest.mark.parametrize("name,factory,data", CASES)
def test_every_jacobian_mode_equals_brute_force(mode, name, factory, data, request):
    x, _ = request.getfixturevalue(data)
    model = factory()
    # the embedding and nn.MultiheadAttention are not covered by the structured mode
    covered = mode == "structured" and name == "transformer"
    params = r"^(head|enc\.(linear|norm))" if covered else None
    t = tl.Tangent(model, params=params, jacobian_mode=mode)
    ref = brute_force_jacobian(model, x, names=set(t.param_names))
    torch.testing.assert_close(t.jacobian(x), ref, rtol=1e-10, atol=1e-12)
    assert t.jacobian_mode == mode


def test_auto_mode_picks_a_strategy(cnn_data):
    t = tl.Tangent(make_cnn())
    assert t.jacobian_mode == "auto"
    t.jacobian(cnn_data[0])
    assert t.jacobian_mode in ("structured", "vmap", "loop-jacrev", "loop-vjp")
    assert t.mode_timings is not None and t.mode_timings > 0


def test_structured_mode_falls_back_when_it_does_not_cover_the_model(text_data):
    x, _ = text_data
    model = make_transformer()
    t = tl.Tangent(model, jacobian_mode="structured")  # the embedding is not covered
    with pytest.warns(VmapFallbackWarning, match="does not cover"):
        jac = t.jacobian(x)
    assert t.jacobian_mode == "vmap"
    torch.testing.assert_close(jac, brute_force_jacobian(model, x))


def test_auto_mode_keeps_the_sketch_path_its_memory_plan_assumed(mlp_data):
    """With a tensor sketch, compute_kernel plans chunks for the structured path (no
    [B, C, P] Jacobians); auto must then choose it rather than time vmap against it."""
    x, _ = mlp_data
    t = tl.Tangent(make_mlp(), projection=tl.Projection(16, kind="tensor"))
    assert t.materialized_params(x[:1]) < t.num_params  # the plan counts the sketch path
    assert t._choose_mode(x) == "structured"
    exact = tl.Tangent(make_mlp())  # no sketch: auto still times the strategies
    exact._choose_mode(x)
    assert exact.mode_timings is not None

"""The engine on the real pre-trained models (slow: loads EfficientNet-Lite0 and MiniLM)."""

import pytest
import torch

import tangentlab as tl
from tangentlab.examples import load_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0():
    return load_example("fashion-lite0", num_samples=4, image_size=32, seed=0)


@pytest.fixture(scope="module")
def minilm():
    return load_example("rt-minilm", num_samples=4, seq_len=16, seed=0)


def _rows(x, s):
    return {k: v[s] for k, v in x.items()} if isinstance(x, dict) else x[s]


@pytest.mark.parametrize("name", ["lite0", "minilm"])
def test_real_model_kernel_exact_and_projected(name, request):
    ex = request.getfixturevalue(name)
    exact = tl.compute_kernel(ex.model, ex.data, params=ex.default_params, progress=False)
    n, c = 4, ex.num_classes
    assert exact.theta.shape == (n * c, n * c)
    assert torch.isfinite(exact.theta).all()
    lam, _ = exact.eigh()
    assert float(lam.min()) >= 0 and float(lam.max()) > 0
    # f0 is the model's own output
    x, _ = ex.data
    with torch.no_grad():
        out = ex.model(**x) if isinstance(x, dict) else ex.model(x)
    out = getattr(out, "logits", out)
    torch.testing.assert_close(exact.f0, out, rtol=1e-4, atol=1e-5)
    proj = tl.compute_kernel(
        ex.model, ex.data, params=ex.default_params, projection=4096, progress=False
    )
    assert proj.features.shape == (n * c, 4096)
    err = float((proj.theta.double() - exact.theta.double()).norm() / exact.theta.double().norm())
    assert err < 0.3, err


@pytest.mark.parametrize("name", ["lite0", "minilm"])
def test_real_model_jacobian_modes_agree(name, request):
    ex = request.getfixturevalue(name)
    x = _rows(ex.data[0], slice(0, 2))
    ref = tl.Tangent(ex.model, params=ex.default_params, jacobian_mode="loop-vjp").jacobian(x)
    for mode in ("structured", "vmap"):
        t = tl.Tangent(ex.model, params=ex.default_params, jacobian_mode=mode)
        jac = t.jacobian(x)
        assert t.jacobian_mode == mode  # covered, no fallback
        rel = float((jac - ref).abs().max() / ref.abs().max())
        assert rel < 1e-4, (mode, rel)

"""A 1 x 1 convolution run as a matrix product (NOTE [pointwise convolution] in
structured.py: the capture and AffineBatchNorm), and projected kernels that skip J w0
(``Tangent.without_jw0``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangentlab as tl
from tangentlab import structured
from tangentlab.errors import CacheMismatchError
from tangentlab.structured import AffineBatchNorm
from test_depthwise_layout import _mbconv, _x
from test_tangent import brute_force_jacobian

_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _args(bias: bool = True, channels_last: bool = False, **kw):
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(3, 5, 4, 2, generator=gen, dtype=torch.float64)
    if channels_last:
        u = u.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 1, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64) if bias else None
    a = dict(zip(_NAMES, (u, w, b, 1, 0, 1, 1)))
    a.update(kw)
    return {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("padding", [0, (0, 0), "valid", "same"])
def test_pointwise_conv_equals_the_convolution_forward_and_backward(bias, channels_last,
                                                                    padding):
    a = _args(bias, channels_last, padding=padding)
    got = structured._pointwise_conv(tuple(a.values()), {})
    assert got is not None and got.is_contiguous() and got.shape == (3, 6, 4, 2)
    want = F.conv2d(*a.values())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = [v for v in a.values() if isinstance(v, torch.Tensor)]
    cot = torch.randn_like(want)
    for g, h in zip(torch.autograd.grad(got, inputs, cot), torch.autograd.grad(want, inputs, cot)):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    # keyword arguments, as F.conv2d takes them
    kw = structured._pointwise_conv((), {k: v for k, v in a.items() if k != "dilation"})
    torch.testing.assert_close(kw, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", [
    dict(weight=torch.randn(6, 5, 3, 3, dtype=torch.float64)),  # a 3 x 3 kernel
    dict(stride=2), dict(stride=(1, 2)), dict(padding=1), dict(padding=(0, 1)),
    dict(groups=5, weight=torch.randn(5, 1, 1, 1, dtype=torch.float64)),  # depthwise
    dict(input=torch.randn(5, 4, 2, dtype=torch.float64)),  # unbatched: left to torch
])  # fmt: skip
def test_pointwise_conv_leaves_every_other_convolution(change):
    a = _args(**change)
    assert structured._pointwise_conv(tuple(a.values()), {}) is None


def _top() -> nn.Module:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_affine_batch_norm_runs_a_pointwise_conv_as_a_product(monkeypatch):
    top, seen = _top(), []
    real = structured._pointwise_conv
    monkeypatch.setattr(structured, "_pointwise_conv",
                        lambda a, kw: seen.append(1) or real(a, kw))  # fmt: skip
    z = torch.randn(6, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    with AffineBatchNorm():
        got = top(z)
    assert seen == [1]
    want = top(z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = [z, *top.parameters()]
    for g, h in zip(torch.autograd.grad(got.square().sum(), weights),
                    torch.autograd.grad(want.square().sum(), weights)):  # fmt: skip
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_capture_takes_the_product_and_the_jacobian_equals_brute_force(monkeypatch):
    seen = []
    real = structured._pointwise_conv
    monkeypatch.setattr(structured, "_pointwise_conv",
                        lambda a, kw: seen.append(real(a, kw) is not None) or real(a, kw))
    model, x = _mbconv(), _x()
    t = tl.Tangent(model, jacobian_mode="structured")
    ref = brute_force_jacobian(model, x, names=set(t.param_names))
    torch.testing.assert_close(t.jacobian(x), ref, rtol=1e-10, atol=1e-12)
    assert t.jacobian_mode == "structured"
    assert seen.count(True) == 2  # the expansion and the projection, not the depthwise one


def test_projected_jacobian_is_the_same_with_convolutions(monkeypatch):
    model, x = _mbconv(), _x()
    proj = tl.Projection(32, kind="tensor", seed=0)
    now = tl.Tangent(model, projection=proj, jacobian_mode="structured").projected_jacobian(x)
    monkeypatch.setattr(structured, "_pointwise_conv", lambda a, kw: None)
    before = tl.Tangent(model, projection=proj,
                        jacobian_mode="structured").projected_jacobian(x)  # fmt: skip
    torch.testing.assert_close(now, before, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["structured", "loop-vjp"])
def test_without_jw0_leaves_features_and_f0_and_marks_jw0_nan(mode):
    model, x = _mbconv(), _x()
    t = tl.Tangent(model, projection=tl.Projection(32, kind="tensor", seed=0),
                   jacobian_mode=mode)  # fmt: skip
    phi, f0, jw0 = t.projected_chunk(x)
    skip = t.without_jw0()
    assert t.needs_jw0 and not skip.needs_jw0  # a copy; the original still computes it
    phi2, f02, jw02 = skip.projected_chunk(x)
    torch.testing.assert_close(phi2, phi, rtol=0, atol=0)
    torch.testing.assert_close(f02, f0, rtol=0, atol=0)
    assert torch.isfinite(jw0).all() and torch.isnan(jw02).all() and jw02.shape == jw0.shape


def test_kernel_without_jw0_and_its_cache(tmp_path):
    model, x = _mbconv(), _x(6)
    y = torch.zeros(6, dtype=torch.long)
    t = tl.Tangent(model, projection=tl.Projection(32, kind="tensor", seed=0),
                   jacobian_mode="structured")  # fmt: skip
    full = tl.compute_kernel(t, (x, y), cache=tmp_path / "with", progress=False)
    skip = tl.compute_kernel(t.without_jw0(), (x, y), progress=False)
    assert full.jw0 is not None and skip.jw0 is None
    assert skip.metadata["jw0"] == "not computed" and "jw0" not in full.metadata
    torch.testing.assert_close(skip.features, full.features, rtol=0, atol=0)
    # a cache with J w0 serves a request without it (the stored kernel, J w0 and all) ...
    again = tl.compute_kernel(t.without_jw0(), (x, y), cache=tmp_path / "with", progress=False)
    torch.testing.assert_close(again.features, full.features, rtol=0, atol=0)
    assert again.jw0 is not None
    # ... but a cache without it is refused to a request that needs it, saying why
    tl.compute_kernel(t.without_jw0(), (x, y), cache=tmp_path / "without", progress=False)
    with pytest.raises(CacheMismatchError, match="jw0: cached without J w0"):
        tl.compute_kernel(t, (x, y), cache=tmp_path / "without", progress=False)
    assert math.isnan(float(t.without_jw0().projected_chunk(x)[2][0, 0]))


def test_batch_norm_of_a_channels_last_map_on_its_rows():
    """structured._channels_last_affine: the same map and gradients as the NCHW form, in the
    input's layout; not taken for an NCHW map."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight, bias = (torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
                    for _ in range(2))  # fmt: skip
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    assert structured._channels_last_affine(x, weight, bias) is None
    with AffineBatchNorm():
        got = F.batch_norm(xcl, mean, var, weight, bias, False, 0.1, 1e-3)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    want = F.batch_norm(xcl, mean, var, weight, bias, False, 0.1, 1e-3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(want)
    for g, h in zip(torch.autograd.grad(got, [xcl, weight, bias], cot),
                    torch.autograd.grad(want, [xcl, weight, bias], cot)):  # fmt: skip
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)

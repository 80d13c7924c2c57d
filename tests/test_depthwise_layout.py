"""A depthwise convolution's back-propagated input in channels-last layout during the
structured capture (NOTE [depthwise channels-last] in structured.py): when it applies, and
the same Jacobians and projected Jacobians as without it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangentlab as tl
from tangentlab import structured
from test_tangent import brute_force_jacobian


def _mbconv(classes: int = 3) -> nn.Module:
    """An inverted-residual block (expand, depthwise with stride 2, project) and a head."""
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(2, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
        nn.ReLU6(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 3 * 3, classes),
    ).double()  # fmt: skip
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)  # fmt: skip


def _depthwise_args(requires_grad: bool = True, groups: int = 8, device: str = "cpu"):
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 8, 6, 6, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(8, 8 // groups, 3, 3, generator=gen, dtype=torch.float64).to(device)
    u.requires_grad_(requires_grad)
    return (u, w, None, 2, 1, 1, groups)


def test_depthwise_input_goes_channels_last_only_where_a_backward_runs_it():
    args, _ = structured._depthwise_channels_last(_depthwise_args(), {})
    assert args[0].is_contiguous(memory_format=torch.channels_last)
    assert not args[0].is_contiguous()  # really moved (C > 1, H W > 1)
    torch.testing.assert_close(args[0], _depthwise_args()[0], rtol=0, atol=0)
    # keyword input
    a = _depthwise_args()
    _, kw = structured._depthwise_channels_last((), dict(zip(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), a)))
    assert kw["input"].is_contiguous(memory_format=torch.channels_last)
    # untouched: an ordinary or grouped (not depthwise) convolution, an input that no
    # backward reaches, no grad mode
    for args in (_depthwise_args(groups=1), _depthwise_args(groups=4),
                 _depthwise_args(requires_grad=False)):  # fmt: skip
        got, _ = structured._depthwise_channels_last(args, {})
        assert got[0] is args[0]
    with torch.no_grad():
        args = _depthwise_args()
        assert structured._depthwise_channels_last(args, {})[0][0] is args[0]


def test_capture_runs_the_depthwise_convolution_channels_last(monkeypatch):
    seen = []
    real = structured._depthwise_channels_last

    def spy(args, kwargs):
        out = real(args, kwargs)
        u = out[0][0] if out[0] else out[1]["input"]
        moved = u is not (args[0] if args else kwargs["input"])
        seen.append(moved and u.is_contiguous(memory_format=torch.channels_last))
        return out

    monkeypatch.setattr(structured, "_depthwise_channels_last", spy)
    t = tl.Tangent(_mbconv(), jacobian_mode="structured")
    t.jacobian(_x())
    # the depthwise convolution's input is moved; the 1x1 ones' are left (the projection's
    # arrives channels-last from the depthwise convolution's batch norm and ReLU6)
    assert seen == [False, True, False]


@pytest.mark.parametrize("params", [None, r"^(3|4|6|8)\."])
def test_jacobian_with_the_layout_equals_brute_force(params):
    model, x = _mbconv(), _x()
    t = tl.Tangent(model, params=params, jacobian_mode="structured")
    ref = brute_force_jacobian(model, x, names=set(t.param_names))
    torch.testing.assert_close(t.jacobian(x), ref, rtol=1e-10, atol=1e-12)
    assert t.jacobian_mode == "structured"


def test_projected_jacobian_is_the_same_with_and_without_the_layout(monkeypatch):
    model, x = _mbconv(), _x()
    proj = tl.Projection(32, kind="tensor", seed=0)
    now = tl.Tangent(model, projection=proj, jacobian_mode="structured").projected_jacobian(x)
    monkeypatch.setattr(structured, "_depthwise_channels_last", lambda a, kw: (a, kw))
    before = tl.Tangent(model, projection=proj,
                        jacobian_mode="structured").projected_jacobian(x)  # fmt: skip
    torch.testing.assert_close(now, before, rtol=1e-12, atol=1e-14)
    assert now.shape == (5, 3, 32)


def test_forward_values_unchanged_under_the_layout():
    u, w, *_ = _depthwise_args()
    args, _ = structured._depthwise_channels_last((u, w, None, 2, 1, 1, 8), {})
    torch.testing.assert_close(F.conv2d(*args), F.conv2d(u, w, None, 2, 1, 1, 8),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_depthwise_sketch_equals_the_projected_brute_force_jacobian(monkeypatch):
    """NOTE [depthwise sketch]: J(x_i) R with the signed unfold (a 3 x 3 map; the tensor
    sketch's structured path) equals the brute-force Jacobian times the projection's
    matrix, and the generic per-sample path."""
    model, x, kind = _mbconv(), _x(), "tensor"
    t = tl.Tangent(model, projection=tl.Projection(32, kind=kind, seed=1),
                   jacobian_mode="structured")  # fmt: skip
    calls = []
    real = structured._depthwise_sketch_values
    monkeypatch.setattr(structured, "_depthwise_sketch_values",
                        lambda a, g: calls.append(1) or real(a, g))  # fmt: skip
    got = t.projected_jacobian(x)
    assert len(calls) == 3  # the depthwise weight, once per output
    r = t.projector.matrix(t.param_names, dtype=torch.float64)
    want = brute_force_jacobian(model, x, names=set(t.param_names)) @ r
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(structured, "DEPTHWISE_SKETCH_POSITIONS", 0)  # the generic path
    calls.clear()
    generic = tl.Tangent(model, projection=tl.Projection(32, kind=kind, seed=1),
                         jacobian_mode="structured").projected_jacobian(x)  # fmt: skip
    assert not calls
    torch.testing.assert_close(got, generic, rtol=1e-12, atol=1e-14)


def test_depthwise_sketch_is_not_taken_for_a_dense_projection_or_a_frozen_weight():
    u, w, *_ = _depthwise_args()
    a = dict(input=u, weight=w, stride=2, padding=1, groups=8)
    dense = tl.Tangent(_mbconv(), projection=tl.Projection(8, kind="gaussian"))
    assert structured._signed_depthwise_unfold("conv2d", a, {"weight": "3.weight"},
                                               dense.projector) is None  # fmt: skip
    sparse = tl.Tangent(_mbconv(), projection=tl.Projection(8, kind="sparse"))
    assert structured._signed_depthwise_unfold("conv2d", a, {}, sparse.projector) is None
    got = structured._signed_depthwise_unfold("conv2d", a, {"weight": "3.weight"},
                                              sparse.projector)  # fmt: skip
    assert got[0].shape == (2, 9, 8 * 9) and got[1].shape == (8 * 9,)

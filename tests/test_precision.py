"""float32 against float64: per-sample Jacobians, projected Jacobians and J w0.

NOTE [float32 and activation kinks] (tangentlab/structured.py): the structured path's
arithmetic agrees with float64 to ~1e-6; differences of ~1e-3 on single samples of
ReLU/ReLU6 networks are jumps of the Jacobian at activation kinks, which float32 and
float64 resolve differently. The tests on such networks therefore hold the activation
pattern fixed (:class:`SameKinks`) to measure the arithmetic alone.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import tangentlab as tl

BOUND = 1e-5  # relative (Frobenius) float32 vs float64; measured ~1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class SameKinks(TorchFunctionMode):
    """Records which ReLU/ReLU6 inputs are on the linear piece, or imposes recorded ones.

    ``SameKinks()`` records; ``SameKinks(recorder.masks)`` replays: each activation then
    takes the derivative of the recorded run (1 where recorded active, 0 elsewhere) and
    the value of its own input (equal up to round-off, activations being continuous).
    """

    def __init__(self, masks: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.replay = masks is not None
        self.masks = list(masks) if masks is not None else []
        self.calls = 0
        self.flips = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.relu:
            lo, hi = 0.0, float("inf")
        elif func is F.hardtanh:
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        else:
            return func(*args, **kwargs)
        x = args[0]
        active = (x > lo) & (x < hi)
        if not self.replay:
            self.masks.append(active.detach().clone())
            return func(*args, **kwargs)
        mask = self.masks[self.calls]
        self.calls += 1
        self.flips += int((mask != active).sum())
        return torch.where(mask, x, x.clamp(lo, hi).detach())


class ConvBNNet(nn.Module):
    """conv + BN + SiLU, depthwise conv + BN + SiLU, 1x1 conv + BN, pooling, linear head."""

    def __init__(self, act: type[nn.Module] = nn.SiLU, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), act(),
            nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12),
        )  # fmt: skip
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def make_pair(act=nn.SiLU):
    torch.manual_seed(3)
    m32 = ConvBNNet(act)
    for bn in m32.modules():
        if isinstance(bn, nn.BatchNorm2d):  # pre-trained-like statistics: offsets, small vars
            bn.running_mean.uniform_(-2.0, 2.0)
            bn.running_var.uniform_(1e-3, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-1.0, 1.0)
    m32.eval()
    return m32, copy.deepcopy(m32).double()


@pytest.fixture
def images():
    return torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(4))


def test_structured_jacobian_float32_within_bound_of_float64(images):
    m32, m64 = make_pair()
    t32 = tl.Tangent(m32, jacobian_mode="structured")
    t64 = tl.Tangent(m64, jacobian_mode="structured")
    j32, j64 = t32.jacobian(images), t64.jacobian(images.double())
    assert t32.jacobian_mode == "structured" and j32.dtype == torch.float32
    assert rel(j32, j64) < BOUND
    jw32 = t32.jw0(t32.jacobian_blocks(images))
    assert rel(jw32, t64.jw0(t64.jacobian_blocks(images.double()))) < BOUND


@pytest.mark.parametrize(
    "kind,params",
    [("tensor", None), ("sparse", None), ("tensor", r"weight$"), ("tensor", r"bias$")],
)
def test_structured_projection_and_jw0_float32_within_bound_of_float64(images, kind, params):
    """``params``: biases frozen (J w0 = <g, out - b>) or alone (J w0 = <g, b>)."""
    m32, m64 = make_pair()
    res = {}
    for dt, m in (("32", m32), ("64", m64)):
        t = tl.Tangent(
            m, params=params, projection=tl.Projection(64, kind), jacobian_mode="structured"
        )
        res[dt] = t.projected_chunk(images.to(next(m.parameters()).dtype))
        assert t.jacobian_mode == "structured"
    (phi32, f32, jw32), (phi64, f64, jw64) = res["32"], res["64"]
    assert rel(phi32, phi64) < BOUND
    assert rel(f32, f64) < BOUND
    assert rel(jw32, jw64) < BOUND


def test_relu_network_within_bound_with_the_same_activation_pattern(images):
    m32, m64 = make_pair(nn.ReLU6)
    t32 = tl.Tangent(m32, projection=64, jacobian_mode="structured")
    t64 = tl.Tangent(m64, projection=64, jacobian_mode="structured")
    rec = SameKinks()
    with rec:
        phi32, _, jw32 = t32.projected_chunk(images)
    assert rec.masks  # the activations were seen
    replay = SameKinks(rec.masks)
    with replay:
        phi64, _, jw64 = t64.projected_chunk(images.double())
    # the pattern was imposed on every activation, on the structured path of both
    assert replay.calls == len(rec.masks)
    assert t32.jacobian_mode == t64.jacobian_mode == "structured"
    assert rel(phi32, phi64) < BOUND
    assert rel(jw32, jw64) < BOUND


@pytest.mark.parametrize("mode", ["structured", "loop-vjp"])
def test_float32_jacobian_jumps_at_a_kink_in_every_mode(mode):
    """A pre-activation of 2**-30 in float64 is 0 in float32: ReLU's derivative jumps
    from 1 to 0 whatever the Jacobian strategy (NOTE [float32 and activation kinks])."""
    torch.manual_seed(0)
    m64 = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2)).double().eval()
    with torch.no_grad():
        m64[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        m64[0].bias.zero_()
    m32 = copy.deepcopy(m64).float()
    x64 = torch.tensor([[1.0 + 2.0**-30, 1.0]], dtype=torch.double)
    j64 = tl.Tangent(m64, params=r"^0\.", jacobian_mode=mode).jacobian(x64)
    t32 = tl.Tangent(m32, params=r"^0\.", jacobian_mode=mode)
    j32 = t32.jacobian(x64.float())
    assert t32.jacobian_mode == mode  # no fallback to another strategy
    assert float(j64.abs().sum()) > 0 and float(j32.abs().sum()) == 0.0


@pytest.mark.slow
def test_lite0_float32_structured_within_bound_of_float64():
    """EfficientNet-Lite0, every weight trainable, 4 samples at 64x64 (~80 s of CPU)."""
    from tangentlab.examples import load_example

    ex = load_example("fashion-lite0", num_samples=4)
    x32 = ex.data[0]
    m32 = ex.model.eval()
    m64 = copy.deepcopy(m32).double()
    t32 = tl.Tangent(m32, projection=1024, jacobian_mode="structured")
    t64 = tl.Tangent(m64, projection=1024, jacobian_mode="structured")
    rec = SameKinks()
    with rec:
        phi32, f32, jw32 = t32.projected_chunk(x32)
    replay = SameKinks(rec.masks)
    with replay:
        phi64, f64, jw64 = t64.projected_chunk(x32.double())
    assert t32.jacobian_mode == "structured" and replay.calls == len(rec.masks) > 0
    assert rel(f32, f64) < BOUND
    assert rel(phi32, phi64) < BOUND
    assert rel(jw32, jw64) < BOUND

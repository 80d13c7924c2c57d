"""Eval-mode batch norm as its affine map (structured._eval_batch_norm, AffineBatchNorm):
the same values and gradients as ``F.batch_norm``, checked against it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tangentlab.structured import AffineBatchNorm


def _bn(c: int, affine: bool = True) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(c, affine=affine).double()
    bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return bn.eval()


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4), (5, 3, 2, 3), (0, 3, 2, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_match_batch_norm(shape, affine):
    bn = nn.BatchNorm1d(shape[1], affine=affine) if len(shape) < 4 else nn.BatchNorm2d(shape[1],
                                                                                       affine=affine)
    ref = _bn(shape[1], affine)
    bn.load_state_dict(ref.state_dict())
    bn = bn.double().eval()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    wanted = [x, *bn.parameters()]
    y_ref = bn(x)
    d_ref = torch.autograd.grad(y_ref, wanted, g) if x.numel() else None
    with AffineBatchNorm():
        y = bn(x)
    assert y.shape == y_ref.shape
    if x.numel():  # the mode ran the affine map, not the batch norm
        assert "BatchNorm" in type(y_ref.grad_fn).__name__
        assert "BatchNorm" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if d_ref is not None:
        for a, b in zip(torch.autograd.grad(y, wanted, g), d_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_mode_and_other_calls_run_as_they_are():
    bn = _bn(3).train()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    mean = bn.running_mean.clone()
    with AffineBatchNorm():
        y = bn(x)
        z = F.relu(x)
    # training mode: batch statistics, and the running mean moves, exactly as without the mode
    ref = _bn(3).train()(x)
    torch.testing.assert_close(y, ref)
    assert not torch.equal(bn.running_mean, mean)
    torch.testing.assert_close(z, x.clamp_min(0))


def test_mode_under_torch_func_jvp_and_vjp():
    """The exact top's sharpness takes a JVP and a VJP through the top inside the mode."""
    from torch.func import functional_call, jvp, vjp

    net = nn.Sequential(nn.Conv2d(2, 4, 1), _bn(4).float(), nn.ReLU6(), nn.Flatten(),
                        nn.Linear(16, 3)).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(5, 2, 2, 2)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p, mode):
        if mode:
            with AffineBatchNorm():
                return functional_call(net, p, (x,))
        return functional_call(net, p, (x,))

    out = [jvp(lambda p, m=m: f(p, m), (params,), (tangent,)) for m in (False, True)]
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
    g = torch.randn(5, 3)
    back = [vjp(lambda p, m=m: f(p, m), params)[1](g)[0] for m in (False, True)]
    for k in params:
        torch.testing.assert_close(back[0][k], back[1][k], rtol=1e-5, atol=1e-6)

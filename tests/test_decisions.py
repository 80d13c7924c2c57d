"""The decisions the CLI delegates, as API functions: tl.stable_lr, tl.choose_projection,
tl.subsample, tl.default_target (tested in test_forecast)."""

from __future__ import annotations

import pytest
import torch

import tangentlab as tl
from conftest import make_mlp
from tangentlab.errors import TangentlabError


def _data(n=30, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def test_choose_projection_exact_when_it_fits_else_k():
    model, data = make_mlp(), _data()
    assert tl.choose_projection(model, data, num_classes=3) is None  # tiny: exact
    proj = tl.choose_projection(model, data, num_classes=3, memory_budget=1000, seed=3)
    assert isinstance(proj, tl.Projection) and proj.k == 4096 and proj.seed == 3


def test_subsample_is_seeded_ordered_and_checked():
    x, y = _data(n=50)
    (xs, ys), total = tl.subsample((x, y), 10, seed=1)
    (xs2, ys2), _ = tl.subsample((x, y), 10, seed=1)
    (xs3, _), _ = tl.subsample((x, y), 10, seed=2)
    assert total == 50 and xs.shape == (10, 4)
    torch.testing.assert_close(xs, xs2)
    assert not torch.equal(xs, xs3)
    rows = [int((x == r).all(1).nonzero()) for r in xs]
    assert rows == sorted(rows)  # original order kept
    assert torch.equal(y[rows], ys)
    with pytest.raises(TangentlabError, match="exceeds the 50 samples"):
        tl.subsample((x, y), 60)
    with pytest.raises(TangentlabError, match="n must be a positive integer"):
        tl.subsample((x, y), 0)


def test_stable_lr_refuses_a_zero_kernel_and_bad_fraction():
    k = tl.Kernel(f0=torch.zeros(4, 2, dtype=torch.double), targets=torch.tensor([0, 1, 0, 1]),
                  theta=torch.zeros(8, 8, dtype=torch.double))  # fmt: skip
    with pytest.raises(TangentlabError, match="kernel is zero"):
        tl.stable_lr(k)
    with pytest.raises(TangentlabError, match="fraction must lie in"):
        tl.stable_lr(k, fraction=1.5)

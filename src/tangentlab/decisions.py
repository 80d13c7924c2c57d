"""Decisions a user (or the CLI) delegates: a stable learning rate, a projection size, a
seeded subsample. The CLI calls exactly these; the default target is
:func:`tangentlab.forecast.default_target`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from tangentlab.data import as_arrays, num_rows, take
from tangentlab.errors import TangentlabError
from tangentlab.forecast import VALIDITY_STABILITY
from tangentlab.headbody import HeadBodyKernel
from tangentlab.kernel import Kernel
from tangentlab.memory import default_budget, parse_bytes
from tangentlab.projection import DEFAULT_KIND, Projection
from tangentlab.tangent import ParamSpec, select_params
from tangentlab.training import as_loss, is_int, is_real

DEFAULT_PROJECTION = 4096  # k when the exact Jacobians do not fit (see README, "Projections")


def stable_lr(kernel: Kernel, *, momentum: float = 0.0, weight_decay: float = 0.0,
              fraction: float = VALIDITY_STABILITY / 2.0, loss: str = "mse") -> float:  # fmt: skip
    r"""The learning rate at ``fraction`` of the stability limit of full-batch GD.

    .. math::
        \eta = \text{fraction} \cdot \frac{2 (1 - m)}{\lambda_{max}/N + \lambda_{wd}}

    The default, fraction = 1/2, puts η̃ λ_max/N at 1: the edge of the measured validity
    region (NOTE [validity region] in :mod:`tangentlab.forecast`). Rounded *down* to 3
    significant digits, so it never crosses that edge. Uses the cached eigendecomposition
    of the kernel (computed on first use).

    λ_max is the sharpness of the loss at the pre-trained weights in function space: of Θ
    for MSE, of H^{1/2} Θ H^{1/2} for cross-entropy (H_i = diag(p_i) − p_i p_iᵀ, the softmax
    Hessians at f0; a fresh head near zero gives p ≈ 1/C and H ≈ (I − 11ᵀ/C)/C, so CE's
    limit is up to about C times MSE's). Give the loss the run will use.

    Args:
      kernel: the kernel (or a :class:`~tangentlab.headbody.HeadBodyKernel`: λ_max of its
        logit kernel at w0, the tangent NTK).
      momentum: m of the optimizer it is for (η̃ = η/(1 - m)).
      weight_decay: λ_wd of the optimizer it is for.
      fraction: in (0, 1]; 1 is the stability limit itself.
      loss: ``"mse"`` or ``"ce"`` (also a ``tl.MSE`` / ``tl.CrossEntropy`` object): whose
        sharpness sets the limit.

    Returns:
      η, e.g. for ``tl.SGD(tl.stable_lr(kernel, momentum=0.9), momentum=0.9)``.
    """
    fn = "stable_lr"
    if not isinstance(kernel, (Kernel, HeadBodyKernel)):
        raise TangentlabError(
            f"{fn}: kernel must be a tangentlab.Kernel or HeadBodyKernel, got {type(kernel)}."
        )
    if not is_real(momentum) or not 0 <= momentum < 1:
        raise TangentlabError(f"{fn}: momentum must lie in [0, 1), got {momentum!r}.")
    if not is_real(weight_decay) or weight_decay < 0:
        raise TangentlabError(f"{fn}: weight_decay must be >= 0, got {weight_decay!r}.")
    if not is_real(fraction) or not 0 < fraction <= 1:
        raise TangentlabError(f"{fn}: fraction must lie in (0, 1], got {fraction!r}.")
    loss_name = as_loss(loss, fn).name
    if isinstance(kernel, HeadBodyKernel):  # the tangent NTK at w0 (the model's start)
        lam_max = kernel.top_eigenvalue(loss_name)
    elif loss_name == "mse":
        lam_max = float(kernel.eigh()[0].max())
    else:
        from tangentlab.forecast import _Prepared

        prep = _Prepared(kernel)
        lam_max = prep.top_eigenvalue(loss_name, prep.choose_execution("auto", 1, 100))
    curvature = lam_max / kernel.num_samples + float(weight_decay)
    if curvature <= 0:
        raise TangentlabError(
            f"{fn}: the kernel is zero (λ_max = 0): the trainable weights do not move the "
            "outputs, so no learning rate trains them. Check the params selection."
        )
    lr = fraction * 2.0 * (1.0 - momentum) / curvature
    digits = 2 - math.floor(math.log10(lr))
    lr = math.floor(lr * 10**digits) / 10**digits  # 3 digits, rounded down
    return float(f"{lr:.3g}")  # drops float noise


def choose_projection(
    model: nn.Module,
    data: Any,
    *,
    params: ParamSpec = None,
    num_classes: int | None = None,
    trace: bool | int = False,
    memory_budget: int | float | str | None = None,
    device: str | torch.device | None = None,
    kind: str = DEFAULT_KIND.value,
    seed: int = 0,
) -> Projection | None:
    """``None`` (exact kernel) when every Jacobian fits in half the memory budget, else a
    :class:`Projection` of k = 4096.

    Exact needs N · C' · P · 4 bytes of Jacobians (twice, to work) plus an N² trace kernel,
    with C' = C outputs (or S probes of a trace kernel).
    """
    names = select_params(model, params)
    named = dict(model.named_parameters())
    p = sum(named[n].numel() for n in names)
    n = num_rows(as_arrays(data, where="choose_projection")[0])
    c = num_classes or 10
    dev = torch.device(device or "cpu")
    budget = parse_bytes(memory_budget) or default_budget(dev)
    outs = c if isinstance(trace, bool) else min(int(trace), c)
    kernel_bytes = (n * n * 4) if trace is not False else 0
    if n * outs * p * 4 * 2 + kernel_bytes <= budget:
        return None
    return Projection(DEFAULT_PROJECTION, kind=kind, seed=seed)


def subsample(data: Any, n: int, *, seed: int = 0, verbose: bool = False) -> tuple[Any, int]:
    """A seeded random subset of ``n`` of the N samples, in their original order.

    Returns ``((X_n, y_n), N)``: the subset and the full size, for
    ``tl.forecast(kernel_of_subset, ..., dataset_size=N)``. The same seed gives the same
    subset (``torch.randperm`` with a seeded generator).
    """
    fn = "subsample"
    if not is_int(n) or n < 1:
        raise TangentlabError(f"{fn}: n must be a positive integer, got {n!r}.")
    x, y = as_arrays(data, where=fn)
    total = num_rows(x)
    if n > total:
        raise TangentlabError(
            f"{fn}: n = {n} exceeds the {total} samples given; the subsample must be drawn "
            "from the N samples the forecast is for (give more samples or a smaller n)."
        )
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if verbose:
        print(f"tangentlab: kernel on a random subset of {n} of the {total} samples",
              file=sys.stderr)  # fmt: skip
    return (take(x, idx), y[idx]), total

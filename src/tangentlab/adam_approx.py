"""AdamW approximations that scale like a kernel: a frozen factored preconditioner and the
SignGD kernels (issue 10, candidates 3 and 4; candidates 1 and 2 are in :mod:`tangentlab.adam`).

NOTE [frozen factored preconditioner] (candidate 3).
Estimate Adam's second moment at w0 from the first ``warm_steps`` minibatch gradients g_k
of the loss (the bias-corrected EMA AdamW itself would hold after those steps,
``v̂ = Σ_k β2^{K-k} (1-β2) g_k² / (1-β2^K)``), factor each matrix-shaped tensor as in
Adafactor (Shazeer & Stern, 2018, https://arxiv.org/abs/1804.04235), with the tensor viewed
as ``[shape[0], rest]`` (a conv weight as ``[out, in·kh·kw]``): row sums r, column sums c,
``V̂ = r cᵀ / Σr`` (vectors and scalars keep their diagonal v̂), and freeze
``P = 1 / (sqrt(V̂) + ε)``. With P frozen, AdamW on the tangent model is preconditioned SGD:
the bias-corrected first moment ``m̂_k = m_k / (1-β1^k)`` with ``m_k = β1 m_{k-1} + (1-β1)
g_k`` equals ``(1-β1)/(1-β1^k) · buf_k`` with torch's heavy-ball buffer
``buf_k = β1 buf_{k-1} + g_k`` (dampening 0). So AdamW with a frozen P is exactly
``torch.optim.SGD(lr, momentum=β1)`` with the per-step rate multiplier
``m(t)·(1-β1)/(1-β1^{t+1})`` (:class:`AdamBiasCorrection`, :func:`adam_as_sgd`) in the
coordinates ``w = D ⊙ u``, ``D = sqrt(P)``, whose tangent kernel is the preconditioned
kernel ``Θ_P = J P Jᵀ``. :func:`compute_factored_kernel` computes Θ_P with the unchanged
:func:`tangentlab.compute_kernel` of the reparametrized model (exact or projected), so
``tl.forecast(kernel_p, tl.adam_as_sgd(adamw), steps, ...)`` runs every existing SGD
solver on it. For a factored tensor, sqrt(V̂) = ρ κᵀ is rank one, so D is rank one up to ε
(D = (ρ κᵀ + ε)^{-1/2}), and a linear layer's per-sample gradient in u (D ⊙ gradient in w)
stays rank one when ε ≪ ρ κᵀ; the reparametrized call is not seen by the structured and
gram paths of compute_kernel (the weights reach ``F.linear`` through a product), which
therefore take the vmap Jacobians.

Decoupled weight decay. AdamW decays ``w ← w (1 - η_t λ)`` outside the moments. Here the
decay is torch SGD's coupled decay of u toward the u of w = 0 (``decay_to="zero"`` with the
kernel's ``jw0 = J w0``), which in w reads ``B_k = β1 B_{k-1} + P g_k + λ w_k``,
``w ← w - η_t (1-β1)/(1-β1^k) B_k``: the decay is not preconditioned (as in AdamW) but it
passes through the first moment, i.e. ``λ w_t`` is replaced by its bias-corrected EMA over
the last ~1/(1-β1) steps. The per-step difference from AdamW's decay is at most
``η_t λ · β1/(1-β1) · max_j ‖w_t - w_{t-j}‖/j`` (10 η_t λ times a step for β1 = 0.9):
for the usual recipe (λ = 0.01, η ≤ 1e-3) below 1e-4 of a step.

What it ignores: v changes as training proceeds (here it stays at its early value), and the
factoring keeps only the row x column structure of v̂ (exact when v̂ is rank one).
Exact (tests/test_adam_approx.py): the forecast equals a torch loop of Adam with the same
frozen P on a model linear in its weights, to round-off.

NOTE [sign kernels] (candidate 4).
Early in training with ε small, Adam's step is the sign of the gradient: the first AdamW
step is exactly ``η g/(|g| + ε)`` and β1 = β2 = 0, ε = 0 is SignGD. Malladi et al., 2023,
"A Kernel-Based View of Language Model Fine-Tuning", https://arxiv.org/abs/2210.05643,
describe this regime by the asymmetric SignGD kernel
``K^(A-SignGD)(x, x') = ⟨∇f(x), sign(∇f(x'))⟩``: on one sample with one output, a SignGD
step moves f by ``-η sign(δ) K^(A-SignGD)(·, x_i)``. With C outputs,
``K_A[(i,a), (j,b)] = ⟨∇f_a(x_i), sign(∇f_b(x_j))⟩ = (J sign(J)ᵀ)`` ``[N·C, N·C]``, and
the kernel dynamics

    f ← f - η_t λ (f - a) - (η_t / |b|) Σ_{j∈b} Σ_c K_A[:, (j,c)] sign(δ_jc)

are exact for *sample-wise* SignGD of the tangent model,
``w ← w (1-η_t λ) - (η_t/|b|) Σ_{j∈b} Σ_c sign(δ_jc) sign(∇f_c(x_j))``, which is SignGD
(``w ← w (1-η_t λ) - η_t sign(g)``, the sign of the batch gradient) when |b| = 1 and the
C outputs' gradients have disjoint supports (a linear head; always for C = 1). For a batch,
the kernel form averages the signs of the per-sample gradients where SignGD takes the sign
of their average: an approximation. :func:`forecast_signgd` runs both: the kernel form from
a :class:`SignKernel` (``[N·C, N·C]``, scales like a kernel) and exact SignGD of the tangent
model in weight space from a :class:`~tangentlab.adam.WeightSpaceTangent` (N·C·P memory).
Both ignore β1, β2 and ε (the early-time limit): later in training Adam's
``|m̂/sqrt(v̂)|`` falls below 1 where gradients are noisy, and SignGD overestimates its speed.
Two limits of the kernel form, measured (benchmarks/adamw.py, RESULTS.md "AdamW"): the
average of per-sample signs is much smaller than the sign of the average (a batch of B
samples with mixed labels mostly cancels), so it trains several times slower than SignGD;
and with C > 1 outputs sharing weights, ``-Σ_c sign(δ_jc) sign(∇f_c(x_j))`` weighs every
output alike whatever |δ_jc| and is not a descent direction of sample j's loss (the loss of
a 10-class CE head over a shared body rises). Weight-space SignGD has neither problem.

Conventions as everywhere (DESIGN.md §2): losses averaged over the batch, time in optimizer
steps, eval mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab.adam import WeightSpaceTangent
from tangentlab.compute import compute_kernel
from tangentlab.data import as_arrays, check_labels, num_rows, take
from tangentlab.errors import TangentlabError
from tangentlab.forecast import BLOWUP_FACTOR, Forecast
from tangentlab.kernel import Kernel
from tangentlab.schedules import _CLASSES as _SCHEDULE_CLASSES
from tangentlab.schedules import Schedule, as_schedule
from tangentlab.tangent import ParamSpec, Tangent
from tangentlab.training import (
    SGD,
    AdamW,
    as_loss,
    check_batch_size,
    check_fraction_pair,
    check_seed,
    check_steps,
    is_int,
)

_SIGN_CHUNK_BYTES = 256 << 20  # sign(J) working memory of compute_sign_kernel


# ---------------------------------------------------------------------------------------
# Candidate 3: a frozen (factored) preconditioner; AdamW as preconditioned SGD.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamBiasCorrection(Schedule):
    r"""Adam's first-moment bias correction as an SGD rate multiplier (NOTE [frozen factored
    preconditioner]).

    .. math::
        m(t) = m_{\mathrm{base}}(t)\,\frac{1 - \beta_1}{1 - \beta_1^{t+1}}

    so that ``torch.optim.SGD(lr, momentum=β1, dampening=0)`` under this schedule takes the
    steps of Adam's bias-corrected first moment (``m̂_k = (1-β1)/(1-β1^k) buf_k``). Every
    multiplier lies in [0, 1] (1 at t = 0).

    Args:
      base: the AdamW schedule m_base(t) (e.g. ``tl.Constant()``).
      beta1: Adam's β1 in [0, 1).
    """

    base: Schedule
    beta1: float
    name: ClassVar[str] = "adam-bias-correction"

    def __post_init__(self) -> None:
        if not isinstance(self.base, Schedule | dict):
            raise TangentlabError(
                f"AdamBiasCorrection: base must be a schedule such as tl.Constant(), got "
                f"{self.base!r}."
            )
        object.__setattr__(self, "base", as_schedule(self.base, "AdamBiasCorrection"))
        b1 = self.beta1
        if isinstance(b1, bool) or not isinstance(b1, int | float) or not 0.0 <= b1 < 1.0:
            raise TangentlabError(
                f"AdamBiasCorrection: beta1 must lie in [0, 1), got {b1!r}; e.g. beta1=0.9."
            )
        object.__setattr__(self, "beta1", float(b1))

    def multiplier(self, t: int) -> float:
        b1 = self.beta1
        return self.base.multiplier(t) * (1.0 - b1) / (1.0 - b1 ** (t + 1))

    @property
    def final(self) -> float:
        return self.base.final * (1.0 - self.beta1)

    def effective_peak(self, steps: int, momentum: float) -> float:
        """Adam's step is η m_base(t) times a weighted average of gradients (weights summing
        to 1): its stationary rate is η m_base(t), whatever β1 (the buffer's 1/(1-β1) and
        this schedule's (1-β1)/(1-β1^{t+1}) cancel in the steady state)."""
        return self.base.peak(steps)

    @property
    def rest_step(self) -> int | None:
        return self.base.rest_step

    def describe(self) -> str:
        return f"AdamBiasCorrection({self.base.describe()}, beta1={self.beta1:g})"


# to_dict() / schedules.from_dict() round trip (the base, a nested dict, is read back by
# as_schedule in __post_init__)
_SCHEDULE_CLASSES[AdamBiasCorrection.name] = AdamBiasCorrection


def adam_as_sgd(optimizer: AdamW) -> SGD:
    r"""The SGD that runs AdamW with a frozen preconditioner on the preconditioned kernel.

    .. math::
        \mathrm{SGD}\Big(\eta,\ m=\beta_1,\ \lambda,\ \text{decay\_to}=0,\
        \eta_t = \eta\, m(t)\,\frac{1-\beta_1}{1-\beta_1^{t+1}}\Big)

    Forecast it from :func:`compute_factored_kernel` (whose ``jw0 = J w0`` anchors the decay
    at w = 0): exact for Adam with the frozen P and the decay folded into the first moment
    (NOTE [frozen factored preconditioner]: how that differs from AdamW's decoupled decay).
    β2 and ε live in the kernel (P), not here.

    Args:
      optimizer: a ``tl.AdamW`` (lr, betas, weight_decay and schedule are read).

    Returns:
      ``tl.SGD(lr, momentum=β1, weight_decay=λ, schedule=AdamBiasCorrection(schedule, β1))``.

    Example::

        >>> kp = tl.compute_factored_kernel(model, (X, y), opt, loss="ce", batch_size=16)
        >>> fc = tl.forecast(kp, tl.adam_as_sgd(opt), 300, loss="ce", batch_size=16)
    """
    if not isinstance(optimizer, AdamW):
        raise TangentlabError(
            f"adam_as_sgd: optimizer must be a tl.AdamW, got {type(optimizer).__name__}; e.g. "
            "tl.adam_as_sgd(tl.AdamW(1e-4, weight_decay=0.01))."
        )
    b1 = optimizer.betas[0]
    return SGD(optimizer.lr, momentum=b1, weight_decay=optimizer.weight_decay,
               decay_to="zero", schedule=AdamBiasCorrection(optimizer.schedule, b1))  # fmt: skip


@dataclass(eq=False)
class Preconditioner:
    """A frozen Adam preconditioner per trainable tensor (NOTE [frozen factored
    preconditioner]).

    Attributes:
      second_moment: v̂ per tensor name (float64, the tensor's shape): factored
        ``r cᵀ / Σr`` for matrix-shaped tensors when ``factored``, else the diagonal estimate.
      eps: Adam's ε.
      factored: whether matrix-shaped tensors were factored.
      metadata: how it was estimated (warm steps, batch size, loss, seconds).
    """

    second_moment: dict[str, torch.Tensor]
    eps: float
    factored: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.second_moment)

    def precondition(self) -> dict[str, torch.Tensor]:
        """``P = 1 / (sqrt(v̂) + ε)`` per tensor (float64)."""
        return {n: 1.0 / (v.sqrt() + self.eps) for n, v in self.second_moment.items()}

    def scales(self) -> dict[str, torch.Tensor]:
        """``D = sqrt(P)`` per tensor (float64): the reparametrization ``w = D ⊙ u``."""
        return {n: p.sqrt() for n, p in self.precondition().items()}


def factor_second_moment(v: torch.Tensor) -> torch.Tensor:
    r"""Adafactor's rank-one estimate of a nonnegative second moment ``v``.

    .. math::
        \hat V = \frac{r\, c^\top}{\sum_i r_i},\quad r = V \mathbf{1},\ c = V^\top \mathbf{1}

    with ``V = v.reshape(shape[0], -1)`` (a conv weight ``[out, in, kh, kw]`` as
    ``[out, in·kh·kw]``); tensors with fewer than 2 dimensions are returned as they are.
    Exact when V is rank one; row and column sums are preserved.
    """
    if v.ndim < 2:
        return v.clone()
    mat = v.reshape(v.shape[0], -1)
    r, c = mat.sum(1), mat.sum(0)
    total = r.sum()
    if float(total) <= 0.0:  # no gradient at all in this tensor: nothing to factor
        return torch.zeros_like(v)
    return (torch.outer(r, c) / total).reshape(v.shape)


def _check_model(fn: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TangentlabError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}.")


def _check_adamw(fn: str, optimizer: Any) -> AdamW:
    if not isinstance(optimizer, AdamW):
        raise TangentlabError(
            f"{fn}: optimizer must be a tl.AdamW (its betas and eps define the preconditioner), "
            f"got {type(optimizer).__name__}; e.g. tl.AdamW(1e-4, weight_decay=0.01)."
        )
    return optimizer


def estimate_preconditioner(
    model: nn.Module,
    data: Any,
    optimizer: AdamW,
    *,
    loss: Any,
    params: ParamSpec = None,
    batch_size: int | None = None,
    warm_steps: int | None = None,
    factored: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Preconditioner:
    r"""Adam's second moment at w0 from the first minibatch gradients, optionally factored.

    .. math::
        \hat v = \frac{\sum_{k=1}^{K} \beta_2^{K-k} (1-\beta_2)\, g_k^2}{1 - \beta_2^K},
        \qquad g_k = \nabla_w \frac{1}{|b_k|}\sum_{i\in b_k} \ell(f(x_i; w_0), y_i)

    (AdamW's bias-corrected v̂ after K steps, all gradients taken at w0), then
    :func:`factor_second_moment` per matrix-shaped tensor when ``factored`` (NOTE [frozen
    factored preconditioner]).

    Args:
      model, data, params, device: as for :func:`tangentlab.compute_block_kernel`.
      optimizer: the ``tl.AdamW`` to be forecast (β2 and ε are read).
      loss: the training loss, ``"ce"``/``tl.CrossEntropy()`` or ``"mse"``/``tl.MSE(...)``
        (required: v̂ scales with it).
      batch_size: the training batch size B (``None``: full batch); the noise of small
        batches raises v̂ (E g² = ḡ² + σ²/B), so give the one you train with.
      warm_steps: K, the number of first batches (default: one epoch, ceil(N/B)). They are
        the forecast's and the real run's first batches: ``dynamics.batch_schedule(N, B, K,
        sampling="epoch", rng=dynamics.path_rngs(seed, 1)[0])``.
      factored: factor matrix-shaped tensors (``False``: the diagonal v̂, frozen Adam).
      seed: seed of the batch order.

    Returns:
      :class:`Preconditioner`. Cost: K forward and backward passes of B samples.
    """
    fn = "estimate_preconditioner"
    t0 = time.perf_counter()
    _check_model(fn, model)
    opt = _check_adamw(fn, optimizer)
    lossf = as_loss(loss, fn)
    bs = check_batch_size(fn, batch_size)
    seed = check_seed(fn, seed)
    if warm_steps is not None and (not is_int(warm_steps) or warm_steps < 1):
        raise TangentlabError(
            f"{fn}: warm_steps must be an integer >= 1 (or None: one epoch), got {warm_steps!r}."
        )
    if not isinstance(factored, bool):
        raise TangentlabError(f"{fn}: factored must be True or False, got {factored!r}.")
    x, y = as_arrays(data, where=fn)
    tangent = Tangent(model, params=params)
    if device is not None:
        tangent.to(device)
    n = num_rows(x)
    b = n if bs is None or bs >= n else bs
    k = math.ceil(n / b) if warm_steps is None else int(warm_steps)
    batches = dyn.batch_schedule(n, b, k, sampling="epoch", rng=dyn.path_rngs(seed, 1)[0])
    c = int(tangent.f0(take(x, slice(0, 1))).shape[1])
    check_labels(y, c, where=fn)
    labels = y.detach().cpu().numpy().astype(np.int64)
    b2 = opt.betas[1]
    acc = torch.zeros(tangent.num_params, dtype=torch.float64)
    for step, idx in enumerate(batches):
        xb = take(x, torch.as_tensor(idx))
        f = tangent.f0(xb).detach().double().cpu().numpy()
        delta = dyn.loss_grad(f, labels[idx], loss=lossf.name, scale=lossf.target_scale)
        u = torch.as_tensor(delta / len(idx), dtype=tangent.dtype)
        g = tangent.vjp(xb, u.to(tangent.device)).double().cpu()
        acc += (1.0 - b2) * b2 ** (k - 1 - step) * g * g
    v = acc / (1.0 - b2**k) if b2 < 1.0 else acc
    moments, offset = {}, 0
    for name in tangent.param_names:
        size = tangent.numels[name]
        vt = v[offset : offset + size].reshape(tangent.w0[name].shape)
        moments[name] = factor_second_moment(vt) if factored else vt
        offset += size
    meta = dict(warm_steps=k, batch_size=b, loss=lossf.describe(), beta2=b2, seed=seed,
                factored=factored, seconds=time.perf_counter() - t0)  # fmt: skip
    return Preconditioner(second_moment=moments, eps=opt.eps, factored=factored, metadata=meta)


class _ScaledTangent(Tangent):
    """The tangent model in the coordinates ``w = w0 + D ⊙ (u - u0)``, ``u0 = w0 / D``
    (NOTE [frozen factored preconditioner]): Jacobian ``J D``, kernel ``J P Jᵀ``, and
    ``J_u u0 = J w0`` (so a kernel's ``jw0`` anchors the decay at w = 0)."""

    def __init__(self, model: nn.Module, params: ParamSpec, projection: Any, seed: int,
                 scales: dict[str, torch.Tensor]) -> None:  # fmt: skip
        super().__init__(model, params=params, projection=projection, seed=seed)
        missing = [n for n in self.param_names if n not in scales]
        if missing:
            raise TangentlabError(
                f"compute_factored_kernel: the preconditioner has no entry for {missing[:4]}; "
                "estimate it with the same params= (tl.estimate_preconditioner)."
            )
        self._orig = dict(self.w0)
        self._scales = {n: scales[n].to(self.w0[n]) for n in self.param_names}
        self._u0 = {n: self.w0[n] / self._scales[n] for n in self.param_names}
        self.w0 = dict(self._u0)

    def to(self, device: torch.device | str) -> _ScaledTangent:
        super().to(device)
        for d in (self._orig, self._scales, self._u0):
            for n in d:
                d[n] = d[n].to(device)
        return self

    def _call(self, w: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        # Frozen copies of u (restricted() moves some of them to self.frozen) are mapped too.
        merged = {**{n: v for n, v in self.frozen.items() if n in self._scales}, **w}
        mapped = {n: (self._orig[n] + self._scales[n] * (v - self._u0[n])
                      if n in self._scales else v) for n, v in merged.items()}  # fmt: skip
        return super()._call(mapped, x)


def compute_factored_kernel(
    model: nn.Module,
    data: Any,
    optimizer: AdamW,
    *,
    loss: Any = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    warm_steps: int | None = None,
    factored: bool = True,
    preconditioner: Preconditioner | None = None,
    projection: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Kernel:
    r"""The preconditioned kernel Θ_P = J P Jᵀ of a frozen (factored) Adam preconditioner, for
    AdamW forecasts by the SGD solvers (NOTE [frozen factored preconditioner], candidate 3).

    .. math::
        \Theta_P = J\, \mathrm{diag}(P)\, J^\top,\qquad
        P = 1/(\sqrt{\hat V} + \epsilon),\quad \hat V = r c^\top / \textstyle\sum r

    Forecast it with ``tl.forecast(kp, tl.adam_as_sgd(optimizer), steps, loss=...,
    batch_size=...)``: exact for Adam with this frozen P on the tangent model (decay as
    stated in the NOTE).

    Args:
      model, data, params, memory_budget, device, progress: as for
        :func:`tangentlab.compute_kernel`.
      optimizer: the ``tl.AdamW`` to be forecast (β2, ε).
      loss, batch_size, warm_steps, factored, seed: how P is estimated
        (:func:`estimate_preconditioner`; ``loss`` is required unless ``preconditioner`` is
        given; ``seed`` also seeds the projection).
      preconditioner: a ready :class:`Preconditioner` (then loss, batch_size, warm_steps and
        factored are not used for the estimate).
      projection: ``None`` (exact Θ_P) or k (Θ_P ≈ (J D R)(J D R)ᵀ, as compute_kernel's).

    Returns:
      A :class:`~tangentlab.Kernel` of the reparametrized model ``w = D ⊙ u`` with
      ``jw0 = J w0`` and ``metadata["preconditioner"]`` describing P. Cost: the estimate
      (K gradients) plus one ``compute_kernel`` (vmap Jacobians: the reparametrized call is
      not covered by the structured/gram paths).

    Example::

        >>> opt = tl.AdamW(1e-4, weight_decay=0.01)
        >>> kp = tl.compute_factored_kernel(model, (X, y), opt, loss="ce", batch_size=16)
        >>> fc = tl.forecast(kp, tl.adam_as_sgd(opt), 300, loss="ce", batch_size=16)
    """
    fn = "compute_factored_kernel"
    _check_model(fn, model)
    opt = _check_adamw(fn, optimizer)
    if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int)
                                   or projection < 1):  # fmt: skip
        raise TangentlabError(
            f"{fn}: projection must be None (exact) or an integer k >= 1, got {projection!r}."
        )
    if preconditioner is None:
        if loss is None:
            raise TangentlabError(
                f"{fn}: give the training loss (loss='ce' or 'mse'): the preconditioner is "
                "estimated from its gradients; or pass preconditioner=tl.estimate_preconditioner"
                "(...)."
            )
        preconditioner = estimate_preconditioner(
            model, data, opt, loss=loss, params=params, batch_size=batch_size,
            warm_steps=warm_steps, factored=factored, seed=seed, device=device,
        )  # fmt: skip
    elif not isinstance(preconditioner, Preconditioner):
        raise TangentlabError(
            f"{fn}: preconditioner must be a tl.Preconditioner (tl.estimate_preconditioner) or "
            f"None, got {type(preconditioner).__name__}."
        )
    if preconditioner.eps != opt.eps:
        raise TangentlabError(
            f"{fn}: the preconditioner was estimated with eps={preconditioner.eps:g} but the "
            f"optimizer has eps={opt.eps:g}; estimate it with this optimizer."
        )
    tangent = _ScaledTangent(model, params, projection, seed, preconditioner.scales())
    kernel = compute_kernel(tangent, data, memory_budget=memory_budget, device=device,
                            progress=progress)  # fmt: skip
    meta = dict(kernel.metadata)
    pm = preconditioner.metadata
    meta["preconditioner"] = (
        f"{'factored row x column' if preconditioner.factored else 'diagonal'} frozen Adam "
        f"v from {pm.get('warm_steps', '?')} batches of {pm.get('batch_size', '?')} at w0 "
        f"({pm.get('loss', '?')}, eps={preconditioner.eps:g}); kernel J P J^T "
        "(tangentlab.adam_approx)"
    )
    return dataclasses.replace(kernel, metadata=meta)


# ---------------------------------------------------------------------------------------
# Candidate 4: SignGD and the asymmetric SignGD kernel.
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class SignKernel:
    """The asymmetric SignGD kernel of the tangent model (NOTE [sign kernels], candidate 4).

    Attributes:
      theta: ``K_A = J sign(J)ᵀ`` ``[N*C, N*C]`` (sample-major, not symmetric):
        ``K_A[(i,a), (j,b)] = ⟨∇f_a(x_i), sign(∇f_b(x_j))⟩``.
      f0, targets: ``[N, C]``, ``[N]``.
      jw0: ``J w0`` ``[N, C]`` (the decoupled decay's anchor at w = 0).
      metadata: provenance.
    """

    theta: torch.Tensor
    f0: torch.Tensor
    targets: torch.Tensor
    jw0: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.f0.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.f0.shape[1])


def compute_sign_kernel(source: WeightSpaceTangent) -> SignKernel:
    r"""The asymmetric SignGD kernel of Malladi et al., 2023 from the explicit Jacobian.

    .. math::
        K^{(\mathrm{A\text{-}SignGD})}(x_i, x_j)_{ab}
            = \langle \nabla f_a(x_i),\ \mathrm{sign}(\nabla f_b(x_j)) \rangle,
        \qquad K_A = J\, \mathrm{sign}(J)^\top

    "A Kernel-Based View of Language Model Fine-Tuning", https://arxiv.org/abs/2210.05643
    (NOTE [sign kernels]). Memory (N·C)² · 8 bytes (sign(J) is formed 256 MiB at a time);
    cost N²C²P.

    Args:
      source: a :class:`~tangentlab.adam.WeightSpaceTangent`
        (:func:`tangentlab.compute_weight_space_tangent`).

    Returns:
      :class:`SignKernel`; forecast it with :func:`forecast_signgd`.
    """
    if not isinstance(source, WeightSpaceTangent):
        raise TangentlabError(
            f"compute_sign_kernel: source must be a tl.WeightSpaceTangent (its explicit "
            f"Jacobian; tl.compute_weight_space_tangent), got {type(source).__name__}."
        )
    t0 = time.perf_counter()
    nc = source.num_samples * source.num_classes
    jac = source.jacobian.reshape(nc, -1)
    theta = torch.empty(nc, nc, dtype=jac.dtype)
    rows = max(1, _SIGN_CHUNK_BYTES // max(1, jac.shape[1] * jac.element_size()))
    for s in range(0, nc, rows):  # sign(J) a block of rows at a time: never a second J
        theta[:, s : s + rows] = jac @ torch.sign(jac[s : s + rows]).T
    meta = {**{k: str(v) for k, v in source.metadata.items()},
            "kernel": "asymmetric SignGD K_A = J sign(J)^T (tangentlab.adam_approx)",
            "seconds": str(time.perf_counter() - t0)}  # fmt: skip
    return SignKernel(theta=theta, f0=source.f0, targets=source.targets, jw0=source.jw0,
                      metadata=meta)  # fmt: skip


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def forecast_signgd(
    source: SignKernel | WeightSpaceTangent,
    optimizer: AdamW,
    steps: int,
    *,
    loss: Any = "mse",
    batch_size: int | None = None,
    paths: int = 1,
    seed: int = 0,
    band: tuple[float, float] = (0.1, 0.9),
) -> Forecast:
    r"""Forecast AdamW by its early-time limit, SignGD on the tangent model (candidate 4).

    With ``η_t = η m(t)``, ``δ_j = ∂ℓ/∂f_j`` and the batch b_t of step t:

    .. math::
        \text{kernel:}\quad f \leftarrow f - \eta_t\lambda (f - a)
            - \frac{\eta_t}{|b_t|} \sum_{j\in b_t} K_A[:, j]\, \mathrm{sign}(\delta_j),
        \qquad
        \text{weight:}\quad w \leftarrow w (1 - \eta_t\lambda) - \eta_t\, \mathrm{sign}(g_t)

    (a = f0 − J w0). From a :class:`SignKernel`: the asymmetric-SignGD kernel dynamics, exact
    for sample-wise SignGD (NOTE [sign kernels]); from a
    :class:`~tangentlab.adam.WeightSpaceTangent`: exact SignGD of the tangent model (torch:
    ``w.mul_(1 - η_t λ); w.sub_(η_t * w.grad.sign())``), which is AdamW with β1 = β2 = 0 and
    ε = 0. β1, β2 and ε of ``optimizer`` are ignored (the early-time limit).

    Args:
      source: a :class:`SignKernel` (:func:`compute_sign_kernel`) or a WeightSpaceTangent.
      optimizer: a ``tl.AdamW`` (lr, weight_decay and schedule are read).
      steps: optimizer steps T (>= 0); curves have T+1 entries.
      loss: ``"mse"``/``tl.MSE(...)`` or ``"ce"``/``tl.CrossEntropy()``, as :func:`forecast`.
      batch_size: B; ``None`` or >= N: full batch.
      paths, seed: minibatch paths; path p draws ``dynamics.batch_schedule(N, B, T,
        sampling="epoch", rng=dynamics.path_rngs(seed, paths)[p])``, the order of
        :func:`tangentlab.forecast` and :func:`tangentlab.finetune` with the same seed.
      band: quantiles of the per-path loss reported as ``loss_band``.

    Returns:
      A :class:`~tangentlab.Forecast` (``loss``, ``accuracy``, band and paths as
      :func:`tangentlab.forecast`; ``stability`` NaN: not computed). Cost per step and path:
      kernel N·C·|b|·C; weight space N·C·P (a product with J).
    """
    fn = "forecast_signgd"
    if not isinstance(source, SignKernel | WeightSpaceTangent):
        raise TangentlabError(
            f"{fn}: source must be a tl.SignKernel (tl.compute_sign_kernel) or a "
            f"tl.WeightSpaceTangent (exact SignGD in weight space), got "
            f"{type(source).__name__}."
        )
    if not isinstance(optimizer, AdamW):
        raise TangentlabError(
            f"{fn}: optimizer must be a tl.AdamW (SignGD is its early-time limit), got "
            f"{type(optimizer).__name__}; e.g. tl.AdamW(1e-4, weight_decay=0.01)."
        )
    steps = check_steps(fn, steps)
    lossf = as_loss(loss, fn)
    bs = check_batch_size(fn, batch_size)
    seed = check_seed(fn, seed)
    if not is_int(paths) or paths < 1:
        raise TangentlabError(f"{fn}: paths must be an integer >= 1, got {paths!r}.")
    check_fraction_pair(fn, "band", band, "(0.1, 0.9)", what="quantiles")
    lo, hi = float(band[0]), float(band[1])
    n, c = source.num_samples, source.num_classes
    stochastic = bs is not None and bs < n
    paths = int(paths) if stochastic else 1
    batches = None
    if stochastic:
        batches = [dyn.batch_schedule(n, bs, steps, sampling="epoch", rng=rng)
                   for rng in dyn.path_rngs(seed, paths)]  # fmt: skip
    f0, targets = _np(source.f0), source.targets.detach().cpu().numpy().astype(np.int64)
    l0 = float(dyn.loss_value(f0, targets, loss=lossf.name, scale=lossf.target_scale))
    rates = optimizer.lr * (np.ones(steps) if optimizer.schedule.is_constant
                            else optimizer.schedule.multipliers(steps))  # fmt: skip
    common = dict(loss=lossf.name, scale=lossf.target_scale, rates=rates,
                  weight_decay=optimizer.weight_decay, steps=steps, batches=batches,
                  paths=paths, blowup_loss=BLOWUP_FACTOR * l0 if l0 > 0 else math.inf)  # fmt: skip
    t0 = time.perf_counter()
    if isinstance(source, SignKernel):
        traj = _sign_kernel_trajectory(_np(source.theta), f0, targets, _np(source.jw0), **common)
        solver = "asymmetric SignGD kernel, exact for sample-wise SignGD (NOTE [sign kernels])"
    else:
        a = source.arrays()
        traj = _signgd_trajectory(a["jacobian"], f0, targets, a["w0"], **common)
        solver = "exact SignGD of the tangent model in weight space (NOTE [sign kernels])"
    loss_paths, acc_paths = traj.loss, traj.accuracy
    blown = [q for q in traj.blowup if q is not None]
    mean = loss_paths.mean(axis=0)
    finite = mean[np.isfinite(mean)]
    tail = finite[-max(1, len(finite) // 10) :] if finite.size else np.array([np.nan])
    with np.errstate(invalid="ignore"):
        lb = (np.quantile(loss_paths, lo, axis=0), np.quantile(loss_paths, hi, axis=0))
    hyper = {**optimizer.hyperparameters(), "steps": steps, "batch_size": bs,
             "loss": lossf.name, "target_scale": lossf.target_scale, "paths": paths,
             "seed": seed, "num_samples": n, "num_classes": c}  # fmt: skip
    method = {"solver": solver, "noise": "simulate" if stochastic else None,
              "ignored": "betas and eps (early-time limit of Adam)",
              "seconds": time.perf_counter() - t0}  # fmt: skip
    return Forecast(
        loss=mean, accuracy=acc_paths.mean(axis=0),
        loss_band=lb if stochastic else None,
        loss_paths=loss_paths if stochastic else None,
        accuracy_paths=acc_paths if stochastic else None,
        diverges=bool(blown), divergence_step=min(blown) if blown else None,
        stability=math.nan, stability_limit=math.nan,
        loss_limit=float(np.mean(tail)) if not blown else math.nan,
        hyperparameters=hyper, method=method, optimizer=optimizer, loss_function=lossf,
    )  # fmt: skip


def _batch_ids(batches, q: int, t: int, n: int) -> np.ndarray:
    return np.arange(n) if batches is None else np.asarray(batches[q][t])


def _sign_kernel_trajectory(theta, f0, targets, jw0, *, loss, scale, rates, weight_decay,
                            steps, batches, paths, blowup_loss) -> dyn.Trajectory:  # fmt: skip
    """The asymmetric SignGD kernel dynamics (NOTE [sign kernels]), all paths."""
    n, c = f0.shape
    anchor = (f0 - jw0).reshape(-1)
    f = np.repeat(f0.reshape(1, -1), paths, axis=0)
    log = dyn._PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)

    def reset(q: int) -> None:
        f[q] = f0.reshape(-1)

    log.record(0, f.reshape(paths, n, c), reset)
    for t in range(steps):
        if not log.alive.any():
            break
        eta = rates[t]
        fm = f.reshape(paths, n, c)
        for q in np.flatnonzero(log.alive):
            idx = _batch_ids(batches, q, t, n)
            s = np.sign(dyn.loss_grad(fm[q, idx], targets[idx], loss=loss, scale=scale))
            cols = (idx[:, None] * c + np.arange(c)).reshape(-1)
            step = theta[:, cols] @ s.reshape(-1) / len(idx)
            if weight_decay:
                f[q] -= eta * weight_decay * (f[q] - anchor)
            f[q] -= eta * step
        log.record(t + 1, f.reshape(paths, n, c), reset)
    return log.trajectory()


def _signgd_trajectory(jacobian, f0, targets, w0, *, loss, scale, rates, weight_decay, steps,
                       batches, paths, blowup_loss) -> dyn.Trajectory:  # fmt: skip
    """Exact SignGD of the tangent model in weight space (NOTE [sign kernels]), all paths."""
    n, c = f0.shape
    jac3 = jacobian.reshape(n, c, -1)
    w = np.repeat(w0[None], paths, axis=0)
    f = np.repeat(f0.reshape(1, -1), paths, axis=0)
    log = dyn._PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)

    def reset(q: int) -> None:
        w[q], f[q] = w0, f0.reshape(-1)

    log.record(0, f.reshape(paths, n, c), reset)
    for t in range(steps):
        if not log.alive.any():
            break
        eta = rates[t]
        fm = f.reshape(paths, n, c)
        for q in np.flatnonzero(log.alive):
            idx = _batch_ids(batches, q, t, n)
            d = dyn.loss_grad(fm[q, idx], targets[idx], loss=loss, scale=scale) / len(idx)
            g = np.zeros(jac3.shape[2])
            for j, dj in zip(idx, d, strict=True):  # the batch's rows of J, never copied
                g += dj @ jac3[j]
            if weight_decay:
                w[q] *= 1.0 - eta * weight_decay
            w[q] -= eta * np.sign(g)
        f = f0.reshape(1, -1) + (w - w0) @ jacobian.T
        log.record(t + 1, f.reshape(paths, n, c), reset)
    return log.trajectory()

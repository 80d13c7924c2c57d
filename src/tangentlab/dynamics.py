"""Training dynamics of the tangent model: pure numerics on float64 numpy arrays.

Nothing here validates input, touches an ``nn.Module`` or does I/O; the public entry point
that validates and assembles a :class:`~tangentlab.forecast.Forecast` is
:func:`tangentlab.forecast.forecast`. Conventions are DESIGN.md §2-§3: N samples, C outputs,
stacked outputs sample-major (``f[i*C + a]``), one time unit = one optimizer step.

Every scheme is ``torch.optim.SGD(lr=η, momentum=m, weight_decay=λ, dampening=0)`` applied
to the tangent model ``f = f0 + J (w - w0)``, written in function space (J is constant, so
the momentum buffer maps to ``J buf``)::

    G_t     = (1/|b_t|) Θ[:, b_t] δ_{b_t}(f_t) + λ (f_t - a)     # a = f0 - J w0
    buf_t   = m buf_{t-1} + G_t,        buf_{-1} = 0               # first step: buf = G
    f_{t+1} = f_t - η buf_t

with δ_i = ∂ℓ/∂f_i (MSE: f_i - s y_i; CE: softmax(f_i) - y_i) and ``a`` the decay anchor:
``f0 - J w0`` for torch's coupled weight decay toward w = 0, or ``f0`` for decay toward w0.
``b_t`` is the batch of step t (all N samples for full-batch gradient descent).

NOTE [noise: simulate vs sde]
Two ways to forecast minibatch SGD (batch B < N), both in function space:

- ``simulate`` (:func:`iterate_trajectory` with explicit batches): exact minibatch SGD of the
  tangent model. A step reads only the B*C kernel rows of its batch (Θ is symmetric, and
  the rows of one sample are contiguous, so no copy): O(NC·BC) per step and path.
- ``sde`` (:func:`sde_trajectories`): Euler-Maruyama with one optimizer step per time step
  and the DESIGN §3 noise factor sqrt(κ/(BN)) Θ Δ P ξ added to the gradient (κ = (N-B)/(N-1)
  for epoch sampling). It matches the first two conditional moments of the SGD step
  exactly, so for MSE with i.i.d. batches its mean loss is exact; higher moments, epoch
  correlations and the smaller last batch are not modelled. Each step is one full kernel
  product Θ @ [NC, paths]: O((NC)^2 · paths), all paths at once.

Measured on 2 CPU cores (AMD EPYC; numpy/OpenBLAS), float64 (scripts kept out of the
repository; rerun them with the test helpers of tests/test_dynamics.py):

- Cost, N=1000, C=10, B=32, 1000 steps, 10 paths, dense Θ [10^4, 10^4], lr at half the
  full-batch limit: simulate 24 s (MSE) / 28 s (CE), about 2 ms per step and path, bound by
  reading the 32x10 kernel rows (25 MB); sde 230 s / 211 s, because every step reads all
  of Θ (800 MB). Two threads do not help the simulation (memory bandwidth).
- Error against 4000 explicit weight-space SGD runs of the linear model (N=40, C=3, P=30,
  B=4, 200 steps, 400 forecast paths, lr = 0.2 N/λ_max·(1-m)), as the max (mean) over steps
  of |forecast mean loss - explicit mean loss| in standard errors, and the max relative
  error of the 10%/90% band edges:

  ===========  ========  ==========  ==================  ============
  sampling     momentum  noise       max (mean) z        band error
  ===========  ========  ==========  ==================  ============
  epoch        0         simulate    2.95 (0.83)         0.8%
  epoch        0         sde         39.6 (26.5)         19.5%
  replacement  0         simulate    2.12 (0.70)         1.6%
  replacement  0         sde         2.53 (0.85)         4.4%
  epoch        0.5       simulate    3.32 (0.84)         0.5%
  epoch        0.5       sde         46.5 (32.5)         20.0%
  replacement  0.5       simulate    1.78 (0.72)         1.3%
  replacement  0.5       sde         2.35 (0.85)         3.5%
  ===========  ========  ==========  ==================  ============

  Both took 1-5 s here (Python-loop bound at this size). The sde is unbiased for i.i.d.
  batches but overestimates the noise of epoch sampling (reshuffling cancels most of the
  gradient noise within an epoch; the sde treats steps as independent): its mean loss is
  11-12% too high, the default DataLoader case.

``simulate`` is therefore the default: exact for the linear model, and cheaper unless the
number of paths exceeds about N/B (then one Θ product per step for all paths wins).

NOTE [schedules] (see also tangentlab.forecast and tangentlab.schedules)
A learning-rate schedule enters every solver as ``lr_schedule``, the multipliers m(t)
``[>= T]``: step t uses the rate η·m(t) in place of η, as torch's ``LambdaLR`` (the momentum
buffer and the weight-decay term are unchanged and scaled by η_t with the gradient, as in
torch SGD). ``None`` keeps the constant-rate code paths. Exact steps and heavy-ball modes
take η_t per step; the closed form of plain steps becomes the per-mode product
x_t - x* = Π_{τ<t} (1 - η̃ m(τ) h) (x_0 - x*) (iterated, O(modes) per step); gradient flow
under a schedule is the flow of the step-wise constant rate, i.e. the constant-rate flow
read at the reparametrized time τ_t = Σ_{s<t} m(s) (exact, in closed form or by the ODE
solver); the SDE scales its whole step (drift and noise) by m(t).

NOTE [divergence]
An unstable step size makes the linear dynamics grow geometrically; the numbers it
produces are not a forecast of anything. The iterating solvers stop a path as soon as its
loss is non-finite or exceeds ``blowup_loss`` (chosen by the caller) and report the step;
the loss and accuracy from that step on are NaN. The spectral criterion for MSE lives in
:mod:`tangentlab.forecast`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.integrate
import scipy.sparse.linalg

# ---------------------------------------------------------------------------------------
# Losses (DESIGN.md §2): both averaged over samples, as PyTorch's default reductions.
# ---------------------------------------------------------------------------------------


def targets_matrix(targets: np.ndarray, num_classes: int, *, scale: float = 1.0) -> np.ndarray:
    """Scaled one-hot targets ``s * onehot(y)``, ``[N] -> [N, C]``."""
    out = np.zeros((targets.shape[0], num_classes))
    out[np.arange(targets.shape[0]), targets] = scale
    return out


def loss_value(f: np.ndarray, targets: np.ndarray, *, loss: str, scale: float = 1.0) -> np.ndarray:
    r"""Mean training loss of outputs ``f`` ``[..., N, C]`` -> ``[...]``.

    .. math::
        \mathrm{MSE} = \frac{1}{N} \sum_i \tfrac12 \lVert f_i - s\,e_{y_i} \rVert^2,
        \qquad
        \mathrm{CE} = \frac{1}{N} \sum_i -\log \operatorname{softmax}(f_i)_{y_i}
    """
    n = f.shape[-2]
    rows = np.arange(n)
    if loss == "mse":
        r = f.copy()
        r[..., rows, targets] -= scale
        return 0.5 * np.einsum("...ij,...ij->...", r, r) / n
    top = f.max(axis=-1, keepdims=True)
    # log-sum-exp shifted by the row maximum so that exp never overflows
    lse = top[..., 0] + np.log(np.exp(f - top).sum(axis=-1))
    return (lse - f[..., rows, targets]).mean(axis=-1)


def loss_grad(f: np.ndarray, targets: np.ndarray, *, loss: str, scale: float = 1.0) -> np.ndarray:
    """Per-sample output gradients ``δ_i = ∂ℓ/∂f_i`` ``[..., N, C]`` (not divided by N).

    MSE: ``δ_i = f_i - s e_{y_i}``; CE: ``δ_i = softmax(f_i) - e_{y_i}``.
    """
    rows = np.arange(f.shape[-2])
    if loss == "mse":
        d = f.copy()
        d[..., rows, targets] -= scale
        return d
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    e[..., rows, targets] -= 1.0
    return e


def accuracy_value(f: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Training accuracy ``mean_i [argmax_a f_ia = y_i]`` of ``f`` ``[..., N, C]`` -> ``[...]``."""
    return (f.argmax(axis=-1) == targets).mean(axis=-1)


# ---------------------------------------------------------------------------------------
# Kernel products: dual (Θ itself) or primal (Θ = Φ Φ^T, never formed).
# ---------------------------------------------------------------------------------------


class DenseKernelOperator:
    """Dual execution: products with the dense kernel Θ ``[NC, NC]``.

    Memory (NC)^2; a product with b columns costs NC·b. A float32 Θ is multiplied in
    float32; results come back float64.
    """

    name = "dual"

    def __init__(self, theta: np.ndarray, num_classes: int):
        nc = theta.shape[0]
        self.theta = theta
        self.num_classes = num_classes
        # Θ is symmetric, so the columns of a batch are its rows; the C rows of one sample
        # are contiguous, so each is read in place (no gather copy).
        self._rows = theta.reshape(nc // num_classes, num_classes, nc)

    def cast(self, x: np.ndarray) -> np.ndarray:
        """``x`` in Θ's dtype."""
        return np.asarray(x, dtype=self.theta.dtype)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``Θ x`` for ``x`` ``[NC]`` or ``[NC, p]``."""
        return (self.theta @ self.cast(x)).astype(np.float64, copy=False)

    def cols_matvec(self, batch: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``Σ_j Θ[:, batch_j] x_j`` for sample ids ``batch`` ``[b]``, ``x`` ``[b, C]`` -> ``[NC]``.

        Repeated ids (sampling with replacement) add up.
        """
        x = self.cast(x)
        out = x[0] @ self._rows[batch[0]]
        for j in range(1, len(batch)):
            out += x[j] @ self._rows[batch[j]]
        return out.astype(np.float64, copy=False)

    @classmethod
    def gram(cls, features: np.ndarray, num_classes: int) -> DenseKernelOperator:
        """Θ = Φ Φ^T of features Φ ``[NC, k]`` in Φ's dtype, made exactly symmetric."""
        theta = features @ features.T
        theta += theta.T
        theta *= 0.5
        return cls(theta, num_classes)


class FeatureKernelOperator:
    """Primal execution: products with ``Θ = Φ Φ^T`` through the features Φ ``[NC, k]``.

    Θ is never formed: memory NC·k, a product with b columns costs (NC + b)·k. The state
    stays in function space, ``f = f0 + Φ v`` with ``v`` accumulated implicitly.
    """

    name = "primal"

    def __init__(self, features: np.ndarray, num_classes: int):
        nc, k = features.shape
        self.features = features
        self.num_classes = num_classes
        self._rows = features.reshape(nc // num_classes, num_classes, k)

    def cast(self, x: np.ndarray) -> np.ndarray:
        """``x`` in Φ's dtype: float32 features (a sketch: its own error is far larger)
        are multiplied in float32, half the memory traffic; results come back float64."""
        return np.asarray(x, dtype=self.features.dtype)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``Φ (Φ^T x)`` for ``x`` ``[NC]`` or ``[NC, p]``."""
        out = self.features @ (self.features.T @ self.cast(x))
        return out.astype(np.float64, copy=False)

    def cols_matvec(self, batch: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``Σ_j Θ[:, batch_j] x_j = Φ Σ_j Φ_{batch_j}^T x_j`` -> ``[NC]``."""
        v = np.einsum("bc,bck->k", self.cast(x), self._rows[batch])
        return (self.features @ v).astype(np.float64, copy=False)

    def gram(self) -> DenseKernelOperator:
        """Θ = Φ Φ^T as a dense operator in Φ's dtype, formed once and kept."""
        if "_gram" not in self.__dict__:
            self.__dict__["_gram"] = DenseKernelOperator.gram(self.features, self.num_classes)
        return self.__dict__["_gram"]

    def gram_pays(self, products: int) -> bool:
        """Whether a run of ``products`` block products (steps x paths) should go through Θ
        (NOTE [head-body Gram])."""
        nc, k = self.features.shape
        return nc <= k and products * (4 * k - 2 * nc) >= nc * k  # the run's length only


class TraceKernelOperator:
    r"""Dual execution for a trace kernel: products with Θ = K ⊗ I_C through K ``[N, N]``.

    .. math::
        (K \otimes I_C)\, x = \operatorname{vec}(K X), \qquad X = x \text{ as } [N, C]

    (sample-major stacking: entry ``i*C + a`` of ``x`` is ``X[i, a]``). Θ is never expanded:
    memory N^2 instead of (NC)^2, a product with the columns of b samples costs N·b·C.
    """

    name = "dual"

    def __init__(self, k: np.ndarray, num_classes: int):
        self.k = k
        self.num_classes = num_classes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``(K ⊗ I_C) x`` for ``x`` ``[NC]`` or ``[NC, p]``."""
        n = self.k.shape[0]
        return (self.k @ x.reshape(n, -1)).reshape(x.shape)  # [N, N] @ [N, C*p]

    def cols_matvec(self, batch: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``Σ_j Θ[:, batch_j] x_j = vec(K[:, batch] X_batch)``, ``x`` ``[b, C]`` -> ``[NC]``.

        Repeated ids (sampling with replacement) add up. K is symmetric: its rows are read.
        """
        return (self.k[batch].T @ x).reshape(-1)


class TraceFeatureKernelOperator:
    """Primal execution for a trace kernel: Θ = (Φ Φ^T) ⊗ I_C with Φ ``[N, k']`` (k' = S k).

    Neither K nor Θ is formed: memory N·k', a product with b sample columns costs
    (N + b)·k'·C.
    """

    name = "primal"

    def __init__(self, features: np.ndarray, num_classes: int):
        self.features = features
        self.num_classes = num_classes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``(Φ Φ^T ⊗ I_C) x`` for ``x`` ``[NC]`` or ``[NC, p]``."""
        n = self.features.shape[0]
        xm = x.reshape(n, -1)
        return (self.features @ (self.features.T @ xm)).reshape(x.shape)

    def cols_matvec(self, batch: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``Σ_j Θ[:, batch_j] x_j = vec(Φ Φ_batch^T X_batch)`` -> ``[NC]``."""
        return (self.features @ (self.features[batch].T @ x)).reshape(-1)


# NOTE [trace kernel] (tangentlab.compute): a trace kernel approximates Θ by K ⊗ I_C, so
# every solver runs unchanged on the two Trace*Operator classes above (products only).
KernelOperator = (
    DenseKernelOperator | FeatureKernelOperator | TraceKernelOperator | TraceFeatureKernelOperator
)


class CrossKernelOperator:
    """Products with the cross kernel Θ(X_e, X) ``[MC, NC]`` (:mod:`tangentlab.cross`).

    Dense (``theta``, a product with b training columns costs MC·b) or through the projected
    Jacobians, Θ(X_e, X) = Φ_e Φ^T (``features_eval`` ``[MC, k]`` and the training kernel's
    ``features`` ``[NC, k]``; (MC + b)·k per product).
    """

    def __init__(self, num_classes: int, *, theta: np.ndarray | None = None,
                 features_eval: np.ndarray | None = None,
                 features: np.ndarray | None = None) -> None:  # fmt: skip
        self.num_classes = c = num_classes
        self.theta = theta
        self.features_eval, self.features = features_eval, features
        if theta is not None:
            self.name = "dual"
            # stored transposed, [N, C, MC]: a batch's columns are contiguous rows, gathered
            # by a copy and one matrix-vector product (~8x faster than a strided einsum)
            self._rows_t = np.ascontiguousarray(theta.T).reshape(-1, c, theta.shape[0])
            self.theta = self._rows_t.reshape(-1, theta.shape[0]).T  # a view: no second copy
        else:
            self.name = "primal"
            self._rows = features.reshape(features.shape[0] // c, c, features.shape[1])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``Θ(X_e, X) x`` for ``x`` ``[NC]`` -> ``[MC]``."""
        if self.theta is not None:
            return self.theta @ x
        return self.features_eval @ (self.features.T @ x)

    def cols_matvec(self, batch: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``Σ_j Θ(X_e, X)[:, batch_j] x_j`` for ids ``batch`` ``[b]``, ``x`` ``[b, C]`` -> ``[MC]``
        (repeated ids add up)."""
        if self.theta is not None:
            return x.reshape(-1) @ self._rows_t[batch].reshape(-1, self._rows_t.shape[2])
        return self.features_eval @ np.einsum("bc,bck->k", x, self._rows[batch])


@dataclass(frozen=True)
class EvalSet:
    """A held-out set moved by the training trajectory through the cross kernel.

    On the tangent model every step moves the outputs at any point x by the same weight
    displacement as the training outputs: ``f_e <- f_e - η_t v^e_t`` with
    ``v^e_t = m v^e_{t-1} + Θ(X_e, X) u_t + λ (f_e - a_e)``, where ``u_t`` holds the batch's
    output gradients (δ_i / |b| in the rows of the batch) that move the training outputs by
    ``Θ u_t``. So ``f_e(t) - a_e = ρ_t (f_e(0) - a_e) + Θ(X_e, X) α_t`` exactly.

    Attributes:
      op: the :class:`CrossKernelOperator`.
      f0: pre-trained outputs on the held-out set ``[M, C]``.
      targets: held-out labels ``[M]``.
      anchor: weight-decay anchor ``a_e`` ``[M, C]``: ``f0 - J(X_e) w0`` (decay toward 0)
        or ``f0`` (toward w0, or no decay).
    """

    op: CrossKernelOperator
    f0: np.ndarray
    targets: np.ndarray
    anchor: np.ndarray


def top_eigenvalue(op: KernelOperator, nc: int, *, weight: np.ndarray | None = None) -> float:
    """Largest eigenvalue of ``W^{1/2} Θ W^{1/2}`` (``W`` block-diagonal PSD, default I).

    With ``W_i`` the loss Hessian ``∂²ℓ/∂f_i²`` this is N times the sharpness of the
    full-batch loss in function space (MSE: W = I). Lanczos (ARPACK) for NC > 64, dense
    otherwise.

    Args:
      op: kernel products.
      nc: N*C.
      weight: symmetric square roots ``W_i^{1/2}``, ``[N, C, C]``, or ``None`` for I.
    """
    if nc == 0:
        return 0.0
    c = op.num_classes

    def apply(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(nc)
        if weight is None:
            return op.matvec(x)
        y = op.matvec(np.einsum("nab,nb->na", weight, x.reshape(-1, c)).reshape(nc))
        return np.einsum("nab,nb->na", weight, y.reshape(-1, c)).reshape(nc)

    if nc <= 64:
        mat = np.stack([apply(e) for e in np.eye(nc)], axis=1)
        return float(np.linalg.eigvalsh(0.5 * (mat + mat.T))[-1])
    linop = scipy.sparse.linalg.LinearOperator((nc, nc), matvec=apply, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(nc)  # fixed start: reproducible
    val = scipy.sparse.linalg.eigsh(linop, k=1, which="LA", v0=v0, tol=1e-6,
                                    return_eigenvectors=False)
    return float(val[0])


def softmax_hessian_sqrt(f: np.ndarray) -> np.ndarray:
    """Symmetric roots of the CE Hessians ``diag(p_i) - p_i p_i^T``, ``[N, C] -> [N, C, C]``."""
    p = np.exp(f - f.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    h = np.einsum("na,ab->nab", p, np.eye(f.shape[-1])) - p[:, :, None] * p[:, None, :]
    lam, v = np.linalg.eigh(h)
    # the Hessian is PSD; negative eigenvalues are round-off, clamped before the root
    return np.einsum("nab,nb,ncb->nac", v, np.sqrt(np.clip(lam, 0.0, None)), v)


# ---------------------------------------------------------------------------------------
# Minibatch schedules and seeds.
# ---------------------------------------------------------------------------------------


def path_rngs(seed: int, paths: int) -> list[np.random.Generator]:
    """One independent generator per path (``SeedSequence(seed).spawn``).

    Path p gets the same generator whatever the number of paths, so ``paths=1`` reproduces
    path 0 of a larger forecast.
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(paths)]


def batch_schedule(
    num_samples: int, batch_size: int, steps: int, *, sampling: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """The sample ids of every step's batch, ``steps`` arrays of length <= ``batch_size``.

    ``sampling="epoch"``: like ``DataLoader(shuffle=True, drop_last=False)``: a fresh
    permutation each epoch cut into consecutive batches, the last one of an epoch holding
    the ``N mod B`` leftover samples when B does not divide N.
    ``sampling="replacement"``: every batch is B i.i.d. uniform ids (duplicates allowed),
    like ``RandomSampler(replacement=True)`` batched by B.
    """
    if sampling == "replacement":
        draws = rng.integers(0, num_samples, size=(steps, batch_size))
        return list(draws)
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(num_samples)
        for start in range(0, num_samples, batch_size):
            out.append(perm[start : start + batch_size])
            if len(out) == steps:
                break
    return out


# ---------------------------------------------------------------------------------------
# Trajectories.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trajectory:
    """Loss and accuracy of one or more paths over steps 0..T.

    Attributes:
      loss: full-training-set loss, ``[paths, T+1]``; NaN from ``blowup[p]`` on.
      accuracy: training accuracy, ``[paths, T+1]``; NaN where ``loss`` is.
      blowup: per path, the first step whose loss was non-finite or above ``blowup_loss``,
        or ``None`` (NOTE [divergence]).
      eval_loss, eval_accuracy: loss and accuracy on a held-out set (:class:`EvalSet`),
        ``[paths, T+1]``, NaN where ``loss`` is; ``None`` without one.
    """

    loss: np.ndarray
    accuracy: np.ndarray
    blowup: tuple[int | None, ...]
    eval_loss: np.ndarray | None = None
    eval_accuracy: np.ndarray | None = None


def _blown(value: float, blowup_loss: float) -> bool:
    return not math.isfinite(value) or value > blowup_loss


class _PathLog:
    """Per-path loss and accuracy of a multi-path simulation, with the blow-up policy of
    NOTE [divergence policy] (tangentlab.forecast): a path whose loss blows up is marked at
    that step, logs NaN from then on, and ``reset(q)`` puts its state back to something
    finite (its numbers are no longer reported)."""

    def __init__(self, paths: int, steps: int, targets: np.ndarray, *, loss: str,
                 scale: float, blowup_loss: float) -> None:  # fmt: skip
        self.losses = np.full((paths, steps + 1), np.nan)
        self.accs = np.full((paths, steps + 1), np.nan)
        self.blowup: list[int | None] = [None] * paths
        self.alive = np.ones(paths, dtype=bool)
        self._args = (targets, loss, scale, blowup_loss)

    def record(self, t: int, f: np.ndarray, reset: Callable[[int], None]) -> None:
        """Log step ``t`` from the outputs ``f`` ``[P, N, C]`` of every path."""
        targets, loss, scale, blowup_loss = self._args
        vals, acc = loss_value(f, targets, loss=loss, scale=scale), accuracy_value(f, targets)
        for q in np.flatnonzero(self.alive):
            if _blown(float(vals[q]), blowup_loss):
                self.blowup[q], self.alive[q] = t, False
                reset(q)
            else:
                self.losses[q, t], self.accs[q, t] = vals[q], acc[q]

    def record_eval(self, t: int, fe: np.ndarray, targets: np.ndarray) -> None:
        """Log the held-out outputs ``fe`` ``[P, M, C]`` at step ``t`` for the paths still
        alive (call after :meth:`record`: a path that blew up logs NaN from that step)."""
        _, loss, scale, _ = self._args
        if not hasattr(self, "eval_losses"):
            self.eval_losses = np.full_like(self.losses, np.nan)
            self.eval_accs = np.full_like(self.accs, np.nan)
        live = np.flatnonzero(self.alive)
        if live.size:
            with np.errstate(over="ignore", invalid="ignore"):
                self.eval_losses[live, t] = loss_value(fe[live], targets, loss=loss, scale=scale)
            self.eval_accs[live, t] = accuracy_value(fe[live], targets)

    def trajectory(self) -> Trajectory:
        ev = getattr(self, "eval_losses", None)
        return Trajectory(self.losses, self.accs, tuple(self.blowup), ev,
                          None if ev is None else self.eval_accs)  # fmt: skip


def _step_rates(lr: float, momentum: float, heavy_ball: bool, steps: int,
                lr_schedule: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """The rate that multiplies the update of every step ``[T]``: η_t = η m(t) (torch's
    ``LambdaLR`` product), divided by 1 - m when momentum is replaced by the effective rate."""
    rates = np.full(steps, lr) if lr_schedule is None else lr * lr_schedule[:steps]
    return rates if heavy_ball else rates / (1.0 - momentum)


def schedule_clock(lr_schedule: np.ndarray | None, steps: int) -> np.ndarray:
    """τ_t = Σ_{s<t} m(s) at t = 0..T ``[T+1]``: the time of the constant-rate flow that the
    flow under a schedule has reached after t steps (τ_t = t without a schedule)."""
    if lr_schedule is None:
        return np.arange(steps + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(lr_schedule[:steps])])


def iterate_trajectory(
    op: KernelOperator,
    f0: np.ndarray,
    targets: np.ndarray,
    anchor: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    heavy_ball: bool,
    steps: int,
    batches: Sequence[np.ndarray] | None = None,
    blowup_loss: float = math.inf,
    scale_t: np.ndarray | None = None,
    lr_schedule: np.ndarray | None = None,
    eval_set: EvalSet | None = None,
) -> Trajectory:
    r"""Exact discrete SGD steps of the tangent model in function space (one path).

    .. math::
        G_t = \tfrac{1}{|b_t|} \Theta_{:, b_t} \delta_{b_t}(f_t) + \lambda (f_t - a),\quad
        v_t = m\,v_{t-1} + G_t,\quad f_{t+1} = f_t - \eta\, v_t

    (v: torch's momentum buffer in function space, v_{-1} = 0). ``heavy_ball=False``
    replaces momentum by the effective rate ``η/(1-m)`` (no buffer).

    Args:
      op: kernel products (primal or dual).
      f0, targets, anchor: initial outputs ``[N, C]``, labels ``[N]``, weight-decay anchor
        ``a`` (``f0 - J w0`` or ``f0``) ``[N, C]``.
      loss, scale: ``"mse"`` or ``"ce"``; the MSE target scale s.
      lr, momentum, weight_decay: torch SGD's η, m, λ.
      heavy_ball: exact heavy-ball buffer (True) or effective learning rate (False).
      steps: number of optimizer steps T.
      batches: the sample ids of each step (:func:`batch_schedule`), or ``None`` for full
        batch (then Θ is applied in one product).
      blowup_loss: stop once the loss exceeds this (NOTE [divergence]).
      scale_t: s(t) per step ``[>= T]``: step t uses s(t) Θ (experimental kernel growth,
        :mod:`tangentlab.experimental.growth`); ``None``: s = 1.
      lr_schedule: learning-rate multipliers m(t) ``[>= T]``: step t uses η m(t) (NOTE
        [schedules]); ``None``: constant η.
      eval_set: a held-out set (:class:`EvalSet`) moved along: the same step through the
        cross kernel, ``f_e <- f_e - η_t v^e_t``, ``v^e_t = m v^e_{t-1} + s(t) Θ(X_e, X) u_t
        + λ (f_e - a_e)`` (one more [MC, b·C] product per step); its loss and accuracy are
        returned in ``eval_loss`` / ``eval_accuracy``.

    Returns a one-path :class:`Trajectory`.
    """
    n, c = f0.shape
    f = f0.reshape(-1).copy()
    anc = anchor.reshape(-1)
    buf = np.zeros_like(f) if heavy_ball and momentum > 0 else None
    step_lr = _step_rates(lr, momentum, heavy_ball, steps, lr_schedule)
    losses = np.full(steps + 1, np.nan)
    accs = np.full(steps + 1, np.nan)
    losses[0] = loss_value(f0, targets, loss=loss, scale=scale)
    accs[0] = accuracy_value(f0, targets)
    ev = _EvalState(eval_set, steps, buf is not None, loss, scale) if eval_set else None
    blowup = None
    if _blown(losses[0], blowup_loss):
        return _trajectory(losses, accs, 0, ev)
    for t in range(steps):
        fm = f.reshape(n, c)
        if batches is None:
            d = loss_grad(fm, targets, loss=loss, scale=scale).reshape(-1)
            g = op.matvec(d)
            g /= n
            ge = None if ev is None else ev.op.matvec(d) / n
        else:
            idx = batches[t]
            d = loss_grad(fm[idx], targets[idx], loss=loss, scale=scale)
            g = op.cols_matvec(idx, d)
            g /= len(idx)
            ge = None if ev is None else ev.op.cols_matvec(idx, d) / len(idx)
        if scale_t is not None:
            g *= scale_t[t]
        if weight_decay:
            g += weight_decay * (f - anc)
        if buf is not None:
            buf *= momentum
            buf += g
            g = buf
        f -= step_lr[t] * g
        if ev is not None:
            ev.step(ge, 1.0 if scale_t is None else scale_t[t], weight_decay, momentum,
                    step_lr[t])  # fmt: skip
        value = float(loss_value(fm, targets, loss=loss, scale=scale))
        if _blown(value, blowup_loss):
            blowup = t + 1
            break
        losses[t + 1] = value
        accs[t + 1] = accuracy_value(fm, targets)
        if ev is not None:
            ev.record(t + 1)
    return _trajectory(losses, accs, blowup, ev)


class _EvalState:
    """The held-out outputs of one path (:class:`EvalSet`) and their momentum buffer."""

    def __init__(self, es: EvalSet, steps: int, heavy_ball: bool, loss: str, scale: float):
        self.op, self.targets, self.kw = es.op, es.targets, {"loss": loss, "scale": scale}
        self.m, self.c = es.f0.shape
        self.f = es.f0.reshape(-1).copy()
        self.anc = es.anchor.reshape(-1)
        self.buf = np.zeros_like(self.f) if heavy_ball else None
        self.loss = np.full(steps + 1, np.nan)
        self.acc = np.full(steps + 1, np.nan)
        self.record(0)

    def step(self, ge: np.ndarray, scale_t: float, wd: float, momentum: float, lr: float):
        if scale_t != 1.0:
            ge *= scale_t
        if wd:
            ge += wd * (self.f - self.anc)
        if self.buf is not None:
            self.buf *= momentum
            self.buf += ge
            ge = self.buf
        self.f -= lr * ge

    def record(self, t: int) -> None:
        fm = self.f.reshape(self.m, self.c)
        with np.errstate(over="ignore", invalid="ignore"):
            self.loss[t] = loss_value(fm, self.targets, **self.kw)
        self.acc[t] = accuracy_value(fm, self.targets)


def _trajectory(losses, accs, blowup, ev: _EvalState | None) -> Trajectory:
    if ev is None:
        return Trajectory(losses[None], accs[None], (blowup,))
    return Trajectory(losses[None], accs[None], (blowup,), ev.loss[None], ev.acc[None])


def flow_trajectory(
    op: KernelOperator,
    f0: np.ndarray,
    targets: np.ndarray,
    anchor: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    weight_decay: float,
    steps: int,
    method: str = "RK45",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    blowup_loss: float = math.inf,
    lr_schedule: np.ndarray | None = None,
) -> Trajectory:
    r"""Gradient flow of the tangent model, integrated by an adaptive scipy solver.

    .. math::
        \frac{df}{dt} = -\tilde\eta \Big(\tfrac1N \Theta\,\delta(f) + \lambda (f - a)\Big)

    with ``t`` in steps and ``lr`` the effective rate η̃ = η/(1-m). The solver is stepped
    by hand and its dense output read at the integer steps, so memory stays O(NC). Under a
    schedule the rate of step t is η̃ m(t) over [t, t+1): the same flow, read at
    τ_t = Σ_{s<t} m(s) (:func:`schedule_clock`, NOTE [schedules]).

    Args:
      method: a ``scipy.integrate.OdeSolver`` name: ``"RK45"`` (default; explicit, no
        Jacobian), ``"DOP853"``, ``"RK23"``, ``"LSODA"`` (stiff switching; its Jacobian is
        estimated by NC finite differences, affordable only for small NC).
      rtol, atol: solver tolerances on f.
      lr_schedule: multipliers m(t) ``[>= T]`` or ``None`` (constant rate).
      Other arguments as :func:`iterate_trajectory`.
    """
    n, c = f0.shape
    anc = anchor.reshape(-1)
    losses = np.full(steps + 1, np.nan)
    accs = np.full(steps + 1, np.nan)
    losses[0] = loss_value(f0, targets, loss=loss, scale=scale)
    accs[0] = accuracy_value(f0, targets)
    clock = schedule_clock(lr_schedule, steps)
    if steps == 0 or clock[-1] == 0:  # no step, or every step has rate 0: f stays f0
        losses[:], accs[:] = losses[0], accs[0]
        return Trajectory(losses[None], accs[None], (None,))

    def rhs(_t: float, f: np.ndarray) -> np.ndarray:
        g = op.matvec(loss_grad(f.reshape(n, c), targets, loss=loss, scale=scale).reshape(-1))
        g /= n
        if weight_decay:
            g += weight_decay * (f - anc)
        return -lr * g

    solver_cls = getattr(scipy.integrate, method)
    solver = solver_cls(rhs, 0.0, f0.reshape(-1).copy(), float(clock[-1]), rtol=rtol,
                        atol=atol)  # fmt: skip
    next_step = 1
    while next_step <= steps:
        message = solver.step()
        if solver.status == "failed":
            raise RuntimeError(f"flow_trajectory: {method} failed at t={solver.t}: {message}")
        # the steps whose (reparametrized) time the solver has reached
        upto = min(steps, int(np.searchsorted(clock, solver.t + 1e-9, side="right")) - 1)
        if upto < next_step:
            continue
        times = clock[next_step : upto + 1]
        fs = solver.dense_output()(times).T.reshape(-1, n, c)  # [len, N, C]
        vals = loss_value(fs, targets, loss=loss, scale=scale)
        bad = [i for i, v in enumerate(vals) if _blown(float(v), blowup_loss)]
        end = bad[0] if bad else len(vals)
        losses[next_step : next_step + end] = vals[:end]
        accs[next_step : next_step + end] = accuracy_value(fs[:end], targets)
        if bad:
            return Trajectory(losses[None], accs[None], (next_step + end,))
        next_step = upto + 1
    return Trajectory(losses[None], accs[None], (None,))


def sde_trajectories(
    op: KernelOperator,
    f0: np.ndarray,
    targets: np.ndarray,
    anchor: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    heavy_ball: bool,
    batch_size: int,
    without_replacement: bool,
    steps: int,
    paths: int,
    rng: np.random.Generator,
    blowup_loss: float = math.inf,
    lr_schedule: np.ndarray | None = None,
) -> Trajectory:
    r"""Minibatch SGD as a function-space SDE (Euler-Maruyama, one step per optimizer step).

    The gradient of :func:`iterate_trajectory` is replaced by the full-batch gradient plus
    Gaussian noise with the minibatch covariance (DESIGN.md §3), all paths in one product:

    .. math::
        G_t = \Theta \Big(\tfrac1N \delta + \sqrt{\tfrac{\kappa}{BN}}\;
              \Delta P \xi_t\Big) + \lambda (f_t - a),\qquad \xi_t \sim N(0, I_N)

    with ``Δ P ξ`` the vector whose block i is ``δ_i (ξ_i - mean ξ)``, κ = (N-B)/(N-1)
    for batches drawn without replacement and 1 with replacement. Momentum and
    ``lr_schedule`` (the step t moves by η m(t) times the buffer: drift and noise alike) as
    in :func:`iterate_trajectory`. Trade-offs: NOTE [noise: simulate vs sde]. Returns a
    ``paths``-path :class:`Trajectory`.
    """
    n, c = f0.shape
    nc = n * c
    kappa = (n - batch_size) / (n - 1) if without_replacement and n > 1 else 1.0
    noise_scale = math.sqrt(kappa / (batch_size * n))
    f = np.repeat(f0.reshape(nc, 1), paths, axis=1)  # [NC, paths]
    anc = anchor.reshape(nc, 1)
    buf = np.zeros_like(f) if heavy_ball and momentum > 0 else None
    step_lr = _step_rates(lr, momentum, heavy_ball, steps, lr_schedule)
    log = _PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)
    alive = log.alive

    def reset(p: int) -> None:
        f[:, p] = f0.reshape(-1)  # keep the dead column finite; it is not reported
        if buf is not None:
            buf[:, p] = 0.0

    def record(t: int) -> None:
        log.record(t, f.T.reshape(paths, n, c), reset)

    record(0)
    for t in range(steps):
        if not alive.any():
            break
        d = loss_grad(f.T.reshape(paths, n, c), targets, loss=loss, scale=scale)  # [P, N, C]
        xi = rng.standard_normal((paths, n))
        xi -= xi.mean(axis=1, keepdims=True)  # P ξ: project out the mean
        x = d * (1.0 / n + noise_scale * xi[:, :, None])
        g = op.matvec(x.reshape(paths, nc).T)  # [NC, paths]
        if weight_decay:
            g += weight_decay * (f - anc)
        if buf is not None:
            buf *= momentum
            buf += g
            g = buf
        f -= step_lr[t] * g
        record(t + 1)
    return log.trajectory()


# ---------------------------------------------------------------------------------------
# MSE in closed form through the eigendecomposition.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralMSE:
    """MSE dynamics decoupled into linear modes ``x_j`` with gradient ``h_j x_j - b_j``.

    With Θ = U diag(λ) U^T (m <= NC directions), residual r = f - sY and decay anchor
    residual ``r_a = a - sY``, the function-space gradient is
    ``G = (1/N) Θ r + λ_wd (r - r_a)``. In the eigenbasis ``z = U^T r`` every direction is
    a scalar mode with ``h = λ_j/N + λ_wd`` and ``b = λ_wd (U^T r_a)_j``; the part of r
    outside span(U) (projected kernels) stays in span{r0⊥, r_a⊥} and is carried by two
    extra modes (α, β), ``r⊥_t = α_t r0⊥ + β_t r_a⊥``, with ``h = λ_wd`` and
    ``b = (0, λ_wd)``.

    Trace kernels (``kron = C``, Θ = K ⊗ I_C with K = U diag(λ) U^T, U ``[N, m]``): the
    eigenvectors are u_j ⊗ e_c with eigenvalue λ_j, so the m·C modes are
    ``Z = U^T R`` (R = r as ``[N, C]``), ordered j-major (mode ``j*C + c``); the energy of
    eigenvalue λ_j is ``‖u_j^T R‖²`` summed over the classes.

    Attributes:
      x0: initial modes ``[m + 2]`` (last two: α_0 = 1, β_0 = 0).
      h: curvatures ``[m + 2]``.
      b: offsets ``[m + 2]``.
      basis: U, ``[NC, m]`` (trace kernels: ``[N, m]``, see ``kron``).
      perp: ``[NC, 2]``: r0⊥ and r_a⊥.
      perp_gram: their Gram matrix ``[2, 2]``.
      num_samples: N.
      kron: 1, or C for a trace kernel: each basis vector u_j stands for the C modes
        u_j ⊗ e_c (then x0, h, b have ``m*C + 2`` entries).
    """

    x0: np.ndarray
    h: np.ndarray
    b: np.ndarray
    basis: np.ndarray
    perp: np.ndarray
    perp_gram: np.ndarray
    num_samples: int
    kron: int = 1

    @property
    def num_modes(self) -> int:
        """Number of eigen-modes (excluding the two ⊥ modes): m, or m·C for a trace kernel."""
        return self.basis.shape[1] * self.kron

    def loss(self, x: np.ndarray) -> np.ndarray:
        """MSE of mode states ``x`` ``[m + 2, T]`` -> ``[T]``: ``(‖z‖² + ‖r⊥‖²) / 2N``."""
        m = self.num_modes
        z2 = np.einsum("jt,jt->t", x[:m], x[:m])
        ab = x[m:]
        perp2 = np.einsum("it,ij,jt->t", ab, self.perp_gram, ab)
        return 0.5 * (z2 + perp2) / self.num_samples

    def residual(self, x: np.ndarray) -> np.ndarray:
        """Residuals ``r_t = U z_t + r⊥_t``, ``[m + 2, T] -> [NC, T]``."""
        m = self.num_modes
        if self.kron == 1:
            return self.basis @ x[:m] + self.perp @ x[m:]
        z = x[:m].reshape(self.basis.shape[1], self.kron, -1)  # [m, C, T]
        r = np.einsum("nj,jct->nct", self.basis, z).reshape(-1, x.shape[1])  # [NC, T]
        return r + self.perp @ x[m:]

    def fixed_point(self) -> np.ndarray:
        """The limit of every stable scheme: ``x* = b/h`` (``x0`` where h = 0)."""
        out = self.x0.copy()
        # eigenvalues below 1e-12 λ_max are round-off of a rank-deficient kernel (as in
        # Kernel.eigh): those modes do not move, so they count as h = 0, not as converging
        pos = self.h > 1e-12 * max(float(self.h.max(initial=0.0)), 0.0)
        out[pos] = self.b[pos] / self.h[pos]
        return out


def spectral_mse(
    lam: np.ndarray,
    basis: np.ndarray,
    residual0: np.ndarray,
    anchor_residual: np.ndarray,
    *,
    num_samples: int,
    weight_decay: float,
    kron: int = 1,
) -> SpectralMSE:
    """Project the MSE problem on the eigenbasis (cost O(NC·m), once per forecast).

    Args:
      lam: eigenvalues of Θ, ``[m]`` (clamped >= 0); of K for a trace kernel.
      basis: eigenvectors U, ``[NC, m]``; ``[N, m]`` eigenvectors of K for a trace kernel.
      residual0: ``f0 - sY`` flattened, ``[NC]``.
      anchor_residual: ``a - sY`` flattened, ``[NC]``.
      num_samples: N.
      weight_decay: λ_wd.
      kron: C for a trace kernel Θ = K ⊗ I_C (modes u_j ⊗ e_c, eigenvalue λ_j repeated C
        times; see :class:`SpectralMSE`), else 1.
    """
    rows, m = basis.shape
    # kron > 1: Z = U^T R with R = r as [N, C], flattened j-major; U Z back to [NC]
    z0 = (basis.T @ residual0.reshape(rows, kron)).reshape(-1)
    za = (basis.T @ anchor_residual.reshape(rows, kron)).reshape(-1)
    lam = np.repeat(lam, kron)
    nc = rows * kron
    if m < rows:
        fit0 = (basis @ z0.reshape(m, kron)).reshape(-1)
        fita = (basis @ za.reshape(m, kron)).reshape(-1)
        perp = np.stack([residual0 - fit0, anchor_residual - fita], axis=1)
    else:  # a full basis leaves no orthogonal complement (only round-off)
        perp = np.zeros((nc, 2))
    wd = weight_decay
    return SpectralMSE(
        x0=np.concatenate([z0, [1.0, 0.0]]),
        h=np.concatenate([lam / num_samples + wd, [wd, wd]]),
        b=np.concatenate([wd * za, [0.0, wd]]),
        basis=basis,
        perp=perp,
        perp_gram=perp.T @ perp,
        num_samples=num_samples,
        kron=kron,
    )


def mode_states(
    problem: SpectralMSE,
    times: np.ndarray,
    *,
    scheme: str,
    lr: float,
    momentum: float = 0.0,
    chunk: int = 256,
    lr_schedule: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Mode states at the sorted integer ``times``, yielded in chunks ``(offset, X [m+2, len])``.

    Schemes (x* the fixed point, h, b as in :class:`SpectralMSE`):

    - ``"gd"``: exact discrete steps with rate ``lr``:  x_t = x* + (1 - lr h)^t (x_0 - x*).
    - ``"flow"``: gradient flow:  x_t = x* + exp(-lr h t) (x_0 - x*).
    - ``"heavy_ball"``: torch SGD momentum, iterated mode-wise in O(m) per step:
      buf = m buf + (h x - b); x -= lr buf.

    For ``"gd"``/``"flow"`` pass the effective rate η/(1-m) as ``lr``. With
    ``lr_schedule`` (multipliers m(t) ``[>= max(times)]``, NOTE [schedules]) step t uses
    ``lr m(t)``: ``"gd"`` and ``"heavy_ball"`` are iterated mode-wise (the per-mode product
    Π_τ (1 - lr m(τ) h); O(m) per step), ``"flow"`` is read at τ_t = Σ_{s<t} m(s).
    """
    x0, h = problem.x0, problem.h
    xs = problem.fixed_point()
    gap = x0 - xs
    if scheme == "flow" and lr_schedule is not None:
        clock = schedule_clock(lr_schedule, int(times[-1]) if len(times) else 0)
        for start in range(0, len(times), chunk):
            tau = clock[times[start : start + chunk].astype(np.int64)]
            with np.errstate(over="ignore", invalid="ignore"):
                yield start, xs[:, None] + np.exp(-lr * h[:, None] * tau[None, :]) * gap[:, None]
        return
    if scheme == "gd" and lr_schedule is not None:
        rates = lr * lr_schedule

        def gd(x: np.ndarray, t: int) -> np.ndarray:
            return x - rates[t] * (problem.h * x - problem.b)

        yield from _stepped_states(x0.copy(), times, gd, chunk)
        return
    if scheme in ("gd", "flow"):
        base = 1.0 - lr * h
        for start in range(0, len(times), chunk):
            t = times[start : start + chunk].astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                if scheme == "gd":
                    # C pow handles negative bases with integral exponents (oscillating modes)
                    decay = np.power(base[:, None], t[None, :])
                else:
                    decay = np.exp(-lr * h[:, None] * t[None, :])
                yield start, xs[:, None] + decay * gap[:, None]
        return
    buf = np.zeros_like(x0)
    hb_rates = None if lr_schedule is None else lr * lr_schedule

    def heavy_ball(x: np.ndarray, t: int) -> np.ndarray:
        buf[:] = momentum * buf + (problem.h * x - problem.b)
        return x - (lr if hb_rates is None else hb_rates[t]) * buf

    yield from _stepped_states(x0.copy(), times, heavy_ball, chunk)


def _stepped_states(
    x: np.ndarray, times: np.ndarray, advance: Callable[[np.ndarray, int], np.ndarray], chunk: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Mode states at the sorted ``times`` by iterating ``x <- advance(x, t)`` once per
    step, yielded in chunks ``(offset, X [modes, len])`` (O(modes) per step)."""
    out = np.empty((x.size, min(chunk, max(len(times), 1))))
    filled, start, t_now = 0, 0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        for i, t_want in enumerate(times):
            while t_now < t_want:
                x = advance(x, t_now)
                t_now += 1
            out[:, filled] = x
            filled += 1
            if filled == out.shape[1] or i == len(times) - 1:
                yield start, out[:, :filled].copy()
                start, filled = i + 1, 0


def scaled_mode_states(
    problem: SpectralMSE,
    times: np.ndarray,
    *,
    scale_t: np.ndarray,
    weight_decay: float,
    scheme: str,
    lr: float,
    momentum: float = 0.0,
    chunk: int = 256,
    lr_schedule: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """As :func:`mode_states`, with the kernel part scaled by s(t).

    Mode j has curvature ``h_j(t) = s(t) λ_j/N + λ_wd`` (the two modes outside span(U):
    λ_wd) and offset ``b_j``; step t -> t+1 uses ``s(t) = scale_t[t]``:

    - ``"gd"``:  x_{t+1} = x_t - lr (h(t) x_t - b)   (λ_wd = 0: the product
      x_t = Π_{τ<t} (1 - lr s(τ) λ_j/N) x_0);
    - ``"flow"``: s constant over [t, t+1): x_{t+1} = x*_t + exp(-lr h(t)) (x_t - x*_t);
    - ``"heavy_ball"``: buf = m buf + (h(t) x - b); x -= lr buf.

    O(modes) per step; ``scale_t`` (and ``lr_schedule``: step t uses ``lr m(t)``, NOTE
    [schedules]) must hold at least ``max(times)`` entries.
    """
    kern = problem.h - weight_decay  # λ_j / N (0 for the two modes outside span(U))
    b = problem.b
    buf = np.zeros_like(problem.x0)

    def advance(x: np.ndarray, t: int) -> np.ndarray:
        h = scale_t[t] * kern + weight_decay
        rate = lr if lr_schedule is None else lr * lr_schedule[t]
        if scheme == "gd":
            return x - rate * (h * x - b)
        if scheme == "flow":
            pos = h > 0
            xs = np.where(pos, b / np.where(pos, h, 1.0), x)
            return xs + np.exp(-rate * h) * (x - xs)
        buf[:] = momentum * buf + (h * x - b)
        return x - rate * buf

    yield from _stepped_states(problem.x0.copy(), times, advance, chunk)


def spectral_loss(
    problem: SpectralMSE, steps: int, *, states: Callable | None = None, **scheme
) -> np.ndarray:
    """MSE at every step 0..T from the modes alone (O(T·m), no NC-sized work), ``[T+1]``.

    ``states``: the mode-state generator (default :func:`mode_states`; the kernel-growth
    option passes :func:`scaled_mode_states`), called as ``states(problem, times, **scheme)``.
    """
    out = np.empty(steps + 1)
    for start, x in (states or mode_states)(problem, np.arange(steps + 1), **scheme):
        with np.errstate(over="ignore", invalid="ignore"):
            out[start : start + x.shape[1]] = problem.loss(x)
    return out


def spectral_accuracy(
    problem: SpectralMSE,
    times: np.ndarray,
    targets: np.ndarray,
    *,
    scale: float,
    states: Callable | None = None,
    **scheme,
) -> np.ndarray:
    """Accuracy at ``times`` from ``f_t = sY + r_t``; O(NC·m) per time (one GEMM per chunk).

    ``states`` as in :func:`spectral_loss`.
    """
    n = targets.shape[0]
    out = np.empty(len(times))
    for start, x in (states or mode_states)(problem, times, **scheme):
        r = problem.residual(x)  # [NC, len]
        f = r.T.reshape(x.shape[1], n, -1)
        f[:, np.arange(n), targets] += scale
        out[start : start + x.shape[1]] = accuracy_value(f, targets)
    return out


# ---------------------------------------------------------------------------------------
# The tangent model's own forecast of the weights (experimental kernel growth).
# ---------------------------------------------------------------------------------------


def displacement_coefficients(
    theta_matvec: Callable[[np.ndarray], np.ndarray],
    f0: np.ndarray,
    targets: np.ndarray,
    *,
    lr: float,
    momentum: float,
    steps: Sequence[int],
    loss: str = "mse",
    scale: float = 1.0,
    scale_t: np.ndarray | None = None,
    horizon: int | None = None,
    lr_schedule: np.ndarray | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    r"""Coefficients ``a_t`` ``[N, C]`` with Δw(t) = J(X)^T a_t for full-batch SGD.

    Torch SGD on the tangent model (heavy ball, dampening 0), in the span of the Jacobian
    rows: the gradient is g_t = J^T δ_t / N, so the buffer and the displacement are
    ``J^T`` times function-space coefficients::

        β_t = m β_{t-1} + δ(f_t)/N,    a_{t+1} = a_t - η β_t,
        f_{t+1} = f_t - η s(t) Θ β_t            (s = 1: the plain tangent model)

    Also returns ‖Δw(t)‖ at every step 0..T (``sqrt(a_t^T Θ a_t)``), ``[T+1]``, with T =
    ``horizon`` (default: the last of ``steps``).

    Args:
      theta_matvec: ``x [NC] -> Θ x``.
      steps: the steps t whose a_t is wanted.
      scale_t: s(t) per step (``None``: 1), at least T entries.
      lr_schedule: learning-rate multipliers m(t) (step t uses η m(t)), at least T
        entries, or ``None``.
    """
    n, c = f0.shape
    horizon = max([*steps, horizon or 0])
    f = f0.reshape(-1).copy()
    beta = np.zeros_like(f)
    a = np.zeros_like(f)
    ta = np.zeros_like(f)  # Θ a
    want = set(int(t) for t in steps)
    out: dict[int, np.ndarray] = {}
    norms = np.zeros(horizon + 1)
    if 0 in want:
        out[0] = a.reshape(n, c).copy()
    for t in range(horizon):
        d = loss_grad(f.reshape(n, c), targets, loss=loss, scale=scale).reshape(-1) / n
        beta = momentum * beta + d
        tb = theta_matvec(beta)
        rate = lr if lr_schedule is None else lr * float(lr_schedule[t])
        a = a - rate * beta
        ta = ta - rate * tb
        s = 1.0 if scale_t is None else float(scale_t[t])
        f = f - rate * s * tb
        norms[t + 1] = math.sqrt(max(float(a @ ta), 0.0))
        if t + 1 in want:
            out[t + 1] = a.reshape(n, c).copy()
    return out, norms


# ---------------------------------------------------------------------------------------
# Head exact, body linear (NOTE [head exact, body linear] in tangentlab.headbody).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadBodyProblem:
    r"""The bilinear model ``f_i = W φ_i + b`` with a linearized body ``φ_i = φ0_i + J_i Δw``.

    Its body enters only through the feature kernel ``K(i, j) = J_i J_j^T`` ``[d, d]``, kept
    exact in the span of the orthonormal ``basis`` Q ``[d, r]`` and isotropic beside it:

    .. math::
        K(i, j) \approx Q\, M(i, j)\, Q^T + \kappa_\perp(i, j)\,(I - Q Q^T)

    Attributes:
      phi0: pre-trained features φ0 ``[N, d]`` (the head's input).
      weight, bias: the head's pre-trained ``W0`` ``[C, d]`` and ``b0`` ``[C]`` (or ``None``:
        a head without bias).
      basis: Q ``[d, r]``.
      block: products with ``M`` ``[N r, N r]`` (sample-major; a kernel operator), or
        ``None`` when no body weight is trained (linear probing).
      rest: products with ``κ_⊥`` ``[N, N]`` (a trace operator), or ``None`` (no body motion
        outside span Q).
      body_jw0: ``J_i w0_body`` ``[N, d]`` for weight decay toward 0, or ``None``.
    """

    phi0: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    basis: np.ndarray
    block: KernelOperator | None
    rest: KernelOperator | None
    body_jw0: np.ndarray | None

    def body_velocity(self, batches: np.ndarray | None, d: np.ndarray,
                      w: np.ndarray) -> np.ndarray:  # fmt: skip
        r"""``Σ_{i∈batch_p} K(·, i) W_p^T δ_{p,i}`` ``[P, N, d]`` for output gradients δ
        ``[P, b, C]`` of P paths with heads W ``[P, C, d]`` and sample ids ``batches``
        ``[P, b]`` (``None``: all N samples, δ ``[P, N, C]``). Each kernel is read once per
        call, not per path. The feature gradients W^T δ are never formed: both parts of K
        act on δ's C columns,

        .. math::
            Q\, M (δ\, W Q)\, Q^T + κ_⊥ δ\, (W - W Q Q^T)

        (N² C instead of N² d for κ_⊥, b C r instead of b d r for the block's input)."""
        q = self.basis
        paths, n, r = d.shape[0], self.phi0.shape[0], q.shape[1]
        if self.block is None:  # no body weight trained (linear probing)
            return np.zeros((paths, *self.phi0.shape))
        wq = w @ q  # [P, C, r]
        a = d @ wq  # [P, b, r]
        inside = np.ascontiguousarray(_cols_paths(self.block, batches, a)).reshape(-1, r)
        if self.rest is None:
            return (inside @ q.T).reshape(paths, n, -1)  # one GEMM for all paths
        kd = _cols_paths(self.rest, batches, d).reshape(paths, n, -1)  # κ_⊥ δ [P, N, C]
        # [M a | κ_⊥ δ] @ [Qᵀ ; W - W Q Qᵀ]: one product writes the [P, N, d] result once
        left = np.concatenate([inside.reshape(paths, n, r), kd], axis=2)
        right = np.concatenate([np.broadcast_to(q.T, (paths, r, q.shape[0])),
                                w - wq @ q.T], axis=1)  # fmt: skip
        return left @ right

    def in_basis(self, *, decay_to_zero: bool = False) -> HeadBodyProblem | None:
        r"""The same model in the coordinates of the subspace it never leaves, else ``None``.

        Let S = span(Q, φ0_1..φ0_N, rows of W0) (NOTE [head-body in span Q]). The head's
        update -η Σ δ_i φ_iᵀ lies in span(φ_i), the features' -η K Wᵀ δ in
        Q + (I - Q Qᵀ) span(rows of W), and (I - Q Qᵀ) S ⊂ S because Q ⊂ S: by induction
        every φ_i and every row of W stay in S, and so do momentum buffers and decay toward
        W0. With an orthonormal basis B = [Q, Q2] of S (r' = dim S <= r + N + C) the state
        is carried as ``φ B`` ``[N, r']`` and ``W B`` ``[C, r']``; in B's coordinates the
        kernel keeps its form, ``E M Eᵀ + κ_⊥ (I - E Eᵀ)`` with E the first r coordinate
        axes, and outputs ``(W B)(φ B)ᵀ`` are exact. A step costs N r' instead of N d per
        sample. When Q already spans φ0 and W0 (``directions`` >= N), B = Q and κ_⊥ drops
        out (it only acts on W - W Q Qᵀ = 0). Decay toward 0 also pulls φ toward
        φ0 - J w0_body, so ``decay_to_zero`` adds the rows of J w0_body to S. Directions of
        S below 1e-10 of the largest norm among its generators are dropped. ``None`` when
        no body weight is trained, or when S fills R^d (r' >= d, or as many generators as
        the d - r directions beside Q: nothing to gain)."""
        key = bool(decay_to_zero and self.body_jw0 is not None)
        cache = self.__dict__.setdefault("_reduced", {})
        if key not in cache:
            red = self._reduce(with_jw0=key)
            cache[key] = None if red is None else red[0]
        return cache[key]

    def with_eval_in_basis(self, ev: HeadBodyEval, *, decay_to_zero: bool = False,
                           ) -> tuple[HeadBodyProblem, HeadBodyEval] | None:  # fmt: skip
        """``in_basis`` with a held-out set moved along: S also holds its features φ0_e (and
        J_e w0_body with decay toward 0), whose updates K(e, i) Wᵀ δ_i lie in
        Q + (I - Q Qᵀ) span(W) like the training ones; the pair in S's coordinates, or
        ``None`` (as ``in_basis``)."""
        key = bool(decay_to_zero and self.body_jw0 is not None)
        extra = [ev.phi0] + ([ev.body_jw0] if key and ev.body_jw0 is not None else [])
        red = self._reduce(with_jw0=key, extra=extra)
        if red is None:
            return None
        p, b = red
        return p, HeadBodyEval(
            phi0=ev.phi0 @ b, targets=ev.targets, block=ev.block, rest=ev.rest,
            body_jw0=ev.body_jw0 @ b if key and ev.body_jw0 is not None else None,
        )  # fmt: skip

    @cached_property
    def spans_features(self) -> bool:
        """Whether span Q holds every φ0_i and the rows of W0 (to 1e-9 of their norms)."""
        return self._spanned(self.phi0) and self._spanned(self.weight)

    def _spanned(self, x: np.ndarray) -> bool:
        q = self.basis
        return bool(np.linalg.norm(x - (x @ q) @ q.T) <= 1e-9 * max(np.linalg.norm(x), 1e-300))

    def _reduce(self, *, with_jw0: bool, extra: Sequence[np.ndarray] = (),
                ) -> tuple[HeadBodyProblem, np.ndarray] | None:  # fmt: skip
        """The problem in S's coordinates and S's basis B ``[d, r']`` (``in_basis``), S
        also spanning the rows of ``extra``."""
        q = self.basis
        d, r = q.shape
        if self.block is None or r >= d:
            return None
        gens = [self.phi0, self.weight, *extra] + ([self.body_jw0] if with_jw0 else [])
        if sum(g.shape[0] for g in gens) >= d - r:  # S is (almost surely) all of R^d
            return None
        x = np.concatenate(gens, axis=0).T  # [d, m]: S's generators beside Q
        scale = float(np.linalg.norm(x, axis=0).max(initial=0.0))
        x = x - q @ (q.T @ x)
        u, sv, _ = np.linalg.svd(x, full_matrices=False)
        q2 = u[:, sv > 1e-10 * max(scale, 1e-300)]
        if r + q2.shape[1] >= d:
            return None
        b = np.concatenate([q, q2], axis=1)  # [d, r'], orthonormal, Q first
        jw0 = self.body_jw0
        return HeadBodyProblem(
            phi0=self.phi0 @ b, weight=self.weight @ b, bias=self.bias,
            basis=np.eye(b.shape[1], r), block=self.block,
            rest=self.rest if q2.shape[1] else None,
            body_jw0=jw0 @ b if with_jw0 else None,
        ), b  # fmt: skip


# NOTE [head-body Gram]. A projected block is kept as its features Φ [N r, k] (NOTE
# [head-body features] in tangentlab.headbody): a product through them, Φ (Φᵀ x), reads
# Φ twice (2 N r k entries); through Θ = Φ Φᵀ (same dtype) it reads (N r)². Forming Θ costs
# 2 (N r)² k flops. When N r <= k, head_body_trajectory runs through Θ if the run has at
# least N r k / (4k - 2 N r) steps: 137, 473, 931 and 1954 for N r = 512, 1536, 2560 and
# 4000 at k = 4096, 2.9-4.6x the break-even measured on this project's 2-core machine
# (31, 103, 214 and 664 products; RESULTS.md "headbody-speed"), so forming Θ pays for itself
# with a margin. A minibatch forecast of P sample paths counts P products a step (T steps:
# P T products); when the paths' batches hold many rows (P b >= N/2) a step scatters them
# into [P, N r] and multiplies every path at once, through Θ or through Φ (two GEMMs: a
# gather of each path's rows of Φ would copy P b r k entries a step). Θ is kept on the
# operator for the forecasts after it, but the choice depends only on the run's own length
# and paths: a forecast gives the same numbers whatever ran before it. Both routes multiply
# in float32 (round-off ~1e-7, far below the sketch's own error of ~10%).


# NOTE [head-body in span Q]. The head-exact model never leaves S = span(Q, φ0, W0) (plus
# J w0_body with decay toward 0; HeadBodyProblem.in_basis), so head_body_trajectory runs it
# in S's r' <= r + N + C coordinates instead of d. The default Q (W0's rows and C principal
# directions of φ0) lies in span(φ0, W0), so r' = N + C: for EfficientNet-Lite's d = 1280,
# N = 128 and C = 8, r' = 136, and the [P, N, d] products of every step shrink ~9x; with Q
# spanning φ0 (directions >= N) B = Q and κ_⊥ also drops out. A held-out set (eval_set)
# adds its features' rows to S (HeadBodyProblem.with_eval_in_basis): r' <= r + N + M + C.


@dataclass(frozen=True)
class HeadBodyEval:
    r"""A held-out set of the head-exact, body-linear model (NOTE [head exact, body linear]).

    Its features move with the body's weights like the training ones, ``φ_e = φ0_e + J_e Δw``,
    through the cross feature kernel ``K(e, i) = J_e J_i^T``, kept as the training one:
    ``Q M(e, i) Q^T + κ_⊥(e, i) (I - Q Q^T)`` (same Q and probes), so
    ``G_{φ_e} = (1/|b|) Σ_{i∈b} K(e, i) W^T δ_i + λ (φ_e - φ0_e + c_e)``; its outputs are
    ``W φ_e + b`` with the training run's head.

    Attributes:
      phi0: held-out features φ0_e ``[M, d]``.
      targets: held-out labels ``[M]``.
      block: ``M(X_e, X)`` ``[M r, N r]`` (a :class:`CrossKernelOperator` with r outputs), or
        ``None`` (linear probing).
      rest: ``κ_⊥(X_e, X)`` ``[M, N]``, or ``None``.
      body_jw0: ``J_e w0_body`` ``[M, d]`` (decay toward 0), or ``None``.
    """

    phi0: np.ndarray
    targets: np.ndarray
    block: CrossKernelOperator | None
    rest: np.ndarray | None
    body_jw0: np.ndarray | None

    @property
    def f0(self) -> np.ndarray:  # shape only: [M, d] (the logits need the head)
        return self.phi0

    def velocity(self, q: np.ndarray, batches: np.ndarray | None, d: np.ndarray,
                 w: np.ndarray) -> np.ndarray:  # fmt: skip
        """``Σ_{i∈batch_p} K(e, i) W_p^T δ_{p,i}`` ``[P, M, d]`` (as
        HeadBodyProblem.body_velocity: both parts act on δ ``[P, b, C]``)."""
        paths, m, r = d.shape[0], self.phi0.shape[0], q.shape[1]
        if self.block is None:
            return np.zeros((paths, *self.phi0.shape))
        wq = w @ q  # [P, C, r]
        a = d @ wq  # [P, b, r]
        theta = self.block.theta  # [M r, N r]
        n = theta.shape[1] // r
        if batches is not None and 2 * batches.size < n:  # few columns: gather them per path
            inside = np.stack([self.block.cols_matvec(batches[p], a[p]) for p in range(paths)])
        else:  # one GEMM for all paths (batch rows scattered, repeated ids adding up)
            dense = a if batches is None else _scatter_rows(batches, a, n, np.float64)
            inside = (theta @ dense.reshape(paths, -1).T).T
        out = (np.ascontiguousarray(inside).reshape(-1, r) @ q.T).reshape(paths, m, -1)
        if self.rest is not None:
            w_perp = w - wq @ q.T  # [P, C, d]
            if batches is None:
                kd = np.matmul(self.rest, d)  # [M, N] @ [P, N, C]
            else:  # κ_⊥ transposed: a batch's columns are contiguous rows
                rows = self._rest_t
                kd = np.stack([rows[batches[p]].T @ d[p] for p in range(paths)])
            out += kd @ w_perp
        return out

    @property
    def _rest_t(self) -> np.ndarray:
        if "_rt" not in self.__dict__:
            object.__setattr__(self, "_rt", np.ascontiguousarray(self.rest.T))
        return self.__dict__["_rt"]


def _cols_paths(op: KernelOperator, batches: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """``Σ_j Θ[:, batch_pj] x_pj`` for every path p -> ``[P, N*c]`` (``x`` ``[P, b, c]``);
    full batch (``batches=None``): ``Θ x_p``."""
    paths = x.shape[0]
    if batches is None:
        return op.matvec(x.reshape(paths, -1).T).T
    rows = getattr(op, "_rows", None)  # [N, c, .] for the dense and feature operators
    many = rows is not None and 2 * batches.size >= rows.shape[0]
    if isinstance(op, FeatureKernelOperator) and many:
        # many rows: scattered as below, then Φ (Φᵀ X): two GEMMs read Φ for every path
        # at once (gathering each path's rows of Φ copies P b c k entries per step)
        return op.matvec(_scatter_rows(batches, x, rows.shape[0], op.features.dtype).T).T
    if isinstance(op, FeatureKernelOperator):  # Φ Σ_j Φ_j^T x_j: one pass over Φ
        xs = op.cast(x)
        v = np.stack([np.einsum("bc,bck->k", xs[p], op._rows[batches[p]]) for p in range(paths)])
        return (op.features @ v.T).T.astype(np.float64, copy=False)
    if isinstance(op, TraceKernelOperator):  # K[:, batch_p] X_p for all paths in one call
        return np.matmul(op.k[batches].transpose(0, 2, 1), x).reshape(paths, -1)
    if isinstance(op, DenseKernelOperator) and many:
        # many rows: scatter the paths' batch rows (repeated ids add up) into [P, N c], then
        # one GEMM reads Θ once for every path
        dense = _scatter_rows(batches, x, rows.shape[0], op.theta.dtype)
        return (op.theta @ dense.T).T.astype(np.float64, copy=False)
    return np.stack([op.cols_matvec(batches[p], x[p]) for p in range(paths)])


def _scatter_rows(batches: np.ndarray, x: np.ndarray, n: int, dtype) -> np.ndarray:
    """``x`` ``[P, b, c]`` scattered to its paths' sample rows -> ``[P, n c]`` in ``dtype``
    (a sample drawn twice in a path's batch adds up)."""
    paths, b = batches.shape
    pick = np.zeros((paths, n, b), dtype=dtype)  # pick[p, i, j] = [batch_pj = i]
    pick[np.arange(paths)[:, None], batches, np.arange(b)] = 1.0
    return (pick @ x.astype(dtype, copy=False)).reshape(paths, -1)


def _delta(f: np.ndarray, y: np.ndarray, loss: str, scale: float) -> np.ndarray:
    """``δ = ∂ℓ/∂f`` for outputs ``f`` ``[..., C]`` and labels ``y`` ``[...]`` (any shape)."""
    onehot = np.eye(f.shape[-1])[y]
    if loss == "mse":
        return f - scale * onehot
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True) - onehot


def head_body_trajectory(
    problem: HeadBodyProblem,
    targets: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    decay_to: str,
    heavy_ball: bool,
    steps: int,
    batches: Sequence[Sequence[np.ndarray]] | None = None,
    blowup_loss: float = math.inf,
    lr_schedule: np.ndarray | None = None,
    eval_set: HeadBodyEval | None = None,
    stop_at_first_blowup: bool = False,
) -> Trajectory:
    r"""Exact torch SGD of the head-exact, body-linear model, all paths at once.

    The state is the head ``(W, b)`` and the features ``φ_i = φ0_i + J_i Δw``; the body's
    momentum buffer is carried as its image ``J_i buf`` (J is constant). With
    ``δ_i = ∂ℓ/∂f_i`` at ``f_i = W φ_i + b``, batch ``b_t``:

    .. math::
        G_W = \tfrac{1}{|b_t|}\sum_{i∈b_t} δ_i φ_i^T + λ (W - W_a),\quad
        G_b = \tfrac{1}{|b_t|}\sum_{i∈b_t} δ_i + λ (b - b_a),\quad
        G_{φ_j} = \tfrac{1}{|b_t|}\sum_{i∈b_t} K(j, i)\, W^T δ_i + λ (φ_j - φ0_j + c_j)

    then ``buf = m buf + G`` and ``x -= η buf`` for each of W, b, φ (torch SGD,
    ``dampening=0``). Decay toward 0: ``W_a = 0``, ``b_a = 0``, ``c = J w0_body``; toward
    the pre-trained weights: ``W_a = W0``, ``b_a = b0``, ``c = 0``. ``heavy_ball=False``
    uses plain steps at ``η/(1-m)``.

    Args:
      batches: per path, the sample ids of every step (:func:`batch_schedule`; the paths'
        batches of one step have one size), or ``None``: one full-batch path.
      lr_schedule: multipliers m(t) ``[>= T]``: step t uses η m(t) (NOTE [schedules]).
      eval_set: a held-out set (:class:`HeadBodyEval`) moved along: its features take the
        same steps through the cross feature kernel, its outputs use the same head.
      stop_at_first_blowup: stop all paths once one blows up (the caller only needs to
        know whether any does; the later steps are then NaN for every path).
      Others as :func:`iterate_trajectory`.

    Returns a :class:`Trajectory` with one row per path.
    """
    p = problem
    to_zero = bool(weight_decay) and decay_to == "zero"
    if eval_set is None:  # NOTE [head-body in span Q]
        p = p.in_basis(decay_to_zero=to_zero) or p
    else:
        p, eval_set = p.with_eval_in_basis(eval_set, decay_to_zero=to_zero) or (p, eval_set)
    paths = 1 if batches is None else len(batches)
    if isinstance(p.block, FeatureKernelOperator) and p.block.gram_pays(steps * paths):
        p = replace(p, block=p.block.gram())  # NOTE [head-body Gram]
    st = _HeadBodyState(p, paths, decay_to, eval_set)
    rates = _step_rates(lr, momentum, heavy_ball, steps, lr_schedule)
    use_buf = heavy_ball and momentum > 0
    log = _PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)
    st.alive = log.alive  # gradients of a blown-up path are zero
    log.record(0, st.outputs(), st.reset)
    if eval_set is not None:
        log.record_eval(0, st.eval_outputs(), eval_set.targets)
    for t in range(steps):
        if not log.alive.any() or (stop_at_first_blowup and not log.alive.all()):
            break
        idx = None if batches is None else np.stack([b[t] for b in batches])  # [P, b]
        grads = st.gradients(idx, targets, loss, scale)
        if weight_decay:
            st.add_decay(grads, weight_decay)
        if use_buf:
            st.bufs = [g if v is None else v * momentum + g for v, g in zip(st.bufs, grads)]
            grads = st.bufs
        st.step(rates[t], grads, fresh=not use_buf)
        log.record(t + 1, st.outputs(), st.reset)
        if eval_set is not None:
            log.record_eval(t + 1, st.eval_outputs(), eval_set.targets)
    return log.trajectory()


class _HeadBodyState:
    """W ``[P, C, d]``, b ``[P, C]``, φ ``[P, N, d]`` and momentum buffers of P paths."""

    def __init__(self, p: HeadBodyProblem, paths: int, decay_to: str,
                 ev: HeadBodyEval | None = None):  # fmt: skip
        self.p, self.ev = p, ev
        self.w = np.repeat(p.weight[None], paths, axis=0)
        self.b = None if p.bias is None else np.repeat(p.bias[None], paths, axis=0)
        self.phi = np.repeat(p.phi0[None], paths, axis=0)
        self.phi_e = None if ev is None else np.repeat(ev.phi0[None], paths, axis=0)
        self.bufs: list = [None, None, None, None]
        to_zero = decay_to == "zero"
        self.anchor_w = 0.0 if to_zero else p.weight
        self.anchor_b = 0.0 if to_zero or p.bias is None else p.bias
        self.offset = p.body_jw0 if to_zero and p.body_jw0 is not None else 0.0
        self.offset_e = (ev.body_jw0 if ev is not None and to_zero and ev.body_jw0 is not None
                         else 0.0)  # fmt: skip
        self.alive = np.ones(paths, dtype=bool)
        self._f: np.ndarray | None = None  # outputs at the current state (logged, then used)

    def outputs(self) -> np.ndarray:
        if self._f is None:
            # contiguous Wᵀ: a transposed view sends numpy's stacked matmul off BLAS (~100x)
            f = self.phi @ np.ascontiguousarray(self.w.transpose(0, 2, 1))  # [P, N, C]
            self._f = f if self.b is None else f + self.b[:, None, :]
        return self._f

    def step(self, lr: float, grads: list[np.ndarray], *, fresh: bool) -> None:
        """``x -= lr g`` for W, b, φ (and φ_e); ``fresh``: the gradients are not momentum
        buffers, so the [P, N, d] ones are scaled in place (no temporary that size)."""
        self.w -= lr * grads[0]
        if self.b is not None:
            self.b -= lr * grads[1]
        for x, g in ((self.phi, grads[2]), (self.phi_e, grads[3] if len(grads) > 3 else None)):
            if g is None:
                continue
            if fresh:
                g *= lr
                x -= g
            else:
                x -= lr * g
        self._f = None

    def eval_outputs(self) -> np.ndarray:
        f = self.phi_e @ np.ascontiguousarray(self.w.transpose(0, 2, 1))  # [P, M, C]
        return f if self.b is None else f + self.b[:, None, :]

    def gradients(self, idx, targets, loss: str, scale: float) -> list[np.ndarray]:
        f = self.outputs()
        if idx is None:
            fb, phib, yb = f, self.phi, np.broadcast_to(targets, f.shape[:2])
        else:
            rows = np.arange(f.shape[0])[:, None]
            fb, phib, yb = f[rows, idx], self.phi[rows, idx], targets[idx]
        d = _delta(fb, yb, loss, scale) / fb.shape[1]  # [P, b, C]
        d[~self.alive] = 0.0  # a blown-up path stays where it stopped
        dt = np.ascontiguousarray(d.transpose(0, 2, 1))  # [P, C, b] (stacked matmul on BLAS)
        grads = [dt @ phib, d.sum(axis=1), self.p.body_velocity(idx, d, self.w)]
        if self.ev is not None:
            grads.append(self.ev.velocity(self.p.basis, idx, d, self.w))
        return grads

    def add_decay(self, grads: list[np.ndarray], wd: float) -> None:
        live = self.alive[:, None, None]
        grads[0] += live * wd * (self.w - self.anchor_w)
        if self.b is not None:
            grads[1] += self.alive[:, None] * wd * (self.b - self.anchor_b)
        grads[2] += live * wd * (self.phi - self.p.phi0 + self.offset)
        if self.ev is not None:
            grads[3] += live * wd * (self.phi_e - self.ev.phi0 + self.offset_e)

    def reset(self, q: int) -> None:
        """Path q blew up: back to finite values (no longer reported), buffers zeroed."""
        self.w[q], self.phi[q] = self.p.weight, self.p.phi0
        self._f = None
        if self.ev is not None:
            self.phi_e[q] = self.ev.phi0
        if self.b is not None:
            self.b[q] = self.p.bias
        self.bufs = [None if v is None else _zero_row(v, q) for v in self.bufs]


def _zero_row(v: np.ndarray, q: int) -> np.ndarray:
    v = v.copy()
    v[q] = 0.0
    return v


class HeadBodyLogitOperator:
    r"""Products with the logit kernel of the head-exact model at its start (W0, φ0):

    .. math::
        \Theta_0(i, j) = W_0 K(i, j) W_0^T + (φ0_i · φ0_j + 1_{\text{bias}})\, I_C

    the tangent model's NTK (exact: the rows of W0 lie in span Q). Used for λ_max; in Q's
    coordinates when they hold φ0 (NOTE [head-body in span Q]: the same products).
    """

    name = "head-body"

    def __init__(self, problem: HeadBodyProblem):
        self.problem = problem.in_basis() or problem
        self.num_classes = problem.weight.shape[0]

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``Θ0 x`` for ``x`` ``[NC]``."""
        p = self.problem
        xm = x.reshape(p.phi0.shape[0], -1)  # [N, C]
        out = p.phi0 @ (p.phi0.T @ xm)
        if p.bias is not None:
            out += xm.sum(axis=0)
        if p.block is not None:
            out += p.body_velocity(None, xm[None], p.weight[None])[0] @ p.weight.T
        return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------
# AdamW on the tangent model (NOTE [adam on the tangent model] in tangentlab.adam).
# ---------------------------------------------------------------------------------------


def _adam_rates(lr: float, steps: int, lr_schedule: np.ndarray | None) -> np.ndarray:
    return np.full(steps, lr) if lr_schedule is None else lr * lr_schedule[:steps]


def _scatter_batch(f: np.ndarray, targets: np.ndarray, idx: np.ndarray, loss: str,
                   scale: float) -> np.ndarray:  # fmt: skip
    """``δ̄ = (1/|b|) Σ_{i∈b} e_i ⊗ δ_i`` ``[N*C]`` of one path's outputs ``f`` ``[N, C]``
    (duplicates of a batch drawn with replacement add up, as in the real batch mean)."""
    out = np.zeros_like(f)
    np.add.at(out, idx, _delta(f[idx], targets[idx], loss, scale) / len(idx))
    return out.reshape(-1)


def adam_trajectory(
    jacobian: np.ndarray,
    f0: np.ndarray,
    targets: np.ndarray,
    w0: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    steps: int,
    batches: Sequence[Sequence[np.ndarray]] | None = None,
    blowup_loss: float = math.inf,
    lr_schedule: np.ndarray | None = None,
    block_sizes: Sequence[int] | None = None,
) -> Trajectory:
    r"""Exact ``torch.optim.AdamW`` on the tangent model ``f = f0 + J (w - w0)``, in weight
    space, all paths at once.

    With the batch gradient ``g_t = (1/|b_t|) Σ_{i∈b_t} J_i^T δ_i(f_t)``, k = t + 1 and
    η_t = η m(t):

    .. math::
        w \leftarrow w (1 - η_t λ),\quad m = β_1 m + (1-β_1) g_t,\quad
        v = β_2 v + (1-β_2) g_t^2,\quad
        w \leftarrow w - \frac{η_t}{1-β_1^k} \frac{m}{\sqrt{v/(1-β_2^k)} + ε}

    ``block_sizes`` (the numbers of weights of consecutive tensors, summing to P) switches
    to per-tensor Adam: one second moment per tensor l, ``v_l = β_2 v_l + (1-β_2)
    ‖g_l‖²/n_l`` (the mean square of its gradient), shared by its n_l coordinates.

    Args:
      jacobian: J ``[N*C, P]`` (sample-major rows).
      f0, targets, w0: initial outputs ``[N, C]``, labels ``[N]``, pre-trained weights ``[P]``
        (the decoupled decay acts on the actual weights w).
      betas, eps, weight_decay: torch AdamW's β1, β2, ε, λ.
      batches: per path, the sample ids of every step (:func:`batch_schedule`), or ``None``:
        one full-batch path.
      lr_schedule: multipliers m(t) ``[>= T]`` (NOTE [schedules]).
      Others as :func:`iterate_trajectory`.

    Returns a :class:`Trajectory` with one row per path. Cost per step and path: one
    product with J for the outputs (NC·P) and |b|·C·P for the gradient.
    """
    n, c = f0.shape
    paths = 1 if batches is None else len(batches)
    b1, b2 = betas
    rates = _adam_rates(lr, steps, lr_schedule)
    w = np.repeat(w0[None], paths, axis=0)
    m, v = np.zeros_like(w), None
    sizes = None if block_sizes is None else np.asarray(block_sizes, dtype=np.int64)
    v = np.zeros_like(w) if sizes is None else np.zeros((paths, sizes.size))
    f = np.repeat(f0.reshape(1, -1), paths, axis=0)
    log = _PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)
    alive = log.alive
    jac3 = jacobian.reshape(n, c, -1)

    def reset(q: int) -> None:
        w[q], m[q], v[q], f[q] = w0, 0.0, 0.0, f0.reshape(-1)

    def record(t: int) -> None:
        log.record(t, f.reshape(paths, n, c), reset)

    record(0)
    for t in range(steps):
        if not alive.any():
            break
        fm = f.reshape(paths, n, c)
        if batches is None:
            g = (loss_grad(fm, targets, loss=loss, scale=scale).reshape(paths, -1) / n) @ jacobian
        elif paths * len(batches[0][t]) >= n:  # one pass over J for all paths
            d = np.stack([_scatter_batch(fm[q], targets, batches[q][t], loss, scale)
                          for q in range(paths)])  # fmt: skip
            g = d @ jacobian
        else:  # read only the batches' rows of J
            g = np.empty_like(w)
            for q in range(paths):
                idx = batches[q][t]
                d = _delta(fm[q, idx], targets[idx], loss, scale) / len(idx)  # [b, C]
                g[q] = d.reshape(-1) @ jac3[idx].reshape(-1, jac3.shape[2])
        eta, k = rates[t], t + 1
        live = alive[:, None]
        if weight_decay:  # decoupled: on the actual weights, before the Adam step (torch)
            w *= np.where(live, 1.0 - eta * weight_decay, 1.0)
        m += (1.0 - b1) * (g - m)  # torch: exp_avg.lerp_(grad, 1 - β1)
        if sizes is None:
            v *= b2
            v += (1.0 - b2) * g * g
            root = np.sqrt(v)
        else:
            sq = np.add.reduceat(g * g, np.r_[0, np.cumsum(sizes)[:-1]], axis=1) / sizes
            v *= b2
            v += (1.0 - b2) * sq
            root = np.repeat(np.sqrt(v), sizes, axis=1)
        denom = root / math.sqrt(1.0 - b2**k) + eps
        w -= np.where(live, (eta / (1.0 - b1**k)) * m / denom, 0.0)
        f = f0.reshape(1, -1) + (w - w0) @ jacobian.T
        record(t + 1)
    return log.trajectory()


def block_adam_trajectory(
    thetas: Sequence[np.ndarray],
    block_sizes: Sequence[int],
    f0: np.ndarray,
    targets: np.ndarray,
    anchor: np.ndarray,
    *,
    loss: str,
    scale: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    steps: int,
    batches: Sequence[Sequence[np.ndarray]] | None = None,
    blowup_loss: float = math.inf,
    lr_schedule: np.ndarray | None = None,
) -> Trajectory:
    r"""Per-tensor AdamW of the tangent model in function space, from per-tensor kernels
    ``Θ_l = J_l J_l^T`` (exact for that variant: :func:`adam_trajectory` with
    ``block_sizes``), all paths at once.

    With ``δ̄_t`` the batch-averaged output gradient (``(1/|b|) δ_i`` at the rows of sample
    i ∈ b_t, 0 elsewhere), the image ``u_l = J_l m_l`` of tensor l's first moment and its
    scalar second moment:

    .. math::
        u_l = β_1 u_l + (1-β_1) Θ_l δ̄_t,\quad
        v_l = β_2 v_l + (1-β_2)\, δ̄_t^T Θ_l δ̄_t / n_l,

        f \leftarrow f - η_t λ (f - a)
            - \sum_l \frac{η_t}{1-β_1^k} \frac{u_l}{\sqrt{v_l/(1-β_2^k)} + ε}

    (``‖g_l‖² = δ̄^T Θ_l δ̄``; ``a = f0 - J w0``: the decoupled decay of w toward 0 maps to
    ``-η_t λ J w = -η_t λ (f - a)``). Never touches the P weights.

    Args:
      thetas: Θ_l ``[N*C, N*C]`` per tensor (L of them).
      block_sizes: n_l, the number of weights of tensor l ``[L]``.
      anchor: ``a = f0 - J w0`` ``[N, C]`` (only read when ``weight_decay > 0``).
      Others as :func:`adam_trajectory`.
    """
    n, c = f0.shape
    paths = 1 if batches is None else len(batches)
    b1, b2 = betas
    sizes = np.asarray(block_sizes, dtype=np.float64)
    rates = _adam_rates(lr, steps, lr_schedule)
    nb = len(thetas)
    f = np.repeat(f0.reshape(1, -1), paths, axis=0)
    anc = anchor.reshape(1, -1)
    u, v = np.zeros((paths, nb, n * c)), np.zeros((paths, nb))
    log = _PathLog(paths, steps, targets, loss=loss, scale=scale, blowup_loss=blowup_loss)
    alive = log.alive

    def reset(q: int) -> None:
        f[q], u[q], v[q] = f0.reshape(-1), 0.0, 0.0

    def record(t: int) -> None:
        log.record(t, f.reshape(paths, n, c), reset)

    record(0)
    for t in range(steps):
        if not alive.any():
            break
        fm = f.reshape(paths, n, c)
        h = np.empty_like(u)  # Θ_l δ̄ per path and tensor
        if batches is None:
            d = loss_grad(fm, targets, loss=loss, scale=scale).reshape(paths, -1) / n
            for j, th in enumerate(thetas):
                h[:, j] = d @ th  # Θ_l symmetric
        else:
            d = np.stack([_scatter_batch(fm[q], targets, batches[q][t], loss, scale)
                          for q in range(paths)])  # fmt: skip
            for q in range(paths):
                rows = np.unique(batches[q][t])
                cols = (rows[:, None] * c + np.arange(c)).reshape(-1)
                for j, th in enumerate(thetas):
                    h[q, j] = d[q, cols] @ th[cols]  # the batch's rows of Θ_l
        sq = np.einsum("pk,plk->pl", d, h)  # ‖g_l‖² = δ̄ᵀ Θ_l δ̄
        eta, k = rates[t], t + 1
        live = alive[:, None]
        u += (1.0 - b1) * (h - u)
        v *= b2
        v += (1.0 - b2) * sq / sizes
        denom = np.sqrt(v) / math.sqrt(1.0 - b2**k) + eps  # [paths, L]
        step = np.einsum("plk,pl->pk", u, (eta / (1.0 - b1**k)) / denom)
        if weight_decay:
            step += eta * weight_decay * (f - anc)
        f -= np.where(live, step, 0.0)
        record(t + 1)
    return log.trajectory()

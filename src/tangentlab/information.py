"""Smooth unique information of training samples, in the weights and in the function.

Harutyunyan, Achille, Paolini, Majumder, Ravichandran, Bhotika, Soatto, "Estimating
informativeness of samples with Smooth Unique Information", ICLR 2021,
https://arxiv.org/abs/2101.06640 (authors' code: github.com/awslabs/aws-cv-unique-information).

NOTE [unique information]. Let A be the training algorithm (here: the tangent model trained
from w0 by SGD for ``time`` steps on the MSE loss of DESIGN.md §2), w = A(S) its weights
trained on all N samples and w_{-i} = A(S_{-i}) those trained without sample i (the same
optimizer, the loss averaged over the N-1 remaining samples). A deterministic A carries
infinite information in the KL sense, so the paper *smooths* it with Gaussian noise,
Q_{W|S} = N(A(S), Σ), and defines the smooth sample information

.. math::

    SI_\\Sigma(z_i) = KL(Q_{W|S} \\| Q_{W|S_{-i}})
                   = \\tfrac12 (w - w_{-i})^T \\Sigma^{-1} (w - w_{-i})     [nats]

and its functional version (F-SI), the KL between the predictions smoothed by Gaussian
output noise N(0, σ² I) on an evaluation set X' of M samples (per evaluation sample):

.. math::

    F\\text{-}SI(z_i) = \\frac{1}{2\\sigma^2}\\,\\frac1M \\sum_{x \\in X'}
                       \\lVert f_w(x) - f_{w_{-i}}(x) \\rVert^2 .

Noise models Σ (``noise=``):

- ``"isotropic"``: Σ = σ² I (the paper's plain smoothing; the authors' "weights-plain");
- ``"sgd"``: the stationary covariance of minibatch SGD around the weights w (Mandt,
  Hoffman & Blei 2017; the authors' "weights-full" measure, ``stability.weight_stability``
  with ``without_sgd=False``), the solution of the Lyapunov equation

  .. math::

      H\\Sigma + \\Sigma H = \\frac{\\tilde\\eta}{B}\\,\\kappa\\,\\Lambda,\\quad
      H = \\tfrac1N J^TJ,\\quad
      \\Lambda = \\tfrac1N \\sum_i g_i g_i^T - \\bar g \\bar g^T,\\quad g_i = J_i^T \\delta_i,

  with η̃ = η/(1-m) (η: the rate of the run's last step under a schedule), B the batch
  size, κ = (N-B)/(N-1) for sampling without replacement (1 with replacement) and
  δ_i = f_i - s·y_i the residuals at the end of training.

Closed form through the kernel (no P-dimensional object is ever formed). Every weight
displacement of gradient training lies in the row space of J: w_t - w0 = J^T a_t, with
f_t - f0 = Θ a_t. In the eigenbasis Θ = U diag(λ) U^T (kernel's cached ``eigh``) the MSE
dynamics of full-batch SGD (momentum m, rates η_t, loss averaged over N' samples) act mode
by mode: a_T = -U diag(c(λ)) U^T r_0, r_0 = f0 - s·Y, with

.. math::

    c(\\lambda) = \\frac{1 - (1 - \\eta\\lambda/N')^T}{\\lambda}\\ (m = 0,\\ \\text{constant}
    \\ \\eta),\\qquad c(\\lambda) = 1/\\lambda\\ (T = \\infty)

and, otherwise, the heavy-ball recursion β_t = m β_{t-1} + r_t/N', a_{t+1} = a_t - η_t β_t
run per mode. Modes with λ = 0 do not move the weights (J^T u = 0) and are dropped. With
d_i = a - ã_{-i} (ã_{-i}: the coefficients of the run without i, zero in block i):

- w - w_{-i} = J^T d_i, so ‖w - w_{-i}‖² = d_i^T Θ d_i;
- f_w(x) - f_{w_{-i}}(x) = Θ(x, X) d_i (the cross kernel, tangentlab.cross);
- Σ_sgd = J^T S J with Θ S + S Θ = N (η̃/B) κ G, G = D/N - δδ^T/N², D = blockdiag(δ_i δ_i^T),
  solved entrywise in the eigenbasis (S_jk = N(η̃/B)κ G_jk/(λ_j + λ_k)), and then
  SI = ½ d_i^T U (U^T S U)^{-1} U^T d_i (the quadratic form on the support of Σ, where
  w - w_{-i} lies).

Leave-one-out runs: ``method="exact"`` eigendecomposes each Θ_{-i} ((N-1)C square):
N·O((NC)³); ``method="simulate"`` steps the N runs side by side (column i of an
[NC, N] state never sees sample i): T·O((NC)² N), exact discrete steps; ``method="schur"``
(T = ∞ and Θ well conditioned) uses the block inverse, d_i = A_{:,i} A_{ii}^{-1} a_i with
A = Θ^{-1}, at O((NC)³) once. ``"auto"`` picks Schur when it applies, else simulate when
T < 4NC, else exact. All three are exact (no approximation beyond round-off).

Departures from the paper and the authors' code (stated, deliberate):

1. Time is in optimizer steps of the mean loss (DESIGN.md §2); the authors write
   η/n in the dynamics of a summed loss, which is the same run.
2. The leave-one-out run keeps the learning rate of the *mean* loss over N-1 samples, as
   retraining with ``tl.finetune`` on N-1 samples does (the authors' η·n/(n-1)).
3. Σ_sgd includes its scale η̃κ/B (the authors solve HΣ + ΣH = Λ, a constant factor
   away: rankings are the same, values are not) and is restricted to the row space of
   J instead of adding 1e-10·I to make it invertible; it is evaluated at the residuals
   of the full-data run at ``time`` (as the authors). At T = ∞ on an interpolating
   kernel the residuals, hence the SGD noise, vanish: refused (use a finite time).
4. F-SI averages over the evaluation samples (the authors' code; the KL of the joint
   predictions on all M samples is M times it). Without an evaluation set it is taken
   on the training inputs, sample i included (the authors' training-set variant leaves
   x_i out).
5. Projected kernels use the projected tangent model f = f0 + Φ v (weights v ∈ R^k):
   ‖Δv‖² ≈ ‖Δw‖² in expectation (E[R R^T] = I).
6. MSE only (the paper's closed form); no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangentlab.cross import CrossKernel
from tangentlab.errors import TangentlabError
from tangentlab.kernel import Kernel
from tangentlab.training import MSE, SGD, as_loss, as_optimizer, check_batch_size, is_int

_FN = "sample_information"
_NOISES = ("isotropic", "sgd")
_METHODS = ("auto", "exact", "simulate", "schur")
_SAMPLINGS = ("epoch", "replacement")
_VANISHING = (
    f"{_FN}: the SGD noise vanishes: the residuals at this time are ~0 (the tangent model "
    "interpolates the training set), so SI under SGD noise is infinite. Give a finite time "
    "before convergence, or use noise='isotropic'."
)
_SCHUR_RCOND = 1e-8  # Schur's block inverse only when lambda_min > this * lambda_max


@dataclass(frozen=True, eq=False)
class SampleInformation:
    """Per-sample smooth unique information (NOTE [unique information]), in nats.

    Attributes:
      weights: SI_Σ(z_i) in the weights ``[N]``.
      functional: F-SI(z_i) on the evaluation set (or the training inputs) ``[N]``.
      weight_change: ‖w - w_{-i}‖² ``[N]`` (the projected model's weights if projected).
      targets: training labels ``[N]``.
      functional_on: ``"eval"`` (an evaluation set of ``num_eval`` samples) or ``"train"``.
      loo_outputs: ``f_{w_{-i}}(x)`` on the functional set ``[N, M, C]`` when
        ``keep_loo=True``, else ``None``; ``outputs`` holds ``f_w(x)`` ``[M, C]``.
      settings: time, optimizer, noise, sigma, batch size, method, ... (JSON-able).
    """

    weights: np.ndarray
    functional: np.ndarray
    weight_change: np.ndarray
    targets: np.ndarray
    functional_on: str
    num_eval: int
    outputs: np.ndarray
    loo_outputs: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.weights.shape[0])

    def scores(self, by: str = "weights") -> np.ndarray:
        """The per-sample values ranked by ``by``: ``"weights"`` or ``"functional"``."""
        if by not in ("weights", "functional"):
            raise TangentlabError(
                f"SampleInformation: by must be 'weights' or 'functional', got {by!r}."
            )
        return self.weights if by == "weights" else self.functional

    def ranking(self, by: str = "weights") -> np.ndarray:
        """Sample indices from the most to the least informative ``[N]`` (ties: lower index
        first)."""
        return np.argsort(-self.scores(by), kind="stable")

    def to_frame(self):
        """A pandas DataFrame, one row per sample, sorted by weight information (rank 0:
        most informative): sample, label, weights, functional, weight_change, rank."""
        import pandas as pd

        order = self.ranking("weights")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        frame = pd.DataFrame({
            "sample": np.arange(self.num_samples), "label": self.targets,
            "weights": self.weights, "functional": self.functional,
            "weight_change": self.weight_change, "rank": rank,
        })  # fmt: skip
        return frame.sort_values("rank").reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: per-sample lists, ranking and settings (no leave-one-out outputs)."""
        return {
            "kind": "sample_information",
            "units": "nats",
            "weights": [float(v) for v in self.weights],
            "functional": [float(v) for v in self.functional],
            "weight_change": [float(v) for v in self.weight_change],
            "targets": [int(v) for v in self.targets],
            "ranking_weights": [int(v) for v in self.ranking("weights")],
            "ranking_functional": [int(v) for v in self.ranking("functional")],
            "functional_on": self.functional_on,
            "num_eval": self.num_eval,
            "settings": dict(self.settings),
        }


def sample_information(
    kernel: Kernel,
    optimizer: SGD,
    *,
    time: int | float,
    eval_data: CrossKernel | None = None,
    loss: MSE | str = "mse",
    noise: str = "isotropic",
    sigma: float = 1.0,
    batch_size: int | None = None,
    sampling: str = "epoch",
    method: str = "auto",
    keep_loo: bool = False,
    rcond: float = 1e-10,
    progress: bool = False,
) -> SampleInformation:
    """Smooth unique information of every training sample, in the weights and in the function.

    .. math::

        SI_\\Sigma(z_i) = \\tfrac12 (w - w_{-i})^T \\Sigma^{-1} (w - w_{-i}),\\qquad
        F\\text{-}SI(z_i) = \\frac{1}{2\\sigma^2} \\frac1M \\sum_{x}
        \\lVert f_w(x) - f_{w_{-i}}(x)\\rVert^2

    with w the tangent model's weights after ``time`` steps of full-batch SGD from w0 on
    all N samples and w_{-i} without sample i, both in closed form through the kernel
    (NOTE [unique information] for the formulas, the noise models and the departures from
    Harutyunyan et al. 2021, https://arxiv.org/abs/2101.06640).

    Args:
      kernel: the training kernel (exact or projected, full structure) from
        :func:`tangentlab.compute_kernel`.
      optimizer: ``tl.SGD(lr, momentum=m)`` of the training run (no weight decay); a
        learning-rate schedule is followed step by step.
      time: optimizer steps T >= 0 of the run (an int), or ``math.inf`` for the converged
        run (then the result does not depend on the learning rate).
      eval_data: the cross kernel of an evaluation set (:func:`tangentlab.compute_cross_kernel`)
        for F-SI; ``None``: F-SI on the training inputs.
      loss: ``"mse"`` / ``tl.MSE(target_scale=s)`` (the closed form is for MSE only).
      noise: ``"isotropic"`` (Σ = σ² I) or ``"sgd"`` (stationary SGD covariance; needs
        ``batch_size``). F-SI always uses output noise σ² I.
      sigma: σ > 0, the standard deviation of the smoothing noise (weights for
        ``noise="isotropic"``, outputs for F-SI), in the units of w and f.
      batch_size: B of the SGD noise model (``noise="sgd"``); the weights themselves are
        those of the full-batch run.
      sampling: ``"epoch"`` (without replacement, κ = (N-B)/(N-1)) or ``"replacement"``.
      method: leave-one-out runs: ``"auto"``, ``"exact"`` (one eigendecomposition per
        sample, N·O((NC)³)), ``"simulate"`` (the N runs stepped side by side, T·O((NC)² N);
        finite T) or ``"schur"`` (T = ∞ and a well-conditioned Θ only, O((NC)³)).
      keep_loo: keep the leave-one-out outputs ``[N, M, C]`` (memory N·M·C floats).
      rcond: eigenvalues below ``rcond * lambda_max`` are treated as 0 (directions that do
        not move the weights); guards the pseudo-inverse at T = ∞.
      progress: show a progress bar over the leave-one-out runs (stderr).

    Returns:
      :class:`SampleInformation` (``.weights``, ``.functional``, ``.ranking()``,
      ``.to_frame()``, ``.to_dict()``).

    Raises:
      TangentlabError: a trace kernel, CE loss, weight decay, a diverging learning rate,
        ``noise="sgd"`` without ``batch_size`` or with vanishing residuals, a cross kernel
        of another kernel, or any option out of range.

    Example::

        >>> k = tl.compute_kernel(model, (X, y), params="^head")         # exact, N = 50
        >>> info = tl.sample_information(k, tl.SGD(0.1), time=200)
        >>> info.ranking()[:5], info.weights.shape                       # top 5, [50]
    """
    optimizer = as_optimizer(optimizer, _FN)
    loss = as_loss(loss, _FN)
    t = _check(kernel, optimizer, loss, time, eval_data, noise, sigma, batch_size, sampling,
               method, rcond)  # fmt: skip
    n, c = kernel.num_samples, kernel.num_classes
    theta = _symmetric(kernel)
    r0 = _residual0(kernel, loss.target_scale)
    etas = _rates(optimizer, t)
    lam, u = (np.asarray(v, dtype=np.float64) for v in kernel.eigh())
    keep = lam > rcond * max(float(lam.max()), 0.0)
    lam, u = lam[keep], u[:, keep]
    _check_stable(lam, optimizer, etas, n, t)
    coef = _coefficients(lam, n, optimizer.momentum, etas, t)
    a = -u @ (coef * (u.T @ r0))  # w_T - w0 = J^T a   [NC]
    d, used = _loo_differences(method, lam, u, a, theta, r0, optimizer.momentum, etas, t,
                               n, c, rcond, progress)  # fmt: skip
    weight_change = np.einsum("ij,jk,ik->i", d, theta, d)
    if noise == "isotropic":
        si_w = weight_change / (2.0 * sigma**2)
    else:
        resid = r0 + theta @ a  # residuals at time T, [NC]
        if np.linalg.norm(resid) <= 1e-8 * np.linalg.norm(r0):
            raise TangentlabError(_VANISHING)
        # the learning rate at the end of the run (a schedule's last rate), at stationarity
        lr_end = float(etas[-1]) if etas is not None and etas.size else optimizer.lr
        eff = lr_end / (1.0 - optimizer.momentum)
        si_w = _sgd_information(d, lam, u, resid, n, c, eff, batch_size, sampling)
    if eval_data is None:
        cross, f_eval = theta, (kernel.f0.double().numpy().reshape(-1) + theta @ a)
        where, m = "train", n
    else:
        cross = eval_data.theta.double().numpy()
        f_eval = eval_data.f0.double().numpy().reshape(-1) + cross @ a
        where, m = "eval", eval_data.num_eval
    change = d @ cross.T  # [N, M*C]: f_w(x) - f_{w_-i}(x)
    si_f = (change**2).sum(axis=1) / m / (2.0 * sigma**2)
    loo = (f_eval[None, :] - change).reshape(n, m, c) if keep_loo else None
    settings = {
        "time": "inf" if t == math.inf else int(t),
        "optimizer": optimizer.to_dict(),
        "loss": loss.to_dict(),
        "noise": noise,
        "sigma": float(sigma),
        "batch_size": batch_size,
        "sampling": sampling if noise == "sgd" else None,
        "method": used,
        "rcond": rcond,
        "num_samples": n,
        "num_classes": c,
        "projection": kernel.metadata.get("projection", "exact" if kernel.features is None
                                          else f"k={kernel.projection_dim}"),
        "reference": "Harutyunyan et al., ICLR 2021, https://arxiv.org/abs/2101.06640",
    }  # fmt: skip
    return SampleInformation(
        weights=si_w, functional=si_f, weight_change=weight_change,
        targets=kernel.targets.numpy().copy(), functional_on=where, num_eval=m,
        outputs=f_eval.reshape(m, c), loo_outputs=loo, settings=settings,
    )  # fmt: skip


def _loo_differences(method: str, lam, u, a, theta, r0, momentum: float, etas, t: float,
                     n: int, c: int, rcond: float, progress: bool) -> tuple[np.ndarray, str]:
    """``(d [N, NC], method used)``: d_i = a − a_{-i}, the dual coefficients of w − w_{-i}
    (w − w0 = Jᵀ a), by the Schur complement (T = ∞, well-conditioned Θ), the N runs
    simulated side by side (finite T, small T), or one eigendecomposition per sample."""
    use_schur = method == "schur" or (
        method == "auto" and t == math.inf and _well_conditioned(lam, n * c)
    )
    if method == "schur" and not use_schur:
        raise TangentlabError(f"{_FN}: method='schur' needs time=inf.")
    use_sim = method == "simulate" or (
        method == "auto" and not use_schur and t != math.inf and t < 4 * n * c
    )
    if use_sim and t == math.inf:
        raise TangentlabError(f"{_FN}: method='simulate' needs a finite time.")
    if use_schur:
        if not _well_conditioned(lam, n * c):
            raise TangentlabError(
                f"{_FN}: method='schur' needs an invertible kernel (lambda_min > "
                f"{_SCHUR_RCOND:g} lambda_max); this one is singular or ill-conditioned. Use "
                "method='exact'."
            )
        return _loo_schur(lam, u, a, n, c), "schur"
    if use_sim:
        return a[None, :] - _loo_simulate(theta, r0, momentum, etas, n, c), "simulate"
    return _loo_exact(theta, r0, momentum, etas, t, n, c, rcond, a, progress), "exact"


# ---- validation (once, at the public edge) ------------------------------------------------
def _check(kernel, optimizer, loss, time, eval_data, noise, sigma, batch_size, sampling,
           method, rcond) -> float:  # fmt: skip
    if not isinstance(kernel, Kernel):
        raise TangentlabError(
            f"{_FN}: kernel must be a tangentlab.Kernel (tl.compute_kernel), got "
            f"{type(kernel).__name__}."
        )
    if kernel.is_trace:
        raise TangentlabError(
            f"{_FN}: trace kernels (Theta ~= K (x) I_C) are not supported; compute the full "
            "kernel (trace=False), exact or projected."
        )
    if kernel.num_samples < 2:
        raise TangentlabError(f"{_FN}: leave-one-out needs N >= 2 samples, got N=1.")
    if not isinstance(loss, MSE):
        raise TangentlabError(
            f"{_FN}: the closed form (Harutyunyan et al. 2021) is for the MSE loss; got "
            f"{loss.describe()}. Use loss='mse' (tl.MSE(target_scale=s))."
        )
    if optimizer.weight_decay != 0.0:
        raise TangentlabError(
            f"{_FN}: weight decay is not supported (got weight_decay={optimizer.weight_decay:g});"
            " use tl.SGD(lr, momentum=m)."
        )
    if isinstance(time, str) and time.lower() in ("inf", "infinity"):
        time = math.inf
    if not (time == math.inf or (is_int(time) and time >= 0)):
        raise TangentlabError(
            f"{_FN}: time must be an integer number of optimizer steps >= 0 or math.inf "
            f"(the converged run), got {time!r}."
        )
    if eval_data is not None:
        if not isinstance(eval_data, CrossKernel):
            raise TangentlabError(
                f"{_FN}: eval_data must be the cross kernel of the evaluation set, "
                f"tl.compute_cross_kernel(model, (X_eval, y_eval), kernel, ...); got "
                f"{type(eval_data).__name__}."
            )
        eval_data.check_against(kernel, _FN)
    if noise not in _NOISES:
        raise TangentlabError(f"{_FN}: noise must be one of {list(_NOISES)}, got {noise!r}.")
    if not isinstance(sigma, int | float) or isinstance(sigma, bool) or not sigma > 0:
        raise TangentlabError(f"{_FN}: sigma must be a number > 0, got {sigma!r}.")
    batch_size = check_batch_size(_FN, batch_size)
    if noise == "sgd":
        if batch_size is None or batch_size >= kernel.num_samples:
            raise TangentlabError(
                f"{_FN}: noise='sgd' models the minibatch noise of SGD, which vanishes in "
                f"full batch; give batch_size=B < N={kernel.num_samples}, or use "
                "noise='isotropic'."
            )
    if sampling not in _SAMPLINGS:
        raise TangentlabError(
            f"{_FN}: sampling must be one of {list(_SAMPLINGS)}, got {sampling!r}."
        )
    if method not in _METHODS:
        raise TangentlabError(f"{_FN}: method must be one of {list(_METHODS)}, got {method!r}.")
    if not isinstance(rcond, float | int) or not 0 <= rcond < 1:
        raise TangentlabError(f"{_FN}: rcond must be a number in [0, 1), got {rcond!r}.")
    return float(time) if time == math.inf else int(time)


def _symmetric(kernel: Kernel) -> np.ndarray:
    theta = kernel.gram().double().numpy()
    return 0.5 * (theta + theta.T)


def _residual0(kernel: Kernel, scale: float) -> np.ndarray:
    """r_0 = f0 - s·onehot(y), stacked sample-major ``[N*C]``."""
    r = kernel.f0.double().numpy().copy()
    r[np.arange(kernel.num_samples), kernel.targets.numpy()] -= scale
    return r.reshape(-1)


def _rates(optimizer: SGD, t: float) -> np.ndarray | None:
    """η_t for t < T ``[T]`` (a schedule, when the optimizer has one), or None for T = ∞."""
    if t == math.inf:
        return None
    steps = int(t)
    mult = getattr(optimizer, "lr_multipliers", None)
    m = mult(steps) if mult is not None else None
    if m is None:
        return np.full(steps, optimizer.lr)
    return optimizer.lr * np.asarray(m, dtype=np.float64)


def _check_stable(lam: np.ndarray, optimizer: SGD, etas, n: int, t: float) -> None:
    """Heavy-ball GD on the mean MSE is stable iff η λ_max / N < 2 (1 + m)."""
    if lam.size == 0:
        raise TangentlabError(f"{_FN}: the kernel is zero; nothing is learned.")
    peak = optimizer.lr if etas is None or etas.size == 0 else float(etas.max())
    limit = 2.0 * (1.0 + optimizer.momentum)
    # the leave-one-out runs average over N-1 samples: a larger step per sample, and
    # lambda_max(Theta_-i) <= lambda_max(Theta): checking with N-1 covers all N+1 runs
    if peak * float(lam.max()) / (n - 1) >= limit and (t == math.inf or t > 0):
        raise TangentlabError(
            f"{_FN}: the learning rate {peak:g} diverges on this kernel (eta lambda_max / "
            f"(N-1) = {peak * float(lam.max()) / (n - 1):.3g} >= {limit:g} for the "
            "leave-one-out runs); the information of a diverging run is meaningless. Lower "
            "it (tl.stable_lr(kernel))."
        )


def _well_conditioned(lam: np.ndarray, rows: int) -> bool:
    return lam.size == rows and float(lam.min()) > _SCHUR_RCOND * float(lam.max())


# ---- the closed form -------------------------------------------------------------------------
def _coefficients(lam: np.ndarray, n_mean: int, momentum: float, etas, t: float) -> np.ndarray:
    """c(λ) with a_T = -U diag(c) U^T r_0 (NOTE [unique information]); λ > 0 here."""
    if t == math.inf:
        return 1.0 / lam
    if int(t) == 0:
        return np.zeros_like(lam)
    if momentum == 0.0 and etas.size and np.all(etas == etas[0]):
        q = 1.0 - etas[0] * lam / n_mean
        # 1 - q^T computed as -expm1(T log|q|) with the sign of q^T: accurate for small η λ
        with np.errstate(over="ignore", invalid="ignore"):
            qt = np.sign(q) ** (int(t) % 2) * np.exp(int(t) * np.log(np.abs(q)))
            one_minus = np.where(q > 0, -np.expm1(int(t) * np.log(np.abs(q))), 1.0 - qt)
        out = one_minus / lam
    else:  # heavy ball / schedule: run the scalar recursion of every mode
        a = np.zeros_like(lam)
        beta = np.zeros_like(lam)
        with np.errstate(over="ignore", invalid="ignore"):
            for eta in etas:
                r = 1.0 + lam * a
                beta = momentum * beta + r / n_mean
                a = a - eta * beta
        out = -a
    if not np.all(np.isfinite(out)):
        raise TangentlabError(
            f"{_FN}: the run diverges within {int(t)} steps at this learning rate (non-finite "
            "weights); lower it (tl.stable_lr(kernel))."
        )
    return out


def _loo_schur(lam, u, a, n: int, c: int) -> np.ndarray:
    """d_i = A[:, i] A_ii^{-1} a_i with A = Θ^{-1} (T = ∞, Θ invertible): ``[N, NC]``."""
    inv = (u / lam) @ u.T
    d = np.empty((n, n * c))
    for i in range(n):
        blk = slice(i * c, (i + 1) * c)
        d[i] = inv[:, blk] @ np.linalg.solve(inv[blk, blk], a[blk])
    return d


def _loo_exact(theta, r0, momentum, etas, t, n, c, rcond, a, progress) -> np.ndarray:
    """d_i = a - ã_{-i} by the closed form of each leave-one-out run: ``[N, NC]``."""
    from tqdm.auto import tqdm

    d = np.empty((n, n * c))
    idx = np.arange(n * c).reshape(n, c)
    for i in tqdm(range(n), desc="leave-one-out", disable=not progress, leave=False):
        keep = np.delete(idx, i, axis=0).reshape(-1)
        sub = theta[np.ix_(keep, keep)]
        lam, u = np.linalg.eigh(sub)
        ok = lam > rcond * max(float(lam.max()), 0.0)
        lam, u = lam[ok], u[:, ok]
        coef = _coefficients(lam, n - 1, momentum, etas, t)
        a_loo = np.zeros(n * c)
        a_loo[keep] = -u @ (coef * (u.T @ r0[keep]))
        d[i] = a - a_loo
    return d


def _loo_simulate(theta, r0, momentum, etas, n: int, c: int) -> np.ndarray:
    """The N leave-one-out runs stepped side by side: ``[N, NC]`` coefficients ã_{-i}.

    Column i of ``A`` ``[NC, N]`` is run i (sample i's gradient masked out, the loss averaged
    over N-1 samples): per step one product Θ A, O((NC)^2 N) — cheaper than N
    eigendecompositions when T < ~4 NC. Exact discrete steps (momentum, schedules).
    """
    nc = n * c
    mask = np.ones((nc, n))
    for i in range(n):
        mask[i * c : (i + 1) * c, i] = 0.0  # run i never sees sample i's residual
    a = np.zeros((nc, n))
    beta = np.zeros((nc, n))
    with np.errstate(over="ignore", invalid="ignore"):
        for eta in etas:
            r = r0[:, None] + theta @ a
            beta = momentum * beta + mask * r / (n - 1)
            a -= eta * beta
    if not np.all(np.isfinite(a)):
        raise TangentlabError(
            f"{_FN}: a leave-one-out run diverges within {etas.size} steps at this learning "
            "rate (non-finite weights); lower it (tl.stable_lr(kernel))."
        )
    return a.T


def _sgd_information(d, lam, u, resid, n, c, eff_lr: float, batch, sampling) -> np.ndarray:
    """½ d_i^T U (U^T S U)^{-1} U^T d_i with the Lyapunov solution S (NOTE [unique
    information]): ``[N]``."""
    kappa = (n - batch) / (n - 1) if sampling == "epoch" else 1.0
    scale = n * eff_lr / batch * kappa
    delta = resid.reshape(n, c)
    g_blocks = np.zeros((n * c, n * c))
    for i in range(n):
        blk = slice(i * c, (i + 1) * c)
        g_blocks[blk, blk] = np.outer(delta[i], delta[i])
    g = g_blocks / n - np.outer(resid, resid) / n**2
    g_r = u.T @ g @ u
    s_r = scale * g_r / (lam[:, None] + lam[None, :])
    s_r = 0.5 * (s_r + s_r.T)
    ev, vec = np.linalg.eigh(s_r)
    top = float(ev.max()) if ev.size else 0.0
    if not top > 0 or not np.isfinite(top):
        raise TangentlabError(_VANISHING)
    # directions with (relatively) no SGD noise are floored at 1e-12 of the largest
    # variance instead of inverting round-off
    ev = np.maximum(ev, 1e-12 * top)
    q = (d @ u) @ vec
    return 0.5 * (q**2 / ev).sum(axis=1)


def detection_curve(scores: np.ndarray, flipped: Any) -> dict[str, list[float]]:
    """Fraction of the ``flipped`` samples found vs the fraction of samples checked, checking
    samples from the highest score down (mislabeled-sample detection).

    Args:
      scores: one score per sample ``[N]`` (higher: checked first).
      flipped: indices of the samples whose labels were flipped.

    Returns:
      ``{"checked": [...], "found": [...]}``, each ``[N + 1]`` from 0 to 1, and ``"auc"``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = scores.size
    flipped = np.unique(np.asarray(list(flipped), dtype=np.int64))
    if flipped.size == 0 or flipped.min() < 0 or flipped.max() >= n:
        raise TangentlabError(
            f"detection_curve: flipped must be non-empty indices in [0, {n}), got "
            f"{flipped.tolist()[:8]}."
        )
    order = np.argsort(-scores, kind="stable")
    hit = np.isin(order, flipped).astype(np.float64)
    found = np.concatenate([[0.0], np.cumsum(hit) / flipped.size])
    checked = np.arange(n + 1) / n
    auc = float(np.sum((found[1:] + found[:-1]) / 2) / n)
    return {"checked": checked.tolist(), "found": found.tolist(), "auc": auc}

"""Forecast training on N samples from a kernel computed on a subsample of n << N.

DESIGN.md §4 "Subsample + spectral extrapolation". Full-batch MSE on N samples,
``df/dt = -(η̃/N) Θ_N r``, decouples into modes with normalized eigenvalues μ_j = λ_j/N
and residual energies p_j = (u_j^T r_0)^2 / N:

.. math::
    L_t = \\tfrac12 \\sum_j p_j\\, (1 - η̃ μ_j)^{2t}  \\quad(\\text{gradient flow: }
    e^{-2 η̃ μ_j t})

For i.i.d. samples (μ_j, p_j) converge to the spectrum of the kernel integral operator
and the energy of r_0 along it, so a kernel on n random samples estimates them with
μ_j ≈ λ_j(Θ_n)/n, p_j ≈ (u_j^T r_0)^2/n (Bach, 2013; Rosasco et al., 2010, "On learning
with integral operators", JMLR 11). Note the rates η̃ μ_j do not depend on N: without a
tail, the N-sample forecast of full-batch MSE equals the n-sample one (only the bookkeeping
``num_samples`` / epochs change). What the subsample misses is the tail: Θ_N has N·C
modes, Θ_n only n·C, and its smallest empirical eigenvalues are biased (they lump the
energy of all the operator's modes beyond n·C).

NOTE [power-law tail]
``tail="powerlaw"`` fits μ_j = A j^(-α) by least squares in log-log on the observed
spectrum (descending, index j = 1..m) over ``fit_range`` (fractions of the m non-zero
modes, default 10%..50%), and the energy profile p_j ∝ j^(-β) on the mean energies of
10 geometric bins of the same window (single p_j are noisy). The observed modes from
j_cut (the window's end) on are *replaced* by the power law over j = j_cut..M, with
M = N·C (the full kernel's number of modes; a projected kernel has rank <= k, so
M = min(N·C, k)). Energy is *redistributed*, not added: the subsample estimates
L_0 = ½ Σ_j p_j without bias, so the replaced modes' total energy Σ_{j>=j_cut} p_j is
spread over the extended modes with weights ∝ j^(-β). L_0 is therefore unchanged and
the tail only moves energy toward slower modes. The extended modes are grouped into
``tail_bins`` geometric bins (one mode per bin at μ of the bin's geometric-mean index,
carrying the bin's summed weight), so the cost is O(T·(m + bins)) whatever N is. β is
fitted at ``target_scale`` given to :func:`extrapolate`; a forecast at another scale
keeps that shape and recomputes the replaced energy exactly. With weight decay the
extended modes' anchor coordinates are those of the replaced modes' least-squares ratio
(exact for ``decay_to="w0"``, where anchor = f0).

NOTE [accuracy of an extrapolated forecast]
Accuracy cannot be extrapolated from a spectrum (it needs every sample's f_t). An
extrapolated forecast reports the accuracy on the n subsampled points under the
full-N dynamics of the *observed* modes (rates η̃ μ_j, μ_j = λ_j/n), i.e. the n-sample
forecast's accuracy; the power-law tail changes the loss curve only.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangentlab import dynamics as dyn
from tangentlab.errors import TangentlabError
from tangentlab.kernel import Kernel
from tangentlab.training import check_fraction_pair

_TAILS = ("none", "powerlaw")


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A kernel's normalized spectrum, extrapolated from n subsampled points to N samples.

    Attributes:
      kernel: the subsample kernel (n samples), kept for accuracy and λ_max.
      dataset_size: N, the size of the data set the forecast is for.
      mu: observed normalized eigenvalues μ_j = λ_j/n, descending, ``[m]``.
      f0_coef: u_j^T vec(f0) / √n, ``[m]``.
      onehot_coef: u_j^T vec(onehot(y)) / √n, ``[m]``; so p_j(s) = (f0_coef - s·onehot_coef)^2
        for the MSE target scale s.
      perp_gram: Gram matrix of (f0⊥, onehot(y)⊥) / n, ``[2, 2]``: the part of r_0
        outside the kernel's span (projected kernels), which never decays.
      jw0_coef: u_j^T vec(J w0) / √n, ``[m]`` (weight decay toward 0), or ``None``.
      tail: ``"none"`` or ``"powerlaw"`` (NOTE [power-law tail]).
      tail_start: j_cut, the 0-based index of the first replaced observed mode (= m without
        a tail).
      alpha: fitted exponent of μ_j ∝ j^(-α) (NaN without a tail).
      beta: fitted exponent of p_j ∝ j^(-β) (NaN without a tail).
      tail_mu: μ of the extended modes, one per geometric bin, ``[bins]``.
      tail_weight: fraction of the replaced energy each bin carries, ``[bins]`` (sums to 1).
      tail_count: number of full-data modes each bin stands for, ``[bins]``.
      info: fit details (window, amplitude, number of modes).
    """

    kernel: Kernel
    dataset_size: int
    mu: np.ndarray
    f0_coef: np.ndarray
    onehot_coef: np.ndarray
    perp_gram: np.ndarray
    jw0_coef: np.ndarray | None = None
    tail: str = "none"
    tail_start: int = 0
    alpha: float = math.nan
    beta: float = math.nan
    tail_mu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tail_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tail_count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """n, the number of subsampled points the kernel was computed on."""
        return self.kernel.num_samples

    @property
    def num_modes(self) -> int:
        """Number of full-data modes represented (observed kept + extended)."""
        if self.tail == "none":
            return int(self.mu.size)
        return int(self.tail_start + self.tail_count.sum())

    def energies(self, target_scale: float = 1.0) -> np.ndarray:
        """p_j of the observed modes for the MSE target scale s, ``[m]``."""
        return (self.f0_coef - target_scale * self.onehot_coef) ** 2

    def initial_loss(self, target_scale: float = 1.0) -> float:
        """L_0 = ½ (Σ_j p_j + ‖r_0⊥‖²/n), identical with and without a tail."""
        v = np.array([1.0, -target_scale])
        return 0.5 * float(self.energies(target_scale).sum() + v @ self.perp_gram @ v)


def extrapolate(
    kernel: Kernel,
    dataset_size: int,
    *,
    tail: str = "none",
    fit_range: tuple[float, float] = (0.1, 0.5),
    tail_bins: int = 1000,
    target_scale: float = 1.0,
) -> Spectrum:
    """Estimate the full-data spectrum (μ_j, p_j) of N samples from a kernel on n of them.

    .. math::
        μ_j ≈ λ_j(Θ_n)/n, \\qquad p_j ≈ (u_j^T r_0)^2/n, \\qquad
        L_t = \\tfrac12 \\sum_j p_j (1 - η̃ μ_j)^{2t}

    The n samples must be a uniformly random subset of the N (the estimate is of the
    kernel operator's spectrum). The eigendecomposition is ``kernel.eigh()`` (cached).
    Forecast with ``tangentlab.forecast(spectrum, tl.SGD(lr), steps)`` (full-batch MSE).

    Args:
      kernel: the tangent model's kernel on the n subsampled points (a trace kernel
        Θ ≈ K ⊗ I_C gives each eigenvalue of K as C modes u_j ⊗ e_c).
      dataset_size: N >= n, the number of samples the training will use.
      tail: ``"none"`` (the n·C observed modes only) or ``"powerlaw"`` (extend to N·C
        modes with a fitted power law; NOTE [power-law tail]).
      fit_range: ``(lo, hi)`` fractions of the non-zero observed modes used for the fit;
        modes from ``hi`` on are replaced by the extension.
      tail_bins: number of geometric bins that represent the extended modes.
      target_scale: s at which the energy exponent β is fitted (tail only).

    Returns:
      A :class:`Spectrum`.

    Raises:
      TangentlabError: on invalid arguments, naming the argument and the fix.
    """
    fn = "extrapolate"
    _check_args(fn, kernel, dataset_size, tail, fit_range, tail_bins, target_scale)
    base, a, b = _observed(kernel, dataset_size)
    if tail == "none":
        return Spectrum(**base, tail_start=int(base["mu"].size))
    return _powerlaw(fn, kernel, base, a, b, fit_range, tail_bins, target_scale)


def _check_args(fn, kernel, dataset_size, tail, fit_range, tail_bins, target_scale) -> None:
    if not isinstance(kernel, Kernel):
        raise TangentlabError(
            f"{fn}: kernel must be a tangentlab.Kernel, got {type(kernel).__name__}."
        )
    check_dataset_size(fn, dataset_size, kernel.num_samples)
    if tail not in _TAILS:
        raise TangentlabError(f"{fn}: tail must be one of {list(_TAILS)}, got {tail!r}.")
    check_fraction_pair(fn, "fit_range", fit_range, "(0.1, 0.5)")
    if not _is_int(tail_bins) or tail_bins < 1:
        raise TangentlabError(f"{fn}: tail_bins must be a positive integer, got {tail_bins!r}.")
    if not isinstance(target_scale, numbers.Real) or not target_scale > 0:
        raise TangentlabError(f"{fn}: target_scale must be > 0, got {target_scale!r}.")


def _observed(kernel: Kernel, dataset_size: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The observed modes: Spectrum fields, and the raw coefficients of f0 and onehot(y)."""
    n, c = kernel.num_samples, kernel.num_classes
    lam, u = kernel.eigh()
    lam = lam.detach().cpu().double().numpy()[::-1].copy()  # descending
    u = u.detach().cpu().double().numpy()[:, ::-1]
    # a trace kernel (Θ = K ⊗ I_C, u: [n, m] eigenvectors of K) has the modes u_j ⊗ e_c:
    # each eigenvalue repeated C times, coefficients u_j^T X[:, c] (j-major)
    kron = c if kernel.is_trace else 1
    rows = u.shape[0]

    def coef(v: np.ndarray) -> np.ndarray:  # [NC] -> mode coefficients [m * kron]
        return (u.T @ v.reshape(rows, kron)).reshape(-1)

    def fit(z: np.ndarray) -> np.ndarray:  # mode coefficients -> [NC] in span
        return (u @ z.reshape(u.shape[1], kron)).reshape(-1)

    lam = np.repeat(lam, kron)
    f0 = kernel.f0.detach().cpu().double().numpy().reshape(-1)
    onehot = dyn.targets_matrix(kernel.targets.cpu().numpy().astype(np.int64), c).reshape(-1)
    a, b = coef(f0), coef(onehot)
    if u.shape[1] < rows:  # projected kernel: the residual outside span(U) never decays
        perp = np.stack([f0 - fit(a), onehot - fit(b)], axis=1)
        perp_gram = perp.T @ perp / n
    else:
        perp_gram = np.zeros((2, 2))
    jw0 = None
    if kernel.jw0 is not None:
        jw0 = coef(kernel.jw0.detach().cpu().double().numpy().reshape(-1)) / math.sqrt(n)
    base = dict(kernel=kernel, dataset_size=int(dataset_size), mu=lam / n,
                f0_coef=a / math.sqrt(n), onehot_coef=b / math.sqrt(n), perp_gram=perp_gram,
                jw0_coef=jw0)  # fmt: skip
    return base, a, b


def _powerlaw(fn, kernel, base, a, b, fit_range, tail_bins, target_scale) -> Spectrum:
    """Fit μ_j ∝ j^-α and p_j ∝ j^-β on the window and extend (NOTE [power-law tail])."""
    n, c = kernel.num_samples, kernel.num_classes
    kron = c if kernel.is_trace else 1
    mu = base["mu"]
    lo, hi = float(fit_range[0]), float(fit_range[1])
    m = int(np.count_nonzero(mu > mu[0] * 1e-12)) if mu.size else 0
    j_lo, j_hi = int(math.floor(lo * m)), int(math.ceil(hi * m))
    if j_hi - j_lo < 3:
        raise TangentlabError(
            f"{fn}: tail='powerlaw' needs at least 3 observed modes in fit_range={fit_range!r}; "
            f"the kernel has {m} non-zero modes. Use a larger subsample or a wider fit_range."
        )
    full = base["dataset_size"] * c
    if kernel.projection_dim is not None:  # Θ = Φ Φ^T has rank <= k for every N
        full = min(full, kernel.projection_dim * kron)  # trace: rank(K ⊗ I_C) <= k' C
    j = np.arange(j_lo, j_hi) + 1.0  # 1-based mode index
    slope, amp = np.polyfit(np.log(j), np.log(mu[j_lo:j_hi]), 1)
    alpha = -float(slope)
    p = (a / math.sqrt(n) - target_scale * b / math.sqrt(n)) ** 2
    # p_j of single modes are noisy (one squared projection each): fit the mean energy of
    # geometric bins of the window. Empty bins (no energy) are left out of the log fit; a
    # window without energy gives β = α (the replaced energy is then ~0 and β is moot).
    edges = np.unique(np.round(np.geomspace(j_lo + 1, j_hi + 1, 11)).astype(np.int64))
    centre = np.sqrt(edges[:-1] * (edges[1:] - 1.0))
    mean_p = np.array([p[a - 1 : b - 1].mean() for a, b in zip(edges[:-1], edges[1:])])
    ok = mean_p > 0
    if np.count_nonzero(ok) >= 2:
        beta = -float(np.polyfit(np.log(centre[ok]), np.log(mean_p[ok]), 1)[0])
    else:
        beta = alpha
    start = j_hi  # 0-based index of the first replaced mode; 1-based index j_hi + 1
    if full <= start:
        return Spectrum(**base, tail_start=int(mu.size), info={"note": "nothing to extend"})
    # geometric bins over the 1-based indices [start+1, full]
    edges = np.unique(np.round(np.geomspace(start + 1, full + 1, tail_bins + 1)).astype(np.int64))
    left, right = edges[:-1], edges[1:]  # bin = indices left..right-1
    centre = np.sqrt(left * (right - 1.0))
    weight = _power_sum(left, right, beta)
    weight = weight / weight.sum()
    return Spectrum(
        **base, tail="powerlaw", tail_start=start, alpha=alpha, beta=beta,
        tail_mu=math.exp(amp) * centre ** (-alpha), tail_weight=weight,
        tail_count=(right - left).astype(np.int64),
        info={"fit_modes": [j_lo + 1, j_hi], "amplitude": math.exp(amp), "modes": int(full),
              "observed_modes": int(m)},
    )  # fmt: skip


def _power_sum(left: np.ndarray, right: np.ndarray, beta: float) -> np.ndarray:
    """Σ_{j=left}^{right-1} j^(-β) per bin: exact for short bins, midpoint integral otherwise."""
    out = np.empty(left.size)
    for i, (a, b) in enumerate(zip(left, right)):
        if b - a <= 64:
            out[i] = np.sum(np.arange(a, b, dtype=np.float64) ** (-beta))
        else:  # ∫_{a-½}^{b-½} x^(-β) dx, accurate to O(a^(-β-2)) per term
            lo_, hi_ = a - 0.5, b - 0.5
            out[i] = (
                math.log(hi_ / lo_)
                if abs(beta - 1.0) < 1e-12
                else (hi_ ** (1 - beta) - lo_ ** (1 - beta)) / (1 - beta)
            )
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_dataset_size(fn: str, dataset_size: Any, n: int) -> None:
    """``dataset_size`` must be an integer N >= n (the kernel's number of samples)."""
    if not _is_int(dataset_size):
        raise TangentlabError(
            f"{fn}: dataset_size must be an integer N (the full data set size), got "
            f"{dataset_size!r}."
        )
    if dataset_size < n:
        raise TangentlabError(
            f"{fn}: dataset_size={dataset_size} is smaller than the kernel's {n} samples; "
            "the kernel must be computed on a subset of the N training samples (n <= N)."
        )


# ---------------------------------------------------------------------------------------
# Forecast support (called by tangentlab.forecast's spectrum solver).
# ---------------------------------------------------------------------------------------


def check_settings(fn: str, spec: Spectrum, *, batch_size: int | None, loss: str,
                   execution: str) -> None:  # fmt: skip
    """Extrapolated forecasts support full-batch MSE through the closed form only."""
    bs = batch_size
    if bs is not None and bs < spec.dataset_size:
        raise TangentlabError(
            f"{fn}: dataset_size={spec.dataset_size} forecasts full-batch training only, got "
            f"batch_size={bs}; minibatch noise depends on every sample's gradient and cannot "
            "be extrapolated from the subsample. Use batch_size=None, or compute the kernel "
            "on all N samples for a minibatch forecast."
        )
    if loss != "mse":
        raise TangentlabError(
            f"{fn}: dataset_size forecasts the MSE loss only (its modes decouple), got "
            f"loss={loss!r}. Compute the kernel on all N samples for cross-entropy."
        )
    if execution not in ("auto", "spectral"):
        raise TangentlabError(
            f"{fn}: dataset_size uses the spectral closed form, got "
            f"execution={execution!r}; use execution='auto' or 'spectral'."
        )


def tail_problem(spec: Spectrum, scale: float, weight_decay: float, *,
                 decay_to: str = "zero") -> dyn.SpectralMSE:  # fmt: skip
    """The N-sample mode problem with the power-law tail (NOTE [power-law tail]).

    Args:
      spec: the extrapolated spectrum (``tail="powerlaw"``).
      scale: the MSE target scale s.
      weight_decay: λ_wd.
      decay_to: ``"zero"`` (anchor f0 - J w0, needs ``spec.jw0_coef``) or ``"w0"``.
    """
    anchor = None  # decay toward w0 (or no decay): anchor residual = r_0
    if weight_decay > 0 and decay_to == "zero" and spec.jw0_coef is not None:
        anchor = spec.f0_coef - spec.jw0_coef - scale * spec.onehot_coef
    return _tail_problem(spec, scale, weight_decay, anchor)


def _tail_problem(
    spec: Spectrum, scale: float, wd: float, anchor_coef: np.ndarray | None
) -> dyn.SpectralMSE:
    """Mode problem in normalized coordinates (x_j = u_j^T r_0/√n, so L = ½ Σ x_j²)."""
    z = spec.f0_coef - scale * spec.onehot_coef  # [m]
    za = z if anchor_coef is None else anchor_coef  # anchor residual coordinates / √n
    keep = spec.tail_start
    kz, kza = z[:keep], za[:keep]
    rz, rza = z[keep:], za[keep:]
    energy = float(rz @ rz)
    # extended modes: amplitudes √(w_b E), anchors by the replaced modes' LS ratio
    ratio = float(rz @ rza) / energy if energy > 0 else 1.0
    tz = np.sqrt(spec.tail_weight * energy)
    mu = np.concatenate([spec.mu[:keep], spec.tail_mu])
    x0 = np.concatenate([kz, tz])
    xa = np.concatenate([kza, ratio * tz])
    v = np.array([1.0, -scale])
    perp2 = float(v @ spec.perp_gram @ v)
    # the part outside span(U) (projected kernels) is one more mode with h = wd that decays
    # toward r_0⊥ (exact without decay or for decay_to="w0"; the J w0 part of the anchor
    # outside span(U) is neglected)
    return dyn.SpectralMSE(
        x0=np.concatenate([x0, [1.0, 0.0]]),
        h=np.concatenate([mu + wd, [wd, wd]]),
        b=np.concatenate([wd * xa, [wd, 0.0]]),
        basis=np.zeros((1, x0.size)),
        perp=np.zeros((1, 2)),
        perp_gram=np.array([[perp2, 0.0], [0.0, 0.0]]),
        num_samples=1,
    )

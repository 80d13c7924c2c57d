"""Eigendecomposition of a projected kernel ``Theta = Phi Phi^T`` from its features ``Phi``.

A projected kernel is never formed: with ``Phi`` ``[rows, k]`` (``rows = N*C``, ``k < rows``)
the non-zero eigenpairs of ``Theta`` come from the ``k x k`` Gram matrix::

    G = Phi^T Phi = V diag(lam) V^T            # [k, k]
    Theta = Phi Phi^T = U diag(lam) U^T,  U = Phi V diag(lam)^-1/2     # [rows, k]

This is the largest cost of a full-batch MSE forecast (issue 9): O(rows k^2) for the two
products and ~9 k^3 for the symmetric eigensolver (LAPACK syevd). See
:func:`projected_eigh` for the methods offered, their errors and the one chosen.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tangentlab.errors import TangentlabError, TangentlabWarning

__all__ = ["METHODS", "PrecisionFallbackWarning", "projected_eigh"]

METHODS = ("auto", "float64", "float64-scipy", "float32", "svd32", "svd64")

# chosen by measurement (NOTE [projected eigh]): accuracy first, then speed
DEFAULT_METHOD = "float64"

# Eigenvalues at or below DROP_RTOL * lam_max are dropped: their directions are
# numerically orthogonal to span(Phi) (eigenvalue 0, the residual there never decays).
DROP_RTOL = 1e-12


class PrecisionFallbackWarning(TangentlabWarning):
    """The float32 eigendecomposition failed its round-off check; float64 was used instead."""


def projected_eigh(
    phi: torch.Tensor,
    *,
    method: str = "auto",
    tol: float = 1e-3,
    check_spectrum: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero eigenpairs of ``Theta = phi @ phi.T`` without forming it.

    Args:
      phi: features ``Phi`` ``[rows, k]`` (float32 or float64), ``k <= rows``.
      method: ``"float64"`` (reference), ``"float32"`` (the default, ``"auto"``),
        ``"svd32"`` / ``"svd64"`` (thin SVD of ``Phi``). See the NOTE below.
      tol: round-off check of the float32 method: the largest ``|u_i^T u_j|``, ``i != j``,
        over the worst-conditioned modes (below); above it, float64 is used instead.
      check_spectrum: called with the raw eigenvalues of ``G`` before clamping (the
        kernel's positive-spectrum warning).

    Returns:
      ``(lam, U)``: ``lam`` ascending float64 ``[m]``, ``U`` float64 ``[rows, m]`` with
      orthonormal columns, ``m <= k``; eigenvalues ``<= 1e-12 lam_max`` are dropped.

    Methods (``G = Phi^T Phi`` ``[k, k]``, eps32 = 6e-8)::

      float64  G, eigh(G) and U = Phi V / sqrt(lam), all in float64. Exact to ~1e-16
               lam_max for the float32 features given.
      float32  G and eigh(G) in float32 (LAPACK ssyevd, ~2.5x faster than dsyevd),
               W = Phi V in float32, then in float64 the Rayleigh quotients
               lam_j = |W_j|^2 and U_j = W_j / |W_j|. lam_j is a Ritz value (error
               second order in the eigenvector error, ~eps32^2 lam_max absolute); the
               eigenvector u_j of a small eigenvalue picks up ~eps32 sqrt(lam_max/lam_j)
               of the top modes, which is what the round-off check measures:
               max |u_i^T u_j| over the 32 smallest kept modes j (cost rows*k*32, ~1%).
               Failing it (a spectrum spread over > ~1e8, or ill-conditioned Phi) falls
               back to float64 with a PrecisionFallbackWarning.
      svd32/64 thin SVD Phi = U diag(s) V^T (LAPACK gesdd), lam = s^2: Gram-free, so
               small eigenvalues are relatively more accurate (error ~eps s_max s_j
               instead of eps s_max^2), but 2-4x slower than the float64 Gram path.

    A partial eigensolver (top r pairs by randomized SVD / LOBPCG) is not offered: a
    projected NTK's spectrum decays slowly enough that the modes it leaves out still
    decay within a fine-tuning run, and no tail model kept the forecast within 1e-4 of
    L_0 (benchmarks/results/eigh.md).

    NOTE [projected eigh]: measured by benchmarks/eigh.py (table in
    benchmarks/results/eigh.md). Forecast error = max_t |L^_t - L_t| / L_0 of the
    full-batch MSE curve, t <= 1000 steps at half the stability limit.
    <<TABLE>>
    """
    if method not in METHODS:
        raise TangentlabError(f"projected_eigh: method must be one of {METHODS}, got {method!r}.")
    if phi.ndim != 2:
        raise TangentlabError(
            f"projected_eigh: phi must have shape [rows, k], got {tuple(phi.shape)}."
        )
    if phi.shape[1] == 0 or phi.shape[0] == 0:
        return (
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(phi.shape[0], 0, dtype=torch.float64),
        )
    if method == "auto":
        method = DEFAULT_METHOD
    if method == "float32":
        out = _eigh_float32(phi, tol=tol, check_spectrum=check_spectrum)
        if out is not None:
            return out
        method = "float64-scipy"  # the fastest float64 path (NOTE [projected eigh])
    if method in ("float64", "float64-scipy"):
        return _eigh_float64(phi, check_spectrum, scipy=method == "float64-scipy")
    return _svd(phi, torch.float32 if method == "svd32" else torch.float64, check_spectrum)


def _keep(lam: torch.Tensor) -> torch.Tensor:
    """Mask of the eigenvalues kept: positive and above DROP_RTOL * lam_max."""
    top = lam.max() if lam.numel() else lam.new_tensor(0.0)
    return lam > top * DROP_RTOL


def _eigh_float64(phi, check_spectrum, scipy: bool = False):
    p = phi.detach().double()
    if scipy and p.device.type == "cpu":
        # numpy runs P^T P as a symmetric rank-k update (BLAS syrk: half the flops of a
        # GEMM); scipy's LAPACK dsyevd (OpenBLAS) instead of torch's (MKL)
        import numpy as np
        import scipy.linalg

        pn = p.numpy()
        gram = np.matmul(pn.T, pn)  # [k, k]
        lam, v = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True, check_finite=False)
        lam, v = torch.from_numpy(lam), torch.from_numpy(v)
    else:
        lam, v = torch.linalg.eigh(p.T @ p)  # [k], [k, k]
    if check_spectrum is not None:
        check_spectrum(lam)
    lam = lam.clamp_min(0.0)
    keep = _keep(lam)
    lam, v = lam[keep], v[:, keep]
    return lam, (p @ v) / lam.sqrt()


def _svd(phi, dtype, check_spectrum):
    u, s, _ = torch.linalg.svd(phi.to(dtype), full_matrices=False)  # descending
    lam = s.double().flip(0) ** 2
    u = u.flip(1)
    if check_spectrum is not None:
        check_spectrum(lam)
    keep = _keep(lam)
    return lam[keep], u[:, keep].double()


def _eigh_float32(phi, *, tol, check_spectrum, probes: int = 32):
    """float32 Gram + eigh, Rayleigh quotients in float64; ``None`` if the check fails."""
    p = phi.float()
    lam32, v = torch.linalg.eigh(p.T @ p)  # [k], [k, k]
    if not bool(torch.isfinite(lam32).all()):
        return _fallback("the float32 eigensolver returned non-finite values")
    if check_spectrum is not None:
        check_spectrum(lam32.double())
    w = p @ v  # [rows, k]: Phi v_j = sqrt(lam_j) u_j
    lam = (w.double() ** 2).sum(0)  # Rayleigh quotients v^T G v in float64
    keep = _keep(lam)
    w, lam = w[:, keep], lam[keep]
    order = torch.argsort(lam)
    w, lam = w[:, order], lam[order]
    u = w.double() / lam.sqrt()
    # round-off check: the modes of smallest lam carry the largest float32 error
    # (~eps32 sqrt(lam_max / lam_j) along the top modes); their overlap with all others
    j = min(probes, u.shape[1])
    if j > 0:
        overlap = u[:, :j].T @ u  # [j, m]
        overlap[torch.arange(j), torch.arange(j)] = 0.0
        worst = float(overlap.abs().max())
        if not worst <= tol:
            return _fallback(
                f"eigenvectors overlap by {worst:.2g} > tol {tol:g} (spectrum spread "
                f"lam_max/lam_min = {float(lam[-1] / lam[0]):.2g})"
            )
    return lam, u


def _fallback(why: str) -> None:
    warnings.warn(
        f"projected_eigh: float32 round-off check failed ({why}); recomputing in float64.",
        PrecisionFallbackWarning,
        stacklevel=4,
    )
    return None

"""Eigendecomposition of a projected kernel ``Theta = Phi Phi^T`` from its features ``Phi``.

A projected kernel is never formed: with ``Phi`` ``[rows, k]`` (``rows = N*C``, ``k < rows``)
the non-zero eigenpairs of ``Theta`` come from the ``k x k`` Gram matrix::

    G = Phi^T Phi = V diag(lam) V^T            # [k, k]
    Theta = Phi Phi^T = U diag(lam) U^T,  U = Phi V diag(lam)^-1/2     # [rows, k]

This is the largest cost of a full-batch MSE forecast (issue 9): O(rows k^2) for the two
products and ~9 k^3 for the symmetric eigensolver (LAPACK syevd). See
:func:`projected_eigh` for the methods offered, their errors and the one chosen.

Also :func:`split_mv` and :func:`split_vm`, a tall matrix's products with one vector
computed over blocks of rows side by side (NOTE [split matrix-vector products]).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tangentlab.errors import TangentlabError, TangentlabWarning

__all__ = ["METHODS", "PrecisionFallbackWarning", "projected_eigh", "split_mv", "split_vm"]

# Row block of :func:`add_gram_`: products of blocks this size still run at full BLAS speed,
# and k blocks need k (k + 1) / 2 of the k^2 block products.
SYRK_ROWS = 384

METHODS = ("auto", "float64", "float64-scipy", "float32", "svd32", "svd64")

# chosen by measurement (NOTE [projected eigh]): accuracy first, then speed
DEFAULT_METHOD = "float64-scipy"

# Eigenvalues at or below DROP_RTOL * lam_max are dropped: their directions are
# numerically orthogonal to span(Phi) (eigenvalue 0, the residual there never decays).
DROP_RTOL = 1e-12


class PrecisionFallbackWarning(TangentlabWarning):
    """The float32 eigendecomposition failed its round-off check; float64 was used instead."""


# NOTE [projected eigh] (the methods of projected_eigh, measured)
# Methods (``G = Phi^T Phi`` ``[k, k]``, eps32 = 6e-8)::
#
#   float64        G, eigh(G) (torch: LAPACK dsyevd of MKL) and U = Phi V / sqrt(lam),
#                  all float64: the reference, exact to ~1e-15 lam_max for the
#                  float32 features given.
#   float64-scipy  the same equations and precision; G by numpy (A^T A runs as BLAS
#                  syrk: half the flops of torch's GEMM) and dsyevd from scipy's
#                  OpenBLAS, ~1.5x faster than MKL's on the AMD EPYC measured.
#                  The default.
#   float32        G and eigh(G) in float32 (ssyevd ~2.5x faster than dsyevd), W = Phi V
#                  in float32, then in float64 the Rayleigh quotients lam_j = |W_j|^2
#                  and U_j = W_j / |W_j|. The float32 round-off of G, ~eps32 lam_max,
#                  leaks ~eps32 lam_max / lam_j of the other modes into u_j: fine for a
#                  narrow spectrum, but a projected NTK spreads over 1e5-1e8 and has
#                  near-null directions, which become spurious eigenpairs. The check
#                  (max |u_i^T u_j| over the 32 smallest modes, cost rows*k*32) then fails
#                  and float64 reruns: slower than float64 alone.
#   svd32 / svd64  thin SVD Phi = U diag(s) V^T (LAPACK gesdd), lam = s^2: Gram-free, so
#                  small eigenvalues keep relative accuracy (error ~eps s_max s_j instead
#                  of eps s_max^2): svd32 is accurate to ~1e-6 on every spectrum, but
#                  not faster than the float64 Gram path.
#
# A partial eigensolver (top r = k/8 pairs by randomized SVD) is not offered: it is 4-10x
# cheaper, but the modes it leaves out still decay within the run. Treated as not
# decaying they add 5e-4..3e-1 of L_0 to the forecast; as one mode at their mean
# eigenvalue (with their exact energy, an oracle) still 3e-4..3e-2.
#
# NOTE [projected eigh]: measured by benchmarks/eigh.py (benchmarks/results/eigh.md):
# 9 cases, a real projected NTK (digits-cnn, NC = 4000, k = 2048, spread 6e5) and
# synthetic power-law spectra lam_j ~ j^-1, j^-2 with NC in {5000, 10000}, k in
# {1024, 2048, 4096} (spread 2e3..6e7). Time: CPU seconds, one thread, ratio to float64
# in the same process (at NC = 10000, k = 4096: float64 38 s, float64-scipy 29 s; with
# 2 threads on the loaded machine, wall clock 99 s vs 54 s, ratio 0.54). Forecast error:
# max_t |L^_t - L_t| / L_0 of the full-batch MSE curve, t <= 1000 GD steps at half the
# stability limit; the acceptance bar is 1e-4::
#
#   method             time / float64   eig err / lam_max   forecast err (real; worst)
#   float64-scipy      0.63 - 0.87      <= 2e-15            5e-15; 6e-12
#   float32 + check    0.55 (1 case)    4e-7                2.5e-6 where the check passed;
#                      1.2 - 1.9        (fell back)         8 of 9 cases fell back
#   float32, no check  0.39 - 0.73      <= 1e-6             2e-3; 5e-2         fails
#   svd32              0.92 - 1.15      <= 8e-6             1e-6; 6e-6
#   svd64              1.6 - 2.0        <= 3e-15            8e-15; 2e-12
#   partial (k/8)      0.10 - 0.24      up to 8e-3          5e-2; 3e-1         fails
#   partial + tail     0.10 - 0.24      up to 8e-3          1e-2; 3e-2         fails
#
# Steps to an 80% drop: identical to the reference for float64-scipy, svd32 (within 4
# of 371117), svd64; float32 without check off by up to 2.4x; partial misses it in 8 of
# 9 cases (the left-out energy never decays), partial + tail is late by up to 1.5x.


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
      method: ``"auto"`` (= ``"float64-scipy"``, chosen by measurement), ``"float64"``,
        ``"float32"``, ``"svd32"`` or ``"svd64"``; see the NOTE below.
      tol: round-off check of the float32 method: the largest ``|u_i^T u_j|``, ``i != j``,
        over the 32 modes of smallest eigenvalue; above it, float64 is used instead
        (with a :class:`PrecisionFallbackWarning`).
      check_spectrum: called with the raw eigenvalues of ``G`` before clamping at 0 (the
        kernel's positive-spectrum warning).

    Returns:
      ``(lam, U)``: ``lam`` ascending float64 ``[m]``, ``U`` float64 ``[rows, m]`` with
      orthonormal columns, ``m <= k``; eigenvalues ``<= 1e-12 lam_max`` are dropped (their
      directions are outside span(Phi): eigenvalue 0, the residual there never decays).

    Methods and their measured cost and error: NOTE [projected eigh] above.
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
    # (~eps32 lam_max / lam_j along the other modes); their overlap with all others
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


def add_gram_(out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out += g g^T`` (``g`` ``[m, d]``, ``out`` ``[m, m]``) from the upper block triangle.

    torch has no symmetric rank-k update (BLAS syrk): the products of row blocks of about
    :data:`SYRK_ROWS` are formed for the upper block triangle only and mirrored, about half
    the flops of ``g @ g.T`` once there are a few blocks (below three, one product).
    """
    m = g.shape[0]
    k = max(1, round(m / SYRK_ROWS))
    if k < 3:  # 3 of 4 products for two blocks: not worth the mirrored writes
        return out.addmm_(g, g.T)
    spans = [(m * a // k, m * (a + 1) // k) for a in range(k)]
    for ia, (p, q) in enumerate(spans):
        for r, t in spans[ia:]:
            prod = g[p:q] @ g[r:t].T
            out[p:q, r:t] += prod
            if r != p:
                out[r:t, p:q] += prod.T
    return out


# NOTE [split matrix-vector products]
# A product of a tall matrix with one vector (a @ v, v @ a; a [m, k], m >> k) reads a once
# and could run at memory speed, but torch's CPU build hands it to MKL's gemv, which ran on
# one core of the AMD EPYC of benchmarks/RESULTS.md "exact-top-split": 42 ms for the default
# example's Φ [160000, 1024] (float32), where a sum of it took 13 ms. Written as one batched
# product over T blocks of rows (T = torch's threads), torch runs the blocks side by side:
# 24.5-25.8 ms there (1.63-1.67x), and the exact top's whole forecast 1.16x faster (two
# products a step). a @ v is the same sum per row; v @ a adds the T blocks' partial sums
# (float rounding). Off the CPU, with one thread, or for a strided a: the plain product.
def split_mv(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``a @ v`` ``[m]`` for ``a`` ``[m, k]`` and ``v`` ``[k]``, the rows in blocks side by
    side (NOTE [split matrix-vector products])."""
    t, m = torch.get_num_threads(), a.shape[0]
    if a.device.type != "cpu" or t < 2 or m < 2 * t or not a.is_contiguous():
        return a @ v
    head = m // t * t
    out = torch.matmul(v.reshape(1, 1, -1), a[:head].view(t, -1, a.shape[1]).transpose(1, 2))
    out = out.reshape(-1)
    return out if head == m else torch.cat([out, a[head:] @ v])


def split_vm(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``v @ a`` ``[k]`` for ``v`` ``[m]`` and ``a`` ``[m, k]``: the blocks' partial sums
    side by side, then added (NOTE [split matrix-vector products])."""
    t, m = torch.get_num_threads(), a.shape[0]
    if a.device.type != "cpu" or t < 2 or m < 2 * t or not a.is_contiguous():
        return v @ a
    head = m // t * t
    out = (v[:head].reshape(t, 1, -1) @ a[:head].view(t, -1, a.shape[1])).sum((0, 1))
    return out if head == m else out + v[head:] @ a[head:]

"""Eigendecomposition of a projected kernel Theta = Phi Phi^T (tangentlab.linalg)."""

import warnings

import pytest
import torch

import tangentlab as tl
from tangentlab.errors import TangentlabError
from tangentlab.linalg import METHODS, PrecisionFallbackWarning, projected_eigh


def features(rows=120, k=40, spread=1e3, seed=0):
    """float32 Phi [rows, k] with singular values from 1 down to spread**-0.5 (power law)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -0.5 * torch.log10(torch.tensor(spread)).item(), k, dtype=torch.float64)
    return ((q1 * s) @ q2.T).float()


# stated tolerances, relative to lam_max: float32 paths carry float32 round-off
TOL = {"auto": 1e-12, "float64": 1e-12, "float64-scipy": 1e-12, "float32": 1e-5,
       "svd32": 1e-5, "svd64": 1e-12}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_reconstructs_theta_and_matches_float64_eigh(method):
    phi = features()
    lam, u = projected_eigh(phi, method=method)
    assert lam.dtype == torch.float64 and u.dtype == torch.float64
    assert u.shape == (phi.shape[0], lam.numel()) == (120, 40)
    assert bool((lam[1:] >= lam[:-1]).all())  # ascending
    theta = phi.double() @ phi.double().T
    top = float(lam.max())
    tol = TOL[method]
    assert float(((u * lam) @ u.T - theta).abs().max()) < tol * top * 10
    assert float((u.T @ u - torch.eye(lam.numel(), dtype=torch.float64)).abs().max()) < 1e-4
    ref = torch.linalg.eigvalsh(theta)[-40:]  # the k non-zero eigenvalues of Theta
    assert float((lam - ref).abs().max()) < tol * top


def test_default_is_accurate_on_a_wide_spectrum():
    phi = features(spread=1e10)  # a real projected NTK's spread (digits-cnn: 6e11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default never needs a fallback
        lam, u = projected_eigh(phi)
    ref_lam, ref_u = projected_eigh(phi, method="float64")
    torch.testing.assert_close(lam, ref_lam, rtol=0, atol=1e-12 * float(ref_lam.max()))


def test_zero_directions_are_dropped():
    phi = features(k=30)
    phi = torch.cat([phi, phi[:, :10], torch.zeros(120, 5)], dim=1)  # rank 30 of 45 columns
    for method in ("float64", "float32", "svd32", "svd64"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lam, u = projected_eigh(phi, method=method)
        # float32 Gram round-off turns the 15 null directions into eigenvalues ~1e-7
        # lam_max: its check sees them (overlapping eigenvectors) and falls back
        fell_back = [w for w in caught if issubclass(w.category, PrecisionFallbackWarning)]
        assert len(fell_back) == (method == "float32"), method
        assert lam.numel() == 30, method
        assert u.shape == (120, 30)
        assert float(lam.min()) > 1e-12 * float(lam.max())


def test_float32_falls_back_on_ill_conditioned_features():
    phi = features(spread=1e10)  # float32 Gram round-off ~1e-7 lam_max >> lam_min
    with pytest.warns(PrecisionFallbackWarning, match="float32 round-off check failed"):
        lam, u = projected_eigh(phi, method="float32")
    ref_lam, ref_u = projected_eigh(phi, method="float64-scipy")  # what it falls back to
    torch.testing.assert_close(lam, ref_lam)
    torch.testing.assert_close(u, ref_u)


def test_float32_passes_its_check_on_a_narrow_spectrum():
    phi = features(spread=1e2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lam, _ = projected_eigh(phi, method="float32")
    ref, _ = projected_eigh(phi, method="float64")
    assert float((lam - ref).abs().max()) < 1e-6 * float(ref.max())


def test_spectrum_callback_sees_the_raw_eigenvalues():
    seen = []
    lam, _ = projected_eigh(features(), check_spectrum=seen.append)
    assert len(seen) == 1 and seen[0].numel() == 40


def test_bad_input():
    with pytest.raises(TangentlabError, match="method must be one of"):
        projected_eigh(features(), method="float16")
    with pytest.raises(TangentlabError, match="rows, k"):
        projected_eigh(torch.zeros(3))
    lam, u = projected_eigh(torch.zeros(5, 0))
    assert lam.shape == (0,) and u.shape == (5, 0)


def test_kernel_eigh_uses_projected_eigh():
    phi = features(rows=60, k=24)  # N = 20 samples, C = 3 outputs
    k = tl.Kernel(f0=torch.zeros(20, 3), targets=torch.arange(20) % 3, features=phi)
    lam, u = k.eigh()
    ref_lam, ref_u = projected_eigh(phi)
    torch.testing.assert_close(lam, ref_lam)
    torch.testing.assert_close(u, ref_u)
    assert k.eigh()[0] is lam  # cached


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 1001])
def test_split_products_equal_the_plain_ones(threads, rows):
    """NOTE [split matrix-vector products]: a @ v and v @ a over blocks of rows, remainder
    rows included, equal the plain products (float64: to rounding)."""
    from tangentlab.linalg import split_mv, split_vm

    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 9, generator=g, dtype=torch.float64)
    v, w = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(rows, generator=g,
                                                                           dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mv, vm = split_mv(a, v), split_vm(w, a)
        t_mv, t_vm = split_mv(a.T.contiguous().T, v), split_vm(w, a.T.contiguous().T)
    finally:
        torch.set_num_threads(before)
    assert mv.shape == (rows,) and vm.shape == (9,)
    torch.testing.assert_close(mv, a @ v, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(vm, w @ a, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(t_mv, a @ v, rtol=1e-13, atol=1e-13)  # not contiguous
    torch.testing.assert_close(t_vm, w @ a, rtol=1e-13, atol=1e-13)


def test_split_products_in_float32_agree_to_rounding():
    """float32 as the exact top keeps Φ: the split products stay within float32 rounding of
    a float64 reference (relative to the result's norm)."""
    from tangentlab.linalg import split_mv, split_vm

    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(4099, 64, generator=g), torch.randn(64, generator=g)
    w = torch.randn(4099, generator=g)
    ref_mv, ref_vm = a.double() @ v.double(), w.double() @ a.double()
    assert float((split_mv(a, v).double() - ref_mv).norm() / ref_mv.norm()) < 1e-6
    assert float((split_vm(w, a).double() - ref_vm).norm() / ref_vm.norm()) < 1e-6

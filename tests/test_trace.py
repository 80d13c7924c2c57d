"""Trace kernels (NOTE [trace kernel] in tangentlab.compute): Θ ≈ K ⊗ I_C with
K_ij = tr(Θ_ij)/C, exact or estimated with random output probes, and every forecast of a
trace kernel equal to the forecast of the explicit full kernel K ⊗ I_C."""

from __future__ import annotations

import datetime
import itertools
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from safetensors.torch import save_file

import tangentlab as tl
from conftest import make_cnn, make_mlp, split_settings
from tangentlab import dynamics as dyn
from tangentlab.cli import main
from tangentlab.compute import trace_probes
from tangentlab.errors import CacheMismatchError, MemoryBudgetError, TangentlabError
from tangentlab.memory import activation_elements, plan
from tangentlab.training import SGD


def _block_traces(full: tl.Kernel) -> torch.Tensor:
    """K_ij = tr(Θ_ij)/C from a full kernel, ``[N, N]``."""
    n, c = full.num_samples, full.num_classes
    return torch.einsum("iaja->ij", full.gram().reshape(n, c, n, c)) / c


def _kron(kernel: tl.Kernel) -> tl.Kernel:
    """The explicit full kernel K ⊗ I_C of a trace kernel (sample-major)."""
    eye = torch.eye(kernel.num_classes, dtype=torch.float64)
    theta = None if kernel.theta is None else torch.kron(kernel.theta.double(), eye)
    feats = None if kernel.features is None else torch.kron(kernel.features.double(), eye)
    return tl.Kernel(f0=kernel.f0, targets=kernel.targets, theta=theta, features=feats,
                     jw0=kernel.jw0)  # fmt: skip


def _data(n: int, seed: int, shape=(4,), classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.double)
    return x, torch.randint(0, classes, (n,), generator=g)


# ---- the estimator ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["structured", "vmap", "loop-jacrev", "loop-vjp"])
def test_exact_trace_equals_block_traces_of_the_full_kernel(cnn_data, mode):
    full = tl.compute_kernel(tl.Tangent(make_cnn(), jacobian_mode=mode), cnn_data, progress=False)
    tr = tl.compute_kernel(
        tl.Tangent(make_cnn(), jacobian_mode=mode), cnn_data, progress=False, trace=True
    )
    assert tr.is_trace and tr.structure == "trace" and not full.is_trace
    assert tr.theta.shape == (6, 6) and tr.features is None
    torch.testing.assert_close(tr.theta, _block_traces(full), rtol=1e-12, atol=1e-12)
    # f0 and J w0 stay exact [N, C]
    torch.testing.assert_close(tr.f0, full.f0, rtol=0, atol=0)
    torch.testing.assert_close(tr.jw0, full.jw0, rtol=1e-12, atol=1e-12)
    assert tr.metadata["trace"] == "exact"


def test_probes_at_least_c_are_the_exact_trace(mlp_data):
    exact = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=True)
    for s in (3, 7):  # C = 3
        k = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=s)
        assert k.metadata["trace"] == "exact"
        torch.testing.assert_close(k.theta, exact.theta, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mode", ["structured", "vmap"])
def test_trace_kernel_of_a_probed_tangent_composes_the_probes(mlp_data, mode):
    """A trace kernel of read-out directions V [C, S] (the head-exact model's κ_⊥) is the
    sum of the probed kernel's diagonal blocks: probing a probed Tangent composes."""
    v = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    t = tl.Tangent(make_mlp(), jacobian_mode=mode).probed(v)
    data = (mlp_data[0], torch.zeros_like(mlp_data[1]))  # labels unused, inside [0, S)
    full = tl.compute_kernel(t, data, progress=False)  # [N S, N S]
    tr = tl.compute_kernel(t, data, progress=False, trace=True)
    torch.testing.assert_close(tr.theta, _block_traces(full), rtol=1e-12, atol=1e-12)
    with pytest.raises(TangentlabError, match="probes must have 2 rows"):
        t.probed(torch.ones(3, 1, dtype=torch.double))


def test_probed_kernel_is_the_stated_estimator(mlp_data):
    """compute_kernel(trace=S, seed) = (1/(S C)) Σ_s (v_s^T J_i)(v_s^T J_j) with the seeded
    probes, and J w0 is exact (not probed)."""
    x, y = mlp_data
    t = tl.Tangent(make_mlp())
    jac = t.jacobian(x)  # [N, C, P]
    full = tl.compute_kernel(make_mlp(), mlp_data, progress=False)
    for s, seed in ((1, 0), (2, 5)):
        k = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=s, seed=seed)
        v = trace_probes(3, s, seed=seed)  # [C, S], entries ±1/sqrt(S C)
        torch.testing.assert_close(v.abs(), torch.full_like(v, (s * 3) ** -0.5))
        g = torch.einsum("cs,ncp->nsp", v, jac).reshape(x.shape[0], -1)
        torch.testing.assert_close(k.theta, g @ g.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k.jw0, full.jw0, rtol=1e-12, atol=1e-12)
        assert k.metadata["trace"] == f"rademacher:probes={s}:seed={seed}"
    # deterministic: the same seed gives the same kernel, another seed another one
    a = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=2, seed=3)
    b = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=2, seed=3)
    c = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=2, seed=4)
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)


def test_one_probe_is_unbiased_over_all_sign_vectors(mlp_data):
    """E_v[(v^T J_i)(v^T J_j)]/C over the 2^C Rademacher vectors is exactly tr(Θ_ij)/C."""
    x, _ = mlp_data
    t = tl.Tangent(make_mlp())
    ref = _block_traces(tl.compute_kernel(make_mlp(), mlp_data, progress=False))
    acc = torch.zeros_like(ref)
    signs = list(itertools.product((-1.0, 1.0), repeat=3))
    for v in signs:
        probe = torch.tensor(v, dtype=torch.double)[:, None] / 3**0.5  # [C, 1]
        g = t.probed(probe).jacobian(x).reshape(x.shape[0], -1)  # [N, P]
        acc += g @ g.T
    torch.testing.assert_close(acc / len(signs), ref, rtol=1e-12, atol=1e-12)


def test_random_probes_converge_to_the_trace_kernel():
    """Relative error ‖K_S − K‖/‖K‖ averaged over seeds falls like 1/sqrt(S) (C = 10)."""
    x, y = _data(6, 0, classes=10)
    model = make_mlp(classes=10)
    ref = _block_traces(tl.compute_kernel(tl.Tangent(model, jacobian_mode="vmap"), (x, y),
                                          progress=False))  # fmt: skip
    jac = tl.Tangent(model).jacobian(x)  # [N, C, P]
    jn, refn = jac.numpy(), ref.numpy()  # numpy: tiny products, no thread hand-offs
    errs = {}
    for s in (1, 3, 9):
        vals, mean = [], np.zeros_like(refn)
        for seed in range(200):
            v = trace_probes(10, s, seed=seed).numpy()
            g = np.einsum("cs,ncp->nsp", v, jn).reshape(6, -1)
            est = g @ g.T
            mean += est / 200
            vals.append(np.linalg.norm(est - refn) / np.linalg.norm(refn))
        errs[s] = float(np.mean(vals))
        # the average of 200 estimates: unbiased, error ~ errs[s] / sqrt(200)
        assert np.linalg.norm(mean - refn) / np.linalg.norm(refn) < 3 * errs[s] / 200**0.5
    assert errs[1] > errs[3] > errs[9]
    assert errs[1] / errs[9] == pytest.approx(3.0, rel=0.35)
    k = tl.compute_kernel(tl.Tangent(model, jacobian_mode="vmap"), (x, y), progress=False,
                          trace=9)  # fmt: skip
    assert float((k.theta - ref).norm() / ref.norm()) < 4 * errs[9]


def test_projected_trace_kernel_is_unbiased_over_projection_seeds(mlp_data):
    """Projected exact trace: K ≈ Φ' Φ'^T, Φ' [N, C k]; its mean over seeds is K."""
    ref = _block_traces(tl.compute_kernel(make_mlp(), mlp_data, progress=False))
    mean, errs = torch.zeros_like(ref), []
    for seed in range(30):
        proj = tl.Projection(8, kind="gaussian", seed=seed)
        t = tl.Tangent(make_mlp(), projection=proj, jacobian_mode="vmap")
        k = tl.compute_kernel(t, mlp_data, progress=False, trace=True, keep_theta=False)
        assert k.features.shape == (7, 3 * 8) and k.theta is None and k.is_trace
        mean += k.gram() / 30
        errs.append(float((k.gram() - ref).norm() / ref.norm()))
    # the mean of 30 independent unbiased estimates: error ~ mean single error / sqrt(30)
    assert float((mean - ref).norm() / ref.norm()) < 2 * np.mean(errs) / 30**0.5


@pytest.mark.parametrize("mode", ["structured", "vmap"])
def test_tensor_sketch_trace_features_match_projected_probed_jacobians(cnn_data, mode, monkeypatch):
    """The structured tensor-sketch path gives the same trace features as projecting the
    probed Jacobians; J w0 stays exact."""
    x, _ = cnn_data
    t = tl.Tangent(make_cnn(), projection=16, jacobian_mode=mode)
    with monkeypatch.context() as m:
        if mode == "structured":  # the fast path, not a silent fallback to Jacobian blocks

            def formed(self, x):
                raise AssertionError("the tensor-sketch fast path formed Jacobian blocks")

            m.setattr(tl.Tangent, "jacobian_blocks", formed)
        k = tl.compute_kernel(t, cnn_data, progress=False, trace=2, seed=1)
    probed = tl.Tangent(make_cnn(), projection=16, jacobian_mode="vmap").probed(
        trace_probes(3, 2, seed=1)
    )
    phi = probed.project(probed.jacobian_blocks(x)).reshape(6, -1)  # [N, S k]
    torch.testing.assert_close(k.features, phi, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k.theta, phi @ phi.T, rtol=1e-10, atol=1e-10)
    full = tl.compute_kernel(make_cnn(), cnn_data, progress=False)
    torch.testing.assert_close(k.jw0, full.jw0, rtol=1e-12, atol=1e-12)


# ---- forecasts: trace kernel == explicit K ⊗ I_C -----------------------------------------

CASES = {
    "mse-closed-form": {},
    "mse-flow": {"time": "continuous"},
    "mse-momentum": {"momentum": 0.5},
    "mse-decay": {"weight_decay": 0.05, "momentum": 0.3},
    "mse-decay-w0": {"weight_decay": 0.05, "decay_to": "w0"},
    "ce": {"loss": "ce"},
    "ce-momentum-decay": {"loss": "ce", "momentum": 0.9, "weight_decay": 0.01},
    "ce-flow": {"loss": "ce", "time": "continuous"},
    "minibatch-mse": {"batch_size": 3, "paths": 3},
    "minibatch-ce-momentum": {"batch_size": 2, "paths": 2, "momentum": 0.9, "loss": "ce"},
    "minibatch-replacement": {"batch_size": 3, "paths": 2, "sampling": "replacement"},
    "minibatch-sde": {"batch_size": 3, "paths": 3, "noise": "sde"},
    "mse-iterated": {"execution": "dual"},
}


@pytest.fixture(scope="module")
def trace_kernels():
    x, y = _data(7, 0)
    exact = tl.compute_kernel(make_mlp(), (x, y), progress=False, trace=True)
    t = tl.Tangent(make_mlp(), projection=5)
    projected = tl.compute_kernel(t, (x, y), progress=False, trace=2, keep_theta=False)
    return exact, projected


def _assert_same_forecast(a: tl.Forecast, b: tl.Forecast) -> None:
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.accuracy, b.accuracy, rtol=0, atol=1e-12)
    assert (a.loss_paths is None) == (b.loss_paths is None)
    if a.loss_paths is not None:
        np.testing.assert_allclose(a.loss_paths, b.loss_paths, rtol=1e-10, atol=1e-12)
    assert a.diverges == b.diverges and a.divergence_step == b.divergence_step
    np.testing.assert_allclose(a.stability, b.stability, rtol=1e-8)
    np.testing.assert_allclose(a.loss_limit, b.loss_limit, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_forecast_of_a_trace_kernel_equals_the_explicit_kron_kernel(trace_kernels, case):
    tr = trace_kernels[0]
    lr = 0.6 * tr.num_samples / float(tr.eigh()[0].max())
    opt, opts = split_settings(lr, CASES[case])
    a = tl.forecast(tr, opt, 25, **opts)
    b = tl.forecast(_kron(tr), opt, 25, **opts)
    assert a.method["solver"] == b.method["solver"]
    assert not a.diverges
    _assert_same_forecast(a, b)


@pytest.mark.parametrize(
    "case, execution",
    [("mse-closed-form", "auto"), ("mse-decay", "auto")]
    + [(c, e) for c in ("ce", "minibatch-ce-momentum") for e in ("auto", "primal", "dual")],
)
def test_projected_trace_kernel_forecast_primal_and_dual(trace_kernels, case, execution):
    tr = trace_kernels[1]  # features [N, S k] only
    assert tr.features.shape == (7, 10) and tr.theta is None
    opts = dict(CASES[case])
    if execution != "auto":  # full-batch MSE always runs the closed form
        opts["execution"] = execution
    lr = 0.6 * tr.num_samples / float(tr.eigh()[0].max())
    opt, opts = split_settings(lr, opts)
    a = tl.forecast(tr, opt, 25, **opts)
    b = tl.forecast(_kron(tr), opt, 25, **opts)
    assert a.method["execution"] == b.method["execution"]
    _assert_same_forecast(a, b)


def test_divergence_of_a_trace_kernel_matches(trace_kernels):
    tr = trace_kernels[0]
    lr = 2.5 * tr.num_samples / float(tr.eigh()[0].max())
    a, b = tl.forecast(tr, SGD(lr), 30), tl.forecast(_kron(tr), SGD(lr), 30)
    assert a.diverges and b.diverges
    _assert_same_forecast(a, b)


def test_sweep_and_extrapolation_accept_trace_kernels(trace_kernels):
    tr = trace_kernels[0]
    kron = _kron(tr)
    lr = tr.num_samples / float(tr.eigh()[0].max())
    opts = tl.SGD.grid(lr=[0.3 * lr, lr], momentum=[0.0, 0.5])
    sa = tl.sweep(tr, opts, 20, batch_sizes=[3, None], paths=2).table
    sb = tl.sweep(kron, opts, 20, batch_sizes=[3, None], paths=2).table
    assert list(sa["steps_to_target"]) == list(sb["steps_to_target"])
    np.testing.assert_allclose(sa["final_loss"], sb["final_loss"], rtol=1e-10)
    # dataset_size: N-sample forecast from the n-sample spectrum (no tail: exact match)
    a = tl.forecast(tr, SGD(lr), 20, dataset_size=70)
    b = tl.forecast(kron, SGD(lr), 20, dataset_size=70)
    _assert_same_forecast(a, b)
    assert a.hyperparameters["num_samples"] == 70
    spec = tl.extrapolate(tr, 70)
    ref = tl.extrapolate(kron, 70)
    np.testing.assert_allclose(spec.mu, ref.mu, rtol=1e-10, atol=1e-12)
    assert spec.initial_loss() == pytest.approx(ref.initial_loss(), rel=1e-12)
    # a power-law tail runs (mode energies within the C-fold degenerate eigenvalues are
    # split along the classes, so it need not equal the explicit kernel's arbitrary split)
    tail = tl.forecast(tl.extrapolate(tr, 70, tail="powerlaw", fit_range=(0.1, 0.9)), SGD(lr), 20)
    assert tail.loss[0] == pytest.approx(a.loss[0], rel=1e-10)
    assert np.all(np.isfinite(tail.loss))


def test_trace_operators_match_the_dense_kron_operator():
    rng = np.random.default_rng(0)
    n, c, k = 5, 4, 3
    phi = rng.standard_normal((n, k))
    kmat = phi @ phi.T
    dense = dyn.DenseKernelOperator(np.kron(kmat, np.eye(c)), c)
    for op in (dyn.TraceKernelOperator(kmat, c), dyn.TraceFeatureKernelOperator(phi, c)):
        x = rng.standard_normal(n * c)
        np.testing.assert_allclose(op.matvec(x), dense.matvec(x), rtol=1e-12)
        xs = rng.standard_normal((n * c, 3))
        np.testing.assert_allclose(op.matvec(xs), dense.matvec(xs), rtol=1e-12)
        batch = np.array([4, 1, 4])  # repeated ids add up
        d = rng.standard_normal((3, c))
        np.testing.assert_allclose(op.cols_matvec(batch, d), dense.cols_matvec(batch, d),
                                   rtol=1e-12)  # fmt: skip
        assert dyn.top_eigenvalue(op, n * c) == pytest.approx(np.linalg.eigvalsh(kmat)[-1])


# ---- the Kernel object, persistence, cache -------------------------------------------------


def test_trace_kernel_save_load_round_trip(tmp_path, trace_kernels):
    for k in trace_kernels:
        path = k.save(tmp_path / "k.safetensors")
        back = tl.load_kernel(path)
        assert back.is_trace and back.structure == "trace"
        for name in ("theta", "features", "f0", "jw0", "targets"):
            a, b = getattr(k, name), getattr(back, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        meta = {key: v for key, v in back.metadata.items() if key != "tangentlab_version"}
        assert meta == {key: str(v) for key, v in k.metadata.items()}
        d = back.describe()
        assert d["structure"] == "trace" and "K (x) I_C" in d["structure_note"]
        json.dumps(d)


def test_old_kernel_files_load_as_full(tmp_path):
    f0 = torch.zeros(2, 3, dtype=torch.double)
    path = tmp_path / "old.safetensors"
    save_file({"f0": f0, "targets": torch.tensor([0, 2]), "theta": torch.eye(6).double()},
              str(path), metadata={"format": "tangentlab.kernel/1"})  # fmt: skip
    k = tl.load_kernel(path)
    assert k.structure == "full" and not k.is_trace and k.theta.shape == (6, 6)


def test_kernel_checks_shapes_for_its_structure():
    f0, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
    k = tl.Kernel(f0=f0, targets=y, theta=torch.eye(4), structure="trace")
    assert k.kernel_rows == 4 and k.eigh()[1].shape == (4, 4)
    assert k.describe()["trace_per_sample"] == pytest.approx(3.0)  # tr(K ⊗ I_3)/N
    with pytest.raises(TangentlabError, match=r"\[N, N\] = \[4, 4\].*Drop structure='trace'"):
        tl.Kernel(f0=f0, targets=y, theta=torch.eye(12), structure="trace")
    with pytest.raises(TangentlabError, match=r"\[N\*C, N\*C\] = \[12, 12\]"):
        tl.Kernel(f0=f0, targets=y, theta=torch.eye(4))
    with pytest.raises(TangentlabError, match=r"features must have shape \[N, k\]"):
        tl.Kernel(f0=f0, targets=y, features=torch.ones(12, 2), structure="trace")
    with pytest.raises(TangentlabError, match="structure must be 'full'.*or 'trace'"):
        tl.Kernel(f0=f0, targets=y, theta=torch.eye(4), structure="kron")


def test_cache_never_mixes_full_and_trace_kernels(tmp_path, mlp_data):
    cache = tmp_path / "cache"
    full = tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=cache)
    for bad in (True, 2):
        with pytest.raises(CacheMismatchError, match=r"trace: cached None vs requested"):
            tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=cache, trace=bad)
    again = tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=cache)
    assert not again.is_trace and torch.equal(again.theta, full.theta)

    tcache = tmp_path / "trace"
    tr = tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=tcache, trace=2)
    with pytest.raises(CacheMismatchError, match=r"trace: cached .*probes=2.* vs requested None"):
        tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=tcache)
    with pytest.raises(CacheMismatchError, match=r"probes=2.* vs requested 'exact'"):
        tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=tcache, trace=True)
    with pytest.raises(CacheMismatchError, match=r"seed=0.* vs requested .*seed=1"):
        tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=tcache, trace=2, seed=1)
    reused = tl.compute_kernel(make_mlp(), mlp_data, progress=False, cache=tcache, trace=2)
    assert reused.is_trace and torch.equal(reused.theta, tr.theta)


def test_exact_trace_kernel_in_strips_equals_single_pass(cnn_data):
    t = tl.Tangent(make_cnn(), jacobian_mode="vmap")
    ref = tl.compute_kernel(t, cnn_data, progress=False, trace=True)
    # a budget that holds K [N, N] and only 2 samples' Jacobians [C, P] forces strips
    n, c, p = 6, 3, t.num_params
    act = activation_elements(t.model, lambda: t.f0(cnn_data[0][:1]))
    per = 8 * (3 * c * p + (c + 2) * 2 * act)
    budget = n * n * 8 + per + 2 * c * p * 8 + 100
    assert plan(n=n, c=c, p=p, k=None, itemsize=8, act=act, budget=budget, trace=True).strip == 2
    k = tl.compute_kernel(t, cnn_data, progress=False, trace=True, memory_budget=budget)
    torch.testing.assert_close(k.theta, ref.theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.jw0, ref.jw0, rtol=1e-12, atol=1e-12)


def test_interrupted_trace_kernel_resumes(tmp_path, cnn_data, monkeypatch):
    t = tl.Tangent(make_cnn(), projection=16, jacobian_mode="vmap")
    ref = tl.compute_kernel(t, cnn_data, progress=False, trace=2, batch_size=2)
    calls = {"n": 0}
    real = tl.Tangent.projected_chunk

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 3:  # the last of 3 chunks of 2 samples
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(tl.Tangent, "projected_chunk", flaky)
    cache = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        tl.compute_kernel(t, cnn_data, progress=False, trace=2, batch_size=2, cache=cache)
    assert len(list(cache.glob("part-*.safetensors"))) == 2
    calls["n"] = -10
    k = tl.compute_kernel(t, cnn_data, progress=False, trace=2, batch_size=2, cache=cache)
    assert calls["n"] == -9  # only the missing chunk was computed
    assert k.is_trace
    for f in ("features", "theta", "f0", "jw0"):
        torch.testing.assert_close(getattr(k, f), getattr(ref, f), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "bad, match",
    [
        (0, r"trace=0 is not a number of probes.*trace=False for the full kernel"),
        (-2, r"trace=-2 is not a number of probes"),
        (1.5, r"got 1.5 \(float\); e.g. trace=4"),
        (2.0, r"got 2.0 \(float\)"),
        ("exact", r"got 'exact' \(str\)"),
        (None, r"got None \(NoneType\)"),
    ],
)
def test_bad_trace_values_are_refused(mlp_data, bad, match):
    with pytest.raises(TangentlabError, match=match):
        tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=bad)


def test_true_is_the_exact_trace_and_one_is_one_probe(mlp_data):
    """bool vs int: trace=True is exact, trace=1 is a single random probe."""
    a = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=True)
    b = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=1)
    c = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=np.int64(1))
    assert a.metadata["trace"] == "exact"
    assert b.metadata["trace"] == c.metadata["trace"] == "rademacher:probes=1:seed=0"
    assert not torch.allclose(a.theta, b.theta)
    f = tl.compute_kernel(make_mlp(), mlp_data, progress=False, trace=False)
    assert not f.is_trace and "trace" not in f.metadata


def test_memory_plan_counts_the_trace_kernel_size():
    kw = dict(n=1000, c=10, p=100, k=None, itemsize=8, act=100)
    # the full kernel [10^4, 10^4] needs 800 MB; the trace kernel [10^3, 10^3] 8 MB
    with pytest.raises(MemoryBudgetError, match=r"Theta \[10000, 10000\].*trace=True"):
        plan(**kw, budget=100 << 20)
    p = plan(**kw, budget=100 << 20, trace=True)
    assert p.fixed >= 1000 * 1000 * 8 and p.estimate <= 100 << 20
    with pytest.raises(MemoryBudgetError, match=r"K \[1000, 1000\]"):
        plan(**kw, budget=4 << 20, trace=True)
    # projected with S = 2 probes: Phi' [N, S k] as Phi [N S, k]; K [N, N] vs Theta [NS, NS]
    proj = {**kw, "k": 64, "c": 2}
    for keep in (False, True):
        full = plan(**proj, budget=1 << 30, keep_theta=keep)
        tr = plan(**proj, budget=1 << 30, keep_theta=keep, trace=True)
        assert full.fixed - tr.fixed == (keep and (2000**2 - 1000**2) * 8)


def test_trace_kernel_fits_where_the_full_kernel_does_not():
    x, y = _data(40, 0, classes=10)
    model = make_mlp(classes=10)
    # 1 MiB: the full Theta [400, 400] alone needs 1.28 MB, the trace kernel K 12.8 kB
    with pytest.raises(MemoryBudgetError, match=r"Theta \[400, 400\]"):
        tl.compute_kernel(model, (x, y), progress=False, memory_budget=1 << 20)
    k = tl.compute_kernel(model, (x, y), progress=False, memory_budget=1 << 20, trace=True)
    assert k.theta.shape == (40, 40)


# ---- command line ------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


NET = """
import torch
from torch import nn

def make(num_classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, num_classes))
"""


def test_cli_trace_and_probes_end_to_end(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((9, 5)), y=rng.integers(0, 4, 9))
    src = ("--model", f"{tmp_path / 'net.py'}:make", "--data", tmp_path / "d.npz",
           "--num-classes", 4, "--no-progress", "--projection", "exact")  # fmt: skip
    res = _invoke("kernel", *src, "--probes", "2", "--out", tmp_path / "k")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "k" / "kernel.json").read_text())
    assert summary["structure"] == "trace"
    assert summary["metadata"]["trace"] == "rademacher:probes=2:seed=0"
    kfile = tmp_path / "k" / "kernel" / "kernel.safetensors"
    k = tl.load_kernel(kfile)
    assert k.is_trace and k.theta.shape == (9, 9) and k.jw0.shape == (9, 4)

    res = _invoke("forecast", "--kernel", kfile, "--trace", "--lr", "0.05", "--steps", "5",
                  "--out", tmp_path / "f")  # fmt: skip
    assert res.exit_code == 0, res.output
    fc = json.loads((tmp_path / "f" / "forecast.json").read_text())
    loss = fc["forecasts"][0]["loss"] if "forecasts" in fc else fc["loss"]
    np.testing.assert_allclose(loss, tl.forecast(k, SGD(0.05), 5).loss, rtol=1e-9)

    # --trace computes the exact trace kernel; sweep over it (minibatch and full batch)
    res = _invoke("sweep", *src, "--trace", "--lr", "0.01,0.02", "--steps", "5",
                  "--batch-size", "4,full", "--paths", "2", "--out", tmp_path / "s")  # fmt: skip
    assert res.exit_code == 0, res.output
    exact = tl.load_kernel(tmp_path / "s" / "kernel" / "kernel.safetensors")
    assert exact.is_trace and exact.metadata["trace"] == "exact"

    # a cached trace kernel is not reused for a full request (and the error says why)
    res = _invoke("kernel", *src, "--linearize", "all", "--out", tmp_path / "k")
    assert res.exit_code == 2 and "trace" in res.output
    res = _invoke("kernel", *src, "--probes", "0", "--out", tmp_path / "z")
    assert res.exit_code == 2 and "--probes must be a positive integer" in res.output


def test_cli_refuses_trace_with_a_full_kernel_file(tmp_path, mlp_data):
    full = tl.compute_kernel(make_mlp(), mlp_data, progress=False)
    path = full.save(tmp_path / "full.safetensors")
    res = _invoke("forecast", "--kernel", path, "--trace", "--lr", "0.1", "--steps", "3",
                  "--out", tmp_path / "o")  # fmt: skip
    assert res.exit_code == 2
    assert "holds a full kernel; drop --trace/--probes" in res.output


# ---- torch.distributed ----------------------------------------------------------------------


def _dist_worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        got = {}
        for name, opts in {
            "exact": {"trace": True},
            "probes": {"trace": 2},
            "projected": {"trace": 2, "projection": 8, "batch_size": 2},
        }.items():
            opts = dict(opts)
            t = tl.Tangent(make_mlp(), projection=opts.pop("projection", None),
                           jacobian_mode="vmap")  # fmt: skip
            k = tl.compute_kernel(t, _data(7, 0), progress=False, **opts)
            got[name] = {f: getattr(k, f) for f in ("theta", "features", "f0", "jw0")}
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down (a rank destroying the group while
        # the other still talks to it can abort it: "terminate called without an active
        # exception", SIGABRT, about one run in ten)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
def test_distributed_trace_kernels_equal_the_single_process_ones(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    cases = {"exact": {"trace": True}, "probes": {"trace": 2},
             "projected": {"trace": 2, "projection": 8, "batch_size": 2}}  # fmt: skip
    for name, opts in cases.items():
        opts = dict(opts)
        t = tl.Tangent(make_mlp(), projection=opts.pop("projection", None), jacobian_mode="vmap")
        ref = tl.compute_kernel(t, _data(7, 0), progress=False, distributed=False, **opts)
        for got in ranks:
            for f, v in got[name].items():
                want = getattr(ref, f)
                if want is None:
                    assert v is None
                else:
                    torch.testing.assert_close(v, want, rtol=1e-12, atol=1e-12)

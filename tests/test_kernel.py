"""Projected kernels, memory planning, save/load, cache reuse, refusal and resume."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tangentlab as tl
from conftest import make_cnn, make_mlp, make_transformer
from tangentlab.errors import CacheMismatchError, MemoryBudgetError, TangentlabError
from tangentlab.memory import activation_elements, parse_bytes, plan
from tangentlab.projection import Projector


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


KINDS = ["sparse", "tensor", "gaussian", "rademacher"]


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_isotropic(kind):
    names = {"a": 300, "b": 200}
    shapes = {"a": (20, 15), "b": (200,)}  # "a" is factorized by the tensor sketch
    r = Projector(tl.Projection(256, kind=kind, seed=3), names, shapes).matrix(["a", "b"])
    rrt = r @ r.T  # E[R R^T] = I
    assert abs(float(torch.diagonal(rrt).mean()) - 1.0) < 0.05
    off = rrt - torch.diag(torch.diagonal(rrt))
    assert float(off.abs().mean()) < 0.1  # ~ 1/sqrt(k) * sqrt(2/pi)


@pytest.mark.parametrize("kind", KINDS)
def test_projected_kernel_converges_like_one_over_sqrt_k(kind, cnn_data):
    model = make_cnn()
    exact = tl.compute_kernel(model, cnn_data, progress=False).theta
    errs = {}
    for k in (64, 4096):
        e = [
            rel_err(
                tl.compute_kernel(
                    model, cnn_data, projection=tl.Projection(k, kind=kind, seed=s), progress=False
                ).theta,
                exact,
            )
            for s in range(4)
        ]
        errs[k] = float(np.mean(e))
    # 64x more dimensions -> error / 8 for a 1/sqrt(k) law; allow sampling spread
    ratio = errs[64] / errs[4096]
    assert 4.0 < ratio < 16.0, errs
    assert errs[4096] < 0.1


def test_projection_is_deterministic_across_chunking(mlp_data):
    model = make_mlp()
    a = tl.compute_kernel(model, mlp_data, projection=32, seed=5, batch_size=2, progress=False)
    b = tl.compute_kernel(model, mlp_data, projection=32, seed=5, batch_size=7, progress=False)
    c = tl.compute_kernel(model, mlp_data, projection=32, seed=6, progress=False)
    torch.testing.assert_close(a.features, b.features)
    assert not torch.allclose(a.features, c.features)
    torch.testing.assert_close(a.theta, a.features @ a.features.T)


def test_projected_features_equal_jacobian_times_r(mlp_data):
    x, _ = mlp_data
    t = tl.Tangent(make_mlp(), projection=tl.Projection(16, kind="gaussian", seed=1))
    r = t.projector.matrix(t.param_names)
    ref = t.jacobian(x) @ r
    torch.testing.assert_close(t.projected_jacobian(x), ref)


def test_exact_kernel_in_strips_equals_single_pass(cnn_data, monkeypatch):
    model = make_cnn()
    full = tl.compute_kernel(model, cnn_data, progress=False)
    # the Jacobian path (auto takes the Jacobian-free gram path here: tests/test_gram.py)
    t = tl.Tangent(model, jacobian_mode="structured")
    calls = []
    real = tl.Tangent.jacobian_blocks
    monkeypatch.setattr(tl.Tangent, "jacobian_blocks", lambda s, x: calls.append(1) or real(s, x))
    # a budget that holds Theta and only 2 samples' Jacobians forces strips
    k = tl.compute_kernel(
        t, cnn_data, memory_budget=_strip_budget(t, cnn_data[0], 3, 2), progress=False
    )
    assert len(calls) > 1  # really in strips, not one pass over all 6 samples
    torch.testing.assert_close(k.theta, full.theta)
    torch.testing.assert_close(k.f0, full.f0)


def test_memory_plan_stays_under_budget_and_fails_early():
    fits = []
    for budget in (10**6, 10**7, 10**8, 10**9):
        for k in (None, 64):
            try:
                pl = plan(n=100, c=10, p=2000, k=k, itemsize=4, act=500, budget=budget)
            except MemoryBudgetError:
                continue
            assert pl.estimate <= budget and pl.chunk >= 1
            fits.append((budget, k))
    # not vacuous: exact and projected plans both fit some budget (and were checked)
    assert {k for _, k in fits} == {None, 64}, fits
    with pytest.raises(MemoryBudgetError, match=r"needs at least .*budget"):
        plan(n=1000, c=10, p=10**6, k=None, itemsize=4, act=10, budget=10**8)
    # a sketch (sparse / tensor) never forms a dense piece of R: a small projected kernel
    # fits a small budget; a dense projection reserves at most its P x k piece
    small = plan(n=100, c=10, p=2000, k=64, itemsize=4, act=500, budget=10**7,
                 dense_piece_entries=0)  # fmt: skip
    assert small.estimate <= 10**7
    dense = plan(n=100, c=10, p=2000, k=64, itemsize=4, act=500, budget=10**7)
    assert dense.fixed - small.fixed == 2 * 2000 * 64 * 4 and dense.estimate <= 10**7


def test_compute_kernel_fails_early_when_nothing_fits(cnn_data):
    with pytest.raises(MemoryBudgetError, match="projection=1024"):
        tl.compute_kernel(make_cnn(), cnn_data, memory_budget="10KB", progress=False)


def test_parse_bytes():
    assert parse_bytes("4GB") == 4 << 30
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes(1000) == 1000
    with pytest.raises(TangentlabError):
        parse_bytes("lots")


def test_data_forms_give_the_same_kernel(mlp_data):
    model = make_mlp()
    x, y = mlp_data
    ref = tl.compute_kernel(model, (x, y), progress=False).theta
    for data in (
        (x.numpy(), y.numpy()),
        TensorDataset(x, y),
        DataLoader(TensorDataset(x, y), batch_size=3),
    ):
        torch.testing.assert_close(tl.compute_kernel(model, data, progress=False).theta, ref)


def test_dict_dataset_with_labels_key(text_data):
    x, y = text_data
    items = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i],
              "labels": y[i]} for i in range(len(y))]  # fmt: skip
    model = make_transformer()
    a = tl.compute_kernel(model, items_dataset(items), progress=False)
    b = tl.compute_kernel(model, (x, y), progress=False)
    torch.testing.assert_close(a.theta, b.theta)


def items_dataset(items):
    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    return DS()


@pytest.mark.parametrize(
    "data,match",
    [
        ((torch.randn(5, 4), torch.tensor([0, 1, 2, 5, 0])), r"labels must lie in \[0, 3\)"),
        ((torch.randn(5, 4), torch.tensor([0, 1, 2, -1, 0])), r"labels must lie in"),
        ((torch.randn(5, 4), torch.tensor([0, 1, 2])), "5 samples but y has 3"),
        ((torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), "empty"),
        (TensorDataset(torch.randn(0, 4), torch.zeros(0)), "empty"),
        ((torch.randn(5, 4), torch.tensor([0.5, 1, 2, 0, 1])), "integer"),
        ("not data", "data must be"),
    ],
)
def test_bad_data_is_a_clear_error(data, match):
    model = make_mlp().float()
    with pytest.raises(TangentlabError, match=match):
        tl.compute_kernel(model, data, progress=False)


def test_num_classes_mismatch(mlp_data):
    with pytest.raises(TangentlabError, match="num_classes=5 but the model has 3"):
        tl.compute_kernel(make_mlp(), mlp_data, num_classes=5, progress=False)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_bad_projection_k(k, mlp_data):
    with pytest.raises(TangentlabError, match="projection"):
        tl.compute_kernel(make_mlp(), mlp_data, projection=k, progress=False)


def test_save_load_round_trip(tmp_path, mlp_data):
    k = tl.compute_kernel(make_mlp(), mlp_data, projection=16, progress=False)
    path = k.save(tmp_path / "k.safetensors")
    k2 = tl.load_kernel(path)
    for name in ("theta", "features", "f0", "targets", "jw0"):
        torch.testing.assert_close(getattr(k2, name), getattr(k, name))
    assert k2.metadata["projection"] == "tensor:k=16:seed=0"  # the default kind
    assert k2.metadata["data_fingerprint"] == k.metadata["data_fingerprint"]
    lam, u = k2.eigh()
    torch.testing.assert_close(u @ torch.diag(lam) @ u.T, k.theta.double(), atol=1e-8, rtol=1e-6)


def test_load_refuses_foreign_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TangentlabError, match="not a readable safetensors"):
        tl.load_kernel(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(TangentlabError, match="not a tangentlab kernel"):
        tl.load_kernel(other)
    with pytest.raises(TangentlabError, match="no such file"):
        tl.load_kernel(tmp_path / "missing.safetensors")


def test_cache_reuse_is_announced(tmp_path, mlp_data, capsys):
    model = make_mlp()
    a = tl.compute_kernel(model, mlp_data, cache=tmp_path / "c", progress=True)
    assert (tmp_path / "c" / "kernel.safetensors").exists()
    capsys.readouterr()
    b = tl.compute_kernel(model, mlp_data, cache=tmp_path / "c", progress=True)
    assert "reusing cached kernel" in capsys.readouterr().err
    torch.testing.assert_close(a.theta, b.theta)


def test_cache_mismatch_is_refused(tmp_path, mlp_data):
    model = make_mlp()
    tl.compute_kernel(model, mlp_data, cache=tmp_path / "c", progress=False)
    x, y = mlp_data
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        tl.compute_kernel(model, (x + 1, y), cache=tmp_path / "c", progress=False)
    with pytest.raises(CacheMismatchError, match="projection"):
        tl.compute_kernel(model, mlp_data, projection=8, cache=tmp_path / "c", progress=False)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(CacheMismatchError, match="weights_sha"):
        tl.compute_kernel(model, mlp_data, cache=tmp_path / "c", progress=False)


def test_cache_refuses_foreign_directories(tmp_path, mlp_data):
    d = tmp_path / "d"
    d.mkdir()
    (d / "something.txt").write_text("hello")
    with pytest.raises(CacheMismatchError, match="without a tangentlab request.json"):
        tl.compute_kernel(make_mlp(), mlp_data, cache=d, progress=False)
    assert sorted(p.name for p in d.iterdir()) == ["something.txt"]  # nothing written there
    (d / "request.json").write_text("{not json")
    with pytest.raises(CacheMismatchError, match="unreadable"):
        tl.compute_kernel(make_mlp(), mlp_data, cache=d, progress=False)


@pytest.mark.parametrize("projection", [None, 16])
def test_interrupted_computation_resumes(tmp_path, cnn_data, monkeypatch, projection):
    model = make_cnn()
    ref = tl.compute_kernel(model, cnn_data, projection=projection, progress=False)
    calls = {"n": 0, "fail_at": None}
    real = tl.Tangent.jacobian_blocks

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(tl.Tangent, "jacobian_blocks", flaky)
    # a fixed strategy: "auto" would time several strategies, a varying number of calls
    t = tl.Tangent(model, projection=projection, jacobian_mode="vmap")
    # exact: strips of 2 samples (budget), projected: chunks of 2 samples
    kw = (
        dict(batch_size=2)
        if projection
        else dict(memory_budget=_strip_budget(t, cnn_data[0], 3, 2))
    )
    tl.compute_kernel(t, cnn_data, progress=False, **kw)
    total = calls["n"]  # Jacobian evaluations of a whole run
    calls.update(n=0, fail_at=total)  # interrupt during the last one
    with pytest.raises(KeyboardInterrupt):
        tl.compute_kernel(t, cnn_data, cache=tmp_path / "c", progress=False, **kw)
    assert list((tmp_path / "c").glob("part-*")), "finished chunks must survive an interruption"
    assert not (tmp_path / "c" / "kernel.safetensors").exists()
    calls.update(n=0, fail_at=None)
    k = tl.compute_kernel(t, cnn_data, cache=tmp_path / "c", progress=False, **kw)
    torch.testing.assert_close(k.theta, ref.theta)
    torch.testing.assert_close(k.f0, ref.f0)
    assert 0 < calls["n"] < total  # resumed: finished parts were not recomputed
    assert not list((tmp_path / "c").glob("part-*"))  # cleaned up once whole


def _strip_budget(t, x, c, strip):
    """The budget under which the planner keeps ``strip`` samples' Jacobians (NOTE in memory)."""
    n, p = x.shape[0], t.num_params
    act = activation_elements(t.model, lambda: t.f0(x[:1]))
    per = 8 * (3 * c * p + (c + 2) * 2 * act)
    return (n * c) ** 2 * 8 + per + strip * c * p * 8 + 100


def test_kernel_validates_its_fields():
    with pytest.raises(TangentlabError, match="theta must have shape"):
        tl.Kernel(f0=torch.zeros(2, 3), targets=torch.tensor([0, 1]), theta=torch.eye(5))
    with pytest.raises(TangentlabError, match="NaN"):
        tl.Kernel(f0=torch.zeros(2, 3), targets=torch.tensor([0, 1]),
                  theta=torch.full((6, 6), float("nan")))  # fmt: skip


def test_projected_eigh_through_the_small_gram_matrix(cnn_data):
    k = tl.compute_kernel(make_cnn(), cnn_data, projection=8, progress=False)  # k < NC = 18
    lam, u = k.eigh()
    assert lam.shape == (8,) and u.shape == (18, 8)
    torch.testing.assert_close(u @ torch.diag(lam) @ u.T, k.theta.double(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.double), atol=1e-8, rtol=0)


def test_metadata_is_json_able(mlp_data):
    k = tl.compute_kernel(make_mlp(), mlp_data, progress=False)
    d = k.describe()
    back = json.loads(json.dumps(d, allow_nan=False))  # plain JSON, no NaN tokens
    assert back == d  # nothing lost or turned into a string on the way
    assert back["num_samples"] == 7 and back["num_classes"] == 3


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
def test_tensor_sketch_fast_path_equals_projecting_the_jacobian(model_name, request):
    factory, data = {"mlp": (make_mlp, "mlp_data"), "cnn": (make_cnn, "cnn_data"),
                     "transformer": (make_transformer, "text_data")}[model_name]  # fmt: skip
    x, y = request.getfixturevalue(data)
    model = factory()
    params = r"^(head|enc\.(linear|norm))" if model_name == "transformer" else None
    proj = tl.Projection(64, kind="tensor", seed=4)
    fast = tl.Tangent(model, params=params, projection=proj, jacobian_mode="structured")
    slow = tl.Tangent(model, params=params, projection=proj, jacobian_mode="vmap")

    def formed(x):  # the fast path never forms Jacobians; a silent fallback would
        raise AssertionError("the tensor-sketch fast path fell back to Jacobian blocks")

    fast.jacobian_blocks = formed
    phi_f, f0_f, jw0_f = fast.projected_chunk(x)
    assert fast.jacobian_mode == "structured"
    phi_s, f0_s, jw0_s = slow.projected_chunk(x)
    torch.testing.assert_close(phi_f, phi_s, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(f0_f, f0_s)
    torch.testing.assert_close(jw0_f, jw0_s, rtol=1e-9, atol=1e-10)
    # and both equal J R with the explicit matrix R
    r = slow.projector.matrix(slow.param_names)
    torch.testing.assert_close(phi_s, slow.jacobian(x) @ r, rtol=1e-9, atol=1e-10)

"""compute_kernel under torch.distributed: 2 gloo processes on the CPU give every rank the
single-process kernel (NOTE [distributed kernels] in tangentlab.compute)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tangentlab as tl

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
SIZES = (7, 8, 3, 1)  # N not divisible by the world size, divisible, < 2 x world, < world
# name -> compute_kernel options; "projection" goes to the Tangent
CASES = {
    "exact": {},
    "projected": {"projection": 16, "batch_size": 2},  # the same chunks as one process
    "projected-auto": {"projection": 16},  # chunks cut for 2 ranks
    "projected-features": {"projection": 16, "keep_theta": False},
}
FIELDS = ("theta", "features", "f0", "jw0")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.double)
    return x, torch.randint(0, 3, (n,), generator=g)


def _kernel(n: int, name: str, mode: str = "vmap", **extra) -> tl.Kernel:
    opts = dict(CASES[name])
    t = tl.Tangent(_mlp(), projection=opts.pop("projection", None), jacobian_mode=mode)
    return tl.compute_kernel(t, _data(n), progress=False, **opts, **extra)


def _fields(k: tl.Kernel) -> dict:
    return {**{f: getattr(k, f) for f in FIELDS}, "metadata": k.metadata}


def _worker(rank: int, init: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        got = {}
        for n in SIZES:
            for name in CASES:
                got[n, name] = _fields(_kernel(n, name))
        # the Jacobian-free exact kernel (tangentlab.gram), row strips shared out
        for n in SIZES:
            got[n, "gram"] = _fields(_kernel(n, "exact", mode="gram"))
        # jacobian_mode="auto": the ranks agree on the strategy that rank 0 timed
        got["auto"] = _fields(_kernel(7, "projected", mode="auto"))
        # distributed=False: this rank alone, no collective
        got["local"] = _fields(_kernel(7 + rank, "exact", distributed=False))
        # a cache: rank 0 writes the kernel, the second call reuses it on every rank
        cache = os.path.join(out, "cache")
        got["cached-1"] = _fields(_kernel(7, "projected", cache=cache))
        again = _kernel(7, "projected", cache=cache)
        got["cached-2"] = _fields(again)
        got["keeps-eigh"] = again._eig_file is not None  # rank 0 alone writes the cache
        # ranks that disagree on the data are refused on every rank, before any work
        try:
            t = tl.Tangent(_mlp())
            tl.compute_kernel(t, _data(5, seed=rank), progress=False)
            got["mismatch"] = "no error"
        except tl.TangentlabError as exc:
            got["mismatch"] = str(exc)
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        # both ranks done before either tears gloo down (a rank destroying the group while
        # the other still talks to it can abort it: "terminate called without an active
        # exception", SIGABRT, about one run in ten)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out), torch.get_num_threads()), nprocs=WORLD)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a: dict, b: dict, exact_bits: bool) -> None:
    for f in FIELDS:
        if b[f] is None:
            assert a[f] is None, f
        elif exact_bits:
            assert torch.equal(a[f], b[f]), f
        else:
            torch.testing.assert_close(a[f], b[f], rtol=1e-12, atol=1e-12, msg=f)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_gets_the_single_process_kernel(ranks, n, name):
    _, got = ranks
    ref = _fields(_kernel(n, name))
    for r in range(WORLD):
        # projected chunks are the same computation whoever runs them: equal bit for bit
        _assert_same(got[r][n, name], ref, exact_bits=name == "projected")
        assert got[r][n, name]["metadata"]["processes"] == str(WORLD)
    _assert_same(got[1][n, name], got[0][n, name], exact_bits=True)  # identical on all ranks
    assert got[1][n, name]["metadata"] == got[0][n, name]["metadata"]


@pytest.mark.parametrize("n", SIZES)
def test_every_rank_gets_the_single_process_gram_kernel(ranks, n):
    _, got = ranks
    ref = _fields(_kernel(n, "exact"))  # the Jacobian path (vmap), one process
    for r in range(WORLD):
        _assert_same(got[r][n, "gram"], ref, exact_bits=False)


def test_ranks_agree_on_the_jacobian_mode(ranks):
    _, got = ranks
    _assert_same(got[1]["auto"], got[0]["auto"], exact_bits=True)
    _assert_same(got[0]["auto"], _fields(_kernel(7, "projected")), exact_bits=False)


def test_distributed_false_computes_in_this_process(ranks):
    _, got = ranks
    for r in range(WORLD):
        assert "processes" not in got[r]["local"]["metadata"]
        _assert_same(got[r]["local"], _fields(_kernel(7 + r, "exact")), exact_bits=False)


def test_rank0_writes_the_cache_and_every_rank_reuses_it(ranks):
    out, got = ranks
    assert (out / "cache" / "kernel.safetensors").exists()
    assert not list((out / "cache").glob("part-*"))
    for r in range(WORLD):
        _assert_same(got[r]["cached-2"], got[0]["cached-1"], exact_bits=True)
    assert [got[r]["keeps-eigh"] for r in range(WORLD)] == [True] + [False] * (WORLD - 1)
    stored = tl.load_kernel(out / "cache" / "kernel.safetensors")
    assert torch.equal(stored.features, got[0]["cached-1"]["features"])


def test_ranks_with_different_data_are_refused(ranks):
    _, got = ranks
    for r in range(WORLD):
        assert "rank 1 asks for a different kernel than rank 0" in got[r]["mismatch"]
        assert "data_fingerprint" in got[r]["mismatch"]


def test_distributed_true_needs_a_process_group():
    with pytest.raises(tl.TangentlabError, match="init_process_group"):
        _kernel(3, "exact", distributed=True)
    with pytest.raises(tl.TangentlabError, match="distributed must be"):
        _kernel(3, "exact", distributed="yes")

"""Caches that verify what they load: checksums, the cache key, the lock, the eigen-cache.

NOTE [cache layout], [cache key] and [cache lock] in tangentlab.compute; NOTE [checksums]
in tangentlab.kernel. Every case uses a tiny MLP (7 samples, projected k=8, chunks of 2
samples: 4 chunks) and counts the chunks actually computed.
"""

import contextlib
import io
import multiprocessing as mp
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tangentlab as tl
from conftest import make_mlp
from tangentlab import compute
from tangentlab.errors import CacheMismatchError, CacheWarning, TangentlabError

CHUNKS = 4  # 7 samples in chunks of 2


def _data(shift: float = 0.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.double)
    return x + shift, torch.randint(0, 3, (7,), generator=g)


def _kernel(cache, model=None, data=None, progress=False, projection=8, **kw) -> tl.Kernel:
    # a fixed Jacobian strategy: "auto" would time several, a varying number of chunk calls
    t = tl.Tangent(model or make_mlp(), projection=projection, jacobian_mode="vmap", **kw)
    return tl.compute_kernel(t, data or _data(), cache=cache, batch_size=2, progress=progress)


def _garble(path, where: int = -5) -> None:
    """Flip one byte: by default in the tensor data at the end of a safetensors file."""
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def chunks(monkeypatch):
    """The number of projected chunks computed (calls of Tangent.projected_chunk)."""
    count = {"n": 0}
    real = tl.Tangent.projected_chunk

    def counted(self, x):
        count["n"] += 1
        return real(self, x)

    monkeypatch.setattr(tl.Tangent, "projected_chunk", counted)
    return count


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A cache directory whose run was interrupted after all its chunks were saved."""
    real = compute._Cache.finish

    def crash(self, kernel):
        raise KeyboardInterrupt

    monkeypatch.setattr(compute._Cache, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        _kernel(tmp_path / "c")
    monkeypatch.setattr(compute._Cache, "finish", real)
    parts = sorted((tmp_path / "c").glob("part-*.safetensors"))
    assert len(parts) == CHUNKS and not (tmp_path / "c" / "kernel.safetensors").exists()
    return tmp_path / "c"


@pytest.fixture
def ref():
    return _kernel(None)


# ---- checksums ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", [-5, 20], ids=["tensor-data", "header"])
def test_garbled_kernel_file_is_recomputed(tmp_path, ref, chunks, where):
    _kernel(tmp_path / "c")
    path = tmp_path / "c" / "kernel.safetensors"
    _garble(path, where)
    chunks["n"] = 0
    with pytest.warns(CacheWarning, match="discarding the damaged cached kernel"):
        k = _kernel(tmp_path / "c")
    assert chunks["n"] == CHUNKS  # recomputed, not loaded
    torch.testing.assert_close(k.features, ref.features, rtol=0, atol=0)
    assert torch.equal(tl.load_kernel(path).features, ref.features)  # rewritten intact
    chunks["n"] = 0
    _kernel(tmp_path / "c")
    assert chunks["n"] == 0  # and reused from then on


def test_load_kernel_verifies_the_checksum(tmp_path, ref):
    path = ref.save(tmp_path / "k.safetensors")
    _garble(path)
    with pytest.raises(TangentlabError, match=r"k\.safetensors.*damaged.*checksum.*Recompute"):
        tl.load_kernel(path)
    # a file written before checksums (no sha256 in its metadata) still loads
    ref.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "sha256"}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    old = tl.load_kernel(tmp_path / "old.safetensors")
    assert torch.equal(old.features, ref.features) and "sha256" not in old.metadata
    # metadata edited after writing: refused too
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file(tensors, str(path), metadata={**meta, "projection": "exact"})
    with pytest.raises(TangentlabError, match="checksum"):
        tl.load_kernel(path)


def test_swapped_kernel_file_is_refused(tmp_path):
    _kernel(tmp_path / "a")
    _kernel(tmp_path / "b", data=_data(shift=1.0))
    shutil.copy(tmp_path / "b" / "kernel.safetensors", tmp_path / "a" / "kernel.safetensors")
    with pytest.raises(
        CacheMismatchError, match=r"kernel\.safetensors' was computed for a different.*data_fin"
    ):
        _kernel(tmp_path / "a")


@pytest.mark.parametrize("damage", ["garbled", "truncated", "other-request", "no-checksum"])
def test_damaged_part_is_dropped_on_resume(interrupted, ref, chunks, damage):
    part = interrupted / "part-00000002-00000004.safetensors"
    if damage == "garbled":
        _garble(part)
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:-7])
    else:
        meta = {"unit": "2-4", "request_sha": "0" * 32, "sha256": "0"}
        meta = {} if damage == "no-checksum" else meta
        save_file(load_file(str(part)), str(part), metadata=meta)
    with pytest.warns(CacheWarning, match=r"damaged chunk .*part-00000002-00000004"):
        k = _kernel(interrupted)
    assert chunks["n"] == 1  # that chunk alone is recomputed
    torch.testing.assert_close(k.features, ref.features, rtol=0, atol=0)
    assert not list(interrupted.glob("part-*"))


def test_intact_parts_are_resumed_without_warning(interrupted, ref, chunks, recwarn):
    k = _kernel(interrupted)
    assert chunks["n"] == 0
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]
    torch.testing.assert_close(k.features, ref.features, rtol=0, atol=0)


@pytest.mark.parametrize("projection", [8, None])
def test_a_kernel_of_one_unit_writes_no_part(tmp_path, monkeypatch, projection):
    """NOTE [cache layout]: one chunk (projected) or one strip (exact) is the whole kernel:
    no part is written, the kernel file is, and the next run reuses it."""
    saved = []
    real = compute._Cache.save_part
    monkeypatch.setattr(compute._Cache, "save_part",
                        lambda self, s, e, part: (saved.append((s, e)), real(self, s, e, part)))
    t = tl.Tangent(make_mlp(), projection=projection, jacobian_mode="vmap")
    k = tl.compute_kernel(t, _data(), cache=tmp_path / "c", batch_size=7, progress=False)
    assert saved == [] and (tmp_path / "c" / "kernel.safetensors").exists()
    again = tl.compute_kernel(t, _data(), cache=tmp_path / "c", batch_size=7, progress=False)
    for a, b in ((k.features, again.features), (k.theta, again.theta)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _kernel(tmp_path / "d")  # 4 chunks: every one is saved as it finishes
    assert saved == [(0, 2), (2, 4), (4, 6), (6, 7)]


@pytest.mark.parametrize("text", ["{not json", '{"chunk": 2}', '{"chunk": 0, "strip": 7}'])
def test_corrupt_plan_json_restarts(interrupted, ref, chunks, text):
    (interrupted / "plan.json").write_text(text)
    with pytest.warns(CacheWarning, match=r"plan\.json.*damaged.*discarded"):
        k = _kernel(interrupted)
    assert chunks["n"] == CHUNKS  # parts of an unknown chunking are never merged
    torch.testing.assert_close(k.features, ref.features, rtol=0, atol=0)


# ---- the cache key ------------------------------------------------------------------------
class _Net(nn.Module):
    """Two layers and an activation given as a plain function (not a module)."""

    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.act = act

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def _net(act=torch.tanh) -> nn.Module:
    return _Net(act).double().eval()


def test_changed_model_code_with_the_same_weights_is_not_reused(tmp_path, monkeypatch):
    a = _kernel(tmp_path / "c", model=_net(torch.tanh))
    # the same classes, modules and weights, another function: only the outputs tell
    with pytest.raises(CacheMismatchError, match=r"probe_outputs: the model's outputs"):
        _kernel(tmp_path / "c", model=_net(torch.sin))
    b = _kernel(tmp_path / "d", model=_net(torch.sin))
    assert not torch.allclose(a.features, b.features)
    # a module swapped for another without weights (Tanh -> ReLU): the module tree tells
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    _kernel(tmp_path / "e")
    with pytest.raises(CacheMismatchError, match="architecture"):
        _kernel(tmp_path / "e", model=relu)
    # forward's code edited, the same outputs: the bytecode tells

    def forward(self, x):
        return self.l2(self.act(self.l1(x)) * 1.0)

    monkeypatch.setattr(_Net, "forward", forward)
    with pytest.raises(CacheMismatchError, match="architecture") as err:
        _kernel(tmp_path / "c", model=_net(torch.tanh))
    assert "probe_outputs" not in str(err.value)  # equal outputs: within the tolerance


def test_probe_outputs_are_compared_with_a_tolerance():
    asked = [1.0, -2.0, 3.0]
    assert compute._probe_gap([1.0, -2.0, 3.0 + 1e-9], asked, "float64") is None
    assert "differ by up to 0.001" in compute._probe_gap([1.0, -2.0, 3.001], asked, "float64")
    assert compute._probe_gap([1.0, -2.0, 3.001], asked, "float32") is None
    assert "output values" in compute._probe_gap([1.0], asked, "float64")
    assert "not a list" in compute._probe_gap("junk", asked, "float64")
    # many outputs are sketched to a fixed size, and still compared
    f = torch.randn(4, 1000, dtype=torch.double)
    s = compute._probe_summary(f)
    assert len(s) == compute._PROBE_VALUES
    assert compute._probe_gap(compute._probe_summary(f * 1.1), s, "float64") is not None


def test_an_old_cache_without_the_new_keys_is_refused_with_a_hint(tmp_path):
    import json

    _kernel(tmp_path / "c")
    req = tmp_path / "c" / "request.json"
    stored = json.loads(req.read_text())
    for key in ("architecture", "model_params", "probe_outputs"):
        del stored[key]
    req.write_text(json.dumps(stored))
    with pytest.raises(CacheMismatchError, match="earlier tangentlab.*delete this one"):
        _kernel(tmp_path / "c")


# ---- zero kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [None, 8])
def test_zero_kernel_is_refused(tmp_path, projection, monkeypatch):
    model = make_mlp()
    with torch.no_grad():
        model[2].weight.zero_()  # the first layer no longer reaches the outputs
    # the preflight refuses it before any Jacobian (two forward passes on 4 samples)
    with pytest.raises(TangentlabError, match=r"params='\^0\\\\\.' .*do not affect the outputs"):
        _kernel(tmp_path / "c", model=model, params=r"^0\.", projection=projection)
    assert not (tmp_path / "c" / "kernel.safetensors").exists()
    # the check on the finished kernel is the backstop (e.g. zero beyond the probed samples)
    from tangentlab.tangent import Preflight

    def skip_checks(self, x, **_):  # the preflight's outputs only, no refusal
        return Preflight(0, None, 0.0, (), 0.0, self.f0(x))

    monkeypatch.setattr(tl.Tangent, "preflight", skip_checks)
    with pytest.raises(TangentlabError, match=r"kernel is zero.*params='\^0\\\\\.'.*Select"):
        _kernel(tmp_path / "e", model=model, params=r"^0\.", projection=projection)
    assert not (tmp_path / "e" / "kernel.safetensors").exists()
    k = _kernel(tmp_path / "d", model=model, projection=projection)  # all weights: not zero
    assert float(k.gram().abs().max()) > 0 and (tmp_path / "d" / "kernel.safetensors").exists()


# ---- the eigendecomposition is kept with the kernel ---------------------------------------
@pytest.fixture
def eigh_calls(monkeypatch):
    """Eigendecompositions actually computed: calls of Kernel.eigh's own body (inside the
    cache wrapper) on a kernel without one, whatever algorithm the body uses."""
    count = {"n": 0}
    real = tl.Kernel.eigh.__wrapped__

    def counted(self, *args, **kwargs):
        count["n"] += self._eig is None
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tl.Kernel.eigh, "__wrapped__", counted)
    return count


@pytest.mark.parametrize("projection", [None, 8])
def test_eigh_is_restored_from_the_cache(tmp_path, eigh_calls, projection):
    a = _kernel(tmp_path / "c", projection=projection)
    lam, u = a.eigh()
    assert eigh_calls["n"] >= 1 and (tmp_path / "c" / "eigh.safetensors").exists()
    eigh_calls["n"] = 0
    b = _kernel(tmp_path / "c", projection=projection)
    lam_b, u_b = b.eigh()
    assert eigh_calls["n"] == 0  # restored, not recomputed
    assert torch.equal(lam_b, lam) and torch.equal(u_b, u)
    # a damaged file is recomputed (and rewritten)
    _garble(tmp_path / "c" / "eigh.safetensors")
    with pytest.warns(CacheWarning, match="damaged cached eigendecomposition"):
        lam_c, _ = _kernel(tmp_path / "c", projection=projection).eigh()
    assert eigh_calls["n"] >= 1
    torch.testing.assert_close(lam_c, lam)
    eigh_calls["n"] = 0
    _kernel(tmp_path / "c", projection=projection).eigh()
    assert eigh_calls["n"] == 0


def test_eigh_of_another_kernel_is_not_restored(tmp_path, eigh_calls):
    _kernel(tmp_path / "a").eigh()
    _kernel(tmp_path / "b", data=_data(shift=1.0))
    shutil.copy(tmp_path / "a" / "eigh.safetensors", tmp_path / "b" / "eigh.safetensors")
    eigh_calls["n"] = 0
    lam, _ = _kernel(tmp_path / "b", data=_data(shift=1.0)).eigh()
    assert eigh_calls["n"] >= 1  # keyed by the kernel's checksum: recomputed
    torch.testing.assert_close(lam, _kernel(None, data=_data(shift=1.0)).eigh()[0])


# ---- concurrent writers -------------------------------------------------------------------
WRITERS = 3  # this process and two spawned ones (each spawned one imports torch: ~3 s CPU)


def _counting_save_part(counter: str):
    real = compute._Cache.save_part

    def counted(self, s, e, part):
        with open(counter, "a") as fh:
            fh.write(f"{s}-{e}\n")
        time.sleep(0.05)
        real(self, s, e, part)

    return counted


def _write(cache: str) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        k = _kernel(cache, progress=True)
    return {"features": k.features, "stderr": err.getvalue()}


def _writer(cache: str, counter: str, out: str, barrier, marker: str) -> None:
    torch.set_num_threads(1)
    compute._Cache.save_part = _counting_save_part(counter)
    real_say = compute._say

    def say(msg: str, progress: bool) -> None:  # tell the test when this process queues
        if "waiting for another process" in msg:
            with open(marker, "a") as fh:
                fh.write("waiting\n")
        real_say(msg, progress)

    compute._say = say
    barrier.wait()
    torch.save(_write(cache), out)


def test_concurrent_writers_compute_each_chunk_once(tmp_path, ref, monkeypatch):
    """Three writers of one cache: two spawned processes queue on the lock that this one
    holds (deterministically: it holds it until both said they wait), then all three
    end with the same kernel and every chunk was computed once in all."""
    import fcntl

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    cache, counter = str(tmp_path / "c"), str(tmp_path / "computed.txt")
    marker = tmp_path / "waiting.txt"
    outs = [tmp_path / f"out{i}.pt" for i in range(WRITERS - 1)]
    procs = [ctx.Process(target=_writer, args=(cache, counter, str(out), barrier, str(marker)))
             for out in outs]  # fmt: skip
    for p in procs:
        p.start()
    monkeypatch.setattr(compute._Cache, "save_part", _counting_save_part(counter))
    (tmp_path / "c").mkdir()
    lock = open(tmp_path / "c" / compute._LOCK_NAME, "a")  # noqa: SIM115
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        barrier.wait(timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            not marker.exists() or marker.read_text().count("waiting") < WRITERS - 1
        ):
            time.sleep(0.05)
        assert marker.read_text().count("waiting") == WRITERS - 1  # both queued on the lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()
        got = [_write(cache)]
    finally:
        for p in procs:
            p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    # every chunk computed (and saved) once in all
    assert sorted(open(counter).read().split()) == ["0-2", "2-4", "4-6", "6-7"]
    got += [torch.load(out) for out in outs]
    for g in got:
        torch.testing.assert_close(g["features"], ref.features, rtol=0, atol=0)
    waited = [g for g in got if "waiting for another process" in g["stderr"]]
    assert len(waited) >= WRITERS - 1, [g["stderr"] for g in got]
    for g in waited:
        assert g["stderr"].count("waiting for another process") == 1




def test_a_cache_being_created_by_another_process_is_not_foreign(tmp_path, monkeypatch):
    """The unlocked first check of a cache directory races a writer that renames
    request.json into place and then writes parts: a listing that shows them is a cache,
    not a foreign directory, whatever an earlier exists() said."""
    from pathlib import Path

    root = tmp_path / "c"
    root.mkdir()
    for name in ("request.json", "part-0-2.safetensors", compute._LOCK_NAME):
        (root / name).write_text("{}")
    real_exists = Path.exists
    calls = []

    def late_exists(self, *args, **kwargs):  # request.json "not yet there" on the first look
        if self.name == "request.json" and not calls:
            calls.append(self)
            return False
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", late_exists)
    compute._check_cache_dir(root)  # no CacheMismatchError
    (root / "request.json").unlink()
    with pytest.raises(tl.errors.CacheMismatchError, match="without a tangentlab request.json"):
        compute._check_cache_dir(root)

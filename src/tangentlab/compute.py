"""``compute_kernel``: the empirical NTK of a model on a data set, chunked, cached, resumable.

.. math::

    \\Theta[(i,a),(j,b)] = \\frac{\\partial f_a(x_i)}{\\partial w} \\cdot
                          \\frac{\\partial f_b(x_j)}{\\partial w}\\Big|_{w_0},
    \\qquad \\Phi = J R \\ (\\text{projected}), \\quad \\Theta \\approx \\Phi\\Phi^T

NOTE [exact kernel strips]. An exact kernel needs every pair of per-sample Jacobians. When
all N Jacobians ``[N, C, P]`` fit in the budget they are computed once. Otherwise the
samples are cut into row strips of S samples: a strip's Jacobians are kept while the
Jacobians of the later samples are recomputed chunk by chunk and contracted against it,
so the cost grows to about N/(2S) passes over the data. Each finished strip is a unit of
the cache, so an interrupted computation resumes from its last finished strip.

NOTE [cache layout]. ``cache=DIR`` holds ``request.json`` (what was asked: weights hash,
data fingerprint, params selection, projection, dtype, library version), ``plan.json``
(the chunking used, kept on resume), ``part-*.safetensors`` (finished units) and, when
done, ``kernel.safetensors``. Every file is written atomically. A request that does not
match ``request.json`` is refused with the differing fields; nothing is silently reused.

NOTE [distributed kernels] (tangentlab.distributed). Under ``torch.distributed`` the work
units are shared out deterministically: projected chunks round-robin (chunk i to rank
i mod W, chunks no larger than ceil(N/W) so every rank has work), exact row strips of at
most ceil(N/(2W)) samples "zig-zag" (strips i and 2W-1-i to the same rank), which evens
out the triangle of Theta: each rank does about 1/W of the contractions but evaluates
the Jacobians of about N + N/(2W) samples (its rows and the later columns), against N for
one process. Each rank writes its units into zero-filled full-size buffers and one
all_reduce (sum) assembles them exactly: communication of about 2 x the buffers per rank
(Theta [NC, NC] for an exact kernel; features [NC, k], f0 and jw0 for a projected one,
whose Theta = Phi Phi^T is then formed on every rank), memory as for one process.
Projected features do not depend on which rank computes a chunk, so a projected kernel
equals the one-process kernel computed with the same chunks bit for bit; an exact kernel
equals it up to round-off (different strips sum in a different order).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tangentlab import distributed as dist_
from tangentlab._version import __version__
from tangentlab.data import as_arrays, check_labels, fingerprint, num_rows, take
from tangentlab.errors import CacheMismatchError, TangentlabError
from tangentlab.kernel import Kernel, atomic_write, load_kernel
from tangentlab.memory import MemoryPlan, activation_elements, default_budget, parse_bytes, plan
from tangentlab.projection import Projection
from tangentlab.tangent import JacobianMode, ParamSpec, Tangent, check_output


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"tangentlab: {msg}", file=sys.stderr, flush=True)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=True
    )


def compute_kernel(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    num_classes: int | None = None,
    projection: int | Projection | None = None,
    params: ParamSpec = None,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    *,
    seed: int = 0,
    keep_theta: bool | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> Kernel:
    """Empirical NTK of the tangent model on ``data`` (exact or projected).

    Args:
      model_or_tangent: an ``nn.Module`` (wrapped in a :class:`Tangent` with ``params``,
        ``projection`` and ``seed``) or a ready :class:`Tangent`.
      data: ``(X, y)`` tensors/arrays (``X`` may be a dict of tensors for Hugging Face
        models), a ``Dataset`` or a ``DataLoader`` (see :mod:`tangentlab.data`).
      num_classes: C; checked against the model's output width when given.
      projection: ``None`` for the exact kernel, ``k`` or a :class:`Projection`.
      params: trainable weights (regex or list of names); all by default.
      memory_budget: bytes (or ``"4GB"``) the computation may hold; default: 50% of free
        CPU memory, 80% of free GPU memory. The plan is made before allocating.
      device: where to compute (default: where the model's weights are).
      batch_size: samples per Jacobian chunk (default: the largest the budget allows).
      cache: a directory for the kernel, its metadata and finished chunks (resumable).
      seed: projection seed when ``projection`` is an int.
      keep_theta: projected kernels: form ``Theta = Phi Phi^T`` (default: when it fits).
      progress: show a progress bar (samples/s) and the plan on stderr (a reused cache is
        announced on stderr in any case). Under ``torch.distributed``: rank 0 only.
      distributed: shard the samples across the ranks of the initialized
        ``torch.distributed`` process group (e.g. under ``torchrun``); every rank must pass
        the same model and the whole data set, and every rank returns the whole kernel
        (NOTE [distributed kernels]). ``None``: when a group of more than one rank is
        initialized; ``False``: compute in this process only. With ``cache``, rank 0 alone
        reads and writes the cache directory (the others never see it), and
        finished chunks are not saved: an interrupted distributed run starts over, but the
        finished kernel is written and reused.

    Returns:
      :class:`Kernel` with ``theta`` ``[N*C, N*C]`` (when it fits), ``features``
      ``[N*C, k]`` (projected), ``f0`` ``[N, C]``, ``targets`` ``[N]`` and ``jw0`` ``[N, C]``.

    Example::

        >>> k = compute_kernel(model, (X, y), projection=1024)   # X [N, ...], y [N]
        >>> k.theta.shape, k.features.shape                      # [N*C, N*C], [N*C, 1024]
    """
    if isinstance(model_or_tangent, Tangent):
        tangent = model_or_tangent
        if params is not None or projection is not None:
            raise TangentlabError(
                "compute_kernel: params= and projection= are set on the Tangent you passed; "
                "do not give them again (build a new Tangent to change them)."
            )
    else:
        tangent = Tangent(model_or_tangent, params=params, projection=projection, seed=seed)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
        raise TangentlabError(f"compute_kernel: batch_size must be >= 1 (got {batch_size!r}).")
    shard = dist_.resolve(distributed, "compute_kernel")  # (rank, world size) or None
    rank = shard[0] if shard else 0
    progress = progress and rank == 0
    if device is not None:
        tangent.to(torch.device(device))
    dev = tangent.device
    budget = parse_bytes(memory_budget) or default_budget(dev)

    x, y = as_arrays(data, where="compute_kernel")
    n = num_rows(x)
    # Probe one sample: output shape, number of classes, activation size for the plan.
    x1 = take(x, slice(0, 1))
    f1 = tangent.f0(x1)
    c = int(f1.shape[1])
    if num_classes is not None and num_classes != c:
        raise TangentlabError(
            f"compute_kernel: num_classes={num_classes} but the model has {c} outputs; "
            "give the model a head with num_classes outputs (or drop num_classes)."
        )
    check_labels(y, c, where="compute_kernel")
    act = activation_elements(tangent.model, lambda: tangent.f0(x1))
    k = tangent.projection.k if tangent.projection else None
    itemsize = tangent.dtype.itemsize
    # Weights whose per-sample gradients a chunk holds (fewer with the tensor-sketch path).
    p_held = tangent.num_params if k is None else tangent.materialized_params(x1)
    mplan = plan(
        n=n, c=c, p=p_held, k=k, itemsize=itemsize, act=act, budget=budget,
        batch_size=batch_size, keep_theta=keep_theta,
    )  # fmt: skip

    request = {
        "weights_sha": tangent.weights_hash(),
        "data_fingerprint": fingerprint(x, y),
        "num_samples": n,
        "num_classes": c,
        "params": f"{len(tangent.param_names)} tensors, {tangent.num_params} weights, "
        f"sha {tangent.params_hash()}",
        "projection": tangent.projection.describe() if tangent.projection else "exact",
        "dtype": str(tangent.dtype).replace("torch.", ""),
        "tangentlab_version": __version__,
    }
    if shard is not None:
        _check_same_request(request)
        mplan = _shard_plan(mplan, n, shard[1], exact=k is None)
    store = None
    if cache is not None:
        if shard is None:
            store = _Cache(Path(cache), request)
            done = store.finished_kernel()
        else:  # rank 0 alone touches the directory; a cached kernel is sent to every rank
            opened: list[_Cache] = []
            done = dist_.on_rank0(lambda: _open_cache(Path(cache), request, opened), rank)
            store = opened[0] if opened else None
        if done is not None:
            _say(f"reusing cached kernel {Path(cache) / 'kernel.safetensors'}", rank == 0)
            return done
        if shard is None:
            mplan = store.plan(mplan)
    if shard is not None and tangent.jacobian_mode is JacobianMode.AUTO:
        # the ranks use one Jacobian strategy: rank 0 times them on its first samples
        xs = take(x, slice(0, min(n, 4)))
        first = tangent.jacobian_blocks if k is None else tangent.projected_chunk
        tangent.jacobian_mode = dist_.on_rank0(lambda: (first(xs), tangent.jacobian_mode)[1], rank)
    _say(
        f"kernel of N={n} samples x C={c} outputs, P={tangent.num_params:,} weights, "
        f"{request['projection']}; {mplan.describe()}"
        + (f"; shared by {shard[1]} processes" if shard else ""),
        progress,
    )
    t0 = time.perf_counter()
    parts = store if shard is None else None  # finished chunks: one process only
    if k is None:
        kernel = _exact(tangent, x, n, c, mplan, parts, progress, shard)
    else:
        kernel = _projected(tangent, x, n, c, mplan, parts, progress, shard)
    seconds = time.perf_counter() - t0
    extra = {}
    if shard is not None:
        seconds = max(dist_.gather(seconds))  # the slowest rank; the same on every rank
        extra["processes"] = str(shard[1])
    kernel = Kernel(
        f0=kernel["f0"],
        targets=y,
        theta=kernel.get("theta"),
        features=kernel.get("features"),
        jw0=kernel["jw0"],
        metadata={
            **{key: str(v) for key, v in request.items() if key != "tangentlab_version"},
            "params_spec": str(tangent.params_spec),
            "seconds": f"{seconds:.3f}",
            **extra,
        },
    )
    if shard is not None and cache is not None:
        # the others wait until rank 0 has written the kernel (or learn why it could not)
        dist_.on_rank0(lambda: store.finish(kernel), rank)
    elif store is not None:
        store.finish(kernel)
    return kernel


def _open_cache(root: Path, request: dict[str, Any], opened: list) -> Kernel | None:
    store = _Cache(root, request)
    opened.append(store)
    return store.finished_kernel()


def _check_same_request(request: dict[str, Any]) -> None:
    """Every rank must ask for the same kernel (same weights, data, projection, ...)."""
    asked = dist_.gather(request)
    for r, other in enumerate(asked):
        diff = sorted(
            key for key in set(other) | set(asked[0]) if other.get(key) != asked[0].get(key)
        )
        if diff:
            raise TangentlabError(
                f"compute_kernel: rank {r} asks for a different kernel than rank 0 "
                f"(differs in {', '.join(diff)}). Under torch.distributed every rank must "
                "pass the same model weights, the whole data set and the same options."
            )


def _shard_plan(mplan: MemoryPlan, n: int, world: int, exact: bool) -> MemoryPlan:
    """One plan for all ranks (the tightest), with units small enough for every rank to work."""
    plans = dist_.gather((mplan.chunk, mplan.strip, mplan.keep_theta))
    chunk = min(p[0] for p in plans)
    strip = min(p[1] for p in plans)
    if exact:
        strip = min(strip, math.ceil(n / (2 * world)))
    else:
        chunk = min(chunk, math.ceil(n / world))
    keep_theta = all(p[2] for p in plans)
    return MemoryPlan(
        **{**mplan.__dict__, "chunk": chunk, "strip": strip, "keep_theta": keep_theta}
    )


def _mine(units: list[tuple[int, int]], shard, zigzag: bool) -> list[tuple[int, int]]:
    """The units this rank computes (all of them in one process); see NOTE [distributed kernels]."""
    if shard is None:
        return units
    rank, world = shard
    if not zigzag:
        return units[rank::world]
    owner = [
        i % world if (i // world) % 2 == 0 else world - 1 - i % world for i in range(len(units))
    ]
    return [u for u, o in zip(units, owner) if o == rank]


def _units(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _f0_checked(tangent: Tangent, xb, blocks) -> tuple[torch.Tensor, torch.Tensor]:
    f0 = tangent.f0(xb)
    check_output(f0, num_rows(xb), "compute_kernel")
    return f0, tangent.jw0(blocks)


def _projected(
    tangent, x, n, c, mplan: MemoryPlan, store, progress, shard=None
) -> dict[str, torch.Tensor]:
    k = tangent.projection.k
    # zero-filled under torch.distributed: the all_reduce below adds the ranks' pieces
    new = torch.empty if shard is None else torch.zeros
    feats = new(n, c, k, dtype=tangent.dtype, device=tangent.device)
    f0 = new(n, c, dtype=tangent.dtype, device=tangent.device)
    jw0 = new(n, c, dtype=tangent.dtype, device=tangent.device)
    units = _mine(_units(n, mplan.chunk), shard, zigzag=False)
    total = sum(e - s for s, e in units)
    with _progress_bar(total, "kernel (projected)", progress) as bar:
        for s, e in units:
            part = store.load_part(s, e) if store else None
            if part is None:
                phi, f0b, jw0b = tangent.projected_chunk(take(x, slice(s, e)))
                check_output(f0b, e - s, "compute_kernel")
                part = {"features": phi, "f0": f0b, "jw0": jw0b}
                if store:
                    store.save_part(s, e, part)
            feats[s:e], f0[s:e], jw0[s:e] = part["features"], part["f0"], part["jw0"]
            bar.update(e - s)
    if shard is not None:
        got = dist_.sum_across({"features": feats, "f0": f0, "jw0": jw0})
        feats, f0, jw0 = (got[key].to(tangent.device) for key in ("features", "f0", "jw0"))
    phi = feats.reshape(n * c, k)
    out = {"features": phi.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}
    if mplan.keep_theta:
        out["theta"] = (phi @ phi.T).cpu()
    return out


def _exact(
    tangent, x, n, c, mplan: MemoryPlan, store, progress, shard=None
) -> dict[str, torch.Tensor]:
    dt, dev = tangent.dtype, tangent.device
    # zero-filled under torch.distributed: the all_reduce below adds the ranks' strips
    new = torch.empty if shard is None else torch.zeros
    theta = new(n * c, n * c, dtype=dt, device=dev)
    f0 = new(n, c, dtype=dt, device=dev)
    jw0 = new(n, c, dtype=dt, device=dev)
    strips = _mine(_units(n, mplan.strip), shard, zigzag=True)
    work = sum(n - s for s, _ in strips)  # Jacobian evaluations, recomputation included
    with _progress_bar(work, "kernel (exact)", progress) as bar:
        for s, e in strips:
            part = store.load_part(s, e) if store else None
            if part is None:
                part = _exact_strip(tangent, x, n, c, s, e, mplan.chunk, bar)
                if store:
                    store.save_part(s, e, part)
            else:
                bar.update(n - s)
            rows = part["rows"]  # [(e-s)C, (n-s)C]
            theta[s * c : e * c, s * c :] = rows
            theta[s * c :, s * c : e * c] = rows.T
            f0[s:e], jw0[s:e] = part["f0"], part["jw0"]
    if shard is not None:
        theta, f0, jw0 = dist_.sum_across({"theta": theta, "f0": f0, "jw0": jw0}).values()
    return {"theta": theta.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}


def _exact_strip(tangent, x, n, c, s, e, chunk, bar) -> dict[str, torch.Tensor]:
    """Rows ``[s, e)`` of Theta against columns ``[s, n)`` (NOTE [exact kernel strips])."""
    names = tangent.param_names
    held: dict[str, list[torch.Tensor]] = {nm: [] for nm in names}
    f0s, jw0s = [], []
    for a, b in _units(e - s, chunk):
        xb = take(x, slice(s + a, s + b))
        blocks = tangent.jacobian_blocks(xb)
        f0b, jw0b = _f0_checked(tangent, xb, blocks)
        f0s.append(f0b)
        jw0s.append(jw0b)
        for nm in names:
            held[nm].append(blocks[nm].reshape((b - a) * c, -1))
        del blocks
        bar.update(b - a)
    jrow = {nm: torch.cat(v) for nm, v in held.items()}
    del held
    m = (e - s) * c
    rows = torch.empty(m, (n - s) * c, dtype=tangent.dtype, device=tangent.device)
    rows[:, :m] = sum(jrow[nm] @ jrow[nm].T for nm in names)
    for a, b in _units(n - e, chunk):
        blocks = tangent.jacobian_blocks(take(x, slice(e + a, e + b)))
        cols = sum(jrow[nm] @ blocks[nm].reshape((b - a) * c, -1).T for nm in names)
        rows[:, m + a * c : m + b * c] = cols
        del blocks
        bar.update(b - a)
    return {"rows": rows.cpu(), "f0": torch.cat(f0s).cpu(), "jw0": torch.cat(jw0s).cpu()}


class _Cache:
    """A kernel cache directory (NOTE [cache layout])."""

    def __init__(self, root: Path, request: dict[str, Any]) -> None:
        self.root = root
        self.request = request
        self.kernel_path = root / "kernel.safetensors"
        req_path = root / "request.json"
        if root.exists() and not root.is_dir():
            raise TangentlabError(
                f"compute_kernel: cache={str(root)!r} is a file; give a directory path "
                "(it will hold the kernel and its metadata)."
            )
        if req_path.exists():
            try:
                stored = json.loads(req_path.read_text())
                if not isinstance(stored, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as exc:
                raise CacheMismatchError(
                    f"compute_kernel: {str(req_path)!r} is unreadable or not a tangentlab cache "
                    f"({exc}). Delete the directory or choose another cache path."
                ) from None
            diff = {
                key: (stored.get(key), request.get(key))
                for key in sorted(set(stored) | set(request))
                if stored.get(key) != request.get(key)
            }
            if diff:
                lines = "; ".join(
                    f"{key}: cached {a!r} vs requested {b!r}" for key, (a, b) in diff.items()
                )
                raise CacheMismatchError(
                    f"compute_kernel: the cache {str(root)!r} holds a kernel for a different "
                    f"request ({lines}). Use another cache directory, or delete this one to "
                    "recompute."
                )
        elif root.is_dir() and any(root.iterdir()):
            raise CacheMismatchError(
                f"compute_kernel: cache={str(root)!r} is a non-empty directory without a "
                "tangentlab request.json; refusing to write into it. Choose an empty or new "
                "directory."
            )
        else:
            root.mkdir(parents=True, exist_ok=True)
            self._write_json(req_path, request)

    def _write_json(self, path: Path, obj: dict) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))

    def finished_kernel(self) -> Kernel | None:
        return load_kernel(self.kernel_path) if self.kernel_path.exists() else None

    def plan(self, mplan: MemoryPlan) -> MemoryPlan:
        """Keep the chunking of an interrupted run so that its finished parts line up."""
        path = self.root / "plan.json"
        if path.exists():
            stored = json.loads(path.read_text())
            kept = {"chunk": stored["chunk"], "strip": stored["strip"]}
            return MemoryPlan(**{**mplan.__dict__, **kept})
        self._write_json(path, {"chunk": mplan.chunk, "strip": mplan.strip})
        return mplan

    def _part(self, s: int, e: int) -> Path:
        return self.root / f"part-{s:08d}-{e:08d}.safetensors"

    def load_part(self, s: int, e: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._part(s, e)
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a damaged part (e.g. disk full) is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def save_part(self, s: int, e: int, part: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {key: v.detach().cpu().contiguous() for key, v in part.items()}
        atomic_write(self._part(s, e), lambda tmp: save_file(tensors, tmp))

    def finish(self, kernel: Kernel) -> None:
        kernel.save(self.kernel_path)
        for part in self.root.glob("part-*.safetensors"):
            part.unlink(missing_ok=True)

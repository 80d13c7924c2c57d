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

NOTE [cache layout]. ``cache=DIR`` holds ``request.json`` (what was asked, NOTE [cache
key]), ``plan.json`` (the chunking used, kept on resume), ``part-*.safetensors``
(finished units), when done ``kernel.safetensors`` and, once ``Kernel.eigh()`` has run,
``eigh.safetensors`` (restored by the next run), and the lock file ``.lock``. A kernel
computed in one unit (one chunk or strip) writes no part: its kernel file follows at once,
and the part would cost as much again (2.2 s of a 655 MB kernel's 35 s on the default
example's exact top). Every file is written atomically and every safetensors file carries
a sha256 checksum of its contents (NOTE [checksums] in tangentlab.kernel). A request that
does not match ``request.json`` is refused with the differing fields, and so is a kernel
file computed for another request (swapped in); nothing is silently reused. Damaged files
are discarded with a ``CacheWarning`` and their contents recomputed: a kernel file or a
part that fails its checksum or cannot be read, an unreadable ``plan.json`` (then every
part is discarded: the chunking they were cut by is unknown).

NOTE [cache key]. ``request.json`` records the weights hash (every parameter and buffer),
the model's architecture (a hash of the module tree: qualified names, classes,
``extra_repr()``, and the bytecode of ``forward`` for classes defined outside torch, so
that a new Python or library version whose bytecode differs makes a new key), the
names/shapes/dtypes of all its parameters and buffers, its outputs ``f0`` on the first
(at most 4) samples, the data fingerprint, params selection, projection, dtype, trace
setting and library version. The probe outputs catch a change of the model's code that
the hashes cannot see (a helper function, a constant); they cost one forward pass of 4
samples, before any Jacobian. They are compared with a tolerance, not hashed (a rounded
hash flips when round-off crosses a rounding boundary): they match when they differ by at
most 1e-6 (float64), 1e-2 (float32: GPU nondeterminism, TF32 convolutions) or 5e-2
(half precision) of their largest magnitude. More than 1024 output values are count-
sketched to 1024. A code change that moves the probe outputs less than that and changes
no hashed code is not detected.

NOTE [cache lock]. Opening a cache takes an exclusive ``fcntl.flock`` on ``DIR/.lock``
and holds it until the kernel is written (or the computation fails): processes asking
for the same directory at once wait (saying so on stderr when ``progress`` is on), then
load the finished kernel, so every unit is computed once and no file is written twice at
once. A process interrupted while holding the lock releases it (the OS drops the locks
of a dead process); the next one resumes from the finished parts. The lock file is
kept. Without ``fcntl`` (Windows) there is no lock: concurrent writers may duplicate work
but files stay whole (atomic writes).

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

NOTE [trace kernel]. ``trace=`` keeps only the class-averaged kernel (DESIGN.md §4)

.. math::

    \\Theta \\approx K \\otimes I_C, \\qquad
    K_{ij} = \\frac{1}{C}\\operatorname{tr}\\Theta_{ij}
           = \\frac{1}{C}\\sum_a \\frac{\\partial f_a(x_i)}{\\partial w}\\cdot
                                 \\frac{\\partial f_a(x_j)}{\\partial w}
           \\approx \\frac{1}{SC}\\sum_{s=1}^S g_{is}\\cdot g_{js},
    \\quad g_{is} = v_s^T J(x_i),\\ v_s \\in \\{\\pm1\\}^C

(Hutchinson's estimator over the outputs: E[v v^T] = I_C makes it unbiased.) It is the
kernel of the probed model ``f(x)^T V`` with ``V = [v_1 .. v_S] / sqrt(S C)`` ``[C, S]``
(:meth:`Tangent.probed`), summed over the probes, so every Jacobian strategy and the
projected (tensor-sketch) path are reused unchanged: per-sample Jacobians ``[B, S, P]``
flatten to rows of length S*P (exact: ``K = G G^T``), projected ones ``[B, S, k]`` to
rows of length S*k (``K ~= Phi' Phi'^T``, Phi' ``[N, S k]``). ``trace=True`` or S >= C
uses the identity probes ``V = I_C / sqrt(C)``: the exact ``tr(Theta_ij)/C`` with C
backward passes per sample (as the full kernel) but N^2 memory instead of (NC)^2; S < C
random probes cost S passes. ``f0`` and ``jw0 = J w0`` stay exact ``[N, C]`` (``jw0`` by
one forward-mode JVP per chunk with random probes). The probes are seeded by ``seed``
(deterministic). The approximation ignores the cross-class blocks of Theta and their
differences between classes: exact when the classes are exchangeable (e.g. a freshly
initialized head, where Theta_ij ~= K_ij I_C), approximate otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no cache lock (NOTE [cache lock])
    fcntl = None

import torch
from torch import nn

from tangentlab import distributed as dist_
from tangentlab._version import __version__
from tangentlab.data import as_arrays, check_labels, fingerprint, num_rows, take, to_device
from tangentlab.errors import CacheMismatchError, CacheWarning, TangentlabError
from tangentlab.gram import kernel_rows
from tangentlab.kernel import (
    Kernel,
    atomic_write,
    load_kernel,
    metadata_json,
    read_safetensors,
    tensors_digest,
)
from tangentlab.linalg import add_gram_
from tangentlab.memory import MemoryPlan, activation_elements, default_budget, parse_bytes, plan
from tangentlab.projection import Projection, ProjectionKind
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
    trace: bool | int = False,
) -> Kernel:
    """Empirical NTK of the tangent model on ``data`` (exact or projected, full or trace).

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
      cache: a directory for the kernel, its metadata and finished chunks (resumable;
        checksummed, locked against concurrent writers; NOTE [cache layout]).
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
      trace: ``False`` (default): the full kernel Theta ``[N*C, N*C]``. ``True``: the exact
        trace kernel ``Theta ~= K (x) I_C``, ``K_ij = tr(Theta_ij)/C`` ``[N, N]`` (C
        backward passes per sample, N^2 memory). An int S >= 1: K estimated with S random
        Rademacher output probes seeded by ``seed`` (S backward passes per sample;
        S >= C gives the exact trace). NOTE [trace kernel].

    Returns:
      :class:`Kernel` with ``theta`` ``[N*C, N*C]`` (when it fits), ``features``
      ``[N*C, k]`` (projected), ``f0`` ``[N, C]``, ``targets`` ``[N]`` and ``jw0`` ``[N, C]``;
      for a trace kernel (``structure="trace"``) ``theta`` ``[N, N]`` and ``features``
      ``[N, S*k]``, with ``f0`` and ``jw0`` exact ``[N, C]``.

    Raises:
      CacheMismatchError: ``cache`` holds a kernel for another request (NOTE [cache key]).
      TangentlabError: bad arguments; a zero kernel (the weights do not move the outputs).

    Example::

        >>> k = compute_kernel(model, (X, y), projection=1024)   # X [N, ...], y [N]
        >>> k.theta.shape, k.features.shape                      # [N*C, N*C], [N*C, 1024]
        >>> k = compute_kernel(model, (X, y), trace=4)           # 4 output probes
        >>> k.theta.shape, k.is_trace                            # [N, N], True
    """
    job = _prepare(
        model_or_tangent, data, num_classes, projection, params, memory_budget, device,
        batch_size, seed=seed, keep_theta=keep_theta, progress=progress,
        distributed=distributed, trace=trace,
    )  # fmt: skip
    if cache is None:
        return _compute(job, None)
    if job.shard is None:
        return _compute_cached(job, Path(cache))
    return _compute_cached_distributed(job, Path(cache))


@dataclass
class _Job:
    """One kernel request, validated and planned: what compute_kernel's steps share."""

    tangent: Tangent  # the model's tangent: f0, J w0, provenance
    jt: Tangent  # whose Jacobians are taken: ``tangent``, or its probed copy (trace kernel)
    x: Any  # inputs [N, ...] (or a dict of [N, L] tensors)
    y: torch.Tensor  # labels [N]
    n: int  # N
    c: int  # C, the model's outputs
    outs: int  # Jacobian rows per sample: C, or S probes for a trace kernel
    mplan: MemoryPlan
    request: dict[str, Any]  # the cache key, NOTE [cache key]
    outputs: _Outputs
    shard: tuple[int, int] | None  # (rank, world size) under torch.distributed
    progress: bool
    trace_desc: str | None  # None for a full kernel
    gram: bool = False  # exact kernel from layer factors, no Jacobians (tangentlab.gram)
    split: tuple | None = None  # gram covers some weights only: see _split_strip

    @property
    def k(self) -> int | None:
        return self.tangent.projection.k if self.tangent.projection else None

    @property
    def rank(self) -> int:
        return self.shard[0] if self.shard else 0


def _prepare(
    model_or_tangent, data, num_classes, projection, params, memory_budget, device, batch_size,
    *, seed, keep_theta, progress, distributed, trace,
) -> _Job:  # fmt: skip
    """Validate compute_kernel's arguments, probe the model and plan: nothing expensive yet."""
    probes_asked = _check_trace(trace)
    tangent = _as_tangent(model_or_tangent, params, projection, seed)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
        raise TangentlabError(f"compute_kernel: batch_size must be >= 1 (got {batch_size!r}).")
    shard = dist_.resolve(distributed, "compute_kernel")  # (rank, world size) or None
    if device is not None:
        tangent.to(torch.device(device))
    budget = parse_bytes(memory_budget) or default_budget(tangent.device)

    x, y = as_arrays(data, where="compute_kernel")
    n = num_rows(x)
    # refuse a model that mixes samples or whose selected weights do not move the outputs,
    # before anything expensive (two forward passes on <= 4 samples)
    checked = tangent.preflight(to_device(take(x, slice(0, _PROBE_SAMPLES)), tangent.device),
                                where="compute_kernel")  # fmt: skip
    # The first samples' outputs (from the preflight's forward pass): output shape, number of
    # classes, the cache key's outputs.
    f_probe = checked.outputs
    c = int(f_probe.shape[1])
    if num_classes is not None and num_classes != c:
        raise TangentlabError(
            f"compute_kernel: num_classes={num_classes} but the model has {c} outputs; "
            "give the model a head with num_classes outputs (or drop num_classes)."
        )
    check_labels(y, c, where="compute_kernel")
    x1 = take(x, slice(0, 1))
    act = activation_elements(tangent.model, lambda: tangent.f0(x1))
    trace_desc, jt, outs, mode = _trace_setup(tangent, probes_asked, c, seed)
    k = tangent.projection.k if tangent.projection else None
    # Weights whose per-sample gradients a chunk holds (fewer with the tensor-sketch path).
    p_held = jt.num_params if k is None else jt.materialized_params(x1)
    by_output = k is not None and jt.by_output(x1)  # one output at a time: NOTE [memory model]
    gram, split = False, None
    if k is None and jt.jacobian_mode in (JacobianMode.AUTO, JacobianMode.GRAM):
        # NOTE [jacobian modes]: exact kernels of covered models skip the Jacobians; a
        # sample's factors (layer inputs, output gradients) take the place of its
        # Jacobian in the memory plan. An explicit "gram" that does not cover the model
        # falls back (with a warning) in Tangent.jacobian_blocks.
        # two samples: a layer applied to a tensor broadcast across samples (BERT's
        # position ids [1, S]) looks batched in a batch of one
        x2 = take(x, slice(0, min(2, n)))
        elements = jt.gram_elements(x2)
        split, rest_params = None, 0
        if elements is None:  # covered in part? Theta = Theta_gram(covered) + Theta_J(rest)
            covered = jt.gram_covered(x2)
            if 0 < len(covered) < len(jt.param_names):
                part = jt.restricted(covered)
                elements = part.gram_elements(x2)
                if elements is not None:
                    others = [n for n in jt.param_names if n not in set(covered)]
                    rest = jt.restricted(others)
                    split = (part, rest, _PartOutputs(tangent.restricted(others), mode, c))
                    rest_params = rest.num_params
        if elements is not None:
            gram = True
            if split is None:  # (a split model keeps its mode: its Jacobians need another)
                jt.jacobian_mode = JacobianMode.GRAM
            p_held = max(1, math.ceil(elements / outs)) + rest_params
    dense = tangent.projection is not None and tangent.projection.kind in (
        ProjectionKind.GAUSSIAN, ProjectionKind.RADEMACHER)  # fmt: skip
    mplan = plan(
        n=n, c=outs, p=p_held, k=k, itemsize=tangent.dtype.itemsize, act=act, budget=budget,
        batch_size=batch_size, keep_theta=keep_theta, trace=trace_desc is not None,
        dense_piece_entries=(1 << 24) if dense else 0, by_output=by_output,
        moved_act=jt.reached_activations(x1) if by_output else None,  # what a pass reaches
    )  # fmt: skip
    request = _request(tangent, x, y, c, f_probe, trace_desc)
    if shard is not None:
        request = _check_same_request(request)
        mplan = _shard_plan(mplan, n, shard[1], exact=k is None)
    return _Job(
        tangent=tangent, jt=jt, x=x, y=y, n=n, c=c, outs=outs, mplan=mplan, request=request,
        outputs=_Outputs(tangent, mode, c), shard=shard,
        progress=progress and (shard is None or shard[0] == 0), trace_desc=trace_desc,
        gram=gram, split=split if gram else None,
    )  # fmt: skip


def _as_tangent(model_or_tangent, params, projection, seed) -> Tangent:
    if not isinstance(model_or_tangent, Tangent):
        return Tangent(model_or_tangent, params=params, projection=projection, seed=seed)
    if params is not None or projection is not None:
        raise TangentlabError(
            "compute_kernel: params= and projection= are set on the Tangent you passed; "
            "do not give them again (build a new Tangent to change them)."
        )
    return model_or_tangent


def _trace_setup(tangent: Tangent, probes_asked, c: int, seed: int):
    """``(trace description, Tangent whose Jacobians are taken, Jacobian rows per sample,
    _Outputs mode)``: for a trace kernel the Jacobians of the probed outputs f V [B, S],
    f0 and J w0 exact (NOTE [trace kernel])."""
    if probes_asked is None:
        return None, tangent, c, "full"
    exact = probes_asked == "exact" or probes_asked >= c
    num_probes = c if exact else probes_asked
    desc = "exact" if exact else f"rademacher:probes={num_probes}:seed={seed}"
    v = trace_probes(c, None if exact else num_probes, seed=seed)
    jt = tangent.probed(v.to(device=tangent.device, dtype=tangent.dtype))
    return desc, jt, num_probes, "exact" if exact else "probes"


def _compute(job: _Job, store: _Cache | None) -> Kernel:
    """Compute the kernel (reusing ``store``'s finished chunks) and wrap it with its metadata."""
    n, c, k, shard, jt = job.n, job.c, job.k, job.shard, job.jt
    if shard is not None and not job.gram and jt.jacobian_mode is JacobianMode.AUTO:
        # the ranks use one Jacobian strategy: rank 0 times them on its first samples
        xs = take(job.x, slice(0, min(n, 4)))
        first = jt.jacobian_blocks if k is None else jt.projected_chunk
        jt.jacobian_mode = dist_.on_rank0(lambda: (first(xs), jt.jacobian_mode)[1], job.rank)
    trace_note = ""
    if job.trace_desc is not None:
        trace_note = f", trace kernel ({job.trace_desc}, {job.outs} backward passes per sample)"
    _say(
        f"kernel of N={n} samples x C={c} outputs, P={job.tangent.num_params:,} weights, "
        f"{job.request['projection']}{trace_note}; {job.mplan.describe()}"
        + (f"; shared by {shard[1]} processes" if shard else ""),
        job.progress,
    )  # fmt: skip
    t0 = time.perf_counter()
    parts = store if shard is None else None  # finished chunks: one process only
    is_trace = job.trace_desc is not None
    if k is None:
        out = _exact(jt, job.x, n, job.outs, job.mplan, parts, job.progress, shard, job.outputs,
                     is_trace, gram=job.gram, split=job.split)  # fmt: skip
    else:
        out = _projected(jt, job.x, n, job.outs, job.mplan, parts, job.progress, shard,
                         job.outputs, is_trace)  # fmt: skip
    seconds = time.perf_counter() - t0
    _check_not_zero(out, job)
    extra = {}
    if shard is not None:
        seconds = max(dist_.gather(seconds))  # the slowest rank; the same on every rank
        extra["processes"] = str(shard[1])
    request = job.request
    return Kernel(
        f0=out["f0"],
        targets=job.y,
        theta=out.get("theta"),
        features=out.get("features"),
        jw0=None if request.get("jw0") == "not computed" else out["jw0"],
        metadata={
            **{key: str(v) for key, v in request.items() if key not in _NOT_IN_METADATA},
            "request_sha": request_sha(request),
            "params_spec": str(job.tangent.params_spec),
            # ‖w0‖ of the trained weights: the scale of Forecast.displacement (validity)
            "w0_norm": f"{job.tangent.w0_norm():.8g}",
            "seconds": f"{seconds:.3f}",
            **extra,
        },
        structure="trace" if is_trace else "full",
    )


def _check_not_zero(out: dict[str, torch.Tensor], job: _Job) -> None:
    """Refuse a kernel that is exactly 0: the selected weights do not move the outputs."""
    mat = out.get("theta") if out.get("theta") is not None else out["features"]
    # count_nonzero reduces in place; mat.any() would first allocate a bool copy of the
    # whole kernel (N*C x k or (N*C)^2 bytes), outside the memory plan
    if bool(mat.count_nonzero()):
        return
    t = job.tangent
    spec = "None (all weights)" if t.params_spec is None else repr(t.params_spec)
    raise TangentlabError(
        f"compute_kernel: the kernel is zero (every entry is 0): the trainable weights "
        f"selected by params={spec} ({len(t.param_names)} tensors, {t.num_params:,} weights, "
        f"e.g. {t.param_names[0]!r}) do not change the model's outputs on these samples. "
        "Select weights that the outputs depend on (params=None for all of them, or a regex "
        "matching e.g. the head; see model.named_parameters()), and check that the layers "
        "after them are not zeroed."
    )


def _compute_cached(job: _Job, root: Path) -> Kernel:
    """One process: reuse, resume or compute the kernel in ``root``, holding its lock
    (NOTE [cache lock])."""
    store = _Cache(root, job.request, job.progress)  # waits while another process computes
    try:
        job.request = store.request  # the stored request (equal up to the probe tolerance)
        done = store.finished_kernel()
        if done is not None:
            _say(f"reusing cached kernel {store.kernel_path}", True)
            return done
        job.mplan = store.plan(job.mplan)
        kernel = _compute(job, store)
        store.finish(kernel)
        return kernel
    finally:
        store.release()


def _compute_cached_distributed(job: _Job, root: Path) -> Kernel:
    """Under torch.distributed: rank 0 alone reads, locks and writes the cache directory; a
    cached kernel is sent to every rank (NOTE [distributed kernels])."""
    opened: list[_Cache] = []

    def open_cache():
        return _open_cache(root, job.request, opened, job.progress)

    try:
        done, job.request = dist_.on_rank0(open_cache, job.rank)
        if done is not None:
            if job.rank != 0:
                done._eig_file = None  # the eigendecomposition is kept by rank 0 only
            _say(f"reusing cached kernel {root / 'kernel.safetensors'}", job.rank == 0)
            return done
        kernel = _compute(job, None)
        # the others wait until rank 0 has written the kernel (or learn why it could not)
        dist_.on_rank0(lambda: opened[0].finish(kernel), job.rank)
        return kernel
    finally:
        for store in opened:
            store.release()


def _check_trace(trace: Any) -> str | int | None:
    """Validate ``trace=``: ``None`` (full kernel), ``"exact"`` or a number of probes S >= 1."""
    if isinstance(trace, bool):
        return "exact" if trace else None
    if isinstance(trace, numbers.Integral):
        if trace >= 1:
            return int(trace)
        raise TangentlabError(
            f"compute_kernel: trace={trace!r} is not a number of probes; give trace=S with "
            "S >= 1 random output probes, trace=True for the exact trace kernel, or "
            "trace=False for the full kernel."
        )
    raise TangentlabError(
        f"compute_kernel: trace must be False (full kernel), True (exact trace kernel) or "
        f"an integer number of output probes S >= 1, got {trace!r} "
        f"({type(trace).__name__}); e.g. trace=4."
    )


def trace_probes(num_classes: int, num_probes: int | None, *, seed: int = 0) -> torch.Tensor:
    """The output probes ``V`` ``[C, S]`` of a trace kernel (NOTE [trace kernel]), float64.

    ``num_probes=None``: the exact trace, ``V = I_C / sqrt(C)``. Otherwise ``S`` Rademacher
    columns ``v_s in {+-1}^C`` scaled by ``1/sqrt(S C)``, drawn from ``seed`` (the same
    probes on every device and run), so that ``E[V V^T] = I_C / C`` and
    ``E[(f V)'s kernel] = K = tr-blocks(Theta)/C``.
    """
    if num_probes is None:
        return torch.eye(num_classes, dtype=torch.float64) / math.sqrt(num_classes)
    digest = hashlib.blake2b(f"{seed}/trace-probes".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    v = torch.randint(0, 2, (num_classes, num_probes), generator=g).mul_(2).sub_(1)
    return v.to(torch.float64) / math.sqrt(num_probes * num_classes)


class _Outputs:
    """Exact ``(f0 [B, C], J w0 [B, C])`` of a chunk, whatever outputs the Jacobians are of.

    ``mode``: ``"full"`` (Jacobians of f: ``J w0`` from them), ``"exact"`` (the trace
    kernel's identity probes ``f / sqrt(C)``: ``J w0 = sqrt(C) (J/sqrt(C)) w0``) or
    ``"probes"`` (random probes: ``J w0`` by one forward-mode JVP, NOTE [trace kernel]).
    """

    def __init__(self, base: Tangent, mode: str, c: int) -> None:
        self.base, self.mode, self.c = base, mode, c

    def __call__(
        self, xb, blocks=None, probed_jw0=None, logits=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "probes":  # f0 and J w0 from one forward-mode pass
            f0, jw0 = self.base.f0_and_jvp(xb, self.base.w0)
            check_output(f0, num_rows(xb), "compute_kernel")
            return f0, jw0
        # logits: the outputs of the Jacobians' own forward pass, f itself (a full kernel)
        # or f / sqrt(C) (the exact trace's identity probes): no second forward pass
        if logits is None:
            f0 = self.base.f0(xb)
        else:
            f0 = logits if self.mode == "full" else logits * math.sqrt(self.c)
        check_output(f0, num_rows(xb), "compute_kernel")
        jw0 = self.base.jw0(blocks) if probed_jw0 is None else probed_jw0
        return f0, jw0 * math.sqrt(self.c) if self.mode == "exact" else jw0


def _open_cache(
    root: Path, request: dict[str, Any], opened: list, progress: bool
) -> tuple[Kernel | None, dict[str, Any]]:
    store = _Cache(root, request, progress)
    opened.append(store)
    return store.finished_kernel(), store.request


def _check_same_request(request: dict[str, Any]) -> dict[str, Any]:
    """Every rank must ask for the same kernel (same weights, data, projection, ...); returns
    rank 0's request, which every rank then uses (the probe outputs may differ by round-off)."""
    asked = dist_.gather(request)
    for r, other in enumerate(asked):
        diff = _request_diff(asked[0], other)
        if diff:
            raise TangentlabError(
                f"compute_kernel: rank {r} asks for a different kernel than rank 0 "
                f"(differs in {', '.join(diff)}). Under torch.distributed every rank must "
                "pass the same model weights, the whole data set and the same options."
            )
    return asked[0]


# ---- the cache key: NOTE [cache key] ----------------------------------------------------
_PROBE_SAMPLES = 4  # samples whose outputs f0 are part of the key
_PROBE_VALUES = 1024  # more output values than this are count-sketched down to it
# Tolerance of the probe outputs, relative to their largest magnitude, by dtype: round-off
# and nondeterministic reductions (GPU atomics, cuDNN algorithm choice, TF32 convolutions
# in float32) move outputs by far less; a change of the model's code moves them by O(1).
_PROBE_RTOL = {"float64": 1e-6, "float32": 1e-2}
_PROBE_RTOL_LOW = 5e-2  # float16 / bfloat16
_NOT_IN_METADATA = ("tangentlab_version", "probe_outputs")  # request keys kept out of Kernel


def _request(tangent: Tangent, x, y, c: int, f_probe: torch.Tensor, trace_desc) -> dict:
    """What is asked, as stored in ``request.json`` (NOTE [cache key])."""
    request = {
        "weights_sha": tangent.weights_hash(),
        "architecture": architecture_hash(tangent.model),
        "model_params": model_params_hash(tangent.model),
        "probe_outputs": _probe_summary(f_probe),
        "data_fingerprint": fingerprint(x, y),
        "num_samples": num_rows(x),
        "num_classes": c,
        "params": f"{len(tangent.param_names)} tensors, {tangent.num_params} weights, "
        f"sha {tangent.params_hash()}",
        "projection": tangent.projection.describe() if tangent.projection else "exact",
        "dtype": str(tangent.dtype).replace("torch.", ""),
        "tangentlab_version": __version__,
    }
    if trace_desc is not None:  # only then: caches of full kernels keep the same key
        request["trace"] = trace_desc
    if not getattr(tangent, "needs_jw0", True):  # Tangent.without_jw0: J w0 left NaN
        request["jw0"] = "not computed"
    return request


def request_sha(request: dict[str, Any]) -> str:
    """sha256 of a request's canonical JSON: ties kernel files and parts to their request."""
    return hashlib.sha256(metadata_json(request).encode()).hexdigest()[:32]


def architecture_hash(model: nn.Module) -> str:
    """sha256 of the module tree: every module's qualified name, class, ``extra_repr()``
    and, for classes defined outside torch, the compiled code of its ``forward``."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{module.extra_repr()}\n".encode())
        forward = getattr(cls, "forward", None)
        code = getattr(forward, "__code__", None)
        where = str(getattr(forward, "__module__", ""))
        if code is not None and where != "torch" and not where.startswith("torch."):
            _hash_code(code, h)
    return h.hexdigest()[:32]


def _hash_code(code: types.CodeType, h) -> None:
    """Bytecode, names and constants (nested functions included), not line numbers: editing
    comments or moving a function does not change it; changing what it computes does."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(_const_repr(const).encode())


def _const_repr(const: Any) -> str:
    """``repr`` of a code constant, stable across processes: the order of a frozenset
    (``x in {"a", "b"}``) follows string hashing, which is randomized per process."""
    if isinstance(const, frozenset):
        return "frozenset(" + ",".join(sorted(_const_repr(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_repr(c) for c in const) + ")"
    return repr(const)


def model_params_hash(model: nn.Module) -> str:
    """sha256 of the names, shapes and dtypes of all the model's parameters and buffers."""
    rows = [f"p:{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters()]
    rows += [f"b:{n}:{tuple(b.shape)}:{b.dtype}" for n, b in model.named_buffers()]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:32]


def _probe_summary(f: torch.Tensor) -> list[float]:
    """The probe outputs ``f0`` ``[m, C]`` as at most ``_PROBE_VALUES`` floats: all of them,
    or a seeded count sketch (each value added with a random sign into a random bucket)."""
    v = f.detach().double().cpu().reshape(-1)
    if v.numel() > _PROBE_VALUES:
        g = torch.Generator().manual_seed(0)
        bucket = torch.randint(0, _PROBE_VALUES, (v.numel(),), generator=g)
        sign = torch.randint(0, 2, (v.numel(),), generator=g).double().mul_(2).sub_(1)
        v = torch.zeros(_PROBE_VALUES, dtype=torch.float64).index_add_(0, bucket, sign * v)
    return [float(f"{a:.10g}") for a in v.tolist()]


def _probe_gap(cached: Any, asked: list[float], dtype: str) -> str | None:
    """Why cached probe outputs do not match the asked ones, or ``None`` when they match
    within the dtype's tolerance (NOTE [cache key])."""
    try:
        a = torch.tensor(cached, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return f"cached {cached!r:.60} is not a list of numbers"
    b = torch.tensor(asked, dtype=torch.float64)
    if a.shape != b.shape:
        return f"{a.numel()} cached output values vs {b.numel()} requested"
    if not b.numel():
        return None
    gap, scale = float((a - b).abs().max()), float(b.abs().max())
    tol = _PROBE_RTOL.get(dtype, _PROBE_RTOL_LOW) * scale
    if gap <= tol:
        return None
    return (
        f"the model's outputs on its first {_PROBE_SAMPLES} samples differ by up to {gap:.3g} "
        f"(tolerance {tol:.3g}): its code or weights changed"
    )


def _request_diff(stored: dict[str, Any], asked: dict[str, Any]) -> dict[str, str]:
    """``{key: how it differs}`` for the keys on which two requests disagree."""
    diff = {}
    for key in sorted(set(stored) | set(asked)):
        a, b = stored.get(key), asked.get(key)
        if key == "probe_outputs" and a is not None and b is not None:
            gap = _probe_gap(a, b, str(asked.get("dtype")))
            if gap is not None:
                diff[key] = gap
        elif key == "jw0" and a is None:
            continue  # a kernel with J w0 serves a request that does not need it
        elif key == "jw0" and b is None:
            diff[key] = "cached without J w0 (Tangent.without_jw0), which this request needs"
        elif a != b:
            diff[key] = f"cached {a!r} vs requested {b!r}"
    return diff


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


def _projected(
    tangent, x, n, c, mplan: MemoryPlan, store, progress, shard, outputs: _Outputs, trace: bool
) -> dict[str, torch.Tensor]:
    """Projected features; ``c`` = Jacobian rows per sample (probes S for a trace kernel)."""
    k = tangent.projection.k
    co = outputs.c  # C, the model's outputs (f0, jw0)
    # zero-filled under torch.distributed: the all_reduce below adds the ranks' pieces
    new = torch.empty if shard is None else torch.zeros
    feats = new(n, c, k, dtype=tangent.dtype, device=tangent.device)
    f0 = new(n, co, dtype=tangent.dtype, device=tangent.device)
    jw0 = new(n, co, dtype=tangent.dtype, device=tangent.device)
    units = _mine(_units(n, mplan.chunk), shard, zigzag=False)
    total = sum(e - s for s, e in units)
    desc = "kernel (projected, trace)" if trace else "kernel (projected)"
    with _progress_bar(total, desc, progress) as bar:
        for s, e in units:
            part = store.load_part(s, e) if store else None
            if part is None:
                xb = take(x, slice(s, e))
                phi, f0b, jw0b = tangent.projected_chunk(xb)
                check_output(f0b, e - s, "compute_kernel")
                if trace:  # the chunk's outputs are the probed f V: f0, J w0 of f itself
                    f0b, jw0b = outputs(xb, probed_jw0=jw0b)
                part = {"features": phi, "f0": f0b, "jw0": jw0b}
                if store and len(units) > 1:  # one unit: the kernel file follows at once
                    store.save_part(s, e, part)
            feats[s:e], f0[s:e], jw0[s:e] = part["features"], part["f0"], part["jw0"]
            bar.update(e - s)
    if shard is not None:
        got = dist_.sum_across({"features": feats, "f0": f0, "jw0": jw0})
        feats, f0, jw0 = (got[key].to(tangent.device) for key in ("features", "f0", "jw0"))
    # trace: sample i's S projected probe Jacobians side by side, K ~= Phi' Phi'^T [N, N]
    phi = feats.reshape(n, c * k) if trace else feats.reshape(n * c, k)
    out = {"features": phi.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}
    if mplan.keep_theta:
        out["theta"] = add_gram_(phi.new_zeros(phi.shape[0], phi.shape[0]), phi).cpu()
    return out


def _exact(
    tangent, x, n, c, mplan: MemoryPlan, store, progress, shard, outputs: _Outputs, trace: bool,
    *, gram: bool = False, split: tuple | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Exact kernel; ``c`` = Jacobian rows per sample (probes S for a trace kernel).

    ``gram``: from layer inputs and output gradients, without Jacobians (tangentlab.gram);
    ``split``: only some weights so, the others by Jacobians (:func:`_split_strip`).
    """
    dt, dev = tangent.dtype, tangent.device
    r = 1 if trace else c  # kernel rows per sample: a trace kernel is [N, N]
    co = outputs.c
    # zero-filled under torch.distributed: the all_reduce below adds the ranks' strips
    new = torch.empty if shard is None else torch.zeros
    theta = None  # allocated with the first strip (a single strip's rows are Theta itself)
    f0 = new(n, co, dtype=dt, device=dev)
    jw0 = new(n, co, dtype=dt, device=dev)
    strips = _mine(_units(n, mplan.strip), shard, zigzag=True)
    work = sum(n - s for s, _ in strips)  # Jacobian evaluations, recomputation included
    desc = "kernel (exact, trace)" if trace else "kernel (exact)"
    with _progress_bar(work, desc, progress) as bar:
        for s, e in strips:
            part = store.load_part(s, e) if store else None
            if part is None:
                if gram:  # what the plan leaves, for one layer's gradients (two blocks)
                    held = (mplan.budget - mplan.estimate) // (2 * dt.itemsize)
                    if split is None:
                        part = _gram_strip(tangent, x, n, r, s, e, mplan.chunk, bar, outputs,
                                           held)  # fmt: skip
                    else:
                        part = _split_strip(split, x, n, r, s, e, mplan.chunk, bar, outputs,
                                            held)  # fmt: skip
                else:
                    part = _exact_strip(tangent, x, n, r, s, e, mplan.chunk, bar, outputs)
                if store and len(strips) > 1:  # one strip: the kernel file follows at once
                    store.save_part(s, e, part)
            else:
                bar.update(n - s)
            rows = part["rows"]  # [(e-s)r, (n-s)r]
            if theta is None and (s, e) == (0, n) and rows.device == dev:
                theta = rows  # the whole kernel in one strip: no second copy
            else:
                if theta is None:
                    theta = new(n * r, n * r, dtype=dt, device=dev)
                theta[s * r : e * r, s * r :] = rows
                theta[s * r :, s * r : e * r] = rows.T
            f0[s:e], jw0[s:e] = part["f0"], part["jw0"]
    if theta is None:  # a rank without strips
        theta = new(n * r, n * r, dtype=dt, device=dev)
    if shard is not None:
        theta, f0, jw0 = dist_.sum_across({"theta": theta, "f0": f0, "jw0": jw0}).values()
    return {"theta": theta.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}


def _exact_strip(tangent, x, n, r, s, e, chunk, bar, outputs) -> dict[str, torch.Tensor]:
    """Rows ``[s, e)`` of Theta against columns ``[s, n)`` (NOTE [exact kernel strips]).

    ``r`` kernel rows per sample: C (full), or 1 for a trace kernel, whose row of sample i
    is its S probed Jacobians flattened together (NOTE [trace kernel]).
    """
    names = tangent.param_names
    m = (e - s) * r
    # the strip's Jacobian rows, filled in place: a list + torch.cat would hold them twice
    jrow: dict[str, torch.Tensor] = {}
    f0s, jw0s = [], []
    for a, b in _units(e - s, chunk):
        xb = take(x, slice(s + a, s + b))
        blocks = tangent.jacobian_blocks(xb)
        f0b, jw0b = outputs(xb, blocks)
        f0s.append(f0b)
        jw0s.append(jw0b)
        for nm in names:
            piece = blocks[nm].reshape((b - a) * r, -1)
            if nm not in jrow:
                jrow[nm] = piece.new_empty(m, piece.shape[1])
            jrow[nm][a * r : b * r] = piece
        del blocks
        bar.update(b - a)
    rows = torch.empty(m, (n - s) * r, dtype=tangent.dtype, device=tangent.device)
    rows[:, :m] = sum(jrow[nm] @ jrow[nm].T for nm in names)
    for a, b in _units(n - e, chunk):
        blocks = tangent.jacobian_blocks(take(x, slice(e + a, e + b)))
        cols = sum(jrow[nm] @ blocks[nm].reshape((b - a) * r, -1).T for nm in names)
        rows[:, m + a * r : m + b * r] = cols
        del blocks
        bar.update(b - a)
    return {"rows": rows.cpu(), "f0": torch.cat(f0s).cpu(), "jw0": torch.cat(jw0s).cpu()}


def _gram_strip(tangent, x, n, r, s, e, chunk, bar, outputs, held) -> dict[str, torch.Tensor]:
    """:func:`_exact_strip` from layer factors instead of Jacobians (tangentlab.gram);
    ``held``: elements of one layer's per-sample gradients it may hold per side."""

    def factors_of(lo: int, hi: int):
        xb = take(x, slice(lo, hi))
        return tangent.gram_factors(xb), xb

    return kernel_rows(factors_of, n, r, s, e, chunk, bar, outputs, held=held)


def _split_strip(split, x, n, r, s, e, chunk, bar, outputs, held) -> dict[str, torch.Tensor]:
    """Rows of Theta = Theta_gram(covered weights) + Theta_J(the others): the kernel is a sum
    over weights, so each part is computed by its own path and the rows added (NOTE
    [jacobian modes] in tangentlab.tangent). ``split = (covered Tangent, other Tangent,
    _PartOutputs of the others)``."""
    covered, rest, rest_outputs = split
    part = _gram_strip(covered, x, n, r, s, e, chunk, bar, outputs, held)
    other = _exact_strip(rest, x, n, r, s, e, chunk, _NoBar(), rest_outputs)
    part["rows"] += other["rows"]
    part["jw0"] += other["jw0"]
    return part


class _NoBar:
    def update(self, _count: int) -> None:
        pass


class _PartOutputs:
    """``(unused, J_part w0 [B, C])`` of the weights of a split kernel's Jacobian part: f0
    comes from the gram part; with random probes the gram part's JVP is already the whole
    ``J w0`` (zeros here). Modes as :class:`_Outputs`."""

    def __init__(self, part: Tangent, mode: str, c: int) -> None:
        self.part, self.mode, self.c = part, mode, c

    def __call__(self, xb, blocks=None, probed_jw0=None, logits=None):
        if self.mode == "probes":
            zero = torch.zeros(num_rows(xb), self.c, dtype=self.part.dtype, device=self.part.device)
            return zero, zero
        jw0 = self.part.jw0(blocks)
        return jw0, jw0 * math.sqrt(self.c) if self.mode == "exact" else jw0


class _Cache:
    """A kernel cache directory (NOTE [cache layout]), locked while open (NOTE [cache lock]).

    Opening it waits for the lock, then checks (or writes) ``request.json``; call
    :meth:`release` when done.
    """

    def __init__(self, root: Path, request: dict[str, Any], progress: bool = False) -> None:
        self.root = root
        self.kernel_path = root / "kernel.safetensors"
        self.eigh_path = root / "eigh.safetensors"
        _check_cache_dir(root)  # before creating anything in a foreign directory
        root.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(root, progress)
        try:
            self.request = self._open(request)
        except BaseException:
            self.release()
            raise
        self.request_sha = request_sha(self.request)

    def _open(self, request: dict[str, Any]) -> dict[str, Any]:
        """The directory's stored request, checked against ``request`` (written when new)."""
        req_path = self.root / "request.json"
        if not req_path.exists():
            _check_cache_dir(self.root)  # again, under the lock
            self._write_json(req_path, request)
            return request
        try:
            stored = json.loads(req_path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as exc:
            raise CacheMismatchError(
                f"compute_kernel: {str(req_path)!r} is unreadable or not a tangentlab cache "
                f"({exc}). Delete the directory or choose another cache path."
            ) from None
        diff = _request_diff(stored, request)
        if diff:
            lines = "; ".join(f"{key}: {why}" for key, why in diff.items())
            old = all(key not in stored for key in diff)
            raise CacheMismatchError(
                f"compute_kernel: the cache {str(self.root)!r} holds a kernel for a different "
                f"request ({lines}). "
                + ("It was written by an earlier tangentlab that did not record these keys. "
                   if old else "")
                + "Use another cache directory, or delete this one to recompute."
            )  # fmt: skip
        return stored

    def release(self) -> None:
        """Release the directory's lock (idempotent)."""
        if self._lock is not None:
            if fcntl is not None:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _write_json(self, path: Path, obj: dict) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))

    def _warn(self, msg: str) -> None:
        warnings.warn(f"compute_kernel: {msg}", CacheWarning, stacklevel=4)

    def finished_kernel(self) -> Kernel | None:
        """The cached kernel, checked (NOTE [checksums]); ``None`` when absent or damaged
        (a damaged file is removed with a warning and the kernel recomputed).

        Raises:
          CacheMismatchError: the file was computed for another request (swapped in).
        """
        if not self.kernel_path.exists():
            return None
        try:
            kernel = load_kernel(self.kernel_path)
        except TangentlabError as exc:
            self._warn(f"discarding the damaged cached kernel ({exc}); it is recomputed.")
            self.kernel_path.unlink(missing_ok=True)
            return None
        expected = {k: str(v) for k, v in self.request.items() if k not in _NOT_IN_METADATA}
        expected["request_sha"] = self.request_sha
        diff = sorted(key for key, v in expected.items() if kernel.metadata.get(key) != v)
        if diff:
            raise CacheMismatchError(
                f"compute_kernel: {str(self.kernel_path)!r} was computed for a different "
                f"request than its cache directory's request.json (it differs in "
                f"{', '.join(diff)}): it was replaced or copied from another cache. Delete "
                "it to recompute, or use another cache directory."
            )
        kernel._eig_file = self.eigh_path
        return kernel

    def plan(self, mplan: MemoryPlan) -> MemoryPlan:
        """Keep the chunking of an interrupted run so that its finished parts line up."""
        path = self.root / "plan.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                kept = {"chunk": int(stored["chunk"]), "strip": int(stored["strip"])}
                if min(kept.values()) < 1:
                    raise ValueError(f"chunk sizes {kept} are not positive")
                return MemoryPlan(**{**mplan.__dict__, **kept})
            except (ValueError, TypeError, KeyError, OSError) as exc:
                self._warn(
                    f"{str(path)!r} is damaged ({type(exc).__name__}: {exc}); the finished "
                    "chunks of the interrupted run are discarded and the kernel recomputed."
                )
                for part in self.root.glob("part-*.safetensors"):
                    part.unlink(missing_ok=True)
        self._write_json(path, {"chunk": mplan.chunk, "strip": mplan.strip})
        return mplan

    def _part(self, s: int, e: int) -> Path:
        return self.root / f"part-{s:08d}-{e:08d}.safetensors"

    def load_part(self, s: int, e: int) -> dict[str, torch.Tensor] | None:
        """A finished unit, if present and intact; a damaged one is dropped with a warning."""
        path = self._part(s, e)
        if not path.exists():
            return None
        try:
            meta, part = read_safetensors(path)
            if "sha256" not in meta:
                problem = "it has no checksum (written by an earlier tangentlab)"
            elif meta.get("request_sha") != self.request_sha or meta.get("unit") != f"{s}-{e}":
                problem = "it belongs to another request or unit"
            elif tensors_digest(part) != meta["sha256"]:
                problem = "its contents do not match its checksum"
            else:
                return part
        except Exception as exc:  # e.g. a disk that filled up: never trusted
            problem = f"it is unreadable ({exc})"
        self._warn(f"discarding the damaged chunk {str(path)!r} ({problem}); it is recomputed.")
        path.unlink(missing_ok=True)
        return None

    def save_part(self, s: int, e: int, part: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {key: v.detach().cpu().contiguous() for key, v in part.items()}
        meta = {
            "sha256": tensors_digest(tensors),
            "request_sha": self.request_sha,
            "unit": f"{s}-{e}",
        }
        atomic_write(self._part(s, e), lambda tmp: save_file(tensors, tmp, metadata=meta))

    def finish(self, kernel: Kernel) -> None:
        kernel.save(self.kernel_path)
        self.eigh_path.unlink(missing_ok=True)  # an earlier kernel's
        for part in self.root.glob("part-*.safetensors"):
            part.unlink(missing_ok=True)
        kernel._eig_file = self.eigh_path


_LOCK_NAME = ".lock"


_HEAD_BODY_DIR = "head-body"  # the CLI's cache of tl.compute_head_body_kernel, inside OUT/kernel


def _check_cache_dir(root: Path) -> None:
    """Refuse a file, or a non-empty directory that is not a tangentlab cache."""
    if root.exists() and not root.is_dir():
        raise TangentlabError(
            f"compute_kernel: cache={str(root)!r} is a file; give a directory path "
            "(it will hold the kernel and its metadata)."
        )
    if not root.is_dir():
        return
    # one listing decides (a writer holding the lock may rename request.json into place
    # between an exists() check and a listing); the lock file and an interrupted write of
    # request.json belong to a cache being created; the head-exact model's caches live
    # beside the tangent kernel (OUT/kernel/head-body)
    names = [p.name for p in root.iterdir()]
    if "request.json" in names:
        return
    foreign = [
        name for name in names
        if name not in (_LOCK_NAME, _HEAD_BODY_DIR) and not name.startswith(".request.json.")
    ]  # fmt: skip
    if foreign and not (root / "request.json").exists():  # (written before any other file)
        raise CacheMismatchError(
            f"compute_kernel: cache={str(root)!r} is a non-empty directory without a "
            "tangentlab request.json; refusing to write into it. Choose an empty or new "
            "directory."
        )


def _acquire_lock(root: Path, progress: bool):
    """An exclusive ``flock`` on ``root/.lock``, waiting (and saying so) while another
    process holds it (NOTE [cache lock]). Returns the open lock file."""
    path = root / _LOCK_NAME
    try:
        fh = open(path, "a")  # noqa: SIM115 -- held open until _Cache.release
    except OSError:  # a read-only cache: nothing will be written, a kernel can be loaded
        return None
    if fcntl is None:  # no flock (Windows): concurrent writers may duplicate work
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(
            f"waiting for another process computing the kernel in {str(root)!r} "
            f"(lock {path.name}); its result will be loaded",
            progress,
        )
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    except OSError as exc:  # a file system without locks (some network mounts)
        warnings.warn(
            f"compute_kernel: cannot lock the cache {str(root)!r} ({exc}); processes "
            "computing this kernel at the same time may each compute it.",
            CacheWarning,
            stacklevel=4,
        )
    return fh

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

    Example::

        >>> k = compute_kernel(model, (X, y), projection=1024)   # X [N, ...], y [N]
        >>> k.theta.shape, k.features.shape                      # [N*C, N*C], [N*C, 1024]
        >>> k = compute_kernel(model, (X, y), trace=4)           # 4 output probes
        >>> k.theta.shape, k.is_trace                            # [N, N], True
    """
    probes_asked = _check_trace(trace)
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
    # NOTE [trace kernel]: Jacobians of the probed outputs f V [B, S] (jt), f0/jw0 exact
    is_trace = probes_asked is not None
    exact_trace = probes_asked == "exact" or (is_trace and probes_asked >= c)
    num_probes = c if exact_trace else probes_asked
    trace_desc = None
    if is_trace:
        trace_desc = "exact" if exact_trace else f"rademacher:probes={num_probes}:seed={seed}"
        v = trace_probes(c, None if exact_trace else num_probes, seed=seed)
        jt = tangent.probed(v.to(device=dev, dtype=tangent.dtype))
    else:
        jt = tangent
    outs = num_probes if is_trace else c  # Jacobian rows per sample
    outputs = _Outputs(tangent, "full" if not is_trace else "exact" if exact_trace else "probes", c)
    # Weights whose per-sample gradients a chunk holds (fewer with the tensor-sketch path).
    p_held = jt.num_params if k is None else jt.materialized_params(x1)
    mplan = plan(
        n=n, c=outs, p=p_held, k=k, itemsize=itemsize, act=act, budget=budget,
        batch_size=batch_size, keep_theta=keep_theta, trace=is_trace,
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
    if is_trace:  # only then: caches of full kernels made before trace kernels stay valid
        request["trace"] = trace_desc
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
    if shard is not None and jt.jacobian_mode is JacobianMode.AUTO:
        # the ranks use one Jacobian strategy: rank 0 times them on its first samples
        xs = take(x, slice(0, min(n, 4)))
        first = jt.jacobian_blocks if k is None else jt.projected_chunk
        jt.jacobian_mode = dist_.on_rank0(lambda: (first(xs), jt.jacobian_mode)[1], rank)
    _say(
        f"kernel of N={n} samples x C={c} outputs, P={tangent.num_params:,} weights, "
        f"{request['projection']}"
        + (f", trace kernel ({trace_desc}, {outs} backward passes per sample)" if is_trace
           else "")
        + f"; {mplan.describe()}"
        + (f"; shared by {shard[1]} processes" if shard else ""),
        progress,
    )  # fmt: skip
    t0 = time.perf_counter()
    parts = store if shard is None else None  # finished chunks: one process only
    if k is None:
        kernel = _exact(jt, x, n, outs, mplan, parts, progress, shard, outputs, is_trace)
    else:
        kernel = _projected(jt, x, n, outs, mplan, parts, progress, shard, outputs, is_trace)
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
            # ‖w0‖ of the trained weights: the scale of Forecast.displacement (validity)
            "w0_norm": f"{tangent.w0_norm():.8g}",
            "seconds": f"{seconds:.3f}",
            **extra,
        },
        structure="trace" if is_trace else "full",
    )
    if shard is not None and cache is not None:
        # the others wait until rank 0 has written the kernel (or learn why it could not)
        dist_.on_rank0(lambda: store.finish(kernel), rank)
    elif store is not None:
        store.finish(kernel)
    return kernel


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

    def __call__(self, xb, blocks=None, probed_jw0=None) -> tuple[torch.Tensor, torch.Tensor]:
        f0 = self.base.f0(xb)
        check_output(f0, num_rows(xb), "compute_kernel")
        if self.mode == "probes":
            return f0, self.base.jvp(xb, self.base.w0)
        jw0 = self.base.jw0(blocks) if probed_jw0 is None else probed_jw0
        return f0, jw0 * math.sqrt(self.c) if self.mode == "exact" else jw0


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
                if store:
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
        out["theta"] = (phi @ phi.T).cpu()
    return out


def _exact(
    tangent, x, n, c, mplan: MemoryPlan, store, progress, shard, outputs: _Outputs, trace: bool
) -> dict[str, torch.Tensor]:
    """Exact kernel; ``c`` = Jacobian rows per sample (probes S for a trace kernel)."""
    dt, dev = tangent.dtype, tangent.device
    r = 1 if trace else c  # kernel rows per sample: a trace kernel is [N, N]
    co = outputs.c
    # zero-filled under torch.distributed: the all_reduce below adds the ranks' strips
    new = torch.empty if shard is None else torch.zeros
    theta = new(n * r, n * r, dtype=dt, device=dev)
    f0 = new(n, co, dtype=dt, device=dev)
    jw0 = new(n, co, dtype=dt, device=dev)
    strips = _mine(_units(n, mplan.strip), shard, zigzag=True)
    work = sum(n - s for s, _ in strips)  # Jacobian evaluations, recomputation included
    desc = "kernel (exact, trace)" if trace else "kernel (exact)"
    with _progress_bar(work, desc, progress) as bar:
        for s, e in strips:
            part = store.load_part(s, e) if store else None
            if part is None:
                part = _exact_strip(tangent, x, n, r, s, e, mplan.chunk, bar, outputs)
                if store:
                    store.save_part(s, e, part)
            else:
                bar.update(n - s)
            rows = part["rows"]  # [(e-s)r, (n-s)r]
            theta[s * r : e * r, s * r :] = rows
            theta[s * r :, s * r : e * r] = rows.T
            f0[s:e], jw0[s:e] = part["f0"], part["jw0"]
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

"""Sharding a kernel computation across processes with ``torch.distributed``.

NOTE [distributed kernels]. When ``torch.distributed`` is initialized (e.g. under
``torchrun``), :func:`tangentlab.compute_kernel` gives each rank a deterministic share of
the work units (chunks of samples for a projected kernel, row strips for an exact one),
every rank computes its units into zero-filled full-size buffers, and one ``all_reduce``
(sum) assembles them. Every entry is written by exactly one rank, so the sum adds only
zeros to it and is exact: every rank returns the same :class:`~tangentlab.Kernel`.

Every rank must call ``compute_kernel`` with the same model weights and the same data
(the whole data set, not a shard); this is checked before any work starts. With nccl,
tensors travel on the rank's current CUDA device (call ``torch.cuda.set_device`` first,
as torchrun scripts usually do); with gloo they travel on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tangentlab.errors import TangentlabError

T = TypeVar("T")


def resolve(distributed: bool | None, where: str) -> tuple[int, int] | None:
    """``(rank, world_size)`` when the computation is to be sharded, else ``None``.

    ``distributed=None`` shards when a process group is initialized with more than one
    rank; ``False`` never shards; ``True`` requires an initialized process group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TangentlabError(
            f"{where}: distributed must be True, False or None (got {distributed!r})."
        )
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise TangentlabError(
                f"{where}: distributed=True but torch.distributed is not initialized; call "
                'torch.distributed.init_process_group("gloo") (or "nccl") first, e.g. in a '
                "script launched by torchrun, or pass distributed=None."
            )
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def comm_device() -> torch.device:
    """Where tensors must be for collectives: the current CUDA device with nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-reduce (sum) each tensor over the ranks; returned where they travelled.

    Used on zero-filled buffers in which each rank wrote disjoint entries, so the sum is
    exact (NOTE [distributed kernels]).
    """
    out = {}
    for key, t in tensors.items():
        buf = t.to(comm_device()).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out[key] = buf
    return out


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj)
    return got


def on_rank0(fn: Callable[[], T], rank: int) -> T:
    """Run ``fn`` on rank 0 only and broadcast its result (or its error) to every rank.

    An error on rank 0 is raised on every rank (as a :class:`TangentlabError` with the same
    message on the others), so no rank is left waiting in a later collective.
    """
    box: list[Any] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:
            failure = exc
            # tangentlab errors travel as they are; others (maybe unpicklable) as text
            box[0] = ("error", exc if isinstance(exc, TangentlabError) else repr(exc))
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "error":
        if isinstance(value, TangentlabError):
            raise value
        raise TangentlabError(f"rank 0 failed: {value}") from None
    return value

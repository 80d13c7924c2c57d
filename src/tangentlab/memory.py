"""Memory budgets and chunk planning for kernel computations.

The plan is made before anything large is allocated: from the sizes N, C, P, k, the
dtype and the activation size of one sample (measured by a one-sample forward pass with
hooks), it picks how many samples' Jacobians are computed at once and, for exact
kernels, how many rows of Jacobians are kept while the columns stream past.

NOTE [memory model]. Bytes held while computing one chunk of b samples:

    b * item * (3 C P + (C + 2) * 2 A)        Jacobians [b, C, P] (+ copies) and activations
    + fixed                                     Theta [NC, NC], Phi [NC, k], kept row strip

with ``item`` the dtype size and ``A`` the activation elements of one forward pass (doubled
because hooks only see module outputs, not the intermediates inside functional ops).

One output at a time (``by_output=True``: the structured tensor-sketch path,
tangentlab.structured.structured_projected, which back-propagates the C outputs one after
the other through one retained graph and never forms [b, C, P]):

    b * item * (6 P + 3 A + C k)              one output's held per-sample gradients and
                                              spectra with their temporaries (P:
                                              Tangent.materialized_params), the graph and
                                              one output's gradients, the chunk's
                                              projected rows [b, C, k]
    + fixed

and a chunk is capped where one output's pass moves ~512 MiB (b item (P + A')), not where
[b, C, P] would: the per-output passes are what a chunk amortizes (exact_top_speed.py).
A' counts only the activations downstream of a trained weight, which the passes reach (a
frozen prefix's are freed in the forward pass): on the default example's exact top 44 K of
A = 1.9 M, and the chunk goes from 68 samples to what the budget allows (RESULTS.md
"exact-top-chunk").
For a trace kernel (``trace=True``) C is the number of probed outputs S (the Jacobians are
``[b, S, P]``), Theta is ``K`` ``[N, N]`` instead of ``[NC, NC]`` and Phi is ``[N, S k]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tangentlab.errors import MemoryBudgetError, TangentlabError

_CHUNK_JACOBIAN_BYTES = 512 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | float | str | None, *, where: str = "memory_budget") -> int | None:
    """``4e9``, ``"4GB"``, ``"512MiB"``, ``"2g"`` -> bytes (binary units); ``None`` stays None."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise TangentlabError(f"{where}: must be positive bytes, got {value!r}.")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value).lower())
    if not m:
        raise TangentlabError(
            f"{where}: could not read {value!r} as a size; use bytes or e.g. '4GB', '512MB'."
        )
    out = int(float(m.group(1)) * _UNITS[m.group(2)])
    if out <= 0:
        raise TangentlabError(f"{where}: must be positive, got {value!r}.")
    return out


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: MemAvailable of /proc/meminfo, or on CUDA the driver's
    free memory plus what torch's caching allocator holds without using (reserved minus
    allocated: ours to reuse; without it a second kernel planned against less than the
    first, benchmarks/results/gpu.md)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_budget(device: torch.device) -> int:
    """A safe fraction of free memory: 50% on CPU (the OS and data need the rest), 80% on GPU."""
    frac = 0.8 if device.type == "cuda" else 0.5
    return int(frac * available_bytes(device))


def gib(n: float) -> str:
    """Bytes for a message: GiB from 0.25 GiB, MiB from 0.1 MiB, else KiB (never "0.0 MiB")."""
    if n >= (1 << 28):
        return f"{n / (1 << 30):.2f} GiB"
    if n >= (1 << 20) // 10:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 10):.1f} KiB"


def activation_elements(model: torch.nn.Module, call, *, live: bool = False) -> int:
    """Elements of all leaf-module outputs in one forward pass of ``call()`` (one sample).

    ``live``: only the outputs that depend on a weight ``call`` lets require grad (the
    activations a reverse pass to those weights reaches; ``call`` runs with grad enabled):
    a frozen prefix's are not counted."""
    total = 0

    def count(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() if obj.requires_grad or not live else 0
        if isinstance(obj, Mapping):
            return sum(count(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(count(v) for v in obj)
        return 0

    def hook(_m, _inp, out):
        nonlocal total
        total += count(out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.set_grad_enabled(live):
            call()
    finally:
        for h in handles:
            h.remove()
    return total


@dataclass(frozen=True)
class MemoryPlan:
    """How a kernel computation is chunked to stay under ``budget`` bytes."""

    budget: int
    chunk: int  # samples whose Jacobians are computed at once
    strip: int  # exact kernels: samples whose Jacobians are kept while columns stream
    keep_theta: bool  # projected kernels: whether Theta = Phi Phi^T is formed
    per_sample: int  # working bytes per sample of a chunk
    fixed: int  # bytes held for the whole computation
    estimate: int  # planned peak bytes

    def describe(self) -> str:
        return (
            f"chunks of {self.chunk} samples, planned peak {gib(self.estimate)} "
            f"of a {gib(self.budget)} budget"
        )


def plan(
    *,
    n: int,
    c: int,
    p: int,
    k: int | None,
    itemsize: int,
    act: int,
    budget: int,
    batch_size: int | None = None,
    keep_theta: bool | None = None,
    trace: bool = False,
    dense_piece_entries: int = 1 << 24,
    by_output: bool = False,
    moved_act: int | None = None,
) -> MemoryPlan:
    """Plan chunk sizes for N samples, C outputs, P weights (and projection k); see NOTE.

    ``trace=True``: a trace kernel (``c`` = probes S; the kernel is ``[N, N]``, NOTE
    [trace kernel] in tangentlab.compute). ``dense_piece_entries``: the largest piece of R
    a dense projection forms at once (0 for the sparse and tensor sketches, which never do).
    ``by_output=True``: the Jacobian rows are formed one output at a time (projected
    kernels only; NOTE [memory model]); ``moved_act``: the activation elements of one
    sample that each of its passes reaches (default ``act``).
    Raises MemoryBudgetError when even one sample at a time does not fit, naming the size.
    """
    nc = n * c
    rows = n if trace else nc  # rows of the kernel matrix
    by_output = by_output and k is not None
    if by_output:
        per_sample = itemsize * (6 * p + 3 * act + c * k)
    else:
        per_sample = itemsize * (3 * c * p + (c + 2) * 2 * act)
    theta_bytes = rows * rows * itemsize
    if k is not None:
        phi = nc * k * itemsize
        # NOTE [projection kinds]: one dense piece of R (and its product), dense kinds only
        dense_piece = 2 * min(dense_piece_entries, p * k) * 4
        if keep_theta is None:
            keep_theta = theta_bytes + phi + per_sample + dense_piece <= budget
        fixed = phi + dense_piece + (theta_bytes if keep_theta else 0)
        strip = n
    else:
        keep_theta = True
        row_bytes = itemsize * c * p  # one sample's Jacobian kept in the row strip
        avail = budget - theta_bytes - per_sample
        strip = int(min(n, avail // row_bytes)) if avail > 0 else 0
        fixed = theta_bytes + max(strip, 1) * row_bytes
    room = budget - fixed
    if room < per_sample or (k is None and strip < 1):
        name = "K" if trace else "Theta"
        width = c * k if (trace and k is not None) else k
        what = (
            f"{name} [{rows}, {rows}] needs {gib(theta_bytes)}"
            if k is None or keep_theta
            else f"Phi [{rows}, {width}] needs {gib(nc * k * itemsize)}"
        )
        need = fixed + per_sample
        raise MemoryBudgetError(
            f"compute_kernel: this kernel needs at least {gib(need)} ({what}; one sample's "
            f"Jacobian [{c}, {p}] and activations need {gib(per_sample)}), but the memory "
            f"budget is {gib(budget)}. Fixes: project (projection=1024), "
            + ("" if trace else "use the trace kernel (trace=True, N^2 instead of (NC)^2), ")
            + "train fewer weights (params=...), use fewer samples, or raise memory_budget."
        )
    chunk = max(1, min(n, room // per_sample))
    # Chunks whose Jacobians exceed ~512 MiB are slower, not faster: the work is bound by
    # memory traffic, and fresh multi-GiB buffers cost page faults (measured on
    # EfficientNet-Lite0: 8 samples/chunk 21 samples/s, 32 samples/chunk 14 samples/s).
    # One output at a time, a pass over a chunk moves its held gradients and activations.
    moved = itemsize * ((p + (act if moved_act is None else moved_act)) if by_output else c * p)
    chunk = min(chunk, max(1, _CHUNK_JACOBIAN_BYTES // moved))
    if by_output:  # as many passes, over chunks of equal size (500 samples: 250 + 250, not
        chunk = -(-n // -(-n // chunk))  # 455 + 45: a pass's cost is mostly per sample)
    if batch_size is not None:
        if batch_size * per_sample > room:
            raise MemoryBudgetError(
                f"compute_kernel: batch_size={batch_size} needs about "
                f"{gib(batch_size * per_sample + fixed)} but the memory budget is {gib(budget)}; "
                f"use batch_size <= {chunk} or leave it unset to let the planner choose."
            )
        chunk = min(batch_size, n)
    if k is None:
        chunk = min(chunk, strip)  # a chunk never spans two strips
    return MemoryPlan(
        budget=budget,
        chunk=int(chunk),
        strip=int(strip),
        keep_theta=bool(keep_theta),
        per_sample=int(per_sample),
        fixed=int(fixed),
        estimate=int(fixed + chunk * per_sample),
    )

"""AdamW on the tangent model: exact in weight space, per-tensor in function space (issue 10).

NOTE [adam on the tangent model]
Under SGD the tangent model ``f = f0 + J (w - w0)`` trains as a fixed-kernel flow in function
space (Θ = J Jᵀ is all the dynamics read). Under Adam it does not: the update of every weight
is divided by the root of its own running second moment, a preconditioner P_t that follows
the gradients, so the function-space step is ``J P_t Jᵀ δ`` with a P_t that no fixed kernel
holds. Two solvers stand behind :func:`tangentlab.forecast` here:

1. **exact weight-space Adam** (:class:`WeightSpaceTangent`,
   :func:`compute_weight_space_tangent`): the explicit Jacobian J ``[N·C, P]`` and w0 are
   kept, and ``torch.optim.AdamW`` is replayed step by step on w ↦ f0 + J (w − w0)
   (:func:`tangentlab.dynamics.adam_trajectory`): the same moments, bias corrections, ε,
   decoupled decay of the actual weights w (hence w0 is needed), the same batches (path p:
   ``batch_schedule(..., rng=path_rngs(seed, paths)[p])``) and the same learning-rate
   multipliers. Exact for the linear model (equal to a real AdamW run of a model linear in
   its weights to round-off: tests/test_adam.py), the reference for the others. Memory
   N·C·P·8 bytes (refused beyond the budget); each step reads J once (NC·P flops per path).
2. **per-tensor Adam in function space** (:class:`BlockKernel`): one scalar second moment
   per weight tensor l, ``v_l = β2 v_l + (1 − β2) ‖g_l‖²/n_l`` (the mean square of the
   tensor's gradient, so that a tensor whose coordinates share one magnitude steps as under
   Adam; ``‖g_l‖²`` without ``/n_l`` would rescale each tensor's rate by √n_l). Then the
   update of tensor l is ``c_t m_l`` with a scalar c_t, so the dynamics close in function
   space on the per-tensor kernels Θ_l = J_l J_lᵀ (:func:`tangentlab.dynamics.
   block_adam_trajectory`): exact for per-tensor Adam on the tangent model (equal to the
   weight-space simulation of that variant to round-off), an approximation of AdamW (it
   ignores the spread of second moments inside a tensor). Memory L·(NC)². The kernels come
   from :func:`compute_block_kernel` (streamed per tensor, exact or projected per tensor,
   never holding J) or from ``WeightSpaceTangent.block_kernel()``. Measured on digits-cnn
   (N = 64, 10 tensors, CE, warmup + linear decay, lr 1e-3/3e-3 × B 16/full; README
   "AdamW"): its curve is within 1.0-3.6% of L0 of the exact tangent AdamW, its steps to an
   80% drop within 8-19%.

Candidates 3 and 4 live in :mod:`tangentlab.adam_approx`: a frozen factored (Adafactor-style
row × column) preconditioner, forecast as SGD on the preconditioned kernel J P Jᵀ (NOTE
[frozen factored preconditioner]), and the SignGD kernels of Malladi et al. 2023
(https://arxiv.org/abs/2210.05643) as the early-time limit (NOTE [sign kernels]). A plain
:class:`~tangentlab.Kernel` (Θ summed over tensors) cannot forecast AdamW and is refused.

Conventions as everywhere (DESIGN.md §2): losses averaged over the batch, time in optimizer
steps, eval mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab.data import as_arrays, check_labels, fingerprint, num_rows, take
from tangentlab.errors import MemoryBudgetError, TangentlabError
from tangentlab.memory import default_budget, gib, parse_bytes
from tangentlab.tangent import ParamSpec, Tangent

_CHUNK_BYTES = 256 << 20  # Jacobian working memory of one chunk of samples


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@dataclass(eq=False)
class WeightSpaceTangent:
    """The tangent model with its explicit Jacobian, for exact Adam (NOTE [adam on the
    tangent model]).

    Attributes:
      jacobian: J ``[N, C, P]`` float64 (per-sample Jacobians, weights in the order of
        ``names``, each tensor flattened).
      f0: pre-trained outputs ``[N, C]``.
      targets: labels ``[N]``.
      w0: the pre-trained trainable weights, flattened ``[P]`` (the decoupled weight decay
        acts on w = w0 + Δw).
      names: the trainable tensors, in order.
      sizes: their numbers of weights n_l (summing to P).
      metadata: provenance (weights hash, data fingerprint, seconds).
    """

    jacobian: torch.Tensor
    f0: torch.Tensor
    targets: torch.Tensor
    w0: torch.Tensor
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, c, p = self.jacobian.shape
        if tuple(self.f0.shape) != (n, c) or self.targets.shape[0] != n:
            raise TangentlabError(
                f"WeightSpaceTangent: f0 {tuple(self.f0.shape)} and targets "
                f"{tuple(self.targets.shape)} must match the Jacobian's [N, C] = [{n}, {c}]."
            )
        if self.w0.shape != (p,) or sum(self.sizes) != p or len(self.sizes) != len(self.names):
            raise TangentlabError(
                f"WeightSpaceTangent: w0 {tuple(self.w0.shape)} and sizes (sum "
                f"{sum(self.sizes)}) must match P = {p}, one size per name."
            )

    @property
    def num_samples(self) -> int:
        return int(self.jacobian.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.jacobian.shape[1])

    @property
    def num_params(self) -> int:
        return int(self.jacobian.shape[2])

    @property
    def jw0(self) -> torch.Tensor:
        """``J(x_i) w0`` ``[N, C]``."""
        return self.jacobian @ self.w0

    def arrays(self) -> dict[str, np.ndarray]:
        """Float64 numpy views (kept: a sweep converts once): ``jacobian`` ``[N*C, P]``,
        ``f0``, ``targets``, ``w0``."""
        if "_arrays" not in self.__dict__:
            self.__dict__["_arrays"] = {
                "jacobian": _np64(self.jacobian).reshape(self.num_samples * self.num_classes, -1),
                "f0": _np64(self.f0), "w0": _np64(self.w0),
                "targets": self.targets.detach().cpu().numpy().astype(np.int64),
            }  # fmt: skip
        return self.__dict__["_arrays"]

    def block_kernel(self) -> BlockKernel:
        """The per-tensor kernels Θ_l = J_l J_lᵀ ``[L, N*C, N*C]`` (memory L·(NC)²·8 bytes),
        for per-tensor Adam in function space."""
        nc = self.num_samples * self.num_classes
        jac = self.jacobian.reshape(nc, -1)
        thetas, start = [], 0
        for size in self.sizes:
            jl = jac[:, start : start + size]
            thetas.append(jl @ jl.T)
            start += size
        return BlockKernel(thetas=torch.stack(thetas), sizes=self.sizes, names=self.names,
                           f0=self.f0, targets=self.targets, jw0=self.jw0,
                           metadata=dict(self.metadata))  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (sizes, memory, provenance)."""
        return {
            "model": "tangent model in weight space (exact Adam; tangentlab.adam)",
            "num_samples": self.num_samples, "num_classes": self.num_classes,
            "num_params": self.num_params, "tensors": len(self.names),
            "jacobian_bytes": self.jacobian.numel() * 8,
            "metadata": {k: str(v) for k, v in self.metadata.items()},
        }  # fmt: skip


@dataclass(eq=False)
class BlockKernel:
    """Per-tensor kernels of the tangent model, for per-tensor Adam in function space (NOTE
    [adam on the tangent model], candidate 2).

    Attributes:
      thetas: Θ_l = J_l J_lᵀ ``[L, N*C, N*C]`` (sample-major), one per weight tensor.
      sizes: n_l, the number of weights of tensor l.
      names: the tensors' names.
      f0, targets: ``[N, C]``, ``[N]``.
      jw0: ``J w0`` ``[N, C]`` (the decoupled weight decay's anchor), or ``None``.
    """

    thetas: torch.Tensor
    sizes: tuple[int, ...]
    names: tuple[str, ...]
    f0: torch.Tensor
    targets: torch.Tensor
    jw0: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.f0.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.f0.shape[1])

    def arrays(self) -> dict[str, Any]:
        """Float64 numpy views, kept: ``thetas`` (list), ``f0``, ``targets``, ``jw0``."""
        if "_arrays" not in self.__dict__:
            self.__dict__["_arrays"] = {
                "thetas": list(_np64(self.thetas)), "f0": _np64(self.f0),
                "targets": self.targets.detach().cpu().numpy().astype(np.int64),
                "jw0": None if self.jw0 is None else _np64(self.jw0),
            }  # fmt: skip
        return self.__dict__["_arrays"]

    def describe(self) -> dict[str, Any]:
        return {
            "model": "per-tensor kernels Θ_l (per-tensor Adam; tangentlab.adam)",
            "num_samples": self.num_samples, "num_classes": self.num_classes,
            "tensors": len(self.sizes), "num_params": int(sum(self.sizes)),
            "metadata": {k: str(v) for k, v in self.metadata.items()},
        }  # fmt: skip


def compute_weight_space_tangent(
    model: nn.Module,
    data: Any,
    *,
    params: ParamSpec = None,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> WeightSpaceTangent:
    r"""The tangent model of ``model`` on ``data`` with its explicit Jacobian, for exact AdamW.

    .. math::
        f(x_i; w) = f_0(x_i) + J(x_i)\,(w - w_0),\qquad J \in \mathbb{R}^{N C \times P}

    Forecast it with ``tl.forecast(wst, tl.AdamW(...), steps, loss=..., batch_size=...)``:
    exact ``torch.optim.AdamW`` of the tangent model (NOTE [adam on the tangent model]).

    Args:
      model: ``nn.Module`` mapping ``[B, ...]`` (or keyword tensors) to logits ``[B, C]``;
        evaluated in eval mode, as every kernel.
      data: ``(X, y)``, a ``Dataset`` or a ``DataLoader``, as for
        :func:`tangentlab.compute_kernel`.
      params: the trained weights (regex or names), as for the kernel and
        :func:`tangentlab.finetune`.
      memory_budget: bytes (or ``"4GB"``) J may take; default 50% of free CPU memory. J is
        held in float64 on the CPU: N·C·P·8 bytes.
      device: where the Jacobians are computed (default: the model's); J is kept on the CPU.
      progress: a progress bar over chunks of samples (stderr).

    Returns:
      :class:`WeightSpaceTangent`.

    Raises:
      MemoryBudgetError: N·C·P·8 bytes exceed the budget (the message gives the size and
        the alternatives: fewer weights, fewer samples, per-tensor Adam or SGD kernels).

    Example::

        >>> wst = tl.compute_weight_space_tangent(model, (X, y), params="classifier")
        >>> wst.jacobian.shape                                    # [N, C, P]
        >>> fc = tl.forecast(wst, tl.AdamW(1e-3), 200, loss="ce", batch_size=16)
    """
    fn = "compute_weight_space_tangent"
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TangentlabError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}.")
    x, y = as_arrays(data, where=fn)
    tangent = Tangent(model, params=params)
    if device is not None:
        tangent.to(device)
    n, p = num_rows(x), tangent.num_params
    f_first = tangent.f0(take(x, slice(0, 1)))
    c = int(f_first.shape[1])
    check_labels(y, c, where=fn)
    need = n * c * p * 8
    budget = parse_bytes(memory_budget, where=f"{fn}: memory_budget")
    if budget is None:
        budget = default_budget(torch.device("cpu"))
    item = torch.finfo(tangent.dtype).bits // 8
    chunk = max(1, min(n, _CHUNK_BYTES // max(1, 3 * c * p * item)))
    if need + chunk * 3 * c * p * item > budget:
        raise MemoryBudgetError(
            f"{fn}: the explicit Jacobian J [N*C, P] = [{n * c:,}, {p:,}] needs {need:,} bytes "
            f"({gib(need)}, float64) but the memory budget is {budget:,} bytes ({gib(budget)}). "
            "Train fewer weights "
            "(params=...), use fewer samples, or raise memory_budget; at scale forecast "
            "per-tensor Adam from tl.compute_block_kernel(model, data, projection=k) (NOTE "
            "[adam on the tangent model]), or SGD from tl.compute_kernel(..., projection=k)."
        )
    from tqdm.auto import tqdm

    jac = torch.empty(n, c, p, dtype=torch.float64)
    f0 = torch.empty(n, c, dtype=torch.float64)
    starts = range(0, n, chunk)
    for s in tqdm(starts, desc=fn, unit="chunk", disable=not progress, delay=2.0, leave=False):
        xb = take(x, slice(s, min(s + chunk, n)))
        blocks = tangent.jacobian_blocks(xb)
        jac[s : s + chunk] = torch.cat([blocks[m] for m in tangent.param_names], -1).double().cpu()
        f0[s : s + chunk] = tangent.f0(xb).double().cpu()
    w0 = torch.cat([tangent.w0[m].reshape(-1) for m in tangent.param_names]).double().cpu()
    meta = dict(weights_sha=tangent.weights_hash(), data_fingerprint=fingerprint(x, y),
                params=str(params), seconds=time.perf_counter() - t0)  # fmt: skip
    return WeightSpaceTangent(
        jacobian=jac, f0=f0, targets=y.detach().cpu().long(), w0=w0,
        names=tuple(tangent.param_names),
        sizes=tuple(tangent.numels[m] for m in tangent.param_names), metadata=meta,
    )  # fmt: skip


def compute_block_kernel(
    model: nn.Module,
    data: Any,
    *,
    params: ParamSpec = None,
    projection: int | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> BlockKernel:
    r"""Per-tensor kernels Θ_l = J_l J_lᵀ of the tangent model, without ever holding J, for
    per-tensor Adam in function space (NOTE [adam on the tangent model], candidate 2).

    Each tensor's Jacobian is kept as its features Φ_l ``[N*C, k_l]``: exact (``Φ_l = J_l``)
    when ``projection`` is ``None`` or n_l <= k, else ``J_l R_l`` with the random projection
    of :class:`tangentlab.Projection` (k columns, ``E[R Rᵀ] = I``: Θ_l unbiased). Then
    Θ_l = Φ_l Φ_lᵀ. Memory Σ_l N·C·k_l·8 + L·(N·C)²·8 bytes (float64), refused beyond the
    budget.

    Args:
      model, data, params, memory_budget, device, progress: as for
        :func:`compute_weight_space_tangent`.
      projection: ``None`` (exact) or k, the columns of each projected tensor.
      seed: seed of the projection.

    Returns:
      :class:`BlockKernel`; forecast it with ``tl.forecast(bk, tl.AdamW(...), steps)``.
    """
    fn = "compute_block_kernel"
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TangentlabError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int)
                                   or projection < 1):  # fmt: skip
        raise TangentlabError(
            f"{fn}: projection must be None (exact) or an integer k >= 1, got {projection!r}."
        )
    x, y = as_arrays(data, where=fn)
    tangent = Tangent(model, params=params, projection=projection, seed=seed)
    if device is not None:
        tangent.to(device)
    n = num_rows(x)
    c = int(tangent.f0(take(x, slice(0, 1))).shape[1])
    check_labels(y, c, where=fn)
    names = list(tangent.param_names)
    sizes = [tangent.numels[m] for m in names]
    widths = [s if projection is None or s <= projection else projection for s in sizes]
    nc = n * c
    need = (sum(widths) * nc + len(names) * nc * nc) * 8
    budget = parse_bytes(memory_budget, where=f"{fn}: memory_budget")
    if budget is None:
        budget = default_budget(torch.device("cpu"))
    item = torch.finfo(tangent.dtype).bits // 8
    p = tangent.num_params
    chunk = max(1, min(n, _CHUNK_BYTES // max(1, 3 * c * p * item)))
    if need + chunk * 3 * c * p * item > budget:
        raise MemoryBudgetError(
            f"{fn}: {len(names)} per-tensor kernels [N*C, N*C] = [{nc:,}, {nc:,}] and their "
            f"features need {need:,} bytes ({gib(need)}) but the memory budget is {budget:,} "
            f"bytes ({gib(budget)}). Use fewer samples, project (projection=k), train fewer "
            "weights (params=...), or raise memory_budget."
        )
    from tqdm.auto import tqdm

    feats = [torch.zeros(nc, w, dtype=torch.float64) for w in widths]
    f0 = torch.empty(n, c, dtype=torch.float64)
    jw0 = torch.zeros(n, c, dtype=torch.float64)
    for s in tqdm(range(0, n, chunk), desc=fn, unit="chunk", disable=not progress, delay=2.0,
                  leave=False):  # fmt: skip
        e = min(s + chunk, n)
        xb = take(x, slice(s, e))
        blocks = tangent.jacobian_blocks(xb)
        for j, m in enumerate(names):
            jl = blocks[m].reshape((e - s) * c, -1)
            jw0[s:e] += (jl @ tangent.w0[m].reshape(-1).to(jl)).reshape(e - s, c).double().cpu()
            if widths[j] == sizes[j]:
                feats[j][s * c : e * c] = jl.double().cpu()
            else:
                out = torch.zeros((e - s) * c, widths[j], dtype=jl.dtype, device=jl.device)
                tangent.projector.project_block(m, jl, out)
                feats[j][s * c : e * c] = out.double().cpu()
        f0[s:e] = tangent.f0(xb).double().cpu()
    thetas = torch.stack([phi @ phi.T for phi in feats])
    meta = dict(weights_sha=tangent.weights_hash(), data_fingerprint=fingerprint(x, y),
                params=str(params), projection=str(projection), seed=seed,
                seconds=time.perf_counter() - t0)  # fmt: skip
    return BlockKernel(thetas=thetas, sizes=tuple(sizes), names=tuple(names), f0=f0,
                       targets=y.detach().cpu().long(), jw0=jw0, metadata=meta)  # fmt: skip


def adam_trajectory_of(source: WeightSpaceTangent | BlockKernel, optimizer, *, loss: str,
                       scale: float, steps: int, batches, blowup_loss: float,
                       per_tensor: bool = False) -> dyn.Trajectory:  # fmt: skip
    """The Adam trajectory of ``source`` under ``optimizer`` (a ``tl.AdamW``): exact weight
    space (a WeightSpaceTangent; ``per_tensor=True``: the per-tensor variant in weight space,
    the reference of the BlockKernel solver) or per-tensor in function space (a BlockKernel)."""
    opt = optimizer
    common = dict(loss=loss, scale=scale, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                  weight_decay=opt.weight_decay, steps=steps, batches=batches,
                  blowup_loss=blowup_loss, lr_schedule=opt.lr_multipliers(steps))  # fmt: skip
    a = source.arrays()
    if isinstance(source, WeightSpaceTangent):
        return dyn.adam_trajectory(a["jacobian"], a["f0"], a["targets"], a["w0"],
                                   block_sizes=source.sizes if per_tensor else None, **common)
    anchor = a["f0"] if a["jw0"] is None else a["f0"] - a["jw0"]
    return dyn.block_adam_trajectory(a["thetas"], source.sizes, a["f0"], a["targets"], anchor,
                                     **common)  # fmt: skip

"""Probes of the kernel at other weights: Hutchinson trace estimates tr Θ(w)/n.

Beside the Jacobian code (:mod:`tangentlab.structured`): one reverse pass per probe for a
whole chunk of samples, per-sample squared gradient norms from layer inputs and output
gradients (NOTE [ghost norms]). Used by the experimental kernel-growth option
(:mod:`tangentlab.experimental.growth`) and to measure how much real fine-tuning moved
the kernel::

    >>> tl.kernel_trace(model, (X, y), [None, run.model], params=...).ratio   # [2]
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tangentlab.data import as_arrays, num_rows, take, to_device
from tangentlab.errors import TangentlabError
from tangentlab.structured import Unsupported, _per_sample, capture_calls
from tangentlab.tangent import ParamSpec, Tangent

_CHUNK = 64  # samples per probe chunk (per-sample gradients of one chunk: chunk x P floats)


@dataclass(frozen=True)
class TraceProbe:
    """Kernel trace per sample tr Θ(w)/n at several weight points.

    Attributes:
      trace: estimates at every weight point, ``[K]``.
      stderr: standard error of each estimate over the probes (0 when exact), ``[K]``.
      ratio: ``trace / trace[0]``, ``[K]`` (the kernel scale relative to the first point).
      samples: the sample ids used, ``[n]``.
      probes: Rademacher probes per sample (``None``: exact, C reverse passes).
      seconds: wall time of the probes.
    """

    trace: np.ndarray
    stderr: np.ndarray
    ratio: np.ndarray
    samples: np.ndarray
    probes: int | None
    seconds: float


def flat_weights(tangent: Tangent) -> torch.Tensor:
    """w0 of ``tangent`` flattened in ``tangent.param_names`` order, ``[P]``."""
    return torch.cat([tangent.w0[n].reshape(-1) for n in tangent.param_names])


def _as_weights(tangent: Tangent, w: Any, i: int) -> dict[str, torch.Tensor]:
    if w is None:
        return tangent.w0
    if isinstance(w, nn.Module):
        named = dict(w.named_parameters())
        missing = [n for n in tangent.param_names if n not in named]
        if missing:
            raise TangentlabError(
                f"kernel_trace: weights[{i}] is a module without parameter {missing[0]!r}; "
                "pass a copy of the same model (e.g. a fine-tuned run's .model)."
            )
        return {n: named[n].detach().to(tangent.w0[n]) for n in tangent.param_names}
    if isinstance(w, Mapping):
        missing = [n for n in tangent.param_names if n not in w]
        if missing:
            raise TangentlabError(
                f"kernel_trace: weights[{i}] has no entry {missing[0]!r}; give every "
                "trainable weight by name, a flat [P] tensor, or a module."
            )
        return {n: torch.as_tensor(w[n]).to(tangent.w0[n]) for n in tangent.param_names}
    v = torch.as_tensor(w)
    if v.shape != (tangent.num_params,):
        raise TangentlabError(
            f"kernel_trace: weights[{i}] must be a flat [P] = [{tangent.num_params}] tensor "
            f"(absolute weights, e.g. flat_weights(t) + dw), a dict or a module; got shape "
            f"{tuple(v.shape)}."
        )
    return tangent._unflatten(v)


def _sq_norms(kind: str, a: dict, g: torch.Tensor, roles: tuple[str, ...]) -> torch.Tensor:
    """Σ over ``roles`` of the per-sample squared gradient norms ``[B]`` of one layer call.

    NOTE [ghost norms]. A linear/convolution weight's per-sample gradient is
    Σ_l g_l u_l^T over positions l, whose squared norm is Σ_{l,l'} (g_l·g_l')(u_l·u_l'):
    two L x L Gram matrices instead of the Cout x Cin gradient (Li et al., 2021,
    https://arxiv.org/abs/2110.05679). Used when L (Cout + Cin) < Cout Cin; with one
    position (a head on pooled features) it is ‖g‖² ‖u‖². Otherwise, and for grouped
    convolutions and norms, the per-sample gradient is formed (tangentlab.structured).
    """
    u = a["input"]
    b = u.shape[0]
    groups = int(a.get("groups", 1))
    if "weight" in roles and (kind == "linear" or (kind == "conv2d" and groups == 1)):
        if kind == "linear":
            u2 = u.reshape(b, -1, u.shape[-1])
            g2 = g.reshape(b, -1, g.shape[-1])
        else:
            w_shape = a["weight"].shape
            padding = a.get("padding", 0)
            if isinstance(padding, str):
                raise Unsupported(f"string padding {padding!r}")
            unf = F.unfold(
                u, tuple(w_shape[-2:]), dilation=a.get("dilation", 1), padding=padding,
                stride=a.get("stride", 1),
            )  # fmt: skip
            u2 = unf.transpose(1, 2)  # [B, L, Cin*K]
            g2 = g.reshape(b, w_shape[0], -1).transpose(1, 2)  # [B, L, Cout]
        positions, cin, cout = u2.shape[1], u2.shape[2], g2.shape[2]
        u2, g2 = u2.double(), g2.double()
        if positions == 1:
            out = (u2[:, 0] ** 2).sum(1) * (g2[:, 0] ** 2).sum(1)
        elif positions * (cin + cout) < cin * cout:
            out = ((g2 @ g2.transpose(1, 2)) * (u2 @ u2.transpose(1, 2))).sum((1, 2))
        else:
            out = torch.einsum("bso,bsi->boi", g2, u2).pow(2).sum((1, 2))
        if "bias" in roles:
            out = out + g2.sum(1).pow(2).sum(1)
        return out
    ps = _per_sample(kind, {**a, "roles": roles}, g)
    return sum(ps[role].reshape(b, -1).double().pow(2).sum(1) for role in roles)


def _probe_chunk(
    tangent: Tangent, w: dict[str, torch.Tensor], x: Any, signs: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample ‖J(x_i)^T s_{ip}‖² ``[P_probes, B]`` (``signs`` ``[P_probes, B, C]``), or
    per-sample Σ_a ‖∂f_a/∂w‖² ``[1, B]`` when ``signs`` is None (exact: C passes)."""
    names = tangent.param_names
    try:
        with torch.enable_grad():
            logits, calls, roles = capture_calls(tangent._call, w, names, x)
            outs = [out for _, _, out in calls]
            b, c = logits.shape
            if signs is None:
                cots = [torch.zeros(b, c, dtype=logits.dtype, device=logits.device)
                        for _ in range(c)]  # fmt: skip
                for a in range(c):
                    cots[a][:, a] = 1.0
            else:
                cots = [s.to(logits) for s in signs]
            sq = torch.zeros(len(cots), b, dtype=torch.float64, device=logits.device)
            for p, cot in enumerate(cots):
                grads = torch.autograd.grad(
                    logits, outs, grad_outputs=cot, retain_graph=p < len(cots) - 1,
                    allow_unused=True,
                )  # fmt: skip
                for (kind, a, out), r, g in zip(calls, roles, grads):
                    if not r:
                        continue
                    g = torch.zeros_like(out) if g is None else g.detach()
                    a = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
                         for k, v in a.items()}  # fmt: skip
                    sq[p] += _sq_norms(kind, a, g, tuple(r))
        if signs is None:
            return sq.sum(0, keepdim=True)
        return sq
    except Unsupported:
        pass
    # General fallback: a loop of per-sample reverse passes (any model).
    b = num_rows(x)
    cots = None if signs is None else signs
    rows = []
    for i in range(b):
        xi = take(x, slice(i, i + 1))
        ww = {n: w[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = tangent._call(ww, xi)[0]
            c = out.shape[0]
            vecs = (torch.eye(c, dtype=out.dtype) if cots is None
                    else cots[:, i].to(out))  # fmt: skip
            vals = []
            for p in range(vecs.shape[0]):
                gs = torch.autograd.grad(out, [ww[n] for n in names], grad_outputs=vecs[p],
                                         retain_graph=p < vecs.shape[0] - 1)  # fmt: skip
                vals.append(sum(float(g.double().pow(2).sum()) for g in gs))
        rows.append(vals if cots is not None else [sum(vals)])
    return torch.tensor(rows, dtype=torch.float64).T


def _check_trace_args(fn, model_or_tangent, params, probes, samples, chunk_size) -> Tangent:
    if isinstance(model_or_tangent, Tangent):
        tangent = model_or_tangent
    elif isinstance(model_or_tangent, nn.Module):
        tangent = Tangent(model_or_tangent, params=params)
    else:
        raise TangentlabError(
            f"{fn}: expected an nn.Module or a Tangent, got {type(model_or_tangent).__name__}."
        )
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int)
                               or probes < 1):  # fmt: skip
        raise TangentlabError(
            f"{fn}: probes must be an integer >= 1 or None (exact trace), got {probes!r}; "
            "e.g. probes=4."
        )
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                or samples < 1):  # fmt: skip
        raise TangentlabError(
            f"{fn}: samples must be an integer >= 1 or None (all samples), got {samples!r}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise TangentlabError(f"{fn}: chunk_size must be an integer >= 1, got {chunk_size!r}.")
    return tangent


def kernel_trace(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    weights: Sequence[Any] | None = None,
    *,
    params: ParamSpec = None,
    probes: int | None = 4,
    samples: int | None = 64,
    seed: int = 0,
    chunk_size: int = _CHUNK,
) -> TraceProbe:
    r"""Kernel trace per sample tr Θ(w)/n at several weight points, by Hutchinson probes.

    .. math::
        \frac{1}{n}\operatorname{tr}\Theta(w) = \frac1n \sum_{i} \mathbb{E}_{s_i}
        \lVert J_w(x_i)^T s_i \rVert^2, \qquad s_i \in \{\pm 1\}^C\ \text{Rademacher}

    one reverse pass per probe for a whole chunk of samples (per-sample gradients from
    layer inputs and output gradients; a per-sample loop for models the structured mode
    does not cover). Every weight point uses the same samples and signs, so ratios between
    points are precise (common random numbers). Exact with ``probes=None`` (C passes).

    Args:
      model_or_tangent: an ``nn.Module`` (wrapped in a :class:`Tangent` with ``params``) or
        a :class:`Tangent`; its weights w0 are never changed.
      data: ``(X, y)`` or anything :func:`tangentlab.compute_kernel` accepts.
      weights: the weight points: each ``None`` (w0), a flat ``[P]`` tensor of absolute
        weights in ``tangent.param_names`` order (e.g. ``flat_weights(t) + dw``), a dict
        ``{name: tensor}`` or a module with the same parameter names (a fine-tuned copy).
        Default: ``[None]``.
      params: trainable weights when a module is given (as :class:`Tangent`).
      probes: Rademacher probes per sample (>= 1), or ``None`` for the exact trace.
      samples: size n of a random subset of the samples (``None``: all N).
      seed: seed of the subset and the signs.
      chunk_size: samples per reverse pass.

    Returns:
      A :class:`TraceProbe`.
    """
    fn = "kernel_trace"
    tangent = _check_trace_args(fn, model_or_tangent, params, probes, samples, chunk_size)
    points = [None] if weights is None else list(weights)
    if not points:
        raise TangentlabError(f"{fn}: weights is empty; pass None for w0 alone.")
    ws = [_as_weights(tangent, w, i) for i, w in enumerate(points)]
    x, _ = as_arrays(data, where=fn)
    x = to_device(x, tangent.device)
    n = num_rows(x)
    gen = torch.Generator().manual_seed(int(seed))
    if samples is None or samples >= n:
        ids = torch.arange(n)
    else:
        ids = torch.randperm(n, generator=gen)[:samples].sort().values
    xs = take(x, ids.to(tangent.device) if isinstance(x, torch.Tensor) else ids)
    m = int(ids.numel())
    c = int(tangent.f0(take(xs, slice(0, 1))).shape[1])
    signs = None
    if probes is not None:
        signs = torch.randint(0, 2, (probes, m, c), generator=gen).to(tangent.dtype) * 2 - 1
    t0 = time.perf_counter()
    traces, errs = [], []
    for w in ws:
        per = []  # [probes, m]
        for s in range(0, m, chunk_size):
            sl = slice(s, min(s + chunk_size, m))
            chunk_signs = None if signs is None else signs[:, sl]
            per.append(_probe_chunk(tangent, w, take(xs, sl), chunk_signs))
        sq = torch.cat(per, dim=1)  # [probes, m]
        est = sq.mean(1)  # trace per sample, one estimate per probe
        traces.append(float(est.mean()))
        errs.append(float(est.std() / math.sqrt(est.numel())) if est.numel() > 1 else 0.0)
    trace = np.asarray(traces)
    return TraceProbe(
        trace=trace,
        stderr=np.asarray(errs),
        ratio=trace / trace[0] if trace[0] > 0 else np.full_like(trace, np.nan),
        samples=ids.numpy(),
        probes=probes,
        seconds=time.perf_counter() - t0,
    )



def tangent_displacement(
    tangent: Tangent,
    data: Any,
    coefficients: np.ndarray,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Δw = J(X)^T a = Σ_i J(x_i)^T a_i, ``a`` ``[N, C]`` -> ``[P]`` (one VJP per chunk)."""
    x, _ = as_arrays(data, where="tangent_displacement")
    n = num_rows(x)
    coef = torch.as_tensor(coefficients, dtype=tangent.dtype, device=tangent.device)
    if tuple(coef.shape[:1]) != (n,):
        raise TangentlabError(
            f"tangent_displacement: coefficients must be [N, C] with N = {n}, got "
            f"{tuple(coef.shape)}."
        )
    total = None
    for s in range(0, n, chunk_size):
        g = tangent.vjp(take(x, slice(s, s + chunk_size)), coef[s : s + chunk_size])
        total = g if total is None else total + g
    return total

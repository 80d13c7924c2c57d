"""Exact kernels without P-dimensional Jacobians ("gram" mode).

The per-sample gradient of output ``a`` at sample ``i`` of a linear layer with input
``u_is`` and output gradient ``g_ias = df_a(x_i)/d out_is`` at positions ``s`` (tokens,
pixels; one position for an MLP) is ``sum_s g_ias u_is^T``, so the layer's share of the
kernel is a contraction of layer inputs and output gradients:

.. math::

    \\Theta_l[(i,a),(j,b)] = \\Big\\langle \\sum_s g_{ias} u_{is}^T,
                                          \\sum_t g_{jbt} u_{jt}^T \\Big\\rangle_F
                           = \\sum_{s,t} (u_{is}\\cdot u_{jt})\\,(g_{ias}\\cdot g_{jbt}),
    \\qquad \\Theta = \\sum_l \\Theta_l

A convolution is the same with ``u`` its unfolded patches (im2col) and ``s`` the output
pixels; a trainable bias is a column of ones appended to ``u`` (its gradient is
``sum_s g_s``); an embedding is the same with one-hot ``u`` (NOTE [gram embeddings]).
The inputs ``u`` and output gradients ``g`` come from one forward and C
reverse passes of a whole chunk (tangentlab.structured, as the ``structured`` Jacobian
mode).

NOTE [gram contraction order]. Each layer and each pair of chunks (``B_a``, ``B_b``
samples, ``S_a``, ``S_b`` positions, ``d_in`` including the bias column) is contracted
in the cheaper of two orders, by their flops (:func:`_choose`):

- ``pairs`` (position pairs): ``UU = u_I u_J^T`` and ``GG = g_I g_J^T`` over positions,
  multiplied and summed over ``(s, t)``: ``B_a B_b S_a S_b (d_in + C^2 d_out + 4 C^2)``;
  never forms a weight-sized tensor. Best when there are few positions (MLPs, heads, 1x1
  feature maps, the token-0 path of a transformer's last layer);
- ``grads``: the per-sample gradients of *this layer only* ``[B C, d_out d_in]`` in blocks
  of at most ``_GRAD_ELEMENTS``, then matrix products: ``B_a B_b C^2 d_out d_in`` plus
  forming them, ``C S d_out d_in`` per sample and block of the other side. Best for long
  sequences and large feature maps.

NOTE [gram positions]. Positions whose output gradient is exactly zero for every sample
and output of a chunk add nothing to any entry, and are dropped before the contraction
(exact). In a BERT classifier's last layer only token 0 reaches the pooler: every
projection after the attention, and the query, keep one position; the keys and values
keep the tokens that are not padding.

NOTE [gram embeddings]. An embedding's per-sample gradient has one row per id the sample
uses, ``H_ia[v] = sum_{s: id_is = v} g_ias`` (``g`` the gradient at the embedding's
output; positions of its ``padding_idx`` add nothing), so

.. math::

    \\Theta_E[(i,a),(j,b)] = \\sum_{s,t:\\ id_{is} = id_{jt}} g_{ias} \\cdot g_{jbt}
                          = \\sum_v H_{ia}[v] \\cdot H_{jb}[v]

over the ids both samples use: the factors are the (sample, id) rows ``H`` (at most S per
sample, never the vocabulary), matched between the two chunks by sorting the ids, and
their ``C x C`` products added per pair of samples. Cost: ``C^2 d`` per matching pair of
rows — ``B_a B_b`` pairs for an id every sample uses ([CLS], token type 0, position 3).

Weights without that structure (eval batch norm, layer norm, grouped/depthwise
convolutions, a bias whose weight is frozen) are small: their per-sample gradients
``[B, C, p]`` are formed (tangentlab.structured._per_sample) and multiplied. Trainable
weights outside the covered calls (attention in-projections of ``nn.MultiheadAttention``'s
fused path, an embedding with ``max_norm`` or ``scale_grad_by_freq``, ...) are not handled
here: compute_kernel computes their part of the kernel by the Jacobian path (NOTE
[jacobian modes] in tangentlab.tangent).

Memory: Theta, the factors (``u``, ``g``, small per-sample gradients) of the samples of one
row strip and of one column chunk (``sum_l S_l (d_in,l + C d_out,l)`` elements per
sample), and transient blocks of one layer: at most ``_BLOCK_ELEMENTS`` elements (position
pairs) or two blocks of that layer's per-sample gradients of at most ``_GRAD_ELEMENTS``
each; never ``N C x P``. The row-strip / column-chunk schedule is that of the Jacobian path (NOTE
[exact kernel strips] in tangentlab.compute), with factors in place of Jacobians.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangentlab import linalg
from tangentlab.linalg import add_gram_
from tangentlab.structured import (
    Unsupported,
    _detached,
    _dot_w0,
    _outer_factors,
    _per_sample,
    capture_calls,
    embedding_grads,
    shared_inputs,
)

# The largest transient tensor one layer's position-pair contraction forms at once
# (elements): a block of GG.
_BLOCK_ELEMENTS = 1 << 22
# The per-sample gradients of one layer held at once by the ``grads`` order (elements, per
# side): the samples of a pair of chunks are cut into blocks of at most this size. Each
# block's gradients are formed once per block of the other side, so larger blocks form
# them fewer times (MiniLM's 384x384 keys and values, C = 2: ~56 samples a block).
_GRAD_ELEMENTS = 1 << 24
# NOTE [gram gradient blocks]. The ``grads`` order forms one side's per-sample gradients
# once per block of the other side: with k blocks of a chunk of B samples (C outputs, S_b
# positions on the other side) that re-forming costs about k S_b / (B C) of the products.
# Blocks are as small as keeps that share at most _REFORM_SHARE (and within ``held``): the
# digits CNN's second convolution (B = 400, C = 10, S = 64) is cut into 6 blocks of 67
# samples (12 MB each instead of 67 MB), MiniLM's keys (B = 100, C = 2, S = 64) stay
# whole blocks (re-forming would cost more than the products).
_REFORM_SHARE = 0.1


@dataclass
class _Layer:
    """One covered call's factors for a chunk of B samples (C outputs)."""

    kind: str  # "outer" (u, g) | "embed" (u, g) | "dense" (d)
    # outer: [B, S, i] inputs (unfolded; ones column for a bias); embed: [U, 2] (sample, id)
    u: torch.Tensor | None = None
    # outer: [B, C, o, S] output gradients (positions last); embed: [U, C, d] (_merge_tokens)
    g: torch.Tensor | None = None
    d: torch.Tensor | None = None  # [B, C, p'] per-sample gradients (columns ``cols``)
    cols: torch.Tensor | None = None  # the p' of p columns kept (None: all; see _trim)
    # while the factors are filled (gram_factors, until _settle and _trim): embed's g is
    # [B, C, S, o] (tokens); a linear call's g is None, its C output gradients [B, S, o]
    # wait in ``pending`` as autograd returned them (``tokens``); a convolution's g is
    # [B, C, o, S] from the start; ``live`` marks an outer layer's positions where one of
    # them is non-zero; u lacks the bias column (bias)
    tokens: bool = False
    bias: bool = False
    pending: list | None = None
    live: torch.Tensor | None = None


@dataclass
class Factors:
    """Everything the kernel needs from a chunk: per-layer factors, ``J w0`` and the
    outputs ``f0`` ``[B, C]``."""

    layers: list[_Layer]
    jw0: torch.Tensor
    f0: torch.Tensor
    b: int
    c: int


def _choose(
    ba: int, bb: int, sa: int, sb: int, i: int, o: int, c: int, held: int = _GRAD_ELEMENTS
) -> str:
    """NOTE [gram contraction order]: flops of each order for a pair of chunks of
    ``ba`` and ``bb`` samples with ``sa`` and ``sb`` positions (``held``: the elements of
    per-sample gradients one side may hold)."""
    pairs = ba * bb * sa * sb * (i + c * c * o + 4 * c * c)
    per = c * o * i  # one sample's gradient of this layer
    blocks = -(-ba * per // max(held, per))  # the other side is formed once per block
    grads = ba * bb * c * c * o * i + (ba * sa + blocks * bb * sb) * c * o * i
    return "pairs" if pairs <= grads else "grads"


def _layout(kind: str, a: dict, roles: dict, out: torch.Tensor) -> tuple[str, int, int, int]:
    """``(kind, S, d_in, d_out)`` of a covered call: "outer" (S, d_in, d_out), "embed"
    (S tokens, 0, d) or "dense"."""
    if "weight" not in roles:
        return "dense", 0, 0, 0
    w = a["weight"]
    if kind == "embedding":
        return "embed", a["input"].numel() // out.shape[0], 0, int(w.shape[1])
    if kind == "linear" or (kind in ("conv1d", "conv2d") and int(a.get("groups", 1)) == 1):
        if kind != "linear" and isinstance(a.get("padding", 0), str):
            return "dense", 0, 0, 0  # _per_sample raises Unsupported for it
        o = int(w.shape[0])
        i = w.numel() // o + ("bias" in roles)
        s = out.numel() // (out.shape[0] * o)
        return "outer", s, i, o
    return "dense", 0, 0, 0


def factor_elements(call, w0: dict[str, torch.Tensor], names: list[str], x1) -> int | None:
    """Factor elements per sample (``x1``: a batch of one or more), or None when not
    covered.

    One forward pass under capture (no reverse pass); used to plan the chunks.
    """
    try:
        with torch.enable_grad():
            logits, calls, roles = capture_calls(call, w0, names, x1)
    except Unsupported:
        return None
    c = int(logits.shape[-1])
    total = 0
    for (kind, a, out), r in zip(calls, roles):
        if not r:
            continue
        layer, s, i, o = _layout(kind, a, r, out)
        if layer == "dense":
            if kind in ("conv1d", "conv2d") and isinstance(a.get("padding", 0), str):
                return None
            total += c * sum(int(a[role].numel()) for role in r)
        else:  # (an embedding: S ids and S C d gradients)
            total += s * (max(i, 1) + c * o)
    return total


def _nonzero(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Where ``t`` is not all zero along ``dims`` (two reductions, no boolean copy of t)."""
    return t.amax(dims).ne(0) | t.amin(dims).ne(0)


def _trim(layer: _Layer) -> None:
    """Drop the columns of per-sample gradients that are zero for the whole chunk (a
    depthwise convolution's taps that only see padding, e.g. 3x3 on a 1x1 map: 8 of 9);
    merge an embedding's tokens; append a bias's column of ones (NOTE [gram positions]:
    an outer layer's dead positions are dropped before, by :func:`_settle`)."""
    if layer.kind == "embed":
        _merge_tokens(layer)
        return
    if layer.kind == "dense":
        live = _nonzero(layer.d, (0, 1))  # [p]
        if not bool(live.all()):
            live[0] |= not bool(live.any())  # keep one column for the shapes
            layer.cols = live.nonzero().squeeze(1)
            layer.d = layer.d.index_select(2, layer.cols)
        return
    # (an outer layer's positions were trimmed by _settle)
    if layer.bias:  # a bias is the weight of a constant input 1 (appended once trimmed)
        layer.u = torch.cat([layer.u, layer.u.new_ones(*layer.u.shape[:2], 1)], dim=-1)
        layer.bias = False


def _settle(layer: _Layer, kind: str, a: dict, roles: dict, out: torch.Tensor,
            jw0: torch.Tensor) -> None:
    """Drop an outer layer's positions where every output's gradient is zero (NOTE [gram
    positions]). A linear call's C gradients (``layer.pending``, as autograd returned them)
    are copied once, live positions only, to ``layer.g [B, C, o, S']``, and their
    ``<df/dw, w0>`` is added to ``jw0 [B, C]`` on those positions only (exact: the others
    have zero gradient for every output; a BERT classifier's last layer keeps token 0 of
    64). A convolution's ``g`` was filled in place (its J w0 too): no second full copy."""
    live = layer.live
    keep = None
    if not bool(live.all()):
        if not bool(live.any()):
            live[0] = True  # the layer adds zero; keep one position for the shapes
        keep = live.nonzero().squeeze(1)
        layer.u = layer.u.index_select(1, keep)
    layer.live = None
    if not layer.tokens:
        if keep is not None:
            layer.g = layer.g.index_select(3, keep)
        return
    grads, layer.pending = layer.pending, None
    out = out.detach().reshape(grads[0].shape)  # [B, S, o]
    if keep is not None:
        grads = [g.index_select(1, keep) for g in grads]
        out = out.index_select(1, keep)
    for cls, g in enumerate(grads):
        jw0[:, cls] += _dot_w0(kind, a, out, g, roles)
    layer.g = torch.stack([g.transpose(1, 2) for g in grads], dim=1)
    layer.tokens = False


def _merge_tokens(layer: _Layer) -> None:
    """An embedding's factors, from ids ``u [B, S]`` and gradients ``g [B, C, S, d]`` to one
    row per (sample, id) it uses: ``u [U, 2]`` (sample, id), ``g [U, C, d]`` the sum of the
    gradients at the sample's tokens with that id (NOTE [gram embeddings]). Positions
    without gradient (padding, ``padding_idx``) are dropped."""
    ids, g = layer.u, layer.g
    b, c, s, d = g.shape
    g = g.permute(0, 2, 1, 3).reshape(b * s, c, d)
    live = _nonzero(g, (1, 2))
    sample = torch.arange(b, device=g.device).repeat_interleave(s)[live]
    ids, g = ids.reshape(-1)[live], g[live]
    key = sample * (int(ids.max()) + 1 if ids.numel() else 1) + ids
    uniq, inv = torch.unique(key, return_inverse=True)
    merged = g.new_zeros(uniq.numel(), c, d).index_add_(0, inv, g)
    first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long, device=g.device)
    first = first.scatter_reduce_(0, inv, torch.arange(key.numel(), device=g.device), "amin")
    layer.u = torch.stack([sample[first], ids[first]], dim=1)
    layer.g = merged
    layer.tokens = False


def _embed_block(la: _Layer, lb: _Layer, out: torch.Tensor) -> None:
    """``out [Ba, C, Bb, C] += sum_v H_ia[v] . H_jb[v]`` over the ids both samples use
    (NOTE [gram embeddings]): matching rows found by sorting, products in blocks."""
    (ua, ga), (ub, gb) = (la.u, la.g), (lb.u, lb.g)
    ba, c, bb, _ = out.shape
    order = torch.argsort(ub[:, 1])
    sorted_b = ub[order, 1].contiguous()
    lo = torch.searchsorted(sorted_b, ua[:, 1].contiguous())
    count = torch.searchsorted(sorted_b, ua[:, 1].contiguous(), right=True) - lo
    total = int(count.sum())
    if total == 0:
        return
    rows_a = torch.repeat_interleave(torch.arange(ua.shape[0], device=ua.device), count)
    shift = torch.repeat_interleave(lo - (torch.cumsum(count, 0) - count), count)
    rows_b = order[torch.arange(total, device=ua.device) + shift]
    acc = ga.new_zeros(ba * bb, c, c)
    step = max(1, _BLOCK_ELEMENTS // (c * ga.shape[-1]))
    for p, q in _spans(total, step):
        ra, rb = rows_a[p:q], rows_b[p:q]
        prod = torch.bmm(ga[ra], gb[rb].transpose(1, 2))  # [m, C, C]
        acc.index_add_(0, ua[ra, 0] * bb + ub[rb, 0], prod)
    out += acc.view(ba, bb, c, c).permute(0, 2, 1, 3)


def gram_factors(call, w0: dict[str, torch.Tensor], names: list[str], x) -> Factors:
    """Factors of a chunk ``x`` (one forward and C reverse passes of the whole chunk).

    Args:
      call: ``call(w, x) -> logits [B, C]`` (the functional model).
      w0: the weights, by name.
      names: trainable weight names (all must be covered).

    Raises:
      Unsupported: a trainable weight is used by an uncovered op, or more than once.
    """
    with torch.enable_grad():
        logits, calls, roles = capture_calls(call, w0, names, x)
        outs = [out for _, _, out in calls]
        b, c = logits.shape
        dt, dev = logits.dtype, logits.device
        layers: list[_Layer | None] = []
        plans = []
        for (kind, a, out), r in zip(calls, roles):
            if not r:
                layers.append(None)
                plans.append(None)
                continue
            a = _detached(a)
            layout, s, i, o = _layout(kind, a, r, out)
            if layout == "embed":
                layer = _Layer("embed", u=a["input"].reshape(b, s).long(), tokens=True,
                               g=torch.empty(b, c, s, o, dtype=dt, device=dev))  # fmt: skip
            elif layout == "outer":
                _, u = _outer_factors(kind, a, out.detach())
                tokens = kind == "linear"
                live = torch.zeros(s, dtype=torch.bool, device=dev)
                g0 = None if tokens else torch.empty(b, c, o, s, dtype=dt, device=dev)
                layer = _Layer("outer", u=u.reshape(b, s, -1), g=g0, tokens=tokens,
                               bias="bias" in r, pending=[], live=live)  # fmt: skip
            else:
                p = sum(int(a[role].numel()) for role in r)
                layer = _Layer("dense", d=torch.empty(b, c, p, dtype=dt, device=dev))
                # e.g. unfold a (grouped) convolution's input once, not C times
                a = {**a, **shared_inputs(kind, a, r)}
            layers.append(layer)
            plans.append((kind, a, r, s, o))
        jw0 = torch.zeros(b, c, dtype=dt, device=dev)
        for cls in range(c):
            grads = torch.autograd.grad(
                logits[:, cls].sum(), outs, retain_graph=cls < c - 1, allow_unused=True
            )
            for layer, plan, (_, _, out), g in zip(layers, plans, calls, grads):
                if layer is None:
                    continue
                kind, a, r, s, o = plan
                g = torch.zeros_like(out) if g is None else g.detach()
                if layer.tokens and layer.kind == "outer":  # J w0 once trimmed (_settle)
                    g = g.reshape(b, s, o)
                    layer.pending.append(g)
                    layer.live |= _nonzero(g, (0, 2))
                    continue
                jw0[:, cls] += _dot_w0(kind, a, out.detach(), g, r)
                if layer.kind == "dense":
                    ps = _per_sample(kind, {**a, "roles": tuple(r)}, g)
                    layer.d[:, cls] = torch.cat([ps[role].reshape(b, -1) for role in r], dim=1)
                elif layer.kind == "embed":
                    layer.g[:, cls] = embedding_grads(a, g).reshape(b, s, o)
                else:  # convolution: [B, o, *spatial] -> [B, o, S]
                    layer.g[:, cls] = g.reshape(b, o, s)
                    layer.live |= _nonzero(layer.g[:, cls], (0, 1))
        for layer, plan, (_, _, out) in zip(layers, plans, calls):
            if layer is not None and layer.kind == "outer":
                kind, a, r, _, _ = plan
                _settle(layer, kind, a, r, out, jw0)
    kept = [layer for layer in layers if layer is not None]
    for layer in kept:
        _trim(layer)
    return Factors(kept, jw0, logits.detach(), int(b), int(c))


def _spans(n: int, size: int):
    size = max(1, int(size))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _pairs_block(la: _Layer, lb: _Layer, out: torch.Tensor, same: bool = False) -> None:
    """``out [Ba, C, Bb, C] += sum_st (u_is . u_jt)(g_ias . g_jbt)`` (position pairs).

    ``same`` (a diagonal block, ``la is lb``): one position per sample takes the upper block
    triangle only (the block is symmetric), as :func:`tangentlab.linalg.add_gram_`.
    """
    ba, c, o, sa = la.g.shape
    bb, _, _, sb = lb.g.shape
    if sa == sb == 1:
        uu = la.u[:, 0] @ lb.u[:, 0].T  # [Ba, Bb]
        spans = _spans(ba, max(1, linalg.SYRK_ROWS // c))
        if same and len(spans) >= 3:
            g = la.g.reshape(ba * c, o)
            for ia, (p, q) in enumerate(spans):
                for r, t in spans[ia:]:
                    gg = (g[p * c : q * c] @ g[r * c : t * c].T).view(q - p, c, t - r, c)
                    gg.mul_(uu[p:q, None, r:t, None])
                    out[p:q, :, r:t] += gg
                    if r != p:
                        out[r:t, :, p:q] += gg.permute(2, 3, 0, 1)
            return
        gb = lb.g.reshape(bb * c, o)
        for p, q in _spans(ba, max(1, _BLOCK_ELEMENTS // (c * bb * c))):
            gg = (la.g[p:q].reshape((q - p) * c, o) @ gb.T).view(q - p, c, bb, c)
            out[p:q] += gg.mul_(uu[p:q, None, :, None])
        return
    gb = lb.g.transpose(2, 3).reshape(bb * c * sb, o)
    ub = lb.u.reshape(bb * sb, -1)
    rows = max(1, _BLOCK_ELEMENTS // (c * sa * bb * c * sb))
    for p, q in _spans(ba, rows):
        m = q - p
        uu = (la.u[p:q].reshape(m * sa, -1) @ ub.T).view(m, 1, sa, bb, 1, sb)
        ga = la.g[p:q].transpose(2, 3).reshape(m * c * sa, o)
        gg = (ga @ gb.T).view(m, c, sa, bb, c, sb)
        out[p:q] += gg.mul_(uu).sum((2, 5))


def _grads(layer: _Layer, p: int, q: int) -> torch.Tensor:
    """Per-sample gradients of one layer for samples ``[p, q)``: ``[(q-p) C, o i]``."""
    g, u = layer.g[p:q], layer.u[p:q]
    m, c, o, s = g.shape
    # [m, C o, S] @ [m, S, i]: one batched product, no copy of g (positions are last)
    return torch.bmm(g.reshape(m, c * o, s), u).reshape(m * c, -1)


def _grads_block(la: _Layer, lb: _Layer, out: torch.Tensor, same: bool, held: int) -> None:
    """``out [Ba C, Bb C] += G_I G_J^T`` with this layer's per-sample gradients ``G``.

    For a diagonal block (``same``) only the upper block triangle is formed; its products
    are mirrored.
    """
    ba, c, o, _ = la.g.shape
    bb, _, _, sb = lb.g.shape
    per = c * o * la.u.shape[-1]  # elements of one sample's gradient
    # NOTE [gram gradient blocks]: the fewest rows that keep re-forming cheap
    spans = max(1, int(_REFORM_SHARE * ba * c / sb))
    rows = max(1, min(held // per, -(-ba // spans)))
    spans_a, spans_b = _spans(ba, rows), _spans(bb, rows)
    for ia, (p, q) in enumerate(spans_a):
        ga = _grads(la, p, q)
        for r, t in spans_b[ia:] if same else spans_b:
            if same and (p, q) == (r, t):
                add_gram_(out[p * c : q * c, p * c : q * c], ga)
                continue
            prod = ga @ _grads(lb, r, t).T
            out[p * c : q * c, r * c : t * c] += prod
            if same:
                out[r * c : t * c, p * c : q * c] += prod.T


def _common_columns(la: _Layer, lb: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The two chunks' per-sample gradients on the columns both kept (a column dropped by
    one side is zero there, so its products are zero: exact)."""
    if la is lb or (la.cols is None and lb.cols is None):
        return la.d, lb.d
    if la.cols is not None and lb.cols is not None and torch.equal(la.cols, lb.cols):
        return la.d, lb.d
    dev = la.d.device
    ka = torch.arange(la.d.shape[2], device=dev) if la.cols is None else la.cols
    kb = torch.arange(lb.d.shape[2], device=dev) if lb.cols is None else lb.cols
    width = int(max(ka.max(), kb.max())) + 1  # the columns of the untrimmed gradient
    pos_b = torch.full((width,), -1, dtype=torch.long, device=dev)
    pos_b[kb] = torch.arange(kb.numel(), device=dev)
    in_b = pos_b[ka] >= 0  # which of a's columns b kept
    return la.d[:, :, in_b], lb.d.index_select(2, pos_b[ka[in_b]])


def gram_block(
    fa: Factors,
    fb: Factors,
    out: torch.Tensor | None = None,
    held: int = _GRAD_ELEMENTS,
    *,
    consume: bool = False,
) -> torch.Tensor:
    """``Theta[(i,a),(j,b)]`` for samples ``i`` of ``fa`` and ``j`` of ``fb``: ``[Ba C, Bb C]``.

    ``out``: where to write it (e.g. a view into the kernel's rows), else a new tensor.
    ``held``: the most elements of one layer's per-sample gradients held per side (the
    ``grads`` order; NOTE [gram contraction order]).
    ``consume``: release each layer's factors once contracted (the last use of ``fa`` and
    ``fb``): the later layers' transient blocks reuse that memory.
    """
    ba, bb, c = fa.b, fb.b, fa.c
    same = fa is fb
    dt, dev = fa.jw0.dtype, fa.jw0.device
    if out is None:
        out = torch.zeros(ba * c, bb * c, dtype=dt, device=dev)
    else:
        out.zero_()
    pairs = out.view(ba, c, bb, c)
    for la, lb in zip(fa.layers, fb.layers):
        if la.kind == "dense":  # (c = 1 for a trace kernel: the C outputs side by side)
            if same:
                add_gram_(out, la.d.reshape(ba * c, -1))  # symmetric: upper triangle
            else:
                da, db = _common_columns(la, lb)
                out.addmm_(da.reshape(ba * c, -1), db.reshape(bb * c, -1).T)
                del da, db
        elif la.kind == "embed":
            _embed_block(la, lb, pairs)
        else:
            i, o = la.u.shape[-1], la.g.shape[2]
            if _choose(ba, bb, la.g.shape[3], lb.g.shape[3], i, o, c, held) == "pairs":
                _pairs_block(la, lb, pairs, same)
            else:
                _grads_block(la, lb, out, same, held)
        if consume:
            for layer in (la, lb):
                layer.u = layer.g = layer.d = None
    return out


def _folded(f: Factors) -> Factors:
    """The factors of the trace kernel ``K_ij = sum_a Theta[(i,a),(j,a)]`` as one output.

    ``sum_a <G_ia, G_ja> = sum_st (u_is . u_jt)(g_is . g_jt)`` with ``g_is`` the C output
    gradients side by side (``[C o]``): a layer of width ``C o`` and a single output, so
    the contraction costs a factor C less than the full block's (views, no copy).
    """
    layers = [  # dense layers as they are: gram_block reads [B, C, p] as [B, 1, C p]
        layer if layer.kind == "dense" else _fold(layer, f.b) for layer in f.layers
    ]
    return Factors(layers, f.jw0, f.f0, f.b, 1)


def _fold(layer: _Layer, b: int) -> _Layer:
    if layer.kind == "embed":  # [U, C, d] -> [U, 1, C d]
        return _Layer("embed", u=layer.u, g=layer.g.reshape(layer.g.shape[0], 1, -1))
    return _Layer("outer", u=layer.u, g=layer.g.reshape(b, 1, -1, layer.g.shape[3]))


def kernel_rows(
    factors_of, n: int, r: int, s: int, e: int, chunk: int, bar, outputs, *, held: int | None = None
) -> dict:
    """Rows ``[s, e)`` of Theta against columns ``[s, n)`` from layer factors.

    The schedule of the Jacobian path's row strips (NOTE [exact kernel strips] in
    tangentlab.compute): the strip's factors are kept, the later samples' factors are
    computed chunk by chunk and contracted against them. ``r`` kernel rows per sample: C,
    or 1 for a trace kernel (the sum of the probed outputs' diagonal blocks, NOTE [trace
    kernel], contracted directly: :func:`_folded`).

    Args:
      factors_of: ``factors_of(lo, hi) -> (Factors, x chunk)`` of samples ``[lo, hi)``.
      outputs: ``outputs(x chunk, probed_jw0=..., logits=...) -> (f0, jw0)``
        (compute._Outputs).
      held: the most elements of one layer's per-sample gradients held at once per side
        (what the memory plan leaves; at most ``_GRAD_ELEMENTS``, the default).
    """
    m = (e - s) * r
    held = _GRAD_ELEMENTS if held is None else max(1, min(held, _GRAD_ELEMENTS))

    def block(fa: Factors, fb: Factors, out: torch.Tensor, consume: bool = False) -> None:
        if r != fa.c:  # trace kernel: K_ij = sum_a Theta[(i,a),(j,a)], see _folded
            folded = _folded(fa)
            fb = folded if fb is fa else _folded(fb)
            if consume:  # the folded views are then the only references
                for layer, view in zip(fa.layers, folded.layers):
                    if view is not layer:
                        layer.u = layer.g = None
            fa = folded
        # in place: no second copy of the kernel's rows
        gram_block(fa, fb, out, held, consume=consume)

    strip: list[tuple[int, Factors]] = []
    f0s, jw0s = [], []
    for a, b in _spans(e - s, chunk):
        fac, xb = factors_of(s + a, s + b)
        f0b, jw0b = outputs(xb, probed_jw0=fac.jw0, logits=fac.f0)
        f0s.append(f0b)
        jw0s.append(jw0b)
        strip.append((a, fac))
        bar.update(b - a)
    first = strip[0][1]
    rows = torch.empty(m, (n - s) * r, dtype=first.jw0.dtype, device=first.jw0.device)
    # one chunk and no later columns: its factors are used once (released as contracted)
    once = len(strip) == 1 and e == n
    for ia, (a, fa) in enumerate(strip):
        for b, fb in strip[ia:]:
            blk = rows[a * r : (a + fa.b) * r, b * r : (b + fb.b) * r]
            block(fa, fb, blk, consume=once)
            if b != a:
                rows[b * r : (b + fb.b) * r, a * r : (a + fa.b) * r] = blk.T
    for a, b in _spans(n - e, chunk):
        fb, _ = factors_of(e + a, e + b)
        for p, fa in strip:
            block(fa, fb, rows[p * r : (p + fa.b) * r, m + a * r : m + b * r])
        del fb
        bar.update(b - a)
    return {"rows": rows.cpu(), "f0": torch.cat(f0s).cpu(), "jw0": torch.cat(jw0s).cpu()}

"""Per-sample Jacobians from layer inputs and output gradients ("structured" mode).

For the layers that hold the trainable weights, the per-sample gradient of an output
``f_a(x_i)`` factorizes into the layer's input and the gradient at the layer's output:

.. math::

    \\text{linear:}\\ \\frac{\\partial f_a(x_i)}{\\partial W} = \\sum_s g_{is}\\, u_{is}^T,
    \\qquad
    \\text{conv:}\\ \\frac{\\partial f_a(x_i)}{\\partial W} = g_i\\, \\mathrm{unfold}(u_i)^T,
    \\qquad
    \\text{norm:}\\ \\frac{\\partial f_a(x_i)}{\\partial \\gamma}
        = \\sum_s g_{is} \\odot \\hat u_{is}

with ``u`` the layer input, ``g = df_a/d(output)`` and ``s`` the positions (tokens,
pixels). So one forward pass of a chunk of B samples and C reverse passes *of the whole
chunk* (one per output ``a``, cotangent ``e_a`` for every sample) give all ``B x C``
per-sample gradients — instead of B x C reverse passes of single samples. This is the
approach of BackPACK / Opacus (Dangel et al., 2020: https://arxiv.org/abs/1912.10985).

The calls are captured with a ``TorchFunctionMode`` at the functional level
(``F.linear``, ``F.conv1d/2d``, ``F.batch_norm`` in eval mode, ``F.layer_norm``,
``F.embedding`` without ``max_norm`` or ``scale_grad_by_freq``, whose per-sample gradient
is the output gradient scattered to the rows of the ids; ``F.group_norm`` is not
covered), so custom wrappers such as "same"-padding convolutions are seen with their real
arguments. Every trainable weight must be used exactly once, by
a covered call, as its weight or bias; otherwise :class:`Unsupported` is raised and the
caller falls back to another mode (NOTE [jacobian modes] in tangent.py).

NOTE [float32 and activation kinks]. In float32 the per-sample gradients, the tensor
sketch (FFT) and ``J w0`` (Euler's identity, :func:`_dot_w0`) agree with float64 to about
1e-6 relative, like the per-sample autograd loop — also for sums over 112x112 positions
(EfficientNet-Lite0 at 224x224, measured with the activation pattern held fixed:
tests/test_precision.py). Larger float32/float64 differences of single samples (1e-3 on
Lite0: 2 samples in 32 at 64x64, most samples at 224x224) are not round-off of these
sums: the Jacobian of a ReLU/ReLU6 network jumps where a pre-activation crosses a kink,
and a pre-activation within float32 round-off of a kink (|x| ~ 1e-8) takes the other
one-sided derivative in float32 than in float64 (or in a batch of another size, whose
convolutions round differently, or with an eval-mode batch norm computed as the affine map
it is, as the capture computes it: :func:`_eval_batch_norm`; one sample in 60 on the default
example, 7% in its row, the others within 2e-6). Both values are valid one-sided Jacobians; no
accumulation in float64 removes the jump — only a float64 forward pass
(``model.double()``, about 2.4x slower on CPU) moves the ambiguity to |x| ~ 1e-16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class Unsupported(RuntimeError):
    """The model uses its trainable weights in a way the structured mode does not cover."""


_COVERED = {
    F.linear: "linear",
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.batch_norm: "batch_norm",
    F.layer_norm: "layer_norm",
    F.embedding: "embedding",
}


class _Capture(TorchFunctionMode):
    def __init__(self, ids: dict[int, str]) -> None:
        super().__init__()
        self.ids = ids
        self.calls: list[tuple[str, dict, torch.Tensor]] = []
        self.uses: dict[str, int] = {}
        self.error: str | None = None
        self.uncovered: set[str] = set()  # weights used by a call that is not covered

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func is F.conv2d or func is torch.conv2d:
            args, kwargs = _depthwise_channels_last(args, kwargs)
            out = _pointwise_conv(args, kwargs)
        elif func is F.batch_norm:
            out = _eval_batch_norm(args, kwargs)
        out = func(*args, **kwargs) if out is None else out
        kind = _COVERED.get(func)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        used = [self.ids[id(t)] for t in tensors if id(t) in self.ids]
        if not used:
            return out
        for name in used:
            self.uses[name] = self.uses.get(name, 0) + 1
        if kind == "embedding":  # max_norm renormalizes the weight in place; frequency
            a = _bind(kind, args, kwargs)  # scaling depends on the batch: not covered
            if a.get("max_norm") is not None or a.get("scale_grad_by_freq", False):
                kind = None
        if kind is None:
            name = getattr(func, "__name__", str(func))
            self.error = self.error or f"trainable weight {used[0]!r} is used by {name}"
            self.uncovered.update(used)
            return out
        self.calls.append((kind, _bind(kind, args, kwargs), out))
        return out


# NOTE [depthwise channels-last]
# On CPU, the backward to the input of a depthwise convolution (groups = input channels)
# stored NCHW takes a slow path: 9.6 ms against 2.4 ms for the same call in channels-last
# layout (a [100, 1152, 4, 4] map, 3x3 kernel, stride 2: the last block of EfficientNet-
# Lite0 at 64 px). A kernel's reverse passes run it once per output and chunk, so the
# capture hands a depthwise convolution whose input will be back-propagated its input in
# channels-last layout. The same numbers (features bit-identical on the default example);
# the layers after it see the same values in another layout. Only there: moving every
# convolution's input was not clearly faster (1.04x more in fresh processes, 0.87-0.93x in
# one process) and has no such slow path to avoid (benchmarks/RESULTS.md "exact-top-layout").
def _depthwise_channels_last(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a ``conv2d`` call, with its input in channels-last layout where
    it is a CPU depthwise convolution that a backward pass will go through (NOTE
    [depthwise channels-last]); otherwise unchanged."""
    a = _bind("conv2d", args, kwargs)
    u, w = a.get("input"), a.get("weight")
    if not (isinstance(u, torch.Tensor) and isinstance(w, torch.Tensor) and u.ndim == 4
            and u.device.type == "cpu" and u.requires_grad and torch.is_grad_enabled()
            and int(a.get("groups", 1)) == u.shape[1] > 1 and w.shape[1] == 1):  # fmt: skip
        return args, kwargs
    u = u.contiguous(memory_format=torch.channels_last)
    if args:
        return (u, *args[1:]), kwargs
    return args, {**kwargs, "input": u}


# NOTE [pointwise convolution]
# A 1 x 1 convolution (stride 1, no padding, one group) is a matrix product over positions:
# out[b, :, p] = W u[b, :, p] (+ bias). On CPU, torch runs it as a convolution whose forward
# and backward took about twice as long as the same product as one matrix multiplication of
# [B h w, C_in] rows (timed alone: the exact top's head convolution, 320 -> 1280 on a
# [500, 320, 2, 2] map, 94-96 ms against 42-43 ms). So the capture and AffineBatchNorm
# compute it as that product, returned as a contiguous [B, C_out, h, w] tensor (the layout a
# convolution gives, so that a caller's ``.view`` still works; a channels-last view saved
# another tenth); the capture still records it as the convolution it is. On the default
# example the exact top's kernel and steps got about 1.1x and 1.2x faster (benchmarks/RESULTS.md
# "exact-top-pointwise"); the top's forward and backward came out bit-identical, the
# kernel's features moved by rounding (1e-6). CPU only (a GPU's convolution is left as it is).
def _pointwise_conv(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.conv2d(*args, **kwargs)`` as a matrix product where it is a CPU 1 x 1 convolution
    of a batched input (NOTE [pointwise convolution]); otherwise ``None``."""
    a = _bind("conv2d", args, kwargs)
    u, w, b = a.get("input"), a.get("weight"), a.get("bias")
    if not (isinstance(u, torch.Tensor) and isinstance(w, torch.Tensor) and u.ndim == 4
            and w.ndim == 4 and tuple(w.shape[2:]) == (1, 1) and u.device.type == "cpu"
            and w.shape[1] == u.shape[1] and int(a.get("groups", 1)) == 1
            and _pair(a.get("stride", 1), 2) == (1, 1)
            and (b is None or isinstance(b, torch.Tensor))):  # fmt: skip
        return None
    pad = a.get("padding", 0)
    if not (pad in ("valid", "same") or _pair(pad, 2) == (0, 0)):
        return None
    n, _, h, wd = u.shape
    rows = u.permute(0, 2, 3, 1).reshape(n * h * wd, u.shape[1])  # a view if channels-last
    w2 = w.reshape(w.shape[0], w.shape[1]).T
    out = rows @ w2 if b is None else torch.addmm(b, rows, w2)
    return out.reshape(n, h, wd, w.shape[0]).permute(0, 3, 1, 2).contiguous()


def _channels_last_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
                          ) -> torch.Tensor | None:
    """x s + t per channel for a map ``x`` ``[B, C, h, w]`` stored channels-last (e.g. after
    the capture's depthwise convolution, NOTE [depthwise channels-last]), computed on its
    ``[B h w, C]`` rows, a view, and returned in the same layout; ``None`` for any other
    ``x``. The reshape of the NCHW form would copy the map forward and its gradient back
    at every reverse pass (two of the four copies of a [250, 1152, 2, 2] map a pass on the
    default example; benchmarks/RESULTS.md "exact-top-pointwise")."""
    if not (x.ndim == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
        return None
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return torch.addcmul(shift, rows, scale).reshape(n, h, w, c).permute(0, 3, 1, 2)


def _eval_batch_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm`` in eval mode as the per-channel affine map it is, x s + (b − μ s)
    with s = γ / sqrt(σ² + ε) (``None`` in training mode or without running statistics).

    The same numbers to float rounding; its backward to the input is one product, where
    ``native_batch_norm_backward`` took half of the reverse passes of a kernel through an
    EfficientNet block (2.6 ms of 5.5 ms a class on the default example)."""
    a = _bind("batch_norm", args, kwargs)
    x, mean, var = a.get("input"), a.get("running_mean"), a.get("running_var")
    if a.get("training", False) or mean is None or var is None or x.ndim < 2:
        return None
    scale = torch.rsqrt(var + a.get("eps", 1e-5))
    if a.get("weight") is not None:
        scale = a["weight"] * scale
    shift = -mean * scale
    if a.get("bias") is not None:
        shift = a["bias"] + shift
    if x.ndim == 2:
        return torch.addcmul(shift, x, scale)
    out = _channels_last_affine(x, scale, shift)
    if out is not None:
        return out
    # [B, C, *S] as [B, C S] with the per-channel factors repeated over S: the backward to
    # trained factors is then a sum over the batch's rows, where the broadcast form's sum
    # over (0, 2, 3) took 3x longer (a [500, 1280, 2, 2] map: 12 against 35 ms)
    n, c, rep = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    scale, shift = (v[:, None].expand(c, rep).reshape(1, -1) for v in (scale, shift))
    return torch.addcmul(shift, x.reshape(n, c * rep), scale).reshape(x.shape)


class AffineBatchNorm(TorchFunctionMode):
    """Runs every eval-mode ``F.batch_norm`` call as the affine map it is
    (:func:`_eval_batch_norm`) and every CPU 1 x 1 convolution as a matrix product
    (:func:`_pointwise_conv`, NOTE [pointwise convolution]); every other call as it is.

    For functions that back-propagate through a frozen network many times (the exact top's
    steps, ``experimental.exact_top``): the same numbers to float rounding, and the backward
    is one product instead of ``native_batch_norm_backward`` (on the default example 40 of
    245 ms of a full-batch step of the exact top), and a matrix product instead of a
    convolution's.

    Example::

        >>> with AffineBatchNorm():
        ...     logits = top(z)  # [B, C]; top.eval()
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func is F.batch_norm:
            out = _eval_batch_norm(args, kwargs)
        elif func is F.conv2d or func is torch.conv2d:
            out = _pointwise_conv(args, kwargs)
        return func(*args, **kwargs) if out is None else out


def _bind(kind: str, args: tuple, kwargs: dict) -> dict:
    names = {
        "linear": ("input", "weight", "bias"),
        "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training",
                       "momentum", "eps"),
        "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
        "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type",
                      "scale_grad_by_freq", "sparse"),
    }[kind]  # fmt: skip
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _pair(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v)


def _per_sample(kind: str, a: dict, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{"weight": [B, *w.shape], "bias": [B, *b.shape]}``.

    ``a["roles"]`` (optional) restricts which of the two are computed; ``a["unfolded"]``
    (optional, convolutions) is the unfolded input ``[B, Cin K, L]`` (:func:`unfolded`).
    """
    u = a["input"]
    b = u.shape[0]
    want = a.get("roles", ("weight", "bias"))
    out: dict[str, torch.Tensor] = {}
    if kind == "linear":
        u2 = u.reshape(b, -1, u.shape[-1])
        g2 = g.reshape(b, -1, g.shape[-1])
        if "weight" in want:
            out["weight"] = torch.einsum("bso,bsi->boi", g2, u2)
        out["bias"] = g2.sum(1)
    elif kind in ("conv1d", "conv2d"):
        if kind == "conv1d":  # treat as a conv2d of height 1
            u, g = u.unsqueeze(2), g.unsqueeze(2)
            w_shape = a["weight"].shape
            ks = (1, w_shape[-1])
            stride, padding, dilation = (
                (1, *_pair(a.get("stride", 1), 1)),
                (0, *_pair(a.get("padding", 0), 1)),
                (1, *_pair(a.get("dilation", 1), 1)),
            )
        else:
            w_shape = a["weight"].shape
            ks = tuple(w_shape[-2:])
            stride = _pair(a.get("stride", 1), 2)
            padding = a.get("padding", 0)
            if isinstance(padding, str):
                raise Unsupported(f"string padding {padding!r}")
            padding = _pair(padding, 2)
            dilation = _pair(a.get("dilation", 1), 2)
        groups = int(a.get("groups", 1))
        cout, cin_g = w_shape[0], w_shape[1]
        if "weight" not in want:
            return {"bias": g.reshape(b, cout, -1).sum(-1)}
        unf = a.get("unfolded")  # the same for every output: callers may pass it once
        if unf is None:  # [B, Cin*K, L]
            unf = F.unfold(u, ks, dilation=dilation, padding=padding, stride=stride)
        ell = unf.shape[-1]
        unf = unf.reshape(b, groups, cin_g * ks[0] * ks[1], ell)
        g2 = g.reshape(b, groups, cout // groups, ell)
        gw = torch.einsum("bgol,bgkl->bgok", g2, unf)
        out["weight"] = gw.reshape(b, *w_shape)
        out["bias"] = g.reshape(b, cout, -1).sum(-1)
    elif kind == "embedding":  # row v of sample i's gradient: sum of g at its tokens v
        ids, (v, d) = u.reshape(b, -1).long(), a["weight"].shape
        g2 = embedding_grads(a, g).reshape(b, -1, d)
        out["weight"] = g2.new_zeros(b, v, d).scatter_add_(1, ids[..., None].expand_as(g2), g2)
    elif kind == "batch_norm":
        xhat = a["xhat"] if "xhat" in a else normalized(kind, a)
        red = tuple(range(2, u.ndim))
        out["weight"] = (g * xhat).sum(red) if red else g * xhat
        out["bias"] = g.sum(red) if red else g
    elif kind == "layer_norm":
        xhat = a["xhat"] if "xhat" in a else normalized(kind, a)
        lead = tuple(range(1, u.ndim - len(a["normalized_shape"])))
        out["weight"] = (g * xhat).sum(lead) if lead else g * xhat
        out["bias"] = g.sum(lead) if lead else g
    return out


def embedding_grads(a: dict, g: torch.Tensor) -> torch.Tensor:
    """An embedding call's output gradient ``g`` ``[..., d]`` with the positions of its
    ``padding_idx`` zeroed: autograd never accumulates a gradient into that row."""
    pad = a.get("padding_idx")
    if pad is None:
        return g
    if pad < 0:
        pad += a["weight"].shape[0]
    return g * a["input"].ne(pad).unsqueeze(-1).to(g.dtype)


def normalized(kind: str, a: dict) -> torch.Tensor | None:
    """The normalized input ``x_hat`` of a batch norm (eval) or layer norm call, else None."""
    u = a["input"]
    if kind == "batch_norm":
        if a.get("training", False):
            raise Unsupported("batch norm in training mode")
        shape = (1, -1) + (1,) * (u.ndim - 2)
        return (u - a["running_mean"].reshape(shape)) * torch.rsqrt(
            a["running_var"].reshape(shape) + a.get("eps", 1e-5)
        )
    if kind == "layer_norm":
        dims = tuple(range(u.ndim - len(tuple(a["normalized_shape"])), u.ndim))
        mean = u.mean(dims, keepdim=True)
        var = u.var(dims, unbiased=False, keepdim=True)
        return (u - mean) * torch.rsqrt(var + a.get("eps", 1e-5))
    return None


def shared_inputs(kind: str, a: dict, roles) -> dict[str, torch.Tensor]:
    """What :func:`_per_sample` derives from a call's input alone, computed once for the C
    outputs' passes: ``{"unfolded": im2col}`` (convolutions) or ``{"xhat": ...}`` (norms);
    nothing when the weight is frozen (a bias needs neither)."""
    if "weight" not in roles:
        return {}
    unf = unfolded(kind, a)
    if unf is not None:
        return {"unfolded": unf}
    xhat = normalized(kind, a)
    return {} if xhat is None else {"xhat": xhat}


def unfolded(kind: str, a: dict) -> torch.Tensor | None:
    """The unfolded input (im2col) ``[B, Cin K, L]`` of a convolution call, else None."""
    if kind not in ("conv1d", "conv2d") or isinstance(a.get("padding", 0), str):
        return None
    u, w_shape = a["input"], a["weight"].shape
    if kind == "conv1d":
        return F.unfold(
            u.unsqueeze(2), (1, w_shape[-1]),
            dilation=(1, *_pair(a.get("dilation", 1), 1)),
            padding=(0, *_pair(a.get("padding", 0), 1)),
            stride=(1, *_pair(a.get("stride", 1), 1)),
        )  # fmt: skip
    return F.unfold(
        u, tuple(w_shape[-2:]), dilation=_pair(a.get("dilation", 1), 2),
        padding=_pair(a.get("padding", 0), 2), stride=_pair(a.get("stride", 1), 2),
    )  # fmt: skip


def capture_calls(call, w0: dict[str, torch.Tensor], names: list[str], x):
    """Forward pass under capture: ``(logits, calls, roles)`` (see module docstring)."""
    w = {n: w0[n].detach().requires_grad_(True) for n in names}
    ids = {id(t): n for n, t in w.items()}
    cap = _Capture(ids)
    with cap:
        logits = call(w, x)
    if cap.error:
        raise Unsupported(cap.error)
    twice = [n for n, k in cap.uses.items() if k > 1]
    if twice:
        raise Unsupported(f"trainable weight {twice[0]!r} is used more than once")
    missing = [n for n in names if n not in cap.uses]
    if missing:
        raise Unsupported(f"trainable weight {missing[0]!r} is not used by a covered op")
    b = logits.shape[0] if logits.ndim else None
    for (_, _, out), name in zip(cap.calls, _call_names(cap.calls, ids)):
        if name is not None and (out.ndim == 0 or out.shape[0] != b):
            raise Unsupported(_not_batched(name, out, b))
    roles = []
    for _, a, _ in cap.calls:
        r = {}
        for role in ("weight", "bias"):
            t = a.get(role)
            if isinstance(t, torch.Tensor) and id(t) in ids:
                r[role] = ids[id(t)]
        other = [k for k, v in a.items() if k not in ("weight", "bias", "input")
                 and isinstance(v, torch.Tensor) and id(v) in ids]  # fmt: skip
        if other or (isinstance(a.get("input"), torch.Tensor) and id(a["input"]) in ids):
            raise Unsupported("a trainable weight is used as a layer input")
        roles.append(r)
    return logits, cap.calls, roles


def _call_names(calls: list, ids: dict[int, str]) -> list[str | None]:
    """The trainable weight (or bias) name of each captured call, or None."""
    names = []
    for _, a, _ in calls:
        found = [ids[id(a[r])] for r in ("weight", "bias")
                 if isinstance(a.get(r), torch.Tensor) and id(a[r]) in ids]  # fmt: skip
        names.append(found[0] if found else None)
    return names


def _not_batched(name: str, out: torch.Tensor, b: int | None) -> str:
    return (
        f"trainable weight {name!r} is used on a tensor whose first dimension is not the "
        f"batch of samples (output {tuple(out.shape)}, batch {b}): e.g. position ids [1, S] "
        "broadcast across samples, or a sequence-first layout; its per-sample gradients "
        "cannot be read from the layer's output gradient"
    )


def covered_names(call, w0: dict[str, torch.Tensor], names: list[str], x) -> list[str]:
    """The trainable weights (of ``names``, in order) that :func:`capture_calls` covers:
    used exactly once, by a covered call, as its weight or bias — whatever the others do.

    One forward pass of ``x`` (two samples or more: with one, a call on a tensor broadcast
    across samples looks batched). The others (weights used by uncovered ops, more than
    once, or on tensors without the batch dimension first) need another Jacobian strategy.
    """
    w = {n: w0[n].detach().requires_grad_(True) for n in names}
    ids = {id(t): n for n, t in w.items()}
    cap = _Capture(ids)
    with torch.enable_grad(), cap:
        logits = call(w, x)
    bad = set(cap.uncovered) | {n for n, k in cap.uses.items() if k > 1}
    b = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.ndim else None
    for (_, _, out), name in zip(cap.calls, _call_names(cap.calls, ids)):
        if name is not None and (out.ndim == 0 or out.shape[0] != b):
            bad.add(name)  # not batched like the samples: see _not_batched
    for _, a, _ in cap.calls:
        bad.update(ids[id(v)] for k, v in a.items() if k not in ("weight", "bias")
                   and isinstance(v, torch.Tensor) and id(v) in ids)  # fmt: skip
    return [n for n in names if n in cap.uses and n not in bad]


def _detached(a: dict) -> dict:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def structured_jacobian(call, w0: dict[str, torch.Tensor], names: list[str], x, *,
                        outputs: int | None = None) -> dict:
    """``{name: [B, C, numel]}`` for the trainable weights ``names`` (see module docstring).

    Args:
      call: ``call(w, x) -> logits [B, C]`` (the functional model).
      w0: the weights, by name.
      names: trainable weight names (all must be covered).
      outputs: only the first this many outputs (``[B, outputs, numel]``; e.g. 1 to check
        that the mode covers a model, which does not depend on the output).

    Raises:
      Unsupported: a trainable weight is used by an uncovered op, or more than once.
    """
    with torch.enable_grad():
        logits, calls, roles = capture_calls(call, w0, names, x)
        outs = [out for _, _, out in calls]
        b, c = logits.shape
        c = c if outputs is None else min(c, outputs)
        # Filled class by class (no list of C copies to stack: half the peak memory).
        result = {
            n: torch.empty(b, c, w0[n].numel(), dtype=logits.dtype, device=logits.device)
            for n in names
        }
        # each call's arguments, detached, with what its input alone gives (computed once)
        args = [
            {**_detached(a), **shared_inputs(kind, _detached(a), r), "roles": tuple(r)} if r else {}
            for (kind, a, _), r in zip(calls, roles)
        ]
        for cls in range(c):
            grads = torch.autograd.grad(
                logits[:, cls].sum(), outs, retain_graph=cls < c - 1, allow_unused=True
            )
            for (kind, _, out), r, a, g in zip(calls, roles, args, grads):
                if not r:
                    continue
                g = torch.zeros_like(out) if g is None else g.detach()
                ps = _per_sample(kind, a, g)
                for role, name in r.items():
                    result[name][:, cls] = ps[role].reshape(b, -1)
    return result


def _outer_factors(kind: str, a: dict, g: torch.Tensor):
    """``(g [B, S, o], u [B, S, i])`` with per-sample gradient ``sum_s g_s u_s^T``, or None."""
    u = _outer_inputs(kind, a)
    return None if u is None else (_outer_grads(kind, a, g), u)


def _outer_inputs(kind: str, a: dict) -> torch.Tensor | None:
    """The ``u [B, S, i]`` of :func:`_outer_factors` (a view of the unfolded input)."""
    u = a["input"]
    if kind == "linear":
        return u.reshape(u.shape[0], -1, u.shape[-1])
    if kind in ("conv1d", "conv2d") and int(a.get("groups", 1)) == 1:
        unf = a.get("unfolded")  # [B, i, L], when the caller unfolded it once
        if unf is None:
            unf = unfolded(kind, a)
        return None if unf is None else unf.transpose(1, 2)
    return None


def _outer_grads(kind: str, a: dict, g: torch.Tensor) -> torch.Tensor:
    """The ``g [B, S, o]`` of :func:`_outer_factors` (a view)."""
    if kind == "linear":
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.reshape(g.shape[0], a["weight"].shape[0], -1).transpose(1, 2)


def _count_sketch(v: torch.Tensor, h: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(*v.shape[:-1], k, dtype=v.dtype, device=v.device)
    return out.index_add_(-1, h, v * s.to(v.dtype))


def structured_projected(call, w0: dict[str, torch.Tensor], names: list[str], x, projector,
                         *, jw0: bool = True):
    """Projected per-sample Jacobians ``J(x_i) R`` ``[B, C, k]`` without forming ``J``.

    Weights of linear layers and ungrouped convolutions with a factorized (tensor sketch)
    hash are sketched from the layer input and output gradient by FFT (NOTE [tensor
    sketch] in projection.py); every other weight from its per-sample gradient. Returns
    ``(phi [B, C, k], logits [B, C], jw0 [B, C])`` with ``jw0 = J(x_i) w0`` (NaN with
    ``jw0=False``: not computed).
    """
    k = projector.k
    with torch.enable_grad():
        logits, calls, roles = capture_calls(call, w0, names, x)
        outs = [out for _, _, out in calls]
        b, c = logits.shape
        phi = torch.zeros(b, c, k, dtype=logits.dtype, device=logits.device)
        dots = torch.zeros(b, c, dtype=logits.dtype, device=logits.device)  # J w0
        # (positions, rfft of their input sketch) per layer, shared by the classes; likewise
        # the layers' (unfolded) inputs
        u_hat: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        inputs: dict[int, dict[str, torch.Tensor]] = {}
        for cls in range(c):
            grads = torch.autograd.grad(
                logits[:, cls].sum(), outs, retain_graph=cls < c - 1, allow_unused=True
            )
            acc = torch.zeros(b, k, dtype=logits.dtype, device=logits.device)
            for j, ((kind, a, out), r, g) in enumerate(zip(calls, roles, grads)):
                if not r:
                    continue
                g = torch.zeros_like(out) if g is None else g.detach()
                a = _detached(a)
                if jw0:
                    dots[:, cls] += _dot_w0(kind, a, out.detach(), g, r)
                rest = dict(r)
                wname = r.get("weight")
                if j not in inputs:  # e.g. unfold a convolution's input once, not C times
                    inputs[j] = _chunk_inputs(kind, a, r, projector)
                a = {**a, **inputs[j]}
                if "signed_unfolded" in a:  # NOTE [depthwise sketch]
                    acc.index_add_(1, a["buckets"], _depthwise_sketch_values(a, g))
                    del rest["weight"]
                if wname is not None and projector.factored(wname):
                    uf = _outer_inputs(kind, a)
                    if uf is not None:
                        gf = _outer_grads(kind, a, g)
                        h1, s1, h2, s2 = projector.factors(wname, gf.device)
                        # positions this output's gradient reaches (e.g. token 0 only
                        # after a transformer's last attention): the others add nothing.
                        # Once every position is sketched (a convolution's map), all are
                        # taken: a dead one adds exact zeros, and the test costs as much as
                        # the sketch (amax and amin: 8.8 of 114 s on the default example)
                        full = j in u_hat and bool(u_hat[j][0].all())
                        live = (u_hat[j][0] if full
                                else gf.amax((0, 2)).ne(0) | gf.amin((0, 2)).ne(0))  # [S]
                        if j not in u_hat or bool((live & ~u_hat[j][0]).any()):
                            keep = live if j not in u_hat else live | u_hat[j][0]
                            sk = _count_sketch(uf[:, keep], h2, s2, k)
                            u_hat[j] = (keep, torch.fft.rfft(sk, n=k))
                        keep, uh = u_hat[j]
                        if full:
                            g_hat = torch.fft.rfft(_count_sketch(gf, h1, s1, k), n=k)
                            acc += torch.fft.irfft((g_hat * uh).sum(1), n=k)
                        elif bool(live.any()):
                            g_hat = torch.fft.rfft(_count_sketch(gf[:, live], h1, s1, k), n=k)
                            acc += torch.fft.irfft((g_hat * uh[:, live[keep]]).sum(1), n=k)
                        del rest["weight"]
                if rest:
                    ps = _per_sample(kind, {**a, "roles": tuple(rest)}, g)
                    for role, name in rest.items():
                        projector.project_block(name, ps[role].reshape(b, -1), acc)
            phi[:, cls] = acc
    if not jw0:
        dots.fill_(math.nan)
    return phi, logits.detach(), dots


# NOTE [depthwise sketch]
# A depthwise convolution's weight (groups = input channels, [C, 1, kh, kw]) has per-sample
# gradient gw[c, t] = sum_l g[c, l] U[c, t, l] (U its unfolded input, t a tap, l an output
# position), which is not an outer product, so it is count-sketched entry by entry:
# out[h(c, t)] += s(c, t) gw[c, t]. Where the map is small (L <= DEPTHWISE_SKETCH_POSITIONS,
# e.g. the 2 x 2 map of EfficientNet-Lite0's last block at 64 px), the signs s are folded into
# U once per chunk, stored [B, L, C K], and each output's pass forms s * gw as L fused
# multiply-adds over [B, C K] and scatters it: no einsum over B C tiny matrices and no
# multiplication by the signs per pass (benchmarks/RESULTS.md "exact-top-layout"). The same
# sum in another order (float rounding); larger maps keep the einsum.
DEPTHWISE_SKETCH_POSITIONS = 16


def _chunk_inputs(kind: str, a: dict, roles: dict, projector) -> dict[str, torch.Tensor]:
    """What a call's projected per-sample terms derive from its input alone, once a chunk:
    a depthwise convolution's signed unfold and buckets (NOTE [depthwise sketch]), else
    :func:`shared_inputs`."""
    dw = _signed_depthwise_unfold(kind, a, roles, projector)
    if dw is None:
        return shared_inputs(kind, a, roles)
    return {"signed_unfolded": dw[0], "buckets": dw[1]}


def _signed_depthwise_unfold(kind: str, a: dict, roles: dict, projector):
    """``(s ∘ U [B, L, C K], buckets [C K])`` for a depthwise convolution whose weight is
    trained and count-sketched, on a map of at most DEPTHWISE_SKETCH_POSITIONS positions;
    else None (NOTE [depthwise sketch])."""
    wname, w = roles.get("weight"), a.get("weight")
    if (kind != "conv2d" or wname is None or not isinstance(w, torch.Tensor)
            or w.shape[1] != 1 or int(a.get("groups", 1)) != w.shape[0]):  # fmt: skip
        return None
    unf = unfolded(kind, a)  # [B, C K, L]
    if unf is None or unf.shape[-1] > DEPTHWISE_SKETCH_POSITIONS:
        return None
    got = projector.sparse_block(wname, unf.device, unf.dtype)
    if got is None:
        return None
    buckets, signs = got
    return (unf * signs[:, None]).transpose(1, 2).contiguous(), buckets


def _depthwise_sketch_values(a: dict, g: torch.Tensor) -> torch.Tensor:
    """``s ∘ gw`` ``[B, C K]`` of a depthwise convolution from its output gradient ``g``
    ``[B, C, *map]`` (NOTE [depthwise sketch])."""
    su = a["signed_unfolded"]  # [B, L, C K]
    b, ell, ck = su.shape
    gl = g.reshape(b, g.shape[1], ell).transpose(1, 2)  # [B, L, C] (a view if channels-last)
    taps = ck // g.shape[1]
    out = su[:, 0].reshape(b, -1, taps) * gl[:, 0, :, None]
    for pos in range(1, ell):
        out.addcmul_(su[:, pos].reshape(b, -1, taps), gl[:, pos, :, None])
    return out.reshape(b, ck)


def _bias_shape(kind: str, out: torch.Tensor, bias: torch.Tensor) -> tuple[int, ...]:
    if kind in ("conv1d", "conv2d", "batch_norm"):
        return (1, -1) + (1,) * (out.ndim - 2)
    return tuple(bias.shape)  # linear: last dim; layer norm: the normalized shape


def _dot_w0(kind: str, a: dict, out: torch.Tensor, g: torch.Tensor, roles: dict) -> torch.Tensor:
    """``<df/dw, w0>`` per sample for this call's trainable weights, ``[B]``.

    Every covered op is affine in its weight and bias: ``out = A(w) + b`` with ``A``
    linear, so ``<g, A(w0)> = <g, out - b>`` and ``<g, b>`` need no Jacobian (Euler's
    identity for linear maps).
    """
    if kind == "embedding":
        g = embedding_grads(a, g)
    bias = a.get("bias")
    part = out
    if bias is not None:
        b_full = bias.reshape(_bias_shape(kind, out, bias))
        if "weight" not in roles:
            part = b_full.expand_as(out)
        elif "bias" not in roles:
            part = out - b_full
    elif "weight" not in roles:
        return torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
    return (g * part).reshape(out.shape[0], -1).sum(1)

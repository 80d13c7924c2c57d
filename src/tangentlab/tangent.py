"""The ``Tangent`` model: the linearization of a network around its pre-trained weights w0.

.. math::

    f_w(x) \\approx f_0(x) + J(x)\\,(w - w_0), \\qquad J(x) = \\partial f / \\partial w |_{w_0}
    \\quad [C \\times P]

Everything is computed with ``torch.func`` (``functional_call``, ``vmap``, ``jacrev``,
``jvp``, ``vjp``) on the selected trainable weights; the caller's weights are never changed.

NOTE [eval mode]. The tangent model is taken in ``eval()`` mode: batch-norm running
statistics frozen, dropout off (DESIGN.md §2). A model that arrives in training mode is
switched to eval (in place) with a :class:`~tangentlab.errors.ModeSwitchWarning`.

NOTE [jacobian modes]. Four strategies give the same ``[B, C, P]`` Jacobians:

- ``structured``: one forward and C reverse passes of the whole chunk; per-sample
  gradients from layer inputs and output gradients (tangentlab.structured) — covers
  weights used by linear, convolution, eval batch-norm and layer-norm calls. ``gram`` is
  the same capture used by exact kernels without any Jacobian: ``compute_kernel``
  contracts layer inputs and output gradients directly (tangentlab.gram); with ``auto``
  every exact kernel of a covered model takes it (no timing: it does the structured
  mode's passes and never forms ``[B, C, P]``). A model covered in part is split: the
  gram path for the covered weights, Jacobians (``auto``) for the others, Theta the sum
  of both (:meth:`Tangent.restricted`). Asked for Jacobians, ``gram`` is ``structured``;
- ``vmap``: ``vmap(jacrev(f))`` over samples — one call, best for MLPs/transformers;
- ``loop-jacrev``: a Python loop over samples, ``jacrev`` (vmap over the C outputs only);
- ``loop-vjp``: a loop over samples and outputs, one reverse pass each with a retained
  graph — no vmap at all.
On CPU, per-sample weight gradients of convolutions under ``vmap`` become grouped
convolutions, which are several times slower than a loop over samples (EfficientNet-Lite0:
measured in benchmarks/RESULTS.md). ``auto`` times the three on the first chunk (a
warm-up call, then up to 4 samples) and keeps the fastest; ``structured`` is a
candidate only when it covers every trainable weight. All four agree with float64 to ~1e-6
in float32, except at activation kinks (NOTE [float32 and activation kinks] in
tangentlab.structured).

NOTE [vmap fallback]. Per-sample Jacobians use ``vmap(jacrev(f))``. Models that ``vmap``
cannot trace (``.item()``, data-dependent control flow, in-place ops on inputs, random
ops) fall back to a per-sample autograd loop, announced with a
:class:`~tangentlab.errors.VmapFallbackWarning`; results are identical, only slower.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from tangentlab.data import Inputs, num_rows, take, to_device
from tangentlab.errors import (
    ModeSwitchWarning,
    TangentlabError,
    TangentlabWarning,
    VmapFallbackWarning,
)
from tangentlab.gram import Factors, factor_elements, gram_factors
from tangentlab.memory import activation_elements
from tangentlab.projection import Projection, Projector, as_projection
from tangentlab.structured import (
    Unsupported,
    capture_calls,
    covered_names,
    structured_jacobian,
    structured_projected,
)

ParamSpec = str | Sequence[str] | None


class JacobianMode(enum.StrEnum):
    """How per-sample Jacobians are computed (NOTE [jacobian modes])."""

    AUTO = "auto"
    STRUCTURED = "structured"
    GRAM = "gram"
    VMAP = "vmap"
    LOOP_JACREV = "loop-jacrev"
    LOOP_VJP = "loop-vjp"


def _row(x: Inputs, i: int) -> Inputs:
    return {k: v[i] for k, v in x.items()} if isinstance(x, Mapping) else x[i]


def select_params(model: nn.Module, params: ParamSpec) -> list[str]:
    """Names of the trainable weights, in ``model.named_parameters()`` order.

    Args:
      params: ``None`` (every parameter with ``requires_grad``), a regular expression
        searched in each parameter name (e.g. ``r"^(_blocks\\.15|_fc)\\."``), or a list of
        names / regular expressions (each fully matched against the names).
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if not named:
        raise TangentlabError("Tangent: the model has no parameters.")
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
        if not chosen:
            raise TangentlabError(
                "Tangent: no parameter of the model has requires_grad=True; pass params=... "
                "to choose the trainable weights."
            )
        return chosen
    if isinstance(params, str):
        try:
            rx = re.compile(params)
        except re.error as exc:
            msg = f"Tangent: params={params!r} is not a valid regex ({exc})."
            raise TangentlabError(msg) from None
        chosen = [n for n, _ in named if rx.search(n)]
    else:
        pats = list(params)
        try:
            rxs = [re.compile(p) for p in pats]
        except re.error as exc:
            msg = f"Tangent: params={pats!r} holds an invalid regex ({exc})."
            raise TangentlabError(msg) from None
        chosen = [
            n for n, _ in named if any(n == p or rx.fullmatch(n) for p, rx in zip(pats, rxs))
        ]
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise TangentlabError(
            f"Tangent: params={params!r} selects no parameter. Parameter names look like: "
            f"{sample}, ... ({len(named)} in all; list them with model.named_parameters())."
        )
    return chosen


def _logits(out: object, where: str) -> torch.Tensor:
    """Extract the ``[batch, C]`` logits from a model's output (tensor, HF ModelOutput, dict)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise TangentlabError(
        f"{where}: the model returned {type(out).__name__}; expected a tensor [batch, C] or an "
        "output with a .logits tensor. Wrap the model so that forward returns the logits."
    )


def _ensure_eval(model: nn.Module) -> None:
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        model.eval()
        warnings.warn(
            f"Tangent: switched the model to eval mode (batch-norm statistics frozen, dropout "
            f"off), as the tangent model requires; {len(training)} modules were in training "
            "mode. Call model.train() afterwards to restore it.",
            ModeSwitchWarning,
            stacklevel=3,
        )


class Tangent:
    """The tangent model of ``model`` at its current weights ``w0``.

    Args:
      model: a ``torch.nn.Module`` whose forward takes a tensor batch ``[B, ...]`` (or keyword
        tensors ``[B, L]`` such as Hugging Face ``input_ids``/``attention_mask``) and
        returns logits ``[B, C]`` (a tensor or an output with ``.logits``). Switched to eval
        mode (NOTE [eval mode]).
      params: which weights are trainable (see :func:`select_params`); all by default.
      projection: ``None`` (exact Jacobians), ``k`` or a :class:`~tangentlab.Projection`.
      seed: seed of the projection when ``projection`` is an int.
      jacobian_mode: ``"auto"`` (default: time the strategies on the first chunk and keep
        the fastest; exact kernels of covered models: ``"gram"``), ``"structured"``,
        ``"gram"``, ``"vmap"``, ``"loop-jacrev"`` or ``"loop-vjp"`` (NOTE [jacobian modes]).

    Example::

        >>> t = Tangent(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
        >>> x = torch.randn(5, 4)                   # [B, ...]
        >>> t.f0(x).shape, t.jacobian(x).shape      # [B, C], [B, C, P]
        (torch.Size([5, 3]), torch.Size([5, 3, 67]))
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        projection: int | Projection | None = None,
        seed: int = 0,
        *,
        jacobian_mode: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TangentlabError(
                f"Tangent: model must be a torch.nn.Module, got {type(model).__name__}."
            )
        _ensure_eval(model)
        self.model = model
        self.param_names = select_params(model, params)
        named = dict(model.named_parameters())
        self.w0 = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.w0}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        self.projection = as_projection(projection, seed=seed)
        self.numels = {n: self.w0[n].numel() for n in self.param_names}
        shapes = {n: tuple(self.w0[n].shape) for n in self.param_names}
        self.projector = (
            Projector(self.projection, self.numels, shapes) if self.projection else None
        )
        self.jacobian_mode = JacobianMode(jacobian_mode)
        self.mode_timings: float | None = None
        self.use_forward_ad = True
        self.params_spec = params
        self.output_probes: torch.Tensor | None = None  # see probed()
        self.needs_jw0 = True  # False: projected chunks skip J w0 (NaN), see without_jw0()
        config = getattr(model, "config", None)
        self._hf_encoder = bool(
            config is not None
            and hasattr(config, "model_type")
            and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "is_decoder", False)
        )

    # ---- sizes and provenance ----------------------------------------------------------
    @property
    def num_params(self) -> int:
        """P, the number of trainable weights."""
        return sum(self.numels.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.w0.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.w0.values())).dtype

    def to(self, device: torch.device | str) -> Tangent:
        """Move the weights used by the tangent model (not the caller's module) to ``device``."""
        self.w0 = {n: w.to(device) for n, w in self.w0.items()}
        self.frozen = {n: w.to(device) for n, w in self.frozen.items()}
        return self

    def weights_hash(self) -> str:
        """sha256 of every parameter and buffer value (trainable and frozen) and their names."""
        h = hashlib.sha256()
        for name, t in sorted({**self.w0, **self.frozen}.items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
        return h.hexdigest()[:32]

    def w0_norm(self) -> float:
        """‖w0‖, the Euclidean norm of the selected (trainable) pre-trained weights."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.w0.values()))

    def params_hash(self) -> str:
        return hashlib.sha256("\n".join(self.param_names).encode()).hexdigest()[:16]

    # ---- the network as a function of its trainable weights -----------------------------
    def _call(self, w: dict[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        pb = {**self.frozen, **w}
        if isinstance(x, Mapping):
            x = dict(x)
            mask = x.get("attention_mask")
            if self._hf_encoder and mask is not None and mask.ndim == 2:
                # NOTE [Hugging Face masks]: an additive [B, 1, 1, L] mask is used as-is by
                # BERT-like encoders, while a [B, L] mask goes through an "all ones?" check
                # that vmap cannot trace. Same logits either way.
                neg = torch.finfo(self.dtype).min
                x["attention_mask"] = (1.0 - mask[:, None, None, :].to(self.dtype)) * neg
            out = functional_call(self.model, pb, args=(), kwargs=x)
        else:
            out = functional_call(self.model, pb, (x,))
        logits = _logits(out, "Tangent")
        if self.output_probes is not None:
            logits = logits @ self.output_probes.to(logits)  # [B, C] @ [C, S] -> [B, S]
        return logits

    def probed(self, probes: torch.Tensor) -> Tangent:
        """The tangent model of the probed outputs ``f(x)^T V`` (``V`` = ``probes`` ``[C, S]``).

        A shallow copy sharing the weights, projection and Jacobian strategy settings,
        whose outputs (``f0``, Jacobians, projected Jacobians) are ``[B, S]`` instead of
        ``[B, C]``: every Jacobian strategy computes ``V^T J(x_i)`` ``[S, P]`` with S
        backward passes instead of C. Used for trace kernels (NOTE [trace kernel] in
        tangentlab.compute). Probing a probed Tangent composes: its outputs are
        ``f(x)^T V1 V2``.
        """
        out = copy.copy(self)
        probes = probes.detach()
        if self.output_probes is not None:  # e.g. a trace kernel of read-out directions
            if probes.shape[0] != self.output_probes.shape[1]:
                raise TangentlabError(
                    f"Tangent.probed: probes must have {self.output_probes.shape[1]} rows (the "
                    f"outputs of this probed Tangent), got {tuple(probes.shape)}."
                )
            probes = self.output_probes @ probes.to(self.output_probes)
        out.output_probes = probes
        return out

    def without_jw0(self) -> Tangent:
        """A shallow copy (as :meth:`probed`) whose projected chunks do not compute
        ``J w0``: its :meth:`projected_chunk` returns it as NaN. For callers that never use
        it, e.g. the exact top's read-out kernels, where it cost a tenth to a fifth of the
        kernel's seconds (benchmarks/RESULTS.md "exact-top-pointwise")."""
        out = copy.copy(self)
        out.needs_jw0 = False
        return out

    def _call_one(self, w: dict[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """f(w, x) for ONE sample without batch dimension -> ``[C]`` (for vmap)."""
        if isinstance(x, Mapping):
            xb = {k: v.unsqueeze(0) for k, v in x.items()}
        else:
            xb = x.unsqueeze(0)
        return self._call(w, xb)[0]

    def f0(self, x: Inputs) -> torch.Tensor:
        """Outputs of the pre-trained network ``f0(x)`` ``[B, C]`` (checked: 2-D and finite)."""
        x = to_device(x, self.device)
        with torch.no_grad():
            out = self._call(self.w0, x)
        check_output(out, num_rows(x), "Tangent.f0")
        return out

    # ---- checks before the expensive part ------------------------------------------------
    def preflight(
        self, x: Inputs, *, seed: int = 0, where: str = "Tangent.preflight"
    ) -> Preflight:
        """Cheap checks that the model has a tangent model worth computing; raises if not.

        On the first (at most 4) samples of ``x``: one forward and one reverse pass of that
        batch, and one forward pass of its first sample alone — call it before an expensive
        kernel or fine-tuning run. Raises :class:`~tangentlab.errors.TangentlabError` (one
        line that says the fix) when:

        - the model is back in training mode (NOTE [eval mode]);
        - the outputs are not ``[batch, C]`` or not finite (:func:`check_output`);
        - the model mixes samples across the batch (e.g. ``x - x.mean(0)``, statistics of
          the batch): ``f0`` of sample 0 alone differs from ``f0`` of sample 0 in
          the batch by more than ``sqrt(eps)`` of the weights' dtype (3.5e-4 in float32,
          1.5e-8 in float64; round-off of batched convolutions is ~1e-6 in float32),
          relative to the largest output. Needs ``B >= 2``; skipped for one sample;
        - the selected trainable weights do not affect the outputs: the gradient of a
          random combination of the outputs,

          .. math:: \\nabla_w \\sum_i u_i^T f_w(x_i) = \\sum_i J(x_i)^T u_i,
              \\qquad u_i \\sim \\mathcal N(0, I_C),

          is exactly zero for every selected tensor, so the Jacobians and the kernel would
          be zero (a ``params=`` that selects unused or detached weights); or it is not
          finite. The message names the model's parameters that do affect the outputs.

        Selected tensors whose gradient alone is exactly zero while others' is not (weights
        that do not affect the outputs on these samples) are listed in a
        :class:`~tangentlab.errors.TangentlabWarning`.

        Args:
          x: inputs ``[B, ...]`` (or a dict of ``[B, L]`` tensors); only the first 4
            samples are used.
          seed: seed of the random output combination ``u``.
          where: the name that starts the error messages (the public caller's, e.g.
            ``"compute_kernel"``).

        Returns:
          a :class:`Preflight` with the measured batch difference and the zero-gradient
          tensors.
        """
        t0 = time.perf_counter()
        m = min(num_rows(x), 4)
        if m < 1:
            raise TangentlabError(f"{where}: x holds no sample; pass at least 2.")
        self._check_eval_mode(where)
        xs = to_device(take(x, slice(0, m)), self.device)
        # plain autograd of a scalar, not torch.func.vjp nor grad_outputs=: both import
        # torch._dynamo and/or sympy (~35-65 MB resident) in a fresh process
        w = {n: t.detach().requires_grad_() for n, t in self.w0.items()}
        with torch.enable_grad():
            out = self._call(w, xs)
        check_output(out.detach(), m, where)
        diff, tol = self._batch_difference(xs, out.detach(), m, where)
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn(tuple(out.shape), generator=gen, dtype=torch.float64)
        g = (torch.autograd.grad((out * u.to(out)).sum(), list(w.values()), allow_unused=True,
                                 materialize_grads=True) if out.requires_grad
             else [torch.zeros_like(v) for v in w.values()])  # fmt: skip
        grads = dict(zip(w, g))
        zero = self._zero_gradients(grads, xs, m, where)
        return Preflight(m, diff, tol, tuple(zero), time.perf_counter() - t0, out.detach())

    def _check_eval_mode(self, where: str) -> None:
        """Preflight: no module in training mode (NOTE [eval mode])."""
        training = [(n or "<root>", mod) for n, mod in self.model.named_modules() if mod.training]
        if training:
            stateful = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
            shown = [f"{n} ({type(mod).__name__})" for n, mod in training
                     if isinstance(mod, stateful)] or [n for n, _ in training]  # fmt: skip
            raise TangentlabError(
                f"{where}: {len(training)} modules of the model are in training "
                f"mode (e.g. {_names(shown)}; model.train() after the Tangent was made?); "
                "the tangent model needs eval mode (batch-norm statistics frozen, dropout "
                "off, DESIGN.md §2). Call model.eval() first."
            )

    def _batch_difference(self, xs: Inputs, out: torch.Tensor, m: int, where: str):
        """Preflight: f0 of sample 0 alone against sample 0 in the batch; (diff, tol).
        A probed Tangent checks the model's own outputs: probed ones can vanish at w0
        (features inside span Q read beside it: round-off only), and the per-sample
        property is the model's."""
        if self.output_probes is not None and m >= 2:
            raw = copy.copy(self)
            raw.output_probes = None
            with torch.no_grad():
                return raw._batch_difference(xs, raw._call(self.w0, xs), m, where)
        tol = torch.finfo(out.dtype).eps ** 0.5
        diff = None
        if m >= 2:
            with torch.no_grad():
                alone = self._call(self.w0, take(xs, slice(0, 1)))
            check_output(alone, 1, where)  # e.g. a squeeze() that drops the batch of one
            scale = max(float(out.detach().abs().max()), torch.finfo(out.dtype).tiny)
            diff = float((alone[0] - out[0].detach()).abs().max()) / scale
            if not diff <= tol:
                raise TangentlabError(
                    f"{where}: the model's outputs depend on the other samples of "
                    f"the batch: f0 of sample 0 alone differs from f0 of sample 0 in a batch "
                    f"of {m} by {diff:.2g} (relative to the largest output; expected round-off "
                    f"below {tol:.2g} in {str(out.dtype).removeprefix('torch.')}). The "
                    "tangent model needs per-sample outputs (DESIGN.md §2): keep batch norm "
                    "in eval mode (frozen statistics; not model.train()) and remove "
                    "operations across the batch dimension (e.g. x - x.mean(0))."
                )
        return diff, tol

    def _zero_gradients(self, grads: dict, xs: Inputs, m: int, where: str) -> list[str]:
        """Preflight: refuse non-finite or all-zero gradients; warn on some zero tensors."""
        bad = [n for n in self.param_names if not bool(torch.isfinite(grads[n]).all())]
        if bad:
            raise TangentlabError(
                f"{where}: the gradient of the outputs with respect to {bad[0]!r}"
                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} is not finite "
                "(NaN or inf) on these samples, so the Jacobians would be too. Check for "
                "non-differentiable points (sqrt/norm of 0, log of 0) in the forward pass."
            )
        zero = [n for n in self.param_names if not bool(grads[n].ne(0).any())]
        if len(zero) == len(self.param_names):
            raise TangentlabError(
                f"{where}: the trainable weights selected by params="
                f"{self.params_spec!r} ({_names(zero)}) do not affect the outputs: the "
                f"gradient of a random combination of the outputs on {m} samples is exactly "
                "zero for all of them, so the Jacobians and the kernel would be zero. "
                f"{self._affecting(xs)} Select weights that the forward pass uses (and does "
                "not detach) with params=... (list them with model.named_parameters())."
            )
        if zero:
            warnings.warn(
                f"{where}: {len(zero)} of the {len(self.param_names)} selected "
                f"weight tensors do not affect the outputs on {m} sample{'s' * (m > 1)} "
                f"(their gradient is exactly zero): {_names(zero)}. They add nothing to the "
                "kernel; leave them out of params=... unless that is expected (e.g. ReLU "
                "units dead on these samples).",
                TangentlabWarning,
                stacklevel=2,
            )
        return zero

    def _affecting(self, xs: Inputs) -> str:
        """One sentence naming the model's parameters that do affect the outputs on ``xs``."""
        weights = {**self.frozen, **self.w0}  # on the tangent model's device
        named = {
            n: weights[n] for n, p in self.model.named_parameters() if p.is_floating_point()
        }
        out, pull = vjp(lambda w: self._call(w, xs), named)
        gen = torch.Generator().manual_seed(1)
        (grads,) = pull(torch.randn(tuple(out.shape), generator=gen, dtype=torch.float64).to(out))
        live = [n for n in named if bool(grads[n].ne(0).any())]
        if not live:
            return (
                "No parameter of the model affects them on these samples (a constant "
                "output? check the inputs and the forward pass)."
            )
        return f"Parameters that do affect them: {_names(live)}."

    # ---- Jacobians -----------------------------------------------------------------------
    def jacobian_blocks(self, x: Inputs) -> dict[str, torch.Tensor]:
        """Per-sample Jacobians per weight tensor: ``{name: [B, C, numel]}`` (exact).

        The strategy is ``self.jacobian_mode`` (NOTE [jacobian modes]); ``"auto"`` times
        the candidates on the first call and keeps the fastest.
        """
        x = to_device(x, self.device)
        if self.jacobian_mode is JacobianMode.AUTO:
            self.jacobian_mode = self._choose_mode(x)
        if self.jacobian_mode in (JacobianMode.STRUCTURED, JacobianMode.GRAM):
            try:
                return self._jacobian_structured(x)
            except Unsupported as exc:
                mode = self.jacobian_mode.value
                self.jacobian_mode = JacobianMode.VMAP
                warnings.warn(
                    f"Tangent: jacobian_mode={mode!r} does not cover this model ({exc}); "
                    "using 'vmap' instead.",
                    VmapFallbackWarning,
                    stacklevel=2,
                )
        if self.jacobian_mode is JacobianMode.VMAP:
            try:
                return self._jacobian_vmap(x)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # vmap cannot trace this model: see NOTE [vmap fallback]
                self._vmap_failed(exc)
        if self.jacobian_mode is JacobianMode.LOOP_JACREV:
            try:
                return self._jacobian_loop_jacrev(x)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self._vmap_failed(exc)
        return self._jacobian_loop_vjp(x)

    def _vmap_failed(self, exc: Exception) -> None:
        self.jacobian_mode = JacobianMode.LOOP_VJP
        warnings.warn(
            f"Tangent: torch.func.vmap cannot handle this model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); falling back "
            "to a per-sample autograd loop (same result, slower).",
            VmapFallbackWarning,
            stacklevel=3,
        )

    @property
    def use_vmap(self) -> bool:
        return self.jacobian_mode is not JacobianMode.LOOP_VJP

    def _choose_mode(self, x: Inputs) -> JacobianMode:
        """Time each strategy on a few samples (after a warm-up call) and keep the fastest."""
        m = min(num_rows(x), 4)
        xs = take(x, slice(0, m))
        best, best_t = JacobianMode.LOOP_VJP, float("inf")
        try:  # whether the mode covers the model: one sample, one output
            structured_jacobian(self._call, self.w0, self.param_names, take(x, slice(0, 1)),
                                outputs=1)
            candidates = [(JacobianMode.STRUCTURED, self._jacobian_structured)]
        except Unsupported:
            candidates = []
        if candidates and self._fast_projection():
            # the memory plan (materialized_params) assumed the sketch path, which never
            # forms [b, C, P] Jacobians: another mode could overflow it (a wide MLP on CUDA
            # asked for 78 GiB at once, benchmarks/results/gpu.md), so auto keeps to it
            self.mode_timings = None
            return JacobianMode.STRUCTURED
        candidates += [
            (JacobianMode.VMAP, self._jacobian_vmap),
            (JacobianMode.LOOP_JACREV, self._jacobian_loop_jacrev),
            (JacobianMode.LOOP_VJP, self._jacobian_loop_vjp),
        ]
        if self.projector is not None:
            # time what a chunk costs in the end: Jacobians and their projection
            candidates = [
                (mode, self._fast_projected)
                if mode is JacobianMode.STRUCTURED and self._fast_projection()
                else (mode, lambda xs, fn=fn: self.project(fn(xs)))
                for mode, fn in candidates
            ]
        cuda = self.device.type == "cuda"

        def now() -> float:  # CUDA runs asynchronously: time the work, not its launch
            if cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        for mode, fn in candidates:
            try:
                t0 = now()
                fn(take(x, slice(0, 1)))  # warm-up (allocator, kernels, functorch caches)
                if now() - t0 > best_t:
                    continue  # one sample already took longer than the best on m samples
                t0 = now()
                fn(xs)
                elapsed = now() - t0
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                if mode is not JacobianMode.LOOP_VJP:
                    self._vmap_failed(exc)
                    return JacobianMode.LOOP_VJP
                raise
            if elapsed < best_t:
                best, best_t = mode, elapsed
        self.mode_timings = best_t / m
        return best

    def _jacobian_structured(self, x: Inputs) -> dict[str, torch.Tensor]:
        return structured_jacobian(self._call, self.w0, self.param_names, x)

    def gram_elements(self, x1: Inputs) -> int | None:
        """Elements of one sample's layer factors for the ``gram`` kernel path, or ``None``
        when that path does not cover the model (tangentlab.gram). ``x1``: a few samples
        (two or more: a layer on a tensor broadcast across samples is then refused)."""
        return factor_elements(self._call, self.w0, self.param_names, to_device(x1, self.device))

    def gram_covered(self, x1: Inputs) -> list[str]:
        """The trainable weights the ``gram`` path covers, whatever the others do
        (tangentlab.structured.covered_names; one forward pass of ``x1``)."""
        return covered_names(self._call, self.w0, self.param_names, to_device(x1, self.device))

    def restricted(self, names: Sequence[str]) -> Tangent:
        """A shallow copy whose trainable weights are ``names`` only, the others frozen at
        w0; exact (no projection), ``jacobian_mode="auto"``. The kernel is additive over
        disjoint sets of weights, ``Theta = Theta_A + Theta_B``: compute_kernel splits a
        model the ``gram`` path covers in part this way (NOTE [jacobian modes])."""
        out = copy.copy(self)
        chosen = set(names)
        out.param_names = [n for n in self.param_names if n in chosen]
        out.w0 = {n: self.w0[n] for n in out.param_names}
        out.frozen = {**self.frozen, **{n: w for n, w in self.w0.items() if n not in chosen}}
        out.numels = {n: self.numels[n] for n in out.param_names}
        out.projection, out.projector = None, None
        out.jacobian_mode, out.mode_timings = JacobianMode.AUTO, None
        return out

    def gram_factors(self, x: Inputs) -> Factors:
        """Layer inputs and output gradients of a chunk, for exact kernels without Jacobians
        (tangentlab.gram). Raises ``structured.Unsupported`` for a model the path does not
        cover."""
        return gram_factors(self._call, self.w0, self.param_names, to_device(x, self.device))

    def _jacobian_vmap(self, x: Inputs) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            # functorch warns for ops without batching rules (it loops internally).
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac = vmap(jacrev(self._call_one), in_dims=(None, 0))(self.w0, x)
        b = num_rows(x)
        return {n: jac[n].reshape(b, jac[n].shape[1], -1) for n in self.param_names}

    def _jacobian_loop_jacrev(self, x: Inputs) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.param_names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for i in range(num_rows(x)):
                jac = jacrev(self._call_one)(self.w0, _row(x, i))
                for n in self.param_names:
                    rows[n].append(jac[n].reshape(jac[n].shape[0], -1))
        return {n: torch.stack(r) for n, r in rows.items()}

    def _jacobian_loop_vjp(self, x: Inputs) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.param_names}
        for i in range(num_rows(x)):
            xi = take(x, slice(i, i + 1))
            out, pull = vjp(lambda w, xi=xi: self._call(w, xi)[0], self.w0)
            per_class = []
            for a in range(out.shape[0]):
                cot = torch.zeros_like(out)
                cot[a] = 1.0
                (g,) = pull(cot, retain_graph=True)
                per_class.append(g)
            for n in self.param_names:
                rows[n].append(torch.stack([pc[n].reshape(-1) for pc in per_class]))
        return {n: torch.stack(r) for n, r in rows.items()}

    def jacobian(self, x: Inputs) -> torch.Tensor:
        """Exact per-sample Jacobians ``J(x_i)`` flattened over the weights: ``[B, C, P]``."""
        blocks = self.jacobian_blocks(x)
        return torch.cat([blocks[n] for n in self.param_names], dim=-1)

    def project(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Phi = J R`` from Jacobian blocks ``{name: [B, C, numel]}`` -> ``[B, C, k]``."""
        if self.projector is None:
            raise TangentlabError("Tangent.project: this Tangent has no projection (k).")
        first = blocks[self.param_names[0]]
        b, c = first.shape[:2]
        out = torch.zeros(b * c, self.projector.k, dtype=first.dtype, device=first.device)
        for n in self.param_names:
            self.projector.project_block(n, blocks[n].reshape(b * c, -1), out)
        return out.reshape(b, c, -1)

    def projected_jacobian(self, x: Inputs) -> torch.Tensor:
        """Projected per-sample Jacobians ``J(x_i) R``: ``[B, C, k]``."""
        return self.projected_chunk(x)[0]

    def materialized_params(self, x: Inputs) -> int:
        """How many weights' per-sample gradients a chunk materializes (for memory plans).

        P, except with a tensor-sketch projection that the structured mode covers: then
        only the weights outside factorized linear/conv layers (biases, norms, grouped
        convolutions) are materialized. ``x``: one sample, to trace the model.
        """
        captured = self._sketch_calls(x)
        if captured is None:
            return self.num_params
        calls, roles = captured
        sketched, spectra = set(), 0
        k = self.projector.k
        for (kind, a, out), r in zip(calls, roles):
            if "weight" in r and self.projector.factored(r["weight"]) and (
                kind == "linear" or (kind.startswith("conv") and int(a.get("groups", 1)) == 1)
            ):
                sketched.add(r["weight"])
                # rfft of the input and gradient sketches: positions x (k/2+1) complex, x2
                positions = out.numel() // out.shape[-1 if kind == "linear" else 1]
                spectra += positions * (k + 2) * 2
        held = sum(self.numels[n] for n in self.param_names if n not in sketched)
        # the memory plan counts 3*C copies of each held weight per sample
        return held + spectra // 3 + 1

    def by_output(self, x: Inputs) -> bool:
        """Whether a projected chunk is formed one output at a time (the structured
        tensor-sketch path, :func:`tangentlab.structured.structured_projected`): the memory
        plan's ``by_output`` (NOTE [memory model]). ``x``: one sample, to trace the model."""
        return self._sketch_calls(x) is not None

    def reached_activations(self, x: Inputs) -> int:
        """Activation elements of one forward pass of ``x`` (one sample) that depend on the
        trainable weights: what a reverse pass to them reaches (a frozen prefix's are not
        counted; NOTE [memory model])."""
        w = {a: self.w0[a].detach().requires_grad_(True) for a in self.param_names}
        return activation_elements(self.model, lambda: self._call(w, to_device(x, self.device)),
                                   live=True)  # fmt: skip

    def _sketch_calls(self, x: Inputs) -> tuple[list, list] | None:
        """``(calls, roles)`` of the structured tensor-sketch path, or None where it won't run."""
        modes = (JacobianMode.AUTO, JacobianMode.STRUCTURED, JacobianMode.GRAM)
        if not self._fast_projection() or self.jacobian_mode not in modes:
            return None
        try:
            with torch.enable_grad():
                _, calls, roles = capture_calls(
                    self._call, self.w0, self.param_names, to_device(x, self.device)
                )
        except Unsupported:
            return None
        return calls, roles

    def _fast_projection(self) -> bool:
        return self.projector is not None and self.projector.projection.kind == "tensor"

    def _fast_projected(self, x: Inputs) -> torch.Tensor:
        return structured_projected(self._call, self.w0, self.param_names, x, self.projector)[0]

    def projected_chunk(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(J R [B, C, k], f0 [B, C], J w0 [B, C])`` for one chunk of samples (``J w0``
        NaN after :meth:`without_jw0`).

        With ``jacobian_mode="structured"`` and a tensor-sketch projection the Jacobians
        are never formed (tangentlab.structured.structured_projected), nor is ``J w0``.
        """
        if self.projector is None:
            raise TangentlabError("Tangent.projected_chunk: this Tangent has no projection (k).")
        x = to_device(x, self.device)
        if self.jacobian_mode is JacobianMode.AUTO:
            self.jacobian_mode = self._choose_mode(x)
        structured = self.jacobian_mode in (JacobianMode.STRUCTURED, JacobianMode.GRAM)
        if structured and self._fast_projection():
            try:
                phi, f0, jw0 = structured_projected(
                    self._call, self.w0, self.param_names, x, self.projector,
                    jw0=self.needs_jw0,
                )
                return phi, f0, jw0
            except Unsupported:
                pass  # jacobian_blocks below falls back and warns
        blocks = self.jacobian_blocks(x)
        f0 = self.f0(x)
        jw0 = self.jw0(blocks) if self.needs_jw0 else torch.full_like(f0, math.nan)
        return self.project(blocks), f0, jw0

    def jw0(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J(x_i) w0`` from Jacobian blocks -> ``[B, C]`` (the coupled weight-decay constant)."""
        return sum(blocks[n] @ self.w0[n].reshape(-1).to(blocks[n].dtype) for n in self.param_names)

    # ---- products ------------------------------------------------------------------------
    def _unflatten(self, v: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(v, Mapping):
            return {n: v[n].to(self.w0[n]) for n in self.param_names}
        v = torch.as_tensor(v)
        if v.shape != (self.num_params,):
            raise TangentlabError(
                f"Tangent: a weight-space vector must have shape [P] = [{self.num_params}], "
                f"got {tuple(v.shape)}."
            )
        out, offset = {}, 0
        for n in self.param_names:
            m = self.numels[n]
            out[n] = v[offset : offset + m].reshape(self.w0[n].shape).to(self.w0[n])
            offset += m
        return out

    def jvp(self, x: Inputs, v: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Jacobian-vector product ``J(x_i) v`` for every sample: ``v`` ``[P]`` -> ``[B, C]``."""
        return self.f0_and_jvp(x, v)[1]

    def f0_and_jvp(
        self, x: Inputs, v: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f0(x) [B, C], J(x_i) v [B, C])``: one forward-mode pass gives both."""
        x = to_device(x, self.device)
        tangent = self._unflatten(v)
        if self.use_forward_ad:
            try:
                return jvp(lambda w: self._call(w, x), (self.w0,), (tangent,))
            except (NotImplementedError, RuntimeError) as exc:
                self.use_forward_ad = False
                warnings.warn(
                    f"Tangent.jvp: forward-mode AD is not supported by this model "
                    f"({str(exc).splitlines()[0][:160]}); computing J v from the per-sample "
                    "Jacobians instead (same result, C backward passes per sample).",
                    VmapFallbackWarning,
                    stacklevel=2,
                )
        blocks = self.jacobian_blocks(x)
        return self.f0(x), sum(blocks[n] @ tangent[n].reshape(-1) for n in self.param_names)

    def vjp(self, x: Inputs, u: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product ``sum_i J(x_i)^T u_i``: ``u`` ``[B, C]`` -> ``[P]``."""
        x = to_device(x, self.device)
        out, pull = vjp(lambda w: self._call(w, x), self.w0)
        if tuple(u.shape) != tuple(out.shape):
            raise TangentlabError(
                f"Tangent.vjp: u must have the output's shape {tuple(out.shape)}, "
                f"got {tuple(u.shape)}."
            )
        (g,) = pull(u.to(out))
        return torch.cat([g[n].reshape(-1) for n in self.param_names])


@dataclass(frozen=True)
class Preflight:
    """What :meth:`Tangent.preflight` measured (it raises on failure, so all passed).

    Attributes:
      samples: how many samples were checked (at most 4).
      batch_difference: max |f0(sample 0 alone) - f0(sample 0 in the batch)| relative to
        the largest output; ``None`` when one sample was given (not checked).
      tolerance: the largest batch difference accepted, ``sqrt(eps)`` of the dtype.
      zero_gradient: selected weight tensors whose gradient was exactly zero (warned).
      seconds: time taken.
      outputs: f0 of the checked samples ``[samples, C]`` (detached; reused by callers
        that need them, e.g. the cache key of compute_kernel).
    """

    samples: int
    batch_difference: float | None
    tolerance: float
    zero_gradient: tuple[str, ...]
    seconds: float
    outputs: torch.Tensor | None = None


def _names(names: Sequence[str], most: int = 4) -> str:
    """``a, b, c, d and 3 more``."""
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def check_output(out: torch.Tensor, batch: int, where: str) -> None:
    """The model output must be ``[batch, C]`` and finite."""
    if out.ndim != 2 or out.shape[0] != batch:
        raise TangentlabError(
            f"{where}: the model output must have shape [batch, C] = [{batch}, C], got "
            f"{tuple(out.shape)}. For a single-output model return [batch, 1]; for a "
            "sequence model pool or select the classification logits."
        )
    if not bool(torch.isfinite(out).all()):
        raise TangentlabError(
            f"{where}: the model produced non-finite outputs (NaN or inf) on this data. "
            "Check the input normalization and the weights (e.g. a fresh head's scale)."
        )

"""Head exact, body linear: fine-tuning a fresh head on a linearized body.

NOTE [head exact, body linear]
The first-order tangent model linearizes the whole network around w0, so it misses the
product structure of a fresh head on pre-trained features: the body's Jacobian of the
logits is proportional to the head weights W, and the head's Jacobian is the features φ;
both grow as training moves them (issue 13: real fine-tuning ran 2-28x faster than the
tangent forecast). This model keeps the final linear layer exact and linearizes only the
body that computes its input:

    f_i = W φ_i + b,        φ_i = φ0_i + J_i (w_body - w0_body),    J_i = ∂φ(x_i)/∂w_body

It is bilinear in (W, Δw_body), exact for linear probing and for any body that is linear in
its weights. SGD on it is simulated exactly in the variables (W, b, φ_1..φ_N); the body
enters only through the feature kernel K(i, j) = J_i J_jᵀ ``[d, d]`` (d = feature width),
which is too large to form (N d × N d). It is kept

- exact inside an r-dimensional subspace Q of feature space: M(i, j) = Qᵀ K(i, j) Q, the
  NTK of the read-out ``Qᵀ φ(x)`` (r backward passes per sample, exact or projected like
  any kernel: :func:`tangentlab.compute_kernel`). Q holds the rows of W0 (so the logit
  kernel at w0 is exact: the model starts as the tangent model) and the top
  ``directions`` principal directions of the features φ0 (the head's update W - W0 lies
  in the span of the features, so W^T δ stays mostly inside Q);
- isotropic outside it: κ_⊥(i, j) = tr((I - QQᵀ) K(i, j)) / (d - r), estimated with
  ``probes`` random directions v_s = (I - QQᵀ) z_s, z_s Rademacher, as
  Σ_s v_sᵀ K(i, j) v_s / Σ_s ‖v_s‖² (exact when K is isotropic beside Q): S more backward
  passes per sample.

The dynamics (:func:`tangentlab.dynamics.head_body_trajectory`) cost O(N d) per sample of a
batch, plus the kernel products. Units and conventions as everywhere (DESIGN.md §2-§3).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab._version import __version__
from tangentlab.compute import architecture_hash, compute_kernel, request_sha
from tangentlab.data import as_arrays, fingerprint, num_rows, take
from tangentlab.errors import CacheWarning, ModeSwitchWarning, TangentlabError
from tangentlab.kernel import (
    Kernel,
    _file_digest,
    atomic_write,
    read_safetensors,
    tensors_digest,
)
from tangentlab.memory import default_budget, parse_bytes
from tangentlab.projection import Projection
from tangentlab.tangent import ParamSpec, Tangent, select_params

_CHUNK = 64  # samples per forward pass for the features and J w0
_FEATURES = "features.safetensors"  # φ0 and J w0 in the cache directory
_FEATURES_FORMAT = "tangentlab.head-body-features/1"


@dataclass(eq=False)
class HeadBodyKernel:
    """What the head-exact, body-linear forecast needs (NOTE [head exact, body linear]).

    Attributes:
      features: φ0 = the head's input on every sample, ``[N, d]``.
      weight, bias: the head's pre-trained W0 ``[C, d]`` and b0 ``[C]`` (``None``: no bias).
      targets: labels ``[N]``.
      basis: Q ``[d, r]``, orthonormal columns.
      block: the kernel of the read-out ``Qᵀ φ(x)`` w.r.t. the body's trainable weights,
        ``theta`` ``[N r, N r]`` when exact, ``features`` ``[N r, k]`` only when projected
        (NOTE [head-body features]; its ``targets`` are placeholders); ``None`` when no
        body weight is trained (linear probing).
      rest: κ_⊥ ``[N, N]``, or ``None`` (Q spans everything, or ``probes=0``).
      body_jw0: ``J_i w0_body`` ``[N, d]`` (one JVP per sample), for weight decay toward 0;
        ``None`` without body weights.
      metadata: how it was computed (head, body weights, r, probes, projection).
    """

    features: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    basis: torch.Tensor
    block: Kernel | None
    rest: torch.Tensor | None = None
    body_jw0: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def f0(self) -> torch.Tensor:
        """Pre-trained logits ``φ0 W0ᵀ + b0`` ``[N, C]``."""
        f = self.features @ self.weight.T
        return f if self.bias is None else f + self.bias

    def tangent_kernel(self) -> Kernel:
        r"""The tangent model's NTK at w0 as a plain :class:`~tangentlab.kernel.Kernel`:

        .. math::
            \Theta_0(i, j) = A\, M(i, j)\, A^T + (φ0_i · φ0_j + 1_{\text{bias}})\, I_C,
            \qquad A = W_0 Q

        exact, since the rows of W0 lie in span Q (the κ_⊥ part never reaches the logits at
        w0). A forecast with it is the first-order tangent forecast of the same weights
        (up to the projection of ``block``); :func:`tangentlab.forecast` uses it for the
        reliability check (NOTE [reliability check] in tangentlab.forecast). Dense
        ``[N C, N C]`` float64, built once and kept.
        """
        if "_tangent" in self.__dict__:
            return self.__dict__["_tangent"]
        phi = self.features.detach().double().cpu()
        n, c = self.num_samples, self.num_classes
        head = phi @ phi.T + (0.0 if self.bias is None else 1.0)
        theta = torch.kron(head, torch.eye(c, dtype=torch.float64))
        jw0 = self.f0.detach().double().cpu()  # head part: W0 φ0 + b0
        if self.block is not None:
            a = self.weight.detach().double().cpu() @ self.basis.detach().double().cpu()
            theta += _logit_block(self.block, a, n)
            w0 = self.weight.detach().double().cpu()
            jw0 = None if self.body_jw0 is None else jw0 + self.body_jw0.detach().double() @ w0.T
        out = Kernel(f0=self.f0.detach().double().cpu(), targets=self.targets.cpu(),
                     theta=0.5 * (theta + theta.T), jw0=jw0,
                     metadata={"source": "HeadBodyKernel.tangent_kernel (NTK at w0)"})  # fmt: skip
        self.__dict__["_tangent"] = out
        return out

    def problem(self) -> dyn.HeadBodyProblem:
        """The float64 numpy problem :func:`tangentlab.dynamics.head_body_trajectory` runs
        (converted once and kept: the forecast and λ_max share it)."""
        if "_problem" not in self.__dict__:
            self.__dict__["_problem"] = self._make_problem()
        return self.__dict__["_problem"]

    def _make_problem(self) -> dyn.HeadBodyProblem:
        # NOTE [head-body features]: a projected block is kept as its features Φ [N r, k]
        # (compute_head_body_kernel does not form Θ = Φ Φᵀ); float32 features (the default)
        # are multiplied in float32 (the sketch's own error is ~10%, float32 round-off
        # ~1e-7), the state stays float64. A long forecast multiplies through Θ instead
        # (dynamics.head_body_trajectory, NOTE [head-body Gram]). An exact block
        # (projection=None, needed for held-out curves) stays dense float64.
        block = None
        if self.block is not None:
            r = self.basis.shape[1]
            block = (dyn.DenseKernelOperator(_np64(self.block.theta), r)
                     if self.block.theta is not None else
                     dyn.FeatureKernelOperator(_np_features(self.block.features), r))  # fmt: skip
        rest = None if self.rest is None else dyn.TraceKernelOperator(
            _np64(self.rest), self.features.shape[1])  # fmt: skip
        return dyn.HeadBodyProblem(
            phi0=_np64(self.features), weight=_np64(self.weight),
            bias=None if self.bias is None else _np64(self.bias), basis=_np64(self.basis),
            block=block, rest=rest,
            body_jw0=None if self.body_jw0 is None else _np64(self.body_jw0),
        )  # fmt: skip

    def top_eigenvalue(self, loss: str = "mse") -> float:
        """λ_max of the logit kernel at w0, Θ0 = W0 K W0ᵀ + (φ0 φ0ᵀ + 1) ⊗ I_C (the tangent
        NTK), for ``"mse"``; of ``H^{1/2} Θ0 H^{1/2}`` (softmax Hessians at f0) for ``"ce"``.
        Cached per loss."""
        cache = self.__dict__.setdefault("_top", {})
        if loss not in cache:
            f0 = _np64(self.f0)
            weight = None if loss == "mse" else dyn.softmax_hessian_sqrt(f0)
            op = dyn.HeadBodyLogitOperator(self.problem())
            cache[loss] = dyn.top_eigenvalue(op, f0.size, weight=weight)
        return cache[loss]

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (shapes, how it was computed), as ``Kernel.describe``."""
        return {
            "model": "head exact, body linear (tangentlab.headbody)",
            "num_samples": self.num_samples, "num_classes": self.num_classes,
            "feature_dim": int(self.features.shape[1]), "rank": int(self.basis.shape[1]),
            "block": None if self.block is None else self.block.describe(),
            "rest": None if self.rest is None else "κ_⊥ [N, N] from random probes",
            "lambda_max_over_n": self.top_eigenvalue("mse") / max(self.num_samples, 1),
            "metadata": {k: str(v) for k, v in self.metadata.items()},
        }  # fmt: skip


def _logit_block(block: Kernel, a: torch.Tensor, n: int) -> torch.Tensor:
    """A M Aᵀ ``[N C, N C]`` float64 from the read-out kernel M ``[N r, N r]`` and A = W0 Q
    ``[C, r]``. A projected block (features Φ ``[N r, k]``) is contracted first, Ψ = (I ⊗ A) Φ
    ``[N C, k]`` and Ψ Ψᵀ, in sample chunks: O(N r k C + (N C)² k) instead of forming M,
    O((N r)² k) time and (N r)² memory (r = N + C for a full-span Q). Float32 features (a
    sketch, NOTE [head-body features]) are contracted in float32, as the forecast's own
    products are (NOTE [head-body Gram]): round-off ~1e-7, far below the sketch's error."""
    c, r = a.shape
    if block.theta is not None:
        m = block.theta.detach().double().cpu().reshape(n, r, n, r)
        return torch.einsum("ca,iajb,db->icjd", a, m, a).reshape(n * c, n * c)
    phi = block.features.detach().cpu()
    phi = phi if phi.dtype == torch.float32 else phi.double()
    a = a.to(phi.dtype)
    psi = torch.cat([torch.einsum("ca,iak->ick", a, phi[i * r:(i + _CHUNK) * r]
                                  .reshape(-1, r, phi.shape[1])).reshape(-1, phi.shape[1])
                     for i in range(0, n, _CHUNK)])  # fmt: skip
    return (psi @ psi.T).double()


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _np_features(t: torch.Tensor) -> np.ndarray:
    """Projected features as numpy, float32 kept float32 (NOTE [head-body features])."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.float32 else t.double().numpy()


def compute_head_body_kernel(
    model: nn.Module,
    data: Any,
    *,
    head: str | None = None,
    params: ParamSpec = None,
    directions: int | str | None = None,
    probes: int = 4,
    projection: int | Projection | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> HeadBodyKernel:
    """The head-exact, body-linear model of fine-tuning ``model`` on ``data``.

    Args:
      model: ``nn.Module`` whose output is its last ``nn.Linear`` applied to features
        (checked on the data: ``f(x) = W φ(x) + b``).
      data: ``(X, y)``, a ``Dataset`` or a ``DataLoader``, as for :func:`compute_kernel`.
      head: module name of that linear layer (e.g. ``"_fc"``, ``"classifier"``); default:
        the last ``nn.Linear`` whose width is the model's output width.
      params: trainable weights as for :func:`compute_kernel`; must include the head's.
      directions: principal directions of φ0 added to Q (default C, the number of classes;
        ``"all"`` (or >= N): all of φ0's span, the closest to the exact model, costlier:
        RESULTS "subspace"; its forecasts run in Q's N + C coordinates, NOTE [head-body in
        span Q], and a convolutional body's steps interval has its own calibration, NOTE
        [full-span interval]).
      probes: random directions estimating κ_⊥ (0: the body does not move outside Q).
      projection: ``None`` (exact M and κ_⊥) or k (projected, as :func:`compute_kernel`).
      seed: seed of the projection and the probes.
      memory_budget, device, progress: as for :func:`compute_kernel`.
      cache: a directory; the two read-out kernels are cached in its ``block`` and ``rest``
        subdirectories exactly as :func:`compute_kernel` caches (resumable, checksummed,
        keyed on the model, the data and Q); φ0 and J w0 (one forward-mode pass) in its
        ``features.safetensors`` (checksummed, keyed on the body's weights, architecture
        and the data, and checked against φ0 recomputed on 4 samples).

    Returns:
      :class:`HeadBodyKernel`; forecast it with :func:`tangentlab.forecast`.

    Example::

        >>> hb = compute_head_body_kernel(model, (X, y), head="fc", projection=2048)
        >>> hb.features.shape, hb.block.features.shape  # [N, d], [N*r, 2048] (projected: Φ only)
        >>> fc = tl.forecast(hb, tl.SGD(0.01), 300, loss="ce")
    """
    t0 = time.perf_counter()
    x, y = as_arrays(data, where="compute_head_body_kernel")
    directions = num_rows(x) if directions == "all" else directions
    _check_counts(directions=directions, probes=probes)
    head_name, lin = find_head(model, head)
    chosen = select_params(model, params)
    body_names = _body_params(chosen, lin, head_name)
    body = _body(model, head_name)
    if device is not None:
        body = body.to(device)
    weight = lin.weight.detach().to(torch.float64).cpu()
    bias = None if lin.bias is None else lin.bias.detach().to(torch.float64).cpu()
    # the body's Tangent (any weight selected when none is trained: only φ0 is needed then)
    names = body_names or [next(n for n, _ in body.named_parameters())]
    tb = Tangent(body, params=names, projection=projection, seed=seed)
    first = _features(tb, take(x, slice(0, min(4, num_rows(x)))), head_name)
    _check_head(model, x, first, weight, bias, head_name, chosen)
    phi0, jw0, parts_s = _features_and_jw0(tb, x, bool(body_names), first,
                                           None if cache is None else Path(cache) / _FEATURES)
    basis = feature_basis(weight, phi0, directions=directions)
    meta = dict(head=head_name, body_params=len(body_names), rank=int(basis.shape[1]),
                conv_body=_conv_body(model, body_names),
                directions=None if directions is None else int(directions),
                probes=int(probes), projection=str(projection), feature_dim=int(phi0.shape[1]),
                seed=int(seed),
                weights_sha=Tangent(model, params=chosen).weights_hash(),
                data_fingerprint=fingerprint(x, y))  # fmt: skip
    block = rest = None
    if body_names:  # else linear probing: nothing else to compute
        opts = dict(memory_budget=memory_budget, progress=progress, cache=cache)
        block, rest, read_s = _read_out_kernels(tb, x, basis, probes, seed, projection, opts)
        parts_s += read_s
    # what computing it cost: parts restored from the cache count what they cost then
    meta["seconds"] = max(time.perf_counter() - t0, parts_s)
    return HeadBodyKernel(phi0, weight, bias, y, basis, block, rest, jw0, meta)


@dataclass(frozen=True)
class Linearization:
    """Which model of training a forecast uses (:func:`choose_linearization`).

    Attributes:
      model: ``"body"`` (head exact, body linear: :func:`compute_head_body_kernel`),
        ``"all"`` (the tangent model: :func:`tangentlab.compute_kernel`) or, only when
        :func:`choose_linearization` is asked with ``exact_top=True``, ``"top"`` (the
        network's top exact, its last block linear:
        :func:`tangentlab.examples.split_model` and
        :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`).
      head: module name of the head kept exact (``"body"`` only, else ``None``).
      reason: one sentence saying why.
    """

    model: str
    head: str | None
    reason: str


def choose_linearization(
    model: nn.Module,
    data: Any = None,
    *,
    head: str | None = None,
    params: ParamSpec = None,
    optimizer: Any = None,
    trace: bool | int = False,
    dataset_size: int | None = None,
    held_out: bool = False,
    exact_top: bool = False,
) -> Linearization:
    """The head-exact model where it applies, else the tangent model, and why; with
    ``exact_top=True`` the exact top first, where it applies.

    On held-out fine-tuning tasks the head-exact, body-linear model with its calibrated
    steps interval beat the tangent model several-fold (RESULTS.md "holdout-depth": median
    |T̂' − T|/T 26% against 288%), so it is chosen whenever

    - ``optimizer`` is not a :class:`tangentlab.AdamW` (Adam is forecast on the tangent
      model only), no trace kernel (``trace``) and no extrapolation to a larger
      ``dataset_size`` (:func:`tangentlab.extrapolate`) is asked for: those exist for the
      tangent model only;
    - no held-out curves are wanted (``held_out``: ``eval_data=`` of the forecast): there
      the tangent model predicted held-out accuracy as well or better on the examples
      (RESULTS.md "sweeps": final-accuracy error 10.6 against 15.3 points on Lite0) and
      needs no exact read-out kernels (the head-exact model's cost 5.6x on the default
      example);
    - the model has an ``nn.Linear`` (``head``, default its last one) whose weights are in
      ``params`` with other trained weights before it (a trained head alone is linear
      probing, where the tangent model is exact and cheaper) and, when ``data`` is
      given, whose output is the model's output (checked on up to 4 samples: two small
      forward passes).

    With ``exact_top=True`` (the command line's ``forecast`` and ``validate``) the exact
    top, body linear (``"top"``) comes first where it applies (:func:`_exact_top_choice`).

    Example::

        >>> choice = tl.choose_linearization(model, (X, y), params=params)
        >>> choice.model, choice.head  # ("body", "fc"), or ("all", None) with choice.reason
        >>> hb = tl.compute_head_body_kernel(model, (X, y), head=choice.head, params=params)
    """
    from tangentlab.training import AdamW

    def tangent(why: str) -> Linearization:
        return Linearization("all", None, f"the tangent model: {why}")

    if isinstance(optimizer, AdamW):
        return tangent("AdamW is forecast on the tangent model only")
    if trace:
        return tangent("trace kernels are the tangent model's")
    if dataset_size is not None:
        return tangent("extrapolating to a larger dataset_size needs its spectrum")
    if held_out:
        return tangent("held-out curves are its strength (RESULTS.md 'sweeps')")
    chosen = select_params(model, params)  # a bad params= is an error either way
    if exact_top and head is None:
        top = _exact_top_choice(model, params, optimizer)
        if top is not None:
            return top
    name = head
    try:
        name, lin = find_head(model, head)
        if not _body_params(chosen, lin, name):
            return tangent("only the head is trained, so the model is linear in its "
                           "trainable weights and the tangent model is exact")
        if data is not None:
            _check_head_on(model, data, name, lin)
    except TangentlabError as exc:
        if head is not None and "not an nn.Linear" in str(exc):
            raise  # the user named a head: a wrong name is an error, not a fallback
        why = str(exc).removeprefix("compute_head_body_kernel: ").split(";")[0]
        return tangent(why)
    except Exception as exc:  # a body that cannot be split off its head (copy, forward)
        first = (str(exc).splitlines() or [""])[0][:160]
        return tangent(f"the model without its head {name!r} failed on 4 samples "
                       f"({type(exc).__name__}: {first})")
    return Linearization("body", name, f"the head {name!r} kept exact, the body linearized "
                         "(calibrated steps interval; NOTE [head exact, body linear])")


def _exact_top_choice(model: nn.Module, params: ParamSpec,
                      optimizer: Any) -> Linearization | None:
    """:func:`choose_linearization`'s ``"top"``, or ``None`` where the exact top does not
    apply: it applies where none of the head-exact model's rules chose the tangent model,
    ``optimizer`` (if given) is SGD without weight decay,
    :func:`tangentlab.examples.split_model` knows the network (EfficientNet-Lite, BERT
    classifiers) and ``params`` trains weights of its body.

    On the held-out rounds the exact top was several times more accurate than the
    head-exact model at 32 px and on text (7-9% against 65-86% median |T̃ − T|/T) and as
    good or better at 64 px (3% / 7-8% against 4-6% / 13-24% on the three rounds since its
    q was chosen; README "Exact top, last block linear"), at about 7x the head-exact
    forecast's cost (a fifth of a real 300-step run on the default example, at the command
    line's k = 1024); the head-exact model stays the cheap choice."""
    from tangentlab.examples import split_model
    from tangentlab.training import SGD

    if optimizer is not None and (not isinstance(optimizer, SGD) or optimizer.weight_decay):
        return None
    try:
        body, _, how = split_model(model)
        select_params(body, params)  # raises where params trains nothing in the body
    except TangentlabError:
        return None
    return Linearization("top", None, f"the exact top ({how.split(':')[0]}: the network's top "
                         "exact, its last block linear; the most accurate on held-out rounds, "
                         "about 7x the head-exact forecast's cost on the default example: "
                         "--linearize body for that)")


def _check_head_on(model: nn.Module, data: Any, name: str, lin: nn.Linear) -> None:
    """:func:`_check_head` on up to 4 samples of ``data``, the model's modes left as found."""
    x, _ = as_arrays(data, where="choose_linearization")
    x4 = take(x, slice(0, min(4, num_rows(x))))
    modes = [(m, m.training) for m in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModeSwitchWarning)  # a check, not a forecast
            body = _body(model, name)
            tb = Tangent(body, params=[next(n for n, _ in body.named_parameters())])
            bias = None if lin.bias is None else lin.bias.detach().to(torch.float64).cpu()
            _check_head(model, x4, _features(tb, x4, name),
                        lin.weight.detach().to(torch.float64).cpu(), bias, name,
                        [next(n for n, _ in model.named_parameters())])  # fmt: skip
    finally:
        for m, training in modes:
            m.training = training


@dataclass(eq=False)
class HeadBodyCross:
    """A held-out set of the head-exact, body-linear model (see
    :func:`compute_head_body_cross_kernel`); pass it as ``eval_data=`` of
    :func:`tangentlab.forecast` / :func:`tangentlab.sweep` with its :class:`HeadBodyKernel`.

    Attributes:
      features: held-out features φ0_e ``[M, d]``.
      targets: held-out labels ``[M]``.
      block: ``M(X_e, X)``, the cross kernel of the read-out ``Qᵀ φ(x)`` ``[M r, N r]``
        (a :class:`~tangentlab.cross.CrossKernel`), or ``None`` (linear probing).
      rest: ``κ_⊥(X_e, X)`` ``[M, N]`` (the same probes), or ``None``.
      body_jw0: ``J_e w0_body`` ``[M, d]``, or ``None``.
      metadata: the kernel's weights hash, data fingerprint, Q's shape, seconds.
    """

    features: torch.Tensor
    targets: torch.Tensor
    block: Any
    rest: torch.Tensor | None
    body_jw0: torch.Tensor | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_eval(self) -> int:
        return int(self.features.shape[0])

    def check_against(self, hb: HeadBodyKernel, fn: str) -> None:
        """Refuse a held-out set computed for another head-body kernel."""
        same = (self.metadata.get("weights_sha") == hb.metadata.get("weights_sha")
                and self.metadata.get("data_fingerprint") == hb.metadata.get("data_fingerprint")
                and self.features.shape[1] == hb.features.shape[1]
                and (self.block is None) == (hb.block is None)
                and (self.rest is None) == (hb.rest is None))  # fmt: skip
        if not same:
            raise TangentlabError(
                f"{fn}: eval_data was computed for another head-body kernel (weights, training "
                "data, feature width or parts differ); recompute it with "
                "tl.compute_head_body_cross_kernel(model, (X_eval, y_eval), hb, train_data=...)."
            )

    def problem(self) -> dyn.HeadBodyEval:
        """The float64 numpy form the simulation moves (converted once and kept)."""
        if "_problem" not in self.__dict__:
            block = None
            if self.block is not None:
                r = int(self.metadata["rank"])
                block = dyn.CrossKernelOperator(r, theta=_np64(self.block.theta))
            self.__dict__["_problem"] = dyn.HeadBodyEval(
                phi0=_np64(self.features),
                targets=self.targets.detach().cpu().numpy().astype(np.int64), block=block,
                rest=None if self.rest is None else _np64(self.rest),
                body_jw0=None if self.body_jw0 is None else _np64(self.body_jw0),
            )  # fmt: skip
        return self.__dict__["_problem"]


def compute_head_body_cross_kernel(
    model: nn.Module,
    eval_data: Any,
    hb: HeadBodyKernel,
    *,
    train_data: Any,
    params: ParamSpec = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> HeadBodyCross:
    """Held-out curves for the head-exact model: the cross quantities of ``eval_data``.

    The held-out features move like the training ones, ``φ_e = φ0_e + J_e Δw_body``, through
    the cross feature kernel K(e, i) = J_e J_iᵀ, kept as the training kernel is: exact in
    span Q (``M(e, i)``, the cross kernel of the read-out ``Qᵀ φ``), isotropic beside it
    (``κ_⊥(e, i)`` from the same probe directions). Then the forecast's held-out outputs
    ``W_t φ_e(t) + b_t`` are exact for this model (equal to real fine-tuning of a body linear
    in its weights when Q spans the features: tests/test_headbody.py).

    Args:
      model: the model ``hb`` was computed from, at the same weights.
      eval_data: ``(X_eval, y_eval)``, a ``Dataset`` or ``DataLoader``.
      hb: the :class:`HeadBodyKernel` (exact: ``projection=None``).
      train_data: the data ``hb`` was computed on (the training side is recomputed).
      params: the trainable weights ``hb`` was computed with (default: all).
      memory_budget, progress: as for :func:`tangentlab.compute_kernel`.

    Returns:
      :class:`HeadBodyCross`.

    Example::

        >>> hb = tl.compute_head_body_kernel(model, (X, y))
        >>> ev = tl.compute_head_body_cross_kernel(model, (X_val, y_val), hb, train_data=(X, y))
        >>> fc = tl.forecast(hb, tl.SGD(0.01), 300, loss="ce", eval_data=ev)
        >>> fc.eval_accuracy[-1], fc.best_step
    """
    from tangentlab.cross import compute_cross_kernel

    t0 = time.perf_counter()
    xe, ye = as_arrays(eval_data, where=_CROSS)
    x, y = as_arrays(train_data, where=_CROSS)
    tb = _cross_body(model, hb, x, y, params)
    phi_e, jw0, _ = _features_and_jw0(tb, xe, hb.block is not None, None, None)
    basis = hb.basis
    block = rest = None
    if hb.block is not None:
        zeros, zeros_e = torch.zeros_like(y), torch.zeros(num_rows(xe), dtype=torch.long)
        block = compute_cross_kernel(tb.probed(basis.to(tb.dtype)), (xe, zeros_e), hb.block,
                                     train_data=(x, zeros), memory_budget=memory_budget,
                                     progress=progress)  # fmt: skip
        if hb.rest is not None:
            budget = parse_bytes(memory_budget) or default_budget(tb.device)
            rest = _rest_cross(tb, xe, x, hb, budget)
    meta = dict(weights_sha=hb.metadata.get("weights_sha"),
                data_fingerprint=hb.metadata.get("data_fingerprint"),
                eval_fingerprint=fingerprint(xe, ye), rank=int(basis.shape[1]),
                seconds=time.perf_counter() - t0)  # fmt: skip
    return HeadBodyCross(phi_e, ye, block, rest, jw0, meta)


_CROSS = "compute_head_body_cross_kernel"


def _cross_body(model: nn.Module, hb: HeadBodyKernel, x, y, params: ParamSpec) -> Tangent:
    """The body's Tangent for held-out quantities, after checking that ``model``, ``params``
    and the training data are those of ``hb`` (exact read-out kernels only)."""
    if not isinstance(hb, HeadBodyKernel):
        raise TangentlabError(
            f"{_CROSS}: hb must be a HeadBodyKernel (tl.compute_head_body_kernel), got "
            f"{type(hb).__name__}."
        )
    if hb.metadata.get("projection", "None") != "None":
        raise TangentlabError(
            f"{_CROSS}: the head-body kernel is projected ({hb.metadata['projection']}); "
            "held-out curves of the head-exact model need its exact read-out kernels: "
            "recompute it with projection=None."
        )
    if num_rows(x) != hb.num_samples or fingerprint(x, y) != hb.metadata.get("data_fingerprint"):
        raise TangentlabError(
            f"{_CROSS}: train_data is not the data the head-body kernel was computed on (N = "
            f"{num_rows(x)} vs {hb.num_samples}, or different values); pass that data."
        )
    head_name, lin = find_head(model, hb.metadata.get("head"))
    chosen = select_params(model, params)
    if Tangent(model, params=chosen).weights_hash() != hb.metadata.get("weights_sha"):
        raise TangentlabError(
            f"{_CROSS}: the model's weights (or params=) differ from the head-body kernel's; "
            "pass the model at the same pre-trained weights and the same params=."
        )
    body = _body(model, head_name)
    names = _body_params(chosen, lin, head_name) or [next(n for n, _ in body.named_parameters())]
    return Tangent(body, params=names)


def _rest_cross(tb: Tangent, xe, x, hb: HeadBodyKernel, budget: int) -> torch.Tensor:
    """κ_⊥(X_e, X) ``[M, N]``: the ratio estimator of :func:`_rest_kernel` with the same probe
    directions, Σ_s v_sᵀ K(e, i) v_s / Σ_s ‖v_s‖²."""
    from tangentlab.cross import exact_cross

    v = _probe_directions(hb.basis, int(hb.metadata["probes"]), int(hb.metadata.get("seed", 0)))
    s, m, n = v.shape[1], num_rows(xe), hb.num_samples
    theta, _, _ = exact_cross(tb.probed(v.to(tb.dtype)), xe, x, (n, s), chunk=_CHUNK,
                              budget=budget)  # fmt: skip
    return torch.einsum("isjs->ij", theta.double().cpu().reshape(m, s, n, s)) / float((v * v).sum())


def _probe_directions(basis: torch.Tensor, probes: int, seed: int) -> torch.Tensor:
    """v = (I - QQᵀ) z ``[d, probes]``, z Rademacher from ``seed + 1`` (κ_⊥'s probes)."""
    d = basis.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randint(0, 2, (d, probes), generator=g).double() * 2 - 1
    return z - basis @ (basis.T @ z)


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):  # fmt: skip
            also = " or 'all'" if name == "directions" else ""
            raise TangentlabError(
                f"compute_head_body_kernel: {name} must be an integer >= 0{also}, got "
                f"{value!r}."
            )


def _body_params(chosen: list[str], lin: nn.Linear, head: str) -> list[str]:
    """The trained weights outside the head; the head's own must be trained."""
    head_params = [n for n, _ in lin.named_parameters(prefix=head)]
    missing = [n for n in head_params if n not in chosen]
    if missing:
        raise TangentlabError(
            f"compute_head_body_kernel: the head {head!r} is not trained ({missing} not in "
            "params); the head-exact model is for a trained head. Add the head to params, "
            "or forecast with tl.compute_kernel (the tangent model)."
        )
    return [n for n in chosen if n not in head_params]


def _conv_body(model: nn.Module, body_names: list[str]) -> bool:
    """Whether a trainable body weight belongs to a convolution (``nn.Conv1d/2d/3d`` or a
    transposed one): the steps interval's band depends on it (NOTE [steps interval])."""
    trained = set(body_names)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            own = (f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
            if any(n in trained for n in own):
                return True
    return False


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the head: ``head`` or the last ``nn.Linear`` of ``model``."""
    modules = dict(model.named_modules())
    if head is not None:
        lin = modules.get(head)
        if not isinstance(lin, nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)][-4:]
            raise TangentlabError(
                f"head={head!r} is not an nn.Linear of the model (found "
                f"{type(lin).__name__ if lin is not None else 'nothing'}); its last linear "
                f"layers are {linears}."
            )
        return head, lin
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise TangentlabError(
            "compute_head_body_kernel: the model has no nn.Linear layer to keep exact; the "
            "head-exact model needs a final linear head (use tl.compute_kernel otherwise)."
        )
    return linears[-1]


def feature_basis(
    weight: torch.Tensor, phi0: torch.Tensor, *, directions: int | None = None
) -> torch.Tensor:
    """Q ``[d, r]``: an orthonormal basis of span(rows of W0) + the top principal
    directions of the (uncentered) features φ0 ``[N, d]`` (``directions``, default C)."""
    c, d = weight.shape
    p = c if directions is None else int(directions)
    if p < 0:
        raise TangentlabError(f"directions must be >= 0, got {directions!r}.")
    cols = [weight.T / max(float(weight.norm()), 1e-300)]
    if p:
        _, _, vh = torch.linalg.svd(phi0, full_matrices=False)
        cols.append(vh[:p].T)
    m = torch.cat(cols, dim=1)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    keep = s > 1e-8 * float(s.max()) if s.numel() and float(s.max()) > 0 else s > 0
    return u[:, keep][:, : min(d, int(keep.sum()))].contiguous()


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _body(model: nn.Module, head: str) -> nn.Module:
    """A copy of ``model`` whose head is the identity: it returns the features φ(x)."""
    body = copy.deepcopy(model)
    parent_name, _, leaf = head.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    if parent is body and not parent_name and leaf == "":
        raise TangentlabError("compute_head_body_kernel: the head cannot be the whole model.")
    setattr(parent, leaf, _Identity().train(body.training))
    return body


def _features(tb: Tangent, x: Any, head: str | None = None) -> torch.Tensor:
    """φ0 ``[N, d]``; a body that fails without its head (``head`` not the last layer: the
    layers after it get the wrong width) is refused in words."""
    n = num_rows(x)
    try:
        return torch.cat(
            [tb.f0(take(x, slice(i, i + _CHUNK))).double().cpu() for i in range(0, n, _CHUNK)]
        )
    except RuntimeError as exc:
        if head is None:
            raise
        raise TangentlabError(
            f"compute_head_body_kernel: the model's output is not {head}(features) (the "
            f"model fails with {head} removed: {str(exc).splitlines()[0]}): the head must be "
            "the last operation. Pass head= the name of the final nn.Linear."
        ) from None


def _check_head(model, x, phi0, weight, bias, head: str, chosen: list[str]) -> None:
    """The model's logits must be ``head(φ)``: checked on up to 4 samples."""
    m = min(4, phi0.shape[0])
    with torch.no_grad():  # the weights asked for (requires_grad may be off on all of them)
        out = Tangent(model, params=chosen).f0(take(x, slice(0, m))).double().cpu()
    f = phi0[:m] @ weight.T + (0.0 if bias is None else bias)
    err = float((out - f).abs().max())
    scale = max(float(out.abs().max()), 1.0)
    if out.shape != f.shape or err > 1e-3 * scale:
        raise TangentlabError(
            f"compute_head_body_kernel: the model's output is not {head}(features) (max "
            f"difference {err:.3g} on {m} samples): the head must be the last operation. "
            "Pass head= the name of the final nn.Linear."
        )


def _read_out_kernels(tb: Tangent, x, basis: torch.Tensor, probes: int, seed: int,
                      projection: Any, opts: dict) -> tuple[Kernel, torch.Tensor | None, float]:
    """``(block M, κ_⊥ or None, seconds they cost)``, cached in ``opts["cache"]``'s
    ``block`` and ``rest`` subdirectories (``opts``: compute_kernel's budget, progress)."""
    zeros = torch.zeros(num_rows(x), dtype=torch.long)  # the read-out kernels use no labels
    cache = opts.pop("cache")

    def where(part: str) -> dict:
        return dict(opts, cache=None if cache is None else Path(cache) / part)

    keep = False if projection is not None else None  # NOTE [head-body features]
    block = compute_kernel(tb.probed(basis.to(tb.dtype)), (x, zeros), keep_theta=keep,
                           **where("block"))  # fmt: skip
    rest, rest_s = _rest_kernel(tb, x, zeros, basis, probes, seed, where("rest"))
    return block, rest, float(block.metadata.get("seconds", 0.0)) + rest_s


def _rest_kernel(tb: Tangent, x, y, basis: torch.Tensor, probes: int, seed: int, opts: dict):
    # opts: compute_kernel's keyword options
    """``(κ_⊥ [N, N] or None, seconds it cost)`` from ``probes`` directions
    v = (I - QQᵀ) z, z Rademacher."""
    d, r = basis.shape
    if probes == 0 or r >= d:
        return None, 0.0
    v = _probe_directions(basis, probes, seed)
    # the exact trace kernel of the S probed outputs, K_ij = Σ_s v_sᵀ K(i, j) v_s / S: the
    # diagonal blocks only (N² instead of (N S)² products; the gradients are formed as before)
    k = compute_kernel(tb.probed(v.to(tb.dtype)), (x, y), trace=True, **opts)
    # ratio estimator Σ_s v_sᵀ K v_s / Σ_s ‖v_s‖²: exact when K is isotropic beside Q
    kappa = k.gram().double().cpu() * (probes / float((v * v).sum()))
    return kappa, float(k.metadata.get("seconds", 0.0))


def _features_and_jw0(
    tb: Tangent, x, with_jw0: bool, first: torch.Tensor | None, path: Path | None
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(φ0 [N, d], J w0_body [N, d] or None, seconds)``: one forward-mode pass gives both
    (the primal of ``J w0`` is φ0), restored from / kept in ``path`` when given (seconds:
    what the pass cost when computed)."""
    key = None
    if path is not None:
        key = request_sha({"weights_sha": tb.weights_hash(),
                           "architecture": architecture_hash(tb.model),
                           "params": tb.param_names, "dtype": str(tb.dtype),
                           "data": fingerprint(x, torch.zeros(num_rows(x), dtype=torch.long)),
                           "with_jw0": with_jw0, "version": __version__})  # fmt: skip
        cached = _load_features(path, key, first)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    n = num_rows(x)
    if with_jw0:
        w0 = torch.cat([tb.w0[name].reshape(-1) for name in tb.param_names])
        parts = [tb.f0_and_jvp(take(x, slice(i, i + _CHUNK)), w0) for i in range(0, n, _CHUNK)]
        phi0 = torch.cat([f.detach().double().cpu() for f, _ in parts])
        jw0 = torch.cat([j.detach().double().cpu() for _, j in parts])
    else:
        phi0, jw0 = _features(tb, x), None
    seconds = time.perf_counter() - t0
    if path is not None:
        _save_features(path, key, phi0, jw0, seconds)
    return phi0, jw0, seconds


def _load_features(path: Path, key: str, first: torch.Tensor):
    """``(φ0, J w0, seconds)`` kept at ``path`` for ``key``, or ``None`` (absent, stale, damaged: a
    damaged file is removed with a CacheWarning; or φ0 differs from ``first`` recomputed)."""
    if not path.is_file():
        return None
    try:
        meta, tensors = read_safetensors(path)
        ok = (meta.get("format") == _FEATURES_FORMAT and "phi0" in tensors
              and meta.get("sha256") == _file_digest(tensors_digest(tensors), meta))  # fmt: skip
        problem = None if ok else "its contents do not match its checksum"
    except Exception as exc:  # safetensors raises its own error types
        problem = f"it is unreadable ({exc})"
    if problem is not None:
        warnings.warn(f"compute_head_body_kernel: discarding the damaged cached features "
                      f"{str(path)!r} ({problem}); they are recomputed.", CacheWarning,
                      stacklevel=4)  # fmt: skip
        path.unlink(missing_ok=True)
        return None
    phi0 = tensors["phi0"]
    m = first.shape[0]
    if meta.get("key") != key or not torch.allclose(phi0[:m], first, rtol=1e-5, atol=1e-6):
        return None  # another model, data or code: recomputed, overwritten
    return phi0, tensors.get("jw0"), float(meta.get("seconds", 0.0))


def _save_features(path: Path, key: str, phi0: torch.Tensor, jw0: torch.Tensor | None,
                   seconds: float) -> None:  # fmt: skip
    """Best effort (a directory that cannot be written costs the next run the recompute)."""
    from safetensors.torch import save_file

    tensors = {"phi0": phi0.contiguous()}
    if jw0 is not None:
        tensors["jw0"] = jw0.contiguous()
    meta = {"format": _FEATURES_FORMAT, "key": key, "seconds": f"{seconds:.3f}"}
    meta["sha256"] = _file_digest(tensors_digest(tensors), meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:
        warnings.warn(f"compute_head_body_kernel: could not keep the features in "
                      f"{str(path)!r} ({exc}); they are recomputed next time.", CacheWarning,
                      stacklevel=4)  # fmt: skip

"""``compute_cross_kernel``: the NTK between an evaluation set and a kernel's training set.

.. math::

    \\Theta(X_e, X)[(e,a),(j,b)] = \\frac{\\partial f_a(x^{e}_e)}{\\partial w} \\cdot
        \\frac{\\partial f_b(x_j)}{\\partial w}\\Big|_{w_0}
        \\qquad [M C \\times N C]

(projected: ``Phi_e Phi^T`` with ``Phi_e = J(X_e) R`` and the training kernel's own ``R``.)

The cross kernel is what carries the tangent model from the training set to points it was
not trained on: a training trajectory of the outputs, ``f_t(X) = f_0(X) + Theta a_t``
with ``w_t - w_0 = J(X)^T a_t`` (every weight displacement of gradient training lies in
the row space of ``J(X)``), moves the outputs on the evaluation set by

.. math::

    f_t(X_e) - f_0(X_e) = J(X_e)(w_t - w_0) = \\Theta(X_e, X)\\, a_t .

It is only meaningful with the *same* trainable weights, weights w0 and projection as the
training kernel: :func:`compute_cross_kernel` takes them from the kernel's metadata (or a
ready :class:`~tangentlab.Tangent`), checks every recorded field (weights hash, trainable
weights, projection, dtype, number of outputs) and, when the training data is given,
recomputes the first samples' Jacobian rows and compares them with the kernel's.

Used by train-to-eval influence (:func:`tangentlab.influence`), the functional unique
information (:func:`tangentlab.sample_information`) and held-out evaluation curves.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tangentlab.data import as_arrays, check_labels, fingerprint, num_rows, take
from tangentlab.errors import TangentlabError
from tangentlab.gram import gram_block
from tangentlab.kernel import Kernel
from tangentlab.memory import default_budget, parse_bytes
from tangentlab.projection import Projection
from tangentlab.tangent import JacobianMode, ParamSpec, Tangent, check_output

_FN = "compute_cross_kernel"
_CHECK_SAMPLES = 4  # training samples whose Jacobian rows are recomputed and compared


@dataclass(eq=False)
class CrossKernel:
    """The NTK between M evaluation samples and the N training samples of a :class:`Kernel`.

    Attributes:
      theta: ``Theta(X_e, X)`` ``[M*C, N*C]``, sample-major on both sides (row ``e*C + a``:
        output ``a`` of evaluation sample ``e``; column ``j*C + b``: output ``b`` of training
        sample ``j``), in the training kernel's units (projected: ``Phi_e Phi^T``).
      f0: outputs of the pre-trained model on the evaluation set, ``[M, C]``.
      targets: labels of the evaluation set ``[M]`` (``None`` when not given).
      jw0: ``J(x_e) w0`` ``[M, C]`` (the constant of coupled weight decay), or ``None``.
      features: projected Jacobians of the evaluation set ``Phi_e = J(X_e) R`` ``[M*C, k]``
        (projected kernels only), else ``None``.
      metadata: provenance: the training kernel's request fields and the evaluation data's
        fingerprint.
    """

    theta: torch.Tensor
    f0: torch.Tensor
    targets: torch.Tensor | None = None
    jw0: torch.Tensor | None = None
    features: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.f0.ndim != 2:
            raise TangentlabError(f"CrossKernel: f0 must be [M, C], got {tuple(self.f0.shape)}.")
        m, c = self.f0.shape
        if self.theta.ndim != 2 or self.theta.shape[0] != m * c or self.theta.shape[1] % c:
            raise TangentlabError(
                f"CrossKernel: theta must be [M*C, N*C] = [{m * c}, N*{c}], got "
                f"{tuple(self.theta.shape)}."
            )
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets).reshape(-1).long()
            if self.targets.shape[0] != m:
                raise TangentlabError(
                    f"CrossKernel: targets has {self.targets.shape[0]} entries, f0 has {m} rows."
                )

    @property
    def num_eval(self) -> int:
        """M, the number of evaluation samples."""
        return int(self.f0.shape[0])

    @property
    def num_classes(self) -> int:
        """C, the number of outputs."""
        return int(self.f0.shape[1])

    @property
    def num_train(self) -> int:
        """N, the number of training samples of the kernel it was computed against."""
        return int(self.theta.shape[1] // self.num_classes)

    def check_against(self, kernel: Kernel, fn: str) -> None:
        """Raise unless this cross kernel belongs to ``kernel`` (same N and C)."""
        if self.num_classes != kernel.num_classes or self.num_train != kernel.num_samples:
            raise TangentlabError(
                f"{fn}: the cross kernel is [M*C, N*C] with N={self.num_train}, "
                f"C={self.num_classes}, but the kernel has N={kernel.num_samples}, "
                f"C={kernel.num_classes}. Compute it against this kernel: "
                "tl.compute_cross_kernel(model, eval_data, kernel, train_data=...)."
            )
        sha = kernel.metadata.get("request_sha")
        mine = self.metadata.get("kernel_request_sha")
        if sha and mine and sha != mine:
            raise TangentlabError(
                f"{fn}: the cross kernel was computed against another kernel (request "
                f"{mine[:12]} vs {sha[:12]}); recompute it with this kernel."
            )


def compute_cross_kernel(
    model_or_tangent: nn.Module | Tangent,
    eval_data: Any,
    kernel: Kernel,
    *,
    train_data: Any = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> CrossKernel:
    """Cross kernel ``Theta(X_e, X)`` of an evaluation set against ``kernel``'s training set.

    .. math::

        \\Theta(X_e, X) = J(X_e) J(X)^T \\ \\text{(exact)}, \\qquad
        \\Phi_e \\Phi^T,\\ \\Phi_e = J(X_e) R \\ \\text{(projected, the kernel's R)}

    Args:
      model_or_tangent: the model the kernel was computed from (at the same weights w0), or
        the :class:`Tangent` used for it. A model is wrapped with the kernel's trainable
        weights (``params``, default: read from ``kernel.metadata['params_spec']``) and its
        projection (kind, k and seed read from ``kernel.metadata['projection']``).
      eval_data: the evaluation set: ``(X, y)``, a ``Dataset`` or ``DataLoader``, as for
        :func:`tangentlab.compute_kernel`; ``y`` is kept as ``CrossKernel.targets``.
      kernel: the training kernel (exact or projected; not a trace kernel).
      train_data: the kernel's training data. Required for an exact kernel (its Jacobians
        are recomputed: the kernel does not keep them); optional for a projected one, where
        it only serves the consistency check (the first samples' features are recomputed
        and compared with ``kernel.features``).
      params: trainable weights, when the kernel's metadata does not record them.
      batch_size: samples per Jacobian chunk (default: from the memory budget).
      memory_budget: bytes (or ``"4GB"``) the Jacobians held at once may take; default 50%
        of free memory (80% on GPU).
      device: where to compute (default: where the model's weights are).
      progress: say on stderr what is computed.

    Returns:
      :class:`CrossKernel` with ``theta`` ``[M*C, N*C]``, ``f0`` ``[M, C]``, ``targets``
      ``[M]``, ``jw0`` ``[M, C]`` and, projected, ``features`` ``[M*C, k]``.

    Raises:
      TangentlabError: a trace kernel; an exact kernel without ``train_data``; a model,
        weights, trainable weights, projection or training data that differ from the
        kernel's (the message names the field).

    Example::

        >>> k = tl.compute_kernel(model, (X, y), projection=1024, params="^head")
        >>> ck = tl.compute_cross_kernel(model, (X_val, y_val), k)   # [M*C, N*C]
        >>> f_val_t = ck.f0 + (ck.theta @ a_t).reshape(-1, C)          # a_t: [N*C]
    """
    _check_kernel(kernel)
    tangent = _tangent_for(model_or_tangent, kernel, params)
    if device is not None:
        tangent.to(torch.device(device))
    _check_metadata(tangent, kernel)
    xe, ye = as_arrays(eval_data, where=_FN)
    c = kernel.num_classes
    m = num_rows(xe)
    check_labels(ye, c, where=_FN)
    budget = parse_bytes(memory_budget) or default_budget(tangent.device)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
        raise TangentlabError(f"{_FN}: batch_size must be >= 1 (got {batch_size!r}).")
    xt = None
    if train_data is not None:
        xt, yt = as_arrays(train_data, where=_FN)
        _check_train_data(xt, yt, kernel)
    per_sample = c * tangent.num_params * tangent.dtype.itemsize * 3  # blocks + copies
    chunk = batch_size or max(1, min(256, budget // (4 * per_sample)))
    if progress:
        print(
            f"tangentlab: cross kernel of M={m} evaluation x N={kernel.num_samples} training "
            f"samples, C={c}, {kernel.metadata.get('projection', 'exact')}",
            file=sys.stderr,
            flush=True,
        )
    if kernel.features is not None:
        theta, f0, jw0, features = _projected_cross(tangent, xe, xt, kernel, chunk)
    else:
        if xt is None:
            raise TangentlabError(
                f"{_FN}: the kernel is exact, so the training Jacobians must be recomputed; "
                "pass train_data= (the data the kernel was computed on), or use a projected "
                "kernel (compute_kernel(..., projection=k)), whose features it keeps."
            )
        theta, f0, jw0 = exact_cross(tangent, xe, xt, (kernel.num_samples, c), chunk=chunk,
                                     budget=budget, batch_size=batch_size)  # fmt: skip
        features = None
    meta = {
        "eval_fingerprint": fingerprint(xe, ye),
        "num_eval": str(m),
        **{f"kernel_{k}": v for k, v in kernel.metadata.items() if k in _KEYS},
    }
    return CrossKernel(
        theta=theta.cpu(), f0=f0.cpu(), targets=ye, jw0=jw0.cpu(), features=features,
        metadata=meta,
    )  # fmt: skip


def _check_kernel(kernel: Any) -> None:
    if not isinstance(kernel, Kernel):
        raise TangentlabError(
            f"{_FN}: kernel must be a tangentlab.Kernel (from tl.compute_kernel), got "
            f"{type(kernel).__name__}."
        )
    if kernel.is_trace:
        raise TangentlabError(
            f"{_FN}: trace kernels (Theta ~= K (x) I_C) are not supported; compute the full "
            "training kernel (trace=False), exact or projected."
        )


def _projected_cross(tangent: Tangent, xe, xt, kernel: Kernel, chunk: int):
    """``(Φ_e Φᵀ, f0, J w0, Φ_e)`` through the kernel's projection (its features kept);
    ``xt`` (optional) checks that the features are the model's."""
    if xt is not None:
        _check_features(tangent, xt, kernel)
    feats, f0, jw0 = _projected_features(tangent, xe, num_rows(xe), chunk)
    phi = kernel.features.to(device=feats.device, dtype=feats.dtype)
    return feats @ phi.T, f0, jw0, feats.cpu()


_KEYS = ("request_sha", "weights_sha", "params", "projection", "dtype", "data_fingerprint")


def _tangent_for(model_or_tangent, kernel: Kernel, params: ParamSpec) -> Tangent:
    if isinstance(model_or_tangent, Tangent):
        if params is not None:
            raise TangentlabError(
                f"{_FN}: params= is set on the Tangent you passed; do not give it again."
            )
        return model_or_tangent
    if not isinstance(model_or_tangent, nn.Module):
        raise TangentlabError(
            f"{_FN}: model_or_tangent must be an nn.Module or a tangentlab.Tangent, got "
            f"{type(model_or_tangent).__name__}."
        )
    if params is None:
        params = _params_from_metadata(kernel)
    projection = None
    if kernel.features is not None:
        projection = _projection_from_metadata(kernel)
    return Tangent(model_or_tangent, params=params, projection=projection)


def _params_from_metadata(kernel: Kernel) -> ParamSpec:
    """The ``params=`` the kernel was computed with (``metadata['params_spec']``), or None."""
    spec = kernel.metadata.get("params_spec")
    if spec is None or spec == "None":
        return None
    if spec.startswith("[") or spec.startswith("("):
        try:
            return list(ast.literal_eval(spec))
        except (ValueError, SyntaxError):
            raise TangentlabError(
                f"{_FN}: cannot read the kernel's params_spec {spec!r}; pass params= "
                "explicitly (the trainable weights the kernel was computed with)."
            ) from None
    return spec


def _projection_from_metadata(kernel: Kernel) -> Projection:
    desc = kernel.metadata.get("projection", "")
    got = re.fullmatch(r"(\w+):k=(\d+):seed=(-?\d+)", desc)
    if got is None:
        raise TangentlabError(
            f"{_FN}: the kernel is projected but its metadata does not say how "
            f"(projection={desc!r}); pass the Tangent it was computed with "
            "(tl.Tangent(model, params=..., projection=tl.Projection(k, kind=..., seed=...)))."
        )
    kind, k, seed = got.group(1), int(got.group(2)), int(got.group(3))
    if k != kernel.projection_dim:
        raise TangentlabError(
            f"{_FN}: the kernel's metadata says k={k} but its features have "
            f"{kernel.projection_dim} columns; the kernel is inconsistent, recompute it."
        )
    return Projection(k, kind=kind, seed=seed)


def _check_metadata(tangent: Tangent, kernel: Kernel) -> None:
    """Compare the tangent with every field the kernel recorded (absent fields: unchecked)."""
    meta = kernel.metadata
    proj = tangent.projection.describe() if tangent.projection else "exact"
    if (kernel.features is None) != (tangent.projection is None):
        want = "exact" if kernel.features is None else f"projected (k={kernel.projection_dim})"
        raise TangentlabError(
            f"{_FN}: the kernel is {want} but the Tangent's projection is {proj}; use the "
            "Tangent the kernel was computed with."
        )
    checks = {
        "weights_sha": (tangent.weights_hash(), "the model's weights (and buffers) differ"),
        "params": (
            f"{len(tangent.param_names)} tensors, {tangent.num_params} weights, "
            f"sha {tangent.params_hash()}",
            "the trainable weights differ (pass params= as for compute_kernel)",
        ),
        "projection": (proj, "the projection (kind, k or seed) differs"),
        "dtype": (str(tangent.dtype).replace("torch.", ""), "the model's dtype differs"),
    }
    for key, (value, why) in checks.items():
        if key in meta and meta[key] != value:
            raise TangentlabError(
                f"{_FN}: this model does not match the kernel: {why} (kernel {key}="
                f"{meta[key]!r}, here {value!r}). Pass the model at the weights w0 the kernel "
                "was computed at, with the same params= and projection."
            )


def _check_train_data(xt, yt, kernel: Kernel) -> None:
    n = num_rows(xt)
    if n != kernel.num_samples:
        raise TangentlabError(
            f"{_FN}: train_data has {n} samples but the kernel has N={kernel.num_samples}; "
            "pass the data the kernel was computed on."
        )
    fp = kernel.metadata.get("data_fingerprint")
    if fp is not None and fp != fingerprint(xt, yt):
        raise TangentlabError(
            f"{_FN}: train_data is not the data the kernel was computed on (its fingerprint "
            "differs); pass the same (X, y), in the same order."
        )


def _check_features(tangent: Tangent, xt, kernel: Kernel) -> None:
    """Recompute the first training samples' projected Jacobians and compare."""
    s = min(_CHECK_SAMPLES, kernel.num_samples)
    phi, _, _ = tangent.projected_chunk(take(xt, slice(0, s)))
    mine = phi.reshape(s * kernel.num_classes, -1).double().cpu()
    ref = kernel.features[: s * kernel.num_classes].double()
    scale = float(ref.abs().max()) or 1.0
    tol = 1e-6 if tangent.dtype == torch.float64 else 1e-3
    if float((mine - ref).abs().max()) > tol * scale:
        raise TangentlabError(
            f"{_FN}: the projected Jacobians of the first training samples differ from the "
            "kernel's features: another model, weights, params= or projection. Pass the model "
            "(or Tangent) the kernel was computed with."
        )


def _projected_features(tangent: Tangent, xe, m: int, chunk: int):
    feats, f0s, jw0s = [], [], []
    for s in range(0, m, chunk):
        xb = take(xe, slice(s, min(m, s + chunk)))
        phi, f0b, jw0b = tangent.projected_chunk(xb)
        check_output(f0b, num_rows(xb), _FN)
        feats.append(phi.reshape(-1, phi.shape[-1]))
        f0s.append(f0b)
        jw0s.append(jw0b)
    return torch.cat(feats), torch.cat(f0s), torch.cat(jw0s)


# NOTE [exact cross kernel paths]. An exact cross kernel takes the path compute_kernel takes
# for the training kernel (NOTE [jacobian modes] in tangentlab.tangent): a model the
# Jacobian-free gram path covers (tangentlab.gram) is contracted from layer factors,
# J(X_e) J(X)^T = sum_l <u, u'> <g, g'>, never forming a P-sized Jacobian; a model covered in
# part is split, Theta = Theta_gram(covered weights) + J_rest(X_e) J_rest(X)^T, J w0 likewise
# summed over the two parts; anything else, or an explicit Jacobian mode, uses the Jacobians.
def exact_cross(tangent: Tangent, xe, xt, nc: tuple[int, int], *, chunk: int, budget: int,
                batch_size: int | None = None):  # fmt: skip
    """``(J(X_e) J(X)^T [M C, N C], f0 [M, C], J(X_e) w0 [M, C])`` of any exact
    ``tangent`` (its C outputs may be probes) by the cheapest exact path (NOTE [exact cross
    kernel paths]); ``nc`` = (N, C) of the training side."""
    m = num_rows(xe)
    per_sample = nc[1] * tangent.num_params * tangent.dtype.itemsize * 3
    if tangent.jacobian_mode in (JacobianMode.AUTO, JacobianMode.GRAM):
        x2 = take(xe, slice(0, min(2, m)))  # two samples: see compute._prepare
        elements = tangent.gram_elements(x2)
        if elements is not None:
            return _gram_cross(tangent, xe, xt, m, nc, budget, elements, batch_size)
        covered = tangent.gram_covered(x2)
        if 0 < len(covered) < len(tangent.param_names):
            part = tangent.restricted(covered)
            elements = part.gram_elements(x2)
            if elements is not None:
                rest = tangent.restricted([n for n in tangent.param_names if n not in covered])
                th_g, f0, jw_g = _gram_cross(part, xe, xt, m, nc, budget, elements,
                                             batch_size)  # fmt: skip
                per_rest = nc[1] * rest.num_params * rest.dtype.itemsize * 3
                th_j, _, jw_j = _exact_cross(rest, xe, xt, m, nc, chunk, budget, per_rest)
                return th_g.add_(th_j), f0, jw_g + jw_j
    return _exact_cross(tangent, xe, xt, m, nc, chunk, budget, per_sample)


def _gram_cross(tangent: Tangent, xe, xt, m: int, nc: tuple[int, int], budget: int,
                elements: int, batch_size: int | None):  # fmt: skip
    """``J(X_e) J(X)^T`` from layer factors (tangentlab.gram): strips of evaluation samples
    whose factors are held while the training samples' factors stream past."""
    n, c = nc
    per = max(1, elements) * tangent.dtype.itemsize * 3  # factors + transient blocks
    chunk = batch_size or max(1, min(256, budget // (4 * per)))
    strip = max(chunk, budget // (2 * per))
    theta = torch.empty(m * c, n * c, dtype=tangent.dtype, device=tangent.device)
    f0s, jw0s = [], []
    for s in range(0, m, strip):
        e = min(m, s + strip)
        held = []
        for a in range(s, e, chunk):
            xb = take(xe, slice(a, min(e, a + chunk)))
            fac = tangent.gram_factors(xb)
            check_output(fac.f0, num_rows(xb), _FN)
            f0s.append(fac.f0)
            jw0s.append(fac.jw0)
            held.append((a, fac))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            fb = tangent.gram_factors(take(xt, slice(a, b)))
            for p, fa in held:
                gram_block(fa, fb, theta[p * c : (p + fa.b) * c, a * c : b * c])
            del fb
        del held
    return theta, torch.cat(f0s), torch.cat(jw0s)


def _exact_cross(tangent: Tangent, xe, xt, m: int, nc: tuple[int, int], chunk: int,
                 budget: int, per_sample: int):  # fmt: skip
    """``J(X_e) J(X)^T`` in strips of evaluation samples whose Jacobians are held while the
    training Jacobians stream past (recomputed once per strip)."""
    n, c = nc
    names = tangent.param_names
    strip = max(chunk, budget // (2 * per_sample))
    theta = torch.empty(m * c, n * c, dtype=tangent.dtype, device=tangent.device)
    f0s, jw0s = [], []
    for s in range(0, m, strip):
        e = min(m, s + strip)
        held: dict[str, list[torch.Tensor]] = {nm: [] for nm in names}
        for a in range(s, e, chunk):
            xb = take(xe, slice(a, min(e, a + chunk)))
            blocks = tangent.jacobian_blocks(xb)
            f0b = tangent.f0(xb)
            check_output(f0b, num_rows(xb), _FN)
            f0s.append(f0b)
            jw0s.append(tangent.jw0(blocks))
            for nm in names:
                held[nm].append(blocks[nm].reshape(-1, blocks[nm].shape[-1]))
            del blocks
        rows = {nm: torch.cat(v) for nm, v in held.items()}
        del held
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            blocks = tangent.jacobian_blocks(take(xt, slice(a, b)))
            theta[s * c : e * c, a * c : b * c] = sum(
                rows[nm] @ blocks[nm].reshape((b - a) * c, -1).T for nm in names
            )
            del blocks
    return theta, torch.cat(f0s), torch.cat(jw0s)

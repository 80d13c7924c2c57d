"""Kernel growth: forecasts with a time-varying kernel scale s(t) measured by trace probes.

The tangent model freezes the kernel at w0. Real fine-tuning of a pre-trained network with a
fresh head moves the kernel, and mostly *grows* it: the features entering the head grow
and the head's gradients with respect to the block below grow with them (measured in
benchmarks/RESULTS.md, section "fidelity"). To first order the change is a scale,

.. math::
    \\Theta(w_t) \\approx s(t)\\, \\Theta(w_0), \\qquad
    s(t) = \\frac{\\operatorname{tr}\\Theta(w_t)}{\\operatorname{tr}\\Theta(w_0)},

and the forecast keeps the eigenvectors of Θ(w0) while every mode decays at the scaled
rate. Full-batch MSE, plain steps (η̃ = η/(1-m)):

.. math::
    L_t = \\frac{1}{2N} \\sum_j \\Big(\\prod_{\\tau < t} \\big(1 - \\tilde\\eta\\, s(\\tau)
          \\lambda_j / N\\big)\\Big)^2 (u_j^T r_0)^2

(heavy-ball momentum and weight decay iterate the same modes, O(modes) per step; CE and
minibatch SGD iterate in function space with Θ replaced by s(t) Θ).

s(t) comes from cheap **trace probes** at a few weight points, with no training: the
tangent model's own forecast of the weights, w0 + Δw(t) with

.. math::
    \\Delta w(t) = J(X)^T a_t, \\qquad a_t = -\\frac{\\eta}{N} \\sum_{\\tau<t}
                   (\\text{momentum-weighted}\\ \\delta_\\tau)

one vector-Jacobian product per probe step (:func:`tangent_displacement`), and the
Hutchinson estimate of tr Θ(w)/n on n samples (:func:`kernel_trace`): for Rademacher
output signs s_i ∈ {±1}^C, E‖J(x_i)^T s_i‖² = tr Θ_ii, one reverse pass per probe for a
whole chunk of samples (per-sample gradients from layer inputs and output gradients,
tangentlab.structured). The same samples and signs are used at every weight point
(common random numbers), so the *ratio* s(t) is much more precise than either trace.

NOTE [growth form]
Which s(t)? Measured on EfficientNet-Lite0 / Fashion-MNIST 32 px (benchmarks/fidelity.py,
RESULTS.md "fidelity"): at real checkpoints the trace first *falls* (s ≈ 0.5-0.95 after 15
steps) and then grows to s ≈ 1.8-2.2 by step 150 (1.07 at the smallest lr); along the tangent
model's own weight forecast it shows the same dip and a smaller rise (s(150) = 0.56-1.79;
0.51-1.73 after three fixed-point iterations). A monotone form cannot represent the dip,
so the default is:

- ``"interp"``: piecewise linear between the probed steps (s(0) = 1), constant after the
  last one. No assumption on the shape; needs probes spread over the horizon.

Two monotone fits are kept for comparison (both measured worse, for that reason):

- ``"saturating"``: s(t) = 1 + a (1 - exp(-t/τ)) fitted to the probes (least squares).
- ``"displacement"``: s = 1 + c·d(t), d(t) = ‖Δw(t)‖ / max_τ ‖Δw(τ)‖ the tangent model's
  own displacement curve, c fitted (to first order the kernel changes in proportion to
  the displacement).

Measured there, the growth forecast from these probes does *not* beat the plain tangent
model across settings (it helps with momentum at lr 0.003, hurts at small lr), while the
same scalar model fed with probes at real checkpoints halves the steps error: hence an
option, off by default. A scalar s(t) scales every mode alike; the top mode then crosses
the stability limit η̃ s λ_max/N = 2 in some settings where real training stays stable
(the real kernel's growth is not uniform across its spectrum): ``Forecast.diverges``
reports it.

Zancato et al., 2020, "Predicting training time without training",
https://arxiv.org/abs/2008.12478 (the tangent-model forecast this corrects); Fort et al.,
2020, "Deep learning versus kernel learning", https://arxiv.org/abs/2010.15110 (the
kernel's fast early change and growth during training).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab.data import as_arrays, num_rows, take, to_device
from tangentlab.errors import TangentlabError
from tangentlab.kernel import Kernel
from tangentlab.structured import Unsupported, _per_sample, capture_calls
from tangentlab.tangent import ParamSpec, Tangent

_FORMS = ("interp", "saturating", "displacement")
_CHUNK = 64  # samples per probe chunk (per-sample gradients of one chunk: chunk x P floats)


# ---------------------------------------------------------------------------------------
# The growth model.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelGrowth:
    """A kernel scale s(t) = tr Θ(w_t) / tr Θ(w0) over optimizer steps.

    Build it with :func:`estimate_growth` (trace probes, no training) or directly from
    measured values, e.g. ``KernelGrowth(steps=[0, 50, 150], scale=[1.0, 1.8, 2.1])``.
    Pass it to :func:`tangentlab.forecast` as ``kernel_growth=``.

    Attributes:
      steps: the probed steps, ``[K]`` increasing, starting at 0.
      scale: s at ``steps``, ``[K]`` (s(0) = 1 by definition).
      form: how s is read between and after the probes (NOTE [growth form]):
        ``"interp"``, ``"saturating"`` or ``"displacement"``.
      params: fitted parameters of the form (``a``, ``tau`` / ``c``), and for
        ``"displacement"`` the normalized displacement curve ``d`` ``[T+1]``.
      info: provenance (probes, samples, seconds, traces, what the weights were).
    """

    steps: np.ndarray
    scale: np.ndarray
    form: str = "interp"
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.float64).reshape(-1)
        scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        if steps.shape != scale.shape or steps.size == 0:
            raise TangentlabError(
                f"KernelGrowth: steps and scale must be 1-D of the same non-zero length, got "
                f"{steps.shape} and {scale.shape}; e.g. steps=[0, 50], scale=[1.0, 1.5]."
            )
        if not (np.all(np.isfinite(steps)) and np.all(np.isfinite(scale))):
            raise TangentlabError("KernelGrowth: steps and scale must be finite numbers.")
        if np.any(np.diff(steps) <= 0) or steps[0] < 0:
            raise TangentlabError(
                f"KernelGrowth: steps must be increasing and >= 0, got {steps.tolist()}."
            )
        if np.any(scale <= 0):
            raise TangentlabError(
                f"KernelGrowth: scale must be > 0 (a kernel trace ratio), got {scale.tolist()}."
            )
        if self.form not in _FORMS:
            raise TangentlabError(
                f"KernelGrowth: form must be one of {list(_FORMS)}, got {self.form!r}."
            )
        if self.form == "displacement" and "d" not in self.params:
            raise TangentlabError(
                "KernelGrowth: form='displacement' needs params['d'], the normalized "
                "displacement curve; build it with estimate_growth(..., form='displacement')."
            )
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "scale", scale)

    @classmethod
    def constant(cls, value: float = 1.0) -> KernelGrowth:
        """s(t) = ``value`` at every step (``1.0``: the plain tangent-model forecast)."""
        return cls(steps=np.zeros(1), scale=np.full(1, float(value)))

    def schedule(self, steps: int) -> np.ndarray:
        """s(t) for the kernel used by step t -> t+1, t = 0..T-1: ``[T]``."""
        t = np.arange(int(steps), dtype=np.float64)
        if self.form == "interp":
            if self.steps.size == 1:
                return np.full(t.shape, self.scale[0])
            return np.interp(t, self.steps, self.scale)
        if self.form == "saturating":
            a, tau = self.params["a"], self.params["tau"]
            return 1.0 + a * -np.expm1(-t / tau)
        d = np.asarray(self.params["d"], dtype=np.float64)
        d = np.interp(t, np.arange(d.size), d)  # constant beyond the curve's horizon
        return 1.0 + self.params["c"] * d

    def max_scale(self, steps: int) -> float:
        """max_t s(t) over the first ``steps`` steps (for the stability criterion)."""
        s = self.schedule(max(int(steps), 1))
        return float(max(s.max(), 1e-300))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        params = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                  for k, v in self.params.items() if k != "d"}  # fmt: skip
        return {
            "steps": self.steps.tolist(), "scale": self.scale.tolist(), "form": self.form,
            "params": params, "info": dict(self.info),
        }  # fmt: skip


def fit_growth(
    steps: Sequence[float],
    scale: Sequence[float],
    *,
    form: str = "interp",
    displacement: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
) -> KernelGrowth:
    """Fit a :class:`KernelGrowth` of ``form`` to measured ``(steps, scale)`` points.

    Args:
      steps: probed steps ``[K]`` (0 may be omitted: s(0) = 1 is added).
      scale: measured trace ratios tr Θ(w_t)/tr Θ(w0) at ``steps``, ``[K]``.
      form: ``"interp"``, ``"saturating"`` (s = 1 + a(1 - e^{-t/τ}), least squares over
        a grid of τ with a in closed form) or ``"displacement"`` (s = 1 + c·d(t), c by least
        squares; needs ``displacement``).
      displacement: ‖Δw(t)‖ of the tangent model's forecast at every step 0..T, ``[T+1]``
        (``"displacement"`` only).
    """
    if form not in _FORMS:
        raise TangentlabError(f"fit_growth: form must be one of {list(_FORMS)}, got {form!r}.")
    st = np.asarray(steps, dtype=np.float64).reshape(-1)
    sc = np.asarray(scale, dtype=np.float64).reshape(-1)
    if st.shape != sc.shape:
        raise TangentlabError(
            f"fit_growth: steps and scale must have the same length, got {st.size} and {sc.size}."
        )
    if st.size == 0 or st[0] != 0:
        st, sc = np.r_[0.0, st], np.r_[1.0, sc]
    order = np.argsort(st, kind="stable")
    st, sc = st[order], sc[order]
    params: dict[str, Any] = {}
    if form == "saturating":
        y = sc - 1.0
        best = (math.inf, 0.0, 1.0)
        horizon = max(float(st[-1]), 1.0)
        for tau in np.geomspace(horizon / 200, horizon * 20, 400):
            g = -np.expm1(-st / tau)
            den = float(g @ g)
            a = float(g @ y) / den if den > 0 else 0.0
            err = float(((a * g - y) ** 2).sum())
            if err < best[0]:
                best = (err, a, float(tau))
        params = {"a": best[1], "tau": best[2]}
    elif form == "displacement":
        if displacement is None:
            raise TangentlabError(
                "fit_growth: form='displacement' needs displacement=‖Δw(t)‖ [T+1]; use "
                "estimate_growth(..., form='displacement'), which computes it."
            )
        disp = np.asarray(displacement, dtype=np.float64).reshape(-1)
        top = float(disp.max()) if disp.size else 0.0
        d = disp / top if top > 0 else np.zeros_like(disp)
        x = np.interp(st, np.arange(d.size), d)
        den = float(x @ x)
        params = {"c": float(x @ (sc - 1.0)) / den if den > 0 else 0.0, "d": d}
    return KernelGrowth(steps=st, scale=sc, form=form, params=params, info=dict(info or {}))


# ---------------------------------------------------------------------------------------
# Numerics: modes and function-space steps with a time-varying kernel scale.
# ---------------------------------------------------------------------------------------


def scaled_mode_states(
    problem: dyn.SpectralMSE,
    times: np.ndarray,
    *,
    scale_t: np.ndarray,
    weight_decay: float,
    scheme: str,
    lr: float,
    momentum: float = 0.0,
    chunk: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
    """As :func:`tangentlab.dynamics.mode_states`, with the kernel part scaled by s(t).

    Mode j has curvature ``h_j(t) = s(t) λ_j/N + λ_wd`` (the two modes outside span(U):
    λ_wd) and offset ``b_j``; step t -> t+1 uses ``s(t) = scale_t[t]``:

    - ``"gd"``:  x_{t+1} = x_t - lr (h(t) x_t - b)   (λ_wd = 0: the product
      x_t = Π_{τ<t} (1 - lr s(τ) λ_j/N) x_0);
    - ``"flow"``: s constant over [t, t+1): x_{t+1} = x*_t + exp(-lr h(t)) (x_t - x*_t);
    - ``"heavy_ball"``: buf = m buf + (h(t) x - b); x -= lr buf.

    O(modes) per step; ``scale_t`` must hold at least ``max(times)`` entries.
    """
    kern = problem.h - weight_decay  # λ_j / N (0 for the two modes outside span(U))
    b = problem.b
    x = problem.x0.copy()
    buf = np.zeros_like(x)
    out = np.empty((x.size, min(chunk, max(len(times), 1))))
    filled, start, t_now = 0, 0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        for i, t_want in enumerate(times):
            while t_now < t_want:
                h = scale_t[t_now] * kern + weight_decay
                if scheme == "gd":
                    x -= lr * (h * x - b)
                elif scheme == "flow":
                    pos = h > 0
                    xs = np.where(pos, b / np.where(pos, h, 1.0), x)
                    x = xs + np.exp(-lr * h) * (x - xs)
                else:
                    buf *= momentum
                    buf += h * x - b
                    x -= lr * buf
                t_now += 1
            out[:, filled] = x
            filled += 1
            if filled == out.shape[1] or i == len(times) - 1:
                yield start, out[:, :filled].copy()
                start, filled = i + 1, 0


def scaled_spectral_loss(
    problem: dyn.SpectralMSE, steps: int, *, scale_t: np.ndarray, weight_decay: float, **scheme
) -> np.ndarray:
    """MSE at every step 0..T with the kernel scaled by s(t), ``[T+1]``."""
    states = functools.partial(scaled_mode_states, scale_t=scale_t, weight_decay=weight_decay)
    return dyn.spectral_loss(problem, steps, states=states, **scheme)


def scaled_spectral_accuracy(
    problem: dyn.SpectralMSE,
    times: np.ndarray,
    targets: np.ndarray,
    *,
    scale: float,
    scale_t: np.ndarray,
    weight_decay: float,
    **scheme,
) -> np.ndarray:
    """Accuracy at ``times`` with the kernel scaled by s(t) (as ``dynamics.spectral_accuracy``)."""
    states = functools.partial(scaled_mode_states, scale_t=scale_t, weight_decay=weight_decay)
    return dyn.spectral_accuracy(problem, times, targets, scale=scale, states=states, **scheme)


def scaled_iterate_trajectory(op: Any, f0: np.ndarray, targets: np.ndarray,
                              anchor: np.ndarray, *, scale_t: np.ndarray,
                              **kw: Any) -> dyn.Trajectory:  # fmt: skip
    r""":func:`tangentlab.dynamics.iterate_trajectory` with Θ replaced by s(t) Θ at step t.

    .. math::
        G_t = s(t)\, \tfrac{1}{|b_t|} \Theta_{:, b_t} \delta_{b_t}(f_t) + \lambda (f_t - a)

    Same arguments, plus ``scale_t`` ``[>= T]``.
    """
    return dyn.iterate_trajectory(op, f0, targets, anchor, scale_t=scale_t, **kw)


# ---------------------------------------------------------------------------------------
# The tangent model's own forecast of the weights.
# ---------------------------------------------------------------------------------------


def displacement_coefficients(
    theta_matvec: Any,
    f0: np.ndarray,
    targets: np.ndarray,
    *,
    lr: float,
    momentum: float,
    steps: Sequence[int],
    loss: str = "mse",
    scale: float = 1.0,
    scale_t: np.ndarray | None = None,
    horizon: int | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    r"""Coefficients ``a_t`` ``[N, C]`` with Δw(t) = J(X)^T a_t for full-batch SGD.

    Torch SGD on the tangent model (heavy ball, dampening 0), in the span of the Jacobian
    rows: the gradient is g_t = J^T δ_t / N, so the buffer and the displacement are
    ``J^T`` times function-space coefficients::

        β_t = m β_{t-1} + δ(f_t)/N,    a_{t+1} = a_t - η β_t,
        f_{t+1} = f_t - η s(t) Θ β_t            (s = 1: the plain tangent model)

    Also returns ‖Δw(t)‖ at every step 0..T (``sqrt(a_t^T Θ a_t)``), ``[T+1]``, with T =
    ``horizon`` (default: the last of ``steps``).

    Args:
      theta_matvec: ``x [NC] -> Θ x``.
      steps: the steps t whose a_t is wanted.
      scale_t: s(t) per step (``None``: 1), at least T entries.
    """
    n, c = f0.shape
    horizon = max([*steps, horizon or 0])
    f = f0.reshape(-1).copy()
    beta = np.zeros_like(f)
    a = np.zeros_like(f)
    ta = np.zeros_like(f)  # Θ a
    want = set(int(t) for t in steps)
    out: dict[int, np.ndarray] = {}
    norms = np.zeros(horizon + 1)
    if 0 in want:
        out[0] = a.reshape(n, c).copy()
    for t in range(horizon):
        d = dyn.loss_grad(f.reshape(n, c), targets, loss=loss, scale=scale).reshape(-1) / n
        beta = momentum * beta + d
        tb = theta_matvec(beta)
        a = a - lr * beta
        ta = ta - lr * tb
        s = 1.0 if scale_t is None else float(scale_t[t])
        f = f - lr * s * tb
        norms[t + 1] = math.sqrt(max(float(a @ ta), 0.0))
        if t + 1 in want:
            out[t + 1] = a.reshape(n, c).copy()
    return out, norms


def _kernel_matvec(kernel: Kernel):
    if kernel.theta is not None:
        theta = kernel.theta.detach().cpu().double().numpy()
        return lambda x: theta @ x
    phi = kernel.features.detach().cpu().double().numpy()
    return lambda x: phi @ (phi.T @ x)


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


# ---------------------------------------------------------------------------------------
# Trace probes.
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# The whole estimate: displacement forecast + probes + fit.
# ---------------------------------------------------------------------------------------


def estimate_growth(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    kernel: Kernel,
    *,
    lr: float,
    steps: int,
    momentum: float = 0.0,
    loss: str = "mse",
    target_scale: float = 1.0,
    params: ParamSpec = None,
    probe_steps: Sequence[int] | None = None,
    probes: int = 4,
    samples: int | None = 64,
    form: str = "interp",
    iterations: int = 1,
    seed: int = 0,
) -> KernelGrowth:
    r"""Kernel growth s(t) along the tangent model's own weight forecast — no training.

    For each probe step t: Δw(t) = J(X)^T a_t from the tangent model's full-batch SGD
    (:func:`displacement_coefficients`, one VJP over the N samples), then
    s(t) = tr Θ(w0 + Δw(t)) / tr Θ(w0) by :func:`kernel_trace`, then :func:`fit_growth`.
    With ``iterations > 1`` the displacement is recomputed with the previous s(t) (a
    fixed-point iteration: a grown kernel moves the outputs faster).

    Args:
      model_or_tangent, data: as :func:`tangentlab.compute_kernel` (the same data as
        ``kernel``).
      kernel: the kernel at w0 of the same model, data and trainable weights.
      lr, steps, momentum, loss, target_scale: the training to forecast (full batch; for a
        minibatch forecast pass its lr: the mean path follows the full-batch one).
      probe_steps: the steps to probe; default: 4 steps spread over the first half of
        the horizon where the tangent model's loss falls (``T/16, T/8, T/4, T/2``).
      probes, samples, seed: as :func:`kernel_trace`.
      form: :func:`fit_growth`'s form.
      iterations: fixed-point iterations (>= 1).

    Returns:
      A :class:`KernelGrowth` whose ``info`` holds the traces, their standard errors, the
      probe weights' displacement norms and the seconds spent.
    """
    fn = "estimate_growth"
    t_start = time.perf_counter()
    if isinstance(model_or_tangent, Tangent):
        tangent = model_or_tangent
    else:
        tangent = Tangent(model_or_tangent, params=params)
    if not isinstance(kernel, Kernel):
        raise TangentlabError(f"{fn}: kernel must be a tangentlab.Kernel, got {type(kernel)}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise TangentlabError(f"{fn}: steps must be an integer >= 1, got {steps!r}.")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise TangentlabError(f"{fn}: iterations must be an integer >= 1, got {iterations!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise TangentlabError(f"{fn}: lr must be a finite number > 0, got {lr!r}.")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise TangentlabError(f"{fn}: momentum must lie in [0, 1), got {momentum!r}.")
    if loss not in ("mse", "ce"):
        raise TangentlabError(f"{fn}: loss must be 'mse' or 'ce', got {loss!r}.")
    if form not in _FORMS:
        raise TangentlabError(f"{fn}: form must be one of {list(_FORMS)}, got {form!r}.")
    if probe_steps is None:
        probe_steps = sorted({max(1, steps // 16), max(1, steps // 8), max(1, steps // 4),
                              max(1, steps // 2)})  # fmt: skip
    probe_steps = [int(t) for t in probe_steps]
    if any(t < 1 or t > steps for t in probe_steps):
        raise TangentlabError(
            f"{fn}: probe_steps must lie in [1, steps={steps}], got {probe_steps}."
        )
    x, y = as_arrays(data, where=fn)
    if num_rows(x) != kernel.num_samples:
        raise TangentlabError(
            f"{fn}: data has {num_rows(x)} samples but the kernel {kernel.num_samples}; "
            "pass the data the kernel was computed on."
        )
    f0 = kernel.f0.detach().cpu().double().numpy()
    targets = kernel.targets.numpy()
    scale = float(target_scale) if loss == "mse" else 1.0
    matvec = _kernel_matvec(kernel)
    w0 = flat_weights(tangent)
    growth: KernelGrowth | None = None
    t_disp = t_probe = 0.0
    for _ in range(iterations):
        sched = None if growth is None else growth.schedule(steps)
        t0 = time.perf_counter()
        coefs, norms = displacement_coefficients(
            matvec, f0, targets, lr=float(lr), momentum=float(momentum), steps=probe_steps,
            loss=loss, scale=scale, scale_t=sched, horizon=steps,
        )  # fmt: skip
        moved = [w0 + tangent_displacement(tangent, (x, y), coefs[t]) for t in probe_steps]
        t_disp += time.perf_counter() - t0
        probe = kernel_trace(tangent, (x, y), [None, *moved], probes=probes, samples=samples,
                             seed=seed)  # fmt: skip
        t_probe += probe.seconds
        info = {
            "weights": "tangent-model forecast w0 + J^T a_t (no training)",
            "trace": probe.trace.tolist(), "stderr": probe.stderr.tolist(),
            "probes": probes, "samples": int(probe.samples.size),
            "displacement_norm": [float(norms[t]) for t in probe_steps],
            "seconds_displacement": t_disp, "seconds_probes": t_probe,
            "displacement_curve": norms.tolist(),
        }  # fmt: skip
        growth = fit_growth(probe_steps, probe.ratio[1:], form=form, displacement=norms,
                            info=info)  # fmt: skip
    growth.info["seconds"] = time.perf_counter() - t_start
    return growth


def probe_growth(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    checkpoints: Mapping[int, Any],
    *,
    params: ParamSpec = None,
    probes: int = 4,
    samples: int | None = 64,
    form: str = "interp",
    seed: int = 0,
) -> KernelGrowth:
    """Kernel growth from probes at given weights (e.g. real fine-tuning checkpoints).

    Args:
      checkpoints: ``{step: weights}`` with weights as in :func:`kernel_trace` (a module,
        a dict or a flat ``[P]`` tensor).
    """
    if isinstance(model_or_tangent, Tangent):
        tangent = model_or_tangent
    else:
        tangent = Tangent(model_or_tangent, params=params)
    steps = sorted(int(s) for s in checkpoints)
    if not steps or steps[0] < 1:
        raise TangentlabError(
            f"probe_growth: checkpoints must be {{step >= 1: weights}}, got steps {steps}."
        )
    probe = kernel_trace(tangent, data, [None, *(checkpoints[s] for s in steps)],
                         probes=probes, samples=samples, seed=seed)  # fmt: skip
    info = {"weights": "given checkpoints", "trace": probe.trace.tolist(),
            "stderr": probe.stderr.tolist(), "seconds": probe.seconds}  # fmt: skip
    return fit_growth(steps, probe.ratio[1:], form=form, info=info)


__all__ = [
    "KernelGrowth",
    "TraceProbe",
    "estimate_growth",
    "fit_growth",
    "flat_weights",
    "kernel_trace",
    "probe_growth",
    "scaled_iterate_trajectory",
    "scaled_mode_states",
    "scaled_spectral_accuracy",
    "scaled_spectral_loss",
    "tangent_displacement",
]

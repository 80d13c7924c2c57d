"""Experimental kernel growth: forecasts with a kernel scale s(t) measured by trace probes.

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

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab.data import as_arrays, num_rows
from tangentlab.errors import TangentlabError
from tangentlab.forecast import Forecast, _Prepared, bind, check_options, forecast_settings
from tangentlab.kernel import Kernel
from tangentlab.probes import flat_weights, kernel_trace, tangent_displacement
from tangentlab.tangent import ParamSpec, Tangent
from tangentlab.training import SGD, Loss, as_loss, as_optimizer, is_int

_FORMS = ("interp", "saturating", "displacement")


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


def _kernel_matvec(kernel: Kernel):
    if kernel.theta is not None:
        theta = kernel.theta.detach().cpu().double().numpy()
        return lambda x: theta @ x
    phi = kernel.features.detach().cpu().double().numpy()
    return lambda x: phi @ (phi.T @ x)



def estimate_growth(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    kernel: Kernel,
    optimizer: SGD,
    steps: int,
    *,
    loss: Loss | str = "mse",
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
    (:func:`tangentlab.dynamics.displacement_coefficients`), s(t) = tr Θ(w0 + Δw(t)) /
    tr Θ(w0) by :func:`tangentlab.kernel_trace`, then :func:`fit_growth`; ``iterations > 1``
    recomputes the displacement with the previous s(t) (a fixed-point iteration).

    Args:
      model_or_tangent, data: as :func:`tangentlab.compute_kernel` (the same data as
        ``kernel``).
      kernel: the kernel at w0 of the same model, data and trainable weights.
      optimizer, steps, loss: the training to forecast (full batch; for a minibatch
        forecast pass the same optimizer: the mean path follows the full-batch one).
      probe_steps: the steps to probe; default ``T/16, T/8, T/4, T/2``.
      probes, samples, seed: as :func:`tangentlab.kernel_trace`.
      form: :func:`fit_growth`'s form.
      iterations: fixed-point iterations (>= 1).

    Returns:
      A :class:`KernelGrowth` whose ``info`` holds the traces, their standard errors, the
      probe weights' displacement norms and the seconds spent.
    """
    fn = "estimate_growth"
    t_start = time.perf_counter()
    tangent = (model_or_tangent if isinstance(model_or_tangent, Tangent)
               else Tangent(model_or_tangent, params=params))  # fmt: skip
    optimizer, loss = as_optimizer(optimizer, fn), as_loss(loss, fn)
    probe_steps = _check_growth_args(fn, kernel, steps, iterations, form, probe_steps)
    x, y = as_arrays(data, where=fn)
    if num_rows(x) != kernel.num_samples:
        raise TangentlabError(
            f"{fn}: data has {num_rows(x)} samples but the kernel {kernel.num_samples}; "
            "pass the data the kernel was computed on."
        )
    f0 = kernel.f0.detach().cpu().double().numpy()
    targets = kernel.targets.numpy()
    matvec = _kernel_matvec(kernel)
    w0 = flat_weights(tangent)
    growth: KernelGrowth | None = None
    t_disp = t_probe = 0.0
    for _ in range(iterations):
        t0 = time.perf_counter()
        coefs, norms = dyn.displacement_coefficients(
            matvec, f0, targets, lr=optimizer.lr, momentum=optimizer.momentum,
            steps=probe_steps, loss=loss.name, scale=loss.target_scale,
            scale_t=None if growth is None else growth.schedule(steps), horizon=steps,
            lr_schedule=optimizer.lr_multipliers(steps),
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


def _check_growth_args(fn, kernel, steps, iterations, form, probe_steps) -> list[int]:
    if not isinstance(kernel, Kernel):
        raise TangentlabError(f"{fn}: kernel must be a tangentlab.Kernel, got {type(kernel)}.")
    if not (is_int(steps) and steps >= 1):
        raise TangentlabError(f"{fn}: steps must be an integer >= 1, got {steps!r}.")
    if not (is_int(iterations) and iterations >= 1):
        raise TangentlabError(f"{fn}: iterations must be an integer >= 1, got {iterations!r}.")
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
    return probe_steps


def forecast(
    kernel: Kernel,
    optimizer: SGD,
    steps: int,
    *,
    growth: KernelGrowth,
    **options: Any,
) -> Forecast:
    r"""A forecast whose step t uses the kernel s(t) Θ(w0) (:class:`KernelGrowth`).

    Full-batch MSE: every mode decays at the scaled rate, Π_τ (1 - η̃ s(τ) λ_j/N);
    otherwise the exact discrete steps with Θ scaled per step. Not with ``noise="sde"``,
    gradient flow off the closed form, or ``dataset_size``. Other arguments as
    :func:`tangentlab.forecast`.
    """
    fn = "experimental.growth.forecast"
    if not isinstance(growth, KernelGrowth):
        raise TangentlabError(
            f"{fn}: growth must be a KernelGrowth, got {type(growth).__name__}; build one "
            "with estimate_growth(...) or KernelGrowth.constant(1.0)."
        )
    if "dataset_size" in options:
        raise TangentlabError(f"{fn}: dataset_size (subsample extrapolation) is not supported.")
    s = bind(fn, check_options(fn, optimizer, steps, **options), kernel)
    closed = not s.stochastic and s.loss.name == "mse" and s.execution in ("auto", "spectral")
    if s.stochastic and s.noise == "sde":
        raise TangentlabError(
            f"{fn}: growth is applied per step of the exact minibatch simulation; "
            "noise='sde' is not supported with it. Use noise='simulate'."
        )
    if s.time == "continuous" and not closed:
        raise TangentlabError(
            f"{fn}: growth with time='continuous' needs the full-batch MSE closed form "
            "(loss MSE, execution='auto'); use time='discrete'."
        )
    s = replace(s, kernel_scale=growth.schedule(max(s.steps, 1)))
    fc = forecast_settings(_Prepared(kernel), s)
    fc.method["kernel_growth"] = growth.to_dict()
    return fc


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



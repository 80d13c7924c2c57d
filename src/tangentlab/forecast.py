"""Forecast fine-tuning loss and accuracy curves from a :class:`~tangentlab.kernel.Kernel`.

:func:`forecast` turns one kernel and SGD hyper-parameters into a :class:`Forecast` (loss
and accuracy at every step 0..T, steps to a target, divergence); :func:`sweep` does it for
a grid of hyper-parameters, decomposing the kernel once. The numerics are in
:mod:`tangentlab.dynamics`; conventions are DESIGN.md §2-§3 (MSE = ½‖f - s·onehot(y)‖²
summed over outputs, CE = -log softmax(f)_y, both averaged over samples; SGD exactly as
``torch.optim.SGD(lr, momentum, weight_decay, dampening=0)``; time in steps).

Which solver runs (``Forecast.method["solver"]`` says):

================================  ===========================================================
full batch, MSE                   closed form from ``kernel.eigh()`` (cached): exact discrete
                                  steps, exact heavy-ball momentum, or gradient flow
full batch, CE                    exact discrete steps, or gradient flow (adaptive ODE solver)
minibatch (B < N), MSE or CE      exact minibatch simulation (default) or function-space SDE,
                                  ``paths`` paths; NOTE [noise: simulate vs sde] in dynamics
================================  ===========================================================

NOTE [divergence policy]
``Forecast.diverges`` is True when (a) for MSE, the step size is unstable for the linear
dynamics: ``stability >= stability_limit`` with ``stability = η̃ (λ_max/N + λ_wd)``,
η̃ = η/(1-m), limit 2 (and 2(1+m)/(1-m) for exact heavy-ball, whose modes are stable iff
η h < 2(1+m)); or (b) an iterated path's loss became non-finite or exceeded 10^4 × L_0
(any loss). From ``divergence_step`` on, ``loss``, ``accuracy``, the band and the paths
are NaN, with ``divergence_step`` the step after the lowest mean loss before the first
blow-up (after it the forecast only climbs toward the blow-up: the unstable modes grow;
MSE loss without momentum is even convex in t), or step 1 for gradient flow, which cannot
represent an unstable step size. An unstable forecast whose loss is still at its minimum
at the horizon keeps its (exact) numbers, ``divergence_step=None``, ``diverges=True``.
For CE ``stability`` uses the initial sharpness λ_max(H^{1/2} Θ H^{1/2}) with H the
softmax Hessians at f0: an indicator only (CE curvature falls as training proceeds and
large-step GD on CE need not diverge), so CE divergence is decided by (b) alone.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tangentlab import dynamics as dyn
from tangentlab.errors import TangentlabError, ValidityWarning
from tangentlab.kernel import Kernel

# NOTE [validity region]: in benchmarks/forecast_accuracy.py (RESULTS.md) the forecast's
# steps-to-target error stays small while η̃ λ_max / N <= 1 (η̃ = η / (1 - m): at most half
# the stability limit of plain gradient descent) and grows to 1-4x beyond, e.g. with
# momentum 0.9 at larger rates, where real networks leave the tangent regime (their kernel
# changes) although the linear model is still stable. Forecasts beyond it warn.
VALIDITY_STABILITY = 1.0

_BLOWUP_FACTOR = 1e4  # NOTE [divergence policy] (b): loss above 10^4 x L_0 is a blow-up
_ACCURACY_FLOPS = 2e11  # full-batch MSE: accuracy GEMM budget (~5 s on 2 cores) before striding
_DUAL_MEMORY_BYTES = 2 * 1024**3  # auto execution never forms a dense Θ larger than this
_LIMIT_TAIL = 0.1  # loss_limit estimate when no closed form: mean over the last 10% of steps

_LOSSES = ("mse", "ce")
_NOISES = ("simulate", "sde")
_SAMPLINGS = ("epoch", "replacement")
_TIMES = ("discrete", "continuous")
_MOMENTUM_MODES = ("heavy_ball", "effective")
_DECAYS = ("zero", "w0")
_EXECUTIONS = ("auto", "spectral", "primal", "dual")
_ODE_METHODS = ("RK45", "RK23", "DOP853", "LSODA", "Radau", "BDF")


@dataclass(frozen=True, eq=False)
class Forecast:
    """Forecast loss and accuracy of fine-tuning over steps 0..T (time in optimizer steps).

    Attributes:
      loss: full-training-set loss at every step, ``[T+1]`` (mean over paths when
        stochastic); NaN from ``divergence_step`` on.
      accuracy: training accuracy of argmax f_t, ``[T+1]`` (mean over paths).
      loss_band: ``(low, high)`` quantiles of the per-path loss (``band`` option, default
        10% and 90%), each ``[T+1]``; ``None`` for a deterministic forecast.
      loss_paths: per-path loss ``[paths, T+1]``, ``None`` when deterministic.
      accuracy_paths: per-path accuracy ``[paths, T+1]``, ``None`` when deterministic.
      diverges: the training diverges (NOTE [divergence policy]).
      divergence_step: first NaN step, or ``None``.
      stability: η̃ (λ_max/N + λ_wd) with η̃ = η/(1-m) (CE: λ_max of the Hessian-weighted
        kernel at f0); NaN when skipped (``stability=False`` off the closed form).
      stability_limit: the value of ``stability`` at which the linear dynamics diverge.
      loss_limit: L_∞, the loss the forecast converges to (exact for full-batch MSE, else
        the mean of the last 10% of the curve), NaN when it diverges.
      hyperparameters: the training settings (lr, steps, batch_size, momentum, ...).
      method: how it was computed (solver, execution, noise, momentum_mode, decay_to, ...).
    """

    loss: np.ndarray
    accuracy: np.ndarray
    loss_band: tuple[np.ndarray, np.ndarray] | None
    loss_paths: np.ndarray | None
    accuracy_paths: np.ndarray | None
    diverges: bool
    divergence_step: int | None
    stability: float
    stability_limit: float
    loss_limit: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> np.ndarray:
        """Step index of every entry, ``[T+1]``."""
        return np.arange(self.loss.shape[0])

    @property
    def epochs(self) -> np.ndarray:
        """Epochs at every step, ``steps * B / N`` (for display only), ``[T+1]``."""
        hp = self.hyperparameters
        batch = hp["batch_size"] or hp["num_samples"]
        return self.steps * min(batch, hp["num_samples"]) / hp["num_samples"]

    def steps_to(self, target_loss: float) -> int | None:
        """T(ε) = min{t : L_t <= ε}, or ``None`` when the forecast never reaches ``target_loss``."""
        if not _is_real(target_loss):
            raise TangentlabError(
                f"Forecast.steps_to: target_loss must be a finite number, got {target_loss!r}."
            )
        hit = np.flatnonzero(self.loss <= target_loss)  # NaN compares False: never "reached"
        return int(hit[0]) if hit.size else None

    def steps_to_plateau(self, rel_eps: float = 0.01) -> int | None:
        """T = min{t : |L_t - L_∞| < ε |L_0 - L_∞|} with L_∞ = ``loss_limit``.

        Returns ``None`` when the forecast diverges or does not get there within the horizon;
        0 when L_0 = L_∞ already.
        """
        if not rel_eps > 0:
            raise TangentlabError(
                f"Forecast.steps_to_plateau: rel_eps must be > 0, got {rel_eps!r}; "
                "use e.g. 0.01 for 'within 1% of the initial gap'."
            )
        if not math.isfinite(self.loss_limit):
            return None
        gap = abs(self.loss[0] - self.loss_limit)
        if gap == 0:
            return 0
        hit = np.flatnonzero(np.abs(self.loss - self.loss_limit) < rel_eps * gap)
        return int(hit[0]) if hit.size else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: curves (NaN -> None), band, divergence, settings and method."""
        final = _last_finite(self.loss)
        return {
            "loss": _json_list(self.loss),
            "accuracy": _json_list(self.accuracy),
            "loss_band": None
            if self.loss_band is None
            else {"low": _json_list(self.loss_band[0]), "high": _json_list(self.loss_band[1])},
            "diverges": bool(self.diverges),
            "divergence_step": self.divergence_step,
            "stability": _json_float(self.stability),
            "stability_limit": _json_float(self.stability_limit),
            "loss_limit": _json_float(self.loss_limit),
            "initial_loss": _json_float(self.loss[0]),
            "final_loss": _json_float(final),
            "min_loss": _json_float(np.nanmin(self.loss)),
            "final_accuracy": _json_float(_last_finite(self.accuracy)),
            "steps_to_plateau_1pct": self.steps_to_plateau(0.01),
            "hyperparameters": dict(self.hyperparameters),
            "method": dict(self.method),
        }


def forecast(
    kernel: Kernel,
    lr: float,
    steps: int,
    batch_size: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss: str = "mse",
    target_scale: float = 1.0,
    paths: int = 10,
    seed: int = 0,
    *,
    noise: str = "simulate",
    sampling: str = "epoch",
    time: str = "discrete",
    momentum_mode: str | None = None,
    decay_to: str = "zero",
    execution: str = "auto",
    band: tuple[float, float] = (0.1, 0.9),
    ode_method: str = "RK45",
    accuracy_every: int | None = None,
    stability: bool = True,
    dataset_size: int | None = None,
    kernel_growth: Any = None,
) -> Forecast:
    r"""Forecast the training loss and accuracy of SGD fine-tuning on the tangent model.

    Full-batch gradient descent of the linear model, in function space:

    .. math::
        f_{t+1} = f_t - \frac{\eta}{N} \Theta\, \delta(f_t)
                  - \eta\lambda (f_t - f_0) - \eta\lambda\, J w_0

    (MSE closed form L_t = (1/2N) Σ_j (1 - η̃λ_j/N)^{2t} (u_j^T r_0)^2 without decay);
    minibatch SGD replaces (1/N) Θ δ by (1/B) Σ_{i∈batch} Θ[:, i] δ_i. Zancato et al.,
    2020, "Predicting training time without training", https://arxiv.org/abs/2008.12478.

    Args:
      kernel: the tangent model's kernel (``theta`` and/or ``features``, ``f0``, ``targets``,
        ``jw0`` when decaying toward 0). Its eigendecomposition is computed on first use by
        full-batch MSE and cached on the kernel. A trace kernel (``kernel.is_trace``,
        Θ ≈ K ⊗ I_C) is used through products with K and the eigendecomposition of K
        (eigenvalues repeated C times), never expanded to NC × NC.
      lr: SGD learning rate η (> 0).
      steps: number of optimizer steps T (>= 0); curves have T+1 entries.
      batch_size: B; ``None`` or >= N means full batch (deterministic).
      momentum: m in [0, 1), torch heavy-ball (dampening 0, no Nesterov).
      weight_decay: λ >= 0, coupled L2 as torch SGD (g += λ w).
      loss: ``"mse"`` (½‖f - s·onehot(y)‖² summed over outputs, mean over samples) or
        ``"ce"`` (-log softmax(f)_y, mean over samples).
      target_scale: s, the MSE target scale (must be 1 for CE).
      paths: number of SGD paths of a minibatch forecast (>= 1).
      seed: seed of the minibatch order / SDE noise; path p draws its batches from
        ``dynamics.batch_schedule(N, B, T, sampling=..., rng=dynamics.path_rngs(seed, P)[p])``.
      noise: minibatch forecast by ``"simulate"`` (exact minibatch SGD of the tangent model,
        default) or ``"sde"`` (Euler-Maruyama with the minibatch noise covariance).
      sampling: ``"epoch"`` (reshuffle each epoch, last batch of an epoch smaller when B
        does not divide N, as DataLoader(shuffle=True, drop_last=False)) or
        ``"replacement"`` (i.i.d. batches of B ids).
      time: ``"discrete"`` (exact optimizer steps, default) or ``"continuous"`` (gradient
        flow at the effective rate; full batch only).
      momentum_mode: ``"heavy_ball"`` (exact torch buffers; default in discrete time) or
        ``"effective"`` (plain steps at η̃ = η/(1-m); the only choice in continuous time).
      decay_to: ``"zero"`` (torch semantics: weights decay toward 0; needs ``kernel.jw0``)
        or ``"w0"`` (decay toward the pre-trained weights: drops the J w0 term).
      execution: ``"auto"``, ``"spectral"`` (full-batch MSE closed form), ``"primal"``
        (products through ``features``, memory NC·k) or ``"dual"`` (dense Θ, (NC)^2).
        ``auto`` takes the closed form for full-batch MSE, else the cheaper of primal/dual.
      band: quantiles of the per-path loss reported as ``loss_band``.
      ode_method: scipy solver of the gradient flow (CE, ``time="continuous"``).
      accuracy_every: full-batch MSE only: evaluate the accuracy every this many steps and
        interpolate linearly between (each evaluation is an NC × m product). ``None``:
        every step unless that exceeds ~2e11 flops, then the smallest stride that fits.
      stability: compute ``Forecast.stability`` when the closed form does not already give
        λ_max (a Lanczos run, ~20-60 kernel products). ``False`` saves it; divergence is
        then detected from blow-ups only.
      dataset_size: N, the number of training samples when ``kernel`` was computed on a
        random subset of n <= N of them: forecasts full-batch MSE on N samples from the
        subsample's spectrum (:func:`tangentlab.extrapolate.extrapolate`, no tail). Pass a
        :class:`~tangentlab.extrapolate.Spectrum` as ``kernel`` instead for a power-law
        tail. Accuracy is then that of the n subsampled points. ``None``: N = n.
      kernel_growth: ``None`` (the kernel stays Θ(w0): the plain tangent model) or a
        :class:`~tangentlab.growth.KernelGrowth` s(t): step t uses s(t) Θ(w0), the kernel
        scale measured by trace probes (:func:`tangentlab.growth.estimate_growth`, no
        training). Full-batch MSE: mode-wise product Π_τ (1 - η̃ s(τ) λ_j/N); otherwise the
        exact steps with Θ scaled per step (not with ``noise="sde"`` or gradient flow off
        the closed form). Not with ``dataset_size``.

    Returns:
      A :class:`Forecast`.

    Raises:
      TangentlabError: on invalid settings, naming the argument and the fix.
    """
    spec, kernel = _spectrum_source("forecast", kernel, dataset_size)
    params = _validate(
        "forecast", kernel, dict(
            lr=lr, steps=steps, batch_size=batch_size, momentum=momentum,
            weight_decay=weight_decay, loss=loss, target_scale=target_scale, paths=paths,
            seed=seed, noise=noise, sampling=sampling, time=time, momentum_mode=momentum_mode,
            decay_to=decay_to, execution=execution, band=band, ode_method=ode_method,
            accuracy_every=accuracy_every, stability=stability, kernel_growth=kernel_growth,
        ),
    )
    return _run_any(_Prepared(kernel), params, spec, "forecast")


def _spectrum_source(fn: str, kernel: Any, dataset_size: Any):
    """``(spectrum or None, kernel)``: a Spectrum, or a kernel to extrapolate to N samples."""
    from tangentlab.extrapolate import Spectrum, check_dataset_size, extrapolate

    if isinstance(kernel, Spectrum):
        if dataset_size is not None and dataset_size != kernel.dataset_size:
            raise TangentlabError(
                f"{fn}: dataset_size={dataset_size!r} differs from the spectrum's "
                f"{kernel.dataset_size}; leave dataset_size out when passing a Spectrum."
            )
        return kernel, kernel.kernel
    if dataset_size is None or not isinstance(kernel, Kernel):
        return None, kernel
    check_dataset_size(fn, dataset_size, kernel.num_samples)
    return extrapolate(kernel, dataset_size), kernel


def _run_any(prep: _Prepared, params: dict[str, Any], spec, fn: str) -> Forecast:
    """``_run``, then the N-sample bookkeeping / tail when extrapolating a subsample."""
    if spec is None:
        return _run(prep, params)
    from tangentlab.extrapolate import apply, check_settings

    if params.get("kernel_growth") is not None:
        raise TangentlabError(
            f"{fn}: kernel_growth is not supported with dataset_size / a Spectrum "
            "(subsample extrapolation); forecast the subsample's own kernel instead."
        )
    check_settings(fn, spec, params)
    params = {**params, "batch_size": None, "stochastic": False}
    return apply(_run(prep, params), spec, params)


_FORECAST_ARGS = (
    "lr", "steps", "batch_size", "momentum", "weight_decay", "loss", "target_scale", "paths",
    "seed", "noise", "sampling", "time", "momentum_mode", "decay_to", "execution", "band",
    "ode_method", "accuracy_every", "stability", "kernel_growth",
)
_DEFAULTS: dict[str, Any] = dict(
    batch_size=None, momentum=0.0, weight_decay=0.0, loss="mse", target_scale=1.0, paths=10,
    seed=0, noise="simulate", sampling="epoch", time="discrete", momentum_mode=None,
    decay_to="zero", execution="auto", band=(0.1, 0.9), ode_method="RK45",
    accuracy_every=None, stability=True, kernel_growth=None,
)


def sweep(
    kernel: Kernel,
    grid: dict[str, list],
    *,
    target_loss: float | None = None,
    steps: int = 1000,
    dataset_size: int | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Forecast every combination of ``grid`` from one kernel, ranked by steps to target.

    The kernel is decomposed at most once (``Kernel.eigh`` caches it; dense arrays and
    λ_max are shared across the sweep), then each setting costs one closed form (full-batch
    MSE) or one simulation.

    Args:
      kernel: the kernel, as in :func:`forecast`.
      grid: lists of values per :func:`forecast` argument, e.g.
        ``{"lr": [0.1, 1.0], "batch_size": [32, None], "momentum": [0.0, 0.9]}``.
      target_loss: ε of T(ε) = min{t : L_t <= ε}. ``None``: 90% of the best achievable
        reduction, ε = L_0 - 0.9 (L_0 - L_best), with L_best the lowest loss any setting
        reaches within ``steps`` (needs the same L_0 for all settings, so ``loss`` and
        ``target_scale`` must not vary in the grid).
      steps: horizon T of every forecast.
      dataset_size: N when the kernel is on a subsample of n <= N samples (as in
        :func:`forecast`; full-batch MSE only). ``kernel`` may also be a ``Spectrum``.
      **options: fixed :func:`forecast` arguments for all settings.

    Returns:
      A DataFrame, one row per setting, best first: the grid columns, then ``rank``,
      ``steps_to_target`` (nullable int; never reached = <NA>, ranked last),
      ``target_loss``, ``final_loss``, ``min_loss``, ``final_accuracy``, ``diverges``,
      ``stability``, ``loss_limit`` and ``forecast`` (the :class:`Forecast` object; drop
      this column before ``to_json``). Ties are broken by the final loss.
    """
    if not isinstance(grid, dict) or not grid:
        raise TangentlabError(
            f"sweep: grid must be a non-empty dict of lists, got {grid!r}; "
            "e.g. {'lr': [0.1, 1.0], 'batch_size': [32, None]}."
        )
    for key, values in grid.items():
        if key not in _FORECAST_ARGS or key == "steps":
            raise TangentlabError(
                f"sweep: unknown grid key {key!r}; allowed: "
                f"{[a for a in _FORECAST_ARGS if a != 'steps']} (pass steps=... to sweep)."
            )
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not values:
            raise TangentlabError(
                f"sweep: grid[{key!r}] must be a non-empty list of values, got {values!r}."
            )
    for key in options:
        if key not in _FORECAST_ARGS or key == "steps":
            raise TangentlabError(f"sweep: unknown option {key!r}; allowed: {_FORECAST_ARGS}.")
        if key in grid:
            raise TangentlabError(
                f"sweep: {key!r} is both in grid and a fixed option; give it in one place."
            )
    if target_loss is None and ({"loss", "target_scale"} & set(grid)):
        raise TangentlabError(
            "sweep: the grid varies 'loss' or 'target_scale', so settings start from "
            "different losses and no common default target exists; pass target_loss=..."
        )
    if target_loss is not None and not _is_real(target_loss):
        raise TangentlabError(f"sweep: target_loss must be a number, got {target_loss!r}.")

    spec, kernel = _spectrum_source("sweep", kernel, dataset_size)
    prepared = _Prepared(kernel)
    keys = list(grid)
    rows, forecasts = [], []
    for combo in itertools.product(*(grid[k] for k in keys)):
        args = {**_DEFAULTS, **options, **dict(zip(keys, combo)), "steps": steps}
        params = _validate("sweep", kernel, args)
        fc = _run_any(prepared, params, spec, "sweep")
        forecasts.append(fc)
        rows.append(dict(zip(keys, combo)))

    if target_loss is None:
        l0 = forecasts[0].loss[0]
        best = min(float(np.nanmin(fc.loss)) for fc in forecasts)
        target_loss = l0 - 0.9 * (l0 - best)
    for row, fc in zip(rows, forecasts):
        reached = fc.steps_to(target_loss)
        row.update(
            steps_to_target=reached,
            target_loss=float(target_loss),
            final_loss=_last_finite(fc.loss),
            min_loss=float(np.nanmin(fc.loss)),
            final_accuracy=_last_finite(fc.accuracy),
            diverges=fc.diverges,
            stability=fc.stability,
            loss_limit=fc.loss_limit,
            forecast=fc,
        )
    df = pd.DataFrame(rows)
    df["steps_to_target"] = df["steps_to_target"].astype("Int64")
    if "batch_size" in df:  # None (full batch) must not turn the column into floats
        df["batch_size"] = df["batch_size"].astype("Int64")
    df = df.sort_values(
        ["steps_to_target", "final_loss"], na_position="last", kind="mergesort"
    ).reset_index(drop=True)
    df.insert(len(keys), "rank", np.arange(1, len(df) + 1))
    df.attrs["target_loss"] = float(target_loss)
    return df


# ---------------------------------------------------------------------------------------
# Validation (once, at the public edge).
# ---------------------------------------------------------------------------------------


def check_fraction_pair(
    fn: str, name: str, value: Any, example: str, *, what: str = "fractions"
) -> None:
    """``value`` must be two numbers ``0 <= lo < hi <= 1`` (quantiles, fractions)."""
    try:
        lo, hi = float(value[0]), float(value[1])
        ok = len(value) == 2 and 0.0 <= lo < hi <= 1.0
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise TangentlabError(
            f"{fn}: {name} must be two {what} 0 <= low < high <= 1, got {value!r}; "
            f"e.g. {name}={example}."
        )


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _choice(fn: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise TangentlabError(f"{fn}: {name} must be one of {list(allowed)}, got {value!r}.")


def _validate(fn: str, kernel: Any, p: dict[str, Any]) -> dict[str, Any]:
    """Check every setting once; return them normalized (floats, resolved defaults)."""
    if not isinstance(kernel, Kernel):
        raise TangentlabError(
            f"{fn}: kernel must be a tangentlab.Kernel, got {type(kernel).__name__}; "
            "build one with tangentlab.Kernel(f0=..., targets=..., theta=...) or load_kernel."
        )
    n = kernel.num_samples
    if n < 1:
        raise TangentlabError(f"{fn}: the kernel has no samples (N = 0); nothing to forecast.")
    if not _is_real(p["lr"]) or p["lr"] <= 0:
        raise TangentlabError(
            f"{fn}: lr must be a finite number > 0, got {p['lr']!r}; pass the SGD learning "
            "rate, e.g. lr=0.1."
        )
    if not _is_int(p["steps"]) or p["steps"] < 0:
        raise TangentlabError(
            f"{fn}: steps must be an integer >= 0, got {p['steps']!r}; e.g. steps=1000."
        )
    bs = p["batch_size"]
    if bs is not None and (not _is_int(bs) or bs <= 0):
        raise TangentlabError(
            f"{fn}: batch_size must be a positive integer or None (full batch), got {bs!r}."
        )
    if not _is_real(p["momentum"]) or not 0.0 <= p["momentum"] < 1.0:
        raise TangentlabError(
            f"{fn}: momentum must lie in [0, 1), got {p['momentum']!r}; torch SGD's "
            "heavy-ball coefficient, e.g. momentum=0.9."
        )
    if not _is_real(p["weight_decay"]) or p["weight_decay"] < 0:
        raise TangentlabError(
            f"{fn}: weight_decay must be a finite number >= 0, got {p['weight_decay']!r}."
        )
    _choice(fn, "loss", p["loss"], _LOSSES)
    if not _is_real(p["target_scale"]) or p["target_scale"] <= 0:
        raise TangentlabError(
            f"{fn}: target_scale must be a finite number > 0, got {p['target_scale']!r}."
        )
    if p["loss"] == "ce" and p["target_scale"] != 1.0:
        raise TangentlabError(
            f"{fn}: target_scale={p['target_scale']!r} only applies to loss='mse'; "
            "leave it at 1.0 for loss='ce'."
        )
    if not _is_int(p["paths"]) or p["paths"] < 1:
        raise TangentlabError(f"{fn}: paths must be an integer >= 1, got {p['paths']!r}.")
    if not _is_int(p["seed"]):
        raise TangentlabError(f"{fn}: seed must be an integer, got {p['seed']!r}.")
    _choice(fn, "noise", p["noise"], _NOISES)
    _choice(fn, "sampling", p["sampling"], _SAMPLINGS)
    _choice(fn, "time", p["time"], _TIMES)
    _choice(fn, "decay_to", p["decay_to"], _DECAYS)
    _choice(fn, "execution", p["execution"], _EXECUTIONS)
    _choice(fn, "ode_method", p["ode_method"], _ODE_METHODS)
    if p["momentum_mode"] is not None:
        _choice(fn, "momentum_mode", p["momentum_mode"], _MOMENTUM_MODES)

    stochastic = bs is not None and bs < n
    if p["time"] == "continuous":
        if stochastic:
            raise TangentlabError(
                f"{fn}: time='continuous' is gradient flow of full-batch training, but "
                f"batch_size={bs} < N={n}; use time='discrete' (minibatch forecasts are "
                "stepped), or batch_size=None."
            )
        if p["momentum_mode"] == "heavy_ball":
            raise TangentlabError(
                f"{fn}: momentum_mode='heavy_ball' needs time='discrete'; gradient flow uses "
                "the effective rate lr/(1-momentum) (momentum_mode='effective')."
            )
    mode = p["momentum_mode"] or ("heavy_ball" if p["time"] == "discrete" else "effective")
    if p["weight_decay"] > 0 and p["decay_to"] == "zero" and kernel.jw0 is None:
        raise TangentlabError(
            f"{fn}: weight_decay={p['weight_decay']!r} decays weights toward 0 as torch SGD, "
            "which needs kernel.jw0 = J(x) w0 (not computed for this kernel). Compute the "
            "kernel with jw0, or pass decay_to='w0' to decay toward the pre-trained weights."
        )
    ex = p["execution"]
    if ex == "spectral" and (p["loss"] != "mse" or stochastic):
        raise TangentlabError(
            f"{fn}: execution='spectral' is the closed form of full-batch MSE; got "
            f"loss={p['loss']!r}, batch_size={bs!r}. Use execution='auto'."
        )
    if ex == "primal" and kernel.features is None:
        raise TangentlabError(
            f"{fn}: execution='primal' needs kernel.features (a projected kernel); this "
            "kernel only has theta. Use execution='dual' or 'auto'."
        )
    check_fraction_pair(fn, "band", p["band"], "(0.1, 0.9)", what="quantiles")
    lo, hi = float(p["band"][0]), float(p["band"][1])
    ae = p["accuracy_every"]
    if ae is not None and (not _is_int(ae) or ae < 1):
        raise TangentlabError(
            f"{fn}: accuracy_every must be a positive integer or None (automatic), got {ae!r}."
        )
    if not isinstance(p["stability"], bool):
        raise TangentlabError(f"{fn}: stability must be True or False, got {p['stability']!r}.")
    _check_growth(fn, p, stochastic=bs is not None and bs < n)
    out = dict(p)
    out.update(
        lr=float(p["lr"]), steps=int(p["steps"]), momentum=float(p["momentum"]),
        weight_decay=float(p["weight_decay"]), target_scale=float(p["target_scale"]),
        paths=int(p["paths"]), seed=int(p["seed"]), band=(lo, hi), momentum_mode=mode,
        batch_size=None if bs is None else int(bs), stochastic=stochastic,
    )
    return out


# ---------------------------------------------------------------------------------------
# Shared per-kernel state (one per forecast, one for a whole sweep).
# ---------------------------------------------------------------------------------------


class _Prepared:
    """Float64 numpy views of a kernel and what is worth computing once per kernel."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.n, self.c = kernel.num_samples, kernel.num_classes
        self.nc = self.n * self.c
        self.f0 = _np64(kernel.f0)
        self.targets = kernel.targets.detach().cpu().numpy().astype(np.int64)
        self.jw0 = None if kernel.jw0 is None else _np64(kernel.jw0)
        self._ops: dict[str, dyn.KernelOperator] = {}
        self._top: dict[str, float] = {}
        self._eig: tuple[np.ndarray, np.ndarray] | None = None

    def eig(self) -> tuple[np.ndarray, np.ndarray]:
        if self._eig is None:
            lam, u = self.kernel.eigh()  # cached on the kernel
            self._eig = (_np64(lam), _np64(u))
        return self._eig

    def operator(self, name: str) -> dyn.KernelOperator:
        if name not in self._ops:
            # NOTE [trace kernel] (tangentlab.compute): Θ = K ⊗ I_C, products through K
            trace = self.kernel.is_trace
            if name == "primal":
                cls = dyn.TraceFeatureKernelOperator if trace else dyn.FeatureKernelOperator
                op = cls(_np64(self.kernel.features), self.c)
            else:
                cls = dyn.TraceKernelOperator if trace else dyn.DenseKernelOperator
                op = cls(_np64(self.kernel.gram()), self.c)
            self._ops[name] = op
        return self._ops[name]

    def choose_execution(self, requested: str, cols: int, products: int) -> str:
        """Primal or dual by cost: dual NC·cols per product (+ NC²k to form Θ), primal
        (NC + cols)·k; dual is never formed beyond 2 GiB unless asked for. A trace kernel's
        dual matrix K has N rows (N² memory, NC·cols/C per product, N²k' to form)."""
        if requested in ("primal", "dual"):
            return requested
        k = self.kernel.projection_dim
        if k is None:
            return "dual"
        rows = self.kernel.kernel_rows  # NC, or N for a trace kernel
        per_col = self.nc // rows  # C for a trace kernel: one K column serves C columns
        if self.kernel.theta is None and rows * rows * 8 > _DUAL_MEMORY_BYTES:
            return "primal"
        form = rows * rows * k if self.kernel.theta is None else 0
        dual = products * self.nc * cols // per_col + form
        primal = products * (self.nc + cols) * k
        return "primal" if primal < dual else "dual"

    def top_eigenvalue(self, loss: str, execution: str) -> float:
        """λ_max of Θ (MSE) or of H^{1/2} Θ H^{1/2} at f0 (CE), cached per loss."""
        if loss not in self._top:
            if loss == "mse" and self._eig is not None:
                lam = self._eig[0]
                self._top[loss] = float(lam[-1]) if lam.size else 0.0
            else:
                weight = None if loss == "mse" else dyn.softmax_hessian_sqrt(self.f0)
                op = self.operator("dual" if execution == "spectral" else execution)
                self._top[loss] = dyn.top_eigenvalue(op, self.nc, weight=weight)
        return self._top[loss]


def _np64(t) -> np.ndarray:
    """A torch tensor as a float64 numpy array (no copy when already float64 on CPU)."""
    return t.detach().cpu().double().numpy()


# ---------------------------------------------------------------------------------------
# Assembly.
# ---------------------------------------------------------------------------------------


def _run(prep: _Prepared, p: dict[str, Any]) -> Forecast:
    """Dispatch to a solver, then apply the divergence policy and summarize."""
    n = prep.n
    anchor = prep.f0 if (p["decay_to"] == "w0" or prep.jw0 is None) else prep.f0 - prep.jw0
    if p["weight_decay"] == 0:
        anchor = prep.f0  # unused; decay_to is irrelevant without decay
    lr, m, wd = p["lr"], p["momentum"], p["weight_decay"]
    lr_eff = lr / (1.0 - m)
    heavy = p["momentum_mode"] == "heavy_ball"
    steps, loss = p["steps"], p["loss"]
    scale = p["target_scale"] if loss == "mse" else 1.0
    l0 = float(dyn.loss_value(prep.f0, prep.targets, loss=loss, scale=scale))
    blowup_loss = _BLOWUP_FACTOR * l0 if l0 > 0 else math.inf
    method: dict[str, Any] = {
        "momentum_mode": p["momentum_mode"] if m > 0 else None,
        "decay_to": p["decay_to"] if wd > 0 else None,
        "time": p["time"],
    }
    if wd > 0:
        method["decay_note"] = (
            "weights decay toward 0 as torch SGD (uses kernel.jw0)" if p["decay_to"] == "zero"
            else "weights decay toward the pre-trained w0 (J w0 term dropped)"
        )

    exact_limit = None
    spectral_scheme = None
    if not p["stochastic"] and loss == "mse" and p["execution"] in ("auto", "spectral"):
        execution = "spectral"
        lam, u = prep.eig()
        sy = dyn.targets_matrix(prep.targets, prep.c, scale=scale)
        problem = dyn.spectral_mse(
            lam, u, (prep.f0 - sy).reshape(-1), (anchor - sy).reshape(-1),
            num_samples=n, weight_decay=wd, kron=prep.c if prep.kernel.is_trace else 1,
        )
        if p["time"] == "continuous":
            spectral_scheme = {"scheme": "flow", "lr": lr_eff}
        elif heavy and m > 0:
            spectral_scheme = {"scheme": "heavy_ball", "lr": lr, "momentum": m}
        else:
            spectral_scheme = {"scheme": "gd", "lr": lr_eff}
        loss_paths = _growth_loss(problem, steps, p, spectral_scheme)[None]
        acc_paths = None  # filled below, once the divergence step is known
        blowups: tuple[int | None, ...] = (None,)
        exact_limit = float(problem.loss(problem.fixed_point()[:, None])[0])
        method["solver"] = f"closed form ({spectral_scheme['scheme']}) from kernel.eigh()"
    else:
        cols = p["batch_size"] * prep.c if p["stochastic"] else prep.nc
        products = steps * (p["paths"] if p["stochastic"] and p["noise"] == "simulate" else 1)
        if p["stochastic"] and p["noise"] == "sde":
            cols = prep.nc * p["paths"]
        execution = prep.choose_execution(p["execution"], cols, max(products, 1))
        op = prep.operator(execution)
        common = dict(loss=loss, scale=scale, weight_decay=wd, steps=steps,
                      blowup_loss=blowup_loss)
        if not p["stochastic"] and p["time"] == "continuous":
            traj = dyn.flow_trajectory(op, prep.f0, prep.targets, anchor, lr=lr_eff,
                                       method=p["ode_method"], **common)
            method["solver"] = f"gradient flow ({p['ode_method']})"
        elif not p["stochastic"]:
            traj = _iterate(p)(op, prep.f0, prep.targets, anchor, lr=lr,
                                          momentum=m, heavy_ball=heavy, **common)
            method["solver"] = "exact discrete steps"
        elif p["noise"] == "simulate":
            traj = _simulate(prep, op, anchor, p, common)
            method["solver"] = "exact minibatch simulation"
        else:
            traj = dyn.sde_trajectories(
                op, prep.f0, prep.targets, anchor, lr=lr, momentum=m, heavy_ball=heavy,
                batch_size=p["batch_size"], without_replacement=p["sampling"] == "epoch",
                paths=p["paths"], rng=np.random.default_rng(p["seed"]), **common,
            )
            method["solver"] = "function-space SDE (Euler-Maruyama)"
        loss_paths, acc_paths, blowups = traj.loss, traj.accuracy, traj.blowup
    method["execution"] = execution
    if p["stochastic"]:
        method.update(noise=p["noise"], sampling=p["sampling"], paths=p["paths"])

    # ---- stability and the divergence policy (NOTE [divergence policy])
    if p["stability"] or execution == "spectral":  # free from the cached eigenvalues
        top = prep.top_eigenvalue(loss, execution)
        stab = lr_eff * (top * _growth_max(p) / n + wd)
    else:
        stab = math.nan
    limit = 2.0 * (1.0 + m) / (1.0 - m) if heavy and p["time"] == "discrete" else 2.0
    spectral_unstable = loss == "mse" and stab >= limit
    mean_loss = loss_paths.mean(axis=0)
    blown = [b for b in blowups if b is not None]
    diverges = spectral_unstable or bool(blown)
    div_step = None
    if diverges and p["time"] == "continuous":
        div_step = 1
    elif diverges:
        bad = np.flatnonzero(~np.isfinite(mean_loss))
        end = min(blown + [int(bad[0]) if bad.size else steps + 1])
        turn = int(np.argmin(mean_loss[:end])) + 1  # after the lowest loss: only the climb
        div_step = turn if turn <= steps else None

    if not diverges and math.isfinite(stab) and stab > VALIDITY_STABILITY:
        method["validity"] = (
            f"η̃·λ_max/N = {stab:.3g} > {VALIDITY_STABILITY:g}: outside the measured validity "
            "region (NOTE [validity region])"
        )
        warnings.warn(
            f"forecast: η̃·λ_max/N = {stab:.3g} (η̃ = lr/(1 - momentum)) is above "
            f"{VALIDITY_STABILITY:g}, outside the region where forecasts were measured to be "
            "accurate (benchmarks/RESULTS.md: steps-to-target errors of 1-4x there, real "
            "training leaves the tangent regime). Lower lr or momentum for a reliable "
            "forecast, or check it with tangentlab.finetune / `tangentlab validate`.",
            ValidityWarning,
            stacklevel=4,
        )
    if acc_paths is None:  # full-batch MSE closed form: accuracy up to the divergence step
        valid = steps + 1 if div_step is None else div_step
        acc_paths = np.full((1, steps + 1), np.nan)
        stride = _accuracy_stride(p["accuracy_every"], prep.nc, prep.eig()[0].size, valid)
        times = np.unique(np.r_[np.arange(0, valid, stride), valid - 1])
        acc = _growth_accuracy(problem, times, prep.targets, scale, p, spectral_scheme)
        acc_paths[0, :valid] = np.interp(np.arange(valid), times, acc)
        method["accuracy_every"] = stride
    if div_step is not None:
        loss_paths = loss_paths.copy()
        loss_paths[:, div_step:] = np.nan
        acc_paths[:, div_step:] = np.nan
    mean_loss = loss_paths.mean(axis=0)
    mean_acc = acc_paths.mean(axis=0)

    if diverges:
        loss_limit = math.nan
        method["loss_limit"] = "none (diverges)"
    elif exact_limit is not None:
        loss_limit = exact_limit
        method["loss_limit"] = "exact (closed form)"
    else:
        tail = max(1, math.ceil(_LIMIT_TAIL * (steps + 1)))
        loss_limit = float(mean_loss[-tail:].mean())
        method["loss_limit"] = "mean of the last 10% of the horizon"

    stochastic = p["stochastic"]
    band = None
    if stochastic:
        with np.errstate(invalid="ignore"):
            band = (np.quantile(loss_paths, p["band"][0], axis=0),
                    np.quantile(loss_paths, p["band"][1], axis=0))
    hyper = {
        "lr": p["lr"], "steps": steps, "batch_size": p["batch_size"], "momentum": m,
        "weight_decay": wd, "loss": loss, "target_scale": scale, "paths": p["paths"] if
        stochastic else 1, "seed": p["seed"], "num_samples": n, "num_classes": prep.c,
    }
    return Forecast(
        loss=mean_loss,
        accuracy=mean_acc,
        loss_band=band,
        loss_paths=loss_paths if stochastic else None,
        accuracy_paths=acc_paths if stochastic else None,
        diverges=bool(diverges),
        divergence_step=div_step,
        stability=float(stab),
        stability_limit=float(limit),
        loss_limit=float(loss_limit),
        hyperparameters=hyper,
        method=method,
    )


def _simulate(prep: _Prepared, op, anchor, p, common) -> dyn.Trajectory:
    """Exact minibatch SGD, one path per generator of ``path_rngs(seed, paths)``."""
    heavy = p["momentum_mode"] == "heavy_ball"
    trajs = []
    for rng in dyn.path_rngs(p["seed"], p["paths"]):
        batches = dyn.batch_schedule(prep.n, p["batch_size"], p["steps"],
                                     sampling=p["sampling"], rng=rng)
        trajs.append(_iterate(p)(
            op, prep.f0, prep.targets, anchor, lr=p["lr"], momentum=p["momentum"],
            heavy_ball=heavy, batches=batches, **common,
        ))
    return dyn.Trajectory(
        np.concatenate([t.loss for t in trajs]),
        np.concatenate([t.accuracy for t in trajs]),
        tuple(t.blowup[0] for t in trajs),
    )


def _accuracy_stride(requested: int | None, nc: int, m: int, count: int) -> int:
    """Every step unless 2·NC·m·count flops exceed the budget, else the smallest fitting stride."""
    if requested is not None:
        return requested
    return max(1, math.ceil(2.0 * nc * max(m, 1) * count / _ACCURACY_FLOPS))


def _last_finite(x: np.ndarray) -> float:
    ok = np.flatnonzero(np.isfinite(x))
    return float(x[ok[-1]]) if ok.size else math.nan


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_list(x: np.ndarray) -> list[float | None]:
    return [_json_float(v) for v in x]


# ---------------------------------------------------------------------------------------
# Kernel growth hooks (tangentlab.growth): s(t) Θ instead of Θ when kernel_growth is set.
# ---------------------------------------------------------------------------------------


def _check_growth(fn: str, p: dict[str, Any], *, stochastic: bool) -> None:
    from tangentlab.growth import KernelGrowth

    g = p.get("kernel_growth")
    if g is None:
        return
    if not isinstance(g, KernelGrowth):
        raise TangentlabError(
            f"{fn}: kernel_growth must be None or a tangentlab.KernelGrowth, got "
            f"{type(g).__name__}; build one with tangentlab.estimate_growth(...)."
        )
    closed_form = not stochastic and p["loss"] == "mse" and p["execution"] in ("auto", "spectral")
    if stochastic and p["noise"] == "sde":
        raise TangentlabError(
            f"{fn}: kernel_growth is applied per step of the exact minibatch simulation; "
            "noise='sde' is not supported with it. Use noise='simulate'."
        )
    if p["time"] == "continuous" and not closed_form:
        raise TangentlabError(
            f"{fn}: kernel_growth with time='continuous' needs the full-batch MSE closed form "
            "(loss='mse', execution='auto'); use time='discrete'."
        )


def _growth_schedule(p: dict[str, Any]) -> np.ndarray | None:
    g = p.get("kernel_growth")
    return None if g is None else g.schedule(p["steps"])


def _growth_max(p: dict[str, Any]) -> float:
    g = p.get("kernel_growth")
    return 1.0 if g is None else g.max_scale(p["steps"])


def _growth_loss(problem, steps: int, p: dict[str, Any], scheme: dict) -> np.ndarray:
    sched = _growth_schedule(p)
    if sched is None:
        return dyn.spectral_loss(problem, steps, **scheme)
    from tangentlab.growth import scaled_spectral_loss

    return scaled_spectral_loss(problem, steps, scale_t=sched, weight_decay=p["weight_decay"],
                                **scheme)  # fmt: skip


def _growth_accuracy(problem, times, targets, scale: float, p: dict[str, Any], scheme: dict):
    sched = _growth_schedule(p)
    if sched is None:
        return dyn.spectral_accuracy(problem, times, targets, scale=scale, **scheme)
    from tangentlab.growth import scaled_spectral_accuracy

    return scaled_spectral_accuracy(problem, times, targets, scale=scale, scale_t=sched,
                                    weight_decay=p["weight_decay"], **scheme)  # fmt: skip


def _iterate(p: dict[str, Any]):
    """``dynamics.iterate_trajectory``, or its s(t)-scaled twin when kernel_growth is set."""
    sched = _growth_schedule(p)
    if sched is None:
        return dyn.iterate_trajectory
    import functools

    from tangentlab.growth import scaled_iterate_trajectory

    return functools.partial(scaled_iterate_trajectory, scale_t=sched)

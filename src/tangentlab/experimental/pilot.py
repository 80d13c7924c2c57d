"""Experimental pilot calibration: a progress-indexed clock measured on a short real run.

The tangent model (and the head-exact, body-linear model) freezes the kernel, while real
fine-tuning grows it as training progresses (benchmarks/RESULTS.md, "fidelity"): real
training runs faster than the forecast, by a factor that changes with progress, not by a
constant clock. A **pilot** measures that factor: train the real model for a while on a
small random subset of n ≪ N samples, forecast *the same pilot* (the same model of
training, on the subset's own kernel), and compare the two curves at equal progress.

Progress of a loss curve (``scale``), with L0 the curve's own initial loss and L taken as
the running minimum (the first step to reach a level is what a target reads):

.. math::
    p = 1 - L/L_0 \\quad (\\texttt{"loss"}), \\qquad p = \\log(L_0/L) \\quad (\\texttt{"log"}).

Let T(p) and T̂(p) be the first (linearly interpolated) steps at which the pilot's real
and forecast curves reach progress p. On knots 0 = p_0 < … < p_K (p_K the progress both
reach) the **clock** is the local ratio of real to forecast steps,

.. math::
    \\sigma_k = \\frac{T(p_{k+1}) - T(p_k)}{\\hat T(p_{k+1}) - \\hat T(p_k)}
             = \\frac{dT/dp}{d\\hat T/dp} = \\frac{1}{c(p)},

c(p) the real speed-up at progress p (σ_{K-1} holds beyond p_K). It is carried over to a
forecast of the full job (same model of training, full N, the user's settings) by warping
its clock at the progress *that forecast* has reached (:func:`warp_steps`):

.. math::
    t(s + 1) = t(s) + \\sigma(\\hat p(s)), \\qquad t(0) = 0,

so that the corrected curve is L̃(t(s)) = L̂(s) (:func:`apply_clock`). ``mode="ratio"``
uses the cumulative ratio instead, t(s) = s · T(p̂(s)) / T̂(p̂(s)). The same correction fed
through the dynamics is a kernel scale g(s) = 1/σ(p̂(s)) per step (:func:`clock_growth`;
with a scalar kernel scale the dynamics equal those with learning rate η·g, see
:mod:`tangentlab.experimental.growth`). A pilot whose real curve is its forecast gives
σ ≡ 1 (the forecast unchanged); one whose real curve is the forecast run at twice the
rate gives σ ≡ 1/2.

NOTE [pilot measured]
On the development examples (benchmarks/RESULTS.md, "pilot"; not held-out tasks) the
head-exact/body-linear forecast on the clock of one pilot per loss (a = 1, m = 0, 25% of
the samples, stopped at a 90% drop) cut the median / p90 of |T̂ − T|/T from 5% / 77% to
2% / 27%; the tangent forecast gained less (20% / 311% to 5% / 74%), and feeding the clock
through the dynamics (:func:`clock_growth`) did worse than the remap. Hence experimental.

Why progress and not steps: in the gradient-flow limit the weights follow the same path
at every learning rate, only faster, so a kernel growth that is a function of the path
(of progress) carries over across learning rates, and one pilot can serve a whole sweep.

Zancato et al., 2020, "Predicting training time without training",
https://arxiv.org/abs/2008.12478 (the forecast this calibrates); Fort et al., 2020, "Deep
learning versus kernel learning", https://arxiv.org/abs/2010.15110 (the kernel's change
during training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentlab.data import as_arrays, num_rows, take
from tangentlab.errors import TangentlabError
from tangentlab.finetune import TrainingRun, finetune
from tangentlab.training import is_int

_SCALES = ("loss", "log")
_MODES = ("rate", "ratio")


# ---------------------------------------------------------------------------------------
# The clock.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PilotClock:
    """Steps of a pilot's real run and of its forecast at equal progress.

    Build it with :func:`fit_pilot_clock`; use it with :func:`apply_clock`,
    :func:`warp_steps` or :func:`clock_growth`.

    Attributes:
      progress: knots p_0 = 0 < p_1 < … < p_K of the progress variable, ``[K+1]``.
      real_steps: T(p_k), the real pilot's first step at each knot, ``[K+1]`` (T(0) = 0).
      forecast_steps: T̂(p_k), the pilot forecast's, ``[K+1]`` (T̂(0) = 0).
      scale: the progress variable, ``"loss"`` (p = 1 - L/L0) or ``"log"`` (log(L0/L)).
      info: provenance (initial losses, the progress each curve reached, pilot size).
    """

    progress: np.ndarray
    real_steps: np.ndarray
    forecast_steps: np.ndarray
    scale: str = "loss"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = np.asarray(self.progress, dtype=np.float64).reshape(-1)
        t = np.asarray(self.real_steps, dtype=np.float64).reshape(-1)
        th = np.asarray(self.forecast_steps, dtype=np.float64).reshape(-1)
        if not (p.shape == t.shape == th.shape) or p.size < 2:
            raise TangentlabError(
                f"PilotClock: progress, real_steps and forecast_steps must be 1-D of the same "
                f"length >= 2, got {p.shape}, {t.shape} and {th.shape}; build the clock with "
                "fit_pilot_clock(real_losses, forecast_losses)."
            )
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t)) and np.all(np.isfinite(th))):
            raise TangentlabError("PilotClock: progress and steps must be finite numbers.")
        for name, x in (("progress", p), ("real_steps", t), ("forecast_steps", th)):
            if x[0] != 0 or np.any(np.diff(x) <= 0):
                raise TangentlabError(
                    f"PilotClock: {name} must start at 0 and increase strictly, got "
                    f"{x[:6].tolist()}{' ...' if x.size > 6 else ''}."
                )
        if self.scale not in _SCALES:
            raise TangentlabError(
                f"PilotClock: scale must be one of {list(_SCALES)}, got {self.scale!r}."
            )
        object.__setattr__(self, "progress", p)
        object.__setattr__(self, "real_steps", t)
        object.__setattr__(self, "forecast_steps", th)

    @property
    def slopes(self) -> np.ndarray:
        """σ_k = ΔT / ΔT̂ on each segment ``[p_k, p_{k+1})``, ``[K]`` (< 1: real is faster)."""
        return np.diff(self.real_steps) / np.diff(self.forecast_steps)

    @property
    def speedup(self) -> np.ndarray:
        """c_k = 1/σ_k, the real run's speed over the forecast's per segment, ``[K]``."""
        return 1.0 / self.slopes

    def slope_at(self, progress: np.ndarray) -> np.ndarray:
        """σ(p): the slope of the segment holding p (the last one beyond p_K), like ``p``."""
        p = np.asarray(progress, dtype=np.float64)
        k = np.searchsorted(self.progress, p, side="right") - 1
        return self.slopes[np.clip(k, 0, self.slopes.size - 1)]

    def ratio_at(self, progress: np.ndarray) -> np.ndarray:
        """T(p)/T̂(p), linear between knots p_1..p_K and constant outside, like ``p``."""
        p = np.asarray(progress, dtype=np.float64)
        r = self.real_steps[1:] / self.forecast_steps[1:]
        return np.interp(p, self.progress[1:], r)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "progress": self.progress.tolist(), "real_steps": self.real_steps.tolist(),
            "forecast_steps": self.forecast_steps.tolist(), "scale": self.scale,
            "info": dict(self.info),
        }  # fmt: skip


def progress_of(losses: np.ndarray, *, scale: str = "loss", initial: float | None = None):
    """Progress of a loss curve, on its running minimum: ``[T]`` non-decreasing.

    ``"loss"``: p = 1 - min_{τ≤t} L_τ / L0; ``"log"``: p = log(L0 / min_{τ≤t} L_τ).
    ``initial`` = L0 (default ``losses[0]``). Non-finite values (a diverged curve) and
    everything after the first one are returned as NaN.
    """
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    l0 = float(x[0]) if initial is None else float(initial)
    bad = np.flatnonzero(~np.isfinite(x))
    end = int(bad[0]) if bad.size else x.size
    out = np.full(x.size, np.nan)
    if end == 0:
        return out
    run = np.minimum.accumulate(x[:end])
    if scale == "loss":
        out[:end] = 1.0 - run / l0
    else:
        # a loss at (or below) 0 would make log(L0/L) infinite: floor it at a tiny
        # fraction of L0, far beyond any target a forecast is scored on
        out[:end] = np.log(l0 / np.maximum(run, l0 * 1e-300))
    return out


def _first_steps(q: np.ndarray, steps: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """First (linearly interpolated) step at which the non-decreasing q reaches each level.

    Trusts its input: ``levels`` within ``[q[0], q[-1]]``.
    """
    i = np.searchsorted(q, levels, side="left")  # first index with q >= level
    i = np.clip(i, 1, q.size - 1)
    q0, q1 = q[i - 1], q[i]
    t0, t1 = steps[i - 1], steps[i]
    frac = np.where(q1 > q0, (levels - q0) / np.where(q1 > q0, q1 - q0, 1.0), 1.0)
    out = t0 + np.clip(frac, 0.0, 1.0) * (t1 - t0)
    return np.where(levels <= q[0], steps[0], out)


def _curve(fn: str, what: str, losses: Any, steps: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise TangentlabError(
            f"{fn}: {what} must be a 1-D loss curve with at least 2 points, got shape "
            f"{x.shape}; pass e.g. run.loss or forecast.loss."
        )
    if not (np.isfinite(x[0]) and x[0] > 0):
        raise TangentlabError(f"{fn}: {what} must start at a finite loss > 0, got {x[0]!r}.")
    if steps is None:
        t = np.arange(x.size, dtype=np.float64)
    else:
        t = np.asarray(steps, dtype=np.float64)
        if t.shape != x.shape:
            raise TangentlabError(
                f"{fn}: {what} has {x.size} points but its steps {t.size}; pass the steps at "
                "which the losses were logged (e.g. run.steps)."
            )
        if t[0] != 0 or np.any(np.diff(t) <= 0):
            raise TangentlabError(
                f"{fn}: the steps of {what} must start at 0 and increase, got {t[:6].tolist()}."
            )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:  # a diverged curve: keep what came before
        x, t = x[: bad[0]], t[: bad[0]]
    return x, t


def fit_pilot_clock(
    real_losses: Any,
    forecast_losses: Any,
    *,
    real_steps: Any = None,
    forecast_steps: Any = None,
    knots: int = 16,
    scale: str = "loss",
    max_progress: float | None = None,
    rtol: float = 1e-2,
) -> PilotClock:
    r"""The pilot's clock: real vs forecast steps at equal progress (module docstring).

    .. math::
        \sigma_k = \frac{T(p_{k+1}) - T(p_k)}{\hat T(p_{k+1}) - \hat T(p_k)}, \qquad
        p_k = \frac{k}{K} \min(p_\text{real}, p_\text{forecast}, p_\text{max})

    Args:
      real_losses: the pilot's real training loss, ``[T_r]`` (``run.loss`` of
        :func:`tangentlab.finetune` on the pilot subset).
      forecast_losses: the forecast of that same pilot (same subset, same model of
        training and settings), ``[T_f]`` (``forecast.loss``); run it long enough to reach
        the real pilot's progress (e.g. 3-4× its steps).
      real_steps, forecast_steps: the steps of those losses (default 0, 1, 2, …).
      knots: K, the number of progress segments (>= 1).
      scale: ``"loss"`` (p = 1 - L/L0) or ``"log"`` (p = log(L0/L)).
      max_progress: cap on p_K (default: the progress both curves reach).
      rtol: the two curves must start at the same loss to this relative tolerance (they
        describe the same pilot).

    Returns:
      A :class:`PilotClock`.
    """
    fn = "fit_pilot_clock"
    if scale not in _SCALES:
        raise TangentlabError(f"{fn}: scale must be one of {list(_SCALES)}, got {scale!r}.")
    if not (is_int(knots) and knots >= 1):
        raise TangentlabError(f"{fn}: knots must be an integer >= 1, got {knots!r}.")
    lr, tr = _curve(fn, "real_losses", real_losses, real_steps)
    lf, tf = _curve(fn, "forecast_losses", forecast_losses, forecast_steps)
    if abs(lr[0] - lf[0]) > rtol * abs(lr[0]):
        raise TangentlabError(
            f"{fn}: the real pilot starts at loss {lr[0]:.6g} but its forecast at "
            f"{lf[0]:.6g}: they must describe the same pilot. Compute the forecast's kernel on "
            "the pilot's own subset, with the same model, loss and trainable weights."
        )
    qr = progress_of(lr, scale=scale)
    qf = progress_of(lf, scale=scale)
    top = min(float(qr[-1]), float(qf[-1]))
    if max_progress is not None:
        if not (np.isfinite(max_progress) and max_progress > 0):
            raise TangentlabError(f"{fn}: max_progress must be > 0, got {max_progress!r}.")
        top = min(top, float(max_progress))
    if not top > 0:
        raise TangentlabError(
            f"{fn}: the pilot made no progress (real reached p = {qr[-1]:.3g}, forecast "
            f"p = {qf[-1]:.3g}): train the pilot (and run its forecast) for more steps, or "
            "with a larger learning rate."
        )
    p = np.linspace(0.0, top, int(knots) + 1)
    t_real = _first_steps(qr, tr, p)
    t_fc = _first_steps(qf, tf, p)
    t_real[0] = t_fc[0] = 0.0
    # Progress can jump over several knots within one logged step only when the curve is
    # sampled coarsely; the interpolated crossings are then still strictly increasing
    # unless two knots coincide numerically, which merging cannot fix: report it.
    if np.any(np.diff(t_real) <= 0) or np.any(np.diff(t_fc) <= 0):
        raise TangentlabError(
            f"{fn}: the curves do not reach successive progress knots at increasing steps "
            f"(real {t_real.tolist()}, forecast {t_fc.tolist()}); use fewer knots."
        )
    info = {
        "real_initial_loss": float(lr[0]), "forecast_initial_loss": float(lf[0]),
        "real_progress": float(qr[-1]), "forecast_progress": float(qf[-1]),
    }  # fmt: skip
    return PilotClock(progress=p, real_steps=t_real, forecast_steps=t_fc, scale=scale,
                      info=info)  # fmt: skip


def _check_clock(fn: str, clock: Any, mode: str) -> None:
    if not isinstance(clock, PilotClock):
        raise TangentlabError(
            f"{fn}: clock must be a PilotClock, got {type(clock).__name__}; build one with "
            "fit_pilot_clock(real_losses, forecast_losses)."
        )
    if mode not in _MODES:
        raise TangentlabError(f"{fn}: mode must be one of {list(_MODES)}, got {mode!r}.")


def warp_steps(forecast_losses: Any, clock: PilotClock, *, mode: str = "rate") -> np.ndarray:
    r"""The corrected step t(s) of every forecast step s = 0, 1, …: ``[S+1]`` increasing.

    ``"rate"``: t(s+1) = t(s) + σ(p̂(s)); ``"ratio"``: t(s) = s · T(p̂(s))/T̂(p̂(s)) (made
    increasing). p̂ is the forecast's own progress; after a non-finite loss t is NaN.
    """
    fn = "warp_steps"
    _check_clock(fn, clock, mode)
    x, _ = _curve(fn, "forecast_losses", forecast_losses, None)
    size = np.asarray(forecast_losses).reshape(-1).size
    q = progress_of(x, scale=clock.scale)
    out = np.full(size, np.nan)
    if mode == "rate":
        out[: x.size] = np.r_[0.0, np.cumsum(clock.slope_at(q[:-1]))]
    else:
        t = np.arange(x.size, dtype=np.float64) * clock.ratio_at(q)
        # keep the warped clock strictly increasing (a falling ratio cannot send time back)
        out[: x.size] = np.maximum.accumulate(t + 1e-9 * np.arange(x.size))
    return out


def apply_clock(
    forecast_losses: Any,
    clock: PilotClock,
    *,
    horizon: int | None = None,
    mode: str = "rate",
) -> np.ndarray:
    r"""The forecast on the pilot's clock: L̃(t) on steps t = 0..horizon, ``[horizon+1]``.

    .. math::
        \tilde L(t(s)) = \hat L(s), \qquad t(s+1) = t(s) + \sigma(\hat p(s))

    (:func:`warp_steps`), linear between warped steps; NaN past the last warped step (the
    forecast did not cover it) and after a diverged forecast's last finite loss.

    Args:
      forecast_losses: the full forecast's loss at every step, ``[S+1]`` (``forecast.loss``).
      clock: the pilot's :class:`PilotClock`.
      horizon: last step of the corrected curve (default S).
      mode: ``"rate"`` or ``"ratio"`` (:func:`warp_steps`).

    Returns:
      The corrected loss curve, ``[horizon+1]``.
    """
    fn = "apply_clock"
    x = np.asarray(forecast_losses, dtype=np.float64).reshape(-1)
    t = warp_steps(x, clock, mode=mode)
    if horizon is None:
        horizon = x.size - 1
    if not (is_int(horizon) and horizon >= 0):
        raise TangentlabError(f"{fn}: horizon must be an integer >= 0, got {horizon!r}.")
    ok = np.isfinite(t)
    grid = np.arange(int(horizon) + 1, dtype=np.float64)
    return np.interp(grid, t[ok], x[ok], right=np.nan)


def clock_growth(forecast_losses: Any, clock: PilotClock) -> np.ndarray:
    r"""The clock as a kernel scale per step: g(s) = 1/σ(p̂(s)), s = 0..S-1, ``[S]``.

    Feed it through the dynamics as ``KernelGrowth(steps=range(S), scale=g)``
    (:func:`tangentlab.experimental.growth.forecast`); since g depends on the forecast's
    own progress, iterate: recompute g on the new forecast (a fixed point). After a
    non-finite loss g holds its last value.
    """
    _check_clock("clock_growth", clock, "rate")
    x = np.asarray(forecast_losses, dtype=np.float64).reshape(-1)
    q = progress_of(x, scale=clock.scale)[:-1]
    last = np.flatnonzero(np.isfinite(q))
    if last.size:
        q = np.where(np.isfinite(q), q, q[last[-1]])
    else:
        q = np.zeros_like(q)
    return 1.0 / clock.slope_at(q)


# ---------------------------------------------------------------------------------------
# Running a pilot.
# ---------------------------------------------------------------------------------------


def pilot_subset(
    data: Any, size: int | float, *, seed: int = 0
) -> tuple[tuple[Any, Any], np.ndarray]:
    """A random subset of ``data`` for a pilot: ``((x_sub, y_sub), indices)``.

    Args:
      data: ``(X, y)`` tensors/arrays (or anything :func:`tangentlab.compute_kernel` takes;
        keyword-tensor inputs such as a tokenizer's dict are subset row-wise).
      size: number of samples (int >= 2) or a fraction of N in (0, 1).
      seed: seed of the draw (``torch.randperm``).

    Returns:
      The subset and its sorted indices ``[n]``.
    """
    fn = "pilot_subset"
    x, y = as_arrays(data, where=fn)
    n_total = num_rows(x)
    if isinstance(size, float) and not is_int(size):
        if not 0 < size < 1:
            raise TangentlabError(
                f"{fn}: a fractional size must lie in (0, 1), got {size!r}; pass an int for a "
                "number of samples."
            )
        n = max(2, round(size * n_total))
    elif is_int(size):
        n = int(size)
    else:
        raise TangentlabError(f"{fn}: size must be an int or a float, got {type(size).__name__}.")
    if not 2 <= n <= n_total:
        raise TangentlabError(f"{fn}: size must be between 2 and N = {n_total} samples, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n_total, generator=g)[:n].sort().values
    return (take(x, idx), y[idx]), idx.numpy()


def run_pilot(
    model: nn.Module,
    data: Any,
    optimizer: Any,
    steps: int,
    *,
    size: int | float = 0.1,
    seed: int = 0,
    **finetune_options: Any,
) -> tuple[TrainingRun, tuple[Any, Any], np.ndarray]:
    """Fine-tune ``model`` for ``steps`` full-batch steps on a random pilot subset.

    The pilot trains exactly as :func:`tangentlab.finetune` does (same optimizer, loss,
    trainable weights, batch-norm convention), only on :func:`pilot_subset`'s samples and
    full batch (a minibatch pilot would cost as much per step as the full job). Forecast
    the same pilot on the subset's own kernel (``compute_kernel(model, subset)`` or
    ``compute_head_body_kernel``), then :func:`fit_pilot_clock`.

    Cost: n · steps sample-gradients (plus one loss evaluation of the n samples per
    logged step), against N · T (full batch) or B · T (minibatch) for the full job.

    Returns:
      ``(run, subset, indices)``: the :class:`tangentlab.finetune.TrainingRun`, the
      subset ``(x_sub, y_sub)`` and its indices ``[n]``.
    """
    if "batch_size" in finetune_options and finetune_options["batch_size"] is not None:
        raise TangentlabError(
            "run_pilot: the pilot trains full batch on its subset; drop batch_size."
        )
    subset, idx = pilot_subset(data, size, seed=seed)
    finetune_options.setdefault("progress", False)
    finetune_options.setdefault("log_every", 1)
    run = finetune(model, subset, optimizer, steps, seed=seed, **finetune_options)
    return run, subset, idx

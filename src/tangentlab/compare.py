"""Compare a forecast with a real fine-tuning run: :func:`compare` -> :class:`Comparison`.

The headline metric (DESIGN.md §3) is the relative error of steps to a target loss,
|T̂ - T| / T, with ε inside both curves' range; next to it the curve error
mean_t |L̂_t - L_t| / L_0 over the run's logged steps, the steps-to-plateau error and the
final accuracy difference.

NOTE [steps on the logged grid]
A run logs its loss every ``log_every`` steps (plus step 0 and the last step), while a
forecast has every step. Both T's are located the same way, on the run's logged steps
s_0 = 0 < s_1 < ... < s_K: T(ε) = the first s_k with L_{s_k} <= ε, for the run and for the
forecast read at the same steps. With ``log_every=1`` this is exactly
T(ε) = min{t : L_t <= ε}; on a coarser grid the true crossing lies in (s_{k-1}, s_k], and
``steps_resolution`` = s_k - s_{k-1} (the larger of the two intervals, 1 when exact)
says how coarse it is. Reading both curves on one grid keeps the rounding the same for
both, so a coarse log does not bias |T̂ - T|. Only the run's logged steps within the
forecast's horizon are compared.

NOTE [plateau on a common window]
Steps to plateau, T = min{t : |L_t - L_∞| < ε_rel |L_0 - L_∞|}, needs L_∞, which a real
run does not have. Both curves use the same estimate: L_∞ = the mean loss over the logged
steps in the last 10% of the compared horizon (at least the last two logged steps). A
curve whose two halves of that window differ by ε_rel |L_0 - L_∞| or more is still moving:
no plateau within the horizon (``None``, with the reason in ``plateau_note``). The
forecast's own ``loss_limit`` (exact for full-batch MSE) is not used, so that both sides
are estimated alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangentlab.errors import TangentlabError
from tangentlab.forecast import default_target
from tangentlab.training import is_real

_PLATEAU_TAIL = 0.1  # NOTE [plateau on a common window]
_L0_REL_TOL = 1e-3  # initial losses further apart than this are flagged (different setups?)
_SETTINGS = ("optimizer", "lr", "momentum", "betas", "eps", "weight_decay", "schedule", "loss",
             "target_scale", "num_samples")  # fmt: skip


@dataclass(frozen=True, eq=False)
class Comparison:
    """A forecast against a real run, on the run's logged steps (NOTE [steps on the logged grid]).

    Attributes:
      steps: the compared steps (the run's logged steps within the forecast's horizon), ``[K]``.
      loss_run, loss_forecast: the two losses at ``steps``, ``[K]`` (forecast: mean over paths).
      accuracy_run, accuracy_forecast: the two training accuracies at ``steps``, ``[K]``
        (``accuracy_run`` all NaN when the run has no accuracy).
      initial_loss: L_0 of the run (normalizes the curve error; sets the default target).
      target_loss: ε of steps-to-target.
      target_note: where ε comes from ("given" or the default's definition) and, when
        there is no step error, why.
      steps_to_target_run: T, the first logged step with L_t <= ε, or ``None``.
      steps_to_target_forecast: T̂, the same for the forecast on the same steps, or ``None``.
      steps_to_target_error: |T̂ - T| / T, or ``None`` when ε is not inside both curves'
        range (min L <= ε < L_0 for each).
      target_missed: the run reaches ε and the forecast does not (within the compared
        steps): a failure of the forecast, censored at >= 100% in benchmark summaries
        (``steps_to_target_error`` is then ``None``; ``target_note`` says where, if
        anywhere, the forecast reaches ε later).
      steps_resolution: width of the logged interval ending at T (or T̂), 1 when exact.
      plateau_rel_eps: ε_rel of steps-to-plateau.
      steps_to_plateau_run, steps_to_plateau_forecast: NOTE [plateau on a common window].
      steps_to_plateau_error: |T̂_p - T_p| / T_p, or ``None``.
      plateau_note: why a plateau is missing, or how L_∞ was estimated.
      curve_error: mean over ``steps`` of |L̂_t - L_t| / L_0 (steps where both are finite).
      curve_error_max: max over the same steps.
      final_step: the last step where both curves are finite.
      final_loss_run, final_loss_forecast: losses at ``final_step``.
      final_accuracy_run, final_accuracy_forecast: accuracies at ``final_step``.
      final_accuracy_diff: forecast minus run at ``final_step`` (``None`` without accuracy).
      band_coverage: fraction of the steps after 0 where the run's loss lies in the
        forecast's band (10%-90% of paths by default: about 0.8 when calibrated), or
        ``None`` for a deterministic forecast.
      diverges_forecast, diverged_run: divergence on either side.
      cost_ratio: run training seconds / (kernel + forecast) seconds, when given.
      cost_ratio_with_eval: the same with the run's full-loss evaluations counted.
      notes: anything the reader should know (mismatches, truncations, divergence).
      eval: held-out errors when both sides carry held-out curves (``forecast(...,
        eval_data=)``, ``finetune(..., eval_data=)``), else ``None``: ``final_step``,
        ``final_loss_run`` / ``_forecast``, ``final_accuracy_run`` / ``_forecast``,
        ``final_accuracy_error_points`` (forecast minus run, accuracy points),
        ``curve_error`` (mean |L̂e_t - Le_t| / Le_0), ``best_step_run`` / ``_forecast``
        (argmin of each held-out loss on the compared steps), ``best_step_error`` (|T̂* - T*|
        / max(T*, 1)), ``accuracy_at_best_run`` / ``_forecast`` and
        ``accuracy_at_best_error_points`` (at each side's own best step), and
        ``run_accuracy_at_forecast_best`` / ``run_loss_regret_at_forecast_best``: what
        stopping the real run at the forecast's best step gives (its accuracy, and its
        held-out loss minus its minimum).
      steps_interval: ``(low, high)`` of the forecast's 80% interval for the real steps to
        ε (``Forecast.steps_interval``; head-exact forecasts only, else ``None``; ``high``
        ``None``: open above).
      steps_in_interval: whether the run's T lies in it (``None`` without an interval or
        when the run does not reach ε).
      steps_median, steps_median_error: the interval's calibrated median estimate of T
        (``StepsInterval.median``) and its error |T̂' - T| / T (``None`` when either is).
      steps_trusted: ``StepsInterval.trusted`` (a narrow band), ``None`` without an interval.
      loss_interval_coverage: the fraction of the compared steps, among those where the
        forecast's band for the real loss has both edges (``Forecast.loss_interval``, NOTE
        [loss interval]; head-exact forecasts), at which the run's loss lies in it; ``None``
        without such steps.
    """

    steps: np.ndarray
    loss_run: np.ndarray
    loss_forecast: np.ndarray
    accuracy_run: np.ndarray
    accuracy_forecast: np.ndarray
    initial_loss: float
    target_loss: float | None
    target_note: str
    steps_to_target_run: int | None
    steps_to_target_forecast: int | None
    steps_to_target_error: float | None
    target_missed: bool
    steps_resolution: int | None
    plateau_rel_eps: float
    steps_to_plateau_run: int | None
    steps_to_plateau_forecast: int | None
    steps_to_plateau_error: float | None
    plateau_note: str
    curve_error: float
    curve_error_max: float
    final_step: int | None
    final_loss_run: float | None
    final_loss_forecast: float | None
    final_accuracy_run: float | None
    final_accuracy_forecast: float | None
    final_accuracy_diff: float | None
    band_coverage: float | None
    diverges_forecast: bool
    diverged_run: bool
    cost_ratio: float | None = None
    cost_ratio_with_eval: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    eval: dict[str, Any] | None = None
    steps_interval: tuple[int | None, int | None] | None = None
    steps_in_interval: bool | None = None
    steps_median: int | None = None
    steps_median_error: float | None = None
    steps_trusted: bool | None = None
    loss_interval_coverage: float | None = None

    def summary(self) -> dict[str, Any]:
        """The scalar results (no curves), JSON-able."""
        d = self.to_dict()
        for key in ("steps", "loss_run", "loss_forecast", "accuracy_run", "accuracy_forecast"):
            d.pop(key)
        return d

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every attribute, arrays as lists, NaN -> None."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, np.ndarray):
                v = [int(s) for s in v] if name == "steps" else [_json_float(a) for a in v]
            elif isinstance(v, float):
                v = _json_float(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[name] = v
        return out


def compare(
    forecast: Any,
    run: Any,
    *,
    target_loss: float | None = None,
    target_drop: float = 0.8,
    plateau_rel_eps: float = 0.05,
    forecast_seconds: float | None = None,
    check_settings: bool = True,
    pilot: Any = None,
) -> Comparison:
    r"""Errors of a forecast against a real fine-tuning run of the same setting.

    .. math::
        e_T = \frac{|\hat T(\varepsilon) - T(\varepsilon)|}{T(\varepsilon)},\qquad
        e_L = \frac{1}{K} \sum_{k} \frac{|\hat L_{s_k} - L_{s_k}|}{L_0}

    over the run's logged steps s_k (NOTE [steps on the logged grid]). Zancato et al., 2020,
    "Predicting training time without training", https://arxiv.org/abs/2008.12478.

    Args:
      forecast: a :class:`~tangentlab.Forecast`, or a mapping with ``"loss"`` ``[T+1]``
        (one entry per step from 0; ``None`` entries read as NaN, so ``Forecast.to_dict()``
        output works) and optionally ``"accuracy"``, ``"loss_band"`` (``{"low", "high"}``
        or a pair), ``"hyperparameters"``, ``"diverges"``.
      run: a :class:`~tangentlab.finetune.TrainingRun`, or a mapping with ``"steps"``
        ``[K]`` (increasing, starting at 0), ``"loss"`` ``[K]`` and optionally
        ``"accuracy"``, ``"hyperparameters"``, ``"train_seconds"``, ``"wall_seconds"``,
        ``"diverged"`` (e.g. a training log of your own).
      target_loss: ε. ``None``: a ``target_drop`` drop of the run's initial loss,
        ε = (1 - target_drop) L_0 (default 0.2 L_0). The step error is reported only when
        min L <= ε < L_0 holds for both curves.
      target_drop: relative drop that defines the default target, in (0, 1).
      plateau_rel_eps: ε_rel of steps to plateau (NOTE [plateau on a common window]).
      forecast_seconds: what the forecast cost (kernel + forecast, seconds); gives
        ``cost_ratio`` = run training seconds / forecast_seconds.
      check_settings: refuse a forecast and a run whose hyper-parameters differ (lr,
        batch size, momentum, weight decay, learning-rate schedule, loss, target scale, N),
        when both carry them.
      pilot: a :class:`tangentlab.hybrid.Pilot` of the same loss: a head-exact forecast's
        interval is then the one conditioned on it (``Forecast.steps_interval(...,
        pilot=)``, NOTE [pilot feature]).

    Returns:
      A :class:`Comparison`.

    Raises:
      TangentlabError: malformed curves, a run without step 0, or different settings.
    """
    fn = "compare"
    fc = _forecast_curves(fn, forecast)
    rn = _run_curves(fn, run)
    _check_args(fn, plateau_rel_eps, target_drop, target_loss, forecast_seconds)
    if check_settings:
        _check_same_settings(fn, fc["hyper"], rn["hyper"])
    notes: list[str] = []
    horizon = fc["loss"].shape[0] - 1
    keep = _common_steps(fn, fc, rn, notes)
    steps = rn["steps"][keep]
    loss_run, acc_run = rn["loss"][keep], rn["accuracy"][keep]
    loss_fc, acc_fc = fc["loss"][steps], fc["accuracy"][steps]
    l0 = float(loss_run[0])
    notes += _setup_notes(fc, rn, l0, float(loss_fc[0]))
    target = _target_part(fc, steps, loss_run, loss_fc, target_loss, target_drop, horizon)
    plateau = _plateau_part(steps, loss_run, loss_fc, plateau_rel_eps)
    final = _final_part(steps, loss_run, loss_fc, acc_run, acc_fc, l0, notes)
    return Comparison(
        steps=steps, loss_run=loss_run, loss_forecast=loss_fc, accuracy_run=acc_run,
        accuracy_forecast=acc_fc, initial_loss=l0, **target, **plateau, **final,
        **_coverage_and_cost(fc, rn, steps, loss_run, loss_fc, forecast_seconds),
        diverges_forecast=bool(fc["diverges"]), diverged_run=bool(rn["diverged"]),
        notes=tuple(notes), eval=_eval_part(fn, fc, rn, keep, steps),
        **_interval_part(forecast, target["target_loss"], target["steps_to_target_run"], pilot),
        loss_interval_coverage=_loss_interval_coverage(forecast, steps, loss_run, pilot),
    )  # fmt: skip


def _common_steps(fn: str, fc: dict, rn: dict, notes: list[str]) -> np.ndarray:
    """The run's logged steps inside the forecast's horizon (a note when some are not);
    the run's initial loss must be finite and > 0 (it normalizes the errors)."""
    horizon = fc["loss"].shape[0] - 1
    keep = rn["steps"] <= horizon
    if not keep.all():
        notes.append(
            f"the run goes to step {int(rn['steps'][-1])} but the forecast only to step "
            f"{horizon}; compared on steps 0..{horizon}"
        )
    l0 = float(rn["loss"][0])
    if not (math.isfinite(l0) and l0 > 0):
        raise TangentlabError(
            f"{fn}: the run's initial loss must be finite and > 0 to normalize the errors, "
            f"got {l0!r}."
        )
    return keep


def _interval_part(forecast: Any, eps: float | None, t_run: int | None,
                   pilot: Any = None) -> dict[str, Any]:  # fmt: skip
    """The head-exact forecast's 80% interval for T (conditioned on ``pilot`` when given)
    and whether T is in it (NOTE [steps interval] in tangentlab.forecast)."""
    method = getattr(forecast, "method", None) or {}
    if eps is None or method.get("model") != "head-body":
        return {}
    iv = forecast.steps_interval(eps, pilot=pilot)
    inside = err = None
    if t_run is not None:
        inside = iv.low is not None and iv.low <= t_run and (iv.high is None or t_run <= iv.high)
        if iv.median is not None and t_run > 0:
            err = abs(iv.median - t_run) / t_run
    return dict(steps_interval=(iv.low, iv.high), steps_in_interval=inside,
                steps_median=iv.median, steps_median_error=err,
                steps_trusted=iv.trusted)  # fmt: skip


def _loss_interval_coverage(forecast: Any, steps: np.ndarray, loss_run: np.ndarray,
                            pilot: Any = None) -> float | None:  # fmt: skip
    """Where the head-exact forecast's loss band has both edges: the share of the run's
    logged steps inside it (NOTE [loss interval] in tangentlab.forecast)."""
    method = getattr(forecast, "method", None) or {}
    if method.get("model") != "head-body":
        return None
    band = forecast.loss_interval(pilot=pilot)
    both = band.two_sided()[steps]
    if not both.any():
        return None
    return float(band.covers(loss_run, steps=steps)[both].mean())


def _eval_part(fn: str, fc: dict, rn: dict, keep: np.ndarray, steps: np.ndarray) -> dict | None:
    """Held-out errors (final and at the best step, accuracy in points) when both sides
    have held-out curves."""
    if fc["eval"] is None or rn["eval"] is None:
        return None
    le_run, ae_run = rn["eval"][0][keep], rn["eval"][1][keep]
    le_fc, ae_fc = fc["eval"][0][steps], fc["eval"][1][steps]
    both = np.isfinite(le_run) & np.isfinite(le_fc)
    if not both.any() or not (math.isfinite(le_run[0]) and le_run[0] > 0):
        return None
    j = int(np.flatnonzero(both)[-1])
    b_run = int(np.nanargmin(np.where(both, le_run, np.nan)))
    b_fc = int(np.nanargmin(np.where(both, le_fc, np.nan)))
    t_run, t_fc = int(steps[b_run]), int(steps[b_fc])

    def pts(a: float, b: float) -> float | None:
        return None if not (math.isfinite(a) and math.isfinite(b)) else 100.0 * (a - b)

    return {
        "final_step": int(steps[j]),
        "final_loss_run": _json_float(le_run[j]), "final_loss_forecast": _json_float(le_fc[j]),
        "final_accuracy_run": _json_float(ae_run[j]),
        "final_accuracy_forecast": _json_float(ae_fc[j]),
        "final_accuracy_error_points": pts(ae_fc[j], ae_run[j]),
        "curve_error": float(np.mean(np.abs(le_fc[both] - le_run[both]) / le_run[0])),
        "best_step_run": t_run, "best_step_forecast": t_fc,
        "best_step_error": abs(t_fc - t_run) / max(t_run, 1),
        "min_loss_run": _json_float(le_run[b_run]), "min_loss_forecast": _json_float(le_fc[b_fc]),
        "accuracy_at_best_run": _json_float(ae_run[b_run]),
        "accuracy_at_best_forecast": _json_float(ae_fc[b_fc]),
        "accuracy_at_best_error_points": pts(ae_fc[b_fc], ae_run[b_run]),
        "run_accuracy_at_forecast_best": _json_float(ae_run[b_fc]),
        "run_loss_regret_at_forecast_best": _json_float(le_run[b_fc] - le_run[b_run]),
    }  # fmt: skip


def _eval_curves(fn: str, obj: Any, n: int, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(eval_loss, eval_accuracy)`` of a Forecast / TrainingRun or of its ``to_dict()``."""
    loss, acc = _get(obj, "eval_loss"), _get(obj, "eval_accuracy")
    block = _get(obj, "eval")
    if loss is None and isinstance(block, Mapping):
        loss, acc = block.get("loss"), block.get("accuracy")
    if loss is None:
        return None
    loss = _floats(fn, f"{what} eval_loss", loss)
    acc = np.full_like(loss, math.nan) if acc is None else _floats(fn, f"{what} eval_accuracy",
                                                                   acc)  # fmt: skip
    if loss.shape != (n,) or acc.shape != (n,):
        raise TangentlabError(
            f"{fn}: the {what}'s held-out curves must have one entry per loss entry ({n}), got "
            f"{loss.size} and {acc.size}."
        )
    return loss, acc


def _coverage_and_cost(fc, rn, steps, loss_run, loss_fc, forecast_seconds) -> dict:
    """Band coverage of the run's loss, and the cost ratios (run seconds / forecast)."""
    coverage = None
    if fc["band"] is not None:
        low, high = fc["band"][0][steps], fc["band"][1][steps]
        inside = (loss_run >= low) & (loss_run <= high)
        sel = np.isfinite(loss_run) & np.isfinite(loss_fc) & (steps > 0)
        coverage = float(inside[sel].mean()) if sel.any() else None
    ratio = ratio_eval = None
    if forecast_seconds is not None:
        if rn["train_seconds"] is not None:
            ratio = rn["train_seconds"] / forecast_seconds
        if rn["wall_seconds"] is not None:
            ratio_eval = rn["wall_seconds"] / forecast_seconds
    return dict(band_coverage=coverage, cost_ratio=ratio, cost_ratio_with_eval=ratio_eval)


def _check_args(fn, plateau_rel_eps, target_drop, target_loss, forecast_seconds) -> None:
    if not is_real(plateau_rel_eps) or not 0 < plateau_rel_eps < 1:
        raise TangentlabError(
            f"{fn}: plateau_rel_eps must be in (0, 1), got {plateau_rel_eps!r}; e.g. 0.05 "
            "for 'within 5% of the initial gap'."
        )
    if not is_real(target_drop) or not 0 < target_drop < 1:
        raise TangentlabError(
            f"{fn}: target_drop must be in (0, 1), got {target_drop!r}; 0.8 targets an 80% "
            "drop of the run's initial loss."
        )
    if target_loss is not None and not is_real(target_loss):
        raise TangentlabError(
            f"{fn}: target_loss must be a finite number or None (0.2 x the run's initial "
            f"loss), got {target_loss!r}."
        )
    if forecast_seconds is not None and (not is_real(forecast_seconds) or forecast_seconds <= 0):
        raise TangentlabError(
            f"{fn}: forecast_seconds must be a number > 0 (kernel + forecast time), got "
            f"{forecast_seconds!r}."
        )


def _setup_notes(fc: dict, rn: dict, l0: float, l0_fc: float) -> list[str]:
    notes = []
    if not math.isclose(l0_fc, l0, rel_tol=_L0_REL_TOL):
        notes.append(
            f"initial losses differ: forecast {l0_fc:.6g}, run {l0:.6g}; are the model, data, "
            "trainable weights and loss the same?"
        )
    if fc["diverges"] and not rn["diverged"]:
        notes.append("the forecast diverges but the run does not")
    if rn["diverged"] and not fc["diverges"]:
        notes.append("the run diverged but the forecast does not")
    return notes


def _target_part(fc, steps, loss_run, loss_fc, target_loss, target_drop, horizon) -> dict:
    """Steps to target on the run's logged grid (NOTE [steps on the logged grid])."""
    l0, l0_fc = float(loss_run[0]), float(loss_fc[0])
    if target_loss is None:
        eps = default_target(l0, drop=target_drop)
        origin = (f"{target_drop:.0%} drop of the run's initial loss: "
                  f"{1.0 - target_drop:.3g} x {l0:.4g}")  # fmt: skip
    else:
        eps, origin = float(target_loss), "given"
    t_run, i_run = _first_below(steps, loss_run, eps)
    t_fc, i_fc = _first_below(steps, loss_fc, eps)
    why = []
    for name, curve, first in (("run", loss_run, l0), ("forecast", loss_fc, l0_fc)):
        low = _nanmin(curve)
        if not eps < first:
            why.append(f"the {name} starts at or below it (L_0 = {first:.4g})")
        elif not low <= eps:
            why.append(f"the {name} does not reach it by step {int(steps[-1])} "
                       f"(lowest {low:.4g})")  # fmt: skip
    if why:
        err_t, resolution = None, None
        if t_fc is None and t_run is not None and fc["loss"].shape[0] > steps[-1] + 1:
            later = _first_below(np.arange(horizon + 1), fc["loss"], eps)[0]
            if later is not None:
                why.append(f"the forecast reaches it at step {later}")
        note = f"{origin}; no step error: " + "; ".join(why)
    else:
        err_t = abs(t_fc - t_run) / t_run
        resolution = max(int(steps[i] - steps[i - 1]) for i in (i_run, i_fc))
        note = origin
    missed = t_run is not None and t_fc is None and eps < l0_fc
    return dict(target_loss=eps, target_note=note, steps_to_target_run=t_run,
                steps_to_target_forecast=t_fc, steps_to_target_error=err_t,
                target_missed=missed, steps_resolution=resolution)  # fmt: skip


def _plateau_part(steps, loss_run, loss_fc, rel_eps: float) -> dict:
    """Steps to plateau (NOTE [plateau on a common window])."""
    p_run, why_run = _plateau(steps, loss_run, rel_eps)
    p_fc, why_fc = _plateau(steps, loss_fc, rel_eps)
    note = "L_inf = mean of each curve over the last 10% of the compared steps"
    if why_run or why_fc:
        note += "; " + "; ".join(
            f"{name}: {w}" for name, w in (("run", why_run), ("forecast", why_fc)) if w
        )
    err = None
    if p_run == 0 and p_fc is not None:
        note += "; the run is flat from step 0 (no relative error)"
    elif p_run is not None and p_fc is not None:
        err = abs(p_fc - p_run) / p_run
    return dict(plateau_rel_eps=float(rel_eps), steps_to_plateau_run=p_run,
                steps_to_plateau_forecast=p_fc, steps_to_plateau_error=err,
                plateau_note=note)  # fmt: skip


def _final_part(steps, loss_run, loss_fc, acc_run, acc_fc, l0: float, notes: list) -> dict:
    """Curve error and the values at the last step where both curves are finite."""
    both = np.isfinite(loss_run) & np.isfinite(loss_fc)
    if both.any():
        dev = np.abs(loss_fc[both] - loss_run[both]) / l0
        curve_err, curve_max = float(dev.mean()), float(dev.max())
    else:
        curve_err = curve_max = math.nan
    if both.sum() < both.size:
        notes.append(
            f"curve error over {int(both.sum())} of {both.size} steps (NaN after divergence)"
        )
    final = np.flatnonzero(both)
    if final.size:
        j = int(final[-1])
        final_step = int(steps[j])
        fl_run, fl_fc = float(loss_run[j]), float(loss_fc[j])
        fa_run, fa_fc = _maybe(acc_run[j]), _maybe(acc_fc[j])
    else:
        final_step = fl_run = fl_fc = fa_run = fa_fc = None
    acc_diff = None if fa_run is None or fa_fc is None else fa_fc - fa_run
    return dict(curve_error=curve_err, curve_error_max=curve_max, final_step=final_step,
                final_loss_run=fl_run, final_loss_forecast=fl_fc, final_accuracy_run=fa_run,
                final_accuracy_forecast=fa_fc, final_accuracy_diff=acc_diff)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Locating steps.
# ---------------------------------------------------------------------------------------


def _first_below(steps: np.ndarray, loss: np.ndarray, eps: float) -> tuple[int | None, int]:
    """(first step with loss <= eps, its index), or (None, -1); NaN never counts."""
    hit = np.flatnonzero(loss <= eps)
    return (int(steps[hit[0]]), int(hit[0])) if hit.size else (None, -1)


def _plateau(steps: np.ndarray, loss: np.ndarray, rel_eps: float) -> tuple[int | None, str]:
    """Steps to plateau on the common window, or (None, why)."""
    if not np.isfinite(loss).all():
        return None, "diverges (NaN in the compared steps)"
    if steps.size < 2:
        return None, "fewer than two logged steps"
    start = steps[-1] - _PLATEAU_TAIL * steps[-1]
    tail = np.flatnonzero(steps >= start)
    if tail.size < 2:
        tail = np.arange(steps.size - 2, steps.size)
    limit = float(loss[tail].mean())
    gap = abs(float(loss[0]) - limit)
    if gap == 0:
        return 0, ""
    half = tail.size // 2
    drift = abs(float(loss[tail[:half]].mean()) - float(loss[tail[half:]].mean()))
    if drift >= rel_eps * gap:
        return None, "still moving at the end of the horizon (no plateau within it)"
    hit = np.flatnonzero(np.abs(loss - limit) < rel_eps * gap)
    return int(steps[hit[0]]), ""


# ---------------------------------------------------------------------------------------
# Inputs: Forecast / TrainingRun objects or plain mappings (e.g. their to_dict()).
# ---------------------------------------------------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _floats(fn: str, what: str, values: Any) -> np.ndarray:
    try:
        arr = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise TangentlabError(
            f"{fn}: {what} must be a 1-D sequence of numbers, got {type(values).__name__}."
        ) from None
    if arr.ndim != 1 or arr.size == 0:
        raise TangentlabError(
            f"{fn}: {what} must be a non-empty 1-D sequence, got shape {arr.shape}."
        )
    return arr


def _forecast_curves(fn: str, forecast: Any) -> dict[str, Any]:
    loss = _get(forecast, "loss")
    if loss is None:
        raise TangentlabError(
            f"{fn}: forecast must be a tangentlab.Forecast or a mapping with a 'loss' curve "
            f"(one entry per step from 0), got {type(forecast).__name__}."
        )
    loss = _floats(fn, "forecast loss", loss)
    acc = _get(forecast, "accuracy")
    acc = np.full_like(loss, math.nan) if acc is None else _floats(fn, "forecast accuracy", acc)
    if acc.shape != loss.shape:
        raise TangentlabError(
            f"{fn}: the forecast's accuracy has {acc.size} entries but its loss {loss.size}."
        )
    band = _get(forecast, "loss_band")
    if isinstance(band, Mapping):
        band = (band.get("low"), band.get("high"))
    if band is not None:
        band = (_floats(fn, "forecast band", band[0]), _floats(fn, "forecast band", band[1]))
        if band[0].shape != loss.shape or band[1].shape != loss.shape:
            raise TangentlabError(f"{fn}: the forecast's loss_band must match its loss curve.")
    diverges = _get(forecast, "diverges")
    if diverges is None:
        diverges = bool(np.isnan(loss).any())
    return {"loss": loss, "accuracy": acc, "band": band, "diverges": bool(diverges),
            "hyper": _get(forecast, "hyperparameters") or {},
            "eval": _eval_curves(fn, forecast, loss.size, "forecast")}  # fmt: skip


def _run_curves(fn: str, run: Any) -> dict[str, Any]:
    steps, loss = _get(run, "steps"), _get(run, "loss")
    if steps is None or loss is None:
        raise TangentlabError(
            f"{fn}: run must be a TrainingRun (tangentlab.finetune) or a mapping with 'steps' "
            f"and 'loss' (and optionally 'accuracy'), got {type(run).__name__}."
        )
    loss = _floats(fn, "run loss", loss)
    raw = np.asarray(steps)
    if raw.ndim != 1 or raw.shape != loss.shape or not np.issubdtype(raw.dtype, np.integer):
        raise TangentlabError(
            f"{fn}: the run's steps must be integers, one per loss value; got "
            f"{raw.size} steps ({raw.dtype}) for {loss.size} losses."
        )
    steps = raw.astype(np.int64)
    if steps[0] != 0 or (np.diff(steps) <= 0).any():
        raise TangentlabError(
            f"{fn}: the run's steps must increase strictly from 0 (the initial loss L_0 "
            f"normalizes the errors); got steps starting {steps[:4].tolist()}. Log step 0."
        )
    acc = _get(run, "accuracy")
    acc = np.full_like(loss, math.nan) if acc is None else _floats(fn, "run accuracy", acc)
    if acc.shape != loss.shape:
        raise TangentlabError(f"{fn}: the run's accuracy has {acc.size} entries, loss {loss.size}.")
    diverged = _get(run, "diverged")
    if diverged is None:
        diverged = bool(np.isnan(loss).any())
    train_s, wall_s = _get(run, "train_seconds"), _get(run, "wall_seconds")
    return {"steps": steps, "loss": loss, "accuracy": acc, "diverged": bool(diverged),
            "hyper": _get(run, "hyperparameters") or {},
            "train_seconds": None if train_s is None else float(train_s),
            "wall_seconds": None if wall_s is None else float(wall_s),
            "eval": _eval_curves(fn, run, loss.size, "run")}  # fmt: skip


def _check_same_settings(fn: str, hf: Mapping, hr: Mapping) -> None:
    """Both sides' hyper-parameters must agree where both give them (full batch = B >= N)."""
    diff = []
    for key in _SETTINGS:
        a, b = hf.get(key), hr.get(key)
        if a is None or b is None:
            continue
        same = math.isclose(a, b, rel_tol=1e-9) if is_real(a) and is_real(b) else a == b
        if not same:
            diff.append(f"{key} ({a!r} vs {b!r})")
    if hf.get("weight_decay") and hf.get("decay_to") and hr.get("decay_to"):
        if hf["decay_to"] != hr["decay_to"]:
            diff.append(f"decay_to ({hf['decay_to']!r} vs {hr['decay_to']!r})")
    n = hf.get("num_samples") or hr.get("num_samples")
    if "batch_size" in hf and "batch_size" in hr:
        a, b = (_full(hf["batch_size"], n), _full(hr["batch_size"], n))
        if a != b:
            diff.append(f"batch_size ({hf['batch_size']!r} vs {hr['batch_size']!r})")
    if diff:
        raise TangentlabError(
            f"{fn}: the forecast and the run have different settings: {', '.join(diff)} "
            "(forecast vs run). Run both with the same settings, or pass "
            "check_settings=False to compare anyway."
        )


def _full(batch: Any, n: Any) -> Any:
    return "full" if batch is None or (n is not None and batch >= n) else batch


def _nanmin(x: np.ndarray) -> float:
    ok = x[np.isfinite(x)]
    return float(ok.min()) if ok.size else math.nan


def _maybe(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _json_float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None

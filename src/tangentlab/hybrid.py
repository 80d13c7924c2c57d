"""A hybrid steps interval: the calibrated estimate conditioned on one short real pilot run.

NOTE [pilot feature]
The calibrated steps interval (NOTE [steps interval] in :mod:`tangentlab.forecast`) uses
only what is known before training. On held-out tasks it met issue 13's goals on
transformer bodies but not on convolutional ones: there the real runs were off the estimate
by a factor that kept its sign across the settings of a task (RESULTS.md "holdout-curves",
"holdout-kind") and that no feature known before training explained. A real run measures
it. The **pilot**, one per loss: full batch, SGD with momentum m = 0.9 at a = 0.1 of the
stability limit (``tl.stable_lr(kernel, momentum=0.9, fraction=0.1, loss=...)``), trained
until its loss has dropped by D = 50%, and the head-exact forecast of the same run. Its
feature is

    p = log(T_pilot / T̂_pilot),   T = first step with L_t <= (1 - D) L_0 (real L_0),

T̂ the same on the forecast (p = 0 when the forecast does not get there within its horizon;
it is then uninformative, ``Pilot.note`` says so). ``Forecast.steps_interval(ε, pilot=)``
adds p as an eleventh column to the features of every other setting of the same loss, with
quantiles refitted on the development tasks (``STEPS_CALIBRATION_PILOT``).

Chosen on twenty-four development tasks (benchmarks/holdout_hybrid.py --calibrate; the
rule: pilots costing at most 5% of the sweep grid, the narrowest band covering 80% of each
kind of body, then the lowest left-out p90) among full-batch pilots with (m, a) in {(0,
0.1), (0, 0.3), (0.9, 0.1), (0.9, 0.3), (0.9, 1)} and D in {50%, 80%}. Left out: median
estimate 13% / 80% against 16% / 94% on the same targets without the column (image tasks
21% / 75% against 28% / 92%), band log-width 0.87 against 1.06.

Reported once on four fresh tasks (benchmarks/holdout_hybrid.py, RESULTS.md "holdout-hybrid",
243 targets, the pilot cells' own left out): median estimate 11% / 44% against 14% / 47%
without the pilot, the interval covering 95%; with a = 1 without momentum left out, issue
13's four goal cells met pooled (MSE 50% 11% / 30%, MSE 80% 8% / 20%, CE 50% 12% / 30%,
CE 80% 10% / 24%). On the image tasks 17% / 44% against 21% / 47%: better on MSE, worse on
CE at the 50% drop (a CE pilot 1.8x faster than its forecast moved the cells too far).

At a convolutional body's full span (``compute_head_body_kernel(..., directions="all")``,
NOTE [full-span interval] in :mod:`tangentlab.forecast`) the pilot is forecast on that
kernel, and p conditions ``STEPS_CALIBRATION_FULL_PILOT`` instead (round 9,
benchmarks/fullspan_pilot.py: left out 13% / 54% against 22% / 61% without the pilot; on two
fresh tasks 38% / miss, band covering 70%). A pilot forecast on one kind of kernel does not
condition forecasts of the other (an error says so). A pilot outside the range of the
development pilots its table was fitted on (``PILOT_RANGE`` in :mod:`tangentlab.forecast`)
makes the interval an extrapolation, and its note says so.

Cost: the pilot's T · N sample-gradients (plus one loss evaluation per step, which a
full-batch step shares with its forward pass). On the development tasks a median of 2.8%
of the grid of 24 settings each (MSE/CE x full/B = 32 x m 0/0.9 x a 0.1/0.3/1 of the
limit), but 2.1x the median setting's own run (0.7-4.1x; fresh tasks 0.8-3.5% and
0.5-2.4x): a pilot pays off for a sweep of settings, not for one run.

This is issue 13's candidate 3 in the form that measured best: not a kernel growth carried
over (tangentlab.experimental.pilot's clock; RESULTS.md "holdout-pilot": worse on held-out
tasks) but one scalar per task and loss, read by the same calibrated quantile regressions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentlab.decisions import stable_lr
from tangentlab.errors import TangentlabError, ValidityWarning
from tangentlab.finetune import TrainingRun, finetune
from tangentlab.forecast import Forecast, forecast, pilot_range_note
from tangentlab.headbody import HeadBodyKernel
from tangentlab.tangent import ParamSpec
from tangentlab.training import SGD, as_loss, is_int

PILOT_MOMENTUM = 0.9  # the calibrated pilot: full batch, SGD with this momentum,
PILOT_FRACTION = 0.1  # at this fraction of the stability limit (tl.stable_lr),
PILOT_DROP = 0.5  # trained until its loss has dropped by this much
_FRACTION_SLACK = 2.0  # a pilot at a in [a_p / 2, 2 a_p] is accepted (stable_lr rounds down)
_HORIZON = (10, 100, 5000)  # forecast the pilot over max(10 T, 100) steps, at most 5000


@dataclass(frozen=True, eq=False)
class Pilot:
    """One real pilot run and the head-exact forecast of the same run (NOTE [pilot feature]).

    Attributes:
      feature: p = log(T / T̂) at the pilot's drop (0 when the forecast does not get there).
      loss: ``"mse"`` or ``"ce"``: the loss whose forecasts it conditions.
      steps: T, the real run's first step at a loss <= (1 - drop) L_0.
      forecast_steps: T̂ on the forecast, ``None`` when it does not get there.
      lr: the pilot's learning rate.
      cost: sample-gradients the real run took (steps done x N).
      note: ``""``, or why the feature is 0.
      run: the :class:`~tangentlab.finetune.TrainingRun`; forecast: the pilot's
        :class:`~tangentlab.forecast.Forecast`.
    """

    feature: float
    loss: str
    steps: int
    forecast_steps: int | None
    lr: float
    cost: int
    note: str = ""
    run: TrainingRun | None = field(default=None, repr=False)
    forecast: Forecast | None = field(default=None, repr=False)

    def __str__(self) -> str:
        t_hat = "not reached" if self.forecast_steps is None else str(self.forecast_steps)
        speed = f"real/forecast steps {math.exp(self.feature):.2f}"
        notes = [self.note] if self.note else []
        if self.forecast is not None:  # PILOT_RANGE: the intervals it conditions extrapolate
            out = pilot_range_note(self.feature, full=self.forecast._reads_full_span(True))
            notes += [f"{out}: its intervals extrapolate"] if out else []
        tail = "".join(f"; {n}" for n in notes)
        return (f"pilot ({self.loss.upper()}, lr {self.lr:.3g}, m {PILOT_MOMENTUM:g}, full "
                f"batch): {PILOT_DROP:.0%} drop at step {self.steps} (forecast {t_hat}; "
                f"{speed}){tail}")  # fmt: skip

    @classmethod
    def from_run(cls, run: TrainingRun, forecast: Forecast) -> Pilot:
        """The pilot of a real run the caller made, and the head-exact forecast of it.

        The run must be the calibrated pilot (NOTE [pilot feature]): full batch, SGD with
        momentum 0.9 at about 0.1 of the stability limit, no weight decay or schedule,
        logged at every step (``log_every=1``), until its loss dropped by 50% (e.g.
        ``tl.finetune(..., stop_below=0.5 * L0)``); the forecast must be of the same
        settings (``tl.forecast(head_body_kernel, run.optimizer, H, loss=...)``) over at
        least 10x the run's steps to that drop.

        Example::

            >>> lr = tl.stable_lr(hb, momentum=0.9, fraction=0.1, loss="ce")
            >>> run = tl.finetune(model, (X, y), tl.SGD(lr, momentum=0.9), 2000, loss="ce",
            ...                   log_every=1, stop_below=0.5 * L0)
            >>> fc = tl.forecast(hb, run.optimizer, 10 * run.steps_done, loss="ce")
            >>> pilot = tl.Pilot.from_run(run, fc)
        """
        fn = "Pilot.from_run"
        _check_pilot(fn, run, forecast)
        l0 = float(run.loss[0])
        level = (1.0 - PILOT_DROP) * l0
        t = run.steps_to(level)
        if t is None:
            raise TangentlabError(
                f"{fn}: the pilot's loss never dropped by {PILOT_DROP:.0%} (from {l0:.4g} to "
                f"{level:.4g}) in its {run.steps_done} steps; train it longer (tl.finetune(..., "
                f"stop_below={level:.4g}) stops it there)."
            )
        t_hat = forecast.steps_to(level)
        note = ""
        if t_hat is None:
            horizon = forecast.loss.shape[0] - 1
            need = min(_HORIZON[0] * max(t, 1), _HORIZON[2])
            if forecast.divergence_step is None and horizon < need:
                raise TangentlabError(
                    f"{fn}: the forecast of the pilot does not reach the pilot's "
                    f"{PILOT_DROP:.0%} drop within its {horizon} steps; forecast it over at "
                    f"least {need} steps (10x the real run's {t}, at most {_HORIZON[2]})."
                )
            note = ("the forecast of the pilot " + ("blows up" if forecast.diverges else
                    f"does not reach its {PILOT_DROP:.0%} drop within {horizon} steps") +
                    " (feature 0: the interval is the one without a pilot, refitted)")  # fmt: skip
        feature = 0.0 if t_hat is None else math.log(max(t, 1) / max(t_hat, 1))
        n = int(run.hyperparameters["num_samples"])
        return cls(feature=feature, loss=run.loss_function.name, steps=int(t),
                   forecast_steps=t_hat, lr=float(run.hyperparameters["lr"]),
                   cost=int(run.steps_done) * n, note=note, run=run, forecast=forecast)  # fmt: skip


def _check_pilot(fn: str, run: Any, fc: Any) -> None:
    """The run and the forecast are the calibrated pilot's (NOTE [pilot feature])."""
    if not isinstance(run, TrainingRun):
        raise TangentlabError(f"{fn}: run must be a tl.TrainingRun (tl.finetune), got "
                              f"{type(run).__name__}.")  # fmt: skip
    if not isinstance(fc, Forecast) or fc.method.get("model") != "head-body":
        raise TangentlabError(
            f"{fn}: forecast must be a head-exact tl.Forecast (tl.forecast of "
            "tl.compute_head_body_kernel(...)): the pilot feature was calibrated on those."
        )
    hp, fh = run.hyperparameters, fc.hyperparameters
    fix = (f"run the pilot full batch with tl.SGD(tl.stable_lr(kernel, momentum="
           f"{PILOT_MOMENTUM}, fraction={PILOT_FRACTION}, loss=...), momentum="
           f"{PILOT_MOMENTUM}) (or use tl.measure_pilot)")  # fmt: skip
    batch = hp.get("batch_size")
    if batch is not None and batch < hp["num_samples"]:
        raise TangentlabError(f"{fn}: the pilot trained with batch size {batch} of "
                              f"N = {hp['num_samples']}; {fix}.")  # fmt: skip
    if hp.get("optimizer", "sgd") != "sgd" or hp.get("weight_decay") or \
            hp.get("schedule", "Constant()") != "Constant()":
        raise TangentlabError(f"{fn}: the pilot must be plain SGD with momentum (no weight "
                              f"decay, no schedule); {fix}.")  # fmt: skip
    if abs(float(hp.get("momentum", 0.0)) - PILOT_MOMENTUM) > 1e-9:
        raise TangentlabError(f"{fn}: the pilot ran with momentum {hp.get('momentum', 0.0):g}; "
                              f"{fix}.")  # fmt: skip
    if int(hp.get("log_every", 1)) != 1:
        raise TangentlabError(f"{fn}: the pilot was logged every {hp['log_every']} steps; its "
                              "steps to the drop need every step: finetune(..., log_every=1).")
    same = (fh.get("lr") == hp.get("lr") and fh.get("momentum") == hp.get("momentum")
            and fh.get("batch_size") in (None,) + ((batch,) if batch else ())
            and fc.loss_function is not None and run.loss_function is not None
            and fc.loss_function == run.loss_function
            and fh.get("num_samples") == hp.get("num_samples"))  # fmt: skip
    if not same:
        raise TangentlabError(
            f"{fn}: the forecast is not of the pilot's settings (lr, momentum, batch size, "
            "loss and N must match); forecast it with tl.forecast(kernel, run.optimizer, "
            "steps, loss=run.loss_function)."
        )
    a = fc.stability / 2.0
    if not (math.isfinite(a) and PILOT_FRACTION / _FRACTION_SLACK <= a
            <= PILOT_FRACTION * _FRACTION_SLACK):  # fmt: skip
        raise TangentlabError(
            f"{fn}: the pilot ran at {a:.3g} of the stability limit (the calibration's pilot "
            f"is at {PILOT_FRACTION}); {fix}."
        )


def measure_pilot(
    model: nn.Module,
    data: Any,
    kernel: HeadBodyKernel,
    *,
    loss: Any = "mse",
    params: ParamSpec = None,
    max_steps: int = 3000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Pilot:
    """Run the calibrated pilot for one loss and forecast it (NOTE [pilot feature]).

    Fine-tunes a copy of ``model`` full batch with ``tl.SGD(η, momentum=0.9)``,
    η = ``tl.stable_lr(kernel, momentum=0.9, fraction=0.1, loss=loss)``, until its training
    loss has dropped by 50% (at most ``max_steps`` steps; BN frozen, as the forecast), and
    forecasts the same run on ``kernel`` over max(10 T, 100) steps (at most 5000).

    Args:
      model, data, params: as for :func:`tangentlab.compute_head_body_kernel` (the same
        trainable weights as ``kernel``).
      kernel: the head-exact kernel of ``model`` on ``data``.
      loss: ``"mse"``/``tl.MSE(...)`` or ``"ce"``/``tl.CrossEntropy()``: one pilot per loss.
      max_steps: the most real steps; a pilot that has not dropped 50% by then is an error.
      seed, device, progress: as for :func:`tangentlab.finetune`.

    Returns:
      A :class:`Pilot` for ``Forecast.steps_interval(ε, pilot=...)`` of this loss. Its
      ``cost`` (T x N sample-gradients) is what it took.

    Example::

        >>> hb = tl.compute_head_body_kernel(model, (X, y))
        >>> pilot = tl.measure_pilot(model, (X, y), hb, loss="ce")
        >>> fc = tl.forecast(hb, tl.SGD(0.01), 500, loss="ce", batch_size=32)
        >>> fc.steps_interval(0.2 * fc.loss[0], pilot=pilot)
    """
    fn = "measure_pilot"
    if not isinstance(kernel, HeadBodyKernel):
        raise TangentlabError(
            f"{fn}: kernel must be a head-exact kernel (tl.compute_head_body_kernel(model, "
            f"data)), got {type(kernel).__name__}: the pilot feature was calibrated on its "
            "forecasts."
        )
    if not is_int(max_steps) or max_steps < 1:
        raise TangentlabError(f"{fn}: max_steps must be an integer >= 1, got {max_steps!r}.")
    loss = as_loss(loss, fn)
    lr = stable_lr(kernel, momentum=PILOT_MOMENTUM, fraction=PILOT_FRACTION, loss=loss.name)
    opt = SGD(lr, momentum=PILOT_MOMENTUM)
    with torch.no_grad():
        l0 = float(loss.per_sample(kernel.f0, kernel.targets).mean())
    # stop at the forecast's L_0 (the model's, up to rounding) x 0.5, a hair below
    stop = (1.0 - PILOT_DROP) * l0 * (1.0 - 1e-6)
    run = finetune(model, data, opt, int(max_steps), loss=loss, params=params, seed=seed,
                   log_every=1, device=device, progress=progress, stop_below=stop)  # fmt: skip
    t = run.steps_to((1.0 - PILOT_DROP) * float(run.loss[0]))
    if t is None:
        raise TangentlabError(
            f"{fn}: the pilot's loss did not drop by {PILOT_DROP:.0%} within max_steps = "
            f"{max_steps} (from {run.loss[0]:.4g} to {np.nanmin(run.loss):.4g}"
            + (", then diverged" if run.diverged else "") + "); raise max_steps."
        )
    horizon = min(max(_HORIZON[0] * t, _HORIZON[1]), _HORIZON[2])
    with warnings.catch_warnings():  # the pilot's own validity is not the user's question
        warnings.simplefilter("ignore", ValidityWarning)
        fc = forecast(kernel, opt, horizon, loss=loss)
    return Pilot.from_run(run, fc)

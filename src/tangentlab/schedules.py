"""Learning-rate schedules: small frozen objects shared by the forecast and the real run.

A schedule is a multiplier m(t) of the optimizer's learning rate η: optimizer step
t = 0, 1, … uses η_t = η · m(t). That is exactly ``torch.optim.lr_scheduler.LambdaLR(opt,
schedule.multiplier)`` with ``scheduler.step()`` after every ``optimizer.step()``, which is
how :func:`tangentlab.finetune` applies it, and every solver of :func:`tangentlab.forecast`
reads the same m(t) (NOTE [schedules] in :mod:`tangentlab.forecast`), so the two cannot
differ. Every multiplier lies in [0, 1]: η is the peak learning rate. Schedules compose
like optax's ``join_schedules``::

    >>> sched = tl.Warmup(30).then(tl.Cosine(270))       # linear warmup, then cosine to 0
    >>> opt = tl.SGD(0.1, momentum=0.9, schedule=sched)  # step t uses 0.1 * m(t)
    >>> sched.multipliers(4)                              # [4]: m(0..3) = 0, 1/30, 2/30, 3/30
    >>> tl.make_schedule("warmup-cosine", 300, warmup_fraction=0.1)   # the same schedule

=====================================  =================================================
``Constant()``                         m(t) = 1 (the default)
``Warmup(steps, start=0)``             start + (1 − start)·t/steps, then 1
``LinearDecay(steps, end=0)``          1 − (1 − end)·t/steps, then end
``Cosine(steps, end=0)``               end + (1 − end)·(1 + cos(π t/steps))/2, then end
``StepDecay(every, gamma=0.1)``        gamma^⌊t/every⌋
``a.then(b, at=None)`` = ``Join``      a(t) for t < at, then b(t − at) (at: a's length)
=====================================  =================================================

Their torch equivalents (tested to round-off): ``LinearLR(start, 1, steps)``,
``LinearLR(1, end, steps)``, ``CosineAnnealingLR(steps, eta_min=end·η)`` (up to ``steps``;
torch's cosine climbs again after it, these hold ``end``), ``StepLR(every, gamma)`` and
``SequentialLR([a, b], milestones=[at])``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tangentlab.errors import TangentlabError

SCHEDULE_KINDS = ("constant", "warmup", "warmup-linear", "warmup-cosine", "cosine", "linear",
                  "step")  # fmt: skip
_DEFAULT_WARMUP_FRACTION = 0.1
_set = object.__setattr__  # fields of the frozen dataclasses, normalized once validated
_DEFAULT_GAMMA = 0.1


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return (isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
            and math.isfinite(float(x)))  # fmt: skip


def _check_steps(cls: str, name: str, value: Any, example: str) -> int:
    if not _is_int(value) or value < 1:
        raise TangentlabError(
            f"{cls}: {name} must be an integer >= 1 (optimizer steps), got {value!r}; "
            f"e.g. {example}."
        )
    return int(value)


def _check_unit(cls: str, name: str, value: Any, example: str, *, low_open: bool = False) -> float:
    ok = _is_real(value) and (0.0 < float(value) if low_open else 0.0 <= float(value))
    if not ok or float(value) > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise TangentlabError(
            f"{cls}: {name} must lie in {interval} (a fraction of the peak learning rate), got "
            f"{value!r}; e.g. {example}."
        )
    return float(value)


class Schedule:
    """Base of the schedules: m(t) per optimizer step, composition, serialization.

    Subclasses define ``multiplier(t)``, ``length`` (steps until the schedule is constant, or
    ``None``), ``final`` (m(t) as t → ∞) and ``rest_step`` (the first step from which m(t) = 0
    for ever, or ``None``).
    """

    name: ClassVar[str] = "schedule"

    def multiplier(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def length(self) -> int | None:
        return None

    @property
    def final(self) -> float:
        return 1.0

    @property
    def rest_step(self) -> int | None:
        return None

    @property
    def is_constant(self) -> bool:
        """True for ``Constant()``: every step uses η itself."""
        return False

    def multipliers(self, steps: int) -> np.ndarray:
        """m(0), …, m(steps − 1), ``[steps]`` float64: the same floats ``LambdaLR`` multiplies
        the learning rate by (this calls :meth:`multiplier`)."""
        if not _is_int(steps) or steps < 0:
            raise TangentlabError(
                f"{type(self).__name__}.multipliers: steps must be an integer >= 0, got {steps!r}."
            )
        return np.array([self.multiplier(t) for t in range(int(steps))], dtype=np.float64)

    def peak(self, steps: int) -> float:
        """max m(t) over the steps 0..steps−1 of a run (m(0) when steps = 0)."""
        return float(self.multipliers(max(int(steps), 1)).max())

    def effective_peak(self, steps: int, momentum: float) -> float:
        """max over the run of the stationary rate multiplier of heavy-ball momentum m,
        ``m(t)/(1 - m)`` (η̃ = η/(1 - m) at the schedule's peak: what the stability checks
        use). Overridden where m(t) already holds the buffer's gain (Adam's bias correction,
        tangentlab.adam_approx.AdamBiasCorrection)."""
        return self.peak(steps) / (1.0 - momentum)

    def then(self, second: Schedule, *, at: int | None = None) -> Join:
        """This schedule for steps t < ``at``, then ``second`` restarted: ``second(t − at)``.

        ``at`` defaults to this schedule's ``length`` (e.g. ``Warmup(30).then(Cosine(270))``
        switches at step 30); schedules without a length (``Constant``, ``StepDecay``) need it.
        """
        if at is None:
            at = self.length
            if at is None:
                raise TangentlabError(
                    f"{self.describe()}.then: this schedule has no end; give the step to switch "
                    f"at, e.g. {self.describe()}.then(Cosine(100), at=50)."
                )
        return Join(self, second, at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"name": "cosine", "steps": 300, "end": 0.0}`` (:func:`from_dict`)."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Schedule) else v
        return out

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Constant(Schedule):
    """m(t) = 1: the learning rate is η at every step (the default of ``tl.SGD``)."""

    name: ClassVar[str] = "constant"

    def multiplier(self, t: int) -> float:
        return 1.0

    @property
    def is_constant(self) -> bool:
        return True

    def describe(self) -> str:
        return "Constant()"


@dataclass(frozen=True)
class Warmup(Schedule):
    r"""Linear warmup from ``start``·η to η over ``steps`` steps, then constant.

    .. math::
        m(t) = \text{start} + (1 - \text{start})\,\min(t, \text{steps}) / \text{steps}

    ``torch.optim.lr_scheduler.LinearLR(start_factor=start, end_factor=1, total_iters=steps)``
    (torch needs start > 0; start = 0, the default, makes step 0 a step of size 0, as Hugging
    Face's ``get_*_schedule_with_warmup``).

    Args:
      steps: warmup length (>= 1 optimizer steps).
      start: multiplier at step 0, in [0, 1].
    """

    steps: int
    start: float = 0.0
    name: ClassVar[str] = "warmup"

    def __post_init__(self) -> None:
        _set(self, "steps", _check_steps("Warmup", "steps", self.steps, "tl.Warmup(100)"))
        _set(self, "start", _check_unit("Warmup", "start", self.start, "tl.Warmup(100, start=0.1)"))

    def multiplier(self, t: int) -> float:
        if t >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * t / self.steps

    @property
    def length(self) -> int:
        return self.steps

    def describe(self) -> str:
        return f"Warmup({self.steps}{f', start={self.start!r}' if self.start else ''})"


@dataclass(frozen=True)
class LinearDecay(Schedule):
    r"""Linear decay from η to ``end``·η over ``steps`` steps, then constant at ``end``·η.

    .. math::
        m(t) = 1 - (1 - \text{end})\,\min(t, \text{steps}) / \text{steps}

    ``torch.optim.lr_scheduler.LinearLR(start_factor=1, end_factor=end, total_iters=steps)``.

    Args:
      steps: decay length (>= 1 optimizer steps).
      end: final multiplier, in [0, 1] (0: training stops at step ``steps``).
    """

    steps: int
    end: float = 0.0
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _set(self, "steps", _check_steps("LinearDecay", "steps", self.steps, "tl.LinearDecay(300)"))
        _set(
            self, "end", _check_unit("LinearDecay", "end", self.end, "tl.LinearDecay(300, end=0.1)")
        )

    def multiplier(self, t: int) -> float:
        if t >= self.steps:
            return self.end
        return 1.0 - (1.0 - self.end) * t / self.steps

    length = property(lambda self: self.steps)
    final = property(lambda self: self.end)
    rest_step = property(lambda self: self.steps if self.end == 0 else None)

    def describe(self) -> str:
        return f"LinearDecay({self.steps}{f', end={self.end!r}' if self.end else ''})"


@dataclass(frozen=True)
class Cosine(Schedule):
    r"""Cosine decay from η to ``end``·η over ``steps`` steps, then constant at ``end``·η.

    .. math::
        m(t) = \text{end} + (1 - \text{end})\,\tfrac12\big(1 + \cos(\pi \min(t, \text{steps})
               / \text{steps})\big)

    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=steps, eta_min=end·η)`` for
    t <= steps (torch's climbs back up after ``steps``; this one stays at ``end``).
    Loshchilov & Hutter, 2017, "SGDR", https://arxiv.org/abs/1608.03983.

    Args:
      steps: decay length (>= 1 optimizer steps).
      end: final multiplier, in [0, 1] (0: training stops at step ``steps``).
    """

    steps: int
    end: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        _set(self, "steps", _check_steps("Cosine", "steps", self.steps, "tl.Cosine(300)"))
        _set(self, "end", _check_unit("Cosine", "end", self.end, "tl.Cosine(300, end=0.1)"))

    def multiplier(self, t: int) -> float:
        if t >= self.steps:
            return self.end
        return self.end + (1.0 - self.end) * 0.5 * (1.0 + math.cos(math.pi * t / self.steps))

    length = property(lambda self: self.steps)
    final = property(lambda self: self.end)
    rest_step = property(lambda self: self.steps if self.end == 0 else None)

    def describe(self) -> str:
        return f"Cosine({self.steps}{f', end={self.end!r}' if self.end else ''})"


@dataclass(frozen=True)
class StepDecay(Schedule):
    r"""Multiply the learning rate by ``gamma`` every ``every`` steps.

    .. math::
        m(t) = \gamma^{\lfloor t / \text{every} \rfloor}

    ``torch.optim.lr_scheduler.StepLR(step_size=every, gamma=gamma)``.

    Args:
      every: steps between two decays (>= 1).
      gamma: decay factor, in (0, 1].
    """

    every: int
    gamma: float = _DEFAULT_GAMMA
    name: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        _set(
            self,
            "every",
            _check_steps("StepDecay", "every", self.every, "tl.StepDecay(100, gamma=0.1)"),
        )
        _set(
            self,
            "gamma",
            _check_unit(
                "StepDecay", "gamma", self.gamma, "tl.StepDecay(100, gamma=0.1)", low_open=True
            ),
        )

    def multiplier(self, t: int) -> float:
        return self.gamma ** (t // self.every)

    final = property(lambda self: 1.0 if self.gamma == 1.0 else 0.0)

    def describe(self) -> str:
        return f"StepDecay({self.every}, gamma={self.gamma!r})"


@dataclass(frozen=True)
class Join(Schedule):
    """``first`` for steps t < ``at``, then ``second`` restarted at ``at``: ``second(t − at)``.

    Built by ``first.then(second)``; ``SequentialLR([first, second], milestones=[at])`` in
    torch. Joins nest: ``a.then(b).then(c)``.

    Args:
      first, second: schedules.
      at: the step where ``second`` starts (>= 1).
    """

    first: Schedule
    second: Schedule
    at: int
    name: ClassVar[str] = "join"

    def __post_init__(self) -> None:
        for part in ("first", "second"):
            if not isinstance(getattr(self, part), Schedule):
                raise TangentlabError(
                    f"Join: {part} must be a schedule such as tl.Cosine(300), got "
                    f"{getattr(self, part)!r}; e.g. tl.Warmup(30).then(tl.Cosine(270))."
                )
        object.__setattr__(
            self,
            "at",
            _check_steps("Join", "at", self.at, "tl.Warmup(30).then(tl.Cosine(270), at=30)"),
        )

    def multiplier(self, t: int) -> float:
        return self.first.multiplier(t) if t < self.at else self.second.multiplier(t - self.at)

    @property
    def length(self) -> int | None:
        rest = self.second.length
        return None if rest is None else self.at + rest

    @property
    def final(self) -> float:
        return self.second.final

    @property
    def rest_step(self) -> int | None:
        rest = self.second.rest_step
        return None if rest is None else self.at + rest

    def describe(self) -> str:
        tail = "" if self.at == self.first.length else f", at={self.at}"
        return f"{self.first.describe()}.then({self.second.describe()}{tail})"


_CLASSES: dict[str, type[Schedule]] = {
    c.name: c for c in (Constant, Warmup, LinearDecay, Cosine, StepDecay, Join)
}


def from_dict(d: Any) -> Schedule:
    """The schedule of a :meth:`Schedule.to_dict` mapping (``{"name": "cosine", ...}``)."""
    cls = _CLASSES.get(d.get("name")) if isinstance(d, dict) else None
    if cls is None:
        raise TangentlabError(
            f"schedules.from_dict: expected a mapping with 'name' one of {sorted(_CLASSES)}, "
            f"got {d!r}."
        )
    kw = {k: v for k, v in d.items() if k != "name"}
    if cls is Join:
        kw["first"], kw["second"] = from_dict(kw.get("first")), from_dict(kw.get("second"))
    try:
        return cls(**kw)
    except TypeError as exc:
        raise TangentlabError(
            f"schedules.from_dict: bad fields for {cls.__name__}: {exc}."
        ) from None


def as_schedule(value: Any, fn: str) -> Schedule:
    """``value`` if it is a schedule, ``Constant()`` for ``None``, else an error with the fix."""
    if value is None:
        return Constant()
    if isinstance(value, Schedule):
        return value
    if isinstance(value, dict):
        return from_dict(value)
    raise TangentlabError(
        f"{fn}: schedule must be a tangentlab schedule such as tl.Cosine(300) or "
        f"tl.Warmup(30).then(tl.Cosine(270)), got {type(value).__name__} {value!r}."
    )


def make_schedule(
    kind: str,
    steps: int,
    *,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
    step_every: int | None = None,
    step_gamma: float | None = None,
) -> Schedule:
    """A named schedule over a run of ``steps`` optimizer steps (what the CLI's ``--schedule``
    builds).

    Args:
      kind: ``"constant"``; ``"warmup"`` (warmup, then constant); ``"warmup-linear"`` /
        ``"warmup-cosine"`` (warmup, then linear / cosine decay to 0 at step ``steps``);
        ``"cosine"``, ``"linear"`` (decay to 0 over ``steps``); ``"step"``
        (``StepDecay(step_every, step_gamma)``).
      steps: the run's length T in optimizer steps.
      warmup_steps: warmup length w; or ``warmup_fraction``: w = round(fraction·T) (at
        least 1). Default for a warmup kind: fraction 0.1.
      step_every, step_gamma: of ``"step"`` (gamma default 0.1, as torch's StepLR).

    Returns:
      The :class:`Schedule`, e.g. ``Warmup(30).then(Cosine(270))`` for
      ``make_schedule("warmup-cosine", 300, warmup_steps=30)``.
    """
    fn = "make_schedule"
    if kind not in SCHEDULE_KINDS:
        raise TangentlabError(f"{fn}: kind must be one of {list(SCHEDULE_KINDS)}, got {kind!r}.")
    if not _is_int(steps) or steps < 0:
        raise TangentlabError(f"{fn}: steps must be an integer >= 0, got {steps!r}.")
    warm = kind.startswith("warmup")
    given = {"warmup_steps": warmup_steps, "warmup_fraction": warmup_fraction,
             "step_every": step_every, "step_gamma": step_gamma}  # fmt: skip
    relevant = {"warmup_steps", "warmup_fraction"} if warm else (
        {"step_every", "step_gamma"} if kind == "step" else set())  # fmt: skip
    stray = [k for k, v in given.items() if v is not None and k not in relevant]
    if stray:
        raise TangentlabError(
            f"{fn}: {', '.join(stray)} do not apply to kind={kind!r}; warmup_* go with the "
            "warmup kinds, step_* with 'step'."
        )
    if kind == "constant":
        return Constant()
    if kind == "step":
        if step_every is None:
            raise TangentlabError(
                f"{fn}: kind='step' needs step_every (steps between decays), e.g. "
                "make_schedule('step', 300, step_every=100, step_gamma=0.1)."
            )
        return StepDecay(step_every, _DEFAULT_GAMMA if step_gamma is None else step_gamma)
    if steps < 1:
        raise TangentlabError(f"{fn}: kind={kind!r} spans the run, which needs steps >= 1.")
    if kind == "cosine":
        return Cosine(steps)
    if kind == "linear":
        return LinearDecay(steps)
    w = _warmup_length(fn, steps, warmup_steps, warmup_fraction)
    if kind == "warmup":
        return Warmup(w)
    if w >= steps:
        raise TangentlabError(
            f"{fn}: the warmup ({w} steps) must be shorter than the run ({steps} steps) to "
            f"leave room for the decay of kind={kind!r}; lower warmup_steps/warmup_fraction."
        )
    decay = LinearDecay(steps - w) if kind == "warmup-linear" else Cosine(steps - w)
    return Warmup(w).then(decay)


def _warmup_length(fn: str, steps: int, warmup_steps: Any, warmup_fraction: Any) -> int:
    if warmup_steps is not None and warmup_fraction is not None:
        raise TangentlabError(f"{fn}: give warmup_steps or warmup_fraction, not both.")
    if warmup_steps is not None:
        return _check_steps(fn, "warmup_steps", warmup_steps, "warmup_steps=30")
    frac = _DEFAULT_WARMUP_FRACTION if warmup_fraction is None else warmup_fraction
    if not _is_real(frac) or not 0.0 < float(frac) < 1.0:
        raise TangentlabError(
            f"{fn}: warmup_fraction must lie in (0, 1) (a fraction of the run's steps), got "
            f"{warmup_fraction!r}; e.g. warmup_fraction=0.1."
        )
    return max(1, round(float(frac) * steps))


Schedule.from_dict = staticmethod(from_dict)  # type: ignore[attr-defined]

"""How training is described: small frozen optimizer and loss objects (DESIGN.md §2, §6).

The same objects drive the forecast (:func:`tangentlab.forecast`, :func:`tangentlab.sweep`)
and the real run (:func:`tangentlab.finetune`, which builds its torch optimizer and loss
from them), so the two cannot disagree. They are validated on construction, as optax's
transformations are built once and then only used::

    >>> opt = tl.SGD(0.01, momentum=0.9)          # torch.optim.SGD(lr, momentum, ...)
    >>> loss = tl.MSE()                           # ½‖f − s·onehot(y)‖², mean over samples
    >>> fc = tl.forecast(kernel, opt, 300, loss=loss, batch_size=32)
    >>> run = tl.finetune(model, (X, y), opt, 300, loss=loss, batch_size=32)
    >>> tl.SGD.grid(lr=[1e-3, 1e-2], momentum=[0.0, 0.9])   # 4 optimizers, for sweep
    >>> tl.SGD(0.1, schedule=tl.Warmup(30).then(tl.Cosine(270)))  # step t uses 0.1·m(t)

Conventions (DESIGN.md §2): losses are averaged over the batch (PyTorch's reductions);
SGD is exactly ``torch.optim.SGD(lr=η, momentum=m, weight_decay=λ, dampening=0)``; AdamW
is exactly ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` (decoupled decay, no AMSGrad)::

    >>> tl.AdamW(1e-4, weight_decay=0.01, schedule=tl.make_schedule("warmup-linear", 300))
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tangentlab.errors import TangentlabError
from tangentlab.schedules import Constant, Schedule, as_schedule

_DECAYS = ("zero", "w0")


def is_real(x: Any) -> bool:
    """A finite real number (bools excluded)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def is_int(x: Any) -> bool:
    """An integer (bools excluded)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SGD:
    r"""Stochastic gradient descent exactly as ``torch.optim.SGD`` (dampening 0, no Nesterov).

    .. math::
        g_t = \nabla \ell_{b_t}(w_t) + \lambda (w_t - a),\quad
        \mathrm{buf}_t = m\,\mathrm{buf}_{t-1} + g_t,\quad
        w_{t+1} = w_t - \eta\, \mathrm{buf}_t

    with the decay anchor a = 0 (torch's coupled L2, ``decay_to="zero"``) or a = w0 (decay
    toward the pre-trained weights, ``decay_to="w0"``). The effective learning rate at
    stationarity is η̃ = η/(1 − m). With a ``schedule``, step t uses η_t = η·m(t) in place
    of η (decay and momentum buffer as above: torch's ``LambdaLR``), so η is the peak rate.

    Args:
      lr: learning rate η > 0 (the peak rate under a schedule).
      momentum: heavy-ball coefficient m in [0, 1).
      weight_decay: λ >= 0 (coupled L2, as torch SGD's ``weight_decay``).
      decay_to: ``"zero"`` (torch semantics; a forecast needs ``kernel.jw0``) or ``"w0"``.
      schedule: the learning-rate schedule m(t) (:mod:`tangentlab.schedules`), e.g.
        ``tl.Warmup(30).then(tl.Cosine(270))``; default ``tl.Constant()``.

    Raises:
      TangentlabError: a setting outside its range, naming it and the fix.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    decay_to: str = "zero"
    schedule: Schedule = Constant()
    name: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        if not is_real(self.lr) or self.lr <= 0:
            raise TangentlabError(
                f"SGD: lr must be a finite number > 0, got {self.lr!r}; e.g. tl.SGD(0.01)."
            )
        if not is_real(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise TangentlabError(
                f"SGD: momentum must lie in [0, 1), got {self.momentum!r}; torch SGD's "
                "heavy-ball coefficient, e.g. momentum=0.9 (1 never converges)."
            )
        if not is_real(self.weight_decay) or self.weight_decay < 0:
            raise TangentlabError(
                f"SGD: weight_decay must be a finite number >= 0, got {self.weight_decay!r}."
            )
        if self.decay_to not in _DECAYS:
            raise TangentlabError(
                f"SGD: decay_to must be one of {list(_DECAYS)}, got {self.decay_to!r}."
            )
        for f in ("lr", "momentum", "weight_decay"):  # normalize numpy scalars, ints
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "schedule", as_schedule(self.schedule, "SGD"))

    @property
    def effective_lr(self) -> float:
        """η̃ = η / (1 − m), the rate of plain gradient descent with the same stationary step."""
        return self.lr / (1.0 - self.momentum)

    def replace(self, **changes: Any) -> SGD:
        """A copy with some fields changed (validated again), e.g. ``opt.replace(lr=0.1)``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def grid(cls, **values: Iterable[Any]) -> list[SGD]:
        """Every combination of the given field values, e.g. ``SGD.grid(lr=[0.1, 1],
        momentum=[0, 0.9])`` -> 4 optimizers (lr varies slowest); schedules too:
        ``schedule=[tl.Constant(), tl.Cosine(300)]``."""
        return _grid(cls, values, "SGD.grid(lr=[0.01, 0.1], momentum=[0, 0.9])")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"name": "sgd", "lr": ..., "momentum": ..., ..., "schedule": {...}}``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": self.name, **out, "schedule": self.schedule.to_dict()}

    def hyperparameters(self) -> dict[str, Any]:
        """The settings as forecast and run record them."""
        return {"optimizer": self.name, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "decay_to": self.decay_to,
                "schedule": self.schedule.describe()}  # fmt: skip

    def describe(self) -> str:
        """Short label, e.g. ``"SGD(lr=0.01, momentum=0.9)"`` (defaults left out)."""
        parts = [f"lr={self.lr:.4g}"]
        if self.momentum:
            parts.append(f"momentum={self.momentum:g}")
        if self.weight_decay:
            parts.append(f"weight_decay={self.weight_decay:g}")
            if self.decay_to != "zero":
                parts.append(f"decay_to={self.decay_to!r}")
        if not self.schedule.is_constant:
            parts.append(f"schedule={self.schedule.describe()}")
        return f"SGD({', '.join(parts)})"

    def lr_multipliers(self, steps: int) -> np.ndarray | None:
        """m(0..steps−1) of the schedule ``[steps]``, or ``None`` for a constant rate (the
        solvers then keep their constant-rate closed forms)."""
        return None if self.schedule.is_constant else self.schedule.multipliers(steps)

    def peak_lr(self, steps: int) -> float:
        """The largest learning rate of a run of ``steps`` steps: η · max_t m(t)."""
        return self.lr if self.schedule.is_constant else self.lr * self.schedule.peak(steps)

    def torch_scheduler(self, optimizer: torch.optim.Optimizer):
        """``LambdaLR(optimizer, schedule.multiplier)`` (step it after every optimizer step),
        or ``None`` for a constant rate. Used by finetune: the forecast reads the same m(t)."""
        if self.schedule.is_constant:
            return None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.multiplier)

    def torch_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer that performs these steps on ``params`` (used by finetune)."""
        if self.decay_to == "w0" and self.weight_decay > 0:
            return _SGDToW0(params, lr=self.lr, momentum=self.momentum,
                            weight_decay=self.weight_decay)  # fmt: skip
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay, dampening=0.0, nesterov=False)


class _SGDToW0(torch.optim.SGD):
    """torch SGD whose coupled L2 pulls toward the initial weights w0: g += λ (w − w0)."""

    def __init__(self, params, *, lr: float, momentum: float, weight_decay: float) -> None:
        params = list(params)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0, dampening=0.0)
        self._decay = weight_decay
        self._w0 = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for p, p0 in zip(self.param_groups[0]["params"], self._w0):
            if p.grad is not None:
                p.grad.add_(p - p0, alpha=self._decay)
        return super().step(closure)


@dataclass(frozen=True)
class AdamW:
    r"""Adam with decoupled weight decay, exactly ``torch.optim.AdamW`` (no AMSGrad).

    With g_t the gradient of the batch loss at w_t and k = t + 1 the step count:

    .. math::
        w \leftarrow w (1 - \eta_t \lambda),\quad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,

        w_{t+1} = w - \frac{\eta_t}{1 - \beta_1^k}\,
                  \frac{m_t}{\sqrt{v_t / (1 - \beta_2^k)} + \epsilon}

    (elementwise; m_{-1} = v_{-1} = 0). The decay is decoupled from the gradient and pulls
    the actual weights toward 0 (torch's AdamW; there is no ``decay_to``). With a
    ``schedule``, step t uses η_t = η·m(t) in both the decay and the step (torch's
    ``LambdaLR``), so η is the peak rate. Loshchilov & Hutter, 2019, "Decoupled weight decay
    regularization", https://arxiv.org/abs/1711.05101.

    The tangent model under Adam is not a fixed-kernel flow (the preconditioner follows the
    gradients): forecast it with :func:`tangentlab.compute_weight_space_tangent` (exact
    Adam of the tangent model in weight space, NOTE [adam on the tangent model] in
    :mod:`tangentlab.adam`), not with a :class:`~tangentlab.Kernel`.

    Args:
      lr: learning rate η > 0 (the peak rate under a schedule).
      betas: (β1, β2), each in [0, 1): decay rates of the first and second moments.
      eps: ε >= 0 added to the bias-corrected root of the second moment.
      weight_decay: λ >= 0, decoupled (torch AdamW's ``weight_decay``; default 0.01 as torch).
      schedule: the learning-rate schedule m(t) (:mod:`tangentlab.schedules`), e.g.
        ``tl.Warmup(30).then(tl.LinearDecay(270))``; default ``tl.Constant()``.

    Raises:
      TangentlabError: a setting outside its range, naming it and the fix.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    schedule: Schedule = Constant()
    name: ClassVar[str] = "adamw"

    def __post_init__(self) -> None:
        if not is_real(self.lr) or self.lr <= 0:
            raise TangentlabError(
                f"AdamW: lr must be a finite number > 0, got {self.lr!r}; e.g. tl.AdamW(1e-4)."
            )
        try:
            b1, b2 = self.betas
            ok = is_real(b1) and is_real(b2) and 0 <= b1 < 1 and 0 <= b2 < 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TangentlabError(
                f"AdamW: betas must be two numbers in [0, 1), got {self.betas!r}; e.g. "
                "betas=(0.9, 0.999) (torch's default)."
            )
        if not is_real(self.eps) or self.eps < 0:
            raise TangentlabError(
                f"AdamW: eps must be a finite number >= 0, got {self.eps!r}; e.g. eps=1e-8."
            )
        if not is_real(self.weight_decay) or self.weight_decay < 0:
            raise TangentlabError(
                f"AdamW: weight_decay must be a finite number >= 0, got {self.weight_decay!r}; "
                "e.g. weight_decay=0.01 (decoupled, torch AdamW's default)."
            )
        for f in ("lr", "eps", "weight_decay"):  # normalize numpy scalars, ints
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "betas", (float(b1), float(b2)))
        object.__setattr__(self, "schedule", as_schedule(self.schedule, "AdamW"))

    def replace(self, **changes: Any) -> AdamW:
        """A copy with some fields changed (validated again), e.g. ``opt.replace(lr=1e-5)``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def grid(cls, **values: Iterable[Any]) -> list[AdamW]:
        """Every combination of the given field values, e.g. ``AdamW.grid(lr=[1e-5, 1e-4],
        weight_decay=[0, 0.01])`` -> 4 optimizers (lr varies slowest); also ``betas=[(0.9,
        0.999), (0.9, 0.98)]`` and ``schedule=[...]``."""
        return _grid(cls, values, "AdamW.grid(lr=[1e-5, 1e-4], weight_decay=[0, 0.01])")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"name": "adamw", "lr": ..., "betas": [b1, b2], "eps": ...,
        "weight_decay": ..., "schedule": {...}}``."""
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "schedule": self.schedule.to_dict()}  # fmt: skip

    def hyperparameters(self) -> dict[str, Any]:
        """The settings as forecast and run record them (``betas`` as a list)."""
        return {"optimizer": self.name, "lr": self.lr, "betas": list(self.betas),
                "eps": self.eps, "weight_decay": self.weight_decay,
                "schedule": self.schedule.describe()}  # fmt: skip

    def describe(self) -> str:
        """Short label, e.g. ``"AdamW(lr=0.0001, weight_decay=0.01)"`` (the decay is always
        shown, betas and eps when not torch's defaults)."""
        parts = [f"lr={self.lr:.4g}"]
        if self.betas != (0.9, 0.999):
            parts.append(f"betas=({self.betas[0]:g}, {self.betas[1]:g})")
        if self.eps != 1e-8:
            parts.append(f"eps={self.eps:g}")
        parts.append(f"weight_decay={self.weight_decay:g}")
        if not self.schedule.is_constant:
            parts.append(f"schedule={self.schedule.describe()}")
        return f"AdamW({', '.join(parts)})"

    def lr_multipliers(self, steps: int) -> np.ndarray | None:
        """m(0..steps−1) of the schedule ``[steps]``, or ``None`` for a constant rate."""
        return None if self.schedule.is_constant else self.schedule.multipliers(steps)

    def peak_lr(self, steps: int) -> float:
        """The largest learning rate of a run of ``steps`` steps: η · max_t m(t)."""
        return self.lr if self.schedule.is_constant else self.lr * self.schedule.peak(steps)

    def torch_scheduler(self, optimizer: torch.optim.Optimizer):
        """``LambdaLR(optimizer, schedule.multiplier)`` (step it after every optimizer step),
        or ``None`` for a constant rate."""
        if self.schedule.is_constant:
            return None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.multiplier)

    def torch_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """``torch.optim.AdamW(params, lr, betas, eps, weight_decay, amsgrad=False)``."""
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, amsgrad=False)  # fmt: skip


def _grid(cls, values: dict[str, Iterable[Any]], example: str) -> list:
    """Every combination of ``values`` (lists of field values) as ``cls`` objects."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown or "lr" not in values:
        raise TangentlabError(
            f"{cls.__name__}.grid: give lists for lr and optionally {sorted(fields - {'lr'})}, "
            f"got keys {sorted(values)}; e.g. {example}."
        )
    keys = list(values)
    lists = [list(values[k]) for k in keys]
    if any(not v for v in lists):
        raise TangentlabError(f"{cls.__name__}.grid: every list must hold at least one value.")
    return [cls(**dict(zip(keys, combo))) for combo in itertools.product(*lists)]


Optimizer = SGD | AdamW  # the slot every entry point takes (with its schedule)


def as_optimizer(value: Any, fn: str, *, adamw: bool = False) -> Optimizer:
    """``value`` if it is an optimizer object, else a TangentlabError saying how to build one.

    ``adamw=False`` (entry points whose mathematics is SGD's: influence, information,
    stable_lr, ...) refuses a ``tl.AdamW`` with a message saying so.
    """
    if isinstance(value, SGD):
        return value
    if isinstance(value, AdamW):
        if adamw:
            return value
        raise TangentlabError(
            f"{fn}: only tl.SGD is supported here (its closed forms are those of SGD), got "
            f"{value.describe()}. Use tl.SGD(lr, momentum=...), or forecast AdamW with "
            "tl.forecast(tl.compute_weight_space_tangent(model, data), tl.AdamW(...), steps)."
        )
    hint = f"tl.SGD({value!r})" if is_real(value) else "tl.SGD(0.01, momentum=0.9)"
    raise TangentlabError(
        f"{fn}: optimizer must be a tangentlab optimizer such as tl.SGD(lr, momentum=..., "
        f"weight_decay=...){' or tl.AdamW(lr, ...)' if adamw else ''}, got "
        f"{type(value).__name__} {value!r}; e.g. {hint}."
    )


# ---------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MSE:
    r"""Mean squared error, summed over outputs and averaged over samples (DESIGN.md §2).

    .. math::
        \ell(f, y) = \tfrac12 \lVert f - s\, e_y \rVert^2

    Args:
      target_scale: s > 0, the scale of the one-hot targets.
    """

    target_scale: float = 1.0
    name: ClassVar[str] = "mse"

    def __post_init__(self) -> None:
        if not is_real(self.target_scale) or self.target_scale <= 0:
            raise TangentlabError(
                f"MSE: target_scale must be a finite number > 0, got {self.target_scale!r}."
            )
        object.__setattr__(self, "target_scale", float(self.target_scale))

    def per_sample(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ of every sample, ``[B, C], [B] -> [B]``."""
        target = F.one_hot(y, f.shape[1]).to(f.dtype) * self.target_scale
        return 0.5 * ((f - target) ** 2).sum(1)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target_scale": self.target_scale}

    def describe(self) -> str:
        return "MSE()" if self.target_scale == 1.0 else f"MSE(target_scale={self.target_scale:g})"


@dataclass(frozen=True)
class CrossEntropy:
    r"""Cross-entropy of the softmax, averaged over samples (DESIGN.md §2).

    .. math::
        \ell(f, y) = -\log \operatorname{softmax}(f)_y
    """

    name: ClassVar[str] = "ce"
    target_scale: ClassVar[float] = 1.0

    def per_sample(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ of every sample, ``[B, C], [B] -> [B]``."""
        return F.cross_entropy(f, y, reduction="none")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def describe(self) -> str:
        return "CrossEntropy()"


Loss = MSE | CrossEntropy


def as_loss(value: Any, fn: str) -> Loss:
    """A loss object from ``value``: an ``MSE``/``CrossEntropy`` object, or ``"mse"``/``"ce"``."""
    if isinstance(value, MSE | CrossEntropy):
        return value
    if value == "mse":
        return MSE()
    if value in ("ce", "cross_entropy", "cross-entropy"):
        return CrossEntropy()
    raise TangentlabError(
        f"{fn}: loss must be tl.MSE(target_scale=1.0) or tl.CrossEntropy() (or 'mse' / "
        f"'ce'), got {value!r}."
    )


def check_steps(fn: str, steps: Any) -> int:
    """``steps`` must be an integer >= 0 (optimizer steps)."""
    if not is_int(steps) or steps < 0:
        raise TangentlabError(f"{fn}: steps must be an integer >= 0, got {steps!r}; e.g. 1000.")
    return int(steps)


def check_batch_size(fn: str, batch_size: Any) -> int | None:
    """``batch_size`` must be a positive integer or ``None`` (full batch)."""
    if batch_size is not None and (not is_int(batch_size) or batch_size <= 0):
        raise TangentlabError(
            f"{fn}: batch_size must be a positive integer or None (full batch), got "
            f"{batch_size!r}."
        )
    return None if batch_size is None else int(batch_size)


def check_seed(fn: str, seed: Any) -> int:
    if not is_int(seed):
        raise TangentlabError(f"{fn}: seed must be an integer, got {seed!r}.")
    return int(seed)


def check_choice(fn: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise TangentlabError(f"{fn}: {name} must be one of {list(allowed)}, got {value!r}.")


def check_fraction_pair(
    fn: str, name: str, value: Any, example: str, *, what: str = "fractions"
) -> None:
    """``value`` must be two numbers ``0 <= lo < hi <= 1`` (quantiles, fractions)."""
    try:
        lo, hi = float(value[0]), float(value[1])
        ok = len(value) == 2 and 0.0 <= lo < hi <= 1.0
    except (TypeError, ValueError, IndexError, KeyError):
        ok = False
    if not ok:
        raise TangentlabError(
            f"{fn}: {name} must be two {what} 0 <= low < high <= 1, got {value!r}; "
            f"e.g. {name}={example}."
        )

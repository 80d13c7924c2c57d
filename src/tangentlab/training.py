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

Conventions (DESIGN.md §2): losses are averaged over the batch (PyTorch's reductions);
SGD is exactly ``torch.optim.SGD(lr=η, momentum=m, weight_decay=λ, dampening=0)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tangentlab.errors import TangentlabError

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
    stationarity is η̃ = η/(1 − m).

    Args:
      lr: learning rate η > 0.
      momentum: heavy-ball coefficient m in [0, 1).
      weight_decay: λ >= 0 (coupled L2, as torch SGD's ``weight_decay``).
      decay_to: ``"zero"`` (torch semantics; a forecast needs ``kernel.jw0``) or ``"w0"``.

    Raises:
      TangentlabError: a setting outside its range, naming it and the fix.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    decay_to: str = "zero"
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
        momentum=[0, 0.9])`` -> 4 optimizers (lr varies slowest)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown or "lr" not in values:
            raise TangentlabError(
                f"SGD.grid: give lists for lr and optionally {sorted(fields - {'lr'})}, got "
                f"keys {sorted(values)}; e.g. SGD.grid(lr=[0.01, 0.1], momentum=[0, 0.9])."
            )
        keys = list(values)
        lists = [list(values[k]) for k in keys]
        if any(not v for v in lists):
            raise TangentlabError("SGD.grid: every list must hold at least one value.")
        return [cls(**dict(zip(keys, combo))) for combo in itertools.product(*lists)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"name": "sgd", "lr": ..., "momentum": ..., ...}``."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """Short label, e.g. ``"SGD(lr=0.01, momentum=0.9)"`` (defaults left out)."""
        parts = [f"lr={self.lr:.4g}"]
        if self.momentum:
            parts.append(f"momentum={self.momentum:g}")
        if self.weight_decay:
            parts.append(f"weight_decay={self.weight_decay:g}")
            if self.decay_to != "zero":
                parts.append(f"decay_to={self.decay_to!r}")
        return f"SGD({', '.join(parts)})"

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


Optimizer = SGD  # the slot every entry point takes; AdamW and schedules will share it


def as_optimizer(value: Any, fn: str) -> Optimizer:
    """``value`` if it is an optimizer object, else a TangentlabError saying how to build one."""
    if isinstance(value, SGD):
        return value
    hint = f"tl.SGD({value!r})" if is_real(value) else "tl.SGD(0.01, momentum=0.9)"
    raise TangentlabError(
        f"{fn}: optimizer must be a tangentlab optimizer such as tl.SGD(lr, momentum=..., "
        f"weight_decay=...), got {type(value).__name__} {value!r}; e.g. {hint}."
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

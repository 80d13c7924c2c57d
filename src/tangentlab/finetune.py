"""Real fine-tuning runs, to validate forecasts against: :func:`finetune` -> :class:`TrainingRun`.

:func:`finetune` trains a copy of the model with ``torch.optim.SGD`` (or ``AdamW``) under the
conventions of :func:`tangentlab.forecast` (DESIGN.md §2): the same losses and reductions,
time in optimizer steps, the same trainable weights (``params``), batch norm frozen, and
the same minibatch order. It records the full-training-set loss and accuracy, computed
like the forecast's: eval mode, ``torch.no_grad``, the whole training set (in chunks).

NOTE [same batches as the forecast]
The batches of a run are ``dynamics.batch_schedule(N, B, steps, sampling=sampling,
rng=dynamics.path_rngs(seed, 1)[0])``: the sample ids of path 0 of
``forecast(kernel, ..., seed=seed)`` (any number of paths; see ``path_rngs``). ``"epoch"``
sampling reshuffles every epoch and keeps the smaller last batch when B does not divide N,
as ``DataLoader(shuffle=True, drop_last=False)``; only the random stream differs from
torch's (numpy's generator instead of torch's), not the distribution. So on a model that
is exactly linear in its trainable weights the run and path 0 of the forecast are the same
sequence of SGD steps, and agree to round-off. The schedule is drawn in full up front
(``steps * B`` ids), like the forecast's.

NOTE [interruption]
Ctrl-C (``KeyboardInterrupt``) during a run does not lose it: :func:`finetune` stops,
warns, and returns the :class:`TrainingRun` logged so far with ``interrupted=True``
(``steps`` ends at the last logged step; ``steps_done`` counts the optimizer steps that
completed; ``model`` holds the weights at the interruption, possibly mid-update when the
interrupt hit inside ``optimizer.step()``). Callers that must stop should check
``run.interrupted``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentlab import dynamics as dyn
from tangentlab.data import (
    Inputs,
    as_arrays,
    check_labels,
    num_rows,
    take,
    to_device,
    trunk_outputs,
)
from tangentlab.errors import TangentlabError, TangentlabWarning
from tangentlab.forecast import BLOWUP_FACTOR, _target_curve, best_step_of, eval_summary
from tangentlab.tangent import ParamSpec, Tangent, _logits, check_output, select_params
from tangentlab.training import (
    Loss,
    Optimizer,
    as_loss,
    as_optimizer,
    check_batch_size,
    check_choice,
    check_seed,
    check_steps,
    is_int,
    is_real,
)

_SAMPLINGS = ("epoch", "replacement")
_BN_MODES = ("frozen", "train")
_EVAL_CHUNK = 256  # samples per forward pass of the loss evaluation (and of a frozen-BN step)
_MOVE_DATA_BYTES = 1024**3  # data up to this size is moved to the model's device once
_AUTO_LOG_POINTS = 200  # log_every=None: about this many evaluations of the full loss

_BN_NOTES = {
    "frozen": "eval mode during training, as the tangent model: batch-norm running "
    "statistics fixed, dropout off",
    "train": "train mode for the optimizer steps (batch norm normalizes with batch "
    "statistics and updates its running statistics; dropout on); eval mode for the logged "
    "loss; differs from the tangent model's convention",
}


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """A real fine-tuning run: full-training-set loss and accuracy at the logged steps.

    Attributes:
      steps: the logged optimizer steps, ``[K]`` int, increasing; always 0 and the last
        step (unless the run diverged or was interrupted first).
      loss: full-training-set loss at ``steps``, ``[K]``, as the forecast defines it (MSE
        ½‖f - s·onehot(y)‖² summed over outputs, or CE; mean over samples), computed in
        eval mode without gradients; NaN from ``divergence_step`` on.
      accuracy: training accuracy of argmax f at ``steps``, ``[K]``.
      train_seconds: time spent in optimizer steps (forward, backward, update).
      eval_seconds: time spent evaluating the full-training-set loss and accuracy.
      wall_seconds: the whole call (setup, training and evaluation).
      hyperparameters: the settings (lr, steps, batch_size, momentum, weight_decay, loss,
        target_scale, seed, num_samples, num_classes, sampling, bn, log_every, ...).
      diverged: the loss became non-finite or exceeded 10^4 x L_0 (the forecast's blow-up
        rule, NOTE [divergence policy] in :mod:`tangentlab.forecast`); training stopped.
      divergence_step: the step where that was seen (its logged loss is NaN), or ``None``.
      interrupted: stopped by ``KeyboardInterrupt`` (NOTE [interruption]).
      stopped: stopped early by ``finetune(stop_below=...)``: the training loss reached it.
      steps_done: optimizer steps completed.
      model: the fine-tuned copy of the model (the caller's model is never changed).
      optimizer: the optimizer object of the run (``tl.SGD(...)`` or ``tl.AdamW(...)``).
      loss_function: the loss object (``tl.MSE(...)`` or ``tl.CrossEntropy()``).
      checkpoints: ``{step: {name: weights}}``, the trained weights w_t (before the update of
        step t; t = T: the final weights, on CPU) at the steps asked by ``finetune(...,
        checkpoints=[...])``; empty by default (used by :func:`tangentlab.tracin_checkpoints`).
      eval_loss, eval_accuracy: loss and accuracy on the held-out set of ``finetune(...,
        eval_data=(X_eval, y_eval))`` at ``steps`` ``[K]`` (eval mode, no gradients; NaN where
        ``loss`` is), or ``None`` without one.
    """

    steps: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
    divergence_step: int | None = None
    interrupted: bool = False
    stopped: bool = False
    steps_done: int = 0
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: Optimizer | None = None
    loss_function: Loss | None = None
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    eval_loss: np.ndarray | None = None
    eval_accuracy: np.ndarray | None = None

    @property
    def best_step(self) -> int | None:
        """The logged step of the minimum held-out loss, or ``None`` without held-out curves."""
        return best_step_of(self.eval_loss, self.steps)

    def steps_to(self, target_loss: float, on: str = "train_loss") -> int | None:
        """First logged step with L_t <= ``target_loss`` (exact when ``log_every=1``), or None.

        ``on``: ``"train_loss"``, ``"eval_loss"`` or ``"eval_accuracy"`` (>= target), as
        :meth:`tangentlab.Forecast.steps_to`.
        """
        curve, below = _target_curve("TrainingRun", self, on)
        if not is_real(target_loss):
            raise TangentlabError(
                f"TrainingRun.steps_to: target_loss must be a finite number, got {target_loss!r}."
            )
        hit = np.flatnonzero(curve <= target_loss if below else curve >= target_loss)
        return int(self.steps[hit[0]]) if hit.size else None  # NaN compares False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: curves (NaN -> None), timings, status and settings (no model)."""
        ok = np.flatnonzero(np.isfinite(self.loss))
        return {
            "steps": [int(s) for s in self.steps],
            "loss": _json_list(self.loss),
            "accuracy": _json_list(self.accuracy),
            "initial_loss": _json_float(self.loss[0]) if self.loss.size else None,
            "final_loss": _json_float(self.loss[ok[-1]]) if ok.size else None,
            "final_accuracy": _json_float(self.accuracy[ok[-1]]) if ok.size else None,
            "train_seconds": round(self.train_seconds, 4),
            "eval_seconds": round(self.eval_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 4),
            "diverged": bool(self.diverged),
            "divergence_step": self.divergence_step,
            "interrupted": bool(self.interrupted),
            "stopped": bool(self.stopped),
            "steps_done": int(self.steps_done),
            "optimizer": None if self.optimizer is None else self.optimizer.to_dict(),
            "loss_function": None if self.loss_function is None else self.loss_function.to_dict(),
            "hyperparameters": dict(self.hyperparameters),
            "eval": eval_summary(self.eval_loss, self.eval_accuracy, steps=self.steps),
        }


def finetune(
    model: nn.Module,
    data: Any,
    optimizer: Optimizer,
    steps: int,
    *,
    loss: Loss | str = "mse",
    batch_size: int | None = None,
    params: ParamSpec = None,
    seed: int = 0,
    log_every: int | None = None,
    bn: str = "frozen",
    sampling: str = "epoch",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoints: Sequence[int] | None = None,
    eval_data: Any = None,
    stop_below: float | None = None,
    trunk: nn.Module | None = None,
) -> TrainingRun:
    r"""Fine-tune a copy of ``model`` and record the full training loss over steps.

    Each step is one update of the selected weights by the torch optimizer ``optimizer``
    builds (``tl.SGD``: exactly ``torch.optim.SGD(lr, momentum, weight_decay,
    dampening=0)``; ``tl.AdamW``: exactly ``torch.optim.AdamW(lr, betas, eps,
    weight_decay)``; its schedule through ``torch.optim.lr_scheduler.LambdaLR(opt,
    schedule.multiplier)``, stepped after every optimizer step, so step t uses lr·m(t), the
    rate the forecast uses: NOTE [schedules] in :mod:`tangentlab.forecast`) on the mean loss
    of its batch, ℓ_b(w) = (1/|b|) Σ_{i∈b} ℓ(f_w(x_i), y_i);
    the logged loss L_t = (1/N) Σ_i ℓ(f_{w_t}(x_i), y_i) is over the whole training set
    (eval mode, no gradients): the quantity :func:`tangentlab.forecast` predicts (Zancato et
    al., 2020, https://arxiv.org/abs/2008.12478).

    Args:
      model: ``nn.Module`` mapping ``[B, ...]`` (or keyword tensors ``[B, L]``) to logits
        ``[B, C]`` (or an output with ``.logits``). Deep-copied: the caller's model, its mode
        and ``requires_grad`` flags never change (memory: one more copy).
      data: ``(X, y)`` tensors/arrays, a ``Dataset`` or a ``DataLoader``, as for the kernel.
      optimizer: as given to :func:`tangentlab.forecast`, e.g. ``tl.SGD(0.01, momentum=0.9)``
        or ``tl.AdamW(1e-4, weight_decay=0.01)`` (weight decay acts on the trained weights
        only).
      steps: number of optimizer steps T (>= 0).
      loss: ``tl.MSE(target_scale=s)`` (also ``"mse"``) or ``tl.CrossEntropy()`` (``"ce"``).
      batch_size: B; ``None`` or >= N means full batch.
      params: the trained weights (:func:`tangentlab.tangent.select_params`), as for the
        kernel; the others stay fixed.
      seed: seed of the batch order (NOTE [same batches as the forecast]) and torch's RNG.
      log_every: evaluate L_t every this many steps (plus 0 and T; ``None``: ceil(T/200));
        steps-to-target is located to this resolution (1: exact).
      bn: ``"frozen"`` (eval mode while training, as the tangent model) or ``"train"``
        (batch statistics, running statistics updated, dropout on).
      sampling: ``"epoch"`` (reshuffle each epoch) or ``"replacement"``, as in the forecast.
      chunk_size: most samples per forward pass (default 256; a frozen-BN batch is split).
      device, progress: where to train (default: the model's); a progress bar (stderr).
      checkpoints: steps t in [0, T] whose trained weights w_t are kept in
        ``TrainingRun.checkpoints`` (for TracInCP); memory: one copy of the trained weights
        per step.
      eval_data: a held-out set ``(X_eval, y_eval)`` (or a Dataset/DataLoader, as ``data``):
        its loss and accuracy are logged at the same steps (eval mode, no gradients, the same
        reduction) in ``TrainingRun.eval_loss`` / ``eval_accuracy``; the time is counted in
        ``eval_seconds``.
      stop_below: stop at the first logged step whose training loss is <= this value
        (``TrainingRun.stopped``; with full batch and frozen BN that step's loss comes from
        the forward pass of the next update, so one more evaluation logs the weights the run
        ends with: the last logged step is ``steps_done``); ``None``: run all ``steps``.
      trunk: frozen layers below ``model`` (the network is ``model(trunk(x))``), holding none
        of its trained weights: run once on the inputs (and on ``eval_data``'s), in eval mode
        without gradients, and ``model`` trains on their outputs h = trunk(x), a tensor
        ``[N, ...]`` or a Mapping of them (``model``'s keyword inputs). Fine-tuning never
        moves them, so with ``bn="frozen"`` this is the run of ``model(trunk(x))``, the same
        logged losses up to float rounding (which a chaotic run, past its edge of stability,
        amplifies as it would any rounding), at a fraction of the cost (NOTE [frozen trunk]:
        0.07-0.24 of the network's run for EfficientNet-Lite0's last block at 32-64 px,
        benchmarks/RESULTS.md "cached-trunk"). :func:`tangentlab.examples.split_trunk` cuts
        one off a known body and :func:`tangentlab.examples.compose` joins the rest to the
        top under the model's weight names. The seconds it took are in
        ``hyperparameters["trunk_seconds"]`` (not in ``train_seconds``).

    Returns a :class:`TrainingRun` (``model``: the fine-tuned copy). Raises TangentlabError
    on invalid settings, data or model (:meth:`tangentlab.Tangent.preflight`).

    Example::

        >>> opt = tl.SGD(0.1, momentum=0.9)
        >>> run = tl.finetune(model, (X, y), opt, 100, batch_size=32, log_every=1)
        >>> run.steps.shape, run.loss.shape                       # [101], [101]
        >>> tl.compare(tl.forecast(kernel, opt, 100, batch_size=32), run).steps_to_target_error
        >>> body, top, _ = split_model(model)         # EfficientNet-Lite0, on trunk outputs:
        >>> trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
        >>> tl.finetune(compose(rest, top), (X, y), opt, 100, params=LITE0_DEFAULT_PARAMS,
        ...             trunk=trunk)                   # the same run, 0.07-0.24 of the cost
    """
    t_call = time.perf_counter()
    fn = "finetune"
    if not isinstance(model, nn.Module):
        raise TangentlabError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}.")
    optimizer, loss = as_optimizer(optimizer, fn, adamw=True), as_loss(loss, fn)
    steps, batch_size = check_steps(fn, steps), check_batch_size(fn, batch_size)
    seed = check_seed(fn, seed)
    _check_settings(fn, log_every, bn, sampling, chunk_size, progress)
    keep = _checkpoint_steps(fn, checkpoints, steps)
    if stop_below is not None and not is_real(stop_below):
        raise TangentlabError(
            f"{fn}: stop_below must be a finite number (a training loss) or None, got "
            f"{stop_below!r}."
        )
    log_every = log_every or max(1, math.ceil(steps / _AUTO_LOG_POINTS))
    if trunk is not None and bn != "frozen":
        raise TangentlabError(f"{fn}: a trunk runs once, frozen, but bn={bn!r} would change its "
                              "outputs at every step: pass bn='frozen' or drop trunk.")  # fmt: skip
    net, x, y, batches, hyper = _setup(fn, model, data, optimizer, loss, steps, batch_size,
                                       params, seed, log_every, bn, sampling, device, trunk)
    run = _Run.start(net, optimizer, x, y, loss, steps=steps, log_every=log_every, bn=bn,
                     chunk=chunk_size or _EVAL_CHUNK, reuse=batches is None and bn == "frozen")
    run.keep = keep
    run.stop_below = None if stop_below is None else float(stop_below)
    if stop_below is not None:
        hyper["stop_below"] = float(stop_below)
    if eval_data is not None:
        run.held_out = _held_out(fn, eval_data, x, hyper["num_classes"], trunk, hyper)
        hyper["num_eval"] = num_rows(run.held_out[0])
    run.train(batches, seed, progress)
    return TrainingRun(
        steps=np.asarray(run.steps, dtype=np.int64),
        loss=np.asarray(run.losses, dtype=np.float64),
        accuracy=np.asarray(run.accs, dtype=np.float64),
        train_seconds=run.train_s, eval_seconds=run.eval_s,
        wall_seconds=time.perf_counter() - t_call, hyperparameters=hyper,
        diverged=run.diverged, divergence_step=run.div_step, interrupted=run.interrupted,
        stopped=run.stopped, steps_done=run.done, model=net, optimizer=optimizer,
        loss_function=loss, checkpoints=run.checkpoints,
        eval_loss=None if run.held_out is None else np.asarray(run.eval_losses, dtype=np.float64),
        eval_accuracy=None if run.held_out is None else np.asarray(run.eval_accs,
                                                                   dtype=np.float64),
    )  # fmt: skip


def _held_out(fn: str, eval_data: Any, x, c: int, trunk: nn.Module | None = None,
              hyper: dict | None = None):  # fmt: skip
    """The held-out inputs (on the training inputs' device; through the ``trunk``) and
    labels."""
    xe, ye = as_arrays(eval_data, where=f"{fn} (eval_data)")
    if num_rows(xe) < 1:
        raise TangentlabError(f"{fn}: eval_data is empty; pass (X_eval, y_eval) with rows.")
    if trunk is not None:
        t0 = time.perf_counter()
        xe = trunk_outputs(trunk, xe, trained={}, where=f"{fn} (eval_data)")
        hyper["trunk_seconds"] += time.perf_counter() - t0
    check_labels(ye, c, where=f"{fn} (eval_data)")
    dev = _device_of(x)
    if _nbytes(xe) <= _MOVE_DATA_BYTES:
        xe = to_device(xe, dev)
    return xe, ye.to(_device_of(xe))


def _setup(fn, model, data, optimizer, loss, steps, batch_size, params, seed, log_every, bn,
           sampling, device, trunk=None):  # fmt: skip
    """The trainable copy, the data (through the ``trunk``) on its device, the batch schedule
    and the settings."""
    x, y = as_arrays(data, where=fn)
    n = num_rows(x)
    net, names, trainable = _trainable_copy(fn, model, params, device)
    trunk_s = None
    if trunk is not None:  # NOTE [frozen trunk]: its outputs stand in for x
        mine = dict(model.named_parameters())
        t0 = time.perf_counter()
        x = trunk_outputs(trunk, x, trained={id(mine[a]): a for a in names}, where=fn)
        trunk_s = time.perf_counter() - t0
    dev = trainable[0].device
    if _nbytes(x) <= _MOVE_DATA_BYTES:  # else chunks are moved as they are used
        x = to_device(x, dev)
    y = y.to(_device_of(x))  # labels and batch ids live with the inputs
    Tangent(net, params=names).preflight(to_device(take(x, slice(0, 4)), dev), where=fn)
    with torch.no_grad():  # probe one sample: output shape and number of classes
        out1 = _forward(net, to_device(take(x, slice(0, 1)), dev))
    check_output(out1, 1, fn)
    c = int(out1.shape[1])
    check_labels(y, c, where=fn)
    full_batch = batch_size is None or batch_size >= n
    batches = None
    if not full_batch:
        rng = dyn.path_rngs(seed, 1)[0]  # NOTE [same batches as the forecast]
        batches = dyn.batch_schedule(n, batch_size, steps, sampling=sampling, rng=rng)
    hyper = {
        **optimizer.hyperparameters(), "steps": steps, "batch_size": batch_size,
        "loss": loss.name, "target_scale": loss.target_scale, "seed": seed, "num_samples": n,
        "num_classes": c, "sampling": sampling if not full_batch else None, "bn": bn,
        "bn_note": _BN_NOTES[bn], "log_every": int(log_every),
        "trainable": f"{len(names)} tensors, {sum(p.numel() for p in trainable):,} weights",
        "dtype": str(trainable[0].dtype).replace("torch.", ""), "device": str(dev),
        "torch_optimizer": optimizer.describe(),
    }  # fmt: skip
    if trunk is not None:
        hyper.update(trunk=f"{type(trunk).__name__}, run once (NOTE [frozen trunk])",
                     trunk_seconds=trunk_s)  # fmt: skip
    return net, x, y, batches, hyper


def _trainable_copy(fn: str, model: nn.Module, params: ParamSpec, device):
    """A deep copy in eval mode with only the selected weights trainable."""
    net = copy.deepcopy(model)
    if device is not None:
        net.to(torch.device(device))
    net.eval()
    try:
        names = select_params(net, params)
    except TangentlabError as exc:  # its messages name "Tangent"; this call is finetune
        raise TangentlabError(str(exc).replace("Tangent:", f"{fn}:", 1)) from None
    chosen = set(names)
    trainable = []
    for name, p in net.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            trainable.append(p)
    return net, names, trainable


class _Run:
    """The training loop's state: what has been logged, timings, divergence."""

    def __init__(self, net, opt, x, y, loss: Loss, dev, *, steps: int, log_every: int,
                 bn: str, chunk: int, reuse: bool) -> None:  # fmt: skip
        self.net, self.opt, self.x, self.y, self.loss, self.dev = net, opt, x, y, loss, dev
        self.total, self.bn, self.chunk = steps, bn, chunk
        self.train_chunk = None if bn == "train" else chunk
        # Full batch with frozen BN: a step's forward pass over all N samples is the logged
        # evaluation of the weights it starts from (NOTE [full-batch logging]).
        self.reuse = reuse
        self.log_at = set(range(0, steps + 1, log_every)) | {steps}
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.accs: list[float] = []
        self.train_s = self.eval_s = 0.0
        self.blowup = math.inf
        self.diverged, self.div_step, self.interrupted, self.done = False, None, False, 0
        self.stop_below: float | None = None  # finetune(stop_below=)
        self.stopped = False
        self.sched = None  # the learning-rate scheduler (LambdaLR), None for a constant rate
        self.keep: set[int] = set()  # steps whose trained weights are kept (checkpoints=)
        self.checkpoints: dict[int, dict[str, torch.Tensor]] = {}
        self.held_out = None  # (X_eval, y_eval), logged with the training loss (eval_data=)
        self.eval_losses: list[float] = []
        self.eval_accs: list[float] = []

    @classmethod
    def start(cls, net, optimizer: Optimizer, x, y, loss: Loss, **kw) -> _Run:
        """The torch optimizer over the trainable weights, built before the clock starts
        (the first torch optimizer of a process imports torch._dynamo)."""
        trainable = [p for p in net.parameters() if p.requires_grad]
        run = cls(net, optimizer.torch_optimizer(trainable), x, y, loss, trainable[0].device,
                  **kw)  # fmt: skip
        run.sched = optimizer.torch_scheduler(run.opt)  # step t uses lr·m(t)
        return run

    def log(self, step: int, measured: tuple[float, float] | None = None,
            held: tuple[float, float] | None = None) -> bool:  # fmt: skip
        """Evaluate (or take ``measured`` and the held-out ``held``) and record ``step``;
        False on a blow-up."""
        if measured is None:
            t0 = time.perf_counter()
            value, acc = _evaluate(self.net, self.x, self.y, self.loss, self.chunk, self.dev)
            _sync(self.dev)
            self.eval_s += time.perf_counter() - t0
        else:
            value, acc = measured
        if held is None:
            held = self._held_out_now() if math.isfinite(value) else (math.nan, math.nan)
        if step == 0:
            if not math.isfinite(value):
                raise TangentlabError(
                    f"finetune: the initial training loss is {value} (non-finite model outputs "
                    "or loss). Check the input normalization and the weights."
                )
            self.blowup = BLOWUP_FACTOR * value if value > 0 else math.inf
        self.steps.append(step)
        if not math.isfinite(value) or value > self.blowup:
            self.diverged, self.div_step = True, step
            self.losses.append(math.nan)
            self.accs.append(math.nan)
            self._log_held_out(math.nan, math.nan)
            return False
        self.losses.append(value)
        self.accs.append(acc)
        self._log_held_out(*held)
        if self.stop_below is not None and value <= self.stop_below:
            self.stopped = True
        return True

    def _held_out_now(self) -> tuple[float, float]:
        """Held-out loss and accuracy of the current weights (eval mode: the callers set it;
        no gradients), or NaNs without a held-out set."""
        if self.held_out is None:
            return math.nan, math.nan
        t0 = time.perf_counter()
        out = _evaluate(self.net, *self.held_out, self.loss, self.chunk, self.dev)
        _sync(self.dev)
        self.eval_s += time.perf_counter() - t0
        return out

    def _log_held_out(self, value: float, acc: float) -> None:
        if self.held_out is not None:
            self.eval_losses.append(value)
            self.eval_accs.append(acc)

    def train(self, batches, seed: int, progress: bool) -> None:
        """All steps, with the interruption policy (NOTE [interruption])."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, desc="finetune", unit="step", disable=not progress,
                   delay=2.0, dynamic_ncols=True, leave=False)  # fmt: skip
        devices = [self.dev.index or 0] if self.dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                if self.log(0):
                    self._loop(batches, bar)
        except KeyboardInterrupt:
            self.interrupted = True
            if len(self.losses) < len(self.steps):  # interrupted inside an evaluation
                self.steps.pop()
            if self.held_out is not None:
                del self.eval_losses[len(self.steps):], self.eval_accs[len(self.steps):]
            warnings.warn(
                f"finetune: interrupted after {self.done} of {self.total} steps; returning the "
                f"run logged so far (steps 0..{self.steps[-1] if self.steps else '-'}) with "
                "interrupted=True.",
                TangentlabWarning,
                stacklevel=3,
            )
        finally:
            bar.close()
            self.net.eval()
            for p in self.net.parameters():
                p.grad = None

    def _loop(self, batches, bar) -> None:
        n = num_rows(self.x)
        if self.bn == "train":
            self.net.train()
        for t in range(self.total):
            if t in self.keep:
                self._snapshot(t)
            held = None
            if self.reuse and t > 0 and t in self.log_at:  # w_t, before the step moves it
                held = self._held_out_now()
            t0 = time.perf_counter()
            idx = None if batches is None else torch.as_tensor(batches[t], device=self.y.device)
            batch_loss, correct = _step(self.net, self.opt, self.x, self.y, idx, self.loss,
                                        self.train_chunk, self.dev)  # fmt: skip
            if self.sched is not None:  # after optimizer.step(), as torch's schedulers expect
                self.sched.step()
            _sync(self.dev)
            self.train_s += time.perf_counter() - t0
            self.done = t + 1
            bar.update(1)
            if self.reuse and t > 0 and t in self.log_at and math.isfinite(batch_loss):
                # NOTE [full-batch logging]: the step's forward pass at w_t was the
                # full-training-set evaluation of w_t (eval mode, all N samples).
                if not self.log(t, (batch_loss, correct / n), held):
                    return
                if self.stopped:  # log the weights w_{t+1} the run ends with, then stop
                    self.net.eval()
                    self.log(self.done)
                    return
            if not math.isfinite(batch_loss):  # the loss at w_t is already non-finite
                self.diverged, self.div_step = True, t
                if self.steps[-1] == t:
                    self.losses[-1] = self.accs[-1] = math.nan
                    if self.held_out is not None:
                        self.eval_losses[-1] = self.eval_accs[-1] = math.nan
                else:
                    self.steps.append(t)
                    self.losses.append(math.nan)
                    self.accs.append(math.nan)
                    self._log_held_out(math.nan, math.nan)
                return
            if self.done in self.log_at and not (self.reuse and self.done < self.total):
                self.net.eval()
                ok = self.log(self.done)
                if self.bn == "train":
                    self.net.train()
                bar.set_postfix(loss=f"{self.losses[-1]:.4g}", refresh=False)
                if not ok or self.stopped:
                    return
        if self.total in self.keep:
            self._snapshot(self.total)

    def _snapshot(self, step: int) -> None:
        """Keep the trained weights w_step (CPU copies) for ``TrainingRun.checkpoints``."""
        self.checkpoints[step] = {
            name: p.detach().cpu().clone()
            for name, p in self.net.named_parameters() if p.requires_grad
        }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Steps and evaluation.
# ---------------------------------------------------------------------------------------


def _forward(net: nn.Module, xb: Inputs) -> torch.Tensor:
    out = net(**xb) if isinstance(xb, Mapping) else net(xb)
    return _logits(out, "finetune")


def _step(net, opt, x, y, idx, loss: Loss, chunk, dev) -> tuple[float, int]:
    """One SGD step on batch ``idx`` (None: all samples) -> (batch loss, correct argmaxes)."""
    b = num_rows(x) if idx is None else int(idx.shape[0])
    parts = [(0, b)] if chunk is None else [(s, min(s + chunk, b)) for s in range(0, b, chunk)]
    opt.zero_grad(set_to_none=True)
    total, correct = 0.0, 0
    for s, e in parts:
        rows = slice(s, e) if idx is None else idx[s:e]
        xb = to_device(take(x, rows), dev)
        yb = y[rows].to(dev)
        f = _forward(net, xb)
        per_sample = loss.per_sample(f, yb)
        # sum of per-sample losses / |b|: the batch mean, also when split into chunks
        value = per_sample.sum() / b
        value.backward()
        total += float(per_sample.detach().double().sum()) / b
        correct += int((f.detach().argmax(1) == yb).sum())
    opt.step()
    return total, correct


def _evaluate(net, x, y, loss: Loss, chunk: int, dev) -> tuple[float, float]:
    """Full-training-set loss (mean over samples) and accuracy, eval mode, no gradients."""
    n = num_rows(x)
    total, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            f = _forward(net, to_device(take(x, slice(s, e)), dev))
            if f.ndim != 2 or f.shape[0] != e - s:
                check_output(f, e - s, "finetune")
            yb = y[s:e].to(dev)
            total += float(loss.per_sample(f, yb).double().sum())
            correct += int((f.argmax(1) == yb).sum())
    return total / n, correct / n


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":  # asynchronous kernels: wait before reading the clock
        torch.cuda.synchronize(dev)


def _device_of(x: Inputs) -> torch.device:
    return next(iter(x.values())).device if isinstance(x, Mapping) else x.device


def _nbytes(x: Inputs) -> int:
    ts = x.values() if isinstance(x, Mapping) else [x]
    return sum(t.numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------------------
# Validation (once, at the public edge).
# ---------------------------------------------------------------------------------------


def _checkpoint_steps(fn: str, checkpoints: Any, steps: int) -> set[int]:
    """``checkpoints=``: ``None`` (none kept) or integer steps in [0, T]."""
    if checkpoints is None:
        return set()
    try:
        keep = [int(s) for s in checkpoints if is_int(s)]
        ok = len(keep) == len(list(checkpoints)) and all(0 <= s <= steps for s in keep)
    except TypeError:
        ok = False
    if not ok:
        raise TangentlabError(
            f"{fn}: checkpoints must be a list of integer steps in [0, {steps}] (steps), got "
            f"{checkpoints!r}; e.g. checkpoints=[0, 10, 20]."
        )
    return set(keep)


def _check_settings(fn, log_every, bn, sampling, chunk_size, progress) -> None:
    for name, value, allowed in (("bn", bn, _BN_MODES), ("sampling", sampling, _SAMPLINGS)):
        check_choice(fn, name, value, allowed)
    if log_every is not None and (not is_int(log_every) or log_every < 1):
        raise TangentlabError(
            f"{fn}: log_every must be a positive integer or None (automatic), got "
            f"{log_every!r}; log_every=1 logs every step."
        )
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise TangentlabError(
            f"{fn}: chunk_size must be a positive integer or None (256), got {chunk_size!r}."
        )
    if not isinstance(progress, bool):
        raise TangentlabError(f"{fn}: progress must be True or False, got {progress!r}.")


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_list(x: np.ndarray) -> list[float | None]:
    return [_json_float(v) for v in x]

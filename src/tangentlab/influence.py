"""TracIn influence of training samples, on the tangent model (no training) or on checkpoints.

Pruthi, Liu, Kale, Sundararajan, "Estimating Training Data Influence by Tracing Gradient
Descent", NeurIPS 2020, https://arxiv.org/abs/2002.08484.

NOTE [TracIn on the tangent model]. TracInCP scores the influence of training sample z_i
on a sample z by the learning-rate-weighted gradient agreement over checkpoints t ∈ T:

.. math::

    \\mathrm{TracIn}(z_i, z) = \\sum_{t \\in T} \\eta_t\\,
        \\nabla_w \\ell(z; w_t) \\cdot \\nabla_w \\ell(z_i; w_t) .

On the tangent model the per-sample gradient is ∇_w ℓ(z_i; w_t) = J(x_i)^T δ_i(t) with the
output gradient δ_i(t) = ∂ℓ/∂f (MSE: f - s·y, CE: softmax(f) - y), so every inner product
is a kernel entry:

.. math::

    \\nabla_w \\ell(z; w_t) \\cdot \\nabla_w \\ell(z_i; w_t)
        = \\delta_z(t)^T\\, \\Theta(x, x_i)\\, \\delta_i(t) ,

and δ(t) comes from the tangent model's own trajectory, simulated in function space
(exact for a model linear in its weights: the real run's torch SGD with momentum,
``buf = m buf + g``, ``w -= η_t buf``, becomes ``f -= η_t Θ β``, ``β = m β + u_t`` with
u_t the batch-averaged δ of the step, sample-major). Train-to-eval influence uses the
cross kernel Θ(X_eval, X) (tangentlab.cross) and the evaluation outputs moved by it.
Self-influence (z = z_i) is the usual score for mislabeled samples. No training and no
per-step Jacobian: the cost is O(T (NC)^2) for the trajectory plus O(|T| M N C^2) for the
scores.

Checkpoints: ``checkpoints=None`` sums over every step t = 0 … T-1 (TracInCP with each
step a checkpoint; with minibatches it still counts every step for every sample, whereas
the paper's idealized TracIn counts only the steps whose batch holds z_i); a list of
steps in [0, T] gives TracInCP at those steps (w_t is the weights *before* the update of
step t; t = T is the final weights), each weighted by its η_t. :func:`tracin_checkpoints`
computes the classic TracInCP from the real checkpoints of :func:`tangentlab.finetune`
(``checkpoints=[...]``), optionally with the random-projection variant of Pruthi et al.
(gradients projected by R, E[RR^T] = I).

Scale: with full-batch SGD on the mean loss the first-order loss change that step t
attributes to z_i is (η_t/N)·∇ℓ(z)·∇ℓ(z_i): TracIn as defined here is N (B in minibatch)
times that. Rankings do not depend on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tangentlab import dynamics as dyn
from tangentlab.cross import CrossKernel
from tangentlab.data import as_arrays, num_rows, take
from tangentlab.errors import TangentlabError
from tangentlab.kernel import Kernel
from tangentlab.projection import Projection
from tangentlab.tangent import Tangent
from tangentlab.training import (
    SGD,
    as_loss,
    as_optimizer,
    check_batch_size,
    check_seed,
    check_steps,
    is_int,
)

_SAMPLINGS = ("epoch", "replacement")
_JSON_MATRIX_MAX = 250_000  # train_to_eval entries written to JSON at most


@dataclass(frozen=True, eq=False)
class Influence:
    """TracIn scores of the N training samples (NOTE [TracIn on the tangent model]).

    Attributes:
      self_influence: TracIn(z_i, z_i) ``[N]`` (high: hard or mislabeled samples).
      train_to_eval: TracIn(z_i, z_e) ``[M, N]`` (row e: influence of every training
        sample on evaluation sample e; positive: proponent), or ``None`` without an
        evaluation set.
      targets: training labels ``[N]``; ``eval_targets``: ``[M]`` or ``None``.
      method: ``"tangent"`` (kernel and forecast trajectory) or ``"checkpoints"`` (real
        checkpoints of a fine-tuning run).
      steps: the checkpoint steps summed over ``[|T|]``; ``rates``: their η_t.
      settings: the run's settings (JSON-able).
    """

    self_influence: np.ndarray
    train_to_eval: np.ndarray | None
    targets: np.ndarray
    eval_targets: np.ndarray | None
    method: str
    steps: np.ndarray
    rates: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.self_influence.shape[0])

    def ranking(self, by: str = "self") -> np.ndarray:
        """Training samples from the highest to the lowest score ``[N]``: ``by="self"``
        (self-influence) or ``"eval"`` (total influence on the evaluation set, the sum of
        ``train_to_eval`` over its rows)."""
        return np.argsort(-self.scores(by), kind="stable")

    def scores(self, by: str = "self") -> np.ndarray:
        """The per-training-sample score ranked by ``by`` (``"self"`` or ``"eval"``)."""
        if by == "self":
            return self.self_influence
        if by == "eval":
            if self.train_to_eval is None:
                raise TangentlabError(
                    "Influence: by='eval' needs an evaluation set (eval_data=...)."
                )
            return self.train_to_eval.sum(axis=0)
        raise TangentlabError(f"Influence: by must be 'self' or 'eval', got {by!r}.")

    def proponents(self, e: int, k: int = 5) -> np.ndarray:
        """The ``k`` training samples with the largest influence on evaluation sample ``e``."""
        if self.train_to_eval is None:
            raise TangentlabError("Influence.proponents: needs an evaluation set (eval_data=).")
        return np.argsort(-self.train_to_eval[e], kind="stable")[:k]

    def opponents(self, e: int, k: int = 5) -> np.ndarray:
        """The ``k`` training samples with the most negative influence on evaluation sample e."""
        if self.train_to_eval is None:
            raise TangentlabError("Influence.opponents: needs an evaluation set (eval_data=).")
        return np.argsort(self.train_to_eval[e], kind="stable")[:k]

    def to_frame(self):
        """A pandas DataFrame, one row per training sample sorted by self-influence: sample,
        label, self_influence, eval_influence (if any), rank."""
        import pandas as pd

        order = self.ranking("self")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        cols = {"sample": np.arange(self.num_samples), "label": self.targets,
                "self_influence": self.self_influence}  # fmt: skip
        if self.train_to_eval is not None:
            cols["eval_influence"] = self.train_to_eval.sum(axis=0)
        cols["rank"] = rank
        return pd.DataFrame(cols).sort_values("rank").reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: per-sample scores, ranking, settings and, with an evaluation set, the
        train-to-eval matrix (up to 250,000 entries), its column sums and the top 5
        proponents / opponents of every evaluation sample."""
        out = {
            "kind": "influence",
            "method": self.method,
            "self_influence": [float(v) for v in self.self_influence],
            "targets": [int(v) for v in self.targets],
            "ranking_self": [int(v) for v in self.ranking("self")],
            "steps": [int(v) for v in self.steps],
            "rates": [float(v) for v in self.rates],
            "settings": dict(self.settings),
        }
        if self.train_to_eval is not None:
            m = self.train_to_eval.shape[0]
            out["eval_targets"] = [int(v) for v in self.eval_targets]
            out["eval_influence"] = [float(v) for v in self.scores("eval")]
            out["proponents"] = [[int(i) for i in self.proponents(e)] for e in range(m)]
            out["opponents"] = [[int(i) for i in self.opponents(e)] for e in range(m)]
            if self.train_to_eval.size <= _JSON_MATRIX_MAX:
                out["train_to_eval"] = self.train_to_eval.tolist()
            else:  # [M, N] would make a huge file: the top 5 each way are kept instead
                out["train_to_eval"] = None
                out["train_to_eval_note"] = (
                    f"[{m}, {self.num_samples}] matrix left out of the JSON (more than "
                    f"{_JSON_MATRIX_MAX} entries); see proponents / opponents"
                )
        return out


def influence(
    kernel: Kernel,
    optimizer: SGD,
    steps: int,
    *,
    eval_data: CrossKernel | None = None,
    loss: Any = "mse",
    batch_size: int | None = None,
    seed: int = 0,
    sampling: str = "epoch",
    checkpoints: Sequence[int] | None = None,
) -> Influence:
    """TracIn self-influence and train-to-eval influence on the tangent model, without training.

    .. math::

        \\mathrm{TracIn}(z_i, z) = \\sum_{t \\in T} \\eta_t\\,
            \\delta_z(t)^T\\, \\Theta(x, x_i)\\, \\delta_i(t)

    (Pruthi et al. 2020, https://arxiv.org/abs/2002.08484; NOTE [TracIn on the tangent
    model]), with the output gradients δ(t) of the tangent model's SGD trajectory.

    Args:
      kernel: the training kernel (exact or projected; full structure).
      optimizer: ``tl.SGD(lr, momentum=m)`` of the run (schedules followed; no weight decay).
      steps: optimizer steps T of the run.
      eval_data: cross kernel of an evaluation set (:func:`tangentlab.compute_cross_kernel`,
        with labels) for train-to-eval influence.
      loss: ``"mse"`` / ``tl.MSE(...)`` or ``"ce"`` / ``tl.CrossEntropy()``.
      batch_size: B (``None``: full batch); the trajectory is the minibatch path of
        ``seed``, the batches of ``tl.finetune(..., seed=seed)`` (NOTE [same batches as the
        forecast] in tangentlab.finetune).
      seed, sampling: batch order, as for :func:`tangentlab.forecast`.
      checkpoints: steps in [0, T] to sum over (TracInCP); ``None``: every step 0 … T-1.

    Returns:
      :class:`Influence` (``.self_influence`` ``[N]``, ``.train_to_eval`` ``[M, N]``,
      ``.ranking()``, ``.to_frame()``, ``.to_dict()``).

    Example::

        >>> inf = tl.influence(k, tl.SGD(0.1), 100)               # [N] self-influence
        >>> inf.ranking()[:10]                                     # likely mislabeled first
        >>> inf = tl.influence(k, tl.SGD(0.1), 100, eval_data=ck)  # + [M, N] train -> eval
    """
    fn = "influence"
    optimizer, loss = as_optimizer(optimizer, fn), as_loss(loss, fn)
    steps = check_steps(fn, steps)
    batch_size, seed = check_batch_size(fn, batch_size), check_seed(fn, seed)
    _check_influence_inputs(fn, kernel, optimizer, sampling, eval_data)
    ckpt = _checkpoint_steps(fn, checkpoints, steps)
    n, c = kernel.num_samples, kernel.num_classes
    batches = None
    if batch_size is not None and batch_size < n:
        rng = dyn.path_rngs(seed, 1)[0]
        batches = dyn.batch_schedule(n, batch_size, steps, sampling=sampling, rng=rng)
    want = set(int(s) for s in ckpt)
    self_inf, tte, rates = _tracin_scan(fn, kernel, eval_data, optimizer, loss, steps,
                                        batches, want)  # fmt: skip
    settings = {
        "optimizer": optimizer.to_dict(), "loss": loss.to_dict(), "steps": steps,
        "batch_size": batch_size, "seed": seed,
        "sampling": sampling if batches is not None else None,
        "checkpoints": "every step" if checkpoints is None else [int(s) for s in ckpt],
        "num_samples": n, "num_classes": c,
        "reference": "Pruthi et al., NeurIPS 2020, https://arxiv.org/abs/2002.08484",
    }  # fmt: skip
    ye = None if eval_data is None else eval_data.targets.numpy()
    return Influence(
        self_influence=self_inf, train_to_eval=tte, targets=kernel.targets.numpy().copy(),
        eval_targets=None if ye is None else ye.copy(), method="tangent",
        steps=np.asarray(sorted(want), dtype=np.int64), rates=np.asarray(rates),
        settings=settings,
    )  # fmt: skip


def _check_influence_inputs(fn: str, kernel: Any, optimizer: SGD, sampling: str,
                            eval_data: Any) -> None:  # fmt: skip
    if not isinstance(kernel, Kernel) or kernel.is_trace:
        raise TangentlabError(
            f"{fn}: kernel must be a full tangentlab.Kernel (tl.compute_kernel, trace=False), "
            f"got {type(kernel).__name__}{' (trace kernel)' if isinstance(kernel, Kernel) else ''}."
        )
    if optimizer.weight_decay != 0.0:
        raise TangentlabError(
            f"{fn}: weight decay is not supported (got weight_decay={optimizer.weight_decay:g})"
            "; use tl.SGD(lr, momentum=m)."
        )
    if sampling not in _SAMPLINGS:
        raise TangentlabError(
            f"{fn}: sampling must be one of {list(_SAMPLINGS)}, got {sampling!r}."
        )
    if eval_data is not None:
        if not isinstance(eval_data, CrossKernel):
            raise TangentlabError(
                f"{fn}: eval_data must be a cross kernel, tl.compute_cross_kernel(model, "
                f"(X_eval, y_eval), kernel, ...); got {type(eval_data).__name__}."
            )
        eval_data.check_against(kernel, fn)
        if eval_data.targets is None:
            raise TangentlabError(
                f"{fn}: the evaluation set needs labels (its loss gradients); compute the "
                "cross kernel from (X_eval, y_eval)."
            )


def _tracin_scan(fn: str, kernel: Kernel, eval_data: CrossKernel | None, optimizer: SGD,
                 loss: Any, steps: int, batches: list | None, want: set[int]):  # fmt: skip
    """Run the tangent model's SGD in function space and sum, at the steps in ``want``,
    η_t δ_i(t)ᵀ Θ_ii δ_i(t) (self-influence ``[N]``) and η_t δ_e(t)ᵀ Θ_ei δ_i(t)
    (train-to-eval ``[M, N]`` or None). Returns ``(self, train_to_eval, rates used)``."""
    n, c = kernel.num_samples, kernel.num_classes
    etas = _rates(optimizer, steps)
    theta = kernel.gram().double().numpy()
    y = kernel.targets.numpy()
    f = kernel.f0.double().numpy().reshape(-1).copy()
    blocks = theta.reshape(n, c, n, c)[np.arange(n), :, np.arange(n), :]  # [N, C, C] Θ_ii
    ke = fe = ye = tte = None
    if eval_data is not None:
        ke = eval_data.theta.double().numpy()
        fe = eval_data.f0.double().numpy().reshape(-1).copy()
        ye = eval_data.targets.numpy()
        tte = np.zeros((eval_data.num_eval, n))
    self_inf = np.zeros(n)
    buf = np.zeros(n * c)
    kw = {"loss": loss.name, "scale": loss.target_scale}
    rates = []
    for t in range(steps + 1):
        delta = dyn.loss_grad(f.reshape(n, c), y, **kw)  # [N, C]
        if t in want:
            eta = float(etas[min(t, steps - 1)]) if steps else optimizer.lr
            rates.append(eta)
            self_inf += eta * np.einsum("ia,iab,ib->i", delta, blocks, delta)
            if ke is not None:
                de = dyn.loss_grad(fe.reshape(-1, c), ye, **kw)  # [M, C]
                tte += eta * np.einsum(
                    "ea,eaib,ib->ei", de, ke.reshape(-1, c, n, c), delta, optimize=True
                )
        if t == steps:
            break
        u = np.zeros((n, c))
        if batches is None:
            u = delta / n
        else:
            b = np.asarray(batches[t])
            np.add.at(u, b, delta[b] / b.size)  # with replacement a sample may repeat
        buf = optimizer.momentum * buf + u.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            f = f - etas[t] * (theta @ buf)
            if ke is not None:
                fe = fe - etas[t] * (ke @ buf)
        if not np.all(np.isfinite(f)):
            raise TangentlabError(
                f"{fn}: the tangent model's run diverges at step {t} at this learning rate; "
                "lower it (tl.stable_lr(kernel))."
            )
    return self_inf, tte, rates


def tracin_checkpoints(
    run: Any,
    data: Any,
    *,
    eval_data: Any = None,
    projection: int | Projection | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> Influence:
    """Classic TracInCP from the real checkpoints of a fine-tuning run.

    .. math::

        \\mathrm{TracInCP}(z_i, z) = \\sum_{t} \\eta_t\\,
            \\nabla_w \\ell(z; w_t) \\cdot \\nabla_w \\ell(z_i; w_t)

    over the checkpoints kept by ``tl.finetune(..., checkpoints=[...])`` (the trained
    weights only), each weighted by the learning rate of its step. With ``projection=k``
    the per-sample gradients are projected, ``R^T ∇ℓ`` (E[RR^T] = I: Pruthi et al.'s
    random-projection TracIn), else exact.

    Args:
      run: a :class:`tangentlab.TrainingRun` with ``checkpoints``.
      data: the run's training data ``(X, y)`` (or Dataset / DataLoader).
      eval_data: ``(X_eval, y_eval)`` for train-to-eval influence, or ``None``.
      projection: ``None`` (exact gradients) or ``k`` / a :class:`Projection`.
      batch_size: samples per gradient chunk.
      device: where to compute (default: the run's model's device).

    Returns:
      :class:`Influence` with ``method="checkpoints"``.
    """
    fn = "tracin_checkpoints"
    ckpts = getattr(run, "checkpoints", None)
    if not ckpts:
        raise TangentlabError(
            f"{fn}: the run kept no checkpoints; fine-tune with tl.finetune(..., "
            "checkpoints=[0, 10, 20, ...]) (steps whose trained weights are kept)."
        )
    if run.model is None or run.optimizer is None or run.loss_function is None:
        raise TangentlabError(f"{fn}: the run has no model/optimizer/loss to evaluate.")
    if not is_int(batch_size) or batch_size < 1:
        raise TangentlabError(f"{fn}: batch_size must be an integer >= 1, got {batch_size!r}.")
    x, y = as_arrays(data, where=fn)
    xe = ye = None
    if eval_data is not None:
        xe, ye = as_arrays(eval_data, where=fn)
    net = copy.deepcopy(run.model).eval()
    if device is not None:
        net.to(torch.device(device))
    loss = run.loss_function
    opt = run.optimizer
    total = int(run.hyperparameters.get("steps", max(ckpts)))
    mult = getattr(opt, "lr_multipliers", None)
    m = mult(max(total, 1)) if mult is not None else None
    named = dict(net.named_parameters())
    self_inf = np.zeros(num_rows(x))
    tte = None if xe is None else np.zeros((num_rows(xe), num_rows(x)))
    steps, rates = [], []
    mode = "auto"  # timed at the first checkpoint, then kept (same model, other weights)
    for step in sorted(ckpts):
        weights = ckpts[step]
        with torch.no_grad():
            for name, w in weights.items():
                named[name].copy_(w.to(named[name]))
        tangent = Tangent(net, params=list(weights), projection=projection, jacobian_mode=mode)
        g = _loss_gradients(tangent, x, y, loss, batch_size)  # [N, P or k]
        mode = tangent.jacobian_mode.value
        eta = opt.lr * (1.0 if m is None else float(m[min(step, len(m) - 1)]))
        self_inf += eta * (g * g).sum(axis=1)
        if xe is not None:
            tte += eta * (_loss_gradients(tangent, xe, ye, loss, batch_size) @ g.T)
        steps.append(step)
        rates.append(eta)
    settings = {
        "optimizer": opt.to_dict(), "loss": loss.to_dict(),
        "projection": None if projection is None else str(projection),
        "checkpoints": [int(s) for s in steps],
        "reference": "Pruthi et al., NeurIPS 2020, https://arxiv.org/abs/2002.08484",
    }  # fmt: skip
    return Influence(
        self_influence=self_inf, train_to_eval=tte, targets=y.numpy().copy(),
        eval_targets=None if ye is None else ye.numpy().copy(), method="checkpoints",
        steps=np.asarray(steps, dtype=np.int64), rates=np.asarray(rates), settings=settings,
    )  # fmt: skip


def _loss_gradients(tangent: Tangent, x, y, loss, batch_size: int) -> np.ndarray:
    """Per-sample loss gradients J_i^T δ_i at the tangent's weights: ``[N, P]`` (or ``[N, k]``
    projected, R^T J_i^T δ_i)."""
    out = []
    n = num_rows(x)
    for s in range(0, n, batch_size):
        xb = take(x, slice(s, min(n, s + batch_size)))
        yb = y[s : s + batch_size].to(tangent.device)
        blocks = tangent.jacobian_blocks(xb)
        f = tangent.f0(xb)
        with torch.enable_grad():
            fr = f.detach().clone().requires_grad_(True)
            (delta,) = torch.autograd.grad(loss.per_sample(fr, yb).sum(), fr)  # [B, C]
        if tangent.projector is not None:
            jac = tangent.project(blocks)  # [B, C, k]
        else:
            jac = torch.cat([blocks[nm] for nm in tangent.param_names], dim=-1)  # [B, C, P]
        out.append(torch.einsum("bc,bcp->bp", delta.to(jac.dtype), jac).double().cpu().numpy())
    return np.concatenate(out)


def _checkpoint_steps(fn: str, checkpoints, steps: int) -> list[int]:
    if checkpoints is None:
        return list(range(steps))
    try:
        out = sorted({int(s) for s in checkpoints if is_int(s)})
        bad = len(out) != len(set(checkpoints)) or not out
    except TypeError:
        bad, out = True, []
    if bad or out[0] < 0 or out[-1] > steps:
        raise TangentlabError(
            f"{fn}: checkpoints must be a non-empty list of integer steps in [0, {steps}], got "
            f"{checkpoints!r}."
        )
    return out


def _rates(optimizer: SGD, steps: int) -> np.ndarray:
    """η_t for t < T (a schedule when the optimizer has one)."""
    mult = getattr(optimizer, "lr_multipliers", None)
    m = mult(steps) if (mult is not None and steps) else None
    if m is None:
        return np.full(max(steps, 1), optimizer.lr)
    return optimizer.lr * np.asarray(m, dtype=np.float64)

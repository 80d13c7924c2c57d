"""Data adapters: turn what users pass as ``data`` into in-memory ``(X, y)``.

Accepted (validated once, here, at the edge):

- a tuple/list ``(X, y)`` of tensors or numpy arrays; ``X`` may be a dict of tensors
  with a common leading dimension (Hugging Face inputs: ``input_ids``, ``attention_mask``);
- a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` or dicts holding a
  ``"label"``/``"labels"`` entry next to the model inputs;
- a ``torch.utils.data.DataLoader`` yielding such batches.

``X`` is a tensor ``[N, ...]`` or a dict of tensors ``[N, ...]``; ``y`` is int64 ``[N]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tangentlab.errors import TangentlabError

Inputs = torch.Tensor | dict[str, torch.Tensor]
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


def _to_tensor(a: Any, what: str, where: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as exc:
        raise TangentlabError(
            f"{where}: could not convert {what} of type {type(a).__name__} to a tensor ({exc})."
        ) from None


def _split_item(item: Any, where: str) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        keys = [k for k in _LABEL_KEYS if k in item]
        if not keys:
            raise TangentlabError(
                f"{where}: a dict sample/batch needs a label entry (one of {_LABEL_KEYS}); "
                f"got keys {sorted(item)}."
            )
        x = {k: v for k, v in item.items() if k not in _LABEL_KEYS}
        return x, item[keys[0]]
    if isinstance(item, list | tuple) and len(item) == 2:
        return item[0], item[1]
    raise TangentlabError(
        f"{where}: each sample/batch must be (x, y) or a dict with a 'labels' entry; "
        f"got {type(item).__name__}."
    )


def _stack(parts: list, where: str, *, cat: bool) -> Inputs:
    join = torch.cat if cat else torch.stack
    if isinstance(parts[0], Mapping):
        return {k: join([_to_tensor(p[k], f"input {k!r}", where) for p in parts]) for k in parts[0]}
    return join([_to_tensor(p, "input", where) for p in parts])


def num_rows(x: Inputs) -> int:
    """N, the leading dimension of a tensor or of every entry of a dict of tensors."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take(x: Inputs, index: slice | torch.Tensor) -> Inputs:
    """Rows ``index`` of a tensor or a dict of tensors."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def as_arrays(data: Any, *, where: str = "compute_kernel") -> tuple[Inputs, torch.Tensor]:
    """Materialize ``data`` as ``(X, y)``: ``X`` ``[N, ...]`` (or a dict of those), ``y`` ``[N]``.

    Raises:
      TangentlabError: empty data, mismatched lengths, non-integer labels, unsupported type.
    """
    if isinstance(data, DataLoader):
        batches = [_split_item(b, where) for b in data]
        if not batches:
            raise TangentlabError(f"{where}: the DataLoader yielded no batch (empty data).")
        x = _stack([b[0] for b in batches], where, cat=True)
        y = torch.cat([_to_tensor(b[1], "labels", where).reshape(-1) for b in batches])
    elif isinstance(data, Dataset):
        try:
            n = len(data)
        except TypeError:
            raise TangentlabError(
                f"{where}: iterable datasets without len() are not supported; wrap it in "
                "a DataLoader or materialize it as (X, y)."
            ) from None
        if n == 0:
            raise TangentlabError(f"{where}: the Dataset is empty (len 0).")
        items = [_split_item(data[i], where) for i in range(n)]
        x = _stack([it[0] for it in items], where, cat=False)
        y = torch.stack([_to_tensor(it[1], "label", where).reshape(()) for it in items])
    elif isinstance(data, list | tuple) and len(data) == 2:
        x, y = data
        x = (
            {k: _to_tensor(v, f"input {k!r}", where) for k, v in x.items()}
            if isinstance(x, Mapping)
            else _to_tensor(x, "X", where)
        )
        y = _to_tensor(y, "y", where)
    else:
        raise TangentlabError(
            f"{where}: data must be a (X, y) tuple, a torch Dataset or a DataLoader; "
            f"got {type(data).__name__}."
        )
    return _check_arrays(x, y, where)


def _check_arrays(x: Inputs, y: torch.Tensor, where: str) -> tuple[Inputs, torch.Tensor]:
    if isinstance(x, Mapping):
        if not x:
            raise TangentlabError(f"{where}: the input dict is empty.")
        lengths = {k: int(v.shape[0]) if v.ndim else -1 for k, v in x.items()}
        if len(set(lengths.values())) != 1:
            raise TangentlabError(
                f"{where}: the inputs have different numbers of rows {lengths}; every "
                "entry needs the same leading dimension N."
            )
    elif x.ndim == 0:
        raise TangentlabError(f"{where}: X must have a leading sample dimension, got a scalar.")
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        else:
            raise TangentlabError(
                f"{where}: labels y must be integer class indices of shape [N], got shape "
                f"{tuple(y.shape)}. One-hot labels? Pass y.argmax(1)."
            )
    if y.is_floating_point():
        if not bool(torch.all(y == y.round())):
            raise TangentlabError(
                f"{where}: labels y must be integer class indices; got non-integer floats."
            )
        y = y.long()
    y = y.long()
    n = num_rows(x)
    if n == 0:
        raise TangentlabError(f"{where}: the data is empty (N = 0 samples).")
    if n != y.shape[0]:
        raise TangentlabError(
            f"{where}: X has {n} samples but y has {y.shape[0]} labels; they must match."
        )
    return x, y


def check_labels(y: torch.Tensor, num_classes: int, *, where: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise TangentlabError(
            f"{where}: labels must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs; got labels in [{lo}, {hi}]. Remap the labels to 0..C-1, or give the "
            "model as many outputs as classes."
        )


# NOTE [frozen trunk] (the mathematics in tangentlab.experimental.exact_top): the layers
# below the first trained weight never move, and all the layers above see of x is their
# output; computed once, it stands in for x.
TRUNK_CHUNK = 256  # samples per forward pass of a trunk


def trunk_outputs(trunk: Any, x: Inputs, *, trained: dict[int, str], where: str) -> Inputs:
    """``trunk`` on all N inputs ``x`` (a tensor ``[N, ...]`` or a Mapping of them, passed as
    keyword arguments), in chunks of ``TRUNK_CHUNK`` without gradients: a tensor ``[N, ...]``
    or a dict of them (the next layers' keyword inputs) (NOTE [frozen trunk]). ``trained``
    maps ``id(parameter)`` to the name of each trained weight, none of which the trunk may
    hold; a trunk in training mode is switched to eval mode, with a ModeSwitchWarning."""
    import warnings

    from torch import nn

    from tangentlab.errors import ModeSwitchWarning

    if not isinstance(trunk, nn.Module):
        raise TangentlabError(f"{where}: trunk must be an nn.Module (or None), got "
                              f"{type(trunk).__name__}.")  # fmt: skip
    shared = [trained[id(p)] for p in trunk.parameters() if id(p) in trained]
    if shared:
        raise TangentlabError(f"{where}: the trunk holds the trained weight {shared[0]!r}; a "
                              "trunk runs once, frozen: cut it below the first trained weight "
                              "(examples.split_trunk does).")  # fmt: skip
    if trunk.training:
        warnings.warn(f"{where}: switched trunk to eval mode (batch-norm statistics frozen, "
                      "dropout off), as the model requires. Call trunk.train() afterwards "
                      "to restore it.", ModeSwitchWarning, stacklevel=3)  # fmt: skip
        trunk.eval()
    n, outs = num_rows(x), []
    with torch.no_grad():
        for s in range(0, n, TRUNK_CHUNK):
            xb = take(x, slice(s, s + TRUNK_CHUNK))
            h = trunk(**xb) if isinstance(xb, Mapping) else trunk(xb)
            rows = min(TRUNK_CHUNK, n - s)
            parts = list(h.values()) if isinstance(h, Mapping) else [h]
            if not parts or not all(isinstance(t, torch.Tensor) and t.ndim >= 1
                                    and t.shape[0] == rows for t in parts):  # fmt: skip
                raise TangentlabError(
                    f"{where}: the trunk must return a tensor [B, ...] or a Mapping of such "
                    f"tensors (the next layers' keyword inputs) for a batch of B = {rows}, got "
                    f"{type(h).__name__}.")  # fmt: skip
            outs.append(h)
    if isinstance(outs[0], Mapping):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def fingerprint(x: Inputs, y: torch.Tensor) -> str:
    """A sha256 of the data's values, shapes and dtypes (used to key caches)."""
    h = hashlib.sha256()
    items = sorted(x.items()) if isinstance(x, Mapping) else [("X", x)]
    for name, t in [*items, ("y", y)]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]

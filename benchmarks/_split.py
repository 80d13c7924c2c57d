"""Frozen-trunk caching for the benchmarks: run the frozen bottom of a network once.

With batch norm frozen (eval mode) and only the top of the network trainable, the
activations entering the trainable part are fixed functions of the input, so they can be
computed once and both the kernel and the real fine-tuning run on the top alone: the same
mathematics (the Jacobian w.r.t. the top's weights, the same SGD trajectory) at a fraction
of the cost. The benchmarks use this to make grids of real fine-tuning runs affordable on
two CPU cores, and report the one-off trunk pass in the times they compare.

``split(name, model)`` returns ``(trunk, top)``: ``trunk(X) -> X_top`` (no gradients) and a
``top`` module whose parameter names equal the full model's, so an example's
``default_params`` regex selects the same weights in ``top``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tangentlab.data import num_rows, take


class Lite0Top(nn.Module):
    """EfficientNet-Lite0 from its last block up: block 15, head conv/BN, pooling, fc."""

    def __init__(self, model: nn.Module, first_block: int = 15) -> None:
        super().__init__()
        self._blocks = model._blocks  # whole list: parameter names stay "_blocks.15...."
        self._conv_head, self._bn1, self._fc = model._conv_head, model._bn1, model._fc
        self._avg_pooling, self._dropout, self._swish = (
            model._avg_pooling, model._dropout, model._swish,
        )  # fmt: skip
        self.first_block = first_block
        self.rate = model._global_params.drop_connect_rate or 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = len(self._blocks)
        for idx in range(self.first_block, n):
            h = self._blocks[idx](h, drop_connect_rate=self.rate * idx / n)
        h = self._swish(self._bn1(self._conv_head(h)))
        h = self._avg_pooling(h).flatten(1)
        return self._fc(self._dropout(h))


def _lite0_trunk(model: nn.Module, first_block: int = 15) -> Callable[[torch.Tensor], Any]:
    def trunk(x: torch.Tensor) -> torch.Tensor:
        h = model._swish(model._bn0(model._conv_stem(x)))
        n = len(model._blocks)
        rate = model._global_params.drop_connect_rate or 0.0
        for idx in range(first_block):
            h = model._blocks[idx](h, drop_connect_rate=rate * idx / n)
        return h

    return trunk


class MiniLMTop(nn.Module):
    """BERT sequence classifier from its last encoder layer up: layer 5, pooler, classifier.

    Inputs ``hidden_states`` ``[B, L, H]`` (the output of layer 4) and ``attention_mask``
    ``[B, L]`` (1 = token, 0 = padding).
    """

    def __init__(self, model: nn.Module, first_layer: int = 5) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = model.bert.encoder.layer
        self.bert.pooler = model.bert.pooler
        self.dropout, self.classifier = model.dropout, model.classifier
        self.first_layer = first_layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        neg = torch.finfo(hidden_states.dtype).min
        ext = (1.0 - attention_mask[:, None, None, :].to(hidden_states.dtype)) * neg
        h = hidden_states
        for layer in self.bert.encoder.layer[self.first_layer :]:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(self.bert.pooler(h)))


def _minilm_trunk(model: nn.Module, first_layer: int = 5) -> Callable[[dict], Any]:
    def trunk(x: dict) -> dict:
        out = model.bert(**x, output_hidden_states=True)
        return {
            "hidden_states": out.hidden_states[first_layer],
            "attention_mask": x["attention_mask"].to(out.hidden_states[0].dtype),
        }

    return trunk


def split(name: str, model: nn.Module) -> tuple[Callable[[Any], Any], nn.Module] | None:
    """``(trunk, top)`` for the built-in examples whose default selection is a top part."""
    model.eval()
    if name == "fashion-lite0":
        return _lite0_trunk(model), Lite0Top(model).eval()
    if name == "rt-minilm":
        return _minilm_trunk(model), MiniLMTop(model).eval()
    return None


def cached_inputs(
    name: str, model: nn.Module, X: Any, chunk: int = 256
) -> tuple[nn.Module, Any, float]:
    """``(top, X_top, seconds)``: the trunk run once over ``X`` (in chunks, no gradients).

    Models without a split come back unchanged (``top = model``, ``X_top = X``, 0 s).
    """
    parts = split(name, model)
    if parts is None:
        return model, X, 0.0
    trunk, top = parts
    t0 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for s in range(0, num_rows(X), chunk):
            outs.append(trunk(take(X, slice(s, s + chunk))))
    if isinstance(outs[0], dict):
        xt: Any = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    else:
        xt = torch.cat(outs)
    return top, xt, time.perf_counter() - t0

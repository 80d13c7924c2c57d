"""The frozen trunk (NOTE [frozen trunk] in exact_top.py): ``examples.split_trunk`` cuts a
known body below its first trained weight; ``compute_exact_top_kernel(..., trunk=)`` runs it
once and gives the kernel of the body without it; ``tl.finetune(compose(rest, top), ...,
trunk=)`` runs it once and is the network's run."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from tangentlab.errors import ModeSwitchWarning, TangentlabError
from tangentlab.examples import (
    LITE0_DEFAULT_PARAMS,
    compose,
    split_lite,
    split_minilm,
    split_trunk,
)
from tangentlab.experimental.exact_top import (
    compute_exact_top_kernel,
    forecast_exact_top,
    split_mismatch,
)
from test_exact_top import _tiny_bert


def _lite(seed: int = 0) -> nn.Module:
    """EfficientNet-Lite0 at 32 px, 3 classes, float64, batch-norm statistics of one batch
    (activations of order 1)."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(seed)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=3, image_size=32)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 1.0
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32))
    return model.double().eval()


def _names(m: nn.Module) -> set[str]:
    return {n for n, _ in m.named_parameters()}


def test_split_trunk_of_a_lite_body_composes_to_it_and_keeps_the_trained_names():
    model = _lite()
    body, top = split_lite(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
    assert trunk is not None and not trunk.training and not rest.training
    with torch.no_grad():
        torch.testing.assert_close(rest(trunk(x)), body(x), rtol=0, atol=0)
    trained = {n for n in _names(body) if re.search(LITE0_DEFAULT_PARAMS, n)}
    assert _names(rest) == trained  # block 15 alone, under the body's names
    assert not _names(trunk) & {"_blocks.15." + n for n, _ in body._blocks[15].named_parameters()}
    assert split_mismatch(model, rest, top, x, trunk=trunk) == 0.0
    # blocks 14 and 15 trained: the trunk stops below block 14
    trunk2, rest2 = split_trunk(body, r"^_blocks\.1[45]\.")
    assert {n.split(".")[1] for n in _names(rest2)} == {"14", "15"}
    with torch.no_grad():
        torch.testing.assert_close(rest2(trunk2(x)), body(x), rtol=0, atol=0)
    # nothing to cut: the stem trained (every weight requires grad), no weight trained, or
    # a body split_model does not make
    for params in (None, r"^_conv_stem\.", r"^nothing$"):
        assert split_trunk(body, params) == (None, body)
    plain = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    assert split_trunk(plain, r"^1\.") == (None, plain)


@pytest.mark.parametrize("exact", ["ffn", "pooler"])
@pytest.mark.parametrize("masked", [True, False])
def test_split_trunk_of_a_bert_body_composes_to_it(exact, masked):
    model, x, _ = _tiny_bert()
    if not masked:
        x = {k: v for k, v in x.items() if k != "attention_mask"}
    body, top = split_minilm(model, exact=exact)
    trunk, rest = split_trunk(body, r"^(?:bert\.encoder\.layer\.1\.|bert\.pooler\.|classifier\.)")
    h = trunk(**x)
    assert set(h) == ({"hidden_states", "attention_mask"} if masked else {"hidden_states"})
    with torch.no_grad():
        torch.testing.assert_close(rest(**trunk(**x)), body(**x), rtol=0, atol=0)
    assert all(n.startswith("bert.encoder.layer.1.") for n in _names(rest))
    assert split_mismatch(model, rest, top, x, trunk=trunk) < 1e-12
    # the first layer trained: the trunk is the embeddings alone
    trunk0, rest0 = split_trunk(body, r"^bert\.encoder\.layer\.")
    assert not _names(trunk0) & _names(rest0) and len(trunk0.layer) == 0
    with torch.no_grad():
        torch.testing.assert_close(rest0(**trunk0(**x)), body(**x), rtol=0, atol=0)
    assert split_trunk(body, r"^bert\.embeddings\.")[0] is None


def test_exact_top_kernel_with_a_trunk_is_the_kernel_without_it(tmp_path):
    """The same z0, basis, Φ and κ_⊥ (float64: to rounding), and the same forecast; the
    caches in their own subdirectory, beside a kernel computed without the trunk."""
    model = _lite()
    body, top = split_lite(model)
    trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.arange(8) % 3
    top_w = r"^(?:_conv_head\.|_bn1\.|_fc\.)"
    kw = dict(params=LITE0_DEFAULT_PARAMS, top_params=top_w, directions=6, projection=64,
              progress=False, cache=tmp_path / "c")  # fmt: skip
    a = compute_exact_top_kernel(body, top, data, **kw)
    b = compute_exact_top_kernel(rest, top, data, trunk=trunk, **kw)
    for u, v in ((a.z0, b.z0), (a.basis, b.basis), (a.features, b.features), (a.rest, b.rest)):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)
    assert b.metadata["trunk"] == "_LiteTrunk" and "trunk" not in a.metadata
    for part in ("block", "rest"):
        assert (tmp_path / "c" / part / "kernel.safetensors").exists()
        assert (tmp_path / "c" / "after-trunk" / part / "kernel.safetensors").exists()
    c = compute_exact_top_kernel(rest, top, data, trunk=trunk, **kw)  # restored
    torch.testing.assert_close(c.features, b.features, rtol=0, atol=0)
    opt = tl.SGD(0.05)
    fa, fb = (forecast_exact_top(k, opt, 10, loss="ce", progress=False) for k in (a, b))
    np.testing.assert_allclose(fb.loss, fa.loss, rtol=1e-9)


def test_compose_keeps_the_parts_weight_names_and_composes():
    """compose(rest, top) of a Lite and a BERT split: above(trunk(x)) == model(x), and its
    weights are the model's, under the model's names (a merged ``bert`` for BERT)."""
    model = _lite()
    body, top = split_lite(model)
    trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
    above = compose(rest, top)
    whole = dict(model.named_parameters())
    assert all(whole[n] is p for n, p in above.named_parameters())
    assert {n for n in whole if re.search(LITE0_DEFAULT_PARAMS, n)} <= _names(above)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(above(trunk(x)), model(x), rtol=0, atol=0)
    bert, xb, _ = _tiny_bert()
    b, t = split_minilm(bert)
    tr, re_ = split_trunk(b, r"^bert\.encoder\.layer\.1\.")
    ab = compose(re_, t)
    wb = dict(bert.named_parameters())
    assert all(wb[n] is p for n, p in ab.named_parameters())
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= _names(ab)
    torch.testing.assert_close(ab(**tr(**xb)), bert(**xb).logits, rtol=0, atol=0)
    ab.train()
    assert all(m.training for m in ab.modules()) and re_.training and t.training
    ab.eval()
    with pytest.raises(TangentlabError, match="second must be an nn.Module"):
        compose(rest, lambda h: h)
    with pytest.raises(TangentlabError, match="both parts have a weight or buffer 'weight'"):
        compose(nn.Linear(2, 2), nn.Linear(2, 2))


@pytest.mark.parametrize("batch_size", [None, 3])
def test_fine_tuning_with_a_trunk_is_the_networks_run(batch_size):
    """tl.finetune(compose(rest, top), data, ..., trunk=trunk): with the trunk frozen in eval
    mode, the run of the layers above it on trunk(x), computed once, is tl.finetune of the
    network: the same logged losses and held-out losses (float64, to rounding) and the same
    trained weights; the trunk's seconds are reported apart."""
    model = _lite()
    body, top = split_lite(model)
    trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.arange(8) % 3
    xe, ye = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.arange(4) % 3
    opt = tl.SGD(0.01, momentum=0.5)
    kw = dict(loss="ce", batch_size=batch_size, log_every=1, progress=False,
              params=LITE0_DEFAULT_PARAMS, eval_data=(xe, ye))  # fmt: skip
    whole = tl.finetune(model, (x, y), opt, 6, **kw)
    cached = tl.finetune(compose(rest, top), (x, y), opt, 6, trunk=trunk, **kw)
    np.testing.assert_allclose(cached.loss, whole.loss, rtol=1e-10)
    np.testing.assert_allclose(cached.eval_loss, whole.eval_loss, rtol=1e-10)
    assert whole.loss[-1] < whole.loss[0]  # it trained
    trained = dict(cached.model.named_parameters())
    for n, p in whole.model.named_parameters():
        if re.search(LITE0_DEFAULT_PARAMS, n):
            torch.testing.assert_close(trained[n], p, rtol=1e-9, atol=1e-12)
    assert cached.hyperparameters["trunk_seconds"] > 0
    assert "trunk" not in whole.hyperparameters


def test_fine_tuning_a_bert_with_a_trunk_is_the_networks_run():
    """The same for a BERT split (a Mapping of hidden states and mask between the parts)."""
    bert, x, y = _tiny_bert()
    b, t = split_minilm(bert)
    params = r"^(?:bert\.encoder\.layer\.1\.|bert\.pooler\.|classifier\.)"
    tr, rest = split_trunk(b, params)
    kw = dict(loss="ce", log_every=1, progress=False, params=params)
    whole = tl.finetune(bert, (x, y), tl.SGD(0.05), 4, **kw)
    cached = tl.finetune(compose(rest, t), (x, y), tl.SGD(0.05), 4, trunk=tr, **kw)
    np.testing.assert_allclose(cached.loss, whole.loss, rtol=1e-6)
    assert whole.loss[-1] < whole.loss[0]


def test_a_trunk_that_moves_or_trains_is_refused_with_the_fix():
    model = _lite()
    body, top = split_lite(model)
    trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.arange(4) % 3
    opt = tl.SGD(0.01)
    with pytest.raises(TangentlabError, match="pass bn='frozen' or drop trunk"):
        tl.finetune(compose(rest, top), (x, y), opt, 2, trunk=trunk, bn="train",
                    params=LITE0_DEFAULT_PARAMS, progress=False)  # fmt: skip
    with pytest.raises(TangentlabError, match="trunk holds the trained weight '_blocks.15"):
        tl.finetune(compose(rest, top), (x, y), opt, 2, trunk=body,
                    params=LITE0_DEFAULT_PARAMS, progress=False)  # fmt: skip
    with pytest.raises(TangentlabError, match="trunk must be an nn.Module"):
        tl.finetune(compose(rest, top), (x, y), opt, 2, trunk=lambda v: trunk(v),
                    params=LITE0_DEFAULT_PARAMS, progress=False)  # fmt: skip


def test_exact_top_kernel_with_a_bert_trunk_is_the_kernel_without_it():
    model, x, y = _tiny_bert()
    body, top = split_minilm(model)
    params = r"^bert\.encoder\.layer\.1\."
    trunk, rest = split_trunk(body, params)
    kw = dict(params=params, top_params=r"^classifier\.", directions=4, projection=32,
              progress=False)  # fmt: skip
    a = compute_exact_top_kernel(body, top, (x, y), **kw)
    b = compute_exact_top_kernel(rest, top, (x, y), trunk=trunk, **kw)
    for u, v in ((a.z0, b.z0), (a.features, b.features), (a.rest, b.rest)):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


class _Listed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.inner(x)]


def test_a_bad_trunk_is_refused_with_the_fix():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 7).double(), nn.Linear(7, 6).double()
    body = nn.Sequential(first, nn.Tanh(), second).eval()
    top = nn.Sequential(nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3
    rest = nn.Sequential(nn.Tanh(), second).eval()
    fn = compute_exact_top_kernel
    kw = dict(params=r"^1\.", directions=2, progress=False)
    with pytest.raises(TangentlabError, match="trunk must be an nn.Module"):
        fn(rest, top, (x, y), trunk=lambda v: first(v), **kw)
    with pytest.raises(TangentlabError, match="trunk holds the trained weight '1.weight'"):
        fn(rest, top, (x, y), trunk=nn.Sequential(first, second), **kw)
    with pytest.raises(TangentlabError, match=r"must return a tensor \[B, \.\.\.\]"):
        fn(rest, top, (x, y), trunk=_Listed(first).eval(), **kw)
    trunk = nn.Sequential(first).train()
    with pytest.warns(ModeSwitchWarning, match="switched trunk to eval mode"):
        k = fn(rest, top, (x, y), trunk=trunk, **kw)
    assert not trunk.training
    want = compute_exact_top_kernel(body, top, (x, y), params=r"^2\.", directions=2,
                                    progress=False)  # fmt: skip
    torch.testing.assert_close(k.z0, want.z0, rtol=0, atol=0)

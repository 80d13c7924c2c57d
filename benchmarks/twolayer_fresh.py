"""A fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model (issue 13):
three image tasks on data no round used, and the real fine-tuning runs of ``holdout.py``'s
whole grid on them (24 cells a task: full batch and B = 32), nothing else.

    .venv/bin/python benchmarks/twolayer_fresh.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring.

**Tasks** (N = 128 at 32 px, as the image development tasks; data from Debian packages no
round used, fetched by ``--fetch`` with apt-get download + dpkg -x, no root needed; every
picture a transparent RGBA drawing composited on white at a random size, 36-60 px for its
longer side, and a random offset on a 64-px canvas, then resized to 32 px; classes balanced,
each sample a different source picture):

- ``icons-lite0``: which folder of the Oxygen icon theme (``oxygen-icon-theme``, the 64x64
  PNGs; duplicates and links dropped) an icon comes from: apps, devices, mimetypes or places
  (4 classes; 149, 54, 167 and 45 icons), EfficientNet-Lite0;
- ``stamps-lite1``: which category of Tux Paint's stamps (``tuxpaint-stamps-default``, the
  PNG stamps, mirrored variants dropped) a stamp belongs to: animals, food, town or
  vehicles (4 classes; 146, 67, 78 and 34 pictures; a random horizontal flip),
  EfficientNet-Lite1;
- ``emoji-lite0``: the Unicode emoji group (``unicode-data``'s emoji-test.txt, fully
  qualified, no skin-tone variants) of an emoji drawn by Noto Color Emoji
  (``fonts-noto-color-emoji``): Smileys & Emotion, People & Body, Animals & Nature,
  Food & Drink, Travel & Places, Activities, Objects or Symbols (8 classes; 85-363 emoji
  each, 1,601 in all), EfficientNet-Lite0.

**Runs** (``--real``): ``holdout.py``'s grid, loss {MSE, CE} x batch {full, B = 32} x
momentum {0, 0.9} x a {0.1, 0.3, 1}, η = ``tl.stable_lr(kernel, momentum=m, fraction=a,
loss=loss)`` on the tangent kernel (``projection`` 4,096), the real run to a 90% drop or
1,500 steps (``holdout._real``), the fields of ``holdout._cell`` without its forecasts.
Results: ``benchmarks/results/twolayer/fresh/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
from forecast_accuracy import _open_state, _save  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "twolayer")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh.py"
CACHE = Path(os.environ.get("TANGENTLAB_CACHE", Path.home() / ".cache" / "tangentlab"))
DATA = CACHE / "twolayer_fresh"  # each round's data: CACHE / <its script's name>
ROOT = DATA / "root"
PACKAGES = ("oxygen-icon-theme", "tuxpaint-stamps-default", "fonts-noto-color-emoji",
            "unicode-data")  # fmt: skip
ICONS = ROOT / "usr/share/icons/oxygen/base/64x64"
ICON_CLASSES = ("apps", "devices", "mimetypes", "places")
STAMPS = ROOT / "usr/share/tuxpaint/stamps"
STAMP_CLASSES = ("animals", "food", "town", "vehicles")
EMOJI_FONT = ROOT / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = ROOT / "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                "Travel & Places", "Activities", "Objects", "Symbols")  # fmt: skip
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
CANVAS = 64


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch_debs(packages: tuple[str, ...], data: Path, root: Path, needed: tuple[Path, ...],
               label: str) -> None:
    """Download the Debian ``packages`` into ``data`` and unpack them into ``root`` (no root
    needed), unless every path of ``needed`` is there already."""
    if all(p.exists() for p in needed):
        print(f"{label}: data already in {root}")
        return
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *packages], cwd=data, check=True)
    for pkg in packages:
        deb = sorted(data.glob(f"{pkg}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    print(f"{label}: unpacked {', '.join(packages)} into {root}")


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them."""
    fetch_debs(PACKAGES, DATA, ROOT, (ICONS, STAMPS, EMOJI_FONT, EMOJI_TEST), "twolayer_fresh")


def _need(path: Path, script: str = "twolayer_fresh.py", command: str = COMMAND) -> Path:
    if not path.exists():
        raise SystemExit(f"{script}: {path} missing; run {command} --fetch")
    return path


def _distinct(files: list[Path], seen: set) -> list[Path]:
    """``files`` (sorted) less those whose bytes an earlier file (or class) already had."""
    out = []
    for f in sorted(files):
        h = hashlib.sha1(f.read_bytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(f)
    return out


MIN_SIDE = 24  # px: the rounds' smallest visible part kept (``keep``)


def visible(path: Path) -> int:
    """The longer side (px) of a picture's visible (alpha > 0) part."""
    from PIL import Image

    box = Image.open(path).convert("RGBA").getchannel("A").getbbox()
    return 0 if box is None else max(box[2] - box[0], box[3] - box[1])


def keep(path: Path) -> bool:
    """A picture file the rounds keep: not a link, its visible part >= ``MIN_SIDE`` px."""
    return not path.is_symlink() and visible(path) >= MIN_SIDE


def folder_pools(root: Path, classes: tuple[str, ...], need: Callable[[Path], Path]
                 ) -> Callable[[], list[list[Path]]]:
    """A round's pools where each class is a folder: per class, the distinct pictures kept
    (``keep``) of the PNGs in ``root / <class>``, each picture in one class only; ``need``
    returns ``root`` or stops with the command that fetches it."""

    def pools() -> list[list[Path]]:
        seen: set = set()
        return [_distinct([p for p in (need(root) / c).glob("*.png") if keep(p)], seen)
                for c in classes]  # fmt: skip

    return pools


def _place(img, rng: np.random.Generator, flip: bool = False) -> np.ndarray:
    """An RGBA picture (PIL) cropped to its visible part, scaled to a random 36-60 px longer
    side, composited on white at a random offset of a 64-px canvas: [64, 64, 3] 0..255."""
    from PIL import Image

    img = img.convert("RGBA")
    box = img.getchannel("A").getbbox()
    if box is not None:
        img = img.crop(box)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(36, 61))
    w, h = img.size
    scale = side / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 255))
    dx = int(rng.integers(0, CANVAS - img.size[0] + 1))
    dy = int(rng.integers(0, CANVAS - img.size[1] + 1))
    canvas.alpha_composite(img, (dx, dy))
    return np.asarray(canvas.convert("RGB"), dtype=np.float32)


def _to_input(images: list[np.ndarray], labels: list[int], size: int):
    x = torch.as_tensor(np.stack(images).transpose(0, 3, 1, 2).copy())
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)  # fmt: skip
    return ((x - 127.0) / 128.0).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def pictures(pools: Callable[[], list[list[Path]]], *, flip: bool = False) -> Callable:
    """A task's ``images(n, size, seed)``: balanced labels and a different picture of each
    class's pool (``pools()``: the PNG files of each class; ``_draw``), each placed on white
    by ``_place`` (with a random horizontal flip if ``flip``)."""

    def images(n: int, size: int, seed: int):
        from PIL import Image

        labels, files, rng = _draw(pools(), n, seed)
        return _to_input([_place(Image.open(f), rng, flip=flip) for f in files], labels, size)

    return images


def _draw(pools: list[list], n: int, seed: int) -> tuple[list[int], list, np.random.Generator]:
    """Balanced labels (shuffled) and, for each, a different item of its class's pool."""
    rng = np.random.default_rng(seed)
    labels = [i % len(pools) for i in range(n)]
    rng.shuffle(labels)
    order = [list(rng.permutation(len(p))) for p in pools]
    items = []
    for k in labels:
        assert order[k], f"class {k}: pool of {len(pools[k])} too small for {n} samples"
        items.append(pools[k][order[k].pop(0)])
    return labels, items, rng


def icon_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(ICONS) / c).glob("*.png") if not p.is_symlink()], seen)
            for c in ICON_CLASSES]  # fmt: skip


def stamp_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(STAMPS) / c).rglob("*.png")
                       if not p.stem.endswith("_mirror")], seen)
            for c in STAMP_CLASSES]  # fmt: skip


def emoji_pools() -> list[list[str]]:
    """The fully-qualified emoji of each group, skin-tone variants left out."""
    pools: dict[str, list[str]] = {g: [] for g in EMOJI_GROUPS}
    group = None
    for line in _need(EMOJI_TEST).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif group in pools and "; fully-qualified" in line:
            s = "".join(chr(int(c, 16)) for c in line.split(";")[0].split())
            if not SKIN_TONES & set(s):
                pools[group].append(s)
    return [pools[g] for g in EMOJI_GROUPS]


def _emoji_image(s: str):
    """Noto Color Emoji's bitmap of ``s`` (its only strike, 109 px), RGBA."""
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(_need(EMOJI_FONT)), 109)
    img = Image.new("RGBA", (400, 160), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((10, 10), s, font=face, embedded_color=True)
    return img


def _icons(n: int, size: int, seed: int):
    """Oxygen icons (64x64 PNGs); the label: apps, devices, mimetypes or places."""
    from PIL import Image

    labels, files, rng = _draw(icon_pools(), n, seed)
    return _to_input([_place(Image.open(f), rng) for f in files], labels, size)


def _stamps(n: int, size: int, seed: int):
    """Tux Paint stamps (PNG); the label: animals, food, town or vehicles."""
    from PIL import Image

    labels, files, rng = _draw(stamp_pools(), n, seed)
    return _to_input([_place(Image.open(f), rng, flip=True) for f in files], labels, size)


def _emoji(n: int, size: int, seed: int):
    """Noto Color Emoji renders; the label: the emoji's Unicode group (8 groups)."""
    labels, chars, rng = _draw(emoji_pools(), n, seed)
    return _to_input([_place(_emoji_image(s), rng) for s in chars], labels, size)


TASKS = {
    "icons-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                        projection=4096, num_classes=len(ICON_CLASSES), images=_icons),
    "stamps-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                         projection=4096, num_classes=len(STAMP_CLASSES), images=_stamps),
    "emoji-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                        projection=4096, num_classes=len(EMOJI_GROUPS), images=_emoji),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def real_task(name: str, keys: list[str] | None = None, tasks: dict | None = None,
              folder: str = "fresh") -> dict:
    """The real runs of the 24 cells of ``holdout.py``'s grid (``keys``: only those), with
    ``holdout._cell``'s learning rate and fields and no forecast; resumable per cell.
    ``tasks`` (default ``TASKS``) and ``folder`` (under ``OUT``): another round's."""
    tasks = TASKS if tasks is None else tasks
    ho.TASKS.update(tasks)
    cfg = tasks[name]
    path = OUT / folder / f"{name}.json"
    state = _open_state(path)
    state["task"] = name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ho.load_task(name)
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(task["top"], (task["x"], task["y"]), projection=cfg["projection"],
                               params=task["params"], progress=False)  # fmt: skip
    kernel.eigh()
    tangent_s = time.perf_counter() - t0
    n = int(task["y"].shape[0])
    state["kernel"] = dict(num_samples=n, num_classes=kernel.num_classes,
                           trunk_seconds=task["trunk_seconds"], tangent_seconds=tangent_s,
                           lam_max_over_n=kernel.eigh()[0].max().item() / n,
                           num_params=tl.Tangent(task["top"], params=task["params"]).num_params,
                           class_counts=np.bincount(task["y"].numpy()).tolist())  # fmt: skip
    cells = state.setdefault("cells", {})
    _save(path, state)
    print(f"[{name}] {state['kernel']}", flush=True)
    for c in ho._cells():
        key = ho._key(c)
        if key in cells or (keys and key not in keys):
            continue
        lr = tl.stable_lr(kernel, momentum=c["momentum"], fraction=c["lr_factor"],
                          loss=c["loss"])  # fmt: skip
        opt = tl.SGD(lr, momentum=c["momentum"])
        t0 = time.perf_counter()
        run = ho._real(task, opt, ho.H_CAP, c)
        real_s = time.perf_counter() - t0
        steps = int(run.steps[-1])  # where the run stopped: the 90% drop, or H_CAP
        cells[key] = dict(**c, lr=lr, steps=steps, fc_steps=ho.forecast_steps(steps),
                          real_seconds=real_s + task["trunk_seconds"],
                          diverged_run=bool(run.diverged),
                          run_steps=[int(s) for s in run.steps],
                          run_loss=ho._curve(run.loss))  # fmt: skip
        _save(path, state)
        loss = np.asarray(run.loss, dtype=float)
        print(f"[{name}] {key}: lr={lr:.3g} steps={steps} real {real_s:.1f}s "
              f"L0={loss[0]:.4g} min/L0={np.nanmin(loss) / loss[0]:.3f} "
              f"diverged={bool(run.diverged)}", flush=True)  # fmt: skip
    return state


def round_main(doc: str, tasks: dict, folder: str, fetch: Callable[[], None]) -> None:
    """The command line of a fresh round's script: ``--fetch`` (its data), ``--real`` (the
    real runs of ``tasks``' whole grid into ``OUT / folder``, ``--task``, ``--cell``),
    ``--threads``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--fetch", action="store_true", help="download and unpack the data")
    ap.add_argument("--real", action="store_true", help="the real runs of the whole grid")
    ap.add_argument("--task", nargs="*", choices=sorted(tasks), help="only these tasks")
    ap.add_argument("--cell", nargs="*", help="only these cells (holdout._key)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")),
                    help="torch threads (default: $THREADS or 1)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fetch:
        fetch()
    if args.real:
        for name in args.task or tasks:
            real_task(name, args.cell, tasks=tasks, folder=folder)


def main() -> None:
    round_main(__doc__, TASKS, "fresh", fetch)


if __name__ == "__main__":
    main()

"""A tenth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), the fourth at 64 px (z a 2 x 2 map, [320, 2, 2]), the first since the exact top
became the command line's default. Two image tasks on data no round used, and the real
fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task: full batch and
B = 32), nothing else. Modelled on ``twolayer_fresh9.py``; uses ``twolayer_fresh.py``'s
helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh10.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh10.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh10.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh10.md).

**Tasks** (64 px; data from Debian packages no round used, fetched by ``--fetch`` with
apt-get download + dpkg -x, no root needed; every picture composited on white at a random
size, 36-60 px for its longer side, and a random offset on a 64-px canvas
(``twolayer_fresh._place``), which is the input; pictures whose visible part is under
24 px on its longer side, links and duplicates dropped; classes balanced, each sample a
different source picture):

- ``crossfire-lite0``: which folder of the Crossfire game's archetypes
  (``crossfire-common``: ``usr/share/games/crossfire/crossfire.0``, every face as a PNG
  after an ``IMAGE <bytes> <path>`` line) an item's picture comes from: ``arch/weapon``,
  ``arch/armour`` or ``arch/misc`` (containers, keys, tools...; 3 classes). ``--fetch``
  writes one PNG per object (its first face in name order: the animation frames of one
  object are one picture). EfficientNet-Lite0.
- ``crossmap-lite1``: the same file's map tiles: ``arch/wall``, ``arch/construct``
  (buildings, towers, bridges...) or ``arch/ground`` (3 classes), one PNG per object as
  above. EfficientNet-Lite1.

N = 120 each (40 a class). Looked at and not used: food (``arch/food`` and ``arch/flesh``:
27 pictures of 24 px or more), Linux Mint's Mint-Y icons (``mint-y-icons``: 30 categories
icons of 48 px, too few for a third class), gnome-icon-theme-nuovo and
gnome-icon-theme-gartoon (no PNGs), faba-icon-theme (PNGs of mimetypes only),
gcompris-qt-data (its pictures packed in Qt resource files). Both tasks come from one
package: two different sets of pictures (items, map tiles), no picture in both.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh10/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh10"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh10.py"
DATA = tf.CACHE / "twolayer_fresh10"
ROOT = DATA / "root"
PACKAGES = ("crossfire-common",)
FACES_FILE = ROOT / "usr/share/games/crossfire/crossfire.0"
FACES = DATA / "faces"  # one PNG per object: FACES / <class> / <object>.png
ITEM_CLASSES = ("weapon", "armour", "misc")  # arch/<folder>
TILE_CLASSES = ("wall", "construct", "ground")
SIZE = 64  # px, the model's input


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root), then
    write the Crossfire faces of ``ITEM_CLASSES`` and ``TILE_CLASSES`` (:func:`cut_faces`)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (FACES_FILE,), "twolayer_fresh10")
    cut_faces()


def cut_faces() -> None:
    """``crossfire.0`` (``IMAGE <bytes> ./arch/<folder>/.../<object>.<frame>`` then the
    PNG's bytes, face after face) cut into ``FACES / <folder>``: one PNG per object of the
    folders of ``ITEM_CLASSES`` and ``TILE_CLASSES``, its first face in name order."""
    if FACES.exists():
        return
    raw = _need(FACES_FILE).read_bytes()
    first: dict[tuple[str, str], tuple[str, bytes]] = {}
    at = 0
    while at < len(raw):
        end = raw.index(b"\n", at)
        word, size, path = raw[at:end].decode().split(" ", 2)
        assert word == "IMAGE", f"crossfire.0: unexpected header {raw[at:end]!r}"
        png, at = raw[end + 1:end + 1 + int(size)], end + 1 + int(size)
        parts = path.split("/")  # ['.', 'arch', <folder>, ..., '<object>.<frame>']
        if len(parts) < 4 or parts[1] != "arch":
            continue
        cls = parts[2]
        if cls not in ITEM_CLASSES + TILE_CLASSES:
            continue
        key = (cls, "/".join(parts[2:-1]) + "/" + parts[-1].split(".")[0])
        if key not in first or parts[-1] < first[key][0]:
            first[key] = (parts[-1], png)
    part = FACES.with_name("faces.part")
    for (cls, obj), (_, png) in first.items():
        (part / cls).mkdir(parents=True, exist_ok=True)
        (part / cls / (obj.replace("/", "_") + ".png")).write_bytes(png)
    part.rename(FACES)  # complete or absent: an interrupted cut starts again


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh10.py", COMMAND)


item_pools = tf.folder_pools(FACES, ITEM_CLASSES, _need)
tile_pools = tf.folder_pools(FACES, TILE_CLASSES, _need)


TASKS = {
    "crossfire-lite0": dict(kind="image", net="lite0", num_samples=120, image_size=SIZE,
                            projection=4096, num_classes=len(ITEM_CLASSES),
                            images=tf.pictures(item_pools)),
    "crossmap-lite1": dict(kind="image", net="lite1", num_samples=120, image_size=SIZE,
                           projection=4096, num_classes=len(TILE_CLASSES),
                           images=tf.pictures(tile_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

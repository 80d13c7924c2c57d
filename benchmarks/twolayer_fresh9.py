"""A ninth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), the third at 64 px (z a 2 x 2 map, [320, 2, 2]). Two image tasks on data no
round used, and the real fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells
a task: full batch and B = 32), nothing else. Modelled on ``twolayer_fresh8.py``; uses
``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh9.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh9.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh9.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh9.md).

**Tasks** (64 px; data from Debian packages no round used, fetched by ``--fetch`` with
apt-get download + dpkg -x, no root needed; every picture composited on white at a random
size, 36-60 px for its longer side, and a random offset on a 64-px canvas
(``twolayer_fresh._place``), which is the input; pictures whose visible part is under
24 px on its longer side, links and duplicates dropped; classes balanced, each sample a
different source picture):

- ``crawl-lite1``: which sheet of Dungeon Crawl Stone Soup's tiles (``crawl-tiles-data``,
  ``usr/share/crawl/dat/tiles/{floor,wall,feat}.png``, sheets on a 32-px grid) a 32 x 32
  tile comes from: floor, wall or dungeon feature (doors, stairs, altars, fountains...;
  3 classes). ``--fetch`` cuts the sheets into one PNG per tile that has any visible
  pixel. EfficientNet-Lite1.
- ``yaru-lite0``: which folder of Ubuntu's Yaru icon theme (``yaru-theme-icon``,
  ``usr/share/icons/Yaru/48x48/<folder>``, the 48x48 PNGs; links dropped) an icon comes
  from: actions, apps or mimetypes (3 classes). EfficientNet-Lite0.

N = 120 each (40 a class). No third task: the other unused packages looked at
(hedgewars-data, lincity-ng-data, lxde-icon-theme, suru-icon-theme, freedink-data,
extremetuxracer-data, neverball-data) have too few pictures of 24 px or more per class,
or animation frames of one picture; oxygen-icon-theme and wesnoth-1.16-data were used by
the first and third rounds.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh9/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh9"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh9.py"
DATA = tf.CACHE / "twolayer_fresh9"
ROOT = DATA / "root"
PACKAGES = ("crawl-tiles-data", "yaru-theme-icon")
SHEETS = ROOT / "usr/share/crawl/dat/tiles"
SHEET_CLASSES = ("floor", "wall", "feat")
TILES = DATA / "tiles"  # the sheets cut into tiles: TILES / <sheet> / <row>-<col>.png
TILE = 32  # px, the sheets' grid
YARU = ROOT / "usr/share/icons/Yaru/48x48"
YARU_CLASSES = ("actions", "apps", "mimetypes")
SIZE = 64  # px, the model's input


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root), then
    cut the tile sheets (:func:`cut_sheets`)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (SHEETS, YARU), "twolayer_fresh9")
    cut_sheets()


def cut_sheets() -> None:
    """Each sheet of ``SHEET_CLASSES`` cut on its 32-px grid into ``TILES / <sheet>``, one
    PNG per tile with a visible pixel (the rounds' ``keep`` then drops small ones)."""
    import numpy as np
    from PIL import Image

    for sheet in SHEET_CLASSES:
        out = TILES / sheet
        if out.exists():
            continue
        img = Image.open(_need(SHEETS / f"{sheet}.png")).convert("RGBA")
        part = out.with_name(f"{sheet}.part")
        part.mkdir(parents=True, exist_ok=True)
        w, h = img.size
        for r in range(h // TILE):
            for c in range(w // TILE):
                tile = img.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
                if np.asarray(tile.getchannel("A")).any():
                    tile.save(part / f"{r:03d}-{c:03d}.png")
        part.rename(out)  # complete or absent: an interrupted cut starts again


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh9.py", COMMAND)


tile_pools = tf.folder_pools(TILES, SHEET_CLASSES, _need)
yaru_pools = tf.folder_pools(YARU, YARU_CLASSES, _need)


TASKS = {
    "crawl-lite1": dict(kind="image", net="lite1", num_samples=120, image_size=SIZE,
                        projection=4096, num_classes=len(SHEET_CLASSES),
                        images=tf.pictures(tile_pools)),
    "yaru-lite0": dict(kind="image", net="lite0", num_samples=120, image_size=SIZE,
                       projection=4096, num_classes=len(YARU_CLASSES),
                       images=tf.pictures(yaru_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

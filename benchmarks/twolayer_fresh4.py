"""A fourth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): three more image tasks on data no round used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on ``twolayer_fresh3.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh4.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh4.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh4.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring.

**Tasks** (N = 128 at 32 px, as the image development tasks; data from Debian packages no
round used, fetched by ``--fetch`` with apt-get download + dpkg -x, no root needed; every
picture an RGBA drawing composited on white at a random size, 36-60 px for its longer side,
and a random offset on a 64-px canvas, then resized to 32 px (``twolayer_fresh._place``);
pictures whose visible part is under 24 px on its longer side, links and duplicates
dropped; classes balanced, each sample a different source picture):

- ``supertux-lite1``: which folder of SuperTux's sprites (``supertux-data``,
  ``usr/share/games/supertux2/images/<folder>`` and its subfolders; animation frames other
  than the first, a name ending in a number other than 0, dropped) a sprite comes from:
  creatures (the bad guys and Tux), objects (blocks, keys, bells, platforms, ...) or tiles
  (ground, walls, signs, decorations of the levels) (3 classes; 335, 146 and 184 sprites;
  a random horizontal flip), EfficientNet-Lite1;
- ``paper-lite0``: which folder of the Paper icon theme (``paper-icon-theme``,
  ``usr/share/icons/Paper/48x48/<folder>``, the 48x48 PNGs; many icons are byte-identical
  copies under other names, dropped) an icon comes from: apps, mimetypes, places or status
  (4 classes; 373, 45, 51 and 74 icons), EfficientNet-Lite0;
- ``freeorion-lite0``: which folder of FreeOrion's icons (``freeorion-data``,
  ``usr/share/games/freeorion/default/data/art/icons/<folder>``, the PNGs of the folder
  itself) an icon comes from: ship parts (``ship_parts``), buildings (``building``), ship
  hulls (``ship_hulls``) or space monsters (``monsters``) (4 classes; 103, 59, 40 and 34
  icons), EfficientNet-Lite0.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh4/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh import _distinct  # noqa: E402
from twolayer_fresh import keep as _keep  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh4"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh4.py"
DATA = tf.CACHE / "twolayer_fresh4"
ROOT = DATA / "root"
PACKAGES = ("supertux-data", "paper-icon-theme", "freeorion-data")
SUPERTUX = ROOT / "usr/share/games/supertux2/images"
SPRITE_CLASSES = ("creatures", "objects", "tiles")
PAPER = ROOT / "usr/share/icons/Paper/48x48"
PAPER_CLASSES = ("apps", "mimetypes", "places", "status")
ORION = ROOT / "usr/share/games/freeorion/default/data/art/icons"
ORION_CLASSES = ("ship_parts", "building", "ship_hulls", "monsters")


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (SUPERTUX, PAPER, ORION), "twolayer_fresh4")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh4.py", COMMAND)


def sprite_pools() -> list[list[Path]]:
    """Each folder's SuperTux sprites (``images/<folder>``, its subfolders too): animation
    frames other than the first (a name ending in a number other than 0) dropped."""
    seen: set = set()
    return [_distinct([p for p in (_need(SUPERTUX) / c).rglob("*.png")
                       if not re.search(r"[1-9]\d*$", p.stem) and _keep(p)], seen)
            for c in SPRITE_CLASSES]  # fmt: skip


def paper_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(PAPER) / c).glob("*.png") if _keep(p)], seen)
            for c in PAPER_CLASSES]  # fmt: skip


def orion_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(ORION) / c).glob("*.png") if _keep(p)], seen)
            for c in ORION_CLASSES]  # fmt: skip


TASKS = {
    "supertux-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                           projection=4096, num_classes=len(SPRITE_CLASSES),
                           images=tf.pictures(sprite_pools, flip=True)),
    "paper-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                        projection=4096, num_classes=len(PAPER_CLASSES),
                        images=tf.pictures(paper_pools)),
    "freeorion-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                            projection=4096, num_classes=len(ORION_CLASSES),
                            images=tf.pictures(orion_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

"""A third fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): three more image tasks on data no round used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on ``twolayer_fresh2.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh3.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh3.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh3.py --real --task NAME   # one task

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

- ``wesnoth-lite1``: which race a unit sprite of Battle for Wesnoth
  (``wesnoth-1.16-data``, ``usr/share/games/wesnoth/1.16/data/core/images/units/<folder>``;
  the poses without a number in their name: standing, weapon, defend, attack, no animation
  frames and no shadows) shows: elves (``elves-wood``), humans (``human-loyalists``,
  ``-magi``, ``-outlaws``, ``-peasants``), orcs (``orcs``, ``goblins``) or undead
  (``undead``, ``undead-necromancers``, ``-skeletal``) (4 classes; 96, 154, 69 and 224
  sprites), EfficientNet-Lite1;
- ``mate-lite0``: which folder of the MATE icon theme (``mate-icon-theme``,
  ``usr/share/icons/mate/48x48/<folder>``, the 48x48 PNGs) an icon comes from: actions,
  mimetypes or status (3 classes; 111, 66 and 106 icons), EfficientNet-Lite0;
- ``outfits-lite0``: the kind of an Endless Sky outfit (``endless-sky-data``, its
  thumbnail ``images/outfit/<name>.png``; the kind from the ``category`` of the outfits in
  ``data/**/*.txt`` that show it, thumbnails of more than one kind dropped) from its
  thumbnail: engines (``Engines``), power (``Power``) or weapons (``Guns``, ``Turrets``,
  ``Secondary Weapons``) (3 classes; 79, 53 and 64 thumbnails), EfficientNet-Lite0.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh3/<task>.json``, one cell at a time, resumable.
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
FOLDER = "fresh3"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh3.py"
DATA = tf.CACHE / "twolayer_fresh3"
ROOT = DATA / "root"
PACKAGES = ("wesnoth-1.16-data", "mate-icon-theme", "endless-sky-data")
UNITS = ROOT / "usr/share/games/wesnoth/1.16/data/core/images/units"
RACES = {"elves": ("elves-wood",),
         "humans": ("human-loyalists", "human-magi", "human-outlaws", "human-peasants"),
         "orcs": ("orcs", "goblins"),
         "undead": ("undead", "undead-necromancers", "undead-skeletal")}  # fmt: skip
ICONS = ROOT / "usr/share/icons/mate/48x48"
ICON_CLASSES = ("actions", "mimetypes", "status")
SKY = ROOT / "usr/share/games/endless-sky"
KINDS = {"engines": ("Engines",), "power": ("Power",),
         "weapons": ("Guns", "Turrets", "Secondary Weapons")}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (UNITS, ICONS, SKY / "data", SKY / "images/outfit"),
                  "twolayer_fresh3")  # fmt: skip


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh3.py", COMMAND)


def unit_pools() -> list[list[Path]]:
    """Each race's unit sprites: the poses whose name has no number (no animation frames)
    and no shadow."""
    seen: set = set()
    return [_distinct([p for d in dirs for p in (_need(UNITS) / d).rglob("*.png")
                       if not re.search(r"\d|shadow", p.stem) and _keep(p)], seen)
            for dirs in RACES.values()]  # fmt: skip


def icon_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(ICONS) / c).glob("*.png") if _keep(p)], seen)
            for c in ICON_CLASSES]  # fmt: skip


def _outfit_categories() -> dict[str, set[str]]:
    """Each outfit thumbnail (``outfit/<name>``) and the categories of the outfits that show
    it, from Endless Sky's data files."""
    found: dict[str, set[str]] = {}
    for f in sorted((_need(SKY) / "data").rglob("*.txt")):
        block: dict[str, str] | None = None
        for line in f.read_text(encoding="utf-8").splitlines() + ["end"]:
            if not line.strip():
                continue
            if line[:1] not in (" ", "\t"):  # a top-level line closes the block
                if block and "category" in block and "thumbnail" in block:
                    found.setdefault(block["thumbnail"], set()).add(block["category"])
                block = {} if re.match(r"outfit\s", line) else None
            elif block is not None:
                m = re.match(r'\s+(category|thumbnail)\s+"?([^"]+?)"?\s*$', line)
                if m and m.group(1) not in block:
                    block[m.group(1)] = m.group(2)
    return found


def outfit_pools() -> list[list[Path]]:
    """Each kind's outfit thumbnails; a thumbnail of outfits of more than one kind dropped."""
    kind_of = {c: k for k, cats in KINDS.items() for c in cats}
    files: dict[str, list[Path]] = {k: [] for k in KINDS}
    for thumb, cats in _outfit_categories().items():
        kinds = {kind_of.get(c) for c in cats}
        path = SKY / "images" / f"{thumb}.png"
        if len(kinds) == 1 and None not in kinds and path.exists() and _keep(path):
            files[kinds.pop()].append(path)
    seen: set = set()
    return [_distinct(files[k], seen) for k in KINDS]


TASKS = {
    "wesnoth-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(RACES),
                          images=tf.pictures(unit_pools, flip=True)),
    "mate-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                       projection=4096, num_classes=len(ICON_CLASSES),
                       images=tf.pictures(icon_pools)),
    "outfits-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(KINDS),
                          images=tf.pictures(outfit_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

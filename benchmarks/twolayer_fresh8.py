"""An eighth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), the second at 64 px (z a 2 x 2 map, [320, 2, 2]). Three image tasks on data no
round used, and the real fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells
a task: full batch and B = 32), nothing else. Modelled on ``twolayer_fresh7.py``; uses
``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh8.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh8.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh8.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh8.md).

**Tasks** (64 px; data from Debian packages no round used, fetched by ``--fetch`` with
apt-get download + dpkg -x, no root needed; every picture composited on white at a random
size, 36-60 px for its longer side, and a random offset on a 64-px canvas
(``twolayer_fresh._place``), which is the input; pictures whose visible part is under
24 px on its longer side, links and duplicates dropped; classes balanced, each sample a
different source picture):

- ``megaglest-lite1``: which faction of the strategy game MegaGlest (``megaglest-data``,
  ``techs/megapack/factions/<faction>/{units,upgrades}/*/images``: the units' and
  upgrades' 64 x 64 command icons) an icon belongs to: magic, norsemen, persian or romans
  (4 classes; icons that two factions share, such as the move and stop commands, are kept
  in the first only). EfficientNet-Lite1.
- ``freedroid-lite0``: whether an item of the role-playing game FreedroidRPG
  (``freedroidrpg-data``, ``graphics/items``, each item's inventory picture
  ``inv_image*.png``) is a weapon (``items/weapons``) or any other item (add-ons, armour,
  potions, books, tools...; 2 classes). EfficientNet-Lite0.
- ``tango-lite0``: which folder of the Tango icon theme (``tango-icon-theme``,
  ``usr/share/icons/Tango/32x32/<folder>``, the 32x32 PNGs; links dropped) an icon comes
  from: actions, apps or status (3 classes). EfficientNet-Lite0.

N = 128 (megaglest), 106 (freedroid: 53 weapons) and 84 (tango: 28 apps), balanced.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh8/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh import _distinct  # noqa: E402
from twolayer_fresh import keep as _keep  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh8"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh8.py"
DATA = tf.CACHE / "twolayer_fresh8"
ROOT = DATA / "root"
PACKAGES = ("megaglest-data", "freedroidrpg-data", "tango-icon-theme")
FACTIONS_DIR = ROOT / "usr/share/games/megaglest/techs/megapack/factions"
FACTIONS = ("magic", "norsemen", "persian", "romans")
ITEMS = ROOT / "usr/share/freedroidrpg/data/graphics/items"
TANGO = ROOT / "usr/share/icons/Tango/32x32"
TANGO_CLASSES = ("actions", "apps", "status")
SIZE = 64  # px, the model's input
PICTURE = (".png", ".bmp")


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (FACTIONS_DIR, ITEMS, TANGO), "twolayer_fresh8")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh8.py", COMMAND)


def faction_pools() -> list[list[Path]]:
    """Per faction, the distinct icons kept (``_keep``) of its units and upgrades."""
    seen: set = set()
    root = _need(FACTIONS_DIR)
    return [_distinct([p for kind in ("units", "upgrades")
                       for p in (root / f / kind).glob("*/images/*")
                       if p.suffix.lower() in PICTURE and _keep(p)], seen)
            for f in FACTIONS]  # fmt: skip


def item_pools() -> list[list[Path]]:
    """Weapons' and the other items' distinct inventory pictures (kept: ``_keep``)."""
    seen: set = set()
    every = [p for p in _need(ITEMS).rglob("inv_image*.png") if _keep(p)]
    weapons = ITEMS / "weapons"
    return [_distinct([p for p in every if p.is_relative_to(weapons)], seen),
            _distinct([p for p in every if not p.is_relative_to(weapons)], seen)]


tango_pools = tf.folder_pools(TANGO, TANGO_CLASSES, _need)


TASKS = {
    "megaglest-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=SIZE,
                            projection=4096, num_classes=len(FACTIONS),
                            images=tf.pictures(faction_pools)),
    "freedroid-lite0": dict(kind="image", net="lite0", num_samples=106, image_size=SIZE,
                            projection=4096, num_classes=2, images=tf.pictures(item_pools)),
    "tango-lite0": dict(kind="image", net="lite0", num_samples=84, image_size=SIZE,
                        projection=4096, num_classes=len(TANGO_CLASSES),
                        images=tf.pictures(tango_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

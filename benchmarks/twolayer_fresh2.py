"""A second fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): three more image tasks on data no round used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on ``twolayer_fresh.py``, whose helpers and real runs it uses.

    .venv/bin/python benchmarks/twolayer_fresh2.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh2.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh2.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring.

**Tasks** (N = 128 at 32 px, as the image development tasks; data from Debian packages no
round used, fetched by ``--fetch`` with apt-get download + dpkg -x, no root needed; every
picture an RGBA drawing composited on white at a random size, 36-60 px for its longer side,
and a random offset on a 64-px canvas, then resized to 32 px (``twolayer_fresh._place``; the
flags, opaque, are composited the same way); classes balanced, each sample a different
source picture):

- ``animals-lite0``: which kind of animal a drawing of the Open Clip Art Library
  (``openclipart-png``, ``usr/share/openclipart/png/animals``; the PNGs, black-and-white
  ``_bw`` variants, links and duplicates dropped) shows: birds, bugs or mammals (3
  classes; 50, 49 and 110 drawings; a random horizontal flip), EfficientNet-Lite0;
- ``pingus-lite0``: which theme a ground piece of Pingus (``pingus-data``,
  ``usr/share/games/pingus/data/images/groundpieces/<kind>/<theme>``, the PNGs of every
  kind: ground, solid, transparent, ...; pieces whose visible part is under 24 px on its
  longer side and duplicates dropped) belongs to: desert, foliage, industrial, snow,
  sweets or xmas (6 classes; 34, 24, 44, 38, 30 and 29 pieces), EfficientNet-Lite0;
- ``flags-lite1``: the continent group of a Freeciv nation (``freeciv-data``, the nation
  rulesets ``usr/share/games/freeciv/nation/*.ruleset`` whose ``groups`` name exactly one
  of African, American, Asian and European) from its flag (``flags/<flag>-large.png``,
  44x30 or less, opaque; a flag two nations share counted once): African, American, Asian
  or European (4 classes; 89, 96, 118 and 190 flags), EfficientNet-Lite1.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh2/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh import _distinct  # noqa: E402
from twolayer_fresh import visible as _visible  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh2"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh2.py"
DATA = tf.CACHE / "twolayer_fresh2"
ROOT = DATA / "root"
PACKAGES = ("openclipart-png", "pingus-data", "freeciv-data")
CLIPART = ROOT / "usr/share/openclipart/png/animals"
ANIMAL_CLASSES = ("birds", "bugs", "mammals")
PIECES = ROOT / "usr/share/games/pingus/data/images/groundpieces"
PIECE_CLASSES = ("desert", "foliage", "industrial", "snow", "sweets", "xmas")
PIECE_MIN = 24  # px, the visible part's longer side
FREECIV = ROOT / "usr/share/games/freeciv"
CONTINENTS = ("African", "American", "Asian", "European")


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (CLIPART, PIECES, FREECIV / "nation"),
                  "twolayer_fresh2")  # fmt: skip


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh2.py", COMMAND)


def animal_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(CLIPART) / c).rglob("*.png")
                       if not p.is_symlink() and not p.stem.endswith("_bw")], seen)
            for c in ANIMAL_CLASSES]  # fmt: skip


def piece_pools() -> list[list[Path]]:
    """Each theme's ground pieces, of every kind (ground, solid, transparent, ...)."""
    seen: set = set()
    return [_distinct([p for p in _need(PIECES).glob(f"*/{c}/**/*.png")
                       if not p.is_symlink() and _visible(p) >= PIECE_MIN], seen)
            for c in PIECE_CLASSES]  # fmt: skip


def flag_pools() -> list[list[Path]]:
    """The large flag of each nation whose ``groups`` name exactly one continent."""
    files: dict[str, list[Path]] = {c: [] for c in CONTINENTS}
    for f in sorted((_need(FREECIV) / "nation").glob("*.ruleset")):
        text = f.read_text(encoding="utf-8")
        groups = re.search(r"^groups\s*=\s*(.*)$", text, re.M)
        flag = re.search(r'^flag\s*=\s*"([^"]+)"', text, re.M)
        if groups is None or flag is None:
            continue
        cont = set(re.findall(r'"([^"]*)"', groups.group(1))) & set(CONTINENTS)
        path = FREECIV / "flags" / f"{flag.group(1)}-large.png"
        if len(cont) == 1 and path.exists():
            files[cont.pop()].append(path)
    seen: set = set()
    return [_distinct(files[c], seen) for c in CONTINENTS]


TASKS = {
    "animals-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(ANIMAL_CLASSES),
                          images=tf.pictures(animal_pools, flip=True)),
    "pingus-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                         projection=4096, num_classes=len(PIECE_CLASSES),
                         images=tf.pictures(piece_pools)),
    "flags-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                        projection=4096, num_classes=len(CONTINENTS),
                        images=tf.pictures(flag_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

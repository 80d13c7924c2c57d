"""A seventh fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), the first at 64 px: the body's output z is a 2 x 2 map ([320, 2, 2]), where
every round before had one position (32 px). Three image tasks on data no round used, and
the real fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task: full
batch and B = 32), nothing else. Modelled on ``twolayer_fresh6.py``; uses
``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh7.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh7.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh7.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh7.md).

**Tasks** (64 px, the default example's size; N = 128, or 114 where a class has fewer
pictures; data from Debian packages no round used, fetched by ``--fetch`` with apt-get
download + dpkg -x, no root needed; every picture an RGBA drawing composited on white at a
random size, 36-60 px for its longer side, and a random offset on a 64-px canvas
(``twolayer_fresh._place``), which is the input; pictures whose visible part is under
24 px on its longer side, links and duplicates dropped; classes balanced, each sample a
different source picture):

- ``widelands-lite0``: which tribe of the strategy game Widelands (``widelands-data``,
  ``data/tribes/buildings/<kind>/<tribe>/<building>``) a building belongs to: atlanteans,
  barbarians, empire or frisians (4 classes; 41, 50, 51 and 56 buildings). The picture is
  the first frame of the building's idle animation at scale 1 (``idle_1.png``, cropped to
  its first frame where ``init.lua`` makes it a sprite sheet, else ``idle_00.png``);
  ``--fetch`` copies the frames into ``<cache>/twolayer_fresh7/buildings/<tribe>``; a
  random horizontal flip. EfficientNet-Lite0.
- ``gnome-lite1``: which folder of the GNOME 3.12 icon theme (``gnome-icon-theme``,
  ``usr/share/icons/gnome/48x48/<folder>``, the 48x48 PNGs; links dropped) an icon comes
  from: actions, devices or status (3 classes; 116, 38 and 83 icons; N = 114, 38 a
  class). EfficientNet-Lite1.
- ``moka-lite0``: which folder of the Moka icon theme (``moka-icon-theme``,
  ``usr/share/icons/Moka/48x48/<folder>``, the 48x48 PNGs; links dropped) an icon comes
  from: apps or web (2 classes; 605 and 109 icons). EfficientNet-Lite0.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh7/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh7"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh7.py"
DATA = tf.CACHE / "twolayer_fresh7"
ROOT = DATA / "root"
PACKAGES = ("widelands-data", "gnome-icon-theme", "moka-icon-theme")
TRIBES_DIR = ROOT / "usr/share/games/widelands/data/tribes/buildings"
BUILDINGS = DATA / "buildings"  # the buildings' first idle frames, one folder a tribe
TRIBES = ("atlanteans", "barbarians", "empire", "frisians")
GNOME = ROOT / "usr/share/icons/gnome/48x48"
GNOME_CLASSES = ("actions", "devices", "status")
MOKA = ROOT / "usr/share/icons/Moka/48x48"
MOKA_CLASSES = ("apps", "web")
SIZE = 64  # px, the model's input


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root), and
    copy each Widelands building's first idle frame out (``_extract_buildings``)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (TRIBES_DIR, GNOME, MOKA), "twolayer_fresh7")
    _extract_buildings()


def _sheet(init_lua: str) -> tuple[int, int]:
    """``(columns, rows)`` of the idle animation's sprite sheet in a building's
    ``init.lua`` (``(1, 1)`` where the idle animation is a plain picture)."""
    sheets = init_lua.split("spritesheets", 1)
    if len(sheets) < 2:
        return 1, 1
    m = re.search(r"\bidle\s*=\s*\{", sheets[1])
    if m is None:
        return 1, 1
    depth, end = 1, m.end()
    while depth:  # the idle entry up to its closing brace (its hotspot nests one)
        depth += {"{": 1, "}": -1}.get(sheets[1][end], 0)
        end += 1
    block = sheets[1][m.end():end]
    cols = re.search(r"columns\s*=\s*(\d+)", block)
    rows = re.search(r"rows\s*=\s*(\d+)", block)
    return (int(cols.group(1)) if cols else 1), (int(rows.group(1)) if rows else 1)


def _extract_buildings() -> None:
    """Each building's first idle frame (scale 1) of every tribe into
    ``BUILDINGS / <tribe> / <kind>-<building>.png``."""
    from PIL import Image

    done = BUILDINGS / ".done"
    if done.exists():
        print(f"twolayer_fresh7: building frames already in {BUILDINGS}")
        return
    for tribe in TRIBES:
        for d in sorted(_need(TRIBES_DIR).glob(f"*/{tribe}/*/")):
            sheet, plain = d / "idle_1.png", d / "idle_00.png"
            src = sheet if sheet.exists() else plain
            if not src.exists():
                continue
            img = Image.open(src).convert("RGBA")
            if src == sheet:
                cols, rows = _sheet((d / "init.lua").read_text(encoding="utf-8"))
                img = img.crop((0, 0, img.width // cols, img.height // rows))
            out = BUILDINGS / tribe / f"{d.parent.parent.name}-{d.name}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out)
    done.touch()
    print(f"twolayer_fresh7: building frames copied into {BUILDINGS}")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh7.py", COMMAND)


building_pools = tf.folder_pools(BUILDINGS, TRIBES, _need)
gnome_pools = tf.folder_pools(GNOME, GNOME_CLASSES, _need)
moka_pools = tf.folder_pools(MOKA, MOKA_CLASSES, _need)


TASKS = {
    "widelands-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=SIZE,
                            projection=4096, num_classes=len(TRIBES),
                            images=tf.pictures(building_pools, flip=True)),
    "gnome-lite1": dict(kind="image", net="lite1", num_samples=114, image_size=SIZE,
                        projection=4096, num_classes=len(GNOME_CLASSES),
                        images=tf.pictures(gnome_pools)),
    "moka-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=SIZE,
                       projection=4096, num_classes=len(MOKA_CLASSES),
                       images=tf.pictures(moka_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

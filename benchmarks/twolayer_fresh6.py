"""A sixth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): three more image tasks on data no round used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on ``twolayer_fresh5.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh6.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh6.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh6.py --real --task NAME   # one task

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

- ``sweethome-lite1``: which room a piece of furniture of Sweet Home 3D's extra catalogs
  (``sweethome3d-furniture``, ``usr/share/sweethome3d/furniture/*.sh3f``: zip files whose
  ``PluginFurnitureCatalog.properties`` gives each piece's category and icon; ``--fetch``
  copies the icons, 128x128 PNG renders on a transparent background, out into
  ``<cache>/twolayer_fresh6/furniture/<category>``) belongs to: bathroom, bedroom, kitchen
  or living room (``living_room``) (4 classes; 50, 72, 127 and 147 pieces; a random
  horizontal flip), EfficientNet-Lite1;
- ``elementary-lite0``: which folder of the elementary Xfce icon theme
  (``elementary-xfce-icon-theme``, ``usr/share/icons/elementary-xfce/<folder>/48``, the
  48x48 PNGs; most are links, dropped) an icon comes from: actions, apps, categories,
  devices or mimes (5 classes; 112, 128, 52, 67 and 131 icons), EfficientNet-Lite0;
- ``ukui-lite0``: which folder of UKUI's classical icon theme (``ukui-themes``,
  ``usr/share/icons/ukui-classical/48x48/<folder>``, the 48x48 PNGs) an icon comes from:
  apps, devices, mimetypes or places (4 classes; 225, 51, 152 and 35 icons),
  EfficientNet-Lite0.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh6/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh import _distinct  # noqa: E402
from twolayer_fresh import keep as _keep  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh6"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh6.py"
DATA = tf.CACHE / "twolayer_fresh6"
ROOT = DATA / "root"
PACKAGES = ("sweethome3d-furniture", "elementary-xfce-icon-theme", "ukui-themes")
CATALOGS = ROOT / "usr/share/sweethome3d/furniture"
FURNITURE = DATA / "furniture"  # the catalogs' icons, one folder a category (``fetch``)
FURNITURE_CLASSES = ("bathroom", "bedroom", "kitchen", "living_room")
ELEMENTARY = ROOT / "usr/share/icons/elementary-xfce"
ELEMENTARY_CLASSES = ("actions", "apps", "categories", "devices", "mimes")
UKUI = ROOT / "usr/share/icons/ukui-classical/48x48"
UKUI_CLASSES = ("apps", "devices", "mimetypes", "places")


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root), and
    copy the furniture catalogs' icons out of their zip files (``_extract_furniture``)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (CATALOGS, ELEMENTARY, UKUI), "twolayer_fresh6")
    _extract_furniture()


def _extract_furniture() -> None:
    """Each piece's icon of every Sweet Home 3D catalog (``*.sh3f``, a zip file) into
    ``FURNITURE / <category> / <catalog>-<icon>.png``, the category as the catalog's
    ``PluginFurnitureCatalog.properties`` names it (English), lower case, spaces as ``_``."""
    import zipfile

    done = FURNITURE / ".done"
    if done.exists():
        print(f"twolayer_fresh6: furniture icons already in {FURNITURE}")
        return
    for catalog in sorted(_need(CATALOGS).glob("*.sh3f")):
        with zipfile.ZipFile(catalog) as z:
            text = z.read("PluginFurnitureCatalog.properties").decode("latin-1")
            keys = dict(re.findall(r"^(\w+#\d+)\s*=\s*(.*?)\s*$", text, re.M))
            for key, icon in keys.items():
                if not key.startswith("icon#"):
                    continue
                category = keys[f"category#{key[5:]}"].lower().replace(" ", "_")
                out = FURNITURE / category / f"{catalog.stem}-{Path(icon).name}"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(icon.lstrip("/")))
    done.touch()
    print(f"twolayer_fresh6: furniture icons copied into {FURNITURE}")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh6.py", COMMAND)


def _pools(root: Path, classes: tuple[str, ...], sub: str = "") -> Callable:
    """The pools of a task: per class, the distinct pictures kept (``_keep``) of the PNGs in
    ``root / <class> / sub``, each picture in one class only."""

    def pools() -> list[list[Path]]:
        seen: set = set()
        return [_distinct([p for p in (_need(root) / c / sub).glob("*.png") if _keep(p)], seen)
                for c in classes]  # fmt: skip

    return pools


furniture_pools = _pools(FURNITURE, FURNITURE_CLASSES)
elementary_pools = _pools(ELEMENTARY, ELEMENTARY_CLASSES, "48")
ukui_pools = _pools(UKUI, UKUI_CLASSES)


TASKS = {
    "sweethome-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                            projection=4096, num_classes=len(FURNITURE_CLASSES),
                            images=tf.pictures(furniture_pools, flip=True)),
    "elementary-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                             projection=4096, num_classes=len(ELEMENTARY_CLASSES),
                             images=tf.pictures(elementary_pools)),
    "ukui-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                       projection=4096, num_classes=len(UKUI_CLASSES),
                       images=tf.pictures(ukui_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

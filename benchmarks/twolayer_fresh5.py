"""A fifth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): three more image tasks on data no round used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on ``twolayer_fresh4.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh5.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh5.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh5.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring.

**Tasks** (N = 128 at 32 px, as the image development tasks; data from Debian packages no
round used, fetched by ``--fetch`` with apt-get download + dpkg -x, no root needed; every
picture an RGBA drawing composited on white at a random size, 36-60 px for its longer side,
and a random offset on a 64-px canvas, then resized to 32 px (``twolayer_fresh._place``; the
Art4Apps drawings, opaque JPEGs on white, are composited the same way); pictures whose
visible part is under 24 px on its longer side, links and duplicates dropped; classes
balanced, each sample a different source picture):

- ``scratch-lite1``: which category of Scratch 1.4's costume library (``scratch``,
  ``usr/share/scratch/Media/Costumes/<folder>``, the PNGs and GIFs; a sprite's costumes
  other than its first, a name ending in ``-b``, ``-c``, ... or ``-2``, ``-3``, ...,
  dropped) a costume comes from: animals, fantasy, people or things (4 classes; 52, 38, 79
  and 37 costumes; a random horizontal flip), EfficientNet-Lite1;
- ``faenza-lite0``: which folder of the Faenza icon theme (``faenza-icon-theme``,
  ``usr/share/icons/Faenza/<folder>/48``, the 48x48 PNGs; most are links, dropped) an icon
  comes from: actions, apps, devices, mimetypes or status (5 classes; 135, 293, 38, 89 and
  76 icons), EfficientNet-Lite0;
- ``art4apps-lite0``: which category of the Art4Apps drawings shipped with pySioGame
  (``pysiogame``, ``usr/share/games/pysiogame/res/images/art4apps/<folder>``, 200x200
  JPEGs) a drawing comes from: animals, clothes and accessories (``clothes_n_accessories``),
  food or jobs (4 classes; 128, 45, 56 and 55 drawings), EfficientNet-Lite0.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh5/<task>.json``, one cell at a time, resumable.
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
FOLDER = "fresh5"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh5.py"
DATA = tf.CACHE / "twolayer_fresh5"
ROOT = DATA / "root"
PACKAGES = ("scratch", "faenza-icon-theme", "pysiogame")
COSTUMES = ROOT / "usr/share/scratch/Media/Costumes"
COSTUME_CLASSES = ("Animals", "Fantasy", "People", "Things")
FAENZA = ROOT / "usr/share/icons/Faenza"
FAENZA_CLASSES = ("actions", "apps", "devices", "mimetypes", "status")
ART = ROOT / "usr/share/games/pysiogame/res/images/art4apps"
ART_CLASSES = ("animals", "clothes_n_accessories", "food", "jobs")


# ---------------------------------------------------------------------------------------
# The fresh data.
# ---------------------------------------------------------------------------------------


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (COSTUMES, FAENZA, ART), "twolayer_fresh5")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh5.py", COMMAND)


def costume_pools() -> list[list[Path]]:
    """Each category's Scratch costumes (PNG and GIF): a sprite's costumes other than its
    first (a name ending in ``-b``, ``-c``, ... or ``-2``, ``-3``, ...) dropped."""
    seen: set = set()
    return [_distinct([p for p in (_need(COSTUMES) / c).iterdir()
                       if p.suffix in (".png", ".gif")
                       and not re.search(r"-([b-z]|[2-9])$", p.stem) and _keep(p)], seen)
            for c in COSTUME_CLASSES]  # fmt: skip


def faenza_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(FAENZA) / c / "48").glob("*.png") if _keep(p)], seen)
            for c in FAENZA_CLASSES]  # fmt: skip


def art_pools() -> list[list[Path]]:
    seen: set = set()
    return [_distinct([p for p in (_need(ART) / c).glob("*.jpg") if _keep(p)], seen)
            for c in ART_CLASSES]  # fmt: skip


TASKS = {
    "scratch-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(COSTUME_CLASSES),
                          images=tf.pictures(costume_pools, flip=True)),
    "faenza-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                         projection=4096, num_classes=len(FAENZA_CLASSES),
                         images=tf.pictures(faenza_pools)),
    "art4apps-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                           projection=4096, num_classes=len(ART_CLASSES),
                           images=tf.pictures(art_pools)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The real runs.
# ---------------------------------------------------------------------------------------


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

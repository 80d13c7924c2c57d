"""An eleventh fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), the first at 32 px since the sixth: two image tasks on data no round used, and
the real fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task: full
batch and B = 32), nothing else. Modelled on ``twolayer_fresh6.py``; uses
``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh11.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh11.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh11.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh11.md).

**Tasks** (N = 128 at 32 px, as the image development tasks; every picture an RGBA drawing
composited on white at a random size, 36-60 px for its longer side, and a random offset on
a 64-px canvas, then resized to 32 px (``twolayer_fresh._place``); classes balanced, each
sample a different source picture):

- ``stamps2-lite0``: which of Tux Paint's stamp folders (``tuxpaint-stamps-default``,
  ``usr/share/tuxpaint/stamps/<folder>``, every PNG below it, ``*_mirror`` left out, as
  ``twolayer_fresh.stamp_pools``) a stamp comes from: household, plants, seasonal or symbols
  (4 classes; 34, 39, 63 and 238 stamps). The first round's ``stamps-lite1`` used four
  other folders of the same package (animals, food, town, vehicles): no picture is in both,
  but the style is one artist collection's. EfficientNet-Lite0.
- ``scripts-lite1``: which script a letter is written in: Greek, Cyrillic, Armenian or
  Georgian (4 classes; the letters of Unicode's basic blocks, capital and small: 49, 64, 76
  and 33), each picture one letter in one of the 21 text faces of the DejaVu families
  (``fonts-dejavu-core``, ``fonts-dejavu-extra``: Sans, Serif, Mono, their condensed,
  bold, oblique / italic and extra-light faces; the math face left out), drawn black at
  96 px on a transparent canvas (``_glyph``); each sample a different (face, letter) pair.
  No round used these fonts or scripts (round 8-9's ``letters-lite0`` drew Latin letters in
  the URW and FreeFont faces). EfficientNet-Lite1.

Looked at and not used (too few distinct pictures per class once links are dropped, or
animation frames of one object): LXDE's nuoveXT2 icons (``lxde-icon-theme``: 27 apps, 18
devices at 64 px), ``gnome-colors-common`` (31-40 in three folders), Hedgewars' themes
(``hedgewars-data``: 15-32 sprites a theme), LinCity-NG's tiles (``lincity-ng-data``:
animation frames), Flare's images (``flare-game``), PokerTH's avatars (``pokerth-data``).

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh11/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402

OUT = tf.OUT
FOLDER = "fresh11"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh11.py"
DATA = tf.CACHE / "twolayer_fresh11"
ROOT = DATA / "root"
PACKAGES = ("tuxpaint-stamps-default", "fonts-dejavu-core", "fonts-dejavu-extra")
STAMPS = ROOT / "usr/share/tuxpaint/stamps"
STAMP_CLASSES = ("household", "plants", "seasonal", "symbols")
FONTS = ROOT / "usr/share/fonts/truetype/dejavu"
SCRIPTS = {  # Unicode's basic blocks: capital and small letters
    "greek": [*range(0x391, 0x3A2), *range(0x3A3, 0x3AA), *range(0x3B1, 0x3CA)],
    "cyrillic": [*range(0x410, 0x450)],
    "armenian": [*range(0x531, 0x557), *range(0x561, 0x587)],
    "georgian": [*range(0x10D0, 0x10F1)],
}
GLYPH_PX = 96


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (STAMPS, FONTS), "twolayer_fresh11")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh11.py", COMMAND)


def stamp_pools() -> list[list[Path]]:
    seen: set = set()
    return [tf._distinct([p for p in (_need(STAMPS) / c).rglob("*.png")
                          if not p.stem.endswith("_mirror") and tf.keep(p)], seen)
            for c in STAMP_CLASSES]  # fmt: skip


def faces() -> list[Path]:
    """The DejaVu text faces (the math face left out)."""
    return [p for p in sorted(_need(FONTS).glob("DejaVu*.ttf")) if "Math" not in p.name]


def script_pools() -> list[list[tuple[str, str]]]:
    """Per script, every (face, letter) pair whose face has the letter (its cmap)."""
    from fontTools.ttLib import TTFont

    pools: list[list[tuple[str, str]]] = [[] for _ in SCRIPTS]
    for face in faces():
        cmap = TTFont(str(face), lazy=True).getBestCmap()
        for k, codes in enumerate(SCRIPTS.values()):
            pools[k] += [(str(face), chr(c)) for c in codes if c in cmap]
    return pools


def _glyph(face: str, letter: str):
    """``letter`` drawn black in ``face`` at ``GLYPH_PX`` px on a transparent canvas, RGBA."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(face, GLYPH_PX)
    img = Image.new("RGBA", (3 * GLYPH_PX, 2 * GLYPH_PX), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((GLYPH_PX // 2, GLYPH_PX // 4), letter, font=font,
                             fill=(0, 0, 0, 255))  # fmt: skip
    return img


def _scripts(n: int, size: int, seed: int):
    """One letter in one DejaVu face a sample; the label: its script (4 scripts)."""
    labels, items, rng = tf._draw(script_pools(), n, seed)
    return tf._to_input([tf._place(_glyph(*it), rng) for it in items], labels, size)


TASKS = {
    "stamps2-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(STAMP_CLASSES),
                          images=tf.pictures(stamp_pools)),
    "scripts-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(SCRIPTS), images=_scripts),
}  # fmt: skip


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

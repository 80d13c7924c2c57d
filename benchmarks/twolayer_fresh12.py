"""A twelfth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), at 32 px as the eleventh: two image tasks on data no round used, and the real
fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task: full batch and
B = 32), nothing else. Modelled on ``twolayer_fresh11.py``; uses ``twolayer_fresh.py``'s
helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh12.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh12.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh12.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model (``tangentlab.experimental.exact_top``,
``twolayer.py``) or of the library on them: this script runs no forecast at all. They are
kept for one later scoring (PLAN-fresh12.md).

**Tasks** (N = 128 at 32 px, as the image development tasks; every picture an RGBA drawing
composited on white at a random size, 36-60 px for its longer side, and a random offset on
a 64-px canvas, then resized to 32 px (``twolayer_fresh._place``); classes balanced, each
sample a different source picture):

- ``digits-lite0``: which digit, 3, 5, 6 or 9, a picture shows, each drawn black at 96 px in
  one of the 72 text faces of Latin Modern (``fonts-lmodern``: the roman, sans, mono faces
  at their design sizes, bold, italic, oblique, caps, condensed), each sample a different
  (face, digit) pair. No round drew digits or used these faces (rounds 8-9's
  ``letters-lite0`` drew Latin letters in the URW and FreeFont faces; the eleventh, Greek,
  Cyrillic, Armenian and Georgian letters in DejaVu's). EfficientNet-Lite0.
- ``mathsym-lite1``: which Unicode block a symbol of Latin Modern Math
  (``fonts-lmodern``'s ``latinmodern-math.otf``) is in: Arrows (U+2190-21FF), Mathematical
  Operators (U+2200-22FF), Miscellaneous Technical (U+2300-23FF) or Letterlike Symbols
  (U+2100-214F) (4 classes); every symbol of the face's cmap in those blocks drawn black at
  96 px, kept if its visible part is at least ``twolayer_fresh.MIN_SIDE`` px and no other
  symbol drew the same picture (``_symbol_pools``). EfficientNet-Lite1.

Looked at and not used: Obsidian's icons (``obsidian-icon-theme``, Faenza-derived: the
fifth round used Faenza's folders), Gartoon, Nuovo and YASIS (``gnome-icon-theme-*``:
SVG, nothing here draws it), TeX Gyre (``fonts-texgyre``: URW's designs, which rounds 8-9
drew), PySolFC's card sets (not in Debian's index here).

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh12/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import hashlib
import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh11 import _glyph  # noqa: E402  (a glyph drawn black at 96 px, RGBA)

OUT = tf.OUT
FOLDER = "fresh12"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh12.py"
DATA = tf.CACHE / "twolayer_fresh12"
ROOT = DATA / "root"
PACKAGES = ("fonts-lmodern",)
FONTS = ROOT / "usr/share/texmf/fonts/opentype/public/lm"
MATH = ROOT / "usr/share/texmf/fonts/opentype/public/lm-math/latinmodern-math.otf"
DIGITS = ("3", "5", "6", "9")
BLOCKS = {  # Unicode blocks of the math face's symbols
    "arrows": range(0x2190, 0x2200),
    "operators": range(0x2200, 0x2300),
    "technical": range(0x2300, 0x2400),
    "letterlike": range(0x2100, 0x2150),
}


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (FONTS, MATH), "twolayer_fresh12")


def _need(path: Path) -> Path:
    return tf._need(path, "twolayer_fresh12.py", COMMAND)


def faces() -> list[Path]:
    """Latin Modern's text faces."""
    return sorted(_need(FONTS).glob("lm*.otf"))


def digit_pools() -> list[list[tuple[str, str]]]:
    """Per digit, every (face, digit) pair."""
    return [[(str(f), d) for f in faces()] for d in DIGITS]


@cache
def _symbol_pools() -> tuple[tuple[str, ...], ...]:
    """Per block, the math face's symbols kept: in its cmap, visible part >= ``MIN_SIDE`` px,
    and a picture no other symbol (of any block) drew."""
    from fontTools.ttLib import TTFont

    face = str(_need(MATH))
    cmap = TTFont(face, lazy=True).getBestCmap()
    seen: set = set()
    pools = []
    for codes in BLOCKS.values():
        pool = []
        for c in codes:
            if c not in cmap:
                continue
            img = _glyph(face, chr(c))
            box = img.getchannel("A").getbbox()
            if box is None or max(box[2] - box[0], box[3] - box[1]) < tf.MIN_SIDE:
                continue
            h = hashlib.sha1(img.crop(box).tobytes()).hexdigest()
            if h not in seen:
                seen.add(h)
                pool.append(chr(c))
        pools.append(tuple(pool))
    return tuple(pools)


def _digits(n: int, size: int, seed: int):
    """One digit in one Latin Modern face a sample; the label: the digit (4 digits)."""
    labels, items, rng = tf._draw(digit_pools(), n, seed)
    return tf._to_input([tf._place(_glyph(*it), rng) for it in items], labels, size)


def _symbols(n: int, size: int, seed: int):
    """One symbol of Latin Modern Math a sample; the label: its Unicode block (4 blocks)."""
    face = str(_need(MATH))
    labels, items, rng = tf._draw([list(p) for p in _symbol_pools()], n, seed)
    return tf._to_input([tf._place(_glyph(face, s), rng) for s in items], labels, size)


TASKS = {
    "digits-lite0": dict(kind="image", net="lite0", num_samples=128, image_size=32,
                         projection=4096, num_classes=len(DIGITS), images=_digits),
    "mathsym-lite1": dict(kind="image", net="lite1", num_samples=128, image_size=32,
                          projection=4096, num_classes=len(BLOCKS), images=_symbols),
}  # fmt: skip


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

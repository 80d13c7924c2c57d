"""A fourteenth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), at 32 px with ten classes, for a cap on the exact top's q for a vector z
(PLAN-fresh14.md): where the rule q = 32C keeps all of z (320 directions) and a cap of 128
keeps fewer. Two image tasks on data no round used, in two scripts no round drew, and the
real fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task), nothing
else. Modelled on ``twolayer_fresh14.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh14.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh14.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh14.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model or of the library on them: this script runs no
forecast at all. They are kept for one later scoring (PLAN-fresh14.md).

**Tasks** (N = 160 at 32 px, 16 samples a class; every picture one glyph drawn black at
96 px (``twolayer_fresh11._glyph``) composited on white at a random size, 36-60 px for its
longer side, and a random offset on a 64-px canvas, then resized to 32 px
(``twolayer_fresh._place``); classes balanced, each sample a different (face, glyph) pair):

- ``hebrew10-lite0``: which Hebrew letter, alef to yod (U+05D0-05D9, 10 classes), in the 36
  TrueType / OpenType faces of Culmus (``culmus``: Aharoni's Type 1 faces and the Caladings
  dingbats left out by their format). EfficientNet-Lite0.
- ``thaidigits10-lite1``: which Thai digit, zero to nine (U+0E50-0E59, 10 classes), in the
  58 faces of the 13 TLWG families (``fonts-tlwg-*-ttf``). EfficientNet-Lite1.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh14/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh11 import _glyph  # noqa: E402  (a glyph drawn black at 96 px, RGBA)

OUT = tf.OUT
FOLDER = "fresh14"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh14.py"
DATA = tf.CACHE / "twolayer_fresh14"
ROOT = DATA / "root"
TLWG = ("garuda", "kinnari", "laksaman", "loma", "mono", "norasi", "purisa", "sawasdee",
        "typewriter", "typist", "typo", "umpush", "waree")
PACKAGES = ("culmus", *(f"fonts-tlwg-{f}-ttf" for f in TLWG))
CULMUS = ROOT / "usr/share/fonts/truetype/culmus"
THAI = ROOT / "usr/share/fonts/truetype/tlwg"
FONT_DIRS = (CULMUS, THAI)
HEBREW = tuple(chr(c) for c in range(0x05D0, 0x05DA))  # alef .. yod
THAI_DIGITS = tuple(chr(c) for c in range(0x0E50, 0x0E5A))  # ๐ .. ๙


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, FONT_DIRS, "twolayer_fresh14")


def faces(folder: Path) -> list[Path]:
    """The TrueType / OpenType faces in ``folder``."""
    return sorted(p for p in tf._need(folder, "twolayer_fresh14.py", COMMAND).iterdir()
                  if p.suffix in (".ttf", ".otf"))


def _glyphs(chars: tuple[str, ...], folder: Path):
    """A task's ``images(n, size, seed)``: one of ``chars`` in one face of ``folder`` that
    has it (its cmap) a sample; the label: the character."""

    def images(n: int, size: int, seed: int):
        from fontTools.ttLib import TTFont

        cmaps = {f: TTFont(str(f), lazy=True).getBestCmap() for f in faces(folder)}
        pools = [[(str(f), ch) for f, cm in cmaps.items() if ord(ch) in cm] for ch in chars]
        labels, items, rng = tf._draw(pools, n, seed)
        return tf._to_input([tf._place(_glyph(*it), rng) for it in items], labels, size)

    return images


TASKS = {
    "hebrew10-lite0": dict(kind="image", net="lite0", num_samples=160, image_size=32,
                           projection=4096, num_classes=len(HEBREW),
                           images=_glyphs(HEBREW, CULMUS)),
    "thaidigits10-lite1": dict(kind="image", net="lite1", num_samples=160, image_size=32,
                               projection=4096, num_classes=len(THAI_DIGITS),
                               images=_glyphs(THAI_DIGITS, THAI)),
}  # fmt: skip


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

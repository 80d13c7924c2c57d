"""A thirteenth fresh held-out image round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13), at 32 px with ten classes: where the exact top's rule for a vector z (q = 32C
since PLAN-fresh12.md) keeps all of z (32C = 320 = D), a case the rounds that chose it
(four classes, q = 128) never had. Two image tasks on data no round used, and the real
fine-tuning runs of ``holdout.py``'s whole grid on them (24 cells a task), nothing else.
Modelled on ``twolayer_fresh12.py``; uses ``twolayer_fresh.py``'s helpers and real runs.

    .venv/bin/python benchmarks/twolayer_fresh13.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_fresh13.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_fresh13.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model or of the library on them: this script runs no
forecast at all. They are kept for one later scoring (PLAN-fresh13.md).

**Tasks** (N = 160 at 32 px, 16 samples a class; every picture one glyph drawn black at
96 px (``twolayer_fresh11._glyph``) composited on white at a random size, 36-60 px for its
longer side, and a random offset on a 64-px canvas, then resized to 32 px
(``twolayer_fresh._place``); classes balanced, each sample a different (face, glyph) pair),
in the 42 text faces of six font packages no round used: Liberation 2 (``fonts-liberation2``:
Sans, Serif, Mono, 12 faces), Carlito and Caladea (``fonts-crosextra-carlito``,
``fonts-crosextra-caladea``, 8), EB Garamond (``fonts-ebgaramond``, 5), Linux Libertine and
Biolinum (``fonts-linuxlibertine``, 12; the keyboard face left out) and Cantarell
(``fonts-cantarell``, 5). Liberation's designs are metric clones of the Helvetica / Times /
Courier that URW's faces (rounds 8-9, Latin capitals A-H) also clone; no round drew digits
in them or lowercase letters at all.

- ``digits10-lite0``: which digit, 0-9, a glyph is (10 classes). EfficientNet-Lite0.
- ``lower10-lite1``: which lowercase letter, a-j (10 classes). EfficientNet-Lite1.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run to a 90% drop or 1,500 steps, no forecast; ``twolayer_fresh.real_task``). Results:
``benchmarks/results/twolayer/fresh13/<task>.json``, one cell at a time, resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402
from twolayer_fresh11 import _glyph  # noqa: E402  (a glyph drawn black at 96 px, RGBA)

OUT = tf.OUT
FOLDER = "fresh13"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_fresh13.py"
DATA = tf.CACHE / "twolayer_fresh13"
ROOT = DATA / "root"
PACKAGES = ("fonts-liberation2", "fonts-crosextra-carlito", "fonts-crosextra-caladea",
            "fonts-ebgaramond", "fonts-linuxlibertine", "fonts-cantarell")  # fmt: skip
FONT_DIRS = (ROOT / "usr/share/fonts/truetype/liberation2",
             ROOT / "usr/share/fonts/truetype/crosextra",
             ROOT / "usr/share/fonts/opentype/ebgaramond",
             ROOT / "usr/share/fonts/opentype/linux-libertine",
             ROOT / "usr/share/fonts/opentype/cantarell")  # fmt: skip
DIGITS = tuple("0123456789")
LOWER = tuple("abcdefghij")


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, FONT_DIRS, "twolayer_fresh13")


def faces() -> list[Path]:
    """The text faces of this round's packages (Linux Biolinum's keyboard face left out)."""
    out = []
    for d in FONT_DIRS:
        out += sorted(p for p in tf._need(d, "twolayer_fresh13.py", COMMAND).iterdir()
                      if p.suffix in (".ttf", ".otf") and p.name != "LinBiolinum_K.otf")
    return out


def _glyphs(chars: tuple[str, ...]):
    """A task's ``images(n, size, seed)``: one of ``chars`` in one face that has it (its
    cmap: Linux Libertine's initials face has no lowercase) a sample; the label: the
    character."""

    def images(n: int, size: int, seed: int):
        from fontTools.ttLib import TTFont

        cmaps = {f: TTFont(str(f), lazy=True).getBestCmap() for f in faces()}
        pools = [[(str(f), ch) for f, cm in cmaps.items() if ord(ch) in cm] for ch in chars]
        labels, items, rng = tf._draw(pools, n, seed)
        return tf._to_input([tf._place(_glyph(*it), rng) for it in items], labels, size)

    return images


TASKS = {
    "digits10-lite0": dict(kind="image", net="lite0", num_samples=160, image_size=32,
                           projection=4096, num_classes=len(DIGITS), images=_glyphs(DIGITS)),
    "lower10-lite1": dict(kind="image", net="lite1", num_samples=160, image_size=32,
                          projection=4096, num_classes=len(LOWER), images=_glyphs(LOWER)),
}  # fmt: skip


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

"""A second fresh held-out text round for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): four text tasks on data no task used, and the real fine-tuning runs of
``holdout.py``'s whole grid on them (24 cells a task: full batch and B = 32), nothing else.
Modelled on the image rounds (``twolayer_fresh14.py``); uses ``twolayer_fresh.py``'s helpers
and real runs.

    .venv/bin/python benchmarks/twolayer_text2.py --fetch              # Debian's packages
    .venv/bin/python benchmarks/twolayer_text2.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_text2.py --real --task NAME   # one task

**Held out.** The tasks were chosen and their real runs made without running or reading
any forecast of the exact-top model or of the library on them: this script runs no
forecast at all. They are kept for one later scoring (PLAN-text2.md).

**Tasks** (MiniLM-L6, 64 samples, 16 tokens, as the text development tasks and rounds
10-11; data from three Debian fortune packages no task used, fetched by ``--fetch`` with
apt-get download + dpkg -x, no root needed; classes balanced; the giveaways a file carries
in every entry removed: the "BOFH excuse #N:" and "Debian Hint #N:" headers, in any
language up to the first colon, and an indented "-- author" line at the end):

- ``bofh2-minilm``: a BOFH excuse (``fortunes-bofh-excuses``) or a Debian hint
  (``fortunes-debian-hints``, English): 2 classes.
- ``hintslang3-minilm``: the language of a Debian hint, German, French or Spanish (the same
  43 hints translated): 3 classes.
- ``mario3-minilm``: which of three Portuguese files of ``fortunes-mario`` an entry comes
  from: jokes (piadas), gaucho sayings (gauchismos) or computers (computadores): 3 classes.
- ``wordplay3-minilm``: anagrams, palindromes or general quotations (``fortunes-mario``'s
  anagramas, palindromos, geral; English and Portuguese mixed): 3 classes.

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, the real
run of the layers above the cached trunk, to a 90% drop or 1,500 steps, no forecast;
``twolayer_fresh.real_task``). Results: ``benchmarks/results/twolayer/text2/<task>.json``,
one cell at a time, resumable.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twolayer_fresh as tf  # noqa: E402

FOLDER = "text2"  # results: OUT / FOLDER / <task>.json
COMMAND = ".venv/bin/python benchmarks/twolayer_text2.py"
DATA = tf.CACHE / "twolayer_text2"
ROOT = DATA / "root"
PACKAGES = ("fortunes-bofh-excuses", "fortunes-debian-hints", "fortunes-mario")
FORTUNES = ROOT / "usr/share/games/fortunes"
HEADER = re.compile(r"^\s*(?:BOFH excuse #\d+:|[^:\n]*Debian[^:\n]*:)\s*")
AUTHOR = re.compile(r"\n\s+--[^\n]*\s*$")


def fetch() -> None:
    """Download this round's Debian packages into the cache and unpack them (no root)."""
    tf.fetch_debs(PACKAGES, DATA, ROOT, (FORTUNES / "mario.geral",), "twolayer_text2")


def _entries(path: Path) -> list[str]:
    """The entries of one fortune file, headers and a trailing "-- author" removed, each
    on one line."""
    tf._need(path.parent, "twolayer_text2.py", COMMAND)
    out = []
    for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        t = HEADER.sub("", AUTHOR.sub("", t.rstrip("\n%")))
        t = " ".join(t.split())
        if t:
            out.append(t)
    return out


def _texts(files: tuple[str, ...]):
    """A task's ``texts()``: ``(texts, labels, class names)``, which of ``files`` an entry
    comes from."""

    def texts():
        out, labels = [], []
        for k, f in enumerate(files):
            e = _entries(FORTUNES / f)
            out += e
            labels += [k] * len(e)
        return out, np.array(labels), list(files)

    return texts


FILES = {"bofh2-minilm": ("bofh-excuses", "debian-hints"),
         "hintslang3-minilm": ("de/debian-hints", "fr/debian-hints", "es/debian-hints"),
         "mario3-minilm": ("mario.piadas", "mario.gauchismos", "mario.computadores"),
         "wordplay3-minilm": ("mario.anagramas", "mario.palindromos", "mario.geral")}
TASKS = {name: dict(kind="text", num_samples=64, seq_len=16, projection=4096,
                    num_classes=len(files), texts=_texts(files))
         for name, files in FILES.items()}  # fmt: skip


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

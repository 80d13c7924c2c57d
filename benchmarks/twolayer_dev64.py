"""Three image development tasks at 64 px for ``benchmarks/twolayer.py``'s exact-top model
(issue 13): where to choose how many directions of a map-shaped z the model keeps exact
(``directions``, q) without looking at a held-out round. At 64 px the body's output z is
a 2 x 2 map ([320, 2, 2]); the development tasks were all at 32 px (z one position).

    .venv/bin/python benchmarks/twolayer_dev64.py --fetch              # the data (no root)
    .venv/bin/python benchmarks/twolayer_dev64.py --real               # every task, resumable
    .venv/bin/python benchmarks/twolayer_dev64.py --real --task NAME   # one task

**Development data.** The tasks are three of the image development tasks
(``deephead.image_tasks()``) made again at 64 px: the same pictures, classes, networks
and seed, the input at the example's size. Choices made on them are development
choices; the seventh fresh round (PLAN-fresh7.md), the only held-out round at 64 px, is
not used to make them.

- ``lfw64-lite0``: ``lfw-lite0`` (scikit-image's LFW subset, face or not; 2 classes).
- ``pics64-lite0``: ``pics-lite0`` (crops of OpenCV's six shape test pictures).
- ``misc64-lite1``: ``misc-lite1`` (crops of six OpenCV images; EfficientNet-Lite1).

**Runs** (``--real``): as ``twolayer_fresh.py``'s (``holdout.py``'s whole grid, 24 cells
a task, the real run to a 90% drop or 1,500 steps, no forecast;
``twolayer_fresh.real_task``). Results: ``benchmarks/results/twolayer/dev64/<task>.json``,
one cell at a time, resumable. The forecasts: ``twolayer.py --dev64 VARIANT`` (8C, 16C, 32C;
32C-k2048, 32C-k1024, 32C-k512 and 32C-k256: q = 32C with a smaller projection than
k = 4096).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import holdout_fresh as fr  # noqa: E402
import holdout_hybrid as hh  # noqa: E402
import holdout_kind as hk  # noqa: E402
import twolayer_fresh as tf  # noqa: E402

FOLDER = "dev64"  # results: OUT / FOLDER / <task>.json
SIZE = 64  # px, the default example's size
SOURCES = {"lfw64-lite0": fr.TASKS["lfw-lite0"], "pics64-lite0": hk.TASKS["pics-lite0"],
           "misc64-lite1": hh.TASKS["misc-lite1"]}
TASKS = {name: {**cfg, "image_size": SIZE} for name, cfg in SOURCES.items()}


def fetch() -> None:
    """OpenCV's sample data (the Debian package opencv-doc) and scikit-image's data (its
    wheel), unpacked into the cache; nothing installed."""
    ho._opencv_dir(fetch=True)
    fr._skimage_dir(fetch=True)


def main() -> None:
    tf.round_main(__doc__, TASKS, FOLDER, fetch)


if __name__ == "__main__":
    main()

"""The real run of a flagged setting on cached trunk outputs: what it costs (issue 13).

Where the exact-top check flags a setting (NOTE [exact-top reliability check]), the
forecast misses issue 13's goals, and the exact block-linear model does no better there
(RESULTS.md "twolayer-weights"): the remaining error is the block's nonlinearity. A user
who needs the answer for such a setting can train it; when the layers below the trained
weights are frozen (and in eval mode: batch norm frozen, no dropout, no augmentation), their
outputs are the same at every step, so the real run on those outputs, computed once
(:func:`tangentlab.examples.split_trunk`, what the exact top's kernel already does, NOTE
[frozen trunk]), is the same run at a fraction of the cost. This measures that fraction on
the default example's model and data, and checks that the two runs are the same run.

    .venv/bin/python benchmarks/cached_trunk.py [--steps 300] [--samples 500]

One process, one run of each after another (speed as a ratio measured in one run); results
in the "cached-trunk" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.examples import load_example, split_model, split_trunk  # noqa: E402
from tangentlab.tangent import select_params  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/cached_trunk.py"


class CachedRun(nn.Module):
    """``top(rest(h))`` on cached trunk outputs h = trunk(x): the model above its frozen
    trunk, under the names ``rest.<...>`` and ``top.<...>``."""

    def __init__(self, rest: nn.Module, top: nn.Module) -> None:
        super().__init__()
        self.rest, self.top = rest, top

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.top(self.rest(h))


def measure(image_size: int, samples: int, steps: int, lr: float, loss: str) -> dict:
    ex = load_example("fashion-lite0", num_samples=samples, image_size=image_size)
    x, y = ex.data
    body, top, _ = split_model(ex.model)
    trunk, rest = split_trunk(body, ex.default_params)
    assert trunk is not None
    cached = CachedRun(rest, top).eval()
    names = ([f"rest.{n}" for n in select_params(rest, ex.default_params)]
             + [f"top.{n}" for n in select_params(top, ex.default_params)])  # fmt: skip
    assert len(names) == len(select_params(ex.model, ex.default_params))
    opt = tl.SGD(lr)
    t0 = time.perf_counter()
    full = tl.finetune(ex.model, ex.data, opt, steps, loss=loss, params=ex.default_params,
                       log_every=1, progress=False)  # fmt: skip
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        h = torch.cat([trunk(x[s:s + 256]) for s in range(0, len(x), 256)])
    trunk_s = time.perf_counter() - t0
    run = tl.finetune(cached, (h, y), opt, steps, loss=loss, params=names, log_every=1,
                      progress=False)  # fmt: skip
    cached_s = time.perf_counter() - t0
    a, b = np.asarray(full.loss), np.asarray(run.loss)
    return dict(image_size=image_size, samples=samples, steps=steps, lr=lr, loss=loss,
                full_s=full_s, cached_s=cached_s, trunk_s=trunk_s,
                gap=float(np.max(np.abs(a - b)) / a[0]), l0=float(a[0]), lend=float(a[-1]),
                params=len(names))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [measure(s, args.samples, args.steps, lr, loss)
            for s, lr, loss in ((32, 0.05, "ce"), (64, 0.05, "ce"))]  # fmt: skip
    lines = [f"Command: `{COMMAND} --steps {args.steps} --samples {args.samples}`. "
             f"Machine: {machine()}.", "",
             "The real run of the default example's fine-tuning (fashion-lite0, the last block "
             "and the head trained, batch norm frozen; full-batch SGD, CE) on the network "
             "against the same run on cached trunk outputs (``split_trunk``: the frozen stem "
             "and blocks run once, then ``tl.finetune`` of the layers above), one after the "
             "other in one process. *gap*: the largest difference of the two runs' logged "
             "losses, in units of L0 (the same run up to float rounding).", "",
             "| image size | N | steps | lr | real run s | cached run s (of which trunk) | "
             "ratio | gap / L0 | L0 -> L_T |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_size']} | {r['samples']} | {r['steps']} | {r['lr']:g} | "
                     f"{r['full_s']:.1f} | {r['cached_s']:.1f} ({r['trunk_s']:.1f}) | "
                     f"{r['cached_s'] / r['full_s']:.2f} | {r['gap']:.1e} | "
                     f"{r['l0']:.3f} -> {r['lend']:.3f} |")
    lines += READING.splitlines()
    print("\n".join(lines))
    write_section("cached-trunk", "\n".join(lines))


READING = """

*Reading.* The two runs are the same run (their logged losses agree to the last bit here:
the frozen layers see the same inputs in eval mode at every step), and the one on cached
trunk outputs costs 0.20 of the network's at 32 px and 0.10 at 64 px, where the trunk is a
larger share of a step. So where the exact-top check flags a setting, whose forecast misses
issue 13's goals because the block leaves its linearization (RESULTS.md "twolayer-weights"),
the exact answer costs a fifth to a tenth of the real run, about what the forecast itself
costs at these sizes (8.8% and 7.9%: README, `tangentlab validate --linearize top`); the
forecast keeps its lead where many settings share one kernel (a sweep, each further setting
about a tenth of the first) and where the trained layers are a larger part of the network.
Not in the library: a user builds it from ``split_model`` and ``split_trunk`` (README, "Exact
top, last block linear"). Valid only with the layers below the trained weights frozen and
deterministic: batch norm frozen (``tl.finetune``'s default), no dropout, no augmentation.
"""


if __name__ == "__main__":
    main()

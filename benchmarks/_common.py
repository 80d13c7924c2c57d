"""Shared helpers of the benchmarks: machine description, subprocess jobs, RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("unknown CPU" elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_job(script: Path, job: dict, timeout: float = 1800) -> dict:
    """Run ``script --job JSON`` in a fresh process (so that its peak memory is its own)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--job", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def write_section(name: str, text: str) -> None:
    """Replace the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _m: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)


def load_states(out: Path, names) -> dict:
    """The stored JSON results ``out/<name>.json`` of the ``names`` that have one, in order."""
    return {n: json.loads((out / f"{n}.json").read_text()) for n in names
            if (out / f"{n}.json").exists()}  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

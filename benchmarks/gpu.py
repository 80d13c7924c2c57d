"""GPU kernel benchmark (issue 12, part 4): CUDA exact, projected and distributed kernels,
each checked against a float64 CPU reference.

What it measures, per model (a digits MLP 64-128-128-10, N=500; a digits CNN with batch
norm, N=400; a wide digits MLP 64-1024-1024-10 with 1.1M weights, N=1000, plus N=200 for
the CPU comparison):

- ``tl.compute_kernel`` exact and projected (tensor sketch, k=1024, fixed seed) on CUDA in
  float32 and float64, and on the same machine's CPU for the speed-up: wall seconds of the
  whole call (``torch.cuda.synchronize`` before and after), for the first call of that
  configuration in the process (CUDA context already created; it includes the library's
  timing of the Jacobian strategies) and for a second, warm call; the library's own
  ``metadata["seconds"]``; peak GPU memory of the warm call
  (``torch.cuda.max_memory_allocated``); the Jacobian strategy ``auto`` chose;
- the relative Frobenius error ``||K - K_ref||_F / ||K_ref||_F`` of the kernel's principal
  block on the first ``n_ref`` (64) samples against the reference computed by
  ``--part cpu`` on the CPU in float64 (the block of a kernel on N samples IS the kernel
  of its first samples, projected ones too: the sketch does not depend on the chunking or
  the device). The whole references would not fit in the 64 MiB that can travel to the
  device, so only that block travels; the whole kernel is compared with the same
  machine's float64 CPU kernel (``rel_err_devcpu``) where that is computed;
- the distributed path (NOTE [distributed kernels]): ``torchrun`` with the nccl backend
  and one rank (one GPU), nccl with two ranks on the one GPU (NCCL usually refuses:
  recorded), gloo with two ranks computing on the GPU and gloo with two ranks on the
  CPU; every rank's kernel is checked against the reference block, against the
  one-process kernel on the same device and dtype, and against the other ranks'.

Commands (from the repository root)::

    # once, here: snapshot the library at HEAD (the device runs it, not the work tree)
    rm -rf .gpu_snapshot && mkdir .gpu_snapshot && git archive HEAD src | tar -x -C .gpu_snapshot
    .venv/bin/python benchmarks/gpu.py --part cpu              # references -> .gpu_snapshot/ref
    .venv/bin/python benchmarks/gpu.py --part gpu --device cpu --tiny   # dry run, no GPU
    # on the device (the run tool, carry [".gpu_snapshot"]):
    export PYTHONPATH=.gpu_snapshot/src PYTHONUNBUFFERED=1; set -o pipefail;
    python3 benchmarks/gpu.py --part gpu 2>&1 | tee $OUT/gpu.log     # -> $OUT/gpu.json
    python3 benchmarks/gpu.py --part diag 2>&1 | tee $OUT/diag.log   # follow-up checks
    # (diag.json is stored in gpu.json under "diagnostics", the reading under "reading")
    # here, after copying $OUT/gpu.json to benchmarks/results/gpu.json:
    .venv/bin/python benchmarks/gpu.py --render              # -> benchmarks/results/gpu.md
    # a rerun of some models only (full N, on the device, no CPU rows, no distributed part),
    # e.g. after a fix, with the working tree's library copied to .gpu_snapshot/src:
    python3 benchmarks/gpu.py --part gpu --only mlp-wide 2>&1 | tee $OUT/gpu_fix.log
    .venv/bin/python benchmarks/gpu.py --merge-fix gpu_fix.json   # -> gpu.json "after_fix"
    .venv/bin/python benchmarks/gpu.py --render   # adds "After the fix" to gpu.md

Nothing here needs a GPU to import; CI never runs it. Every measurement is wrapped so a
failure records its error message and the others still run; gpu.json is rewritten after
each one, so a run stopped at its time limit still returns what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / ".gpu_snapshot"
REF_DIR = SNAPSHOT / "ref"
RESULTS = ROOT / "benchmarks" / "results"

# model name -> (N on the GPU, seed of its initialization)
MODELS = {"mlp": 500, "cnn": 400, "mlp-wide": 1000}
TINY = {"mlp": 40, "cnn": 30, "mlp-wide": 24}
SEEDS = {"mlp": 0, "cnn": 1, "mlp-wide": 2}
N_CMP_WIDE = 200  # the wide MLP on the CPU: N^2 P is too much at N=1000 for the budget
N_REF = 64  # samples of the reference block
K = 1024  # projected dimension
PROJ_SEED = 7
CLASSES = 10


def _use_snapshot() -> None:
    """Import tangentlab from .gpu_snapshot/src (the library at git HEAD) when present."""
    src = SNAPSHOT / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        )


def log(msg: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


# ---- models and data ----------------------------------------------------------------
def build(name: str):
    import torch
    from torch import nn

    torch.manual_seed(SEEDS[name])
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
    if name == "cnn":
        m = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip
        for bn in (m[1], m[4]):  # running statistics as a trained network would have
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return m
    if name == "mlp-wide":
        return nn.Sequential(
            nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(),
            nn.Linear(1024, 10),
        )  # fmt: skip
    raise ValueError(name)


def digits():
    """sklearn's bundled digits (no download), shuffled with a fixed seed, X in [0, 1]."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    x = torch.tensor(d.data[perm] / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target[perm], dtype=torch.int64)


def model_inputs(name: str, x):
    return x.reshape(-1, 1, 8, 8) if name == "cnn" else x


def load_models():
    """``{name: float32 module}`` and the digits ``(X, y)``: from the carried reference file
    (the device's torch may initialize differently), else built here."""
    from safetensors.torch import load_file

    path = REF_DIR / "models.safetensors"
    if path.exists():
        st = load_file(str(path))
        models = {}
        for name in MODELS:
            m = build(name)
            sd = {k.split("/", 1)[1]: v for k, v in st.items() if k.startswith(name + "/")}
            m.load_state_dict(sd)
            models[name] = m.eval()
        return models, (st["data/x"], st["data/y"])
    return {name: build(name).eval() for name in MODELS}, digits()


def cast(model, dtype):
    return copy.deepcopy(model).to(dtype).eval()


# ---- one measurement ------------------------------------------------------------------
def rel_fro(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def sha(t) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(__import__("torch").uint8).numpy()).hexdigest()[:16]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# the last compute_kernel call's memory plan (set by the _prepare hook of --only)
LAST_CALL: dict = {}


def hook_plan(tl) -> None:
    """Record each compute_kernel call's memory plan (``job.mplan``) in LAST_CALL."""
    from tangentlab import compute as tl_compute

    if getattr(tl_compute._prepare, "_gpu_hook", False):
        return
    prepare = tl_compute._prepare

    def hooked(*a, **kw):
        job = prepare(*a, **kw)
        LAST_CALL["plan"] = {"chunk": job.mplan.chunk, "strip": job.mplan.strip,
                             "estimate": job.mplan.estimate, "budget": job.mplan.budget,
                             "describe": job.mplan.describe()}  # fmt: skip
        return job

    hooked._gpu_hook = True
    tl_compute._prepare = hooked


def kernel_call(tl, model, x, y, mode, device, **extra):
    import torch

    proj = tl.Projection(K, seed=PROJ_SEED) if mode == "projected" else None
    t = tl.Tangent(model, projection=proj, jacobian_mode=extra.pop("jacobian_mode", "auto"))
    LAST_CALL.clear()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    k = tl.compute_kernel(t, (x, y), device=device, progress=False, **extra)
    sync(device)
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    LAST_CALL["mode_timings"] = getattr(t, "mode_timings", None)
    return k, sec, peak, str(t.jacobian_mode), t.num_params


def measure(tl, refs, models, data, name, n, mode, dtype_name, device, repeat_under_s=12.0):
    """Two calls of compute_kernel (first, warm); the row for gpu.json and the kernel."""
    import torch

    dtype = getattr(torch, dtype_name)
    k = K if mode == "projected" else None
    row = {"model": name, "n": n, "c": CLASSES, "mode": mode, "k": k, "dtype": dtype_name,
           "device": device}  # fmt: skip
    kern = None
    try:
        model = cast(models[name], dtype)
        x = model_inputs(name, data[0][:n]).to(dtype)
        y = data[1][:n]
        kern, first, peak_first, jmode, p = kernel_call(tl, model, x, y, mode, device)
        row.update(p=p, seconds_first=first, peak_bytes_first=peak_first, jacobian_mode=jmode)
        if "plan" in LAST_CALL:  # --only: the library's memory plan of the first call
            row.update(plan_first=LAST_CALL["plan"], mode_timings_first=LAST_CALL["mode_timings"])
        if first < repeat_under_s:
            kern, warm, peak, jmode2, _ = kernel_call(tl, model, x, y, mode, device)
            row.update(seconds_warm=warm, peak_bytes=peak, jacobian_mode_warm=jmode2)
            if "plan" in LAST_CALL:
                row.update(plan=LAST_CALL["plan"], mode_timings=LAST_CALL["mode_timings"])
        else:
            row.update(seconds_warm=None, peak_bytes=peak_first)
        row["lib_seconds"] = float(kern.metadata.get("seconds", "nan"))
        theta = kern.gram()
        m = min(N_REF, n) * CLASSES
        ref = refs.get(name)
        if ref is not None:
            ref_theta = ref[f"{mode}/theta"][:m, :m]
            row["rel_err_ref"] = rel_fro(theta[:m, :m], ref_theta)
            row["rel_err_ref_f0"] = rel_fro(kern.f0[: m // CLASSES], ref["f0"][: m // CLASSES])
            row["rel_err_ref_jw0"] = rel_fro(kern.jw0[: m // CLASSES], ref["jw0"][: m // CLASSES])
            if mode == "projected":  # the sketch's own error, against the exact reference
                row["rel_err_exact_ref"] = rel_fro(theta[:m, :m], ref["exact/theta"][:m, :m])
        row["theta_shape"] = list(theta.shape)
        planned = (row.get("plan") or row.get("plan_first") or {}).get("estimate")
        log(
            f"{name:9s} N={n:5d} {mode:9s} {dtype_name:7s} {device:5s} P={p:,} "
            f"first {first:8.3f}s warm {row.get('seconds_warm') or float('nan'):8.3f}s "
            f"lib {row['lib_seconds']:.3f}s peak {(row['peak_bytes'] or 0) / 2**30:6.2f} GiB "
            + (f"planned {planned / 2**30:6.2f} GiB " if planned is not None else "")
            + f"mode {jmode} err_ref {row.get('rel_err_ref', float('nan')):.3e}"
        )
    except Exception as exc:  # noqa: BLE001 -- recorded, the others still run
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-3000:]
        log(f"FAILED {name} N={n} {mode} {dtype_name} {device}: {row['error']}")
    return row, kern


# ---- parts ------------------------------------------------------------------------------
def part_cpu(args) -> None:
    """The float64 CPU references of the first N_REF samples (exact and projected)."""
    import torch
    from safetensors.torch import save_file

    _use_snapshot()
    import tangentlab as tl

    REF_DIR.mkdir(parents=True, exist_ok=True)
    x, y = digits()
    store = {"data/x": x.contiguous(), "data/y": y.contiguous()}
    models = {}
    for name in MODELS:
        m = build(name).eval()
        models[name] = m
        for k, v in m.state_dict().items():
            store[f"{name}/{k}"] = v.detach().contiguous()
    save_file(store, str(REF_DIR / "models.safetensors"))
    info = {"machine": machine(), "tangentlab": tl.__file__, "n_ref": N_REF, "k": K,
            "proj_seed": PROJ_SEED, "models": {}}  # fmt: skip
    for name, m in models.items():
        xr = model_inputs(name, x[:N_REF]).double()
        out, meta = {}, {}
        for mode in ("exact", "projected"):
            m64 = cast(m, torch.float64)
            kern, sec, _, jmode, p = kernel_call(tl, m64, xr, y[:N_REF], mode, "cpu")
            out[f"{mode}/theta"] = kern.gram().contiguous()
            out["f0"], out["jw0"] = kern.f0.contiguous(), kern.jw0.contiguous()
            meta[mode] = {"seconds": sec, "jacobian_mode": jmode, "p": p}
            log(f"reference {name} {mode}: P={p:,} {sec:.2f}s ({jmode})")
        save_file(out, str(REF_DIR / f"{name}.safetensors"))
        info["models"][name] = meta
    (REF_DIR / "info.json").write_text(json.dumps(info, indent=1))
    log(f"references written to {REF_DIR}")


def load_refs() -> dict:
    from safetensors.torch import load_file

    refs = {}
    for name in MODELS:
        path = REF_DIR / f"{name}.safetensors"
        if path.exists():
            refs[name] = load_file(str(path))
    return refs


def machine() -> dict:
    import torch

    from _common import cpu_name  # benchmarks/ is the script's folder: on sys.path

    cpu = cpu_name()
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }  # fmt: skip
    if torch.cuda.is_available():
        try:
            info.update(_cuda_info())
        except Exception as exc:  # noqa: BLE001 -- a description must not stop the run
            info["cuda_info_error"] = repr(exc)
    return info


def _cuda_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    nccl = torch.cuda.nccl.version()
    info = {
        "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }  # fmt: skip
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip()
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable: {exc}"
    return info


class Results:
    def __init__(self, out: Path, meta: dict, filename: str = "gpu.json") -> None:
        self.path = out / filename
        self.doc = {**meta, "rows": [], "distributed": []}
        self.save()

    def add(self, key: str, item: dict) -> None:
        self.doc[key].append(item)
        self.save()

    def save(self) -> None:
        self.doc["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.path.write_text(json.dumps(self.doc, indent=1, default=str))


def part_gpu(args) -> None:
    _use_snapshot()
    import torch

    import tangentlab as tl

    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    gpu = args.device
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu for a dry run")
    t_init = time.perf_counter()
    if gpu.startswith("cuda"):
        torch.ones(1, device=gpu).matmul(torch.ones(1, 1, device=gpu))  # context, cuBLAS
        sync(gpu)
    cuda_init = time.perf_counter() - t_init
    sizes = TINY if args.tiny else MODELS
    n_cmp = 16 if args.tiny else N_CMP_WIDE
    only = [m for m in (args.only or "").split(",") if m]
    if only:
        unknown = set(only) - set(MODELS)
        if unknown:
            raise SystemExit(f"--only: unknown models {sorted(unknown)}; known {list(MODELS)}")
        hook_plan(tl)
    snap_tangent = SNAPSHOT / "src" / "tangentlab" / "tangent.py"
    res = Results(out, {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine(), "tangentlab": tl.__file__,
        "tangentlab_version": tl.__version__, "device": gpu, "tiny": args.tiny,
        "cuda_init_seconds": cuda_init, "n_ref": N_REF, "k": K, "proj_seed": PROJ_SEED,
        "reference_info": json.loads((REF_DIR / "info.json").read_text())
        if (REF_DIR / "info.json").exists() else None,
        "only": only or None,
        "tangent_py_sha256": hashlib.sha256(snap_tangent.read_bytes()).hexdigest()
        if snap_tangent.exists() else None,
    }, filename="gpu_fix.json" if only else "gpu.json")  # fmt: skip
    log(f"machine: {res.doc['machine']}")
    log(f"tangentlab from {tl.__file__}; CUDA init {cuda_init:.2f}s")
    models, data = load_models()
    refs = load_refs()
    if not refs:
        log("WARNING: no references under .gpu_snapshot/ref (run --part cpu first)")

    def run(name, n, mode, dtype, device, devcpu=None):
        row, kern = measure(tl, refs, models, data, name, n, mode, dtype, device)
        if kern is not None and devcpu is not None and (mode, n) in devcpu:
            row["rel_err_devcpu"] = rel_fro(kern.gram(), devcpu[mode, n])
        res.add("rows", row)
        return kern

    t_start = time.perf_counter()

    def time_left(what: str) -> bool:
        """False (and a skipped row) once the run's own deadline has passed."""
        if time.perf_counter() - t_start < args.deadline_s:
            return True
        log(f"skipped (deadline {args.deadline_s:.0f}s): {what}")
        res.doc.setdefault("skipped", []).append(what)
        res.save()
        return False

    if only:  # the named models at their full N on the device, nothing else
        dtypes = [d for d in (args.dtypes or "float32,float64").split(",") if d]
        for name in only:
            # projected first: the rows the fix is about
            for mode in ("projected", "exact"):
                for dtype in dtypes:
                    if time_left(f"{name} N={sizes[name]} {mode} {dtype} {gpu}"):
                        run(name, sizes[name], mode, dtype, gpu)
                        if gpu.startswith("cuda"):
                            torch.cuda.empty_cache()
        res.doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        res.save()
        log(f"done: {res.path}")
        return

    # (model, N, dtypes on this machine's CPU, dtypes on the GPU); the wide MLP's float64
    # CPU kernel would take too long: float32 only, for the speed-up
    jobs = [(name, sizes[name], ("float64", "float32"), ("float32", "float64"))
            for name in ("mlp", "cnn")]  # fmt: skip
    jobs.append(("mlp-wide", n_cmp, ("float32",), ("float32",)))
    for name, n, cpu_dtypes, gpu_dtypes in jobs:
        devcpu = {}  # the float64 CPU kernels: the whole-kernel reference
        for mode in ("exact", "projected"):
            for dtype in cpu_dtypes:
                if time_left(f"{name} N={n} {mode} {dtype} cpu"):
                    kern = run(name, n, mode, dtype, "cpu", devcpu)
                    if kern is not None and dtype == "float64":
                        devcpu[mode, n] = kern.gram()
        if gpu != "cpu" or args.simulate_gpu:
            for dtype in gpu_dtypes:
                for mode in ("exact", "projected"):
                    if time_left(f"{name} N={n} {mode} {dtype} {gpu}"):
                        run(name, n, mode, dtype, gpu, devcpu)
        del devcpu
    if gpu.startswith("cuda"):
        torch.cuda.empty_cache()

    # distributed: torchrun processes on this machine
    dist_runs = [
        ("nccl-1rank", "nccl", 1, "cuda"),
        ("gloo-2ranks-cuda", "gloo", 2, "cuda"),
        ("gloo-2ranks-cpu", "gloo", 2, "cpu"),
    ]
    for tag, backend, world, dev in dist_runs:
        if time_left(f"distributed {tag}"):
            res.add("distributed", run_dist(tag, backend, world, dev, args, out))

    # the wide MLP at its full N, on the GPU only
    name, n = "mlp-wide", sizes["mlp-wide"]
    if gpu != "cpu" or args.simulate_gpu:
        for dtype in ("float32", "float64"):
            for mode in ("exact", "projected"):
                if time_left(f"{name} N={n} {mode} {dtype} {gpu}"):
                    run(name, n, mode, dtype, gpu)
        torch.cuda.empty_cache()
    # two nccl ranks on the one GPU: NCCL may refuse them (or hang until the timeout)
    tag = "nccl-2ranks-1gpu"
    if time_left(f"distributed {tag}"):
        res.add("distributed", run_dist(tag, "nccl", 2, "cuda", args, out, timeout=60.0))
    if gpu != "cpu" or args.simulate_gpu:
        # the strategies auto chooses between, each forced (auto times them unsynchronized)
        for jm in ("structured", "vmap"):
            if time_left(f"{name} N={n} exact float32 forced {jm}"):
                row, _ = measure_mode(tl, refs, models, data, name, n, jm, gpu)
                res.add("rows", row)
    res.doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    res.save()
    log(f"done: {res.path}")


def measure_mode(tl, refs, models, data, name, n, jmode, device):
    """The exact float32 kernel with one Jacobian strategy forced (warm: second call)."""
    import torch

    row = {"model": name, "n": n, "c": CLASSES, "mode": "exact", "k": None, "dtype": "float32",
           "device": device, "forced_jacobian_mode": jmode}  # fmt: skip
    try:
        model = cast(models[name], torch.float32)
        x, y = model_inputs(name, data[0][:n]), data[1][:n]
        _, first, _, _, p = kernel_call(tl, model, x, y, "exact", device, jacobian_mode=jmode)
        kern, warm, peak, used, _ = kernel_call(tl, model, x, y, "exact", device,
                                                jacobian_mode=jmode)  # fmt: skip
        m = min(N_REF, n) * CLASSES
        row.update(p=p, seconds_first=first, seconds_warm=warm, peak_bytes=peak,
                   jacobian_mode=used, lib_seconds=float(kern.metadata["seconds"]))  # fmt: skip
        if name in refs:
            row["rel_err_ref"] = rel_fro(kern.theta[:m, :m], refs[name]["exact/theta"][:m, :m])
        log(
            f"{name} N={n} exact float32 {device} forced {jmode}: first {first:.3f}s "
            f"warm {warm:.3f}s peak {(peak or 0) / 2**30:.2f} GiB err_ref {row.get('rel_err_ref')}"
        )
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-3000:]
        log(f"FAILED forced {jmode}: {row['error']}")
    return row, None


def run_dist(tag, backend, world, dev, args, out: Path, timeout: float | None = None) -> dict:
    """One torchrun launch of ``--part dist``; its ranks write JSON into out/dist-TAG."""
    import torch

    item = {"run": tag, "backend": backend, "world_size": world, "compute": dev}
    if dev.startswith("cuda") and not torch.cuda.is_available():
        item["status"] = "skipped: no CUDA device"
        log(f"dist {tag}: {item['status']}")
        return item
    work = Path("/tmp") / f"gpu-dist-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.glob("*.json"):
        f.unlink()
    port = 29500 + zlib.crc32(tag.encode()) % 400
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1", f"--master_port={port}",
        str(Path(__file__).resolve()), "--part", "dist", "--backend", backend,
        "--compute", dev, "--workdir", str(work),
    ] + (["--tiny"] if args.tiny else [])  # fmt: skip
    item["command"] = " ".join(cmd[1:])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    log(f"dist {tag}: {item['command']}")
    t0 = time.perf_counter()
    # a new session: on a timeout the whole group (torchrun and its ranks) is killed by id
    timeout = timeout or args.dist_timeout
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=timeout)
        item["returncode"] = proc.returncode
        item["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        item["status"] = f"timed out after {timeout:.0f}s (process group killed)"
    item["output_tail"] = (text or "")[-4000:]
    item["seconds"] = time.perf_counter() - t0
    item["ranks"] = [json.loads(f.read_text()) for f in sorted(work.glob("rank*.json"))]
    if item["status"] != "ok":
        item["error"] = _error_line(item.get("output_tail", ""))
    log(f"dist {tag}: {item['status']} in {item['seconds']:.1f}s "
        + (f"error: {item.get('error')}" if item["status"] != "ok" else ""))  # fmt: skip
    for r in item["ranks"]:
        for kk in r.get("kernels", []):
            log(f"   rank {r['rank']} {kk.get('model')} {kk.get('mode')} {kk.get('dtype')}: "
                f"{kk.get('seconds', float('nan')):.3f}s sharded={kk.get('processes')} "
                f"err_ref={kk.get('rel_err_ref')} vs_one_process={kk.get('rel_err_one_process')} "
                f"{kk.get('error', '')}")  # fmt: skip
    sys.stdout.flush()
    return item


def _error_line(text: str) -> str:
    keys = ("Error", "error", "refused", "Duplicate", "NCCL")
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    return " | ".join(dict.fromkeys(lines[-6:]))[:1500] or text.strip()[-500:]


def part_dist(args) -> None:
    """One rank under torchrun: the small models' kernels with distributed=True."""
    _use_snapshot()
    import torch
    import torch.distributed as dist

    import tangentlab as tl

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    work = Path(args.workdir)
    report = {"rank": rank, "world_size": world, "backend": args.backend,
              "compute": args.compute, "kernels": []}  # fmt: skip

    def save():
        (work / f"rank{rank}.json").write_text(json.dumps(report, indent=1, default=str))

    device = args.compute
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    save()
    t0 = time.perf_counter()
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    report["init_seconds"] = time.perf_counter() - t0
    save()
    models, data = load_models()
    refs = load_refs()
    sizes = TINY if args.tiny else MODELS
    try:
        for name in ("mlp", "cnn"):
            n = sizes[name]
            for dtype_name in ("float32", "float64"):
                for mode in ("exact", "projected"):
                    kk = {"model": name, "n": n, "mode": mode, "dtype": dtype_name}
                    try:
                        dtype = getattr(torch, dtype_name)
                        model = cast(models[name], dtype)
                        x = model_inputs(name, data[0][:n]).to(dtype)
                        y = data[1][:n]
                        kern, sec, peak, jm, _ = kernel_call(
                            tl, model, x, y, mode, device, distributed=True
                        )
                        kk.update(seconds=sec, peak_bytes=peak, jacobian_mode=jm,
                                  processes=kern.metadata.get("processes"))  # fmt: skip
                        theta = kern.gram()
                        m = min(N_REF, n) * CLASSES
                        if name in refs:
                            kk["rel_err_ref"] = rel_fro(
                                theta[:m, :m], refs[name][f"{mode}/theta"][:m, :m]
                            )
                        kk["sha"] = sha(theta)
                        shas = [None] * world
                        dist.all_gather_object(shas, kk["sha"])
                        kk["ranks_identical"] = len(set(shas)) == 1
                        if rank == 0:  # the one-process kernel, same device and dtype
                            one, sec1, _, _, _ = kernel_call(
                                tl, model, x, y, mode, device, distributed=False
                            )
                            kk["seconds_one_process"] = sec1
                            kk["rel_err_one_process"] = rel_fro(theta, one.gram())
                            kk["bitwise_one_process"] = bool(torch.equal(theta, one.gram()))
                        dist.barrier()
                    except Exception as exc:  # noqa: BLE001
                        kk["error"] = f"{type(exc).__name__}: {exc}"[:1500]
                        kk["traceback"] = traceback.format_exc()[-2000:]
                        report["kernels"].append(kk)
                        save()
                        raise
                    report["kernels"].append(kk)
                    save()
    finally:
        save()
        dist.destroy_process_group()


def part_diag(args) -> None:
    """Follow-up checks of the first device run (gpu.json "diagnostics"): where the float32
    error of the wide MLP's exact kernel at N=1000 comes from (the Jacobians or the
    contraction's matrix products, by their shape); the projected float64 kernel at N=1000
    that ran out of memory under ``auto`` (the plan, and the same call with
    ``jacobian_mode="structured"``); the CNN's float32 error with cuDNN's TF32 off."""
    _use_snapshot()
    import torch

    import tangentlab as tl
    from tangentlab import compute as tl_compute

    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    tiny = args.tiny
    doc = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "machine": machine(), "tangentlab": tl.__file__,
           "checks": []}  # fmt: skip
    path = out / "diag.json"

    def add(item):
        doc["checks"].append(item)
        path.write_text(json.dumps(doc, indent=1, default=str))
        log(json.dumps({k: v for k, v in item.items() if k != "traceback"}, default=str))

    models, data = load_models()
    refs = load_refs()
    wide = models["mlp-wide"]
    n_ref = 8 if tiny else N_REF
    x_ref = data[0][:n_ref]

    # 1. the float32 exact kernel's error: Jacobians vs products, by the products' shape
    item = {"check": "float32 contraction precision (wide MLP, first samples' block)"}
    try:
        t64 = tl.Tangent(cast(wide, torch.float64), jacobian_mode="vmap").to(dev)
        b64 = t64.jacobian_blocks(x_ref.double())
        names = t64.param_names
        j64 = {nm: b64[nm].reshape(n_ref * CLASSES, -1) for nm in names}
        ref = sum(j64[nm] @ j64[nm].T for nm in names)
        t32 = tl.Tangent(cast(wide, torch.float32), jacobian_mode="vmap").to(dev)
        b32 = t32.jacobian_blocks(x_ref)
        j32 = {nm: b32[nm].reshape(n_ref * CLASSES, -1) for nm in names}
        item["jacobian_fp32_rel_err"] = rel_fro(
            torch.cat([j32[nm] for nm in names], 1), torch.cat([j64[nm] for nm in names], 1)
        )
        # exact fp32 products of the fp32 Jacobians: float64 products of the rounded inputs
        j32r = {nm: j32[nm].double() for nm in names}
        ref_rounded = sum(j32r[nm] @ j32r[nm].T for nm in names)
        item["kernel_from_fp32_jacobians_exact_products_rel_err"] = rel_fro(ref_rounded, ref)
        shapes = {}
        g = torch.Generator(device=dev).manual_seed(0)
        m0 = n_ref * CLASSES
        for rows in (m0, 2000, 4000, 10000) if not tiny else (m0, 2 * m0):
            prod = 0
            for nm in names:
                a = j32[nm]
                if rows > m0:  # more rows of the same scale: the shape the library multiplies
                    extra = torch.randn(rows - m0, a.shape[1], generator=g, device=dev)
                    a = torch.cat([a, extra * a.std()])
                prod = prod + (a @ a.T)[:m0, :m0]
                del a
            shapes[f"[{rows}, P] @ [P, {rows}]"] = rel_fro(prod, ref_rounded)
            del prod
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        item["fp32_products_rel_err_vs_exact_products_by_shape"] = shapes
        cpu_prod = sum(j32[nm].cpu() @ j32[nm].cpu().T for nm in names)
        item["fp32_products_on_cpu_rel_err"] = rel_fro(cpu_prod, ref_rounded)
        item["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        item["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        if "mlp-wide" in refs:
            item["ref_vs_this_fp64_rel_err"] = rel_fro(ref, refs["mlp-wide"]["exact/theta"][
                :m0, :m0])  # fmt: skip
        del b64, j64, b32, j32, j32r, ref, ref_rounded
    except Exception as exc:  # noqa: BLE001
        item["error"] = f"{type(exc).__name__}: {exc}"
        item["traceback"] = traceback.format_exc()[-3000:]
    add(item)
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    # 2. the projected wide MLP at N=1000: the plan under auto, then forced strategies
    n = TINY["mlp-wide"] if tiny else MODELS["mlp-wide"]
    item = {"check": f"projected wide MLP N={n}: memory plan by jacobian_mode"}
    try:
        x, y = data[0][:n], data[1][:n]
        for dt in ("float64", "float32"):
            for jm in ("auto", "structured", "vmap"):
                t = tl.Tangent(cast(wide, getattr(torch, dt)), jacobian_mode=jm,
                               projection=tl.Projection(K, seed=PROJ_SEED))  # fmt: skip
                job = tl_compute._prepare(
                    t, (x.to(getattr(torch, dt)), y), None, None, None, None, dev, None,
                    seed=0, keep_theta=None, progress=False, distributed=None, trace=False,
                )  # fmt: skip
                item[f"{dt}/{jm}"] = {
                    "materialized_params": t.materialized_params(x[:1].to(t.dtype)),
                    "chunk": job.mplan.chunk, "plan": job.mplan.describe(),
                }  # fmt: skip
        t = tl.Tangent(cast(wide, torch.float32))  # the exact kernel's strips, for reference
        job = tl_compute._prepare(
            t, (x, y), None, None, None, None, dev, None,
            seed=0, keep_theta=None, progress=False, distributed=None, trace=False,
        )  # fmt: skip
        item["exact/float32/auto"] = {"chunk": job.mplan.chunk, "strip": job.mplan.strip,
                                      "plan": job.mplan.describe()}  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        item["error"] = f"{type(exc).__name__}: {exc}"
        item["traceback"] = traceback.format_exc()[-3000:]
    add(item)
    for dt in ("float64", "float32"):
        row = {"check": f"projected wide MLP N={n} {dt}, jacobian_mode=structured (forced)"}
        try:
            model = cast(wide, getattr(torch, dt))
            xx = data[0][:n].to(getattr(torch, dt))
            kern, sec, peak, used, _ = kernel_call(
                tl, model, xx, data[1][:n], "projected", dev, jacobian_mode="structured"
            )
            kern2, sec2, peak2, _, _ = kernel_call(
                tl, model, xx, data[1][:n], "projected", dev, jacobian_mode="structured"
            )
            m = min(N_REF, n) * CLASSES
            err = rel_fro(kern2.gram()[:m, :m], refs["mlp-wide"]["projected/theta"][:m, :m])
            row.update(seconds_first=sec, seconds_warm=sec2, peak_bytes=peak2, used=used,
                       rel_err_ref=err)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-3000:]
        add(row)
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    # 3. the CNN's float32 kernels with cuDNN's TF32 convolutions off
    n = TINY["cnn"] if tiny else MODELS["cnn"]
    before = torch.backends.cudnn.allow_tf32
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        for mode in ("exact", "projected"):
            for jm in ("structured", "vmap", "loop-jacrev"):
                row = {"check": f"cnn N={n} {mode} float32, cudnn.allow_tf32={tf32}, {jm}"}
                try:
                    model = cast(models["cnn"], torch.float32)
                    xx = model_inputs("cnn", data[0][:n])
                    kern, sec, peak, used, _ = kernel_call(
                        tl, model, xx, data[1][:n], mode, dev, jacobian_mode=jm
                    )
                    m = min(N_REF, n) * CLASSES
                    row.update(seconds=sec, used=used, rel_err_ref=rel_fro(
                        kern.gram()[:m, :m], refs["cnn"][f"{mode}/theta"][:m, :m]))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"
                add(row)
    torch.backends.cudnn.allow_tf32 = before
    doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path.write_text(json.dumps(doc, indent=1, default=str))
    log(f"done: {path}")


# ---- render -----------------------------------------------------------------------------
def _cell(text: str, most: int = 200) -> str:
    """One table cell: one line, no pipes, at most ``most`` characters."""
    return " ".join(str(text).split()).replace("|", "/")[:most]


def _fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _render_diagnostics(diag: dict | None) -> list[str]:
    """The follow-up checks (``--part diag``, a second device run) as markdown."""
    if not diag:
        return []
    checks = diag["checks"]
    lines = ["", "Follow-up checks on the device (`python3 benchmarks/gpu.py --part diag`, "
             f"{diag['started']}):", ""]  # fmt: skip
    prec = next((c for c in checks if c["check"].startswith("float32 contraction")), None)
    if prec and "error" not in prec:
        lines += [
            f"- float32 exact kernel of the wide MLP, block of the first {N_REF} samples: the "
            f"fp32 Jacobians differ from fp64 by {prec['jacobian_fp32_rel_err']:.1e}, the "
            "kernel from them with exact products by "
            f"{prec['kernel_from_fp32_jacobians_exact_products_rel_err']:.1e}; cuBLAS fp32 "
            "products of the same rows (TF32 "
            f"{'on' if prec['matmul_allow_tf32'] else 'off'}, precision "
            f"'{prec['float32_matmul_precision']}'), the block taken from a product of this "
            "shape: "
            + ", ".join(
                f"`{k}` {v:.1e}"
                for k, v in prec["fp32_products_rel_err_vs_exact_products_by_shape"].items()
            )  # fmt: skip
            + f"; the device CPU's fp32 product: {prec['fp32_products_on_cpu_rel_err']:.1e}.",
        ]
    plan = next((c for c in checks if c["check"].endswith("memory plan by jacobian_mode")), None)
    if plan and "error" not in plan:
        parts = [f"{k}: chunk {v['chunk']} ({v['plan'].split(', ', 1)[1]})"
                 for k, v in plan.items() if isinstance(v, dict)]  # fmt: skip
        lines.append(f"- {plan['check']}: " + "; ".join(parts) + ".")
    for c in checks:
        if "jacobian_mode=structured (forced)" in c["check"]:
            if "error" in c:
                lines.append(f"- {c['check']}: failed: {_cell(c['error'])}")
            else:
                lines.append(
                    f"- {c['check']}: {c['seconds_warm']:.3f} s warm ({c['seconds_first']:.3f} s "
                    f"first), peak {c['peak_bytes'] / 2**30:.2f} GiB, err ref "
                    f"{c['rel_err_ref']:.1e}."
                )
    cnn = [c for c in checks if c["check"].startswith("cnn ")]
    if cnn:
        lines += ["", "| CNN float32 on CUDA | err ref |", "|---|---:|"]
        for c in cnn:
            err = _fmt(c.get("rel_err_ref"), ".1e") if "error" not in c else _cell(c["error"])
            lines.append(f"| {c['check']} | {err} |")
    return lines


def merge_fix(args) -> None:
    """Store a ``--only`` run's gpu_fix.json in gpu.json under "after_fix" (the rest kept)."""
    path = Path(args.json or RESULTS / "gpu.json")
    doc = json.loads(path.read_text())
    fix = json.loads(Path(args.merge_fix).read_text())
    here = ROOT / "src" / "tangentlab" / "tangent.py"
    fix["working_tree_tangent_py_sha256"] = hashlib.sha256(here.read_bytes()).hexdigest()
    doc["after_fix"] = fix
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"stored {args.merge_fix} in {path} under 'after_fix'")


_PLANNED = __import__("re").compile(r"planned peak ([0-9.]+) GiB")


def _render_after_fix(doc: dict) -> list[str]:
    """The ``--only`` rerun with the fixed library, next to the first run's rows."""
    fix = doc.get("after_fix")
    if not fix:
        return []
    day = fix["started"][:10]
    diag_checks = (doc.get("diagnostics") or {}).get("checks", [])
    plan_item = next((c for c in diag_checks
                      if c["check"].endswith("memory plan by jacobian_mode")), {})  # fmt: skip
    forced = {(m.group(1), m.group(2)): c for c in diag_checks
              if (m := __import__("re").search(r"N=(\d+) (float\d+), jacobian_mode=structured "
                                               r"\(forced\)", c["check"]))}  # fmt: skip

    def before_planned(mode: str, dtype: str) -> str:
        key = f"{dtype}/auto" if mode == "projected" else f"exact/{dtype}/auto"
        m = _PLANNED.search((plan_item.get(key) or {}).get("plan", ""))
        return f"{m.group(1)} GiB" if m else "—"

    def gib_(b) -> str:
        return "—" if b is None else f"{b / 2**30:.2f} GiB"

    lines = [
        "", f"### After the fix (working tree of {day})", "",
        "`jacobian_mode=\"auto\"` with a tensor-sketch projection now keeps the structured "
        "(sketch) path that the memory plan assumed, and auto's strategy timing synchronizes "
        "CUDA (`Tangent._choose_mode`, src/tangentlab/tangent.py, uncommitted). Rerun of the "
        "wide MLP at N=1000 on the device with the working tree's library copied to "
        "`.gpu_snapshot/src` (tangent.py sha256 "
        f"`{(fix.get('tangent_py_sha256') or '?')[:16]}`), {fix['started']} – "
        f"{fix.get('finished', 'unfinished')}, {fix['machine'].get('gpu', 'no GPU')}, torch "
        f"{fix['machine']['torch']}:", "",
        "```", "export PYTHONPATH=.gpu_snapshot/src PYTHONUNBUFFERED=1; set -o pipefail;",
        f"python3 {fix['command']} 2>&1 | tee $OUT/gpu_fix.log", "```", "",
        "*Before* = the first run above (`auto`; planned peak from the follow-up checks' "
        "memory plan; projected rows also with `structured` forced). *After* = this run, "
        "`auto`; planned peak = the library's memory plan of that call (`job.mplan`). Peak = "
        "`torch.cuda.max_memory_allocated` of the warm call (*peak first*: of the first call). "
        "This run's first row is the process's first CUDA work (cuBLAS handle, autograd): its "
        "*s first* includes that start-up, which the first run had spent on smaller models.",
        "",
        "| mode | dtype | run | Jacobians | s warm | s first | peak GPU | peak first "
        "| planned peak | err ref |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    before = {(r["mode"], r["dtype"], r["n"]): r for r in doc["rows"]
              if r["model"] == "mlp-wide" and r["device"] != "cpu"
              and not r.get("forced_jacobian_mode")}  # fmt: skip
    for r in fix["rows"]:
        mode, dt = r["mode"], r["dtype"]
        if r["model"] != "mlp-wide":
            continue
        label = mode + (f" k={r['k']}" if r.get("k") else "")
        b = before.get((mode, dt, r["n"]))
        if b is not None:
            if "error" in b:
                lines.append(f"| {label} | {dt} | before (auto) | — | failed: "
                             f"{_cell(b['error'], 120)} ||||||")  # fmt: skip
            else:
                jm = b.get("jacobian_mode", "")
                lines.append(
                    f"| {label} | {dt} | before (auto) | {jm} "
                    f"| {_fmt(b.get('seconds_warm'), '.3f')} | {b['seconds_first']:.3f} "
                    f"| {gib_(b.get('peak_bytes'))} | {gib_(b.get('peak_bytes_first'))} "
                    f"| {before_planned(mode, dt)} | {_fmt(b.get('rel_err_ref'), '.1e')} |"
                )
        f = forced.get((str(r["n"]), dt)) if mode == "projected" else None
        if f is not None and "error" not in f:
            lines.append(
                f"| {label} | {dt} | before (structured forced) | structured "
                f"| {f['seconds_warm']:.3f} | {f['seconds_first']:.3f} | {gib_(f['peak_bytes'])} "
                f"| — | {before_planned(mode, dt)} | {f['rel_err_ref']:.1e} |"
            )
        if "error" in r:
            lines.append(f"| {label} | {dt} | **after** (auto) | — | failed: "
                         f"{_cell(r['error'], 120)} ||||||")  # fmt: skip
            continue
        jm = r.get("jacobian_mode", "")
        if r.get("jacobian_mode_warm") and r["jacobian_mode_warm"] != jm:
            jm = f"{jm} → {r['jacobian_mode_warm']}"
        plan, plan1 = r.get("plan") or r.get("plan_first") or {}, r.get("plan_first") or {}
        planned = gib_(plan.get("estimate"))
        if plan1.get("estimate") not in (None, plan.get("estimate")):
            planned += f" (first {gib_(plan1['estimate'])})"
        lines.append(
            f"| {label} | {dt} | **after** (auto) | {jm} | {_fmt(r.get('seconds_warm'), '.3f')} "
            f"| {r['seconds_first']:.3f} | {gib_(r.get('peak_bytes'))} "
            f"| {gib_(r.get('peak_bytes_first'))} | {planned} "
            f"| {_fmt(r.get('rel_err_ref'), '.1e')} |"
        )
    plans = [
        f"{r['mode']} {r['dtype']}: chunk {r['plan_first']['chunk']} / strip "
        f"{r['plan_first']['strip']} of {gib_(r['plan_first']['budget'])} → chunk "
        f"{r['plan']['chunk']} / strip {r['plan']['strip']} of {gib_(r['plan']['budget'])}"
        for r in fix["rows"]
        if r.get("plan") and r.get("plan_first")
    ]
    if plans:
        lines += ["", "Memory plans after the fix, first → warm call (the warm call's budget is "
                  "what the device had free then): " + "; ".join(plans) + "."]  # fmt: skip
    if fix.get("skipped"):
        lines += ["", "Skipped at the run's own deadline: " + "; ".join(fix["skipped"]) + "."]
    return lines


def render(args) -> None:
    doc = json.loads(Path(args.json or RESULTS / "gpu.json").read_text())
    rows = doc["rows"]
    cpu_warm = {
        (r["model"], r["n"], r["mode"], r["dtype"]): r.get("seconds_warm") or r.get("seconds_first")
        for r in rows
        if r["device"] == "cpu" and "error" not in r
    }
    mach = doc["machine"]
    lines = [
        "## GPU kernels (issue 12, part 4)",
        "",
        f"Machine: {mach.get('gpu', 'no GPU')} ({mach.get('gpu_memory_gib', '?')} GiB; "
        f"{mach.get('nvidia_smi', '')}), CUDA {mach.get('cuda')}, NCCL {mach.get('nccl')}, "
        f"{mach['cpu']} ({mach['cores']} cores, torch {mach['torch_threads']} threads), "
        f"Python {mach['python']}, torch {mach['torch']}; TF32: matmul "
        f"{mach.get('matmul_allow_tf32')}, cuDNN {mach.get('cudnn_allow_tf32')} (torch "
        "defaults). Library: git HEAD snapshot "
        f"(`{Path(doc['tangentlab']).parent.parent.name}/…`, version "
        f"{doc['tangentlab_version']}). Run {doc['started']} – "
        f"{doc.get('finished', 'unfinished')}.",
        "",
        "Command (on the device, from the repository root, with `.gpu_snapshot/` carried):",
        "",
        "```",
        "export PYTHONPATH=.gpu_snapshot/src PYTHONUNBUFFERED=1; set -o pipefail;",
        "python3 benchmarks/gpu.py --part gpu 2>&1 | tee $OUT/gpu.log",
        "```",
        "",
        f"References: `benchmarks/gpu.py --part cpu` on this repository's CPU machine, float64, "
        f"kernel of the first {doc['n_ref']} samples (exact, and tensor sketch k={doc['k']} "
        f"seed {doc['proj_seed']}). *err ref* = ‖K − K_ref‖_F / ‖K_ref‖_F on that block "
        "(the projected row against the projected reference: the same sketch). *err dev-CPU* "
        "= the same on the whole kernel against the device's own float64 CPU kernel. "
        "*s warm* = second call (*s first* = first call of that configuration in the process, "
        "CUDA context already created; it includes `auto` timing the Jacobian strategies). "
        "*speed-up* = device-CPU warm seconds / this row's warm seconds, same model, N, mode, "
        "dtype. Peak = `torch.cuda.max_memory_allocated` of the warm call.",
        "",
        "| model | N | P | mode | dtype | device | s warm | s first | peak GPU | Jacobians "
        "| err ref | err dev-CPU | speed-up |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        mode = r["mode"] + (f" k={r['k']}" if r.get("k") else "")
        jm = r.get("jacobian_mode", "")
        if r.get("jacobian_mode_warm") and r["jacobian_mode_warm"] != jm:
            jm = f"{jm} → {r['jacobian_mode_warm']}"
        if r.get("forced_jacobian_mode"):
            jm = f"{jm} (forced)"
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['n']} | {_fmt(r.get('p'), ',')} | {mode} | {r['dtype']} "
                f"| {r['device']} | failed: {_cell(r['error'])} |||||||"
            )
            continue
        warm = r.get("seconds_warm")
        base = cpu_warm.get((r["model"], r["n"], r["mode"], r["dtype"]))
        speed = None
        if r["device"] != "cpu" and base and (warm or r.get("seconds_first")):
            speed = base / (warm or r["seconds_first"])
        peak = r.get("peak_bytes")
        lines.append(
            f"| {r['model']} | {r['n']} | {r['p']:,} | {mode} | {r['dtype']} | {r['device']} "
            f"| {_fmt(warm, '.3f')} | {r['seconds_first']:.3f} "
            f"| {_fmt(peak and peak / 2**30, '.2f')}{' GiB' if peak else ''} | {jm} "
            f"| {_fmt(r.get('rel_err_ref'), '.1e')} | {_fmt(r.get('rel_err_devcpu'), '.1e')} "
            f"| {_fmt(speed, '.1f')}{'×' if speed else ''} |"
        )
    lines += ["", "Distributed (`torchrun` on the device; each rank's kernel with "
              "`distributed=True`):", "",
              "| run | status | model | N | mode | dtype | sharded over | s | err ref "
              "| vs one process | ranks identical |",
              "|---|---|---|---:|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for d in doc.get("distributed", []):
        rank0 = next((r for r in d.get("ranks", []) if r.get("rank") == 0), None)
        kernels = rank0.get("kernels", []) if rank0 else []
        status = d["status"]
        if d.get("error") and not kernels:
            status += f": {_cell(d['error'], 300)}"
        status = _cell(status, 300)
        if not kernels:
            lines.append(f"| {d['run']} | {status} |||||||||")
        for i, kk in enumerate(kernels):
            one = kk.get("rel_err_one_process")
            one_s = "—" if one is None else ("bitwise" if kk.get("bitwise_one_process")
                                             else f"{one:.1e}")  # fmt: skip
            lines.append(
                f"| {d['run'] if i == 0 else ''} | {status if i == 0 else ''} | {kk['model']} "
                f"| {kk['n']} | {kk['mode']} | {kk['dtype']} "
                f"| {kk.get('processes') or '1 (not sharded)'} "
                f"| {_fmt(kk.get('seconds'), '.3f')} | {_fmt(kk.get('rel_err_ref'), '.1e')} "
                f"| {one_s} | {kk.get('ranks_identical', '—')} |"
                if "error" not in kk
                else f"| {d['run'] if i == 0 else ''} | {status if i == 0 else ''} | {kk['model']} "
                f"| {kk['n']} | {kk['mode']} | {kk['dtype']} | failed: "
                f"{_cell(kk['error'].splitlines()[-1], 300)} |||||"
            )
    if doc.get("skipped"):
        lines += ["", "Skipped at the run's own deadline: " + "; ".join(doc["skipped"]) + "."]
    lines += _render_diagnostics(doc.get("diagnostics"))
    if args.reading:
        lines += ["", Path(args.reading).read_text().strip()]
    elif doc.get("reading"):
        lines += ["", doc["reading"].strip()]
    lines += _render_after_fix(doc)
    md = Path(args.md or RESULTS / "gpu.md")
    md.write_text("\n".join(lines) + "\n")
    log(f"wrote {md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["cpu", "gpu", "dist", "diag"])
    ap.add_argument("--render", action="store_true", help="benchmarks/results/gpu.md from gpu.json")
    ap.add_argument("--json", help="--render: input (default benchmarks/results/gpu.json)")
    ap.add_argument("--md", help="--render: output (default benchmarks/results/gpu.md)")
    ap.add_argument("--reading", help="a markdown file appended to gpu.md as the reading")
    ap.add_argument("--device", default="cuda", help="--part gpu: cuda, or cpu for a dry run")
    ap.add_argument("--simulate-gpu", action="store_true",
                    help="dry run: also run the GPU-only steps, on the CPU")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="small N, to check that it runs")
    ap.add_argument("--out", help="--part gpu: output folder (default $OUT)")
    ap.add_argument("--dist-timeout", type=float, default=120.0)
    ap.add_argument(
        "--deadline-s", type=float, default=270.0, help="--part gpu: skip the rest after"
    )
    ap.add_argument("--only", help="--part gpu: MODEL[,MODEL] at full N on the device only "
                    "(no CPU rows, no distributed part) -> $OUT/gpu_fix.json")  # fmt: skip
    ap.add_argument("--dtypes", help="--part gpu --only: dtypes (default float32,float64)")
    ap.add_argument("--merge-fix", help="store this gpu_fix.json in gpu.json as 'after_fix'")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--compute", default="cpu")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.merge_fix:
        merge_fix(args)
    elif args.render:
        render(args)
    elif args.part == "cpu":
        part_cpu(args)
    elif args.part == "gpu":
        part_gpu(args)
    elif args.part == "dist":
        part_dist(args)
    elif args.part == "diag":
        part_diag(args)
    else:
        ap.error("give --part or --render")


if __name__ == "__main__":
    main()

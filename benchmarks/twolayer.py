"""Does the two-layer exact model survive a subspace? A function-space version of
``deephead.py``'s "two layers exact" model (issue 13): developed on the stored image
development tasks, then scored once on held-out ones (``--holdout``: rounds 8-9's image
tasks; ``--fresh``: ``twolayer_fresh.py``'s), with its reliability check and interval.

    .venv/bin/python benchmarks/twolayer.py --check             # against weight space, N = 16
    .venv/bin/python benchmarks/twolayer.py                     # every image development task
    .venv/bin/python benchmarks/twolayer.py --task NAME --q 64  # one task, one variant
    .venv/bin/python benchmarks/twolayer.py --grid              # the library's, whole grid
    .venv/bin/python benchmarks/twolayer.py --choose-band       # its steps interval
    .venv/bin/python benchmarks/twolayer.py --choose-check      # its reliability check
    .venv/bin/python benchmarks/twolayer.py --fresh             # twolayer_fresh.py's, once
    .venv/bin/python benchmarks/twolayer.py --text              # text development tasks
    .venv/bin/python benchmarks/twolayer.py --holdout           # rounds 8-9's tasks, once
    .venv/bin/python benchmarks/twolayer.py --cost NAME         # timed alone, one process
    .venv/bin/python benchmarks/twolayer.py --report            # RESULTS.md section only

(needs ``deephead.py``'s stored runs, ``benchmarks/results/deephead/``, and the rounds'
weights and data: ``make bench-deps``.)

**Why.** On the convolutional bodies (EfficientNet-Lite0/1 at 32 px) keeping the head conv
(1x1, 320 -> 1280, frozen BN, ReLU6), the pooling and the linear head exact, with only the
last MBConv block linearized, tracked the real runs to 0% / 16% over 151 targets, in weight
space with autograd (RESULTS.md "deephead"): a diagnostic that costs what training costs.
The library's head-exact model keeps only the linear head exact and scores 111% / 471%.
``deephead.py --span`` measured what a function-space version would need: at w0 the
gradients ∂f_i/∂z_i of z (the block's output, 320-d) need 35-163 directions for 90% of
their energy. This measures whether its accuracy survives such a subspace, and its cost.

**The model.** z_i = z0_i + J_i Δw (J_i = ∂z(x_i)/∂w_block), logits f_i = g(z_i; θ) with
g the exact head conv, BN, ReLU6, pooling and linear head and θ their weights. SGD with
momentum m on the mean loss L, in the variables (θ, Δz_1..Δz_N), is exact in function
space: with γ_j = ∂L/∂z_j and K(i, j) = J_i J_jᵀ ``[D, D]``,

    u_i ← m u_i + Σ_j K(i, j) γ_j,    Δz_i ← Δz_i − η u_i,    θ ← SGD(θ, ∂L/∂θ)

(u_i = J_i v, v the block's momentum buffer: the same recursion, mapped through J). K is
kept as the library keeps the head-exact model's feature kernel (NOTE [head exact, body
linear]): exact inside a q-dimensional subspace Q of z-space, M(i, j) = Qᵀ K(i, j) Q (the
NTK of the read-out Qᵀ z: ``compute_kernel`` of ``Tangent.probed(Q)``, projected with the
rounds' k), isotropic outside it (κ_⊥ from 4 probes, ``headbody._rest_kernel``):

    K(i, j) γ ≈ Q M(i, j) Qᵀ γ + κ_⊥(i, j) (I − QQᵀ) γ.

Q: the top ⌈q/2⌉ right singular vectors of the stacked rows ∂f_i/∂z_i at w0 (the
gradients' directions) and the top ⌊q/2⌋ principal directions of z0 orthogonal to them (the
head conv's update is a sum of outer products with the z_j, as W's is with φ_j: NOTE [head
exact, body linear]); q = D keeps all of z (no κ_⊥; only the projection's error).

**Check** (``--check``): with the exact kernel (no projection) and q = D the simulation
(this script's, with and without ``fast``, and the library's
``tangentlab.experimental.exact_top``) equals ``deephead.simulate``'s weight-space "two
layers exact" run on 16 samples of lfw-lite0 to float32 round-off (the script fails
otherwise).

**Scored** as ``deephead.py``: the same cells (full batch, {mse, ce} x {m 0, a 0.3;
m 0.9, a 0.1}, the stored learning rates), steps to a 50 / 80 / 90% drop of the real L0,
|T̂ − T|/T, a miss at 3x the real run's steps counts +∞; *corrected*: T̂ scaled by the median
T / T̂ of the same cell and drop on the other tasks (left out). Cost: the kernel's seconds
(Q, M, κ_⊥) and the simulation's, one thread, against the stored real run of the top on
cached trunk outputs (``deephead.py``, also one thread).
Results: ``benchmarks/results/twolayer/`` and the "twolayer" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deephead as dh  # noqa: E402
import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab.headbody import _rest_kernel  # noqa: E402

OUT = Path(os.environ.get("HOLDOUT_OUT") or Path(__file__).resolve().parent / "results"
           / "twolayer")  # fmt: skip
COMMAND = ".venv/bin/python benchmarks/twolayer.py"
VARIANTS = ("2C", "64", "128", "D")  # q: 2C (the library's default size), 64, 128, all of z
PROBES = 4
PRE = "top."


def _split(top, params: list[str]) -> tuple[list[str], list[str]]:
    """(the block's trainable weights, the exact part's) among ``params``."""
    exact = [n for n in params if n.startswith(dh.exact_names(top, "two layers exact"))]
    return [n for n in params if n not in exact], exact


def z_basis(top, h: torch.Tensor, q: int) -> torch.Tensor:
    """Q ``[D, q]`` orthonormal, float64: ⌈q/2⌉ gradient directions, ⌊q/2⌋ of z0 (docstring);
    the identity for q >= D."""
    body, exact = dh.parts(top, "two layers exact")
    with torch.no_grad():
        z = body(h)
    d = int(z[0].numel())
    if q >= d:
        return torch.eye(d, dtype=torch.float64)
    jac = vmap(jacrev(lambda zi: exact(zi[None])[0]))(z.detach())  # [N, C, *z]
    rows = jac.reshape(-1, d).double()
    qg = (q + 1) // 2
    grad = torch.linalg.svd(rows, full_matrices=False)[2][:qg].T  # [D, qg]
    z0 = z.reshape(len(z), d).double()
    z0 = z0 - (z0 @ grad) @ grad.T
    pca = torch.linalg.svd(z0, full_matrices=False)[2][: q - qg].T
    basis, _ = torch.linalg.qr(torch.cat([grad, pca], 1))
    return basis


class _Flat(torch.nn.Module):
    """The block as a module of ``top``'s weights, outputs flattened ``[B, D]``."""

    def __init__(self, top) -> None:
        super().__init__()
        self.top = top
        object.__setattr__(self, "body", dh.parts(top, "two layers exact")[0])  # no 2nd name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h).flatten(1)


def z_kernel(top, h: torch.Tensor, params: list[str], basis: torch.Tensor,
             projection: int | None) -> dict:
    """The read-out kernel of Qᵀ z (Φ ``[N q, k]`` projected, or Θ ``[N q, N q]`` exact) and
    κ_⊥ ``[N, N]`` (None when Q is all of z), with the seconds they cost."""
    from tangentlab.compute import compute_kernel
    from tangentlab.tangent import Tangent

    block, _ = _split(top, params)
    tb = Tangent(_Flat(top), params=[PRE + n for n in block], projection=projection, seed=0)
    zeros = torch.zeros(len(h), dtype=torch.long)
    t0 = time.perf_counter()
    k = compute_kernel(tb.probed(basis.to(tb.dtype)), (h, zeros), progress=False,
                       keep_theta=None if projection is None else False)  # fmt: skip
    rest, _ = _rest_kernel(tb, h, zeros, basis, PROBES, 0, dict(progress=False))
    secs = time.perf_counter() - t0
    if projection is None:
        return dict(theta=k.theta.detach().double(), phi=None, rest=rest, seconds=secs)
    return dict(theta=None, phi=k.features.detach(), rest=rest, seconds=secs)


def _matrix_head(top, names: list[str]):
    """The exact part of a Lite top on a 1 x 1 map as matrices, ``f(z [N, D], θ) -> [N, C]``
    (the head conv is then a linear map; mkldnn's 1 x 1 convolution backward on a 1 x 1 map
    is ~10x slower than the same GEMM), or None when it does not apply."""
    import torch.nn.functional as F

    if hasattr(top, "bert") or top._conv_head.kernel_size != (1, 1):
        return None
    bn, conv = top._bn1, top._conv_head

    def fn(z: torch.Tensor, th: dict) -> torch.Tensor:
        def w(name: str, mod, attr: str):
            return th.get(name, getattr(mod, attr))

        a = F.linear(z, w("_conv_head.weight", conv, "weight").flatten(1),
                     w("_conv_head.bias", conv, "bias"))  # fmt: skip
        a = F.batch_norm(a, bn.running_mean, bn.running_var, w("_bn1.weight", bn, "weight"),
                         w("_bn1.bias", bn, "bias"), False, 0.0, bn.eps)  # fmt: skip
        return F.linear(top._swish(a), w("_fc.weight", top._fc, "weight"),
                        w("_fc.bias", top._fc, "bias"))  # fmt: skip

    return fn


def simulate(top, h: torch.Tensor, y: torch.Tensor, params: list[str], basis: torch.Tensor,
             kern: dict, *, loss: str, lr: float, momentum: float, steps: int,
             fast: bool = False) -> tuple[list[float], float]:
    """Full-batch SGD on the function-space two-layer model (docstring); the loss before each
    step ``[<= steps + 1]`` (stops at a 90% drop or a blow-up) and the seconds. ``fast``:
    the exact part as matrices on a 1 x 1 map (``_matrix_head``) and M = Φ Φᵀ formed once
    when N q <= k (the accuracy runs use neither: same model, other round-off)."""
    fn = tl.training.as_loss(loss, "twolayer")
    body, exact = dh.parts(top, "two layers exact")
    _, names = _split(top, params)
    w0 = dict(top.named_parameters())
    theta = [w0[n].detach().clone().requires_grad_(True) for n in names]
    with torch.no_grad():
        z0 = body(h)
    shape, n, q = z0.shape, len(z0), basis.shape[1]
    z0 = z0.reshape(n, -1)
    dt = z0.dtype
    qb = basis.to(dt)
    phi = None if kern["phi"] is None else kern["phi"].to(dt)
    theta_k = None if kern["theta"] is None else kern["theta"].to(dt)
    matrix = _matrix_head(top, names) if fast and z0.shape[1] == shape[1] else None
    if fast and phi is not None and phi.shape[0] <= phi.shape[1]:
        theta_k, phi = phi @ phi.T, None
    rest = None if kern["rest"] is None else kern["rest"].to(dt)
    dz = torch.zeros_like(z0)
    u = torch.zeros_like(z0)
    opt = tl.SGD(lr, momentum=momentum).torch_optimizer(theta)
    curve: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps + 1):
        if matrix is not None:
            z = (z0 + dz).requires_grad_(True)
            logits = matrix(z, dict(zip(names, theta)))
        else:
            z = (z0 + dz).reshape(shape).requires_grad_(True)
            logits = functional_call(exact, {PRE + a: t for a, t in zip(names, theta)}, (z,))
        value = fn.per_sample(logits, y).mean()
        curve.append(float(value.detach()))
        if not math.isfinite(curve[-1]) or curve[-1] > dh.BLOWUP * curve[0]:
            break
        if curve[-1] <= (1 - max(ho.DROPS)) * curve[0] or len(curve) > steps:
            break
        opt.zero_grad()
        value.backward()
        with torch.no_grad():
            g = z.grad.reshape(n, -1)
            c = (g @ qb).reshape(n * q)
            kc = theta_k @ c if phi is None else phi @ (phi.T @ c)
            kg = kc.reshape(n, q) @ qb.T
            if rest is not None:
                kg += rest @ (g - (g @ qb) @ qb.T)
            u.mul_(momentum).add_(kg)
            dz.sub_(lr * u)
        opt.step()
    return curve, time.perf_counter() - t0


def check(n: int = 16) -> float:
    """The exact kernel with q = D against ``deephead.simulate``'s weight-space run: max
    |ΔL| / L0 over each cell's first 40 steps (lfw-lite0, ``n`` samples)."""
    dh.dev_tasks()
    task = ho.load_task("lfw-lite0")
    top, h, y = task["top"], task["x"][:n], task["y"][:n]
    for p in top.parameters():
        p.requires_grad_(False)
    pat = re.compile(task["params"])
    params = [a for a, _ in top.named_parameters() if pat.search(a)]
    basis = z_basis(top, h, 10**9)
    kern = z_kernel(top, h, params, basis, None)
    from tangentlab.experimental.exact_top import compute_exact_top_kernel, forecast_exact_top

    block, names = _split(top, params)
    body, exact = (m.eval() for m in dh.parts(top, "two layers exact"))
    etk = compute_exact_top_kernel(body, exact, (h, y), params=[PRE + a for a in block],
                                   top_params=[PRE + a for a in names], directions="all",
                                   progress=False)  # fmt: skip
    worst = 0.0
    for loss, lr, m in (("mse", 0.002, 0.0), ("mse", 0.001, 0.9), ("ce", 0.01, 0.9)):
        ref, _ = dh.simulate(top, h, y, params, "two layers exact", loss=loss, lr=lr,
                             momentum=m, steps=40)  # fmt: skip
        for fast in (False, True):
            got, _ = simulate(top, h, y, params, basis, kern, loss=loss, lr=lr, momentum=m,
                              steps=40, fast=fast)  # fmt: skip
            k = min(len(ref), len(got))
            gap = float(np.max(np.abs(np.subtract(ref[:k], got[:k]))) / ref[0])
            print(f"check {loss} m={m} fast={fast}: {k} steps, max |ΔL|/L0 = {gap:.2e}, "
                  f"drop {1 - ref[k - 1] / ref[0]:.2f}", flush=True)
            worst = max(worst, gap)
        lib = forecast_exact_top(etk, tl.SGD(lr, momentum=m), len(ref) - 1, loss=loss,
                                 progress=False).loss  # fmt: skip
        gap = float(np.max(np.abs(lib - np.asarray(ref))) / ref[0])
        print(f"check {loss} m={m} library: max |ΔL|/L0 = {gap:.2e}", flush=True)
        worst = max(worst, gap)
    if worst > 1e-4:
        raise SystemExit(f"check failed: {worst:.2e}")
    return worst


def _task(name: str) -> tuple[dict, torch.nn.Module, torch.Tensor, torch.Tensor, list[str]]:
    """``(task, top, cached trunk outputs, labels, trained weight names)``, the top's weights
    frozen (the benchmark chooses what each model trains)."""
    task = ho.load_task(name)
    top, h, y = task["top"], task["x"], task["y"]
    for p in top.parameters():
        p.requires_grad_(False)
    pat = re.compile(task["params"])
    return task, top, h, y, [a for a, _ in top.named_parameters() if pat.search(a)]


def _library_kernel(name: str, top, h: torch.Tensor, y: torch.Tensor, params: list[str],
                    variant: str):
    """The library's exact-top kernel (``compute_exact_top_kernel``) of the two-layer split,
    q of ``variant``, the task's projection."""
    from tangentlab.experimental.exact_top import compute_exact_top_kernel

    block, names = _split(top, params)
    body, exact = (m.eval() for m in dh.parts(top, "two layers exact"))
    with torch.no_grad():
        d = int(body(h[:1])[0].numel())
    task = ho.TASKS[name]
    return compute_exact_top_kernel(body, exact, (h, y), params=[PRE + n for n in block],
                                    top_params=[PRE + n for n in names],
                                    directions=_q(variant, task["num_classes"], d),
                                    projection=_projection_of(variant, task["projection"]),
                                    progress=False)  # fmt: skip


class _CachedBertBody(torch.nn.Module):
    """MiniLM's last encoder layer on the cached trunk outputs (``holdout.MiniLMTop``'s
    inputs: layer 4's hidden states and the mask) to its [CLS] state z ``[B, 384]``, under
    the model's weight names (``tangentlab.examples.split_minilm``'s body on cached inputs)."""

    def __init__(self, top: torch.nn.Module) -> None:
        super().__init__()
        self.bert = torch.nn.Module()
        self.bert.encoder = torch.nn.Module()
        self.bert.encoder.layer = top.bert.encoder.layer
        self.first = top.first_layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from tangentlab.examples import _additive_mask

        ext = _additive_mask(attention_mask, hidden_states.dtype)
        h = hidden_states
        for layer in self.bert.encoder.layer[self.first:]:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 0]


class _CachedBertAttention(torch.nn.Module):
    """MiniLM's last layer's attention sub-layer on the cached trunk outputs, its [CLS]
    output ``[B, 384]`` (the "ffn" split: the body ends before the feed-forward part)."""

    def __init__(self, top: torch.nn.Module) -> None:
        super().__init__()
        self.bert = torch.nn.Module()
        self.bert.encoder = torch.nn.Module()
        self.bert.encoder.layer = top.bert.encoder.layer
        self.last = len(top.bert.encoder.layer) - 1
        assert top.first_layer == self.last

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from tangentlab.examples import _additive_mask

        ext = _additive_mask(attention_mask, hidden_states.dtype)
        out = self.bert.encoder.layer[self.last].attention(hidden_states, ext)
        return (out[0] if isinstance(out, tuple) else out)[:, 0]


TEXT_SPLITS = ("layer", "ffn")  # the last layer linear / its attention linear, FFN exact
TEXT_SPLIT = {"split": "layer"}  # grid_task's text split (``--text-split``)


def _text_kernel(name: str, top, h: dict, y: torch.Tensor, params: str, split: str = "layer",
                 variant: str = "2C"):
    """The library's exact-top kernel of a MiniLM text task: the last encoder layer
    linearized, pooler and classifier exact (``split_minilm``'s split), q of ``variant``
    (``_q``; "2C": the library's default for z a vector), the task's projection."""
    from tangentlab.examples import _BertTop
    from tangentlab.experimental.exact_top import compute_exact_top_kernel

    if split == "layer":  # split_minilm(exact="pooler") on cached inputs
        body, exact = _CachedBertBody(top).eval(), _BertTop(top).eval()
    else:  # split_minilm(exact="ffn")
        body, exact = _CachedBertAttention(top).eval(), _BertTop(top, "ffn").eval()
    with torch.no_grad():  # the split is the task's top network
        gap = (exact(body(**_take(h, 4))) - top(**_take(h, 4))).abs().max()
    assert float(gap) < 1e-5, float(gap)
    body_params, top_params = params, params
    if split == "ffn":  # the last layer's attention in the body, the rest of it in the top
        last = rf"bert\.encoder\.layer\.{len(top.bert.encoder.layer) - 1}\."
        body_params = rf"^{last}attention\."
        top_params = rf"^(?:{last}(?:intermediate|output)\.|bert\.pooler\.|classifier\.)"
    q = (None if variant == "2C"
         else _q(variant, ho.TASKS[name]["num_classes"], top.classifier.in_features))
    return compute_exact_top_kernel(body, exact, (h, y), params=body_params,
                                    top_params=top_params, directions=q,
                                    projection=ho.TASKS[name]["projection"], progress=False)


def _take(x: dict, n: int) -> dict:
    return {k: v[:n] for k, v in x.items()}


def _projection_of(variant: str, k: int) -> int:
    """The projection of ``variant`` ("<q>-k<k>", e.g. "32C-k1024"), else the task's ``k``."""
    return int(variant.split("-k")[1]) if "-k" in variant else k


def _q(variant: str, c: int, d: int) -> int | None:
    """The directions of z kept exact: "2C", "D" (all of z), "default" (None: the
    library's own, 2C per position of a map-shaped z), "<k>C" (k C), "<k>Cmax<n>" (k C, at
    most n) or a number; a suffix
    "-k<k>" names the projection (:func:`_projection_of`)."""
    variant = variant.split("-k")[0]
    if variant == "default":
        return None
    if "max" in variant:  # "<k>Cmax<n>": kC directions, at most n (and at most D)
        base, cap = variant.split("max")
        return min(_q(base, c, d), int(cap))
    if variant.endswith("C") and variant[:-1].isdigit():
        return min(d, int(variant[:-1]) * c)
    return {"2C": 2 * c, "D": d}.get(variant) or int(variant)


def run_task(name: str, variant: str) -> dict:
    """Every cell of ``name`` with variant ``variant``: T̂ per drop and the seconds
    (``<task>-q<variant>.json``, resumable)."""
    path = OUT / f"{name}-q{variant}.json"
    if path.exists():
        return json.loads(path.read_text())
    dh.dev_tasks()
    stored = json.loads((dh.OUT / f"{name}.json").read_text())
    task, top, h, y, params = _task(name)
    t0 = time.perf_counter()
    with torch.no_grad():
        d = int(dh.parts(top, "two layers exact")[0](h[:1])[0].numel())
    q = _q(variant, ho.TASKS[name]["num_classes"], d)
    basis = z_basis(top, h, q)
    basis_s = time.perf_counter() - t0
    kern = z_kernel(top, h, params, basis, ho.TASKS[name]["projection"])
    out = dict(task=name, variant=variant, q=int(basis.shape[1]), d=d, machine=machine(),
               basis_seconds=basis_s, kernel_seconds=kern["seconds"], cells={})
    for key, c in stored["cells"].items():
        cap = min(dh.STEP_CAP, 3 * max([t for t in c["real"]["steps"].values() if t]
                                       or [c["real"]["n"]]))  # fmt: skip
        cfg = dh.dev_tasks()[name][0][key]
        curve, secs = simulate(top, h, y, params, basis, kern, loss=cfg["loss"], lr=c["lr"],
                               momentum=cfg["momentum"], steps=cap)  # fmt: skip
        out["cells"][key] = dict(steps=dh._steps(curve, c["L0"]), seconds=secs, n=len(curve))
        print(name, variant, key, "real", c["real"]["steps"], "fs", out["cells"][key]["steps"],
              f"{secs:.1f}s", flush=True)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", help="one image development task (repeatable)")
    ap.add_argument("--q", action="append", choices=sorted({*VARIANTS, *DEV32_VARIANTS}),
                    help="one variant (repeatable)")
    ap.add_argument("--check", action="store_true", help="against weight space on 16 samples")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    ap.add_argument("--grid", action="store_true",
                    help="the library's forecast of every stored cell (the rounds' grid)")
    ap.add_argument("--full-only", action="store_true",
                    help="--grid --q: the full-batch cells only")
    ap.add_argument("--holdout", action="store_true",
                    help="the held-out tasks (rounds 8-9's image tasks), once")
    ap.add_argument("--choose-band", action="store_true",
                    help="the exact-top steps interval chosen on the development grid")
    ap.add_argument("--text", action="store_true",
                    help="the text development tasks (MiniLM: last layer linear, pooler and "
                    "classifier exact), development only")
    ap.add_argument("--text-split", choices=TEXT_SPLITS, default="layer",
                    help="with --text: the last layer linear (layer) or only its attention "
                    "(ffn: its feed-forward part exact)")
    ap.add_argument("--fresh", action="store_true",
                    help="the fresh tasks of twolayer_fresh.py (their stored real runs), once")
    ap.add_argument("--fresh2", action="store_true",
                    help="the second fresh round (twolayer_fresh2.py; PLAN-fresh2.md), once")
    ap.add_argument("--fresh3", action="store_true",
                    help="the third fresh round (twolayer_fresh3.py; PLAN-fresh3.md), once")
    ap.add_argument("--fresh4", action="store_true",
                    help="the fourth fresh round (twolayer_fresh4.py; PLAN-fresh4.md), once")
    ap.add_argument("--fresh5", action="store_true",
                    help="the fifth fresh round (twolayer_fresh5.py; PLAN-fresh5.md), once")
    ap.add_argument("--fresh6", action="store_true",
                    help="the sixth fresh round (twolayer_fresh6.py; PLAN-fresh6.md), once")
    ap.add_argument("--fresh7", action="store_true",
                    help="the seventh fresh round, 64 px (twolayer_fresh7.py; PLAN-fresh7.md), "
                         "q = 8C (the library's default then), once")
    ap.add_argument("--fresh7-q2C", action="store_true",
                    help="the seventh fresh round with q = 2C (PLAN-fresh7.md), once")
    ap.add_argument("--fresh7-now", action="store_true",
                    help="the seventh fresh round with the command line's exact top as it is "
                         "now (q = 32C, k = 1024; a second look)")
    ap.add_argument("--fresh8", action="store_true",
                    help="the eighth fresh round, 64 px (twolayer_fresh8.py; PLAN-fresh8.md), "
                         "once")
    ap.add_argument("--fresh8-q8C", action="store_true",
                    help="the eighth fresh round with q = 8C, the default before (PLAN-fresh8.md), "
                         "once")
    for name, nth, ks in (("fresh9", "ninth", FRESH9_K), ("fresh10", "tenth", FRESH10_K)):
        ap.add_argument(f"--{name}", action="store_true",
                        help=f"the {nth} fresh round, 64 px (twolayer_{name}.py; "
                             f"PLAN-{name}.md), once")
        for k in ks:
            ap.add_argument(f"--{name}-k{k}", action="store_true",
                            help=f"the {nth} fresh round with k = {k} (PLAN-{name}.md), once")
    ap.add_argument("--head-exact", metavar="ROUND", choices=sorted(ROUNDS),
                    help="the command line's default forecast (head exact) of a fresh "
                         "round's cells, for the comparison its plan names")
    ap.add_argument("--fresh11", choices=FRESH11_Q, action="append",
                    help="the eleventh fresh round, 32 px (twolayer_fresh11.py; "
                         "PLAN-fresh11.md) at this q, once (repeatable)")
    ap.add_argument("--fresh12", choices=FRESH12_Q + FRESH12_EXTRA, action="append",
                    help="the twelfth fresh round, 32 px (twolayer_fresh12.py; "
                         "PLAN-fresh12.md) at this q, once (repeatable)")
    ap.add_argument("--fresh13", choices=FRESH13_Q + FRESH13_EXTRA, action="append",
                    help="the thirteenth fresh round, 32 px, ten classes "
                         "(twolayer_fresh13.py; PLAN-fresh13.md) at this q, once "
                         "(repeatable)")
    ap.add_argument("--fresh14", choices=FRESH14_Q, action="append",
                    help="the fourteenth fresh round, 32 px, ten classes "
                         "(twolayer_fresh14.py; PLAN-fresh14.md) at this q, once "
                         "(repeatable)")
    ap.add_argument("--text2", choices=TEXT2_Q, action="append",
                    help="the second held-out text round (twolayer_text2.py; PLAN-text2.md; "
                         "FFN-exact split) at this q, once (repeatable)")
    ap.add_argument("--candidate14", action="store_true",
                    help="PLAN-fresh14.md's candidate calibration at the cap q = min(32C, "
                         "128), chosen on the development grids and rounds 11-13 "
                         "(development only)")
    ap.add_argument("--candidate", action="store_true",
                    help="PLAN-fresh12.md's candidate calibration at q = 32C, chosen on the "
                         "development grids and the eleventh round (development only)")
    ap.add_argument("--calibrate", choices=DEV32_VARIANTS, metavar="Q",
                    help="the drift and bands chosen again at q = Q on the 32-px image and "
                         "the text development grids (development only)")
    ap.add_argument("--dev64", choices=DEV64_VARIANTS, action="append",
                    help="the 64-px development tasks (twolayer_dev64.py) at this q "
                         "(repeatable)")
    ap.add_argument("--text-holdout", action="store_true",
                    help="the held-out text tasks (PLAN-text.md; FFN-exact split), once")
    ap.add_argument("--text-holdout-q", choices=("32C",),
                    help="the held-out text tasks again at this q (a second look after "
                         "PLAN-fresh12.md)")
    ap.add_argument("--choose-drift", action="store_true",
                    help="the drift of long runs (NOTE [exact-top drift]) chosen on the "
                    "development tasks, image and text")
    ap.add_argument("--choose-check", action="store_true",
                    help="the reliability check's threshold chosen on the development grid")
    ap.add_argument("--cost", metavar="NAME", action="append",
                    help="time forecast, real top and plain runs of NAME in one process")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    if args.check:
        check()
        return
    if args.grid:
        for name in args.task or dh.image_tasks():
            for v in args.q or (None,):
                run_dev32(name, v, full_only=args.full_only)
        return
    if args.holdout:
        run_holdout(args.task or list(HOLDOUT))
        return
    if args.fresh:
        run_fresh(args.task or list(fresh_tasks()))
        return
    if args.head_exact:
        head_exact_round(args.head_exact,
                         args.task or list(round_tasks(args.head_exact)))
        return
    if args.calibrate:
        print("\n".join(calibration_lines(args.calibrate)))
        return
    for name in ("fresh11", "fresh12", "fresh13", "fresh14"):  # the rounds at each q asked
        if getattr(args, name):
            for v in getattr(args, name):
                which = f"{name}_q{v}"
                run_round(which, args.task or list(round_tasks(which)))
            return
    if args.text2:
        TEXT_SPLIT["split"] = "ffn"
        for v in args.text2:
            run_round(f"text2_q{v}", args.task or list(round_tasks(f"text2_q{v}")))
        return
    if args.candidate or args.candidate14:
        cal = (candidate_calibration("32Cmax128", FRESH14_EXTRA) if args.candidate14
               else candidate_calibration())  # fmt: skip
        print(json.dumps({k: {str(g): v for g, v in d.items()} if isinstance(d, dict) else d
                          for k, d in cal.items()}, indent=1))
        return
    if args.dev64:
        for v in args.dev64:
            run_round(f"dev64_q{v}", args.task or list(round_tasks(f"dev64_q{v}")))
        return
    for which in ROUNDS:
        if getattr(args, which, False):
            run_round(which, args.task or list(round_tasks(which)))
            return
    if args.text_holdout:
        run_text_holdout(args.task or list(text_holdout_tasks()))
        return
    if args.text_holdout_q:
        run_text_holdout(args.task or list(text_holdout_tasks()), args.text_holdout_q)
        return
    if args.text:
        dev = dh.dev_tasks()
        TEXT_SPLIT["split"] = args.text_split
        out = TEXT_OUT if args.text_split == "layer" else TEXT_OUT / args.text_split
        for name in args.task or dh.image_tasks("text"):
            for v in args.q or (None,):  # None: the stored grid (q = 2C)
                grid_task(name, v or "2C", cells=dev[name][0],
                          path=out / ("" if v is None else f"q{v}") / f"{name}-grid.json")
        return
    if args.choose_band:
        for kind, res in choose_bands().items():
            print(kind, res["chosen"], {f"{k[0]}-{k[1]}": (round(v["lo"], 4), round(v["hi"], 4))
                         for k, v in res["candidates"][res["chosen"]]["table"].items()})
        return
    if args.choose_drift:
        for loss, res in choose_drift().items():
            print(loss, res)
        return
    if args.choose_check:
        res = choose_check()
        print("chosen", res["chosen"], "task left out", res["loto"])
        return
    if args.cost:
        for name in args.cost:
            for v in args.q or ("2C",):
                cost(name, v)
        report()
        return
    if not args.report:
        for name in args.task or dh.image_tasks():
            for v in args.q or VARIANTS:
                run_task(name, v)
    report()


COST = OUT / "cost.json"


def cost(name: str, variant: str = "2C") -> dict:
    """Seconds in one process (alone, one thread) on one task: the library's forecast
    (``tangentlab.experimental.exact_top``: kernel, then each cell to the accuracy runs'
    horizon or a 90% drop), the same simulations with the exact part as matrices
    (``simulate(fast=True)``), the real runs of the top on cached trunk outputs
    (``deephead.simulate``), and the plain full-network run (3 timed steps x the real
    run's steps: what a user pays without caching the trunk); appended to ``cost.json``."""
    from tangentlab.experimental.exact_top import forecast_exact_top

    dh.dev_tasks()
    stored = json.loads((dh.OUT / f"{name}.json").read_text())
    acc = OUT / f"{name}-q{variant}.json"
    acc = json.loads(acc.read_text())["cells"] if acc.exists() else {}
    task, top, h, y, params = _task(name)
    plain_step = ho._plain_step_seconds(task, None)
    t0 = time.perf_counter()
    etk = _library_kernel(name, top, h, y, params, variant)
    kernel_s = time.perf_counter() - t0
    kern = dict(theta=etk.block, phi=etk.features, rest=etk.rest)
    cells = {}
    for key, c in stored["cells"].items():
        cap = min(dh.STEP_CAP, 3 * max([t for t in c["real"]["steps"].values() if t]
                                       or [c["real"]["n"]]))  # fmt: skip
        cfg = dh.dev_tasks()[name][0][key]
        opt = tl.SGD(c["lr"], momentum=cfg["momentum"])
        fc = forecast_exact_top(etk, opt, cap, loss=cfg["loss"], progress=False,
                                stop_below=(1 - max(ho.DROPS)) * c["L0"])  # fmt: skip
        lib = dict(zip(ho.DROPS, [fc.steps_to((1 - dr) * c["L0"]) for dr in ho.DROPS]))
        kw = dict(loss=cfg["loss"], lr=c["lr"], momentum=cfg["momentum"], steps=cap)
        curve, fast_s = simulate(top, h, y, params, etk.basis, kern, fast=True, **kw)
        real, real_s = dh.simulate(top, h, y, params, "real", **kw)
        cells[key] = dict(library_seconds=fc.seconds, library_steps=len(fc.loss) - 1,
                          library_targets={f"{k:g}": v for k, v in lib.items()},
                          accuracy_run_targets=(acc.get(key) or {}).get("steps"),
                          matrix_seconds=fast_s, matrix_targets=dh._steps(curve, c["L0"]),
                          real_seconds=real_s, real_steps=len(real) - 1)  # fmt: skip
        print(name, key, cells[key], flush=True)
    tot = {k: sum(c[k] for c in cells.values())
           for k in ("library_seconds", "matrix_seconds", "real_seconds", "real_steps")}
    out = dict(task=name, variant=variant, q=etk.rank, machine=machine(),
               threads=torch.get_num_threads(), kernel_seconds=kernel_s,
               trunk_seconds=task["trunk_seconds"], plain_step_seconds=plain_step,
               plain_seconds=plain_step * tot["real_steps"], **tot, cells=cells)
    allc = json.loads(COST.read_text()) if COST.exists() else {}
    allc[f"{name}-q{variant}"] = out
    OUT.mkdir(parents=True, exist_ok=True)
    COST.write_text(json.dumps(allc, indent=1))
    return out


GRID_SEED = 1000  # the forecast's batches: another seed than the real runs' (ho.SEED)


def grid_task(name: str, variant: str = "2C", *, cells: dict | None = None,
              path: Path | None = None) -> dict:
    """The library's exact-top forecast (``tangentlab.experimental.exact_top``, q = 2C,
    k = 4096, 4 probes) of every stored cell of ``name`` (the rounds' grid: {mse, ce} x
    {full, B = 32} x m {0, 0.9} x a {0.1, 0.3, 1}), to the rounds' forecast horizon or a 90%
    drop; a minibatch forecast is one path with its own batches (seed ``GRID_SEED``, not the
    real run's), logged every 2 steps as the real run; the library's path (with the
    catapult: the state's ``catapult``; older grids are the fixed kernel's).
    ``<task>-grid.json``, resumable per cell."""
    from tangentlab.experimental.exact_top import CATAPULT, forecast_exact_top

    path = path or OUT / f"{name}-grid.json"
    state = (json.loads(path.read_text()) if path.exists()
             else dict(task=name, cells={}, catapult=CATAPULT))  # fmt: skip
    cells = cells if cells is not None else dh.dev_tasks()[name][0]
    todo = [k for k, c in cells.items() if "lr" in c and k not in state["cells"]]
    if not todo:
        return state
    if state.get("catapult") != CATAPULT:
        raise SystemExit(f"{path} was made with the fixed kernel (before NOTE [exact-top "
                         "catapult]): move it away to forecast its cells again.")
    task, top, h, y, params = _task(name)
    t0 = time.perf_counter()
    text = ho.TASKS[name]["kind"] == "text"
    etk = (_text_kernel(name, top, h, y, task["params"], TEXT_SPLIT["split"], variant) if text
           else _library_kernel(name, top, h, y, params, variant))  # fmt: skip
    state.update(q=etk.rank, variant=variant, kernel_seconds=time.perf_counter() - t0,
                 machine=machine(), threads=torch.get_num_threads())  # fmt: skip
    for key in todo:
        c = cells[key]
        l0 = float(c["run_loss"][0])
        run = [v for v in c["run_loss"] if v is not None]
        reached = [d for d in ho.DROPS if min(run) <= (1 - d) * l0]
        if not reached:  # no target: nothing to score
            state["cells"][key] = dict(et_loss=[], seconds=0.0, blowup=None, skipped=True)
            continue
        # the forecast past the deepest target the real run reaches scores nothing
        fc = forecast_exact_top(etk, tl.SGD(c["lr"], momentum=c["momentum"]), c["fc_steps"],
                                loss=c["loss"], batch_size=c["batch_size"], seed=GRID_SEED,
                                stop_below=(1 - max(reached)) * l0, progress=False,
                                log_every=1 if c["batch_size"] is None else 2)  # as the run
        curve = [None] * (int(fc.steps[-1]) + 1)
        for t, v in zip(fc.steps, fc.loss):
            curve[int(t)] = float(v) if math.isfinite(v) else None
        state["cells"][key] = dict(et_loss=curve, seconds=fc.seconds, blowup=fc.blowup)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state))
        print(name, key, f"{fc.seconds:.1f}s", len(curve), flush=True)
    path.write_text(json.dumps(state))
    return state


def _rows() -> tuple[list[dict], dict]:
    """deephead's rows (one per task, cell and drop the real run reaches), each with the
    variants' T̂ where its task ran; and ``{variant: {task: state}}``."""
    states = {}
    for p in sorted(OUT.glob("*-q*.json")):
        st = json.loads(p.read_text())
        states.setdefault(st["variant"], {})[st["task"]] = st
    deep = {p.stem: json.loads(p.read_text()) for p in sorted(dh.OUT.glob("*.json"))
            if not p.stem.endswith("-library") and any(p.stem in s for s in states.values())}
    rows = dh._rows(deep)
    for r in rows:
        for v, by in states.items():
            st = by.get(r["task"])
            r[v] = None if st is None else st["cells"][r["cell"]]["steps"][r["drop"]]
            r[f"has {v}"] = st is not None
    return rows, states


def report() -> list[str]:
    from headbody import _fmt

    rows, states = _rows()
    if not rows:
        return []
    every = set(dh.image_tasks())
    partial = {v: len(states[v]) for v in VARIANTS if v in states and set(states[v]) < every}
    names = [v for v in VARIANTS if v in states and v not in partial] or list(states)
    done = sorted(set.intersection(*[set(states[v]) for v in names]))
    rows = [r for r in rows if r["task"] in done]
    deep = {t: json.loads((dh.OUT / f"{t}.json").read_text()) for t in done}
    label = {"2C": "q = 2C", "64": "q = 64", "128": "q = 128", "D": "q = D (all of z)"}
    lines = [f"Command: `{COMMAND}` (development only: the stored image development tasks "
             f"that ran, {len(done)} of {len(dh.image_tasks())}, {len(rows)} targets; nothing "
             "fresh, nothing adopted). Full-batch SGD at the stored cells' learning rates; "
             "entries median / p90 of |T̂ − T|/T (targets, misses), a miss at 3x the real "
             "run's steps counts +∞; *corrected*: T̂ scaled by the left-out median T / T̂ of "
             "the same cell and drop. The real runs and the weight-space models are "
             "``deephead.py``'s. Kernel: Q, M and κ_⊥ (projected, k = 4096, 4 probes); "
             "seconds are medians over tasks (kernel) and sums over a task's four cells "
             "(simulation, and the real run of the top on cached trunk outputs), one thread. "
             f"Machine: {states[names[0]][done[0]]['machine']}.", "",
             "| model | MSE 50% | MSE 80% | CE 50% | CE 80% | all | all, corrected | "
             "kernel s | simulation / real run (median over tasks) |",
             "|" + "---|" * 9]  # fmt: skip
    groups = (("mse", "0.5"), ("mse", "0.8"), ("ce", "0.5"), ("ce", "0.8"))

    def line(name: str, key: str, kernel: str, ratio: str) -> str:
        cols = [_fmt(dh._errors([r for r in rows if (r["loss"], r["drop"]) == g], key))
                for g in groups]  # fmt: skip
        return (f"| {name} | " + " | ".join(cols) + f" | {_fmt(dh._errors(rows, key))} | "
                f"{_fmt(dh._errors(rows, key, True))} | {kernel} | {ratio} |")

    lines.append(line("library: head exact, q = 2C (default)", "library", "-", "-"))
    lines.append(line("head exact, exact kernel (weight space)", "head exact", "-", "-"))
    lines.append(line("two layers exact, exact kernel (weight space)", "two layers exact", "-",
                      "-"))  # fmt: skip
    for v in names:
        ks = np.median([states[v][t]["kernel_seconds"] + states[v][t]["basis_seconds"]
                        for t in done])  # fmt: skip
        ratio = np.median([sum(c["seconds"] for c in states[v][t]["cells"].values())
                           / sum(c["real"]["seconds"] for c in deep[t]["cells"].values())
                           for t in done])  # fmt: skip
        lines.append(line(f"two layers exact, {label[v]}", v, f"{ks:.1f}", f"{ratio:.2f}"))
    lines += ["", "| task | q = 2C | " + " | ".join(f"log(T / T̂) median: {label[v]}"
                                                   for v in names) + " |",
              "|---|---|" + "---|" * len(names)]  # fmt: skip
    for t in done:
        meds = []
        for v in names:
            logs = [math.log(r["T"] / r[v]) for r in rows if r["task"] == t and r[v]]
            meds.append(f"{np.median(logs):+.2f}" if logs else "-")
        q2 = states["2C"][t]["q"] if "2C" in states else "-"
        lines.append(f"| {t} | {q2} | " + " | ".join(meds) + " |")
    if partial:
        lines += ["", "Not run on every task in the session's time (left out above; the same "
                  "command resumes them): " + ", ".join(f"{label[v]} ({k} of {len(every)} "
                                                       "tasks)" for v, k in partial.items())
                  + "."]  # fmt: skip
    lines += grid_lines()
    lines += drift_lines()
    lines += band_lines()
    lines += check_lines()
    lines += dev64_lines()
    lines += dev32_lines()
    lines += holdout_lines()
    lines += check_scored_lines("holdout")
    lines += check_scored_lines("fresh")
    lines += check_scored_lines("fresh2")
    lines += head_exact_lines("fresh2")
    lines += check_scored_lines("fresh3")
    lines += head_exact_lines("fresh3")
    lines += check_scored_lines("fresh4")
    lines += head_exact_lines("fresh4")
    lines += check_scored_lines("fresh5")
    lines += head_exact_lines("fresh5")
    lines += check_scored_lines("fresh6")
    lines += head_exact_lines("fresh6")
    lines += check_scored_lines("fresh7")
    lines += head_exact_lines("fresh7")
    lines += check_scored_lines("fresh7_q2C")
    lines += check_scored_lines("fresh7_now")
    lines += check_scored_lines("fresh8")
    lines += head_exact_lines("fresh8", ("fresh8_q8C",))
    lines += check_scored_lines("fresh8_q8C")
    lines += check_scored_lines("fresh9")
    lines += head_exact_lines("fresh9", tuple(f"fresh9_k{k}" for k in FRESH9_K))
    for k in FRESH9_K:
        lines += check_scored_lines(f"fresh9_k{k}")
    lines += check_scored_lines("fresh10")
    lines += head_exact_lines("fresh10", tuple(f"fresh10_k{k}" for k in FRESH10_K))
    for k in FRESH10_K:
        lines += check_scored_lines(f"fresh10_k{k}")
    for v in FRESH11_Q:
        if list((FRESH11_OUT / f"q{v}").glob("*-grid.json")):
            lines += check_scored_lines(f"fresh11_q{v}")
    lines += FRESH11_READING.splitlines()
    lines += calibration_lines("32C")
    if all(list((FRESH12_OUT / f"q{v}").glob("*-grid.json")) for v in FRESH12_Q):
        lines += check_scored_lines("fresh12_q32C", cal=FRESH12_CAL)
        lines += check_scored_lines("fresh12_q2C")
        lines += check_scored_lines("fresh12_q32C")
    if list((FRESH12_OUT / "q32C-k1024").glob("*-grid.json")):
        lines += check_scored_lines("fresh12_q32C-k1024", cal=FRESH12_CAL)
    if list((TEXT_HOLDOUT_OUT / "q32C").glob("*-grid.json")):
        lines += check_scored_lines("text-holdout_q32C", cal=FRESH12_CAL)
    lines += FRESH12_READING.splitlines()
    if all(list((FRESH13_OUT / f"q{v}").glob("*-grid.json")) for v in FRESH13_Q):
        lines += check_scored_lines("fresh13_q32C", cal=FRESH12_CAL)
        lines += check_scored_lines("fresh13_q2C")
        lines += FRESH13_READING.splitlines()
    if all(list((FRESH14_OUT / f"q{v}").glob("*-grid.json")) for v in FRESH14_Q):
        lines += check_scored_lines("fresh14_q32Cmax128", cal=FRESH14_CAL,
                                    cal_label=FRESH14_LABEL)
        lines += check_scored_lines("fresh14_q32C", cal=FRESH12_CAL,
                                    cal_label=FRESH14_RULE_LABEL)
        lines += check_scored_lines("fresh14_q32Cmax128", cal=FRESH12_CAL,
                                    cal_label=FRESH14_INFO_LABEL)
        lines += FRESH14_READING.splitlines()
    lines += text2_lines()
    lines += round_cost_lines(("fresh11_q2C", "fresh11_q32C", "fresh12_q2C", "fresh12_q32C",
                               "fresh12_q32C-k1024", "fresh13_q2C", "fresh13_q32C",
                               "fresh13_q32Cmax128", *(f"fresh14_q{v}" for v in FRESH14_Q)),
                              "32-px rounds'")
    lines += round_cost_lines(("fresh8", "fresh9", *(f"fresh9_k{k}" for k in FRESH9_K),
                               "fresh10", *(f"fresh10_k{k}" for k in FRESH10_K)))
    lines += default_choice_lines()
    lines += CHECK_READING.splitlines()
    lines += ADOPT_READING.splitlines()
    plot = plot_calibration()
    lines += ["", f"![exact top, held out]({plot.relative_to(OUT.parent.parent)})", ""]
    lines += grid_lines("text")
    lines += check_scored_lines("text")
    lines += grid_lines("text-ffn")
    lines += grid_lines("text-holdout")
    lines += check_scored_lines("text-holdout")
    lines += TEXT_READING.splitlines()
    lines += _cost_lines()
    lines += READING.splitlines()
    print("\n".join(lines))
    if len(done) == len(dh.image_tasks()):
        write_section("twolayer", "\n".join(lines))
    return lines


def _task_set(which: str) -> tuple[Path, dict]:
    """``(folder of the grid files, {task: (cells, key of the stored head-exact forecast or
    None)})`` of ``which``: "dev" (the 14 image development tasks), "holdout" (rounds 8-9's
    tasks, ``HOLDOUT``) or "fresh" (``twolayer_fresh.py``'s tasks, ``FRESH_OUT``)."""
    if which == "dev":
        return OUT, {k: v[:2] for k, v in dh.dev_tasks().items()}
    if which.startswith("dev32_q"):
        return (DEV32_OUT / f"q{which[len('dev32_q'):]}",
                {k: v[:2] for k, v in dh.dev_tasks().items()})
    if which == "holdout":
        return HOLDOUT_OUT, {k: v[:2] for k, v in holdout_tasks().items()}
    if which == "fresh":
        return FRESH_OUT, {k: (v, None) for k, v in fresh_tasks().items()}
    if which.startswith("text-ffn_q"):  # the text development tasks at another q
        return (TEXT_OUT / "ffn" / f"q{which[len('text-ffn_q'):]}",
                {k: v[:2] for k, v in dh.dev_tasks().items() if v[2] == "text"})
    if which in ("text", "text-ffn"):
        folder = TEXT_OUT if which == "text" else TEXT_OUT / "ffn"
        return folder, {k: v[:2] for k, v in dh.dev_tasks().items() if v[2] == "text"}
    if which in ROUNDS:
        return (ROUND_GRIDS.get(which, ROUNDS[which][1]),
                {k: (v, "hb_loss" if all("hb_loss" in c for c in v.values() if "lr" in c)
                     else None) for k, v in round_tasks(which).items()})  # fmt: skip
    if which == "text-holdout":
        return TEXT_HOLDOUT_OUT, {k: (v, "hb_loss") for k, v in text_holdout_tasks().items()}
    if which.startswith("text-holdout_q"):  # at another q (PLAN-fresh12.md: a second look)
        return (TEXT_HOLDOUT_OUT / f"q{which[len('text-holdout_q'):]}",
                {k: (v, "hb_loss") for k, v in text_holdout_tasks().items()})
    raise ValueError(which)


PREFIXES = {"p5": 0.05, "p10": 0.1}  # issue 13's baselines: a power law on the run's prefix


# The sets whose grids predate the catapult (NOTE [exact-top catapult]) and whose flagged
# cells have its path (β = 0.5): ``twolayer_flagged.py --run catapult --which <set>``.
CATAPULT_SETS = ("dev", "text-ffn", "holdout", "fresh", "fresh2", "text-holdout")


def _catapult_curves(which: str) -> dict[str, dict[str, list]]:
    """``{task: {cell: per-step loss}}``: the stored catapult paths (β = ``CATAPULT``) of
    ``which``'s flagged cells (``twolayer_flagged.py``)."""
    from tangentlab.experimental.exact_top import CATAPULT

    out, head = {}, f"catapult-{which}-"
    for p in (OUT / "flagged").glob(f"{head}*.json"):
        st = json.loads(p.read_text())
        out[p.stem[len(head):]] = {k: v[f"beta{CATAPULT:g}"]["curve"] for k, v in st.items()
                                   if isinstance(v, dict) and f"beta{CATAPULT:g}" in v}
    return out


def _first_below(curve: list, target: float) -> int | None:
    return next((t for t, v in enumerate(curve) if v is not None and v <= target), None)


def grid_rows(which: str = "dev", *, prefix: bool = False, path: str = "library",
              unreached: bool = False) -> list[dict]:
    """One row per (task, cell, drop) the stored real run reaches, with T, the exact-top T̂
    (``et``), the rebound ``R`` of its check, and the library's stored head-exact T̂
    (``hb``, None where not stored), scored as the rounds (``forecast_accuracy._targets``:
    a forecast that never gets there is a miss); ``which``: the task set (``_task_set``);
    ``prefix``: also the T̂ of issue 13's prefix baselines (``p5``, ``p10``:
    ``headbody._powerlaw_curve``, a power law fitted to the first 5% / 10% of the real
    run's steps). ``et_path`` is the T̂ of the library's exact-top path (``path="library"``:
    where a grid predates the catapult, a flagged target's T̂ is read from its stored
    catapult path) or of the fixed kernel as scored (``path="fixed"``); ``et`` the
    library's estimate, ``ExactTopForecast.steps_estimate`` (NOTE [exact-top drift]; with
    ``path="fixed"``: ``et_path``); ``et_fixed``: the stored grid's T̂, the fixed kernel's
    where ``fixed`` (a grid made before the catapult). ``unreached``: also the targets the
    real run does not reach (``T`` None; ``twolayer_sweep.py``: a sweep may pick them)."""
    from forecast_accuracy import _targets
    from headbody import _powerlaw_curve
    from tangentlab.experimental.exact_top import REBOUND_MAX, drift_steps

    folder, dev = _task_set(which)
    cat = _catapult_curves(which) if path == "library" and which in CATAPULT_SETS else None
    rows = []
    for p in sorted(folder.glob("*-grid.json")):
        st = json.loads(p.read_text())
        cells, hb_key = dev[st["task"]]
        made_with = st.get("catapult")  # None: the fixed kernel
        for key, g in st["cells"].items():
            if g.get("skipped"):
                continue
            c = dict(cells[key], et_loss=g["et_loss"])
            et = _targets(c, ho.DROPS, "et_loss")
            fc = _stored_forecast(g, c["batch_size"] is None)
            hb = _targets(c, ho.DROPS, hb_key) if hb_key else {}
            pre = {}
            for col, frac in PREFIXES.items() if prefix else ():
                with warnings.catch_warnings():  # scipy: covariance not estimated
                    warnings.simplefilter("ignore")
                    c[f"{col}_loss"] = _powerlaw_curve(c, frac)
                pre[col] = _targets(c, ho.DROPS, f"{col}_loss")
            for d, t in et.items():
                if t["status"] == "unreached" and not unreached:
                    continue
                assert fc.steps_to_drop(float(d)) == t["T_hat"], (st["task"], key, d)
                r = fc.rebound(float(d))
                est = t["T_hat"]
                if cat is not None and made_with is None and r > REBOUND_MAX:
                    curve = cat.get(st["task"], {}).get(key)
                    if curve is None and t["status"] == "unreached":
                        curve = g["et_loss"]  # not run for these: the fixed kernel's path
                    if curve is None:
                        raise SystemExit(f"{which}: {st['task']} {key} is flagged and has no "
                                         "catapult path; run `.venv/bin/python benchmarks/"
                                         f"twolayer_flagged.py --run catapult --which {which}`")
                    est = _first_below(curve, (1 - float(d)) * curve[0])
                rows.append(dict(task=st["task"], cell=key, loss=c["loss"], drop=d, T=t["T"],
                                 kind="text" if which.startswith("text") else "image",
                                 batch="full" if c["batch_size"] is None else "B32",
                                 a=c["lr_factor"], m=c["momentum"], et_path=est, R=r,
                                 et=est if path != "library" or est is None
                                 else drift_steps(est, c["loss"]),
                                 et_fixed=t["T_hat"], fixed=made_with is None,
                                 hb=hb[d]["T_hat"] if hb else None,
                                 seconds=g["seconds"],
                                 **{k: v[d]["T_hat"] for k, v in pre.items()}))  # fmt: skip
    return rows


def grid_lines(which: str = "dev") -> list[str]:
    from headbody import _fmt

    rows = grid_rows(which, prefix=True)
    if not rows:
        return []
    tasks = sorted({r["task"] for r in rows})
    kind = "text" if which.startswith("text") else "image"
    split = {"text": "; MiniLM: the last encoder layer linearized, pooler and classifier "
                     "exact, ``split_minilm(exact=\"pooler\")``",
             "text-ffn": "; MiniLM: only the last layer's attention linearized, its "
                         "feed-forward part, pooler and classifier exact, ``split_minilm``'s "
                         "default"}.get(which, "")
    flag = {"text": "--text", "text-ffn": "--text --text-split ffn"}.get(which, "--grid")
    if which == "text-holdout":
        split, flag = TEXT_HOLDOUT_SPLIT, "--text-holdout"
    lines = ["", f"The whole grid (`{COMMAND} {flag}`): the "
             "library's exact-top forecast (`tangentlab.experimental.exact_top`, q = 2C, "
             f"k = 4096, 4 probes{split}) of every stored cell of the {kind} "
             + ("held-out tasks (PLAN-text.md, scored once" if which == "text-holdout" else
                f"development tasks that ran ({len(tasks)} of {len(dh.image_tasks(kind))}")
             + f", {len(rows)} targets), against the "
             "stored real runs (the rounds' seed) and the library's stored head-exact forecast "
             "(default Q, uncalibrated) on the same targets; a minibatch forecast is one path "
             f"with its own batches (seed {GRID_SEED}); *prefix 5% / 10%*: issue 13's "
             "baselines, a power law fitted to the first 5% / 10% of the real run's steps. "
             "Entries median / p90 of |T̂ − T|/T (targets, misses); *exact top*: the "
             "library's estimate as it is now (``steps_estimate``: its path, with the "
             "catapult where the check flags, and the drift of long runs; the readings "
             "below quote figures as they came).", "",
             "| loss | batch | drop | exact top (q = 2C) | head exact (library default) | "
             "prefix 5% | prefix 10% |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def cols(sub: list[dict]) -> str:
        return " | ".join(_fmt(dh._errors(sub, k)) for k in ("et", "hb", "p5", "p10")) + " |"

    for loss in ho.LOSSES:
        for batch in ("full", "B32"):
            for d in ("0.5", "0.8", "0.9"):
                sub = [r for r in rows if (r["loss"], r["batch"], r["drop"]) == (loss, batch, d)]
                lines.append(f"| {loss} | {batch} | {float(d):.0%} | {cols(sub)}")
    for a in sorted({r["a"] for r in rows}):
        lines.append(f"| all | a = {a:g} | all | {cols([r for r in rows if r['a'] == a])}")
    lines.append(f"| **all** | **all** | **all** | {cols(rows)}")
    return lines


# ---------------------------------------------------------------------------------------
# Held out: rounds 8-9's image tasks (benchmarks/fullspan.py, fullspan_pilot.py), which the
# exact-top model's development never read (its choices: q = 2C, k = 4096, 4 probes, and
# ``STEPS_BAND``, frozen in the commit that adds this; results/twolayer/holdout/PLAN.md).
# ---------------------------------------------------------------------------------------

HOLDOUT_OUT = OUT / "holdout"
HOLDOUT = ("mpl-lite0", "stereo-lite1", "letters-lite0", "typefaces-lite1")


def holdout_tasks() -> dict:
    """``{task: (cells, key of the library's stored forecast, kind, N)}`` of ``HOLDOUT``
    (their stored full-batch real runs), with their task tables in ``holdout.TASKS``."""
    import fullspan as fs
    import fullspan_pilot as fp

    out = {}
    for mod in (fs, fp):
        ho.TASKS.update(mod.TASKS)
        for name, cfg in mod.TASKS.items():
            st = json.loads((mod.OUT / "fresh" / f"{name}.json").read_text())
            out[name] = (st["cells"], "hb_loss", cfg["kind"], cfg["num_samples"])
    return out


def run_holdout(names: list[str]) -> None:
    dev = holdout_tasks()
    for name in names:
        grid_task(name, cells=dev[name][0], path=HOLDOUT_OUT / f"{name}-grid.json")


FRESH_OUT = OUT / "fresh"
TEXT_OUT = OUT / "text"  # the text development tasks (MiniLM; development only)


def fresh_tasks() -> dict:
    """``{task: cells}`` of ``twolayer_fresh.py``'s tasks whose real runs are stored (their
    task tables registered in ``holdout.TASKS``)."""
    import twolayer_fresh as tf

    ho.TASKS.update(tf.TASKS)
    out = {}
    for name in tf.TASKS:
        path = FRESH_OUT / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())["cells"]
    return out


FRESH2_OUT = OUT / "fresh2"  # results/twolayer/PLAN-fresh2.md


FRESH3_OUT = OUT / "fresh3"  # results/twolayer/PLAN-fresh3.md
FRESH4_OUT = OUT / "fresh4"  # results/twolayer/PLAN-fresh4.md
FRESH5_OUT = OUT / "fresh5"  # results/twolayer/PLAN-fresh5.md
FRESH6_OUT = OUT / "fresh6"  # results/twolayer/PLAN-fresh6.md
FRESH7_OUT = OUT / "fresh7"  # results/twolayer/PLAN-fresh7.md (64 px: z a 2 x 2 map)
FRESH8_OUT = OUT / "fresh8"  # results/twolayer/PLAN-fresh8.md (64 px)
ROUNDS = {"fresh2": ("twolayer_fresh2", FRESH2_OUT), "fresh3": ("twolayer_fresh3", FRESH3_OUT),
          "fresh4": ("twolayer_fresh4", FRESH4_OUT), "fresh5": ("twolayer_fresh5", FRESH5_OUT),
          "fresh6": ("twolayer_fresh6", FRESH6_OUT), "fresh7": ("twolayer_fresh7", FRESH7_OUT),
          "fresh7_q2C": ("twolayer_fresh7", FRESH7_OUT), "fresh8": ("twolayer_fresh8", FRESH8_OUT),
          "fresh8_q8C": ("twolayer_fresh8", FRESH8_OUT)}
# A round's q (``_q``; "2C" where not named) and the folder of its grids where it is not the
# real runs' (PLAN-fresh7.md: the library's default q, and q = 2C beside it, reported)
# (fresh7: the library's default of its plan, 2C per position = 8C; fresh8: the default
# since, 2C P² = 32C at 64 px)
ROUND_Q = {"fresh7": "8C", "fresh8": "default", "fresh8_q8C": "8C"}
ROUND_GRIDS = {"fresh7_q2C": FRESH7_OUT / "q2C", "fresh8_q8C": FRESH8_OUT / "q8C"}
# the seventh round again with the command line's exact top as it is now (q = 2C P² = 32C,
# k = 1024): a second look (q and k were chosen after it), for the default's table
ROUNDS["fresh7_now"] = ("twolayer_fresh7", FRESH7_OUT)
ROUND_Q["fresh7_now"] = "32C-k1024"
ROUND_GRIDS["fresh7_now"] = FRESH7_OUT / "q32C-k1024"
# the ninth (64 px): the default q and k = 4096, and q = 32C (the default there) with the
# smaller projections chosen on dev64 (``DEV64_VARIANTS``), results/twolayer/PLAN-fresh9.md
FRESH9_OUT = OUT / "fresh9"
FRESH9_K = (1024,)


def _round_with_projections(name: str, module: str, out: Path, ks: tuple[int, ...]) -> None:
    """Register round ``name`` (``module``'s tasks, results in ``out``; the default q and
    k) and its variants at q = 32C with each smaller projection of ``ks`` (``<name>_k<k>``,
    grids in ``out / k<k>``)."""
    ROUNDS[name] = (module, out)
    ROUND_Q[name] = "default"
    for k in ks:
        ROUNDS[f"{name}_k{k}"] = (module, out)
        ROUND_Q[f"{name}_k{k}"] = f"32C-k{k}"
        ROUND_GRIDS[f"{name}_k{k}"] = out / f"k{k}"


def _round_at_qs(name: str, module: str, out: Path, variants: tuple[str, ...]) -> None:
    """Register round ``name`` (``module``'s tasks, real runs in ``out``) at each q of
    ``variants`` (``<name>_q<variant>``, grids in ``out / q<variant>``)."""
    for v in variants:
        ROUNDS[f"{name}_q{v}"] = (module, out)
        ROUND_Q[f"{name}_q{v}"] = v
        ROUND_GRIDS[f"{name}_q{v}"] = out / f"q{v}"


_round_with_projections("fresh9", "twolayer_fresh9", FRESH9_OUT, FRESH9_K)
# the tenth (64 px): the default (q = 32C, k = 4096) and k = 1024 again, each task's two
# grids back to back in one worker (results/twolayer/PLAN-fresh10.md)
FRESH10_OUT = OUT / "fresh10"
FRESH10_K = (1024,)
_round_with_projections("fresh10", "twolayer_fresh10", FRESH10_OUT, FRESH10_K)
# the eleventh (32 px): q chosen again on the 32-px development grid (``dev32_q<variant>``),
# the chosen q and the default before it (2C) side by side (results/twolayer/PLAN-fresh11.md)
FRESH11_OUT = OUT / "fresh11"
FRESH11_Q = ("2C", "32C", "D")
_round_at_qs("fresh11", "twolayer_fresh11", FRESH11_OUT, FRESH11_Q)
# the twelfth (32 px): q = 32C with its drift and bands chosen again at that q (``FRESH12_CAL``)
# against the default (2C) (results/twolayer/PLAN-fresh12.md)
FRESH12_OUT = OUT / "fresh12"
FRESH12_Q = ("2C", "32C")
FRESH12_EXTRA = ("32C-k1024",)  # the command line's k (a second look after the scoring)
_round_at_qs("fresh12", "twolayer_fresh12", FRESH12_OUT, FRESH12_Q + FRESH12_EXTRA)
# the thirteenth (32 px, ten classes: the rule keeps all of z) against the default before
# (results/twolayer/PLAN-fresh13.md)
FRESH13_OUT = OUT / "fresh13"
FRESH13_Q = ("2C", "32C")
FRESH13_EXTRA = ("32Cmax128",)  # a cap on q chosen after the scoring (development)
_round_at_qs("fresh13", "twolayer_fresh13", FRESH13_OUT, FRESH13_Q + FRESH13_EXTRA)
# the fourteenth (32 px, ten classes): a cap on q for a vector z, q = min(32C, 128), with
# the calibration chosen again at it (``FRESH14_CAL``) against the library's rule (q = 32C,
# ``FRESH12_CAL``) (results/twolayer/PLAN-fresh14.md)
FRESH14_OUT = OUT / "fresh14"
FRESH14_Q = ("32C", "32Cmax128")
_round_at_qs("fresh14", "twolayer_fresh14", FRESH14_OUT, FRESH14_Q)
# A second held-out text round (``twolayer_text2.py``; results/twolayer/PLAN-text2.md): the
# library's q for a vector z (min(32C, 128)) against all of z (q = D), ``split_minilm``'s
# FFN-exact split, each scored with the library's calibration for a vector z (FRESH14_CAL)
TEXT2_OUT = OUT / "text2"
TEXT2_Q = ("32Cmax128", "D")
_round_at_qs("text2", "twolayer_text2", TEXT2_OUT, TEXT2_Q)
# Development at 64 px (``twolayer_dev64.py``: three image development tasks made again at
# 64 px): the forecast at several q, each its own set ``dev64_q<variant>``, grids in
# ``dev64/q<variant>``; q chosen here, never on fresh7.
DEV64_OUT = OUT / "dev64"
# at 64 px z = [320, 2, 2]: 8C = 2C per position; "-k<k>": a smaller projection than the
# tasks' k = 4096 (the simulation's steps read Φ [N q, k] twice: their cost is N q k)
DEV64_VARIANTS = ("8C", "16C", "32C", "32C-k2048", "32C-k1024", "32C-k512", "32C-k256")
for _v in DEV64_VARIANTS:
    ROUNDS[f"dev64_q{_v}"] = ("twolayer_dev64", DEV64_OUT)
    ROUND_Q[f"dev64_q{_v}"] = _v
    ROUND_GRIDS[f"dev64_q{_v}"] = DEV64_OUT / f"q{_v}"
# Development at 32 px, q chosen again (issue 13: at 32 px z is a vector, D = 320, and the
# default keeps 2C directions; ``--q D`` on deephead's cells kept CE's p90 at the 50% drop
# at 14% against 29%): the whole development grid at other q, each its own set
# ``dev32_q<variant>``, grids in ``dev32/q<variant>``; ``--grid`` alone is the stored q = 2C
# grid (``dev``: made before the catapult, its flagged cells' paths in ``flagged/``).
DEV32_OUT = OUT / "dev32"
DEV32_VARIANTS = ("2C", "8C", "16C", "32C", "D", "32Cmax128")


def run_dev32(name: str, variant: str | None, *, full_only: bool = False) -> dict:
    """``grid_task`` of development task ``name`` at ``variant`` (None: the stored grid,
    ``<task>-grid.json``), ``dev32/q<variant>/<task>-grid.json``; ``full_only``: its
    full-batch cells only (the rest can follow: resumable per cell)."""
    if variant is None:
        return grid_task(name)
    cells = dh.dev_tasks()[name][0]
    if full_only:
        cells = {k: c for k, c in cells.items() if c.get("batch_size") is None}
    return grid_task(name, variant, cells=cells,
                     path=DEV32_OUT / f"q{variant}" / f"{name}-grid.json")


def round_tasks(which: str) -> dict:
    """``{task: cells}`` of a fresh round's tasks (``ROUNDS``: the script that made their
    real runs, and their folder) whose real runs are stored (their task tables registered
    in ``holdout.TASKS``)."""
    import importlib

    module, folder = ROUNDS[which]
    mod = importlib.import_module(module)
    ho.TASKS.update(mod.TASKS)
    out = {name: json.loads((folder / f"{name}.json").read_text())["cells"]
           for name in mod.TASKS if (folder / f"{name}.json").exists()}  # fmt: skip
    for name, cells in out.items():  # the head-exact forecasts, where made (head_exact_round)
        hb = folder / f"{name}-hb.json"
        for key, g in (json.loads(hb.read_text())["cells"] if hb.exists() else {}).items():
            cells[key]["hb_loss"] = g["hb_loss"]
    return out


def head_exact_round(which: str, names: list[str]) -> None:
    """The command line's default forecast (head exact, body linear: ``tl.forecast`` of
    ``compute_head_body_kernel``, the task's projection) of every stored cell of a round, as
    ``holdout.py``'s ``hb_loss`` (the real run's batch seed ``holdout.SEED``, the rounds'
    horizon): ``<folder>/<task>-hb.json``, resumable per cell."""
    from tangentlab.headbody import compute_head_body_kernel

    cells = round_tasks(which)
    folder = ROUNDS[which][1]
    for name in names:
        path = folder / f"{name}-hb.json"
        state = json.loads(path.read_text()) if path.exists() else dict(task=name, cells={})
        todo = [k for k, c in cells[name].items() if "lr" in c and k not in state["cells"]]
        if not todo:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = ho.load_task(name)
        t0 = time.perf_counter()
        hb = compute_head_body_kernel(task["top"], (task["x"], task["y"]),
                                      params=task["params"],
                                      projection=ho.TASKS[name]["projection"], progress=False)
        hb.problem()
        state.update(kernel_seconds=time.perf_counter() - t0, machine=machine(),
                     threads=torch.get_num_threads())  # fmt: skip
        for key in todo:
            c = cells[name][key]
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fc = tl.forecast(hb, tl.SGD(c["lr"], momentum=c["momentum"]), c["fc_steps"],
                                 loss=c["loss"], batch_size=c["batch_size"], seed=ho.SEED)
            curve = ho._curve(fc.loss)
            if abs(curve[0] - c["run_loss"][0]) > 1e-3 * abs(c["run_loss"][0]):
                raise SystemExit(f"{name}/{key}: the forecast's initial loss differs from the "
                                 "run's")
            state["cells"][key] = dict(hb_loss=curve, seconds=time.perf_counter() - t0)
            path.write_text(json.dumps(state))
            print(name, key, "head exact", f"{state['cells'][key]['seconds']:.1f}s", flush=True)


def run_round(which: str, names: list[str]) -> None:
    """The library's exact-top forecast of every stored cell of a fresh round, as
    ``run_fresh``; once (PLAN-fresh2.md, PLAN-fresh3.md)."""
    cells = round_tasks(which)
    folder = ROUND_GRIDS.get(which, ROUNDS[which][1])
    for name in names:
        grid_task(name, ROUND_Q.get(which, "2C"), cells=cells[name],
                  path=folder / f"{name}-grid.json")


TEXT_HOLDOUT_OUT = TEXT_OUT / "holdout"  # results/twolayer/PLAN-text.md
TEXT_HOLDOUT_SPLIT = ("; MiniLM: only the last layer's attention linearized, ``split_minilm``'s "
                      "default; rounds 10-11's six fortune tasks")


def text_holdout_tasks() -> dict:
    """``{task: cells}`` of the held-out text tasks (PLAN-text.md: rounds 10-11's six
    fortune tasks, ``loss_interval.FRESH`` and ``FRESH11``, their stored real runs), their
    task tables registered in ``holdout.TASKS``."""
    import loss_interval as li

    tasks = {**li.FRESH, **li.FRESH11}
    ho.TASKS.update(tasks)
    return {name: json.loads((li.FRESH_OUT / f"{name}.json").read_text())["cells"]
            for name in tasks}  # fmt: skip


def run_text_holdout(names: list[str], variant: str = "2C") -> None:
    """The exact-top forecast (``split_minilm``'s FFN-exact split) of every stored cell of
    the held-out text tasks, as ``grid_task``; once (PLAN-text.md). ``variant``: q (another
    than the default 2C: in ``TEXT_HOLDOUT_OUT / q<variant>``, a second look after the
    twelfth round, PLAN-fresh12.md)."""
    cells = text_holdout_tasks()
    TEXT_SPLIT["split"] = "ffn"
    folder = TEXT_HOLDOUT_OUT if variant == "2C" else TEXT_HOLDOUT_OUT / f"q{variant}"
    for name in names:
        grid_task(name, variant, cells=cells[name], path=folder / f"{name}-grid.json")


def run_fresh(names: list[str]) -> None:
    """The library's exact-top forecast of every stored cell of the fresh tasks (full batch
    and B = 32), as ``grid_task``."""
    dev = fresh_tasks()
    for name in names:
        grid_task(name, cells=dev[name], path=FRESH_OUT / f"{name}-grid.json")


def holdout_lines() -> list[str]:
    """The held-out tasks' scores: the estimate, the library's head-exact forecast, and the
    steps interval (``STEPS_BAND``: a miss is outside)."""
    from headbody import _fmt

    rows = grid_rows("holdout", path="fixed")
    if not rows:
        return []
    for r in rows:  # the band frozen for this round (``BAND_BEFORE``, then ``STEPS_BAND``)
        r["inside"] = _inside_before(r)
    tasks = sorted({r["task"] for r in rows})
    lines = ["", f"**Held out** (`{COMMAND} --holdout`, once, as it came): rounds 8-9's image "
             f"tasks ({', '.join(tasks)}; {len(rows)} targets; their stored real runs, full "
             "batch: {mse, ce} x m {0, 0.9} x a {0.1, 0.3, 1}), which the development above "
             "never read. The method and interval frozen before (q = 2C, k = 4096, "
             "``STEPS_BAND`` as it was then, ``BAND_BEFORE``; "
             "results/twolayer/holdout/PLAN.md). Entries median / p90 of |T̂ − T|/T "
             "(targets, misses); interval: the share of targets inside (a miss is outside).",
             "",
             "| loss | drop | exact top | interval | head exact (library default) |",
             "|---|---|---|---|---|"]  # fmt: skip
    groups = [(loss, d) for loss in ho.LOSSES for d in ("0.5", "0.8", "0.9")]
    for loss, d in groups + [(None, None)]:
        sub = [r for r in rows if loss is None or (r["loss"], r["drop"]) == (loss, d)]
        label = "**all** | **all**" if loss is None else f"{loss} | {float(d):.0%}"
        inside = np.mean([r["inside"] for r in sub]) if sub else math.nan
        lines.append(f"| {label} | {_fmt(dh._errors(sub, 'et'))} | {inside:.0%} | "
                     f"{_fmt(dh._errors(sub, 'hb'))} |")
    for t in tasks:
        sub = [r for r in rows if r["task"] == t]
        lines.append(f"| {t} | all | {_fmt(dh._errors(sub, 'et'))} | "
                     f"{np.mean([r['inside'] for r in sub]):.0%} | "
                     f"{_fmt(dh._errors(sub, 'hb'))} |")
    return lines + HOLDOUT_READING.splitlines()


HOLDOUT_READING = """
*Held out, as it came.* Over the four tasks the exact-top estimate scores 10% / 62%
(116 targets, 6 misses) and its interval holds 84% of the targets, against 75% / miss (38
misses) for the library's uncalibrated head-exact forecast. The tasks differ: mpl-lite0 4% /
11% and stereo-lite1 10% / 35% (interval 100% on both), letters-lite0 13% / miss and
typefaces-lite1 38% / miss (63% and 69%). At the 50% and 80% drops only (81 targets) it
scores 9% / 40% (4 misses). For comparison, rounds 8-9 scored the library's *calibrated*
default forecast at 32% / 63% on mpl and stereo, and at 47% / miss on letters and typefaces
(their 50% and 80% targets; RESULTS.md "fullspan", "fullspan-pilot"). Against issue 13's
goals (median <= 15%, p90 <= 35%): MSE at the 50% drop meets them (5% / 12%); MSE at 80%
fails on its misses (10% / miss); CE fails at 50% (8% / 48%) and at 80% (21% / 53%). The
interval meets the 80% goal pooled (84%) but not at MSE's 80% and 90% drops (65%, 59%).
Where it is off, the real run is faster than the forecast: typefaces-lite1 and
stereo-lite1's CE runs, which take hundreds of steps. The model keeps the last block
linear, and over runs that long the block itself moves. The six misses are all at a = 1:
MSE without momentum on letters-lite0 and typefaces-lite1, and CE with momentum on
typefaces-lite1. There the forecast oscillates and stalls, its lowest loss 68%, 22% and 81%
of L0, while the real run keeps falling. Nothing changes in the defaults: the model stays
experimental.
"""


BAND_LEVELS = ((0.1, 0.9), (0.05, 0.95), (0.025, 0.975))  # candidates, narrowest first
BAND_COVER = 0.85  # the pooled left-out-task coverage each (loss, batch) group must reach


_BIG = 1e9  # a miss's residual in the quantiles (+∞ would make them NaN between two misses)


def _residual(r: dict) -> float:
    """log(T / T̂); a miss (the real run reaches the target, the forecast does not): +∞
    (``_BIG``; a band whose upper end is that large has none)."""
    return _BIG if r["et"] is None else math.log(r["T"] / r["et"])


def choose_band(rows: list[dict] | None = None, *, finite: bool = True,
                reached: bool = False) -> dict:
    """The steps interval of the exact-top forecast, T ∈ [T̃ e^lo, T̃ e^hi], per (loss,
    full/B32): (lo, hi) the (p, 1 − p) quantiles of log(T / T̃) over the development grid's
    targets (misses +∞; T̃ the library's estimate, ``et``), p the largest of
    ``BAND_LEVELS`` whose pooled left-out-task coverage reaches ``BAND_COVER`` in every
    group, for each kind of task (image, text) separately (each task's targets scored on the
    band of the other tasks); ``finite``: and whose upper ends are finite. ``reached``: the
    quantiles over the targets the forecast reaches only (a forecast that does not reach a
    target gives no interval: its misses still count as outside in the coverage)."""
    rows = rows if rows is not None else grid_rows()
    tasks = sorted({r["task"] for r in rows})
    groups = sorted({(r["loss"], r["batch"]) for r in rows})
    out = {}
    for levels in BAND_LEVELS:
        table, ok = {}, True
        for g in groups:
            sub = [r for r in rows if (r["loss"], r["batch"]) == g]
            x = np.array([_residual(r) for r in sub if not reached or r["et"] is not None])
            hit: dict[str, list[bool]] = {}
            for t in tasks:
                tr = np.array([_residual(r) for r in sub if r["task"] != t
                               and (not reached or r["et"] is not None)])  # fmt: skip
                lo, hi = np.quantile(tr, levels[0]), np.quantile(tr, levels[1])
                for r in sub:
                    if r["task"] == t:
                        hit.setdefault(r.get("kind", "image"), []).append(
                            bool(lo <= _residual(r) <= hi))
            lo, hi = np.quantile(x, levels[0]), np.quantile(x, levels[1])
            hi = math.inf if hi > _BIG / 2 else hi
            loto = {k: float(np.mean(v)) for k, v in sorted(hit.items())}
            table[g] = dict(lo=float(lo), hi=float(hi), loto=min(loto.values()), kinds=loto,
                            n=len(sub))  # fmt: skip
            ok &= bool(min(loto.values()) >= BAND_COVER and (math.isfinite(hi) or not finite))
        out[levels] = dict(table=table, ok=ok)
    chosen = next((lv for lv in BAND_LEVELS if out[lv]["ok"]), None)
    return dict(candidates=out, chosen=chosen)


DEV_SETS = ("dev", "text-ffn")  # the development tasks: 14 image, 14 text (default splits)


def dev_rows() -> list[dict]:
    """``check_rows`` of every development task, image and text (``DEV_SETS``)."""
    return [r for which in DEV_SETS for r in check_rows(which)]


def _drift_line(rows: list[dict]) -> tuple[float, float]:
    x = np.log([r["et_path"] for r in rows])
    y = np.log([r["T"] / r["et_path"] for r in rows])
    a, b = np.linalg.lstsq(np.c_[np.ones_like(x), x], y, rcond=None)[0]
    return float(a), float(b)


def choose_drift(rows: list[dict] | None = None) -> dict:
    """NOTE [exact-top drift]: per loss, (a, b) the least-squares line of log(T / T̂) on
    ln T̂ over the passed targets the forecast reaches (T̂ of the path), and the errors of
    T̂ and of T̃ with each task's (a, b) fitted on the other tasks (``loto``)."""
    from headbody import _fmt
    from tangentlab.experimental.exact_top import REBOUND_MAX

    rows = rows if rows is not None else dev_rows()
    out = {}
    for loss in ho.LOSSES:
        sub = [r for r in rows if r["loss"] == loss and r["R"] <= REBOUND_MAX and r["et_path"]]
        a, b = _drift_line(sub)
        left = []
        for t in sorted({r["task"] for r in sub}):
            at, bt = _drift_line([r for r in sub if r["task"] != t])
            left += [dict(r, loto=r["et_path"] * math.exp(min(0.0, at + bt * math.log(
                r["et_path"])))) for r in sub if r["task"] == t]  # fmt: skip
        out[loss] = dict(a=a, b=b, n=len(sub), path=_fmt(dh._errors(left, "et_path")),
                         loto=_fmt(dh._errors(left, "loto")))  # fmt: skip
    return out


def calibration_at(variant: str, extra: tuple[str, ...] = ()) -> dict:
    """The exact top's calibration chosen again at q = ``variant`` on the development tasks
    (``dev32_q<variant>`` and ``text-ffn_q<variant>``, and the task sets ``extra``: rounds
    scored before; development only, nothing adopted): the drift line per loss
    (:func:`choose_drift`), then the bands (:func:`choose_bands`) around the estimate with
    that drift; ``rows``: the targets with their ``et`` so."""
    rows = [r for w in (f"dev32_q{variant}", f"text-ffn_q{variant}", *extra)
            for r in check_rows(w)]  # fmt: skip
    if not rows:
        return {}
    drift = choose_drift(rows)
    for r in rows:
        a, b, t = drift[r["loss"]]["a"], drift[r["loss"]]["b"], r["et_path"]
        r["et"] = None if t is None else t * math.exp(min(0.0, a + b * math.log(max(t, 1.0))))
    return dict(drift=drift, bands=choose_bands(rows), rows=rows)


CANDIDATE_EXTRA = ("fresh11_q32C",)  # rounds scored before, used as development (PLAN-fresh12)


def candidate_calibration(variant: str = "32C", extra: tuple[str, ...] = CANDIDATE_EXTRA
                          ) -> dict:
    """PLAN-fresh12.md's candidate: the drift ``(a, b)`` per loss and the passed targets'
    bands per ``(loss, full batch)`` chosen at q = ``variant`` (:func:`calibration_at` on
    the development grids and the rounds ``extra``), the flagged band the library's
    (``STEPS_BAND_FLAGGED``) where no level reaches ``BAND_COVER``; frozen as
    ``FRESH12_CAL`` (at 32C with ``CANDIDATE_EXTRA``) and ``FRESH14_CAL``."""
    from tangentlab.experimental.exact_top import STEPS_BAND_FLAGGED

    cal = calibration_at(variant, extra)
    calm, fl = cal["bands"]["calm"], cal["bands"]["flagged"]
    assert calm["chosen"] is not None
    bands = {(loss, batch == "full"): (round(b["lo"], 2), round(b["hi"], 2))
             for (loss, batch), b in calm["candidates"][calm["chosen"]]["table"].items()}
    flagged = STEPS_BAND_FLAGGED
    if fl["chosen"] is not None:
        b = fl["candidates"][fl["chosen"]]["table"][("any", "any")]
        flagged = (round(b["lo"], 2), round(b["hi"], 2))
    return dict(drift={loss: (round(d["a"], 4), round(d["b"], 4))
                       for loss, d in cal["drift"].items()},
                bands=bands, flagged=flagged)  # fmt: skip


# PLAN-fresh12.md's candidate, frozen before any forecast of the twelfth round
# (``candidate_calibration()`` on 2026-12-04)
FRESH12_CAL = dict(drift={"mse": (0.0032, -0.0053), "ce": (0.0690, -0.0255)},
                   bands={("mse", True): (-0.07, 0.07), ("mse", False): (-0.17, 0.12),
                          ("ce", True): (-0.09, 0.06), ("ce", False): (-0.18, 0.40)},
                   flagged=(-1.30, 1.02))  # fmt: skip


# PLAN-fresh14.md's candidate: q = min(32C, 128) for a vector z with the calibration chosen
# again at it (``candidate_calibration("32Cmax128", FRESH14_EXTRA)`` on 2026-12-04: the
# 32-px image and the text development grids at the cap, and rounds 11-13, scored before:
# rounds 11-12 have four classes, where the cap is 32C, so their 32C grids are theirs),
# frozen before any forecast of the fourteenth round
FRESH14_EXTRA = ("fresh11_q32C", "fresh12_q32C", "fresh13_q32Cmax128")
FRESH14_CAL = dict(drift={"mse": (0.0249, -0.0113), "ce": (0.0799, -0.0295)},
                   bands={("mse", True): (-0.10, 0.08), ("mse", False): (-0.18, 0.16),
                          ("ce", True): (-0.09, 0.06), ("ce", False): (-0.23, 0.41)},
                   flagged=(-1.30, 1.02))  # fmt: skip


def recalibrate(rows: list[dict], cal: dict) -> list[dict]:
    """``rows`` (``check_rows``) with the estimate T̃ = T̂ exp(min(0, a + b ln T̂)) of
    ``cal["drift"]``, its ``bad`` and whether the target is inside ``cal``'s bands
    (``inside``; a miss is outside)."""
    from tangentlab.experimental.exact_top import REBOUND_MAX

    out = []
    for r in rows:
        a, b = cal["drift"][r["loss"]]
        t = r["et_path"]
        et = None if t is None else t * math.exp(min(0.0, a + b * math.log(max(t, 1.0))))
        lo, hi = (cal["flagged"] if r["R"] > REBOUND_MAX
                  else cal["bands"][(r["loss"], r["batch"] == "full")])  # fmt: skip
        inside = et is not None and et * math.exp(lo) <= r["T"] <= et * math.exp(hi)
        out.append(dict(r, et=et, bad=_bad(et, r["T"]), inside=inside))
    return out


def calibration_lines(variant: str = "32C") -> list[str]:
    """RESULTS.md lines of :func:`calibration_at`: the drift and the bands at ``variant``
    against the library's (chosen at q = 2C), and the development targets' errors."""
    from headbody import _fmt
    from tangentlab.experimental.exact_top import DRIFT, STEPS_BAND, STEPS_BAND_FLAGGED

    cal = calibration_at(variant)
    if not cal:
        return []
    lines = ["", f"*The calibration at q = {variant}, development only* (`{COMMAND} "
             f"--calibrate {variant}`; the 14 image development tasks at 32 px and the 14 text "
             "tasks at that q; nothing adopted): the drift line per loss (``choose_drift``) and "
             "the bands around the estimate with that drift (``choose_bands``, the rule of "
             "every band: the narrowest level whose left-out-task coverage reaches "
             f"{BAND_COVER:.0%}), against the library's, chosen at q = 2C.", "",
             "| what | library (q = 2C) | chosen again at this q |", "|---|---|---|"]
    for loss, d in cal["drift"].items():
        lines.append(f"| drift {loss} (a, b) | {DRIFT[loss][0]:.4f}, {DRIFT[loss][1]:.4f} | "
                     f"{d['a']:.4f}, {d['b']:.4f} (n {d['n']}; left out: path {d['path']}, "
                     f"T̃ {d['loto']}) |")
    for kind, res in cal["bands"].items():
        lv = res["chosen"]
        if lv is None:
            lines.append(f"| band {kind} | {STEPS_BAND_FLAGGED[0]:.2f}, "
                         f"{STEPS_BAND_FLAGGED[1]:.2f} | no level reaches {BAND_COVER:.0%} |"
                         if kind == "flagged" else f"| band {kind} | - | no level reaches "
                         f"{BAND_COVER:.0%} |")  # fmt: skip
            continue
        for (loss, batch), b in res["candidates"][lv]["table"].items():
            now = (STEPS_BAND_FLAGGED if kind == "flagged"
                   else STEPS_BAND[(loss, batch == "full")])  # fmt: skip
            lines.append(f"| band {kind} {loss} {batch} | {now[0]:.2f}, {now[1]:.2f} | "
                         f"{b['lo']:.2f}, {b['hi']:.2f} (p {lv[0]:g}; left out "
                         f"{b['loto']:.0%}, n {b['n']}) |")
    rows = cal["rows"]
    lines.append(f"| errors of T̃, all {len(rows)} targets | - | {_fmt(dh._errors(rows, 'et'))} |")
    return lines


PLOT_SETS = {"fresh14_q32Cmax128": "fourteenth fresh round, 32 px, C = 10 (held out once, "
                                   "q = 128)",
             "fresh13_q32C": "thirteenth fresh round, 32 px, C = 10 (held out once, q = D)",
             "fresh12_q32C": "twelfth fresh round, 32 px (held out once, q = 32C)",
             "fresh11_q2C": "eleventh fresh round, 32 px (held out once, q = 2C)",
             "fresh10": "tenth fresh round, 64 px (held out once, q = 2C P²)",
             "fresh9": "ninth fresh round, 64 px (held out once, q = 2C P²)",
             "fresh8": "eighth fresh round, 64 px (held out once, q = 2C P²)",
             "fresh7": "seventh fresh round, 64 px (held out once, q = 8C)",
             "fresh6": "sixth fresh round (held out once, the library as it is)",
             "fresh5": "fifth fresh round (held out once, the same model)",
             "fresh4": "fourth fresh round (held out once, the same library)",
             "fresh3": "third fresh round (held out once, the same library)",
             "fresh2": "second fresh round (second look)",
             "fresh": "first fresh round (second look)",
             "holdout": "rounds 8-9, full batch (second look)",
             "text-holdout": "text held out (second look)"}
PLOT = OUT / "calibration.png"
PLOT_CAL = {"fresh12_q32C": FRESH12_CAL, "fresh13_q32C": FRESH12_CAL,
            "fresh14_q32Cmax128": FRESH14_CAL}  # their own


def plot_calibration(path: Path = PLOT) -> Path:
    """One panel per held-out set (``PLOT_SETS``): the real steps T against the library's
    estimate T̃ of every target (log axes), passed and flagged targets apart, the diagonal
    and ±25%, a miss (no T̃) drawn at the right edge; saved as PNG."""
    from tangentlab.report import _plt

    plt = _plt()
    ncol = min(4, len(PLOT_SETS))
    nrow = -(-len(PLOT_SETS) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 4.0 * nrow), squeeze=False)
    for ax in axes.flat[len(PLOT_SETS):]:
        ax.set_axis_off()
    for ax, (which, title) in zip(axes.flat, PLOT_SETS.items()):
        rows = check_rows(which)
        if which in PLOT_CAL and rows:  # scored with its own calibration
            rows = recalibrate(rows, PLOT_CAL[which])
        if not rows:
            continue
        top = 2 * max(max(r["T"] for r in rows), max(r["et"] or 1 for r in rows))
        for flagged, mark, col in ((False, "o", "tab:blue"), (True, "x", "tab:red")):
            sub = [r for r in rows if (r["R"] > 0.15) == flagged]
            n_miss = sum(r["et"] is None for r in sub)
            ax.scatter([r["et"] or top for r in sub], [r["T"] for r in sub], marker=mark, s=14,
                       color=col, alpha=0.6, label=("flagged" if flagged else "passed")
                       + f" ({len(sub)}" + (f", {n_miss} miss" if n_miss else "") + ")")
        lim = [1, top]
        ax.plot(lim, lim, "k-", lw=0.8)
        for f in (0.75, 1.25):
            ax.plot(lim, [f * v for v in lim], "k:", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, title=title,
               xlabel="estimate T̃ (steps)", ylabel="real steps T")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Exact top: real steps to a 50/80/90% drop against the estimate "
                 "(dotted: ±25%; a miss at the right edge)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title above the first row
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drift_lines() -> list[str]:
    from tangentlab.experimental.exact_top import DRIFT

    res = choose_drift()
    lines = ["", f"The drift of long runs (`{COMMAND} --choose-drift`; NOTE [exact-top "
             "drift]): per loss, the least-squares line log(T / T̂) = a + b ln T̂ over the "
             "passed targets of the 28 development tasks (14 image, 14 text), and the "
             "estimate T̃ = T̂ exp(min(0, a + b ln T̂)) (``exact_top.DRIFT``, rounded); "
             "errors of T̂ and of T̃ with each task's line fitted on the other 27.", "",
             "| loss | targets | a | b | T̂ kept below | T̂ | T̃, task left out | library |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for loss, r in res.items():
        a, b = DRIFT[loss]
        keep = f"{math.exp(-a / b):.1f}" if b else "-"
        lines.append(f"| {loss} | {r['n']} | {r['a']:+.4f} | {r['b']:+.4f} | {keep} | "
                     f"{r['path']} | {r['loto']} | ({a:+.4f}, {b:+.4f}) |")
    return lines


def choose_bands(rows: list[dict] | None = None) -> dict:
    """NOTE [exact-top steps interval]: the band of the targets the reliability check passes
    (``REBOUND_MAX``), per (loss, full/B32), and one band pooled over all flagged targets,
    its quantiles over the flagged targets the forecast reaches (a miss gives no interval;
    before PLAN-fresh6.md the misses entered the quantiles as +∞, and the band had no upper
    end)."""
    from tangentlab.experimental.exact_top import REBOUND_MAX

    rows = rows if rows is not None else dev_rows()
    calm = [r for r in rows if r["R"] <= REBOUND_MAX]
    flagged = [dict(r, loss="any", batch="any") for r in rows if r["R"] > REBOUND_MAX]
    return dict(calm=choose_band(calm), flagged=choose_band(flagged, reached=True))


def band_lines() -> list[str]:
    rows = dev_rows()
    if not rows:
        return []
    res = choose_bands(rows)
    chosen = {k: (r["chosen"][0] if r["chosen"] else "-") for k, r in res.items()}
    lines = ["", f"The steps interval (`{COMMAND} --choose-band`; NOTE [exact-top steps "
             "interval]): T ∈ [T̃ e^lo, T̃ e^hi] around the estimate T̃ (``steps_estimate``), "
             "(lo, hi) the (p, 1 − p) quantiles of log(T / T̃) over the targets of the 28 "
             "development tasks (14 image, 14 text; a miss +∞), per loss and batch for "
             "the targets the reliability check passes (below), pooled over the ones it flags "
             "(its quantiles over the flagged targets the forecast reaches, since "
             "PLAN-fresh6.md: a miss gives no interval and counts as outside); the rule takes "
             "the largest p "
             f"in {[lv[0] for lv in BAND_LEVELS]} whose coverage with each task left out "
             f"(scored on the band of the other 27) reaches {BAND_COVER:.0%} in every group, "
             "for the image and the text tasks separately "
             "(and, for the passed targets, whose upper ends are finite). Chosen: p = "
             f"{chosen['calm']} passed, {chosen['flagged']} flagged (``exact_top.STEPS_BAND``, "
             "``STEPS_BAND_FLAGGED``).", "",
             "| check | p | loss | batch | targets | band (x T̃) | coverage, task left out: "
             "image | text |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, r in res.items():
        for lv, cand in r["candidates"].items():
            for (loss, batch), t in cand["table"].items():
                band = (f"{math.exp(t['lo']):.2f} - {math.exp(t['hi']):.2f}"
                        if math.isfinite(t["hi"]) else f"{math.exp(t['lo']):.2f} - ∞")
                cover = " | ".join(f"{t['kinds'].get(k, math.nan):.0%}"
                                   for k in ("image", "text"))  # fmt: skip
                lines.append(f"| {'passed' if kind == 'calm' else 'flagged'} | {lv[0]:g} | "
                             f"{loss} | {batch} | {t['n']} | {band} | {cover} |")
    return lines


# ---------------------------------------------------------------------------------------
# The reliability check (NOTE [exact-top reliability check]): R, the forecast's rebound
# before the target, against |T̂ − T|/T > 25% (a miss counts as bad).
# ---------------------------------------------------------------------------------------

CHECK_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
BAD = 0.25  # issue 13: "off by more than 25%"


def _stored_forecast(g: dict, full_batch: bool):
    """The stored grid cell ``g`` as an ``ExactTopForecast`` (its logged steps and losses)."""
    from tangentlab.experimental.exact_top import ExactTopForecast

    steps = [t for t, v in enumerate(g["et_loss"]) if v is not None]
    loss = [g["et_loss"][t] for t in steps]
    if g.get("blowup") is not None:
        steps, loss = steps + [g["blowup"]], loss + [math.nan]
    return ExactTopForecast(np.asarray(steps), np.asarray(loss, dtype=np.float64),
                            np.full(len(steps), np.nan), g.get("blowup"), g["seconds"],
                            dict(full_batch=full_batch))  # fmt: skip


def _bad(t: int | None, big_t: int) -> bool:
    return t is None or abs(t - big_t) / big_t > BAD


def check_rows(which: str = "dev", *, prefix: bool = False, path: str = "library"
               ) -> list[dict]:
    """``grid_rows(which)`` (its rebound R at each target: the library's
    ``ExactTopForecast.rebound`` of the stored path) with ``bad`` (|T̂ − T|/T > 25% or a
    miss) and ``bad_fixed`` (the same for the fixed kernel's T̂, None where not stored)."""
    rows = grid_rows(which, prefix=prefix, path=path)
    for r in rows:
        r["bad"] = _bad(r["et"], r["T"])
        r["bad_fixed"] = _bad(r["et_fixed"], r["T"]) if r["fixed"] else None
    return rows


def _check_score(rows: list[dict], g: float) -> dict:
    flagged = [r for r in rows if r["R"] > g]
    tp, bad = sum(r["bad"] for r in flagged), sum(r["bad"] for r in rows)
    p = tp / len(flagged) if flagged else 0.0
    rc = tp / bad if bad else 0.0
    calm = len(rows) - len(flagged)
    return dict(n=len(rows), flagged=len(flagged), tp=tp, bad=bad, precision=p, recall=rc,
                f1=2 * p * rc / (p + rc) if p + rc else 0.0,
                calm_bad=(bad - tp) / calm if calm else 0.0)  # fmt: skip


def choose_check(rows: list[dict] | None = None) -> dict:
    """The threshold of ``CHECK_GRID`` with the largest F1 on the development grid, and its
    leave-one-task-out score (each task flagged with the threshold chosen on the others)."""
    rows = rows if rows is not None else check_rows()
    best = max(CHECK_GRID, key=lambda g: _check_score(rows, g)["f1"])
    loto = []
    for t in sorted({r["task"] for r in rows}):
        g = max(CHECK_GRID, key=lambda g: _check_score([r for r in rows if r["task"] != t],
                                                       g)["f1"])  # fmt: skip
        loto += [dict(r, R=math.inf if r["R"] > g else 0.0) for r in rows if r["task"] == t]
    return dict(chosen=best, table={g: _check_score(rows, g) for g in CHECK_GRID},
                loto=_check_score(loto, 0.5))


def _check_row(label: str, s: dict) -> str:
    return (f"| {label} | {s['n']} | {s['bad']} | {s['flagged']} | {s['precision']:.0%} | "
            f"{s['recall']:.0%} | {s['calm_bad']:.0%} |")


def check_lines() -> list[str]:
    from tangentlab.experimental.exact_top import REBOUND_MAX

    rows = check_rows()
    if not rows:
        return []
    res = choose_check(rows)
    head = ["| rows | targets | bad (> 25% or miss) | flagged | precision | recall | bad among "
            "unflagged |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines = ["", f"The reliability check (`{COMMAND} --choose-check`; NOTE [exact-top "
             "reliability check]): R, the largest rise of the forecast's own loss above its "
             "running minimum before T̂, in units of L0, flags a target when R > g; *bad*: "
             f"|T̂ − T|/T > {BAD:.0%} or a miss. The rule takes the g of {list(CHECK_GRID)} "
             "with the largest F1 on the development grid; chosen: "
             f"g = {res['chosen']:g} (``exact_top.REBOUND_MAX`` = {REBOUND_MAX:g}).", "",
             *head]  # fmt: skip
    for g, s in res["table"].items():
        lines.append(_check_row(f"development, g = {g:g}", s))
    lines.append(_check_row("development, task left out (g chosen on the other 13)",
                            res["loto"]))  # fmt: skip
    for loss in ho.LOSSES:
        for batch in ("full", "B32"):
            sub = [r for r in rows if (r["loss"], r["batch"]) == (loss, batch)]
            lines.append(_check_row(f"development {loss} {batch}, g = {REBOUND_MAX:g}",
                                    _check_score(sub, REBOUND_MAX)))  # fmt: skip
    return lines + check_cap_lines()


CHECK_CAP_SETS = ("dev32_q32Cmax128", "text-ffn_q32Cmax128", *FRESH14_EXTRA)


def check_cap_lines() -> list[str]:
    """The check's threshold chosen again by the same rule at the library's q for a vector z
    (q = min(32C, 128); ``CHECK_CAP_SETS``: the 32-px image and the text development grids
    at it and rounds 11-13, with its calibration ``FRESH14_CAL``): development only."""
    from tangentlab.experimental.exact_top import REBOUND_MAX

    rows = [r for w in CHECK_CAP_SETS for r in recalibrate(check_rows(w), FRESH14_CAL)]
    if not rows:
        return []
    res = choose_check(rows)
    lines = ["", "The same rule at the library's q for a vector z (q = min(32C, 128), "
             "``FRESH14_CAL``; the 32-px image and the text development grids at it and rounds "
             f"11-13: {len({r['task'] for r in rows})} tasks; development only): chosen g = "
             f"{res['chosen']:g}, against the library's {REBOUND_MAX:g}.", "",
             "| rows | targets | bad (> 25% or miss) | flagged | precision | recall | bad among "
             "unflagged |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for g, s in res["table"].items():
        lines.append(_check_row(f"at the cap, g = {g:g}", s))
    lines.append(_check_row("at the cap, task left out (g chosen on the others)", res["loto"]))
    for kind in ("image", "text"):
        sub = [r for r in rows if r["kind"] == kind]
        for g in sorted({REBOUND_MAX, res["chosen"]}):
            lines.append(_check_row(f"at the cap, {kind} tasks, g = {g:g}", _check_score(sub, g)))
    return lines


# the flagged targets' band of PLAN-fresh3.md to PLAN-fresh5.md (5% quantile, a miss +∞ in
# the quantiles: no upper end); the first looks at those rounds were scored with it
BAND_FLAGGED_OPEN = (-0.89, math.inf)


def _inside(r: dict, flagged_band: tuple[float, float] | None = None) -> bool:
    """The target inside the library's steps interval (NOTE [exact-top steps interval]:
    the passed targets' band, or the flagged one, ``flagged_band`` if given); a miss is
    outside."""
    from tangentlab.experimental.exact_top import REBOUND_MAX, STEPS_BAND, STEPS_BAND_FLAGGED

    if r["et"] is None:
        return False
    if r["R"] > REBOUND_MAX:
        lo, hi = flagged_band or STEPS_BAND_FLAGGED
    else:
        lo, hi = STEPS_BAND[(r["loss"], r["batch"] == "full")]
    return r["et"] * math.exp(lo) <= r["T"] <= r["et"] * math.exp(hi)


# the one band per (loss, batch) before the check (commit e6a0417), scored beside the
# conditional interval on the held-out sets (PLAN-check.md)
BAND_BEFORE = {("mse", True): (-0.13, 0.21), ("mse", False): (-0.18, 0.13),
               ("ce", True): (-0.66, 0.15), ("ce", False): (-0.58, 0.70)}  # fmt: skip


def _inside_before(r: dict) -> bool:
    lo, hi = BAND_BEFORE[(r["loss"], r["batch"] == "full")]
    t = r["et_fixed"] if r["fixed"] else None  # that band was around the fixed kernel's T̂
    return t is not None and t * math.exp(lo) <= r["T"] <= t * math.exp(hi)


SCORED = {"holdout": "rounds 8-9's four image tasks (second look: PLAN-check.md)",
          "fresh": "the fresh tasks of `twolayer_fresh.py` (first look)",
          "text": "the 14 text development tasks (MiniLM; the check and interval as chosen "
                  "on the image tasks, never on text; the pooler split, not the default: its "
                  "flagged targets keep the fixed kernel's T̂, no catapult path was run)",
          "fresh2": "the second fresh round's three image tasks (`twolayer_fresh2.py`, "
                    "PLAN-fresh2.md; first look)",
          "fresh3": "the third fresh round's three image tasks (`twolayer_fresh3.py`, "
                    "PLAN-fresh3.md; first look, the library with the catapult, drift and "
                    "bands of PLAN-fresh3.md)",
          "fresh4": "the fourth fresh round's three image tasks (`twolayer_fresh4.py`, "
                    "PLAN-fresh4.md; first look, the library unchanged since PLAN-fresh3.md)",
          "fresh5": "the fifth fresh round's three image tasks (`twolayer_fresh5.py`, "
                    "PLAN-fresh5.md; first look, the library unchanged since PLAN-fresh3.md)",
          "fresh6": "the sixth fresh round's three image tasks (`twolayer_fresh6.py`, "
                    "PLAN-fresh6.md; first look, the model unchanged since PLAN-fresh3.md, "
                    "the flagged band of PLAN-fresh6.md)",
          "fresh7": "the seventh fresh round's three image tasks, the first at 64 px (z a "
                    "2 x 2 map; `twolayer_fresh7.py`, PLAN-fresh7.md; first look, the "
                    "library as it is: q = 2C per position of z, 8C)",
          "fresh7_now": "the seventh fresh round's three image tasks with the command "
                        "line's exact top as it is now (q = 32C, k = 1024; a second look: "
                        "both were chosen after this round)",
          "fresh7_q2C": "the seventh fresh round's three image tasks at q = 2C, the "
                        "default before it (PLAN-fresh7.md; reported beside it)",
          "fresh8": "the eighth fresh round's three image tasks, the second at 64 px "
                    "(`twolayer_fresh8.py`, PLAN-fresh8.md; first look, the library as it "
                    "is: q = 2C P², 32C)",
          "fresh8_q8C": "the eighth fresh round's three image tasks at q = 8C, the default "
                        "before it (PLAN-fresh8.md; reported beside it)",
          "fresh9": "the ninth fresh round's two image tasks, the third at 64 px "
                    "(`twolayer_fresh9.py`, PLAN-fresh9.md; first look, the library as it "
                    "is: q = 2C P², 32C, k = 4096)",
          **{f"fresh9_k{_k}": f"the ninth fresh round's two image tasks at k = {_k} (q = "
                              "32C; PLAN-fresh9.md, reported beside it)" for _k in FRESH9_K},
          "fresh10": "the tenth fresh round's two image tasks, the fourth at 64 px "
                     "(`twolayer_fresh10.py`, PLAN-fresh10.md; first look, the library as it "
                     "is: q = 2C P², 32C, k = 4096)",
          **{f"fresh10_k{_k}": f"the tenth fresh round's two image tasks at k = {_k} (q = "
                               "32C; PLAN-fresh10.md, reported beside it)" for _k in FRESH10_K},
          **{f"fresh11_q{_v}": "the eleventh fresh round's two image tasks, 32 px "
                               f"(`twolayer_fresh11.py`, PLAN-fresh11.md; first look), q = {_v}"
             for _v in FRESH11_Q},
          **{f"fresh12_q{_v}": "the twelfth fresh round's two image tasks, 32 px "
                               f"(`twolayer_fresh12.py`, PLAN-fresh12.md; first look), q = {_v}"
             for _v in FRESH12_Q},
          **{f"fresh13_q{_v}": "the thirteenth fresh round's two image tasks, 32 px, ten "
                               f"classes (`twolayer_fresh13.py`, PLAN-fresh13.md; first "
                               f"look), q = {_v}" for _v in FRESH13_Q},
          **{f"fresh14_q{_v}": "the fourteenth fresh round's two image tasks, 32 px, ten "
                               f"classes (`twolayer_fresh14.py`, PLAN-fresh14.md; first "
                               f"look), q = {_v}" for _v in FRESH14_Q},
          "fresh13_q32Cmax128": "the thirteenth fresh round's two image tasks again at q = "
                                "min(32C, 128) (development for PLAN-fresh14.md, after its "
                                "scoring)",
          "fresh12_q32C-k1024": "the twelfth fresh round's two image tasks again at q = 32C "
                                "and the command line's k = 1024 (a second look after "
                                "PLAN-fresh12.md's scoring)",
          **{f"text2_q{_v}": "the second fresh text round's four tasks (MiniLM, FFN-exact "
                             f"split; `twolayer_text2.py`, PLAN-text2.md; first look), "
                             f"q = {_v}" for _v in TEXT2_Q},
          "text-holdout_q32C": "the six held-out text tasks again at q = 32C (PLAN-text.md's "
                               "tasks, scored once at q = 2C: a second look after "
                               "PLAN-fresh12.md)",
          "text-holdout": "the six held-out text tasks (PLAN-text.md: MiniLM, FFN-exact "
                          "split; the check and interval as chosen on the image tasks; first "
                          "look)"}


# The held-out sets on which the command line's default was decided (2026-12-03: the exact
# top, over the head-exact model, the default before): first looks, except where noted.
DEFAULT_SETS = (("fresh2", "32", "second look (the drift came after it)"),
                ("fresh3", "32", "first look"), ("fresh4", "32", "first look"),
                ("fresh5", "32", "first look"), ("fresh6", "32", "first look"),
                ("fresh7", "64", "first look; q = 8C, the default then"),
                ("fresh7_now", "64", "second look; q = 32C, k = 1024 (the default now)"),
                ("fresh8", "64", "first look"),
                ("fresh9", "64", "first look"), ("fresh10", "64", "first look"),
                ("text-holdout", "text", "second look (the drift came after it)"))


def _goals_met(rows: list[dict], model: str) -> str:
    """Issue 13's goals (median <= 15%, p90 <= 35% of |T̂ − T|/T) in how many of the four
    (loss, drop) groups at the 50% and 80% drops."""
    met, groups = 0, 0
    for loss in ho.LOSSES:
        for d in ("0.5", "0.8"):
            e = dh._errors([r for r in rows if (r["loss"], r["drop"]) == (loss, d)], model)
            if e:
                groups += 1
                met += bool(np.median(e) <= 0.15 and np.quantile(e, 0.9) <= 0.35)
    return f"{met} of {groups}"


def default_choice_lines() -> list[str]:
    """The command line's default for forecast and validate, as decided: the exact top's
    estimate against the head-exact model's T̂ on every held-out set where both are stored
    (``--head-exact ROUND``), the goals they meet and the exact top's interval."""
    from headbody import _fmt

    lines = ["", "**The command line's default for `forecast` and `validate`** (2026-12-03: "
             "`--linearize auto` takes the exact top where the network splits; before, the "
             "head-exact model). Every held-out set where both forecasts are stored "
             f"(`{COMMAND} --head-exact ROUND` for the head-exact ones of rounds 2-7, made "
             "on 2026-12-03 for this table: the library's head-exact model is unchanged "
             "since those rounds, nothing was tuned on them), the same targets: entries "
             "median / p90 of |T̂ − T|/T (targets, misses); the exact top's estimate T̃, the "
             "head-exact model's uncalibrated T̂ (its calibrated median estimate scored "
             "26-46% on the earlier held-out rounds: RESULTS.md 'holdout-fresh'); *goals*: "
             "issue 13's (median <= 15%, p90 <= 35%) met in how many (loss, drop) groups at "
             "the 50% and 80% drops; *interval*: share of the targets inside the exact "
             "top's interval.", "",
             "| set | images | look | exact top | goals | head exact | goals | interval |",
             "|---|---|---|---|---|---|---|---|"]
    for which, px, look in DEFAULT_SETS:
        if not all(key for _, key in _task_set(which)[1].values()):
            continue  # some task's head-exact forecasts not stored
        rows = check_rows(which)
        if not rows:
            continue
        name = SCORED[which].split(" (")[0].removeprefix("the ")
        lines.append(f"| {name} | {px} | {look} | {_fmt(dh._errors(rows, 'et'))} | "
                     f"{_goals_met(rows, 'et')} | {_fmt(dh._errors(rows, 'hb'))} | "
                     f"{_goals_met(rows, 'hb')} | "
                     f"{np.mean([_inside(r) for r in rows]):.0%} |")
    return lines


def head_exact_lines(which: str, beside: tuple[str, ...] = ()) -> list[str]:
    """The library's exact-top estimate against the command line's default forecast (head
    exact, body linear; ``head_exact_round``) on ``which``'s targets, per loss and drop,
    and the share of full-batch targets inside the exact-top interval."""
    from headbody import _fmt

    rows = check_rows(which)
    if not rows or all(r["hb"] is None for r in rows):
        return []
    lines = ["", f"**Against the head-exact model** (the command line's default until "
             f"2026-12-03) on {SCORED[which]} (`{COMMAND} "
             f"--head-exact {which}`: head exact, body linear, uncalibrated, the real run's "
             "batch seed): entries median / p90 of |T̂ − T|/T (targets, misses).", "",
             "| loss | drop | exact top (estimate) | head exact (default until 2026-12-03) |",
             "|---|---|---|---|"]
    for loss in ho.LOSSES:
        for d in ("0.5", "0.8", "0.9"):
            sub = [r for r in rows if (r["loss"], r["drop"]) == (loss, d)]
            lines.append(f"| {loss} | {float(d):.0%} | {_fmt(dh._errors(sub, 'et'))} | "
                         f"{_fmt(dh._errors(sub, 'hb'))} |")
    lines.append(f"| **all** | **all** | {_fmt(dh._errors(rows, 'et'))} | "
                 f"{_fmt(dh._errors(rows, 'hb'))} |")
    lines.append("")
    for w, sub in ((which, rows), *((b, check_rows(b)) for b in beside)):
        full = [r for r in sub if r["batch"] == "full"]
        mse = [r for r in full if r["loss"] == "mse"]
        lines.append(f"The exact-top interval ({SCORED[w].split(' (')[0]}) holds "
                     f"{np.mean([_inside(r) for r in full]):.0%} of the {len(full)} full-batch "
                     f"targets ({np.mean([_inside(r) for r in mse]):.0%} of the {len(mse)} MSE "
                     "ones).")
    return lines


def round_cost_lines(rounds: tuple[str, ...], label: str = "64-px rounds'") -> list[str]:
    """What the forecasts of a round's grid cost against its real runs, per task: the
    kernel and the simulations' seconds (``<task>-grid.json``) against the real runs'
    (``<task>.json``: the trained weights on cached trunk outputs, each cell with the
    trunk's forward added, one thread), in the same session's conditions."""
    for which in rounds:
        round_tasks(which)  # its task tables (the projection)
    lines = ["", f"**Cost of the {label} forecasts** (seconds, one thread, two jobs at a "
             "time; the whole grid of a task, 24 cells): the exact top's kernel and "
             "simulations (each to the deepest target its real run reaches) against the real "
             "runs of the same cells (the trained weights on cached trunk outputs, the "
             "trunk's forward added to each cell: a real run without the frozen trunk's "
             "cost, cheaper than the plain full-network run a user pays).", "",
             "| round | task | q | k | kernel s | simulations s | real runs s | "
             "(kernel + simulations) / real |", "|---|---|---|---|---|---|---|---|"]
    for which in rounds:
        folder = ROUND_GRIDS.get(which, ROUNDS[which][1])
        for grid in sorted(folder.glob("*-grid.json")):
            g = json.loads(grid.read_text())
            real = json.loads((ROUNDS[which][1] / f"{g['task']}.json").read_text())
            sim = sum(c.get("seconds", 0.0) for c in g["cells"].values())
            rs = sum(c["real_seconds"] for c in real["cells"].values())
            k = _projection_of(g["variant"], ho.TASKS[g["task"]]["projection"])
            lines.append(f"| {which} | {g['task']} | {g['q']} | {k} | {g['kernel_seconds']:.1f}"
                         f" | {sim:.0f} | {rs:.0f} | {(g['kernel_seconds'] + sim) / rs:.2f} |")
    return lines


def check_scored_lines(which: str, *, cal: dict | None = None, cal_label: str | None = None
                       ) -> list[str]:
    """The frozen check and interval (results/twolayer/PLAN-check.md) scored on ``which``:
    errors, the check's precision and recall, and the interval's coverage, per loss, batch
    and drop, and per task; ``cal``: with that drift and those bands (:func:`recalibrate`)
    in place of the library's."""
    from headbody import _fmt
    from tangentlab.experimental.exact_top import REBOUND_MAX

    rows = check_rows(which, prefix=True)
    if not rows:
        return []
    if cal is not None:
        rows = recalibrate(rows, cal)
    for r in rows:
        r["inside"] = r["inside"] if cal is not None else _inside(r)
    tasks = sorted({r["task"] for r in rows})
    cal_label = cal_label or ("the candidate calibration** (``FRESH12_CAL``: the drift and "
                              "the bands chosen again at q = 32C; PLAN-fresh12.md")
    title = SCORED[which] + (f", **with {cal_label}; *interval* columns: its bands)"
                             if cal is not None else "")  # fmt: skip
    lines = ["", f"**Scored: {title}** ({', '.join(tasks)}; {len(rows)} targets), "
             "the library as it is now: its path (NOTE [exact-top catapult]: a flagged "
             f"target's T̂ from its catapult path), its check (R > {REBOUND_MAX:g}, "
             "PLAN-check.md) and its interval (``STEPS_BAND``, ``STEPS_BAND_FLAGGED``: "
             "chosen again around T̃ on the 28 development tasks, PLAN-fresh3.md). "
             "Entries: errors median / p90 of |T̂ − T|/T (targets, misses); *fixed kernel*: "
             "the path without the catapult, as the set was first scored (the passed targets' "
             "T̂ are the same); bad: > 25% or a miss; precision and recall of the flag for "
             "bad targets; interval: share of targets inside (a miss is outside), of all, "
             "of the passed and of the flagged ones (the flagged band of PLAN-fresh6.md, "
             "x0.27 to x2.78 of T̃), and of all with the flagged band of PLAN-fresh3.md to "
             "PLAN-fresh5.md (*open*: x0.41 to ∞); *before*: the one band per loss and "
             "batch of commit e6a0417 (``BAND_BEFORE``, around the fixed kernel's T̂); "
             "*prefix 5% / 10%*: issue 13's "
             "baselines, a power law fitted to the first 5% / 10% of the real run's steps "
             "(``headbody._powerlaw_curve``).", "",
             "| loss | batch | drop | exact top | fixed kernel | bad | flagged | precision | "
             "recall | bad among passed | interval: all | passed | flagged | open | before "
             "| prefix 5% | prefix 10% |", "|" + "---|" * 17]  # fmt: skip

    def line(label: str, sub: list[dict]) -> str:
        s = _check_score(sub, REBOUND_MAX)
        calm = [r["inside"] for r in sub if r["R"] <= REBOUND_MAX]
        flag = [r["inside"] for r in sub if r["R"] > REBOUND_MAX]
        pct = lambda v: f"{np.mean(v):.0%} ({len(v)})" if v else "-"  # noqa: E731
        fixed = _fmt(dh._errors(sub, "et_fixed")) if all(r["fixed"] for r in sub) else "-"
        return (f"| {label} | {_fmt(dh._errors(sub, 'et'))} | {fixed} | {s['bad']} | "
                f"{s['flagged']} | "
                f"{s['precision']:.0%} | {s['recall']:.0%} | {s['calm_bad']:.0%} | "
                f"{pct([r['inside'] for r in sub])} | {pct(calm)} | {pct(flag)} | "
                f"{pct([_inside(r, BAND_FLAGGED_OPEN) for r in sub])} | "
                f"{pct([_inside_before(r) for r in sub]) if fixed != '-' else '-'} | "
                f"{_fmt(dh._errors(sub, 'p5'))} | "
                f"{_fmt(dh._errors(sub, 'p10'))} |")

    for loss in ho.LOSSES:
        for batch in ("full", "B32"):
            for d in ("0.5", "0.8", "0.9"):
                sub = [r for r in rows if (r["loss"], r["batch"], r["drop"]) == (loss, batch, d)]
                if sub:
                    lines.append(line(f"{loss} | {batch} | {float(d):.0%}", sub))
    for loss in ho.LOSSES:
        for d in ("0.5", "0.8"):
            sub = [r for r in rows if (r["loss"], r["drop"]) == (loss, d)]
            if sub:
                lines.append(line(f"{loss} | all | {float(d):.0%}", sub))
    for t in tasks:
        lines.append(line(f"{t} | all | all", [r for r in rows if r["task"] == t]))
    for name, keep in (("passed", lambda r: r["R"] <= REBOUND_MAX),
                       ("flagged", lambda r: r["R"] > REBOUND_MAX)):
        for loss in ho.LOSSES:
            sub = [r for r in rows if keep(r) and r["loss"] == loss]
            if sub:
                lines.append(line(f"{name}: {loss} | all | all", sub))
    lines.append(line("**all** | **all** | **all**", rows))
    return lines


def dev64_lines() -> list[str]:
    """The 64-px development tasks (``twolayer_dev64.py``) at each q that ran: the
    estimate's errors, bias, check and interval, and the forecast's seconds."""
    runs = {v: check_rows(f"dev64_q{v}") for v in DEV64_VARIANTS
            if list((DEV64_OUT / f"q{v}").glob("*-grid.json"))}  # fmt: skip
    if not runs:
        return []
    tasks = sorted({r["task"] for rows in runs.values() for r in rows})
    lines = ["", "**Development at 64 px** (`.venv/bin/python benchmarks/twolayer_dev64.py "
             f"--real`, then `{COMMAND} --dev64 VARIANT`; {', '.join(tasks)}: three image "
             "development tasks made again at 64 px, z = [320, 2, 2]; the whole grid; "
             "development data, nothing held out). The library's estimate T̃ at each q "
             "(8C: 2C per position of z, the default before; 32C: 2C P², the default since), "
             "and the command line's default forecast (head exact, body linear: "
             "``--head-exact dev64_q8C``, uncalibrated) on the same targets; entries "
             "median / p90 of |T̃ − T|/T "
             "(targets, misses); *T̃/T*: median ratio (in brackets the path's T̂/T, without "
             "the drift of long runs), and the share of targets where the "
             "estimate is slow (T̃ > T); interval: share of targets inside the library's "
             "steps interval; seconds: the forecasts' simulation summed over the grid, and "
             "the kernels', one thread.", ""]
    return lines + _variant_table(runs, DEV64_OUT, head_exact=True)


def dev32_lines() -> list[str]:
    """The 32-px development tasks at each q of ``DEV32_VARIANTS`` that ran (``--grid --q``),
    on the targets every variant has (the full-batch cells where a variant ran only those)."""
    runs = {v: check_rows(f"dev32_q{v}") for v in DEV32_VARIANTS
            if list((DEV32_OUT / f"q{v}").glob("*-grid.json"))}  # fmt: skip
    if not runs:
        return []
    keys = set.intersection(*({(r["task"], r["cell"], r["drop"]) for r in rows}
                              for rows in runs.values()))  # fmt: skip
    runs = {v: [r for r in rows if (r["task"], r["cell"], r["drop"]) in keys]
            for v, rows in runs.items()}  # fmt: skip
    rows = next(iter(runs.values()))
    tasks = sorted({r["task"] for r in rows})
    b32 = sorted({r["task"] for r in rows if r["batch"] == "B32"})
    lines = ["", "**Development at 32 px, q again** (`" + COMMAND + " --grid --q VARIANT"
             f" [--full-only]`; the {len(tasks)} image development tasks, z a vector of "
             f"D = 320; the full-batch cells of every task, the B = 32 cells of {len(b32)} "
             f"(where every variant ran them): {len(rows)} targets; development data, "
             "nothing held out). The library as it is now (with the catapult) at each q: "
             "2C (the default for a vector z until PLAN-fresh12.md), kC (32C the default "
             "until PLAN-fresh14.md), D (all of z: Q = I, no κ_⊥), 32Cmax128 (min(32C, "
             "128), the default since); every row's estimate and interval with the map's "
             "calibration (``DRIFT``, ``STEPS_BAND``); columns as the 64-px table "
             "below; seconds: the simulations of the full-batch cells of all 14 tasks and "
             "the kernels, one thread, two or three jobs at a time.", ""]
    return (lines + _variant_table(runs, DEV32_OUT, full_cells=True)
            + text_q_lines() + text_qd_lines())


def text_q_lines() -> list[str]:
    """The text development tasks at q = 32C (``--text --text-split ffn --q 32C``) against
    the stored q = 2C grid, on the same targets."""
    from headbody import _fmt

    runs = {v: check_rows(w) for v, w in (("2C", "text-ffn"), ("32C", "text-ffn_q32C"))}
    if not all(runs.values()):
        return []
    keys = set.intersection(*({(r["task"], r["cell"], r["drop"]) for r in rows}
                              for rows in runs.values()))  # fmt: skip
    lines = ["", f"The 14 text development tasks (`{COMMAND} --text --text-split ffn --q 32C`; "
             "MiniLM, `split_minilm`'s default split, z its [CLS] state, D = 384; against "
             f"the stored q = 2C grid; {len(keys)} targets), median / p90 of |T̃ − T|/T:", "",
             "| q | MSE 50% | MSE 80% | CE 50% | CE 80% | all | flagged | interval |",
             "|---|---|---|---|---|---|---|---|"]
    for v, rows in runs.items():
        rows = [r for r in rows if (r["task"], r["cell"], r["drop"]) in keys]
        cols = [_fmt(dh._errors([r for r in rows if (r["loss"], r["drop"]) == (lo, d)], "et"))
                for lo in ("mse", "ce") for d in ("0.5", "0.8")]  # fmt: skip
        lines.append(f"| {v} | " + " | ".join(cols) + f" | {_fmt(dh._errors(rows, 'et'))} | "
                     f"{sum(r['R'] > 0.15 for r in rows)} | "
                     f"{np.mean([_inside(r) for r in rows]):.0%} |")
    return lines


TEXT_Q_SETS = {"32Cmax128": "text-ffn_q32Cmax128", "D": "text-ffn_qD"}  # PLAN-text2.md


def _q_compare(runs: dict[str, list[dict]], folders: dict[str, Path]) -> list[str]:
    """One line per q of ``runs`` (``{q: recalibrated rows}``, on the targets all have;
    grids in ``folders[q]``): the estimate's errors per loss and drop, where the check
    passes and where it flags, the bad targets, the interval, and the seconds."""
    from headbody import _fmt
    from tangentlab.experimental.exact_top import REBOUND_MAX

    def part(sub: list[dict]) -> str:
        bad = np.mean([r["bad"] for r in sub]) if sub else 0.0
        return f"{_fmt(dh._errors(sub, 'et'))}, {bad:.0%} bad" if sub else "-"

    keys = set.intersection(*({(r["task"], r["cell"], r["drop"]) for r in rows}
                              for rows in runs.values()))  # fmt: skip
    lines = ["| q | MSE 50% | MSE 80% | CE 50% | CE 80% | all | passed | flagged | bad | "
             "interval | seconds (kernel) |", "|" + "---|" * 11]
    for v, rows in runs.items():
        rows = [r for r in rows if (r["task"], r["cell"], r["drop"]) in keys]
        cols = [_fmt(dh._errors([r for r in rows if (r["loss"], r["drop"]) == (lo, d)], "et"))
                for lo in ("mse", "ce") for d in ("0.5", "0.8")]  # fmt: skip
        calm = [r for r in rows if r["R"] <= REBOUND_MAX]
        flag = [r for r in rows if r["R"] > REBOUND_MAX]
        states = [json.loads(p.read_text()) for p in sorted(folders[v].glob("*-grid.json"))]
        sim = sum(c.get("seconds", 0.0) for g in states for c in g["cells"].values())
        kern = sum(g["kernel_seconds"] for g in states)
        lines.append(f"| {v} | " + " | ".join(cols) + f" | {_fmt(dh._errors(rows, 'et'))} | "
                     f"{part(calm)} | {part(flag)} | {sum(r['bad'] for r in rows)} of "
                     f"{len(rows)} | {np.mean([r['inside'] for r in rows]):.0%} | "
                     f"{sim + kern:.0f} ({kern:.0f}) |")
    return lines


TEXT2_LABEL = ("the library's calibration for a vector z** (``DRIFT_VECTOR``, "
               "``STEPS_BAND_VECTOR`` = ``FRESH14_CAL``; PLAN-text2.md")


def text2_lines() -> list[str]:
    """The second fresh text round (PLAN-text2.md), once it has run at both q: each q
    scored with the library's vector calibration, the two side by side, the plan's claims
    1-3 (claim 4 is the README's ``validate`` line), and the forecasts' seconds."""
    from headbody import _fmt

    if not all(list((TEXT2_OUT / f"q{v}").glob("*-grid.json")) for v in TEXT2_Q):
        return []
    lines = []
    for v in TEXT2_Q:
        lines += check_scored_lines(f"text2_q{v}", cal=FRESH14_CAL, cal_label=TEXT2_LABEL)
    runs = {v: recalibrate(check_rows(f"text2_q{v}"), FRESH14_CAL) for v in TEXT2_Q}
    lines += ["", "**The second fresh text round, the two q side by side** (PLAN-text2.md; "
              "columns as the development table of *All of z for text bodies*; seconds: "
              "the round's kernels and simulations, one thread, two jobs at a time):", ""]
    lines += _q_compare(runs, {v: TEXT2_OUT / f"q{v}" for v in TEXT2_Q})
    lib, cand = runs["32Cmax128"], runs["D"]
    from headbody import _quantile

    e_lib, e_cand = (dh._errors(r, "et") for r in (lib, cand))
    miss = [sum(r["et"] is None for r in rows) for rows in (lib, cand)]
    fb = [r["inside"] for r in cand if r["batch"] == "full"]
    claims = [
        ("no more bad targets", sum(r["bad"] for r in cand) <= sum(r["bad"] for r in lib),
         f"{sum(r['bad'] for r in cand)} against {sum(r['bad'] for r in lib)}"),
        ("median within +1 point, p90 within +3, at most one miss more",
         (_quantile(e_cand, 0.5) <= _quantile(e_lib, 0.5) + 0.01
          and _quantile(e_cand, 0.9) <= _quantile(e_lib, 0.9) + 0.03
          and miss[1] <= miss[0] + 1),
         f"{_fmt(dh._errors(cand, 'et'))} against {_fmt(dh._errors(lib, 'et'))}"),
        ("interval ≥ 80% of all and of the full-batch targets",
         np.mean([r["inside"] for r in cand]) >= 0.8 and np.mean(fb) >= 0.8,
         f"{np.mean([r['inside'] for r in cand]):.0%}, full batch {np.mean(fb):.0%}")]
    lines += ["", "| PLAN-text2.md claim | held | figures |", "|---|---|---|"]
    lines += [f"| {i}. {c} | {'yes' if ok else '**no**'} | {f} |"
              for i, (c, ok, f) in enumerate(claims, 1)]  # fmt: skip
    lines.append("| 4. the command line's text example at q = D: kernel and forecast ≤ 10% "
                 "of the real run | **no** | 29% (the reading below; measured with "
                 "`tangentlab validate`, not from the stored grids) |")
    lines += round_cost_lines(tuple(f"text2_q{v}" for v in TEXT2_Q), "second text round's")
    return lines + TEXT2_READING.splitlines()


def text_qd_lines() -> list[str]:
    """The text development tasks at the library's q for a vector z (min(32C, 128)) and at
    q = D (all of z), both with the library's calibration for a vector z (``FRESH14_CAL``):
    the choice PLAN-text2.md froze."""
    runs = {v: recalibrate(check_rows(w), FRESH14_CAL) for v, w in TEXT_Q_SETS.items()}
    if not all(runs.values()):
        return []
    lines = ["", f"*All of z for text bodies, development* (`{COMMAND} --text --text-split ffn "
             "--q D`; the 14 text development tasks, MiniLM's [CLS] state, D = 384, where the "
             "library keeps q = min(32C, 128) = 64-128): both with the library's calibration "
             "for a vector z (``DRIFT_VECTOR``, ``STEPS_BAND_VECTOR``: chosen with the q = "
             "min(32C, 128) grids of these tasks among others, which favours that row). "
             "Entries median / p90 of |T̃ − T|/T (targets, misses); *bad*: > 25% or a miss; "
             "interval: share inside the library's steps interval; seconds: kernels and "
             "simulations of the 14 grids, one thread, two jobs at a time.", ""]
    return lines + _q_compare(runs, {v: TEXT_OUT / "ffn" / f"q{v}" for v in runs})


def _variant_table(runs: dict[str, list[dict]], folder: Path, *, head_exact: bool = False,
                   full_cells: bool = False) -> list[str]:
    """The table of :func:`dev64_lines` and :func:`dev32_lines`: one line per variant of
    ``runs`` (``{variant: check_rows}``, grids in ``folder / q<variant>``); ``full_cells``:
    the seconds of the full-batch cells only (every variant ran those)."""
    from headbody import _fmt
    from tangentlab.experimental.exact_top import REBOUND_MAX

    lines = ["| q | tasks | MSE 50% | MSE 80% | CE 50% | CE 80% | all | T̃/T | slow | flagged "
             "| interval | interval, passed | seconds (kernel) |", "|" + "---|" * 13]
    groups = (("mse", "0.5"), ("mse", "0.8"), ("ce", "0.5"), ("ce", "0.8"))
    for v, rows in runs.items():
        states = [json.loads(p.read_text())
                  for p in sorted((folder / f"q{v}").glob("*-grid.json"))]  # fmt: skip
        ratios = [r["et"] / r["T"] for r in rows if r["et"] is not None]
        path = [r["et_path"] / r["T"] for r in rows if r["et_path"] is not None]
        passed = [r for r in rows if r["R"] <= REBOUND_MAX]
        cols = [_fmt(dh._errors([r for r in rows if (r["loss"], r["drop"]) == g], "et"))
                for g in groups]  # fmt: skip
        secs = sum(c.get("seconds", 0.0) for st in states for k, c in st["cells"].items()
                   if not full_cells or "-full-" in k)  # fmt: skip
        ks = sum(st["kernel_seconds"] for st in states)
        qs = "/".join(str(st["q"]) for st in states)
        lines.append(f"| {v} ({qs}) | {len(states)} | " + " | ".join(cols)
                     + f" | {_fmt(dh._errors(rows, 'et'))} | {np.median(ratios):.2f} "
                     f"({np.median(path):.2f}) | "
                     f"{np.mean([x > 1 for x in ratios]):.0%} | "
                     f"{sum(r['R'] > REBOUND_MAX for r in rows)} | "
                     f"{np.mean([_inside(r) for r in rows]):.0%} | "
                     f"{np.mean([_inside(r) for r in passed]) if passed else 0:.0%} | "
                     f"{secs:.0f} ({ks:.0f}) |")
    rows = next(iter(runs.values()))
    if head_exact and any(r["hb"] is not None for r in rows):  # the head-exact forecasts
        cols = [_fmt(dh._errors([r for r in rows if (r["loss"], r["drop"]) == g], "hb"))
                for g in groups]  # fmt: skip
        ratios = [r["hb"] / r["T"] for r in rows if r["hb"] is not None]
        lines.append("| head exact (CLI default) | " + f"{len({r['task'] for r in rows})} | "
                     + " | ".join(cols) + f" | {_fmt(dh._errors(rows, 'hb'))} | "
                     f"{np.median(ratios):.2f} | {np.mean([x > 1 for x in ratios]):.0%} | "
                     "- | - | - | - |")
    return lines


FRESH14_LABEL = ("the candidate** (PLAN-fresh14.md: q = min(32C, 128) with ``FRESH14_CAL``, "
                 "the drift and the bands chosen again at the cap; the library's since")
FRESH14_RULE_LABEL = ("the library's rule at the freeze** (q = 32C with ``FRESH12_CAL``, the "
                      "vector calibration until this round")
FRESH14_INFO_LABEL = ("the rule's calibration** (for information: q = min(32C, 128) with "
                      "``FRESH12_CAL``")
TEXT2_READING = """
*The second fresh text round: all of z for text bodies* (PLAN-text2.md; 2026-12-04). On the
flagged text development cells the exact weight-space model beat the library's path, and
the gap was the subspace (``twolayer_weights.py --library qD``, "twolayer-weights"); on the
whole text development grid (*All of z for text bodies* above) q = D scored 1% / 10%, 43 of
956 targets bad, 6 misses, against the library's q = min(32C, 128) at 1% / 12%, 60, 12, at
2.7x the seconds. Four fresh text tasks on three Debian fortune packages no task used
(``twolayer_text2.py``: BOFH excuses or English Debian hints; a Debian hint in German,
French or Spanish; Portuguese jokes, gaucho sayings or computer jokes; anagrams,
palindromes or quotations; MiniLM, 64 samples, 16 tokens), 272 targets, scored once (the
tables above):

- The library as it is (q = 64-96 here): **2% / 10%**, no miss, interval **97%**; MSE
  1% / 2% (50%) and 1% / 10% (80%), CE 1% / 11% and 2% / 8%: issue 13's goals met for both
  losses at both drops, as on the first text round. The check flags 16 targets (half of
  them bad, 73% of the bad ones found); 1% of those it passes are bad. The prefix
  baselines miss 85-91% of the targets (these runs reach a 90% drop in a few dozen steps).
- q = D: **2% / 12%**, no miss, interval 98% (98% of full batch), 10 targets bad against
  11; flagged 17% / 46% (39% bad) against 26% / 56% (50% bad); passed 1% / 7% against
  1% / 8%. Claims 1-3 of the plan held, narrowly (one bad target fewer; the p90 2 points
  higher, within the 3 allowed).
- Claim 4 **failed**: on the command line's text example (`tangentlab validate --example
  rt-minilm --samples 128 --steps 100 --linearize top --directions all`; the plan's line
  lacked `--linearize top`, without which `--directions` makes `--linearize auto` take the
  head-exact model; 2026-12-04, one run each, back to back, nothing else running) the
  kernel and forecast took 48.2 s against the real run's 168.2 s (**29%**; kernel 46.8 s),
  where the library's q = 64 took 10.8 s against 198.7 s (**5.4%**; kernel 9.8 s; the
  same real run, identical to the last bit, took 168-199 s: the machine's noise). Both
  estimates are close to the real run's 80% drop (34 steps): 35 at q = 64 and 34 at
  q = D, both inside their intervals (32-38, 31-37). The
  kernel's read-outs grow with q (N q reverse passes through the block), so all of z
  costs 4.8x the kernel of q = 64 on MiniLM's 384-wide [CLS] state.
- The round's cost table (above) compares the forecasts with the real runs of the same
  cells on cached trunk outputs: 0.04-0.16 of them at the library's q, 0.09-0.32 at q = D.
  The real runs ran two at a time while the development grids at q = D ran two more jobs
  (four processes on two cores) for most of their time, so their seconds are inflated and
  these ratios are lower than a quiet machine would give.
- **The library does not change** (PLAN-text2.md): q = D narrows the flagged text tail on
  development and on this round, but by one target here, at a cost that breaks issue 13's
  10% on the text example. It stays an option (``directions="all"``, `--directions all`
  with `--linearize top`).
"""


FRESH14_READING = """
*The fourteenth fresh round: a cap on q for a vector z* (PLAN-fresh14.md; 2026-12-04).
With ten classes the rule q = 32C keeps all of z (320 at 32 px), and its forecast cost 0.8
of the thirteenth round's real runs on cached trunk outputs. The candidate: q = min(32C,
128) with the drift and the bands chosen again at the cap by the library's rules
(``--candidate14``) on the 32-px image and the text development grids at the cap and rounds
11-13 (scored before), frozen as ``FRESH14_CAL``: drift MSE (0.0249, -0.0113), CE (0.0799,
-0.0295); passed bands MSE full x0.90-1.08, B32 x0.84-1.17, CE full x0.91-1.06, B32
x0.79-1.51; flagged band the library's. On development the cap scored 2.6% / 24.4% against
32C's 2.3% / 24.2% (images, 830 targets; *Development at 32 px* above) at 0.55 of its
seconds, and on the thirteenth round 6.7% / 36.2% against 5.8% / 36.6%, where the
calibration chosen at 32C held only 75% of the full-batch targets (hence the candidate's
own). Two fresh image tasks at 32 px, ten classes (``twolayer_fresh14.py``: the Hebrew
letters alef to yod in the 36 Culmus faces, Lite0; the Thai digits in the 58 TLWG faces,
Lite1; N = 160), 111 targets, scored once (the tables above: the candidate, the library's
rule, and the cap with the rule's calibration for information):

- The candidate: **4% / 33%**, no miss; interval **92%** (91% of the full-batch targets);
  MSE 3% / 6% (50%), 4% / 9% (80%); CE 4% / 47%, 7% / 41%.
- The rule (q = 32C = D, ``FRESH12_CAL``): **4% / 32%**, no miss; interval 90% (84%); MSE
  2% / 10%, 4% / 8%; CE 5% / 51%, 6% / 42%.
- The cap with the rule's calibration: 4% / 34%, interval 87%.
- Claim 1 (median at most the rule's + 1 point, p90 at most its + 3 points, at most one
  miss more) held: 3.7% against 4.3%, 32.5% against 32.1%, no miss either. Claim 2 (interval
  at least 80% of all and of the full-batch targets) held: 92%, 91%. Claim 3 (at most 0.7
  of the rule's seconds) held: 0.45 (732 s against 1,629 s, kernels and simulations, one
  thread). **The library's exact top now keeps q = min(32C, 128) for a vector z with this
  calibration** (NOTE [exact-top vector z]: ``VECTOR_MAX_DIRECTIONS``, ``DRIFT_VECTOR``,
  ``STEPS_BAND_VECTOR``); with four classes or fewer only the calibration changed.
- Issue 13's goals on this round: met for MSE and overall (p90 33% ≤ 35%), **not** for CE
  (p90 47% and 41%, either q): the flagged targets (CE 33% / 63%) are the tail again. The
  check flags fewer CE targets at the cap (15 against 19), and five of the 40 it passes are
  off by more than 25% (passed CE 3% / 29%, the rule's 4% / 11%).
- Text (a second look after the adoption: the six held-out text tasks' 32C grids, where
  the cap does not bind, with ``FRESH14_CAL`` in place of ``FRESH12_CAL``): 1.4% / 7.2%,
  interval 98%, against 1.4% / 7.2%, 97%.
- Cost (table below): the cap's forecasts cost 0.42-0.47 of the rule's here, and 0.57-0.65
  of the real runs of the same cells on cached trunk outputs, where a real step is cheap
  (the rule's: 1.35-1.39). Where the real run trains the network from its input, as a user's
  does, the cap meets issue 13's 10%: `tangentlab validate --example fashion-lite0
  --image-size 32 --samples 500 --steps 300 --linearize top` (ten classes, q = 128):
  kernel and forecast 14.5 s against the real run's 165 s (8.8%), against 28.6 s and 157 s
  (18%) with `--directions all` (q = 320, the rule's), one run each back to back
  (README).
"""


FRESH13_READING = """
*The thirteenth fresh round: ten classes, where the rule for a vector z keeps all of z*
(PLAN-fresh13.md; 2026-12-04). Nothing chosen: the library as it is (q = 32C = 320 = D
with the vector calibration, ``FRESH12_CAL``) against the default before (q = 2C = 20, the
calibration chosen at 2C). Two fresh tasks at 32 px (``twolayer_fresh13.py``: the digits
0-9, Lite0, and the lowercase letters a-j, Lite1, in 42 faces of six font packages; N =
160), 110 targets, scored once (the two tables above):

- The default now: **6% / 37%**, no miss; interval **88%** (88% of the full-batch
  targets); passed targets MSE 4% / 10% (50%), 3% / 9% (80%), CE 3% / 28%, 3% / 11%.
- The default before: **9% / 37%**, no miss; interval 84% (82%); passed MSE 6% / 12%, 7% /
  12%, CE 5% / 32%, 11% / 15%.
- Claim 1 (p90 at most the before's, median at most the before's + 1 point, no more
  misses) held, its p90 by a tie: 36.55% against 36.56% (the reports' linear quantile;
  with the next order statistic instead, 38.3% against 36.9%, it would not). Claim 2
  (interval at least 80% of all and of the full-batch targets) held: 88%, 88%. **The rule
  stands at ten classes**, more accurate at the median and in the interval, tied in the
  tail, which is the flagged targets' again (CE 42-52% p90 with them, 11-28% without).
- Cost (table below): all of z costs 4.7x q = 2C's simulations (598-600 s against 123-130
  s a task) and 5x its kernel (9 s against 1.7 s): 0.80-0.82 of the real runs of the same
  cells on cached trunk outputs, against 0.17. Issue 13's cost goal is missed there by the
  default (README: 20% of a real run on the default example's data at 32 px).
"""


FRESH12_READING = """
*The twelfth fresh round: q = 32C with its own calibration* (PLAN-fresh12.md; 2026-12-04).
The eleventh round's reading: the drift and the bands were chosen on q = 2C's paths, which
run slow under CE, and made 32C's on-time paths fast. The candidate was q = 32C with the
drift and the bands chosen again at that q by the library's rules (``--candidate``,
``candidate_calibration``) on the 32-px image development grid, the text development grid
and the eleventh round's two tasks (scored once before: development now), frozen as
``FRESH12_CAL``: drift MSE (0.0032, -0.0053), CE (0.0690, -0.0255); passed bands MSE full
x0.93-1.07, B32 x0.84-1.13, CE full x0.91-1.06, B32 x0.84-1.49; flagged band the library's
(no level reaches 85% for the text tasks at 32C). Two fresh image tasks at 32 px
(``twolayer_fresh12.py``: the digits 3, 5, 6, 9 in the 72 Latin Modern faces, Lite0; the
Unicode block of a Latin Modern Math symbol, Lite1), 116 targets, scored once (tables
above: the candidate, then q = 2C as the library had it, then 32C with the library's
calibration, for information):

- The candidate: **6% / 55%**, 1 miss; interval **85%** of all targets, 83% of the
  full-batch ones; passed targets MSE 1% / 11% (50%), 5% / 12% (80%), CE 3% / 15%, 2% / 8%.
- q = 2C (the default): **10% / 58%**, 3 misses; interval 84%, 81% of the full-batch ones;
  passed CE at the 80% drop 8% / 32%.
- 32C with the library's calibration: 7% / 53%, 1 miss; interval 85%, 81%.
- Claim 1 (p90 at most 2C's, median at most 2C's + 1 point, no more misses) held: 55%
  against 58%, 6% against 10%, 1 miss against 3. Claim 2 (interval at least 80% of all and
  of the full-batch targets) held: 85%, 83%. Claim 3 (the passed targets meet the goals per
  loss and drop) held. **The library's exact top now keeps q = 32C for a vector z with this
  calibration** (NOTE [exact-top vector z]: ``DRIFT_VECTOR``, ``STEPS_BAND_VECTOR``); a map
  keeps 2C P² and the calibration it had.
- Issue 13's goals are **not** met on this round by any variant: the check flags 38 of the
  116 targets (the candidate's flagged MSE 36% / 72%, CE 18% / 62%), and digits-lite0, whose
  cells at a = 1 do not train (CE at full batch: loss 0.95 L0 after 1,500 steps), scores
  12% / 63% (2C: 25% / 90%). The flagged targets, edge-of-stability cells, are the gap.
- The plan called MiniLM's z "[tokens, hidden]"; it is the [CLS] state, a vector: the rule
  covers it. A second look on the six held-out text tasks (PLAN-text.md, scored once at
  2C; ``--text-holdout-q 32C``, the table above): 1% / 7% (1 miss), interval 97% (99% of
  full batch), against 2C's 3% / 8% (2 misses), 97%.
- Cost: the 32C forecast of a round's cells costs 0.45-0.80 of their real runs on cached
  trunk outputs (N = 128 at 32 px, where a real step is cheap; the table below), q = 2C
  0.12-0.21: the simulation's O(N q k) products grow with q, and the kernel's q backward
  passes (4.3 s against 0.5 s). Where the body dominates a real step (the default example,
  64 px, its z a map) nothing changes.
- At the command line's projection, k = 1024 (``--fresh12 32C-k1024``, run after the
  scoring: a second look, the table above): 6% / 42%, 1 miss, interval 88% (84% of full
  batch), at 0.20-0.41 of the real runs (kernel 1.3 s, simulations 83 s and 131 s).
"""


FRESH11_READING = """
*q again at 32 px, then the eleventh fresh round* (PLAN-fresh11.md; 2026-12-04). At 32 px
z is a vector (D = 320) and the exact top keeps q = 2C of its directions; the 32-px rounds
missed issue 13's p90 for CE at the 50% drop. On the development grids when the plan was
frozen (PLAN-fresh11.md: 642 image targets, the full-batch cells of all 14 tasks and the
B = 32 cells of 7; text, all 14 tasks; the tables above have the cells run since) q = 32C
(what 2C P² gives a 2 x 2 map, at most D) scored 3% / 20% against 2C's 4% / 21%
(2 misses against 3; MSE at the 80% drop, full batch, 3% / 11% against 5% / 16%), q = D
as 32C at 1.4x its seconds, and on text 3% / 12% against 3% / 21%. 32C was frozen as the
candidate, and the eleventh round (two fresh tasks, 111 targets) scored it beside 2C.
(The image grid, completed after the freeze, 830 targets in the table above: 2C 4% / 25%
with 8 misses, 32C 3% / 25% with 9, D 3% / 24% with 7; on the whole grid 32C gains at
MSE's 80% drop, p90 12% against 14%, and in CE's tail at the 50% drop, 50% against 63%,
and little else: the partial grid of the freeze flattered it.)

- q = 32C: **7% / 23%**, no miss (MSE 6% / 12% at 50%, 3% / 10% at 80%; CE 11% / 38% and
  12% / 30%); interval 86% of all targets, 82% of the full-batch ones (CE full batch at the
  50% drop: 44%); where the check passes every (loss, drop) group meets the goals.
- q = 2C (the default): **6% / 32%**, 1 miss (MSE 6% / 21% and 6% / 13%; CE 4% / 33% and
  12% / 37%); interval 88%, 89% of the full-batch targets.
- q = D (all of z, reported beside them): 9% / 27%, no miss; interval 77% (62% of the
  full-batch targets), its estimate fast (passed CE targets: T̃/T 0.89).
- Claim 1 (32C's median and p90 each at most 2C's, no more misses) **failed** on the median
  (7% against 6%; its p90 and misses are better); claims 2 and 3 held. **The default stays
  q = 2C** for a vector z, as the plan said.
- Why, read after the scoring (a second look, not evidence): the estimate T̃ is the path
  T̂ with the drift of long runs taken off (NOTE [exact-top drift]), fitted on q = 2C paths.
  32C's path is already on time (passed CE targets: median T̂/T 1.02, 5% / 17% without the
  drift), and the drift makes it fast (T̃/T 0.93, 8% / 22%; interval of the passed CE
  targets 59%); 2C's path is slow on CE (T̂/T 1.16) and the drift corrects it (1.04). A
  q of 32C needs its own drift and bands, chosen on the development tasks at that q, before
  a fresh round can test it again. The drift line fitted on the development tasks at 32C
  (``choose_drift`` of ``dev32_q32C`` and ``text-ffn_q32C``, 884 MSE and 661 CE passed
  targets): MSE (0.0084, -0.0067), CE (0.0823, -0.0300), against (-0.0061, -0.0058) and
  (0.0676, -0.0367) now: under CE it starts at T̂ = 15 steps instead of 6 and takes 5% off
  at T̂ = 100 instead of 10% (left out by task: CE 1% / 10%, MSE 2% / 6%). Applied to this
  round's 32C paths (a second look, not evidence) it scores 5% / 24%, no miss (CE 7% / 35%
  at 50%, 7% / 30% at 80%). Not adopted. The drift and the bands chosen again at 32C on the
  development tasks are in the table below (``--calibrate 32C``): the passed targets' bands
  come out narrower than the library's at full batch (CE x0.91-1.05 against x0.84-1.06)
  and wider for CE at B = 32 (x0.84-1.51 against x0.84-1.25), and no finite band of the
  flagged targets reaches 85% left-out coverage. Next: a flagged band at 32C, then q = 32C with its
  own calibration, frozen, on a twelfth round.
"""


ADOPT_READING = """
*The catapult, the drift and the bands of now* (commit bb012ae; PLAN-fresh3.md). Three
changes, all chosen on development tasks: the catapult of ``twolayer_flagged.py`` is the
library's path (β = 0.5; it changes flagged targets only); the estimate of the real steps
is T̃ = T̂ exp(min(0, a + b ln T̂)), the drift of long runs fitted on the passed targets of
the 28 development tasks (table above: on CE the real runs of a few hundred steps are
15-25% faster than T̂, and a line in ln T̂ takes the left-out error from 5% / 14% to 3% /
11%); the bands are chosen again around T̃ on the 28 tasks, asking 85% left-out coverage of
image and text tasks separately (p = 0.025 passed, 0.05 flagged). The tables above score
the library as it is now. *Second looks* at the sets scored before (the drift was noticed
on their failures, then fitted on development tasks only; each set's first score with the
fixed kernel is the *fixed kernel* column): rounds 8-9 8% / 46% (first 10% / 62%; interval
82%, first 72%), fresh 5% / 27% (6% / 48%; 99%, 93%), fresh2 7% / 41% (11% / miss; 92%,
76%), text held out 3% / 8% (4% / 14%; 97%, 95%). Where the check passes, CE now scores
3-7% / 7-21% on every set (first 3-16% / 9-36%) and MSE 2-3% / 5-14%. Where it flags, the
catapult takes fresh2's CE from 73% / miss (11 misses) to 32% / 63% (1), and the text set's
from 80% / miss to 17% / miss, but the flagged targets still fail issue 13's goals on every
set (15-42% / 26%-miss), and with them the per-drop CE p90 on the image sets (24-45% at the
50% drop).
*The third fresh round, held out once* (PLAN-fresh3.md, first look; Wesnoth unit races,
MATE icon folders, Endless Sky outfit kinds; 172 targets): the estimate scores 9% / 49% (7
misses); its path without the drift would have scored 13% / 60%. The check flags 75 of the
172 targets, more than on any set before (17 of them CE at a = 0.1 without momentum): 61%
of them are bad, and it finds 46 of the 50 bad targets (recall 92%); 4% of the passed
targets are bad. Where it passes, both losses meet issue 13's goals: MSE 4% / 15% (64
targets; the path alone 6% / 18%), CE 8% / 19% (33; the path alone 12% / 37%). Where it
flags, MSE scores 27% / 75% and CE 34% / miss (5 misses). Per drop, MSE meets the goals at
80% (5% / 25%) but not at 50% (3% / 40%), CE meets neither (12% / 38%, 16% / 61%). The
interval holds 87% of the targets (passed 84%, flagged 91%), above the 80% goal; the bands
it replaced would have held 75% (MSE) and 64% (CE) of the passed targets. The prefix
baselines miss 82-83% of the targets. *What changes*: the catapult, the drift and the new bands
stay, as frozen; the model stays experimental, because wherever the check flags (a third to
a half of the image targets at these learning rates) the forecast fails the goals.
*The fourth fresh round, held out once* (PLAN-fresh4.md, first look; SuperTux sprites,
Paper icons, FreeOrion icons; 180 targets), the library unchanged since the third: the
estimate scores 7% / 36% with no miss. Per drop, MSE meets issue 13's goals at both drops
(3% / 18% at 50%, 7% / 16% at 80%), CE at 80% (5% / 34%) but not at 50% (7% / 41%: its
p90 is flagged targets). The check flags 60 of the 180 targets (a third, against 44% on
the third round), 47% of them bad; it finds 28 of the 31 bad ones (recall 90%) and 2% of
the passed targets are bad. Where it passes, MSE 5% / 9% and CE 4% / 16%; where it flags,
MSE 17% / 48% and CE 28% / 60%. The interval holds 96% of the targets (passed 94%, flagged
100%). The prefix baselines miss 80-84%. So two fresh rounds in a row, frozen before their
forecasts, agree: the passed targets meet the goals, the flagged ones do not, and how many
targets are flagged decides the whole-grid p90 (36% here, 49% on the third round).
*The fifth fresh round, held out once* (PLAN-fresh5.md, first look; Scratch costumes, Faenza
icons, Art4Apps drawings; 183 targets), the library still unchanged: the estimate scores 8%
/ 41% with no miss. MSE meets the goals at both drops (5% / 18% at 50%, 8% / 16% at 80%);
CE meets neither p90 (10% / 43% at 50%, 11% / 41% at 80%). The check flags 61 targets (a
third), 46% of them bad; it finds 28 of the 32 bad ones (recall 88%) and 3% of the passed
targets are bad. Where it passes, MSE 6% / 11% and CE 7% / 17%; where it flags, MSE 17% /
48% and CE 25% / 57%. The interval holds 95% of the targets (passed 92%, flagged 100%). The
prefix baselines miss 81-86%. Every expectation written in the plan held: the passed targets
meet the goals, the flagged ones do not, and the whole grid's p90 lands between 35% and 50%.
Three fresh rounds of the same frozen model now agree (whole grid 7-9% / 36-49%, passed MSE
4-6% / 9-15% and CE 4-8% / 16-19%, flagged 17-34% / 48%-miss).
*The sixth fresh round, held out once* (PLAN-fresh6.md, first look; Sweet Home 3D furniture
by room, elementary-xfce icons, UKUI icons; 191 targets), the path still unchanged, the
flagged targets' band given an upper end (x0.27-2.78 of T̃, chosen on the development
tasks before this round): the estimate scores 8% / 32% with no miss, the first fresh round
whose whole grid meets issue 13's p90 goal (the plan expected 35-50%; the check flags 31%
of the targets, the fewest of the four rounds). MSE meets the goals at both drops (5% / 18%
at 50%, 9% / 17% at 80%), CE at 80% (12% / 35%, p90 34.8%) but not at 50% (5% / 36%, p90
36.5%). The check flags 60 of the 191 targets, 38% of them bad; it finds 23 of the 29 bad
ones (recall 79%, the lowest of the four rounds) and 5% of the passed targets are bad (CE
10%). Where it passes, MSE 5% / 11% and CE 6% / 21%; where it flags, MSE 12% / 41% and CE
23% / 42%. The interval holds 92% of the targets (passed 89%, flagged 100% with the finite
band: the plan's claim, >= 80% of all and of the flagged, held; the open band would also
have held 100%). The prefix baselines miss 81-84%. Four fresh rounds of the same path:
whole grid 7-9% / 32-49%; where the check passes, MSE 4-6% / 9-15% and CE 4-8% / 16-21%
(the goals met every time); where it flags, 12-34% / 41%-miss (missed every time).
*The seventh fresh round, held out once, the first at 64 px* (PLAN-fresh7.md, first look;
Widelands buildings by tribe, GNOME icons by folder, Moka icons by folder; 204 targets),
where the body's output z is a 2 x 2 map, every earlier round's a single position. The
library as it is, whose q (2C per position of z, 8C) was chosen on one development example
at 64 px: the estimate scores 8% / 15% with no miss, the lowest p90 of any fresh round, and meets
issue 13's goals in every (loss, drop) group (MSE 3% / 10% at 50%, 12% / 16% at 80%; CE 5%
/ 11% and 6% / 11%). The check flags only 6 targets (3%; the four rounds before, 31-44%), 5 of
them bad, and finds 5 of the 6 bad ones; 1% of the passed targets are bad. The interval
holds 83% of the targets (flagged 100%): the plan's claims held, the expected p90 (30-50%)
did not, it came out lower. But the estimate is slow on 84% of the targets (median T̃ / T =
1.08), and at MSE's full-batch 80% and 90% drops, 12-14% slow, it leaves the passed band
(x0.91-1.12) on all but 2 of 34: the interval holds 6% there. At q = 2C, the default
before (reported beside it, plan claim 3), the same grid scores 12% / 18%, slow on 94%
(median 1.12), interval 78%: the per-position default is the better of the two, and the
remaining slowness says a map-shaped z may want more directions still (on the development
example q = 128 was 2% fast where q = 80 was 3% slow); that is for a development study at
64 px, not for this round.
*Development at 64 px, then the eighth fresh round* (the table "Development at 64 px" above;
PLAN-fresh8.md). Three image development tasks made again at 64 px reproduced the seventh
round's slowness at q = 8C (path T̂/T 1.09; interval 84%, MSE full batch 56%) and chose q =
2C P² (32C: 3% / 8%, path T̂/T 1.03, interval 95%, MSE full batch 94%; 16C between them),
the only q whose interval meets issue 13's goal with full batch included. Held out once on
the eighth fresh round (MegaGlest icons by faction, FreedroidRPG items, Tango icons by
folder; 216 targets): the estimate scores 3% / 8% with no miss, every (loss, drop) group
within the goals, the interval holds 94% (92% of full batch, 96% of MSE full batch, all 8
flagged targets); q = 8C beside it 5% / 14%, interval 87%, MSE full batch 59%. Every claim
of the plan held. The head-exact default scores 4% / 14% on the same targets with no miss:
the exact top is better, but at 64 px the head-exact model is far closer than at 32 px.
*A smaller projection, then the ninth fresh round* (PLAN-fresh9.md). Each simulated step
reads Φ [N q, k] twice. On the 64-px development tasks q = 32C with k = 2048, 1024, 512
and 256 scored 3% / 8%, 3% / 8%, 3% / 9% and 5% / 12% (k = 4096: 3% / 8%; intervals 95%,
95%, 94%, 87% against 95%); k = 1024 was chosen, its simulations 405 s against 1,508 s for
k = 4096, a ratio across sessions, not one run. Held out once on the ninth fresh round (two
tasks: Dungeon Crawl tiles by sheet, Yaru icons by folder; 144 targets): the default (k =
4096) scores 3% / 7% with no miss, every (loss, drop) group within the goals (MSE 2% / 3%
and 2% / 5%, CE 3% / 7% and 3% / 5%), the interval holds 96% (94% of full batch), no
target flagged; k = 1024 beside it 3% / 7%, no miss, interval 97% (97% of full batch): as
accurate. Its simulations took 851 s against 1,344 s (0.63x; kernels 24 s against 33 s)
in the same session's runs: the plan's claim 3 asked at most half and **failed** on cost,
so the default k stays 4096 (``--projection 1024`` is the measured cheaper option). At
N = 120 and q = 96 the top's own forward and backward at every step weigh more than Φ's
reads. The head-exact default scores 6% / 24% with no miss (CE at 80%: 13% / 24%, at 90%
25% / 32%): the exact top is better again. Claims 1, 2 and 4 held.
*The command line's default, then the tenth fresh round* (PLAN-fresh10.md). On 2026-12-03
the exact top became the command line's default for forecast and validate where the
network splits (the table "The command line's default" below: several times more accurate
than the head-exact model at 32 px and on text, as good or better at 64 px: round 7 at
its q of then, 8C, lost (8% / 15% against 4% / 9%); rescored with the exact top as it is
now, q = 32C and k = 1024 (``--fresh7-now``, a second look), 4% / 9%, a tie, interval 97%).
The tenth round was frozen after that choice, with k = 1024 put again:
held out once (two tasks from the Crossfire game: items by folder, map tiles by folder;
144 targets), the default (k = 4096) scores 3% / 7% with no miss, every (loss, drop) group
within the goals (MSE 2% / 26% and 3% / 6%, CE 3% / 6% and 3% / 5%), the interval holds 96%
(96% of full batch), no target flagged; k = 1024 beside it 3% / 8%, no miss, interval 96%
(96% of full batch), and its simulations took 315 s against 647 s (**0.49x**; kernels 26 s
against 43 s), each task's two grids back to back in one worker with both workers busy.
Every claim held, so the exact top's ``--projection auto`` is k = 1024 since. The
head-exact model scores 4% / 13% with no miss: the exact top is better again.
*The flagged band with an upper end, second looks* (the sets scored before, all seen before
the choice): the flagged targets inside 88% (rounds 8-9), 98%, 96%, 88%, 98% and 100%
(fresh to fresh5) and 94% (text held out), against 88%, 100%, 96%, 91%, 100%, 100% and 91%
with the open band (column *open*).
"""
TEXT_READING = """
*Text (development only, MiniLM, the 14 text development tasks).* With
``split_minilm(exact="pooler")`` (the last encoder layer linearized, pooler and classifier
exact) the exact-top model
scores 37% / 93% over 956 targets (52 misses), against 100% / 324% for the library's
uncalibrated head-exact forecast on the same targets: better, but far from its image
figures. The error is a bias: the real runs are faster than the forecast on 98-99% of the
targets at the 80% drop (MSE and CE) and at CE's 50% drop (median log(T / T̂) -0.30 and
-0.36 at 80%), so the linearized transformer layer, whose attention and LayerNorm the
forecast holds fixed, is where the curvature sits. The check, chosen on images, flags few
of these targets (recall 18%; precision 93%), and the image-calibrated interval holds 24%:
neither carries over to text. *Keeping the last layer's feed-forward part exact* as well
(``split_minilm``'s default, ``exact="ffn"``: only its attention sub-layer linearized;
``--text --text-split ffn``) closes most of the gap: 6% / 33% over the same 956 targets (32
misses), 6% / 11% at a = 0.1, with most of the error at a = 1; the real runs are faster on
84-92% of the 80% targets but by a median of 6-7% only. As on images, what matters is
keeping the trained layers right below the head exact. The check and interval chosen on
images carry over to this split on the text development tasks (precision 78%, recall 88%,
2% bad among passed; interval 87%; the text-chosen threshold would be 0.3, F1 0.86 against
0.83), so one rule serves both kinds.

*Text, held out once* (results/twolayer/PLAN-text.md, frozen before any forecast of these
tasks: rounds 10-11's six fortune tasks, whose real runs other methods had used but no
exact-top choice had; ``--text-holdout``): 4% / 14% over 401 targets (2 misses), against
86% / 236% for the head-exact forecast; MSE 0% / 7% at the 50% drop and 4% / 9% at 80%, CE
5% / 19% and 3% / 14%: issue 13's goals met for both losses at both drops on this set.
The check flags 33 targets (precision 64%, recall 88%, 1% bad among passed) and the
interval holds 95%. Flagged CE stays the weak part (80% / miss over 19 targets), as on
images. The prefix baselines miss most targets here because half of the runs reach a 90%
drop within 45 steps, which leaves their 5% / 10% prefixes a handful of points.
"""


def _cost_lines() -> list[str]:
    if not COST.exists():
        return []
    runs = json.loads(COST.read_text())
    first = next(iter(runs.values()))
    lines = ["", f"Cost, timed in one process per task (`{COMMAND} --cost NAME`, alone on the "
             f"machine; {first['machine']}): the library's forecast "
             "(`tangentlab.experimental.exact_top`, q = 2C, k = 4096) of the four cells, each "
             "to a 90% drop (or the accuracy runs' horizon), against the real runs of the top "
             "on cached trunk outputs and the plain full-network run (3 timed full-batch "
             "steps x the real runs' steps); *matrix*: the same simulations with the exact "
             "part as matrices on the 1 x 1 map (``simulate(fast=True)``).", "",
             "| task | q | real steps (4 cells) | kernel s | library simulations s | matrix "
             "simulations s | real top s | plain run s (est.) | (kernel + library) / real top "
             "| (kernel + library) / plain | (kernel + matrix) / plain | library vs accuracy "
             "run: max abs(ΔT̂) / T̂ |", "|" + "---|" * 12]  # fmt: skip
    for r in runs.values():
        gaps = [abs(c["library_targets"][d] - a) / a for c in r["cells"].values()
                for d, a in (c["accuracy_run_targets"] or {}).items()
                if a and c["library_targets"].get(d)]  # fmt: skip
        k, lib, mat = r["kernel_seconds"], r["library_seconds"], r["matrix_seconds"]
        lines.append(f"| {r['task']} | {r['q']} | {r['real_steps']} | {k:.1f} | {lib:.1f} | "
                     f"{mat:.1f} | {r['real_seconds']:.1f} | {r['plain_seconds']:.0f} | "
                     f"{(k + lib) / r['real_seconds']:.2f} | {(k + lib) / r['plain_seconds']:.3f}"
                     f" | {(k + mat) / r['plain_seconds']:.3f} | {max(gaps):.0%} |")
    return lines


READING = """
**Reading** (development only: the 14 image development tasks; nothing fresh; no default
changed). *The two-layer model survives a small subspace.* In function space, with z's
kernel exact only in q = 2C directions (as many read-outs as the library's default
head-exact kernel), the two-layer-exact model scores 4% / 23% over the 151 full-batch
targets (2 misses), against 0% / 16% for its exact weight-space version, 20% / 89% for the
exact head-exact model and 111% / 471% for the library's head-exact forecast; its per-task
median log(T / T̂) lies in [-0.10, 0] (the head-exact model's in [-0.54, +0.23]). With all
of z (q = D, on the 4 tasks that ran) it scores 2% / 9% where q = 2C scores 2% / 24%.
*The whole grid.* On the rounds' 24 cells per task (B = 32 and a = 1 included), the
library's implementation scores 4% / 33% over 830 targets (18 misses), against 80% / 361%
(29 misses) for the uncalibrated head-exact forecast. MSE: medians 0-4%, p90 <= 19% at
every drop, full batch and B = 32. CE full batch: 0-10% / 33-45%. CE with B = 32 is the
weak part (p90 221% at 50%, 63% at 80%; 5 misses at 50%): the forecast is one path with its
own batches, the real run another, and the large errors are spread over a = 0.1-1. Against
issue 13's goals (median <= 15%, p90 <= 35%, at 50% and 80%, per loss) MSE meets them on
these tasks, CE full batch misses the p90 at 80% (43%), CE with B = 32 misses both p90s.
*Cost.* The kernel takes 2.8-3.6 s. The forecast of four cells costs 0.56-0.57x the real
runs of the top on cached trunk outputs (every step runs the exact head conv forward and
backward, and mkldnn's 1 x 1 convolution on a 1 x 1 map is slow: as matrices the
simulations run 2.3-2.4x faster), and 6.9% and 13.3% of the plain full-network runs (3.4%
and 5.9% as matrices). *What changes.* A new experimental model,
``tangentlab.experimental.exact_top`` (and ``tangentlab.examples.split_lite``), with a steps
interval chosen on this grid by the rule above (then one band per loss and batch,
``BAND_BEFORE``: 5% / 95% quantiles; 87-90% of a left-out task's targets inside; x0.83-1.24
of T̂ for MSE, x0.52-1.16 for CE full batch, x0.56-2.01 for CE with B = 32; since replaced by
the interval conditional on the reliability check, below). Not in the top-level API and no
default.
"""

CHECK_READING = """
*The reliability check, as it came.* On the development grid the forecast's own rebound R
separates the reliable targets from the others: R > 0.15 flags 136 of the 830 targets, 60%
of them off by more than 25% (all 18 misses among them), and only 3% of the 694 passed
targets are off that much (passed: MSE 2% / 11%, CE 5% / 20%; flagged: MSE 20% / miss, CE
50% / miss). The interval is then narrower where the check passes (x0.91-1.08 of T̂ for MSE
full batch, x0.83-1.00 for CE full batch, x0.79-1.25 for CE with B = 32) and open above where
it flags (from x0.47 T̂). *Rounds 8-9's four tasks* (second look, full batch; disclosed in
PLAN-check.md): the check keeps its precision (64%) but not its recall (64%; 14% of the
passed targets are bad, 26% of the passed CE ones), and the conditional interval holds only
72% of the targets against 84% for the single band it replaced: its narrow passed bands
miss stereo-lite1's CE runs (faster than the forecast) and MSE runs (slower), and
letters-lite0's MSE runs (faster).
*The three fresh tasks* (first look, full grid with B = 32, 198 targets): the estimate
scores 6% / 48% (5 misses); the check flags 55 targets, 62% of them bad, and finds 34 of the
38 bad ones (recall 89%); 3% of the passed targets are bad. Where it passes, the forecast
meets issue 13's goals: MSE 3% / 6% (92 targets), CE 13% / 24% (51); where it flags, CE
scores 41% / miss. The interval holds 93% of the targets (passed 94%, flagged 89%; the
replaced band 92%). Per drop, MSE meets the goals at 50% and 80% (2% / 7%, 4% / 7%), CE does
not (8% / 39%, 20% / 72%): 39 of its 90 targets are flagged, 31 of those without momentum,
where the forecast oscillates. *What changes.* The check and the conditional interval are in
``tangentlab.experimental.exact_top`` (``ExactTopForecast.reliability``, ``rebound``,
``steps_interval``; ``tangentlab.report.plot_exact_top``); as frozen, the library keeps the
conditional interval (the development choice), which lost to the band it replaced on one
held-out set and tied on the other. Still experimental: CE fails the goals on every held-out
set unless the check passes.
*The second fresh round* (PLAN-fresh2.md, first look; Open Clip Art animals, Pingus ground
pieces, Freeciv flags; 157 targets) was harder: 11% / miss (16 misses, 12 on animals-lite0,
all flagged: forecasts whose loss climbs back and never reaches the target). The check
flags 56 targets, 73% of them bad, and finds 41 of the 54 bad ones (recall 76%); 13% of the
passed targets are bad. Passed MSE meets the goals (4% / 11%), passed CE nearly does (16% /
36%): 9 of its 11 bad targets are flags-lite1's long CE runs (150-1,340 steps), 21-28%
faster than the forecast, the pattern of rounds 8-9's long runs. The conditional interval
holds 76% of the targets (passed 79%, flagged 70%) against 82% for the band it replaced:
below the 80% goal, as on rounds 8-9. Over the three held-out image sets the interval has
held 72-93% (text: 95%).
*At the cap* (PLAN-fresh14.md's q = min(32C, 128) with its calibration; 2026-12-04,
development only, the table above): the same rule picks g = 0.2 over 34 tasks, F1 0.60
against 0.58 at the library's 0.15, precision 52% against 46%, recall 70% against 78%; with
each task left out it picks 0.2 again. The F1 curve is flat from 0.1 to 0.3 (0.53-0.60), on
the image tasks 0.2 trades 12 points of recall for 9 of precision, and on round 14 (scored
once at 0.15) 0.15 and 0.2 had the same F1 (0.62). Not changed: a threshold is a
reliability claim, and this one moves within the curve's noise; a change would need a
held-out round of its own.
"""


if __name__ == "__main__":
    main()

"""The exact-top, block-linear model simulated in weight space, where the check flags
(issue 13; development only: nothing here is adopted).

The library's exact-top forecast (NOTE [exact top, block linear]) simulates the model

    f_i = g(z0_i + J_i Δw; θ)      (g the top, exact; the block linear in its weights)

in function space, with three approximations: z's kernel exact only inside q directions
(isotropic outside), the block's weights seen through a random projection of k = 4096 (the
command line's 1024), and, where the reliability check flags (the loss climbs back by more
than 0.15 L0), the block's kernel shrunk by β = 0.5 at each excursion (NOTE [exact-top
catapult]). A diagnostic on the fourteenth round's worst cell (hebrew10-lite0, CE, full
batch, m = 0, a = 0.3: real 58 / 91 / 118 steps to the 50 / 80 / 90% drops, the library
21 / 37 / 51) found the model itself close to the real run when simulated without the
three (71 / 101 / 116), each of them making the path faster: the fixed kernel at k = 4096
36 / 56 / 67, at k = 16,384 52 / 76 / 86, q = 128 without a projection 44 / 65 / 68.

This script simulates the same model in weight space, exactly (``torch.func.jvp`` through
the block at w0 at every step: z = z0 + J Δw, the top on it, full-batch or minibatch SGD
with momentum on Δw and θ; the minibatch cells with the library's batches of seed
``twolayer.GRID_SEED``, as the grids' forecasts), on the cells of the 32-px image
development sets and the text development tasks (the "ffn" split) with a target the check
flags at the library's q, and on as many passed cells (seed 37, as ``twolayer_chaos.py``).
``--library TAG`` runs the library's own path of the flagged cells changed one way
(``LIBRARY_VARIANTS``: without the catapult, or with all of z exact). The weight-space
model costs about what a real step of the top costs, two to three passes of the block, so
it is a diagnostic of the library's approximations, and a candidate refinement for flagged
settings only if it wins there.

    .venv/bin/python benchmarks/twolayer_weights.py --run --which dev32_q32Cmax128
    .venv/bin/python benchmarks/twolayer_weights.py --library qD --which text-ffn_q32Cmax128
    .venv/bin/python benchmarks/twolayer_weights.py --run --order 2 --which dev32_q32Cmax128
    .venv/bin/python benchmarks/twolayer_weights.py --run --order gates --which dev32_q32Cmax128
    .venv/bin/python benchmarks/twolayer_weights.py --run --order 2p --which text-ffn_q32Cmax128
    .venv/bin/python benchmarks/twolayer_weights.py --report

``--order 2`` keeps the block to second order instead (z = z0 + J Δw + ½ ∂²z[Δw, Δw], a
jvp of the jvp; issue 13's candidate 2, the flagged cells only). Two more orders, flagged
cells only, say what the block's error is made of:

- ``--order gates``: the block itself with its activation pattern frozen at w0 (each ReLU6
  replaced by its tangent at the sample's w0 pre-activation, x ↦ 1[0 < x0 < 6] x + 6·1[x0
  >= 6]): the products of the block's layers kept to all orders (a Taylor series of any
  order around w0 converges to it), only the gates' flips left out. Image sets only (a
  text task's attention sub-layer has no ReLU6).
- ``--order exact``: the block itself, the real network's layers above the trunk, with the
  forecasts' batches (seed ``twolayer.GRID_SEED``): on full-batch cells the real run (a
  check of this harness), on minibatch cells a real run with another batch order.

``--order 2p`` solves the second order in a subspace of the block's weights instead
(candidate 2 "in a projected space"; text sets, where the exact second order gains): Δw =
P c, P the top k (``PROJ_KS``) left singular vectors of the linear block's own Δw along its
path, z = z0 + A c + ½ B[c, c] with A = J P and B = Pᵀ ∂²z P computed once (``_projected``),
SGD on c and the top.

Results: ``results/twolayer/weights/<which>-<task>.json`` (resumable per cell); section
"twolayer-weights" of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deephead as dh  # noqa: E402
import holdout as ho  # noqa: E402
import tangentlab as tl  # noqa: E402
import twolayer as tw  # noqa: E402
from _common import machine, write_section  # noqa: E402
from tangentlab import dynamics as dyn  # noqa: E402
from tangentlab.experimental import exact_top as et  # noqa: E402
from twolayer_chaos import _err, _fmt, cells  # noqa: E402  (the same cells and scores)

OUT = tw.OUT / "weights"
COMMAND = ".venv/bin/python benchmarks/twolayer_weights.py"
WHICH = ("dev32_q32Cmax128", "fresh11_q32C", "fresh12_q32C", "fresh13_q32Cmax128",
         "text-ffn_q32Cmax128", "fresh14_q32Cmax128")  # fmt: skip
BLOWUP = 1e4  # the library's: a loss above this many times L0 is a blow-up
ORDERS = ("1", "2", "gates", "exact", "2p")  # --order; the file prefix of each (1: none)
PREFIX = {"1": "", "2": "quad-", "gates": "gates-", "exact": "block-", "2p": "quadp-"}
PROJ_KS = (4, 8)  # --order 2p: the subspace's dimensions


def split(top: torch.nn.Module, params: list[str], text: bool
          ) -> tuple[torch.nn.Module, torch.nn.Module, list[str], list[str]]:
    """``(body, exact part, the body's trained weight names, the exact part's)``, each under
    its module's own names, of the split the library's grids forecast: for an image task the
    last block linear, the head conv, BN, pooling and classifier exact (``twolayer._split``);
    for a text task the "ffn" split (``twolayer._text_kernel``: the last layer's attention
    linear, its feed-forward part, the pooler and the classifier exact)."""
    if text:
        from tangentlab.examples import _BertTop

        body, exact = tw._CachedBertAttention(top).eval(), _BertTop(top, "ffn").eval()
        last = f"bert.encoder.layer.{len(top.bert.encoder.layer) - 1}."
        trained = set(params)
        return (body, exact,
                [n for n, _ in body.named_parameters()
                 if n.startswith(last + "attention.") and n in trained],
                [n for n, _ in exact.named_parameters() if n in trained])  # fmt: skip
    block, names = tw._split(top, params)
    body, exact = dh.parts(top, "two layers exact")
    return body, exact, [tw.PRE + n for n in block], [tw.PRE + n for n in names]


def _rows(h, rows):
    if rows is None:
        return h
    return {k: v[rows] for k, v in h.items()} if isinstance(h, dict) else h[rows]


def simulate(top: torch.nn.Module, h, y: torch.Tensor, params: list[str], c: dict,
             *, seed: int = tw.GRID_SEED, order: str = "1", keep=None,
             proj: tuple | None = None) -> tuple[list, float]:
    """SGD of cell ``c`` on the exact-top, block-linear model in weight space (``split``):
    the loss over all N samples at the cell's logged steps (``[None]`` between them; a
    minibatch cell logs every 2 steps, as its real run), until the deepest drop the real run
    reaches, a blow-up or ``c["fc_steps"]``; and the seconds. ``order="2"``: the block to
    second order instead, z = z0 + J Δw + ½ ∂²z[Δw, Δw] (issue 13's candidate 2, exact in
    weight space: a jvp of the jvp along Δw); ``"gates"``: the block with its activation
    pattern frozen at w0 (``_FrozenGates``); ``"exact"``: the block itself; ``"2p"``: the
    second order in a subspace of the block's weights, Δw = P c, through ``proj = (P, z0, A,
    B)`` of ``_projected`` (z = z0 + A c + ½ B[c, c], SGD on c). ``keep``: a list (or
    ``_Snapshots``) that gets Δw (flat) at every logged step."""
    fn = tl.training.as_loss(c["loss"], "twolayer_weights")
    body, exact, block, names = split(top, params, isinstance(h, dict))
    wb, we = dict(body.named_parameters()), dict(exact.named_parameters())
    b0 = tuple(wb[n].detach() for n in block)
    delta = [torch.zeros_like(v, requires_grad=True) for v in b0]
    theta = [we[n].detach().clone().requires_grad_(True) for n in names]
    if proj is not None:  # the subspace's coordinates are the trained variables
        cv = torch.zeros(proj[0].shape[1], dtype=proj[0].dtype, requires_grad=True)
        delta = [cv]
    with torch.no_grad():  # the split is the task's top network
        x4 = _rows(h, slice(0, 4))
        whole = top(**x4) if isinstance(x4, dict) else top(x4)
        gap = (exact(body(**x4) if isinstance(x4, dict) else body(x4)) - whole).abs().max()
    assert float(gap) < 1e-4, float(gap)
    gates = _FrozenGates(body, block, h, b0) if order == "gates" else None

    def logits(rows) -> torch.Tensor:
        x = _rows(h, rows)
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})

        def f(*v):
            return functional_call(body, dict(zip(block, v)), args, kwargs)

        if proj is not None:  # z = z0 + A c + ½ B[c, c], precomputed
            z0, a, b = (v if rows is None else v[rows] for v in proj[1:])
            z = z0 + a @ cv + 0.5 * torch.einsum("ndkl,k,l->nd", b, cv, cv)
            return functional_call(exact, dict(zip(names, theta)), (z,))
        if order in ("gates", "exact"):  # the block itself at w0 + Δw
            if gates is not None:
                gates.rows = rows
            z = f(*(b + d for b, d in zip(b0, delta)))
            return functional_call(exact, dict(zip(names, theta)), (z,))
        if order == "2":  # (J Δw, ∂²z[Δw, Δw]) at w0: the jvp of w -> J(w) Δw along Δw
            with torch.no_grad():
                z = f(*b0)
            jd, hd = jvp(lambda *v: jvp(f, v, tuple(delta))[1], b0, tuple(delta))
            return functional_call(exact, dict(zip(names, theta)), (z + jd + 0.5 * hd,))
        z, jd = jvp(f, b0, tuple(delta))
        return functional_call(exact, dict(zip(names, theta)), (z + jd,))

    l0 = float(c["run_loss"][0])
    run = [v for v in c["run_loss"] if v is not None]
    deepest = max(d for d in ho.DROPS if min(run) <= (1 - d) * l0)
    stop = (1 - deepest) * l0
    steps, n = int(c["fc_steps"]), len(y)
    full = c["batch_size"] is None
    every = 1 if full else 2
    batches = None if full else dyn.batch_schedule(
        n, c["batch_size"], steps, sampling="epoch", rng=dyn.path_rngs(seed, 1)[0])
    opt = tl.SGD(c["lr"], momentum=c["momentum"]).torch_optimizer(delta + theta)
    curve: list = []
    t0 = time.perf_counter()
    for t in range(steps + 1):
        value = None
        if t % every == 0 or t == steps:
            if keep is not None:
                keep.append(torch.cat([d.detach().reshape(-1) for d in delta]))
            if full:
                value = fn.per_sample(logits(None), y).mean()
                loss = float(value.detach())
            else:
                with torch.no_grad():
                    loss = float(fn.per_sample(logits(None), y).mean())
            curve += [None] * (t - len(curve)) + [loss if math.isfinite(loss) else None]
            if not math.isfinite(loss) or loss > BLOWUP * l0 or loss <= stop:
                break
        if t == steps:
            break
        if value is None:
            rows = None if full else torch.as_tensor(batches[t])
            value = fn.per_sample(logits(rows), y if rows is None else y[rows]).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    if gates is not None:
        gates.restore()
    return curve, time.perf_counter() - t0


def _projected(body: torch.nn.Module, block: list[str], h, P: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(z0, A, B, seconds)`` of ``body`` to second order in its weights ``block`` in the
    subspace Δw = P c (P: orthonormal columns over those weights, flattened in that order):

        z_i(c) = z0_i + A_i c + ½ B_i[c, c],   A_i = J_i P,   B_i = Pᵀ ∂²z_i P,

    shapes [N, D], [N, D, k], [N, D, k, k]; ``torch.func.jacfwd`` of the jacfwd (k² second
    directional derivatives, what the subspace costs)."""
    from torch.func import jacfwd

    wb = dict(body.named_parameters())
    b0 = [wb[n].detach() for n in block]
    sizes = [v.numel() for v in b0]
    args, kwargs = ((), h) if isinstance(h, dict) else ((h,), {})

    def g(c: torch.Tensor) -> torch.Tensor:
        d = (P @ c).split(sizes)
        return functional_call(body, {n: b + e.reshape(b.shape)
                                      for n, b, e in zip(block, b0, d)}, args, kwargs)

    c0 = torch.zeros(P.shape[1], dtype=P.dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = g(c0), jacfwd(g)(c0), jacfwd(jacfwd(g))(c0)
    return (*out, time.perf_counter() - t0)


class _Snapshots:
    """A list of at most ``cap`` items, every ``stride``-th appended: past the cap it keeps
    every other item and doubles the stride (the Δw of a long path, evenly thinned)."""

    def __init__(self, cap: int = 256) -> None:
        self.items: list = []
        self.cap, self.stride, self.count = cap, 1, 0

    def append(self, v) -> None:
        if self.count % self.stride == 0:
            self.items.append(v)
        self.count += 1
        if len(self.items) > self.cap:
            self.items, self.stride = self.items[::2], 2 * self.stride


def _run_projected(top: torch.nn.Module, h, y: torch.Tensor, params: list[str], c: dict
                   ) -> dict:
    """``--order 2p`` on cell ``c``: the block linear's path in weight space (``keep``: its
    Δw at every logged step), the top ``PROJ_KS`` left singular vectors of those Δw as the
    subspace (at most 256 of them, evenly thinned: ``_Snapshots``), the block to second order
    in it (``_projected``); {"subspace_seconds": the
    linear path's seconds, "<k>": {loss, seconds (setup and path), setup_seconds}}."""
    keep = _Snapshots()
    _, secs = simulate(top, h, y, params, c, keep=keep)
    body, _, block, _ = split(top, params, isinstance(h, dict))
    u = torch.linalg.svd(torch.stack(keep.items, 1), full_matrices=False)[0]
    out: dict = dict(subspace_seconds=secs)
    for k in PROJ_KS:
        P = u[:, :k].contiguous()
        z0, a, b, setup = _projected(body, block, h, P)
        curve, path_s = simulate(top, h, y, params, c, order="2p", proj=(P, z0, a, b))
        out[str(k)] = dict(loss=curve, seconds=setup + path_s, setup_seconds=setup)
    return out


class _FrozenGates(torch.nn.Module):
    """The trained block's activation (one ``ReLU6`` module, called at each of its uses in
    the block's forward) replaced by its tangent at each sample's w0 pre-activation x0:

        σ̃(x) = 1[0 < x0 < 6] · x + 6 · 1[x0 >= 6],

    so the block at w0 is unchanged and, away from it, keeps its layers' products but not
    its gates' flips. ``rows`` (None: all N) says which samples the next forward sees."""

    def __init__(self, body: torch.nn.Module, block: list[str], h, b0: tuple) -> None:
        super().__init__()
        prefix = block[0].rsplit(".", 2)[0]  # "<...>._blocks.15" of "<...>._expand_conv.weight"
        # not submodules: the owner holds this module, which must not hold it back
        object.__setattr__(self, "owner", body.get_submodule(prefix))
        object.__setattr__(self, "relu", self.owner._swish)
        if not isinstance(self.relu, torch.nn.ReLU6) or getattr(self.owner, "has_se", False):
            raise ValueError(f"--order gates: {prefix} is not a ReLU6 block without SE")
        self.rows, self.calls, seen = None, 0, []

        def record(x):
            seen.append(x.detach())
            return torch.nn.functional.relu6(x)

        self.owner._swish = _Call(record)
        with torch.no_grad():
            x = h
            args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
            z_ref = functional_call(body, dict(zip(block, b0)), args, kwargs)
        self.mask = [((x0 > 0) & (x0 < 6)).to(x0.dtype) for x0 in seen]
        self.const = [6.0 * (x0 >= 6).to(x0.dtype) for x0 in seen]
        self.owner._swish = self
        with torch.no_grad():  # the frozen block at w0 is the block at w0
            z = functional_call(body, dict(zip(block, b0)), args, kwargs)
        assert float((z - z_ref).abs().max()) < 1e-5, float((z - z_ref).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.calls % len(self.mask)
        self.calls += 1
        m, c = self.mask[k], self.const[k]
        if self.rows is not None:
            m, c = m[self.rows], c[self.rows]
        return m * x + c

    def restore(self) -> None:
        self.owner._swish = self.relu


class _Call(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def run(which: str, only: list[str] | None = None, order: str = "1") -> None:
    """The weight-space paths of ``cells(which)``, flagged cells first, resumable per cell;
    ``order`` other than "1" (``ORDERS``): the flagged cells only
    (``<PREFIX[order]><which>-<task>.json``)."""
    _, tasks = tw._task_set(which)
    chosen = {k: v for k, v in cells(which).items() if only is None or k in only}
    for group in ("flagged",) if order != "1" else ("flagged", "control"):
        for name, mine in chosen.items():
            path = OUT / f"{PREFIX[order]}{which}-{name}.json"
            state = json.loads(path.read_text()) if path.exists() else {}
            todo = [k for k, g in mine.items() if g == group and k not in state]
            if not todo:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, top, h, y, params = tw._task(name)
            for key in todo:
                c = tasks[name][0][key]
                if order == "2p":
                    state[key] = dict(group=group, real_seconds=c.get("real_seconds"),
                                      **_run_projected(top, h, y, params, c))
                    secs = state[key]["subspace_seconds"]
                    curve = state[key][str(PROJ_KS[0])]["loss"]
                else:
                    curve, secs = simulate(top, h, y, params, c, order=order)
                    state[key] = dict(group=group, loss=curve, seconds=secs,
                                      real_seconds=c.get("real_seconds"))  # fmt: skip
                OUT.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(state))
                print(which, name, key, group, f"{secs:.1f}s", len(curve), flush=True)


# the library's path of the flagged cells changed one way: {tag: (q variant or None for the
# set's, catapult β)}
LIBRARY_VARIANTS = {"fixed": (None, 1.0), "qD": ("D", 0.5)}


def run_fixed(which: str, only: list[str] | None = None, tag: str = "fixed") -> None:
    """The library's path of the flagged cells of ``cells(which)`` changed as
    ``LIBRARY_VARIANTS[tag]``: ``fixed``, a fixed kernel (``catapult=1``: no shrink) at the
    set's q; ``qD``, all of z exact (q = D, no κ_⊥) with the catapult; as the grids'
    forecasts otherwise (k, seed, horizon, logging): how much of the weight-space model's
    difference is the catapult, how much the subspace.
    ``results/twolayer/weights/<tag>-<which>-<task>.json``, resumable per cell."""
    from tangentlab.experimental.exact_top import forecast_exact_top

    _, tasks = tw._task_set(which)
    qv, beta = LIBRARY_VARIANTS[tag]
    variant = qv or which.split("_q", 1)[1]
    for name, mine in cells(which).items():
        if only is not None and name not in only:
            continue
        path = OUT / f"{tag}-{which}-{name}.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        todo = [k for k, g in mine.items() if g == "flagged" and k not in state]
        if not todo:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task, top, h, y, params = tw._task(name)
            etk = (tw._text_kernel(name, top, h, y, task["params"], "ffn", variant)
                   if isinstance(h, dict)
                   else tw._library_kernel(name, top, h, y, params, variant))  # fmt: skip
        for key in todo:
            c = tasks[name][0][key]
            l0 = float(c["run_loss"][0])
            run_ = [v for v in c["run_loss"] if v is not None]
            deepest = max(d for d in ho.DROPS if min(run_) <= (1 - d) * l0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the check's ValidityWarning: flagged cells
                fc = forecast_exact_top(etk, tl.SGD(c["lr"], momentum=c["momentum"]),
                                        c["fc_steps"], loss=c["loss"],
                                        batch_size=c["batch_size"], seed=tw.GRID_SEED,
                                        stop_below=(1 - deepest) * l0, catapult=beta,
                                        progress=False,
                                        log_every=1 if c["batch_size"] is None else 2)
            curve: list = [None] * (int(fc.steps[-1]) + 1)
            for t, v in zip(fc.steps, fc.loss):
                curve[int(t)] = float(v) if math.isfinite(v) else None
            state[key] = dict(loss=curve, seconds=fc.seconds)
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(state))
            print(tag, which, name, key, f"{fc.seconds:.1f}s", flush=True)


def _hit(curve: list, drop: float) -> int | None:
    l0 = next(v for v in curve if v is not None)
    return next((t for t, v in enumerate(curve) if v is not None and v <= (1 - drop) * l0),
                None)  # fmt: skip


def scored(which: str) -> list[dict]:
    """One row per target of ``check_rows(which)`` whose cell ran, with the library's
    estimate (``et``, FRESH14_CAL's drift = the library's), its path (``et_path``) and the
    weight-space model's T̂ (``w``: the first logged step at or below the target); the
    second-order block's (``quad``) and, in ``orders``, {order: (T̂, seconds)} of the
    orders "gates" and "exact" where they ran."""
    states = {p.stem[len(which) + 1:]: json.loads(p.read_text())
              for p in OUT.glob(f"{which}-*.json")}  # fmt: skip
    lib = {tag: {p.stem[len(f"{tag}-{which}-"):]: json.loads(p.read_text())
                 for p in OUT.glob(f"{tag}-{which}-*.json")}
           for tag in LIBRARY_VARIANTS}  # fmt: skip
    more = {o: {p.stem[len(f"{PREFIX[o]}{which}-"):]: json.loads(p.read_text())
                for p in OUT.glob(f"{PREFIX[o]}{which}-*.json")}
            for o in ORDERS[1:]}  # fmt: skip
    quad = more["2"]
    out = []
    for r in tw.recalibrate(tw.check_rows(which), tw.FRESH14_CAL):
        st = states.get(r["task"], {}).get(r["cell"])
        if st is None:
            continue
        q2 = quad.get(r["task"], {}).get(r["cell"])
        l0 = next(v for v in st["loss"] if v is not None)
        target = (1 - float(r["drop"])) * l0
        hit = next((t for t, v in enumerate(st["loss"]) if v is not None and v <= target),
                   None)  # fmt: skip
        var = {}
        for tag, runs in lib.items():
            fx = runs.get(r["task"], {}).get(r["cell"])
            if fx is None:
                continue
            t = _hit(fx["loss"], float(r["drop"]))
            if t is not None:  # the library's drift, as for its own path
                a, b = tw.FRESH14_CAL["drift"][r["loss"]]
                t = t * math.exp(min(0.0, a + b * math.log(max(t, 1.0))))
            var[tag] = t
        out.append(dict(r, group=st["group"], w=hit, w_seconds=st["seconds"],
                        real_seconds=st["real_seconds"], lib=var,
                        quad=None if q2 is None else _hit(q2["loss"], float(r["drop"])),
                        has_quad=q2 is not None,
                        quad_seconds=None if q2 is None else q2["seconds"],
                        orders={o: (_hit(v["loss"], float(r["drop"])), v["seconds"])
                                for o in ("gates", "exact")
                                if (v := more[o].get(r["task"], {}).get(r["cell"]))},
                        proj=_proj_hits(more["2p"].get(r["task"], {}).get(r["cell"]),
                                        float(r["drop"]))))
    return out


def _proj_hits(st: dict | None, drop: float) -> dict:
    """{k: (T̂, seconds, setup seconds), "subspace": seconds} of an ``--order 2p`` cell."""
    if st is None:
        return {}
    return {"subspace": st["subspace_seconds"],
            **{int(k): (_hit(v["loss"], drop), v["seconds"], v["setup_seconds"])
               for k, v in st.items() if k.isdigit()}}  # fmt: skip


def _bias(rows: list[dict], col: str) -> str:
    v = [math.log(r["T"] / r[col]) for r in rows if r[col]]
    return f"{np.median(v):+.2f}" if v else "-"


def report() -> list[str]:
    lines = [f"Command: `{COMMAND} --run --which SET` for each set below, then `--report`. "
             f"Machine: {machine()}.", "",
             "The exact-top, block-linear model simulated in weight space (see the module "
             "docstring; development sets only) against the library's estimate T̃ (q = "
             "min(32C, 128), k = 4096, the catapult where the check flags, the drift of long "
             "runs) on the same targets, where the check flags and on a control sample of "
             "passed cells. Entries: median / p90 of |T̂ − T|/T, the share off by more than "
             "25% (targets, misses); *log(T / T̂)*: the median (positive: the real run is "
             "slower); *seconds*: the weight-space paths' sum against the real runs' of the "
             "same cells (the top on cached trunk outputs), one thread.", "",
             "| set | group | loss | batch | weight space | log(T / T̂) | library T̃ | "
             "log(T / T̃) | seconds (weight space / real) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    sets = [(w, scored(w)) for w in WHICH]
    pooled = [("images (pooled: " + ", ".join(w for w in WHICH[:4]) + ")",
               [r for w, rows in sets[:4] for r in rows])]  # fmt: skip
    for which, rows in pooled + sets:
        if not rows:
            continue
        for group in ("flagged", "control"):
            sub_g = [r for r in rows if (r["R"] > et.REBOUND_MAX if group == "flagged"
                                         else r["group"] == "control")]  # fmt: skip
            for loss in (*ho.LOSSES, "all"):
                for batch in ("full", "B32", "all"):
                    sub = [r for r in sub_g if loss in ("all", r["loss"])
                           and batch in ("all", r["batch"])]  # fmt: skip
                    if not sub:
                        continue
                    cellset = {(r["task"], r["cell"]): r for r in sub}
                    ws = sum(r["w_seconds"] for r in cellset.values())
                    rs = sum(r["real_seconds"] or 0 for r in cellset.values())
                    lines.append(
                        f"| {which} | {group} | {loss} | {batch} | "
                        f"{_fmt([_err(r['w'], r['T']) for r in sub])} | {_bias(sub, 'w')} | "
                        f"{_fmt([_err(r['et'], r['T']) for r in sub])} | {_bias(sub, 'et')} | "
                        f"{ws:.0f} / {rs:.0f} |")
    quad = quad_lines(pooled + sets)
    gates = gates_lines(pooled + sets[:4] + sets[5:] + sets[4:5])
    gates += goal_lines() if gates else []
    proj = proj_lines(sets)
    return (lines + fixed_lines(pooled + sets) + READING.splitlines() + quad
            + (QUAD_READING.splitlines() if quad else []) + gates
            + (GATES_READING.splitlines() if gates else []) + proj
            + (PROJ_READING.splitlines() if proj else []))


def quad_lines(sets: list[tuple[str, list[dict]]]) -> list[str]:
    """Where the check flags: the block to second order in weight space (``--run --order
    2``) beside the block linear and the library's estimate, on the same targets."""
    out = ["", "*The block to second order* (issue 13's candidate 2, exact in weight space: "
           f"`{COMMAND} --run --order 2 --which SET`, the flagged cells only): z = z0 + J Δw "
           "+ ½ ∂²z[Δw, Δw] (a jvp of the jvp along Δw), the top exact, the same SGD, "
           "batches and horizon as the linear block above; entries as above; *seconds*: "
           "the paths' sums, against the linear block's and the real runs'.", "",
           "| set | loss | batch | block linear | block second order | log(T / T̂₂) | "
           "library T̃ | seconds (second order / linear / real) |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for which, loss, batch, sub, cellset in _flagged_groups(sets, lambda r: r["has_quad"]):
        qs = sum(r["quad_seconds"] for r in cellset)
        ws = sum(r["w_seconds"] for r in cellset)
        rs = sum(r["real_seconds"] or 0 for r in cellset)
        out.append(f"| {which} | {loss} | {batch} | "
                   f"{_fmt([_err(r['w'], r['T']) for r in sub])} | "
                   f"{_fmt([_err(r['quad'], r['T']) for r in sub])} | "
                   f"{_bias(sub, 'quad')} | "
                   f"{_fmt([_err(r['et'], r['T']) for r in sub])} | "
                   f"{qs:.0f} / {ws:.0f} / {rs:.0f} |")
    return out if len(out) > 5 else []


def _flagged_groups(sets: list[tuple[str, list[dict]]], keep):
    """``(set, loss, batch, its flagged targets that ``keep`` takes, their cells' rows once
    each)`` for every set, loss (and "all") and batch (and "all") with such targets."""
    for which, rows in sets:
        for loss in (*ho.LOSSES, "all"):
            for batch in ("full", "B32", "all"):
                sub = [r for r in rows if r["R"] > et.REBOUND_MAX and keep(r)
                       and loss in ("all", r["loss"]) and batch in ("all", r["batch"])]
                if sub:
                    cells_ = {(r["task"], r["cell"]): r for r in sub}
                    yield which, loss, batch, sub, list(cells_.values())


def gates_lines(sets: list[tuple[str, list[dict]]]) -> list[str]:
    """Where the check flags: the block with its gates frozen at w0 (``--order gates``,
    image sets) and the block itself with the forecasts' batches (``--order exact``) beside
    the linear and second-order blocks and the library, same targets."""
    out = ["", "*What the block's error is made of* (the flagged cells only: "
           f"`{COMMAND} --run --order gates` and `--order exact`, module docstring; the "
           "text tasks, whose block has no ReLU6, `--order exact` only): "
           "*gates frozen*, the block itself with each ReLU6 replaced by its tangent at the "
           "sample's w0 pre-activation (every order of the layers' products, no gate flips); "
           "*block exact*, the block itself with the forecasts' batches (full batch: the real "
           "run, a check of this harness; B = 32: a real run with another batch order); "
           "entries as above; *seconds*: the paths' sums.", "",
           "| set | loss | batch | block linear | second order | gates frozen | "
           "log(T / T̂) gates | block exact | library T̃ | seconds (gates / exact / real) |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ran = lambda r: r["has_quad"] and "exact" in r["orders"]  # noqa: E731
    for which, loss, batch, sub, cellset in _flagged_groups(sets, ran):
        gated = all("gates" in r["orders"] for r in sub)  # text bodies have no ReLU6 gates
        for r in sub:
            r["exact"] = r["orders"]["exact"][0]
            r["gates"] = r["orders"]["gates"][0] if gated else None
        gs = (f"{sum(r['orders']['gates'][1] for r in cellset):.0f}" if gated else "-")
        xs = sum(r["orders"]["exact"][1] for r in cellset)
        rs = sum(r["real_seconds"] or 0 for r in cellset)
        out.append(f"| {which} | {loss} | {batch} | "
                   + " | ".join(_fmt([_err(r[k], r["T"]) for r in sub])
                                for k in ("w", "quad"))
                   + (f" | {_fmt([_err(r['gates'], r['T']) for r in sub])} | "
                      f"{_bias(sub, 'gates')} | " if gated else " | - | - | ")
                   + " | ".join(_fmt([_err(r[k], r["T"]) for r in sub])
                                for k in ("exact", "et"))
                   + f" | {gs} / {xs:.0f} / {rs:.0f} |")
    return out if len(out) > 5 else []


def proj_lines(sets: list[tuple[str, list[dict]]]) -> list[str]:
    """Where the check flags: the block to second order in a subspace of its weights
    (``--order 2p``) beside the exact second order, the linear block, the block exact and
    the library, on the same targets, with what each costs."""
    ks = "/".join(map(str, PROJ_KS))
    out = ["", "*The block to second order in a subspace* (issue 13's candidate 2 solved in "
           f"a projected space: `{COMMAND} --run --order 2p --which SET`, the flagged cells "
           "only): Δw = P c with P the top k left singular vectors of the linear block's "
           "own Δw along its path (weight space, the logged steps), z = z0 + A c + ½ B[c, c] "
           "with A = J P and B = Pᵀ∂²z P computed once (k² second directional derivatives, "
           f"``torch.func.jacfwd`` of the jacfwd), SGD on c and the top; k = {ks}. Entries as "
           "above; *seconds*: sums over the cells of the k-subspace model (A and B, then its "
           "path), of the linear path that gave the subspace, of the exact second order's "
           "paths and of the block exact's (the real run of the layers above the trunk, to "
           "the deepest drop it reaches).", "",
           "| set | loss | batch | block linear | second order | "
           + " | ".join(f"second order, k = {k}" for k in PROJ_KS)
           + " | block exact | library T̃ | seconds ("
           + " / ".join(f"k = {k} (of which A, B)" for k in PROJ_KS)
           + " / subspace / second order / block exact) |",
           "|---|---|---|---|---|" + "---|" * len(PROJ_KS) + "---|---|---|"]  # fmt: skip
    ran = lambda r: r["has_quad"] and r["proj"] and "exact" in r["orders"]  # noqa: E731
    for which, loss, batch, sub, cellset in _flagged_groups(sets, ran):
        for r in sub:
            r["exact"] = r["orders"]["exact"][0]
            for k in PROJ_KS:
                r[f"p{k}"] = r["proj"][k][0]
        secs = [f"{sum(r['proj'][k][1] for r in cellset):.0f} "
                f"({sum(r['proj'][k][2] for r in cellset):.0f})" for k in PROJ_KS]
        secs += [f"{sum(r['proj']['subspace'] for r in cellset):.0f}",
                 f"{sum(r['quad_seconds'] for r in cellset):.0f}",
                 f"{sum(r['orders']['exact'][1] for r in cellset):.0f}"]
        out.append(f"| {which} | {loss} | {batch} | "
                   + " | ".join(_fmt([_err(r[c], r["T"]) for r in sub])
                                for c in ("w", "quad", *(f"p{k}" for k in PROJ_KS),
                                          "exact", "et"))
                   + " | " + " / ".join(secs) + " |")
    return out if len(out) > 5 else []


def goal_lines() -> list[str]:
    """Issue 13's goals over each 32-px image set's CE targets, 50% and 80% drops, with
    the flagged targets' estimate taken from each model (the passed targets keep the
    library's): would a better model of the block meet them?"""
    cols = {"w": "block linear", "quad": "second order", "gates": "gates frozen",
            "exact": "block exact", "et": "library (as scored)"}
    out = ["", "*Issue 13's CE goal, set by set, if the flagged targets took each model's "
           "estimate* (the passed targets keep the library's; second looks on rounds 11-14, "
           "scored once before; median / p90 of |T̂ − T|/T at the 50% and 80% drops; the "
           "goal: 15% / 35% at both):", "",
           "| set | CE targets (flagged) | " + " | ".join(cols.values()) + " |",
           "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for which in WHICH:
        if which.startswith("text"):
            continue
        flagged = {(r["task"], r["cell"], r["drop"]): r for r in scored(which)
                   if r["R"] > et.REBOUND_MAX and r["has_quad"]
                   and {"gates", "exact"} <= set(r["orders"])}  # fmt: skip
        rows = [r for r in tw.recalibrate(tw.check_rows(which), tw.FRESH14_CAL)
                if r["loss"] == "ce" and r["drop"] in ("0.5", "0.8")]  # fmt: skip
        hit = [r for r in rows if r["R"] > et.REBOUND_MAX]
        if not hit or any((r["task"], r["cell"], r["drop"]) not in flagged for r in hit):
            continue
        cells_ = []
        for col in cols:
            parts = []
            for d in ("0.5", "0.8"):
                errs = []
                for r in (r for r in rows if r["drop"] == d):
                    f = flagged.get((r["task"], r["cell"], r["drop"]))
                    if f is None or r["R"] <= et.REBOUND_MAX or col == "et":
                        errs.append(_err(r["et"], r["T"]))
                    else:
                        t = f["orders"][col][0] if col in ("gates", "exact") else f[col]
                        errs.append(_err(t, r["T"]))
                e = np.array(errs)
                q = np.quantile(e, 0.9)
                parts.append(f"{np.median(e):.0%} / " + ("miss" if q == math.inf
                                                          else f"{q:.0%}"))
            cells_.append(", ".join(parts))
        out.append(f"| {which} | {len(rows)} ({len(hit)}) | " + " | ".join(cells_) + " |")
    return out if len(out) > 5 else []


def fixed_lines(sets: list[tuple[str, list[dict]]]) -> list[str]:
    """Where the check flags: the weight-space model, the library's estimate and the
    library's path changed as ``LIBRARY_VARIANTS`` (``--library TAG``; the library's drift)
    on the same targets (the flagged cells every variant ran)."""
    out = ["", "Where the check flags, the library's path changed one way at a time "
           f"(`{COMMAND} --library TAG --which SET`): *fixed*, without its catapult (a fixed "
           "kernel); *q = D*, all of z exact (no κ_⊥), with the catapult; the same k, "
           "batches and drift, beside the two above, on the same targets (the flagged cells "
           "every variant ran); entries as above.", "",
           "| set | loss | weight space | library T̃ | fixed | q = D |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for which, rows in sets:
        for loss in (*ho.LOSSES, "all"):
            sub = [r for r in rows if r["R"] > et.REBOUND_MAX and loss in ("all", r["loss"])
                   and all(t in r["lib"] for t in LIBRARY_VARIANTS)]  # fmt: skip
            if sub:
                out.append(f"| {which} | {loss} | {_fmt([_err(r['w'], r['T']) for r in sub])} | "
                           f"{_fmt([_err(r['et'], r['T']) for r in sub])} | "
                           + " | ".join(_fmt([_err(r["lib"][t], r["T"]) for r in sub])
                                        for t in LIBRARY_VARIANTS) + " |")
    return out if len(out) > 5 else []


READING = """
*Reading* (development sets; round 14's rows, run on 2026-12-04 as a second look, are in no
pooled figure). Where the
check passes, the weight-space model and the library agree with the real runs alike
(images, pooled: 3% of 282 control targets off by more than 25% either way; text 0% of
173): the library's three approximations cost nothing there. Where it flags, on the
images, the exact model of the same split is no better than the library's estimate: pooled
over the four 32-px development sets, 18% / 103% with 41% of 217 flagged targets off by
more than 25% and 16 misses, against 21% / 72%, 45% and 7 misses; on the flagged CE targets
24% / miss, 48% bad (14 misses), against 24% / 82%, 49% (6). It has no catapult to leave
the edge of stability, so it misses more. So on the image tasks the flagged targets' error,
the CE tail of issue 13's goals at 32 px, is not the library's subspace, projection or
catapult: it is the block's linearization itself, which the real network leaves at the edge
of stability (the same split with the block exact is the real run, which another real run
predicts to 14% / 42% there: RESULTS.md "twolayer-chaos"). One cell of round 14 had
suggested otherwise (hebrew10-lite0, CE, full batch, a = 0.3: the exact model 71 / 101 / 116
steps, the real run 58 / 91 / 118, the library 21 / 37 / 51); over the development sets it
was the exception. On the text development tasks the exact model does better than the
library where the check flags (21% / 114%, 40% bad, 6 misses, against 25% / miss, 49%, 12
misses over 100 targets; CE full batch 36% / miss against miss / miss): there the catapult
and the subspace cost accuracy, on a kind of body whose held-out rounds already meet issue
13's goals. Cost: the weight-space path pays the block's forward and backward at every step
(a jvp through it), about what the real run of the same layers on cached trunk outputs
costs (*seconds*), so it is a diagnostic, not a forecast. Nothing adopted.
*Which approximation, on text* (``--library fixed`` and ``--library qD`` on the 14 text
development tasks' flagged cells, the last table): not the catapult, which helps there
(without it 27% / miss, 51% bad, 15 misses, against the library's 25% / miss, 49%, 12), but
the subspace: with all of z exact (q = D = 384 instead of min(32C, 128) = 64-128, the
catapult kept) the flagged text targets score 14% / 63%, 32% bad, 6 misses, better than the
library and than the exact weight-space model (which has no catapult). Here its flagged
paths took 662 s against 458 s at the library's q with a fixed kernel (1.4x; kernels not
timed). Not run on the image sets (there the exact model shows nothing to gain). Followed
up on the whole text development grid and held out on a second fresh text round
(PLAN-text2.md; RESULTS.md "twolayer", *The second fresh text round*): as accurate or
better there (10 bad targets against 11), but its kernel costs 4.8x the library's on the
command line's text example (29% of a real run against 5.4%), so the library keeps its q.
"""


QUAD_READING = """
*Reading, the block to second order* (issue 13's candidate 2; the flagged cells of the four
32-px image development sets, 217 targets, and of the 14 text development tasks, 100;
development, nothing adopted). On the images, keeping the
block's second-order term, exactly, moves the flagged targets little overall: 17% / 100%,
38% off by more than 25%, 15 misses, against the linear block's 18% / 103%, 41%, 16 and the
library's 21% / 72%, 45%, 7. It splits by loss. Under MSE it is the better model (16% of 80
targets bad, against 30% linear and 39% for the library; 10% / 58%). Under CE it is not
(51% of 137 bad, against 48% and 49%; 26% / miss): its CE paths are too fast (median
log(T / T̂₂) +0.17, the linear block's +0.04): the second-order term speeds the
edge-of-stability CE paths up, where the real runs, with every order, are slower. So the CE
tail at 32 px is not the block's second-order term
either, and a second-order model solved in a projected space (the neural tangent
hierarchy) would not close it; exact in weight space it also costs 1.9x the linear block's
paths and 2.9x the real runs of the same cells (*seconds*). The MSE gain is on targets
that already meet issue 13's goals over each round. On the text tasks it is another
matter: 10% / 45%, 24% of the flagged targets bad, 3 misses, against the linear block's
21% / 114%, 40%, 6 and the library's 25% / miss, 49%, 12 (q = D, the library's path with
all of z: 32% on the same cells, table above); CE 21% bad against 41% and 56%. There the
block's curvature is most of the flagged error, in the direction a second-order term
captures. Exact in weight space it costs what the real runs of the same cells cost (1.1x),
so a projected second-order model of the attention sub-layer is the candidate for the
flagged text targets, on a kind of body whose held-out rounds already meet the goals
(measured below, "the second order in a subspace": it loses on accuracy and cost).
"""


GATES_READING = """
*Reading, what the block's error is made of* (the flagged cells of the five 32-px image
sets: the development set and rounds 11-14, the rounds as second looks; nothing adopted).
The block is a polynomial in its weights wherever no ReLU6 changes state, so *gates
frozen* is what a Taylor model of the block around w0 of any order converges to (the
second order is its first step); the difference between it and *block exact* is the gates'
flips alone. Pooled over the development set and rounds 11-13 (217 flagged targets): under
MSE the layers' products are most of the error (gates frozen 14% of 80 targets bad, the
second order 16%, the linear block 30%, the library 39%; the block exact 11%); under CE they
are not: gates frozen 47% of 137 bad, against 51% (second order), 48% (linear) and 49%
(library), with its paths too fast (median log(T / T̂) +0.20), while the block exact is at
12% (1% of the 71 full-batch targets, 24% of the minibatch ones, whose batch order differs
from the real run's). Round 14 agrees (CE: gates frozen 73% of 15 bad, the block exact
13%). So the 32-px CE tail is the block's gates flipping at the edge of stability: a
forecast of it needs the block itself, which no expansion around w0 gives. The last table
says the same of issue 13's goal: with the flagged estimates from the block exact, every
set meets the CE goal at both drops (p90 10-30%); from the gates frozen, only the
development set does (rounds 11-14: p90 37-42% or a miss); the linear block meets it on
round 14 alone, the library on none.
The block exact is also the floor of these targets: its full-batch runs are the real runs'
computation up to floating-point rounding (on round 14's four full-batch cells they agree
to 1e-7 over the first steps, then part after 17-41 steps: 11% of 9 CE targets off by more
than 25%), so these targets are chaotic at the scale of rounding.
It costs what the real runs on cached trunk outputs cost (*seconds*; 0.07-0.24 of the
network's run, RESULTS.md "cached-trunk"), so it is not a forecast: where the check flags,
the library's advice stays a lower rate (``reliable_lr``) or that real run
(``tl.finetune(..., trunk=)``, ``tangentlab validate --cached-trunk``).
*Text* (the 14 development tasks' flagged cells, 100 targets; ``--order exact`` only: the
attention sub-layer has no ReLU6): the block exact 15% bad (0% of the 31 full-batch
targets, 22% of the 69 minibatch ones, with another batch order), the second order 24%
(26% and 23%), the linear block 40%, the library 49%. In minibatch the second-order block
is at that floor; in full batch the orders beyond the second still matter. So for flagged
text settings the second-order model is most of the way to what a model can do; its
projected version is measured below (it loses). *Seconds*: the weight-space
paths stop at the deepest drop the real run reaches; the real runs ran their whole
horizons (on text up to 1,500 steps), so the columns compare orders with each other, not
with the real runs.
"""


PROJ_READING = """
*Reading, the second order in a subspace* (issue 13's candidate 2 as the issue words it,
solved in a projected space; the 14 text development tasks' flagged cells, 100 targets,
where the exact second order gains; development, nothing adopted). In a subspace of k
directions of the block's weights, the ones its linear path moves along, the second order
keeps part of its gain: at k = 4, 17% / 55%, 36% of the targets off by more than 25%, 6
misses; at k = 8, 15% / miss, 34%, 12 misses (8 in CE full batch at a = 1, whose paths
climb to 9-250 L0 and stay there, as the exact second order's does on one of those five
cells: a quadratic in the weights puts no bound on z); against the exact second order's 10% /
45%, 24%, 3, the linear block's 21% / 114%, 40%, 6, the library's 25% / miss, 49%, 12 and
the block exact's 7% / 36%, 15%, 1. It costs more than the real run it forecasts: A and B
take k² second directional derivatives (100 s at k = 4, 456 s at k = 8 over these cells)
and its paths run the exact top at every step (272 s and 670 s in all), against 166 s for
the block exact, the real run of the same layers to the deepest drop it reaches; and its
subspace came from the linear block's path in weight space (975 s here; a library version
would read it off the function-space path, k vector-Jacobian products). For A and B to cost
a tenth of the real run, the run would need about 300 full-batch steps of the block (k = 4;
210-490 over the 22 full-batch cells, from each cell's seconds per step) or 1,700 (k = 8),
where these targets are reached in tens. So candidate 2 in a projected
space loses on accuracy to the exact second order and on cost to the real run of the
layers: measured, not adopted. For flagged text settings the library's answer stays a
lower rate or the real run on cached trunk outputs (``tangentlab validate --cached-trunk``).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="the weight-space paths")
    ap.add_argument("--which", default="dev32_q32Cmax128", choices=WHICH)
    ap.add_argument("--library", choices=sorted(LIBRARY_VARIANTS),
                    help="the library's path of the flagged cells, changed (module docstring)")
    ap.add_argument("--order", choices=ORDERS, default="1",
                    help="with --run: the block linear (1), to second order (2), with its "
                         "gates frozen at w0 (gates) or exact (exact); all but 1: flagged "
                         "cells only; see the module docstring")
    ap.add_argument("--task", action="append",
                    help="with --run or --library: only this task (repeat)")
    ap.add_argument("--report", action="store_true", help="RESULTS.md section only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run:
        run(args.which, args.task, args.order)
        return
    if args.library:
        run_fixed(args.which, args.task, args.library)
        return
    lines = report()
    print("\n".join(lines))
    if args.report:
        write_section("twolayer-weights", "\n".join(lines))


if __name__ == "__main__":
    main()

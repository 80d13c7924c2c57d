"""``compute_kernel``: the empirical NTK of a model on a data set, chunked, cached, resumable.

.. math::

    \\Theta[(i,a),(j,b)] = \\frac{\\partial f_a(x_i)}{\\partial w} \\cdot
                          \\frac{\\partial f_b(x_j)}{\\partial w}\\Big|_{w_0},
    \\qquad \\Phi = J R \\ (\\text{projected}), \\quad \\Theta \\approx \\Phi\\Phi^T

NOTE [exact kernel strips]. An exact kernel needs every pair of per-sample Jacobians. When
all N Jacobians ``[N, C, P]`` fit in the budget they are computed once. Otherwise the
samples are cut into row strips of S samples: a strip's Jacobians are kept while the
Jacobians of the later samples are recomputed chunk by chunk and contracted against it,
so the cost grows to about N/(2S) passes over the data. Each finished strip is a unit of
the cache, so an interrupted computation resumes from its last finished strip.

NOTE [cache layout]. ``cache=DIR`` holds ``request.json`` (what was asked: weights hash,
data fingerprint, params selection, projection, dtype, library version), ``plan.json``
(the chunking used, kept on resume), ``part-*.safetensors`` (finished units) and, when
done, ``kernel.safetensors``. Every file is written atomically. A request that does not
match ``request.json`` is refused with the differing fields; nothing is silently reused.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tangentlab._version import __version__
from tangentlab.data import as_arrays, check_labels, fingerprint, num_rows, take
from tangentlab.errors import CacheMismatchError, TangentlabError
from tangentlab.kernel import Kernel, atomic_write, load_kernel
from tangentlab.memory import MemoryPlan, activation_elements, default_budget, parse_bytes, plan
from tangentlab.projection import Projection
from tangentlab.tangent import ParamSpec, Tangent, check_output


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"tangentlab: {msg}", file=sys.stderr, flush=True)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=True
    )


def compute_kernel(
    model_or_tangent: nn.Module | Tangent,
    data: Any,
    num_classes: int | None = None,
    projection: int | Projection | None = None,
    params: ParamSpec = None,
    memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    *,
    seed: int = 0,
    keep_theta: bool | None = None,
    progress: bool = True,
) -> Kernel:
    """Empirical NTK of the tangent model on ``data`` (exact or projected).

    Args:
      model_or_tangent: an ``nn.Module`` (wrapped in a :class:`Tangent` with ``params``,
        ``projection`` and ``seed``) or a ready :class:`Tangent`.
      data: ``(X, y)`` tensors/arrays (``X`` may be a dict of tensors for Hugging Face
        models), a ``Dataset`` or a ``DataLoader`` (see :mod:`tangentlab.data`).
      num_classes: C; checked against the model's output width when given.
      projection: ``None`` for the exact kernel, ``k`` or a :class:`Projection`.
      params: trainable weights (regex or list of names); all by default.
      memory_budget: bytes (or ``"4GB"``) the computation may hold; default: 50% of free
        CPU memory, 80% of free GPU memory. The plan is made before allocating.
      device: where to compute (default: where the model's weights are).
      batch_size: samples per Jacobian chunk (default: the largest the budget allows).
      cache: a directory for the kernel, its metadata and finished chunks (resumable).
      seed: projection seed when ``projection`` is an int.
      keep_theta: projected kernels: form ``Theta = Phi Phi^T`` (default: when it fits).
      progress: show a progress bar (samples/s) and the plan on stderr (a reused cache is
        announced on stderr in any case).

    Returns:
      :class:`Kernel` with ``theta`` ``[N*C, N*C]`` (when it fits), ``features``
      ``[N*C, k]`` (projected), ``f0`` ``[N, C]``, ``targets`` ``[N]`` and ``jw0`` ``[N, C]``.

    Example::

        >>> k = compute_kernel(model, (X, y), projection=1024)   # X [N, ...], y [N]
        >>> k.theta.shape, k.features.shape                      # [N*C, N*C], [N*C, 1024]
    """
    if isinstance(model_or_tangent, Tangent):
        tangent = model_or_tangent
        if params is not None or projection is not None:
            raise TangentlabError(
                "compute_kernel: params= and projection= are set on the Tangent you passed; "
                "do not give them again (build a new Tangent to change them)."
            )
    else:
        tangent = Tangent(model_or_tangent, params=params, projection=projection, seed=seed)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
        raise TangentlabError(f"compute_kernel: batch_size must be >= 1 (got {batch_size!r}).")
    if device is not None:
        tangent.to(torch.device(device))
    dev = tangent.device
    budget = parse_bytes(memory_budget) or default_budget(dev)

    x, y = as_arrays(data, where="compute_kernel")
    n = num_rows(x)
    # Probe one sample: output shape, number of classes, activation size for the plan.
    x1 = take(x, slice(0, 1))
    f1 = tangent.f0(x1)
    c = int(f1.shape[1])
    if num_classes is not None and num_classes != c:
        raise TangentlabError(
            f"compute_kernel: num_classes={num_classes} but the model has {c} outputs; "
            "give the model a head with num_classes outputs (or drop num_classes)."
        )
    check_labels(y, c, where="compute_kernel")
    act = activation_elements(tangent.model, lambda: tangent.f0(x1))
    k = tangent.projection.k if tangent.projection else None
    itemsize = tangent.dtype.itemsize
    # Weights whose per-sample gradients a chunk holds (fewer with the tensor-sketch path).
    p_held = tangent.num_params if k is None else tangent.materialized_params(x1)
    mplan = plan(
        n=n, c=c, p=p_held, k=k, itemsize=itemsize, act=act, budget=budget,
        batch_size=batch_size, keep_theta=keep_theta,
    )  # fmt: skip

    request = {
        "weights_sha": tangent.weights_hash(),
        "data_fingerprint": fingerprint(x, y),
        "num_samples": n,
        "num_classes": c,
        "params": f"{len(tangent.param_names)} tensors, {tangent.num_params} weights, "
        f"sha {tangent.params_hash()}",
        "projection": tangent.projection.describe() if tangent.projection else "exact",
        "dtype": str(tangent.dtype).replace("torch.", ""),
        "tangentlab_version": __version__,
    }
    store = _Cache(Path(cache), request) if cache is not None else None
    if store is not None:
        done = store.finished_kernel()
        if done is not None:
            _say(f"reusing cached kernel {store.kernel_path}", True)  # always announced
            return done
        mplan = store.plan(mplan)
    _say(
        f"kernel of N={n} samples x C={c} outputs, P={tangent.num_params:,} weights, "
        f"{request['projection']}; {mplan.describe()}",
        progress,
    )
    t0 = time.perf_counter()
    if k is None:
        kernel = _exact(tangent, x, n, c, mplan, store, progress)
    else:
        kernel = _projected(tangent, x, n, c, mplan, store, progress)
    kernel = Kernel(
        f0=kernel["f0"],
        targets=y,
        theta=kernel.get("theta"),
        features=kernel.get("features"),
        jw0=kernel["jw0"],
        metadata={
            **{key: str(v) for key, v in request.items() if key != "tangentlab_version"},
            "params_spec": str(tangent.params_spec),
            "seconds": f"{time.perf_counter() - t0:.3f}",
        },
    )
    if store is not None:
        store.finish(kernel)
    return kernel


def _units(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _f0_checked(tangent: Tangent, xb, blocks) -> tuple[torch.Tensor, torch.Tensor]:
    f0 = tangent.f0(xb)
    check_output(f0, num_rows(xb), "compute_kernel")
    return f0, tangent.jw0(blocks)


def _projected(tangent, x, n, c, mplan: MemoryPlan, store, progress) -> dict[str, torch.Tensor]:
    k = tangent.projection.k
    feats = torch.empty(n, c, k, dtype=tangent.dtype, device=tangent.device)
    f0 = torch.empty(n, c, dtype=tangent.dtype, device=tangent.device)
    jw0 = torch.empty(n, c, dtype=tangent.dtype, device=tangent.device)
    units = _units(n, mplan.chunk)
    with _progress_bar(n, "kernel (projected)", progress) as bar:
        for s, e in units:
            part = store.load_part(s, e) if store else None
            if part is None:
                phi, f0b, jw0b = tangent.projected_chunk(take(x, slice(s, e)))
                check_output(f0b, e - s, "compute_kernel")
                part = {"features": phi, "f0": f0b, "jw0": jw0b}
                if store:
                    store.save_part(s, e, part)
            feats[s:e], f0[s:e], jw0[s:e] = part["features"], part["f0"], part["jw0"]
            bar.update(e - s)
    phi = feats.reshape(n * c, k)
    out = {"features": phi.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}
    if mplan.keep_theta:
        out["theta"] = (phi @ phi.T).cpu()
    return out


def _exact(tangent, x, n, c, mplan: MemoryPlan, store, progress) -> dict[str, torch.Tensor]:
    dt, dev = tangent.dtype, tangent.device
    theta = torch.empty(n * c, n * c, dtype=dt, device=dev)
    f0 = torch.empty(n, c, dtype=dt, device=dev)
    jw0 = torch.empty(n, c, dtype=dt, device=dev)
    strips = _units(n, mplan.strip)
    work = sum(n - s for s, _ in strips)  # Jacobian evaluations, recomputation included
    with _progress_bar(work, "kernel (exact)", progress) as bar:
        for s, e in strips:
            part = store.load_part(s, e) if store else None
            if part is None:
                part = _exact_strip(tangent, x, n, c, s, e, mplan.chunk, bar)
                if store:
                    store.save_part(s, e, part)
            else:
                bar.update(n - s)
            rows = part["rows"]  # [(e-s)C, (n-s)C]
            theta[s * c : e * c, s * c :] = rows
            theta[s * c :, s * c : e * c] = rows.T
            f0[s:e], jw0[s:e] = part["f0"], part["jw0"]
    return {"theta": theta.cpu(), "f0": f0.cpu(), "jw0": jw0.cpu()}


def _exact_strip(tangent, x, n, c, s, e, chunk, bar) -> dict[str, torch.Tensor]:
    """Rows ``[s, e)`` of Theta against columns ``[s, n)`` (NOTE [exact kernel strips])."""
    names = tangent.param_names
    held: dict[str, list[torch.Tensor]] = {nm: [] for nm in names}
    f0s, jw0s = [], []
    for a, b in _units(e - s, chunk):
        xb = take(x, slice(s + a, s + b))
        blocks = tangent.jacobian_blocks(xb)
        f0b, jw0b = _f0_checked(tangent, xb, blocks)
        f0s.append(f0b)
        jw0s.append(jw0b)
        for nm in names:
            held[nm].append(blocks[nm].reshape((b - a) * c, -1))
        del blocks
        bar.update(b - a)
    jrow = {nm: torch.cat(v) for nm, v in held.items()}
    del held
    m = (e - s) * c
    rows = torch.empty(m, (n - s) * c, dtype=tangent.dtype, device=tangent.device)
    rows[:, :m] = sum(jrow[nm] @ jrow[nm].T for nm in names)
    for a, b in _units(n - e, chunk):
        blocks = tangent.jacobian_blocks(take(x, slice(e + a, e + b)))
        cols = sum(jrow[nm] @ blocks[nm].reshape((b - a) * c, -1).T for nm in names)
        rows[:, m + a * c : m + b * c] = cols
        del blocks
        bar.update(b - a)
    return {"rows": rows.cpu(), "f0": torch.cat(f0s).cpu(), "jw0": torch.cat(jw0s).cpu()}


class _Cache:
    """A kernel cache directory (NOTE [cache layout])."""

    def __init__(self, root: Path, request: dict[str, Any]) -> None:
        self.root = root
        self.request = request
        self.kernel_path = root / "kernel.safetensors"
        req_path = root / "request.json"
        if root.exists() and not root.is_dir():
            raise TangentlabError(
                f"compute_kernel: cache={str(root)!r} is a file; give a directory path "
                "(it will hold the kernel and its metadata)."
            )
        if req_path.exists():
            try:
                stored = json.loads(req_path.read_text())
                if not isinstance(stored, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as exc:
                raise CacheMismatchError(
                    f"compute_kernel: {str(req_path)!r} is unreadable or not a tangentlab cache "
                    f"({exc}). Delete the directory or choose another cache path."
                ) from None
            diff = {
                key: (stored.get(key), request.get(key))
                for key in sorted(set(stored) | set(request))
                if stored.get(key) != request.get(key)
            }
            if diff:
                lines = "; ".join(
                    f"{key}: cached {a!r} vs requested {b!r}" for key, (a, b) in diff.items()
                )
                raise CacheMismatchError(
                    f"compute_kernel: the cache {str(root)!r} holds a kernel for a different "
                    f"request ({lines}). Use another cache directory, or delete this one to "
                    "recompute."
                )
        elif root.is_dir() and any(root.iterdir()):
            raise CacheMismatchError(
                f"compute_kernel: cache={str(root)!r} is a non-empty directory without a "
                "tangentlab request.json; refusing to write into it. Choose an empty or new "
                "directory."
            )
        else:
            root.mkdir(parents=True, exist_ok=True)
            self._write_json(req_path, request)

    def _write_json(self, path: Path, obj: dict) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))

    def finished_kernel(self) -> Kernel | None:
        return load_kernel(self.kernel_path) if self.kernel_path.exists() else None

    def plan(self, mplan: MemoryPlan) -> MemoryPlan:
        """Keep the chunking of an interrupted run so that its finished parts line up."""
        path = self.root / "plan.json"
        if path.exists():
            stored = json.loads(path.read_text())
            kept = {"chunk": stored["chunk"], "strip": stored["strip"]}
            return MemoryPlan(**{**mplan.__dict__, **kept})
        self._write_json(path, {"chunk": mplan.chunk, "strip": mplan.strip})
        return mplan

    def _part(self, s: int, e: int) -> Path:
        return self.root / f"part-{s:08d}-{e:08d}.safetensors"

    def load_part(self, s: int, e: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._part(s, e)
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a damaged part (e.g. disk full) is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def save_part(self, s: int, e: int, part: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {key: v.detach().cpu().contiguous() for key, v in part.items()}
        atomic_write(self._part(s, e), lambda tmp: save_file(tensors, tmp))

    def finish(self, kernel: Kernel) -> None:
        kernel.save(self.kernel_path)
        for part in self.root.glob("part-*.safetensors"):
            part.unlink(missing_ok=True)

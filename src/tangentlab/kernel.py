"""The ``Kernel``: the empirical NTK of a tangent model on a data set, and what travels with it.

Conventions (DESIGN.md §2): N samples, C outputs, stacked outputs sample-major, so row
``i*C + a`` of ``theta`` / ``features`` belongs to output ``a`` of sample ``i``::

    theta[(i, a), (j, b)] = df_a(x_i)/dw . df_b(x_j)/dw          # [N*C, N*C]
    features = J R,   theta ~= features @ features.T              # [N*C, k]

A *trace kernel* (``structure="trace"``, NOTE [trace kernel] in tangentlab.compute) keeps
only ``K = tr-blocks(Theta)/C``, with ``Theta ~= K (x) I_C``::

    K[i, j] = tr(Theta_ij) / C = (1/C) sum_a df_a(x_i)/dw . df_a(x_j)/dw   # theta [N, N]
    features = G R,   K ~= features @ features.T                       # [N, S*k]

The eigendecomposition is computed once, on first use, and cached (it costs O((NC)^3)
for a dense kernel, or O(NC k^2) through the k x k Gram matrix of a projected one; O(N^3)
for a trace kernel, whose eigenvalues are those of ``K`` repeated C times). A kernel that
comes from a cache directory (``compute_kernel(..., cache=DIR)``) also keeps it on disk,
next to the kernel (NOTE [checksums]), so that a rerun does not pay it again.

NOTE [checksums]. :meth:`Kernel.save` stores in the file's metadata a sha256 of every
tensor (name, shape, dtype, bytes) and of the metadata; :func:`load_kernel` recomputes it
and refuses a file whose contents no longer match (files written before checksums load
unchecked). The tensors' digest alone (``Kernel._sha256``) identifies the kernel: the
eigendecomposition persisted in a cache directory (``eigh.safetensors``) records the
digest of the kernel it belongs to and its own checksum, and is used only when both match.
Hashing reads every byte once (about 1 s per GB), negligible beside computing the kernel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tangentlab._version import __version__
from tangentlab.errors import CacheWarning, PositiveSpectrumWarning, TangentlabError

_FORMAT = "tangentlab.kernel/1"
_EIGH_FORMAT = "tangentlab.eigh/1"
_STRUCTURES = ("full", "trace")


def _persisted_eigh(eigh):
    """Wrap :meth:`Kernel.eigh`: restore its result from ``Kernel._eig_file`` (a kernel from a
    cache directory) before computing, and write it there after a fresh computation
    (NOTE [checksums]). Kernels without ``_eig_file`` are unaffected."""

    @functools.wraps(eigh)
    def wrapper(self: Kernel, *args, **kwargs):
        compute = wrapper.__wrapped__  # looked up at call time: tests count computations
        path = self._eig_file
        if path is None or self._sha256 is None or args or kwargs:
            return compute(self, *args, **kwargs)
        if self._eig is None:
            self._eig = _load_eigh(path, self._sha256)
        fresh = self._eig is None
        out = compute(self)
        if fresh:
            _save_eigh(path, self._sha256, out)
        return out

    return wrapper


@dataclass(eq=False)
class Kernel:
    """Empirical NTK of the tangent model on N samples with C outputs.

    Attributes:
      f0: outputs of the pre-trained model, ``[N, C]``.
      targets: integer labels in ``[0, C)``, ``[N]``.
      theta: the kernel, ``[N*C, N*C]`` sample-major, or ``None`` when only the projected
        ``features`` are kept (then :meth:`gram` forms it on demand). For a trace kernel:
        ``K`` ``[N, N]`` with ``Theta ~= K (x) I_C``.
      features: projected Jacobians ``Phi = J R``, ``[N*C, k]``, or ``None`` (exact kernel).
        For a trace kernel: ``[N, k']`` (``k' = S*k``, the S probed Jacobians' projections
        side by side), ``K ~= features @ features.T``.
      jw0: ``J(x_i) w0`` for every sample, ``[N, C]``: the constant that coupled weight
        decay adds in function space (DESIGN.md §3); ``None`` if not computed. Exact for
        trace kernels too (never probed).
      metadata: provenance (weights hash, data fingerprint, params selection, projection,
        trace setting, library version), as strings.
      structure: ``"full"`` (``theta`` / ``features`` have N*C rows, the default) or
        ``"trace"`` (N rows: ``Theta ~= K (x) I_C``, NOTE [trace kernel] in
        tangentlab.compute). Every forecast accepts both.

    Example::

        >>> k = Kernel(f0=torch.zeros(4, 3), targets=torch.tensor([0, 1, 2, 0]),
        ...            theta=torch.eye(12))                    # [N*C, N*C] = [12, 12]
        >>> evals, evecs = k.eigh()                            # [12], [12, 12]
    """

    f0: torch.Tensor
    targets: torch.Tensor
    theta: torch.Tensor | None = None
    features: torch.Tensor | None = None
    jw0: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    structure: str = "full"
    _eig: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # sha256 of the tensors, set by save() / load_kernel() (NOTE [checksums]); and where a
    # cache directory keeps the eigendecomposition. Not init fields: dataclasses.replace()
    # of a kernel never carries them over to different tensors.
    _sha256: str | None = field(default=None, init=False, repr=False)
    _eig_file: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.f0.ndim != 2:
            raise TangentlabError(
                f"Kernel: f0 must have shape [N, C], got {tuple(self.f0.shape)}."
            )
        n, c = self.f0.shape
        self.targets = torch.as_tensor(self.targets).reshape(-1).long()
        if self.targets.shape[0] != n:
            raise TangentlabError(
                f"Kernel: targets has {self.targets.shape[0]} entries but f0 has {n} samples."
            )
        if n and (int(self.targets.min()) < 0 or int(self.targets.max()) >= c):
            raise TangentlabError(
                f"Kernel: targets must lie in [0, {c}), got values in "
                f"[{int(self.targets.min())}, {int(self.targets.max())}]."
            )
        if self.structure not in _STRUCTURES:
            raise TangentlabError(
                f"Kernel: structure must be 'full' (theta [N*C, N*C]) or 'trace' (theta "
                f"[N, N], Theta ~= K (x) I_C), got {self.structure!r}."
            )
        rows, what = (n, "N") if self.is_trace else (n * c, "N*C")
        if self.theta is None and self.features is None:
            raise TangentlabError(f"Kernel: give theta [{what}, {what}] or features [{what}, k].")
        if self.theta is not None and tuple(self.theta.shape) != (rows, rows):
            hint = (
                " A full kernel's theta passed as a trace kernel? Drop structure='trace'."
                if self.is_trace and tuple(self.theta.shape) == (n * c, n * c)
                else ""
            )
            raise TangentlabError(
                f"Kernel: theta must have shape [{what}, {what}] = [{rows}, {rows}] "
                f"(structure={self.structure!r}), got {tuple(self.theta.shape)}.{hint}"
            )
        if self.features is not None and (
            self.features.ndim != 2 or self.features.shape[0] != rows
        ):
            raise TangentlabError(
                f"Kernel: features must have shape [{what}, k] = [{rows}, k] "
                f"(structure={self.structure!r}), got {tuple(self.features.shape)}."
            )
        if self.jw0 is not None and tuple(self.jw0.shape) != (n, c):
            raise TangentlabError(
                f"Kernel: jw0 must have shape [N, C] = [{n}, {c}], got {tuple(self.jw0.shape)}."
            )
        for name in ("f0", "theta", "features", "jw0"):
            t = getattr(self, name)
            if t is not None and not _all_finite(t):
                raise TangentlabError(
                    f"Kernel: {name} contains NaN or inf values. Check the model's outputs "
                    "on this data (and its weights) before computing a kernel."
                )

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.f0.shape[0])

    @property
    def num_classes(self) -> int:
        """C, the number of outputs per sample."""
        return int(self.f0.shape[1])

    @property
    def projection_dim(self) -> int | None:
        """k for a projected kernel (a trace kernel's feature width S*k), ``None`` if exact."""
        return None if self.features is None else int(self.features.shape[1])

    @property
    def is_trace(self) -> bool:
        """Whether this is a trace kernel, ``Theta ~= K (x) I_C`` (``theta`` ``[N, N]``)."""
        return self.structure == "trace"

    @property
    def kernel_rows(self) -> int:
        """Rows of ``theta`` / ``features``: N*C for a full kernel, N for a trace kernel."""
        return self.num_samples * (1 if self.is_trace else self.num_classes)

    # ---- the kernel and its spectrum ---------------------------------------------------
    def gram(self) -> torch.Tensor:
        """The kernel matrix ``theta`` ``[N*C, N*C]`` (``features @ features.T`` if projected).

        For a trace kernel: ``K`` ``[N, N]`` (``Theta ~= K (x) I_C`` is never expanded).
        """
        if self.theta is not None:
            return self.theta
        phi = self.features.double()
        return phi @ phi.T

    @_persisted_eigh
    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition ``theta = U diag(lam) U^T`` in float64, computed once and cached.

        Returns:
          ``(lam, U)`` with ``lam`` ascending, shape ``[m]``, and ``U`` ``[N*C, m]``. For an
          exact kernel ``m = N*C``. For a projected kernel with ``k < N*C`` (``theta`` is
          then ``features @ features.T``, formed or not) only the
          ``m = k`` directions in the span of ``features`` are returned (through the
          ``k x k`` matrix ``Phi^T Phi``, cost O(NC k^2)); every direction orthogonal to
          them has eigenvalue 0, so its residual never decays.

          For a trace kernel, the eigendecomposition of ``K`` ``[N, N]``: ``lam`` ``[m]`` and
          ``U`` ``[N, m]``. The eigenvalues of ``Theta ~= K (x) I_C`` are these, each
          repeated C times, with eigenvectors ``u_j (x) e_c`` (never formed).
        """
        if self._eig is not None:
            return self._eig
        nc = self.kernel_rows
        if self.features is not None and self.features.shape[1] < nc:
            from tangentlab.linalg import projected_eigh

            # through the k x k Gram matrix Phi^T Phi (method, errors and timings:
            # NOTE [projected eigh] in tangentlab.linalg); eigenvalues <= 1e-12 lam_max
            # are dropped (directions outside span(Phi)), U = Phi v / sqrt(lam)
            self._eig = projected_eigh(
                self.features,
                check_spectrum=lambda lam: _check_spectrum(lam, "projected kernel"),
            )
        else:
            theta = self.gram().double()
            theta = 0.5 * (theta + theta.T)  # symmetrize float32 round-off
            lam, u = torch.linalg.eigh(theta)
            _check_spectrum(lam, "kernel")
            self._eig = (lam.clamp_min(0.0), u)
        return self._eig

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the kernel to ``path`` (safetensors, atomic: a crash never leaves half a file).

        Returns the path written. Load it back with :func:`tangentlab.load_kernel`, which
        verifies the sha256 checksum stored in the file (NOTE [checksums]).
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"f0": self.f0, "targets": self.targets}
        for name in ("theta", "features", "jw0"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"format": _FORMAT, "tangentlab_version": __version__}
        meta.update({str(k): str(v) for k, v in self.metadata.items()})
        meta["structure"] = self.structure  # absent in older files: "full"
        meta.pop("sha256", None)
        digest = tensors_digest(tensors)
        meta["sha256"] = _file_digest(digest, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self._sha256 = digest
        return path

    def describe(self) -> dict[str, object]:
        """A small JSON-able summary: sizes, trace, extreme eigenvalues (if computed)."""
        out: dict[str, object] = {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "projection_dim": self.projection_dim,
            "structure": self.structure,
        }
        if self.is_trace:
            out["structure_note"] = (
                "trace kernel: Theta ~= K (x) I_C, K[i,j] = tr(Theta_ij)/C (cross-class "
                f"structure ignored); {self.metadata.get('trace', 'trace')}"
            )
        if self.theta is not None:
            total = float(torch.diagonal(self.theta).sum())
        else:
            total = float((self.features.double() ** 2).sum())
        # tr(K (x) I_C) = C tr(K): comparable with a full kernel's trace
        scale = self.num_classes if self.is_trace else 1
        out["trace_per_sample"] = scale * total / self.num_samples
        if self._eig is not None:
            lam = self._eig[0]
            out["lambda_max"] = float(lam.max())
            out["lambda_min_nonzero"] = float(lam[lam > 0].min()) if bool((lam > 0).any()) else 0.0
        out["metadata"] = dict(self.metadata)
        return out


def _all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """``isfinite(t).all()`` in row blocks: a whole-tensor check would briefly allocate
    ~1.75x the tensor (a bool mask and its reduction), outside the memory plan."""
    if t.ndim < 2 or t.numel() <= block:
        return bool(torch.isfinite(t).all())
    step = max(1, block // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i : i + step]).all()) for i in range(0, t.shape[0], step))


def _check_spectrum(lam: torch.Tensor, what: str) -> None:
    """Warn when a kernel is significantly indefinite (as sklearn's PositiveSpectrumWarning)."""
    if lam.numel() == 0:
        return
    top = float(lam.abs().max())
    low = float(lam.min())
    # float32 Jacobians give relative round-off ~1e-6 per entry; accumulated over NC terms
    # a few 1e-5 of the top eigenvalue is still round-off, beyond that something is wrong.
    if top > 0 and low < -1e-4 * top:
        warnings.warn(
            f"Kernel.eigh: the {what} has a negative eigenvalue {low:.3g} "
            f"({-low / top:.2%} of the largest); a kernel is positive semi-definite, so "
            "it was computed with too little precision or is corrupted. Negative values "
            "are clamped to 0. Recompute in float64 (model.double()) if this matters.",
            PositiveSpectrumWarning,
            stacklevel=3,
        )


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; the file is either whole or absent."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_kernel(path: str | os.PathLike) -> Kernel:
    """Load a kernel written by :meth:`Kernel.save` (safetensors: no code is unpickled).

    The sha256 checksum stored in the file is verified (NOTE [checksums]); files written
    before checksums existed load unchecked.

    Raises:
      TangentlabError: if the file is missing, unreadable, not a tangentlab kernel, or its
        contents do not match its checksum (damaged or modified after it was written).
    """
    path = Path(path)
    if not path.is_file():
        raise TangentlabError(f"load_kernel: no such file {str(path)!r}.")
    try:
        meta, tensors = read_safetensors(path)
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise TangentlabError(
            f"load_kernel: {str(path)!r} is not a readable safetensors file ({exc}). "
            "Kernels are written by Kernel.save / `tangentlab kernel --out`."
        ) from None
    if meta.get("format") != _FORMAT:
        raise TangentlabError(
            f"load_kernel: {str(path)!r} is a safetensors file but not a tangentlab kernel "
            f"(format {meta.get('format')!r}, expected {_FORMAT!r})."
        )
    stored = meta.pop("sha256", None)  # absent in files written before checksums
    digest = tensors_digest(tensors)
    if stored is not None and _file_digest(digest, meta) != stored:
        raise TangentlabError(
            f"load_kernel: {str(path)!r} is damaged: its contents do not match the sha256 "
            "checksum stored in it when it was written (the file was corrupted or modified "
            "since). Recompute it (delete it and rerun compute_kernel / `tangentlab kernel`) "
            "or restore an intact copy."
        )
    meta.pop("format", None)
    structure = meta.pop("structure", "full")  # files written before trace kernels: full
    kernel = Kernel(
        f0=tensors["f0"],
        targets=tensors["targets"],
        theta=tensors.get("theta"),
        features=tensors.get("features"),
        jw0=tensors.get("jw0"),
        metadata=meta,
        structure=structure,
    )
    kernel._sha256 = digest
    return kernel


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, shapes, dtypes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensors[name].shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the bytes in place, no copy
    return h.hexdigest()


def _file_digest(tensors_sha: str, meta: dict[str, str]) -> str:
    """A file's checksum: its tensors' digest and its metadata (without the checksum)."""
    text = metadata_json({k: v for k, v in meta.items() if k != "sha256"})
    return hashlib.sha256(f"{tensors_sha}\n{text}".encode()).hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file (nothing is unpickled); raises the
    library's own errors for a foreign or damaged file (callers decide what that means)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {}), {key: fh.get_tensor(key) for key in fh.keys()}


def _load_eigh(path: Path, kernel_sha: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eigendecomposition persisted at ``path`` for the kernel ``kernel_sha``, or ``None``
    (absent, stale or damaged: a damaged file is removed with a :class:`CacheWarning`)."""
    if not path.is_file():
        return None
    try:
        meta, tensors = read_safetensors(path)
        ok = (
            meta.get("format") == _EIGH_FORMAT
            and set(tensors) == {"lam", "u"}
            and meta.get("sha256") == _file_digest(tensors_digest(tensors), meta)
        )
        problem = None if ok else "its contents do not match its checksum"
    except Exception as exc:  # safetensors raises its own error types
        problem = f"it is unreadable ({exc})"
    if problem is not None:
        warnings.warn(
            f"Kernel.eigh: discarding the damaged cached eigendecomposition {str(path)!r} "
            f"({problem}); it is recomputed.",
            CacheWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
    if meta.get("kernel_sha256") != kernel_sha:
        return None  # the eigendecomposition of an earlier kernel: recomputed, overwritten
    return tensors["lam"], tensors["u"]


def _save_eigh(path: Path, kernel_sha: str, eig: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Persist ``(lam, U)`` of the kernel ``kernel_sha`` at ``path`` (atomic, checksummed).
    Best effort: a directory that cannot be written only costs the next run the recompute."""
    from safetensors.torch import save_file

    tensors = {"lam": eig[0].detach().cpu().contiguous(), "u": eig[1].detach().cpu().contiguous()}
    meta = {"format": _EIGH_FORMAT, "kernel_sha256": kernel_sha}
    meta["sha256"] = _file_digest(tensors_digest(tensors), meta)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:
        warnings.warn(
            f"Kernel.eigh: could not keep the eigendecomposition in {str(path)!r} ({exc}); "
            "it will be recomputed next time.",
            CacheWarning,
            stacklevel=3,
        )


def metadata_json(meta: dict[str, object]) -> str:
    """Canonical JSON of a metadata dict (sorted keys), used to compare cache requests."""
    return json.dumps(meta, sort_keys=True, default=str)

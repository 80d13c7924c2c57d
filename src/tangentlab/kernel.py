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
for a trace kernel, whose eigenvalues are those of ``K`` repeated C times).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tangentlab._version import __version__
from tangentlab.errors import PositiveSpectrumWarning, TangentlabError

_FORMAT = "tangentlab.kernel/1"
_STRUCTURES = ("full", "trace")


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
            phi = self.features.double()
            lam, v = torch.linalg.eigh(phi.T @ phi)  # [k], [k, k]
            _check_spectrum(lam, "projected kernel")
            # Eigenvalues are clamped at 0: Phi^T Phi is PSD and negative values are
            # round-off; the eigenvectors of Theta = Phi Phi^T are Phi v / sqrt(lam).
            lam = lam.clamp_min(0.0)
            keep = lam > lam.max() * 1e-12 if lam.numel() else lam > 0
            lam, v = lam[keep], v[:, keep]
            u = (phi @ v) / lam.sqrt()
            self._eig = (lam, u)
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

        Returns the path written. Load it back with :func:`tangentlab.load_kernel`.
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
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
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

    Raises:
      TangentlabError: if the file is missing, unreadable or not a tangentlab kernel.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TangentlabError(f"load_kernel: no such file {str(path)!r}.")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
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
    meta.pop("format", None)
    structure = meta.pop("structure", "full")  # files written before trace kernels: full
    return Kernel(
        f0=tensors["f0"],
        targets=tensors["targets"],
        theta=tensors.get("theta"),
        features=tensors.get("features"),
        jw0=tensors.get("jw0"),
        metadata=meta,
        structure=structure,
    )


def metadata_json(meta: dict[str, object]) -> str:
    """Canonical JSON of a metadata dict (sorted keys), used to compare cache requests."""
    return json.dumps(meta, sort_keys=True, default=str)

"""Seeded random projections of per-sample Jacobians, generated block by block.

A projection is a random matrix ``R`` of shape ``[P, k]`` with ``E[R R^T] = I``, so that
``Phi = J R`` gives an unbiased kernel estimate ``E[Phi Phi^T] = J J^T = Theta``. ``R`` is
never materialized whole: each parameter tensor (a "block" of P) gets its own rows of
``R``, generated from ``(seed, parameter name, piece)`` — the same rows whatever the
chunking over samples, the device or the order of computation.

NOTE [projection kinds]. Cost per Jacobian row (one output of one sample), P weights:

==============  ==========================  ========================================
kind            R entries                   cost per row
==============  ==========================  ========================================
``gaussian``    N(0, 1/k)                   P*k multiply-adds + P*k random numbers
``rademacher``  +-1/sqrt(k)                 P*k multiply-adds + P*k random numbers
``sparse``      one +-1 per row of R        P additions (count sketch, sparse JL);
                (count sketch)              hash and sign vectors cached once (P ints)
``tensor``      count sketch whose hash     as ``sparse`` from Jacobian rows; from a
                factorizes over the rows    layer's input u and output gradient g it is
                and columns of a weight     a circular convolution, computed by FFT in
                matrix (tensor sketch)      O(o + i + k log k) instead of O(o i)
==============  ==========================  ========================================

NOTE [tensor sketch]. For a weight of shape ``[o, *rest]`` (``i = prod(rest)``), entry
``(p, q)`` goes to bucket ``(h1[p] + h2[q]) mod k`` with sign ``s1[p] s2[q]`` (independent
hashes and signs per factor). Then the sketch of a per-sample gradient ``sum_s g_s u_s^T``
is ``irfft(sum_s rfft(CS1 g_s) * rfft(CS2 u_s))`` (Pham & Pagh, 2013:
https://doi.org/10.1145/2487575.2487591), and ``E[R R^T] = I`` still holds: two distinct
entries differ in ``p`` or in ``q``, so their sign product has mean 0. Weights with fewer
than 2 dimensions use the plain count sketch.

The dense kinds cost P*k per row and dominate on CPU for multi-million-weight models; the
count sketch is O(P) per row. All four have the same kernel error at the same k (relative
error ~ 1/sqrt(k); measured in benchmarks/RESULTS.md: EfficientNet-Lite0, 100 samples,
k=1024: 0.238 tensor, 0.246 sparse, 0.242 gaussian, 0.238 rademacher), so the default is
the fastest: the tensor sketch.

Reference: Woodruff, "Sketching as a Tool for Numerical Linear Algebra", 2014 (count sketch).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import torch

from tangentlab.errors import TangentlabError


class ProjectionKind(enum.StrEnum):
    """How the random projection matrix ``R`` ``[P, k]`` is drawn (see NOTE [projection kinds])."""

    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    SPARSE = "sparse"
    TENSOR = "tensor"


DEFAULT_KIND = ProjectionKind.TENSOR  # same error as sparse, faster (benchmarks/RESULTS.md)

# Dense kinds are generated in pieces of at most this many entries of R (64 MiB in float32),
# a constant so that the rows of R never depend on the memory budget.
_PIECE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Projection:
    """A seeded random projection to ``k`` dimensions.

    Args:
      k: projected dimension, ``k >= 1``.
      kind: ``"tensor"`` (tensor sketch, default), ``"sparse"`` (count sketch),
        ``"gaussian"`` or ``"rademacher"`` (NOTE [projection kinds]).
      seed: the projection's seed; the same seed gives the same ``R`` everywhere.
    """

    k: int
    kind: ProjectionKind = DEFAULT_KIND
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise TangentlabError(
                f"Projection: k must be a positive integer (got {self.k!r}). "
                "Use e.g. projection=1024, or projection=None for the exact kernel."
            )
        try:
            object.__setattr__(self, "kind", ProjectionKind(self.kind))
        except ValueError:
            kinds = ", ".join(repr(k.value) for k in ProjectionKind)
            raise TangentlabError(
                f"Projection: unknown kind {self.kind!r}; expected one of {kinds}."
            ) from None

    def describe(self) -> str:
        return f"{self.kind.value}:k={self.k}:seed={self.seed}"


def as_projection(projection: int | Projection | None, *, seed: int = 0) -> Projection | None:
    """Normalize the ``projection=`` argument: ``None``, ``k`` (an int) or a :class:`Projection`."""
    if projection is None or isinstance(projection, Projection):
        return projection
    if isinstance(projection, bool) or not isinstance(projection, int):
        raise TangentlabError(
            f"projection must be None, a positive int k or a tangentlab.Projection "
            f"(got {projection!r})."
        )
    return Projection(projection, seed=seed)


def _block_seed(seed: int, name: str, piece: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Projector:
    """Applies ``R`` block by block: ``project(blocks) = sum_n J_n @ R_n`` ``[M, k]``.

    ``blocks`` maps each trainable parameter name to its Jacobian rows ``[M, numel]``; the
    order of names does not matter. Sparse hash/sign vectors are cached per block (P ints);
    dense pieces of ``R`` are regenerated on every call (they would take P*k floats).
    """

    def __init__(
        self, projection: Projection, numels: dict[str, int], shapes: dict | None = None
    ) -> None:
        self.projection = projection
        self.numels = dict(numels)
        self.shapes = {n: tuple(s) for n, s in (shapes or {}).items()}
        self._sparse: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._factors: dict[tuple[str, torch.device], tuple[torch.Tensor, ...]] = {}

    @property
    def k(self) -> int:
        return self.projection.k

    def factored(self, name: str) -> bool:
        """Whether ``name`` uses the factorized (tensor sketch) hash (NOTE [tensor sketch])."""
        return self.projection.kind is ProjectionKind.TENSOR and len(self.shapes.get(name, ())) >= 2

    def factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(h1 [o], s1 [o], h2 [i], s2 [i])`` of a factorized weight ``[o, *rest]``."""
        key = (name, device)
        if key not in self._factors:
            shape = self.shapes[name]
            o = shape[0]
            i = self.numels[name] // o
            out = []
            for part, size in ((1, o), (2, i)):
                g = torch.Generator().manual_seed(_block_seed(self.projection.seed, name, part))
                h = torch.randint(0, self.k, (size,), generator=g)
                sg = torch.randint(0, 2, (size,), generator=g).mul_(2).sub_(1)
                out += [h.to(device), sg.to(device)]
            self._factors[key] = tuple(out)
        return self._factors[key]

    def _sparse_block(self, name: str, device: torch.device, dtype: torch.dtype):
        key = (name, device)
        if key not in self._sparse:
            if self.factored(name):
                h1, s1, h2, s2 = (t.cpu() for t in self.factors(name, torch.device("cpu")))
                buckets = ((h1[:, None] + h2[None, :]) % self.k).reshape(-1)
                signs = (s1[:, None] * s2[None, :]).reshape(-1)
            else:
                g = torch.Generator().manual_seed(_block_seed(self.projection.seed, name, 0))
                n = self.numels[name]
                buckets = torch.randint(0, self.k, (n,), generator=g)
                signs = torch.randint(0, 2, (n,), generator=g).mul_(2).sub_(1)
            self._sparse[key] = (buckets.to(device), signs.to(device))
        buckets, signs = self._sparse[key]
        return buckets, signs.to(dtype)

    def sparse_block(self, name: str, device: torch.device, dtype: torch.dtype):
        """``(buckets [numel], signs [numel])`` of ``name``'s count sketch (``out[:, h] +=
        s x``, as :meth:`project_block` applies it), or None for a dense projection."""
        if self.projection.kind not in (ProjectionKind.SPARSE, ProjectionKind.TENSOR):
            return None
        return self._sparse_block(name, device, dtype)

    def _dense_piece(self, name: str, piece: int, rows: int, dtype, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(_block_seed(self.projection.seed, name, piece))
        k = self.k
        if self.projection.kind is ProjectionKind.GAUSSIAN:
            r = torch.randn(rows, k, generator=g, dtype=torch.float32)
        else:
            r = torch.randint(0, 2, (rows, k), generator=g, dtype=torch.int8)
            r = r.to(torch.float32).mul_(2).sub_(1)
        # Scale 1/sqrt(k): each row of R then has E[|r|^2] = 1, so E[R R^T] = I.
        return r.mul_(k**-0.5).to(device=device, dtype=dtype)

    def project_block(self, name: str, jac: torch.Tensor, out: torch.Tensor) -> None:
        """Accumulate ``out += jac @ R_name``; ``jac`` ``[M, numel]``, ``out`` ``[M, k]``."""
        if self.projection.kind in (ProjectionKind.SPARSE, ProjectionKind.TENSOR):
            buckets, signs = self._sparse_block(name, jac.device, jac.dtype)
            out.index_add_(1, buckets, jac * signs)
            return
        n = jac.shape[1]
        rows_per_piece = max(1, _PIECE_ENTRIES // self.k)
        for piece, start in enumerate(range(0, n, rows_per_piece)):
            stop = min(n, start + rows_per_piece)
            r = self._dense_piece(name, piece, stop - start, jac.dtype, jac.device)
            out.addmm_(jac[:, start:stop], r)

    def matrix(self, names: list[str], dtype=torch.float64) -> torch.Tensor:
        """The whole ``R`` ``[P, k]`` (for tests on small models only)."""
        total = sum(self.numels[n] for n in names)
        eye = torch.eye(total, dtype=dtype)
        out = torch.zeros(total, self.k, dtype=dtype)
        offset = 0
        for n in names:
            m = self.numels[n]
            self.project_block(n, eye[:, offset : offset + m], out)
            offset += m
        return out

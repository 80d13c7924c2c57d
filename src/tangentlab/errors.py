"""Exceptions and warnings raised by tangentlab.

Every error names the function that raised it, what it received, what it expected and
how to fix it (STYLE.md, habit 7).
"""

from __future__ import annotations


class TangentlabError(ValueError):
    """Bad input or a request that cannot be served; the message says the fix."""


class CacheMismatchError(TangentlabError):
    """A cache file exists but was computed for a different request."""


class MemoryBudgetError(TangentlabError, MemoryError):
    """The requested computation cannot fit in the memory budget, even in one-sample chunks."""


class TangentlabWarning(UserWarning):
    """Base class of tangentlab's warnings."""


class ModeSwitchWarning(TangentlabWarning):
    """A model was switched to eval mode (batch-norm statistics frozen, dropout off)."""


class VmapFallbackWarning(TangentlabWarning):
    """``torch.func.vmap`` could not trace the model; a per-sample loop is used instead."""


class PositiveSpectrumWarning(TangentlabWarning):
    """A kernel had significantly negative eigenvalues (it should be positive semi-definite)."""


class ValidityWarning(TangentlabWarning):
    """A forecast falls outside the region where tangent-model forecasts were measured to hold."""


class CacheWarning(TangentlabWarning):
    """A cache file was damaged (unreadable or failing its checksum); it is discarded and its
    contents are recomputed."""

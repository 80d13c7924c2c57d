"""tangentlab: forecast fine-tuning of pre-trained PyTorch networks from their tangent model."""

from tangentlab._version import __version__
from tangentlab.compare import Comparison, compare
from tangentlab.compute import compute_kernel
from tangentlab.errors import (
    CacheMismatchError,
    MemoryBudgetError,
    TangentlabError,
    TangentlabWarning,
)
from tangentlab.extrapolate import Spectrum, extrapolate
from tangentlab.finetune import TrainingRun, finetune
from tangentlab.forecast import Forecast, forecast, sweep
from tangentlab.growth import KernelGrowth, estimate_growth, kernel_trace
from tangentlab.kernel import Kernel, load_kernel
from tangentlab.projection import Projection, ProjectionKind
from tangentlab.tangent import Tangent

__all__ = [
    "__version__",
    "CacheMismatchError",
    "Comparison",
    "Forecast",
    "Kernel",
    "KernelGrowth",
    "Projection",
    "Spectrum",
    "ProjectionKind",
    "Tangent",
    "compare",
    "compute_kernel",
    "estimate_growth",
    "extrapolate",
    "finetune",
    "forecast",
    "kernel_trace",
    "sweep",
    "MemoryBudgetError",
    "TangentlabError",
    "TangentlabWarning",
    "TrainingRun",
    "load_kernel",
]

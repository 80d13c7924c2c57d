"""tangentlab: forecast fine-tuning of pre-trained PyTorch networks from their tangent model."""

from tangentlab._version import __version__
from tangentlab.compare import Comparison, compare
from tangentlab.compute import compute_kernel
from tangentlab.decisions import choose_projection, stable_lr, subsample
from tangentlab.errors import (
    CacheMismatchError,
    CacheWarning,
    MemoryBudgetError,
    TangentlabError,
    TangentlabWarning,
)
from tangentlab.extrapolate import Spectrum, extrapolate
from tangentlab.finetune import TrainingRun, finetune
from tangentlab.forecast import Forecast, Sweep, default_target, forecast, sweep
from tangentlab.headbody import HeadBodyKernel, compute_head_body_kernel
from tangentlab.kernel import Kernel, load_kernel
from tangentlab.probes import TraceProbe, kernel_trace
from tangentlab.projection import Projection, ProjectionKind
from tangentlab.tangent import Tangent
from tangentlab.training import MSE, SGD, CrossEntropy

__all__ = [
    "__version__",
    "CacheMismatchError",
    "CacheWarning",
    "Comparison",
    "CrossEntropy",
    "Forecast",
    "HeadBodyKernel",
    "Kernel",
    "MSE",
    "MemoryBudgetError",
    "Projection",
    "ProjectionKind",
    "SGD",
    "Spectrum",
    "Sweep",
    "Tangent",
    "TangentlabError",
    "TangentlabWarning",
    "TraceProbe",
    "TrainingRun",
    "choose_projection",
    "compare",
    "compute_head_body_kernel",
    "compute_kernel",
    "default_target",
    "extrapolate",
    "finetune",
    "forecast",
    "kernel_trace",
    "load_kernel",
    "stable_lr",
    "subsample",
    "sweep",
]

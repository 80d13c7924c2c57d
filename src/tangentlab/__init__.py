"""tangentlab: forecast fine-tuning of pre-trained PyTorch networks from their tangent model."""

from tangentlab._version import __version__
from tangentlab.adam import (
    BlockKernel,
    WeightSpaceTangent,
    compute_block_kernel,
    compute_weight_space_tangent,
)
from tangentlab.adam_approx import (
    AdamBiasCorrection,
    Preconditioner,
    SignKernel,
    adam_as_sgd,
    compute_factored_kernel,
    compute_sign_kernel,
    estimate_preconditioner,
    forecast_signgd,
)
from tangentlab.compare import Comparison, compare
from tangentlab.compute import compute_kernel
from tangentlab.cross import CrossKernel, compute_cross_kernel
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
from tangentlab.forecast import (
    Forecast,
    LossInterval,
    StepsInterval,
    Sweep,
    default_target,
    forecast,
    sweep,
)
from tangentlab.headbody import (
    HeadBodyCross,
    HeadBodyKernel,
    Linearization,
    choose_linearization,
    compute_head_body_cross_kernel,
    compute_head_body_kernel,
)
from tangentlab.hybrid import Pilot, measure_pilot
from tangentlab.influence import Influence, influence, tracin_checkpoints
from tangentlab.information import SampleInformation, detection_curve, sample_information
from tangentlab.kernel import Kernel, load_kernel
from tangentlab.probes import TraceProbe, kernel_trace
from tangentlab.projection import Projection, ProjectionKind
from tangentlab.schedules import (
    Constant,
    Cosine,
    Join,
    LinearDecay,
    Schedule,
    StepDecay,
    Warmup,
    make_schedule,
)
from tangentlab.tangent import Tangent
from tangentlab.training import MSE, SGD, AdamW, CrossEntropy

__all__ = [
    "__version__",
    "AdamBiasCorrection",
    "AdamW",
    "BlockKernel",
    "CacheMismatchError",
    "CacheWarning",
    "Comparison",
    "Constant",
    "Cosine",
    "CrossEntropy",
    "CrossKernel",
    "Forecast",
    "HeadBodyKernel",
    "Influence",
    "Join",
    "Linearization",
    "Kernel",
    "LinearDecay",
    "MSE",
    "MemoryBudgetError",
    "Pilot",
    "Preconditioner",
    "Projection",
    "ProjectionKind",
    "SGD",
    "SampleInformation",
    "Schedule",
    "SignKernel",
    "Spectrum",
    "StepDecay",
    "LossInterval",
    "StepsInterval",
    "Sweep",
    "Tangent",
    "TangentlabError",
    "TangentlabWarning",
    "TraceProbe",
    "TrainingRun",
    "Warmup",
    "WeightSpaceTangent",
    "adam_as_sgd",
    "choose_linearization",
    "choose_projection",
    "compare",
    "compute_block_kernel",
    "compute_cross_kernel",
    "compute_factored_kernel",
    "compute_head_body_kernel",
    "compute_head_body_cross_kernel",
    "HeadBodyCross",
    "compute_kernel",
    "compute_sign_kernel",
    "compute_weight_space_tangent",
    "default_target",
    "detection_curve",
    "estimate_preconditioner",
    "extrapolate",
    "finetune",
    "forecast",
    "forecast_signgd",
    "influence",
    "kernel_trace",
    "load_kernel",
    "make_schedule",
    "measure_pilot",
    "sample_information",
    "stable_lr",
    "subsample",
    "sweep",
    "tracin_checkpoints",
]

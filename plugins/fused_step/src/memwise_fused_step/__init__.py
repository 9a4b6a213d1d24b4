"""memwise plugin: apply each parameter's optimizer update inside backward and free its gradient."""

from memwise_fused_step.fused import FusedStepOptimizer, fuse_step
from memwise_fused_step.plugin import FusedStepPlugin

__all__ = ["FusedStepOptimizer", "FusedStepPlugin", "fuse_step"]

"""COAT for memwise: FP8 optimizer states with Dynamic Range Expansion, and FP8 activations.

Importing this package is cheap: triton and the kernels load only when a step runs on CUDA.
"""

from memwise_coat.optimizer import CoatAdamW
from memwise_coat.plugin import CoatPlugin

__all__ = ["CoatAdamW", "CoatPlugin", "apply_fp8_activations", "remove_fp8_activations"]


def __getattr__(name: str):
    if name in ("apply_fp8_activations", "remove_fp8_activations"):
        from memwise_coat import activations

        return getattr(activations, name)
    raise AttributeError(f"module 'memwise_coat' has no attribute {name!r}")

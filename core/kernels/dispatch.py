"""Choose the triton kernel or the torch reference for a tensor."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the reference
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensor and triton present, or the interpreter on CPU: triton; else the reference."""
    if not triton_available():
        return False
    return t.is_cuda or (interpreting() and t.device.type == "cpu")

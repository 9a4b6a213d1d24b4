"""NF4 dequantization: the triton kernel on CUDA (or the interpreter), the torch reference elsewhere."""

from __future__ import annotations

import torch

from memwise.kernels.dispatch import use_triton
from memwise_loram.kernels.reference import dequantize_reference, scales_reference
from memwise_loram.nf4 import NF4Tensor

__all__ = ["dequantize", "dequantize_reference", "scales_reference"]


def dequantize(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of ``q`` in ``dtype``; triton is imported only when it runs."""
    if use_triton(q.payload):
        from memwise_loram.kernels.triton_nf4 import dequantize_triton

        return dequantize_triton(q, dtype)
    return dequantize_reference(q, dtype)

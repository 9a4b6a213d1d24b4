"""Torch reference of NF4 dequantization: the CPU path and the triton kernel's oracle."""

from __future__ import annotations

import torch

from memwise_loram.nf4 import NF4Tensor, codebook


def scales_reference(q: NF4Tensor) -> torch.Tensor:
    """The fp32 block absmax values (dequantizing them under double quantization)."""
    if q.dq_step is None:
        return q.absmax
    group = torch.arange(q.absmax.numel(), device=q.absmax.device) // q.dq_block
    return q.absmax.float() * q.dq_step[group] + q.dq_offset


def dequantize_reference(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference dequantizer (the CPU path and the triton kernel's oracle)."""
    hi = (q.payload >> 4).long()
    lo = (q.payload & 15).long()
    idx = torch.stack([hi, lo], 1).reshape(-1)
    values = codebook().to(q.payload.device)[idx]
    scale = scales_reference(q)
    out = (values.view(-1, q.block) * scale[:, None]).reshape(-1)[: q.numel]
    return out.to(dtype).view(q.shape)

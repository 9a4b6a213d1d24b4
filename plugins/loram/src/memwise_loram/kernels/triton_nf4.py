"""Triton NF4 dequantization kernel (the CUDA path; its oracle is ``kernels.reference.dequantize_reference``).

One program expands ``TILE`` values: it reads their packed bytes, picks the high or low
nibble, looks the level up in the codebook and multiplies by the block scale, which it
first dequantizes itself under double quantization (int8 * step + offset, in fp32, the
same operations as the reference). bf16 output is rounded onto the bf16 grid in fp32
before the cast (ties to even, as torch does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memwise_loram.nf4 import NF4Tensor, codebook


@triton.jit
def _dequant_kernel(payload_ptr, absmax_ptr, step_ptr, offset_ptr, code_ptr, out_ptr, n,
                    BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE: tl.constexpr, ROUND_BF16: tl.constexpr,
                    TILE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * TILE + tl.arange(0, TILE)
    mask = offs < n
    byte = tl.load(payload_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    blk = offs // BLOCK
    if DOUBLE:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.float32)
        step = tl.load(step_ptr + blk // DQ_BLOCK, mask=mask, other=0.0)
        offset = tl.load(offset_ptr)
        scale = q8 * step + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    value = level * scale
    if ROUND_BF16:
        value = _round_to_bf16_grid(value)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to_bf16_grid(x):
    """Round fp32 to the nearest bf16 value (ties to even), still in fp32, so the cast is exact.

    The interpreter's fp32 -> bf16 cast truncates; rounding first gives the same result as
    torch's cast on every backend.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def dequantize_triton(q: NF4Tensor, dtype: torch.dtype = torch.float32, tile: int = 1024) -> torch.Tensor:
    """Dequantize ``q`` with the triton kernel into a new tensor of ``dtype``."""
    n = q.numel
    out = torch.empty(n, dtype=dtype, device=q.payload.device)
    code = codebook().to(q.payload.device)
    double = q.dq_step is not None
    step = q.dq_step if double else code
    offset = q.dq_offset if double else code
    grid = (triton.cdiv(n, tile),)
    _dequant_kernel[grid](q.payload, q.absmax, step, offset, code, out, n,
                          BLOCK=q.block, DQ_BLOCK=q.dq_block, DOUBLE=double,
                          ROUND_BF16=dtype == torch.bfloat16, TILE=tile)
    return out.view(q.shape)

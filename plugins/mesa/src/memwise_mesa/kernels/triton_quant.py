"""Triton kernels of the 8-bit range quantizer (CUDA path; tested on CPU under TRITON_INTERPRET=1).

Same fp32 arithmetic as ``reference``; stochastic rounding draws ``tl.rand`` from a seed
taken from torch's global generator, so checkpointed RNG state reproduces it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, inv_scale_ptr, offset_ptr, n, seed, GROUPS: tl.constexpr, INNER: tl.constexpr,
                     LEVELS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = (offs // INNER) % GROUPS
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv_scale = tl.load(inv_scale_ptr + g, mask=mask, other=0.0)
    offset = tl.load(offset_ptr + g, mask=mask, other=0.0)
    y = (x - offset) * inv_scale
    if STOCHASTIC:
        y = y + tl.rand(seed, offs)
    else:
        y = y + 0.5
    y = tl.minimum(tl.maximum(tl.floor(y), 0.0), LEVELS)
    tl.store(q_ptr + offs, y.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, out_ptr, scale_ptr, offset_ptr, n, GROUPS: tl.constexpr, INNER: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = (offs // INNER) % GROUPS
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + g, mask=mask, other=0.0)
    offset = tl.load(offset_ptr + g, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (q * scale + offset).to(out_ptr.dtype.element_ty), mask=mask)


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
             levels: int = 255, stochastic: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 codes of contiguous ``x``; see ``reference.quantize``."""
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = x.numel()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()) if stochastic else 0
    grid = (triton.cdiv(n, BLOCK),)
    _quantize_kernel[grid](x, q, inv_scale.float().contiguous(), offset.float().contiguous(), n, seed,
                           GROUPS=groups, INNER=inner, LEVELS=float(levels), STOCHASTIC=stochastic, BLOCK=BLOCK)
    return q


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + offset`` per group in ``dtype``; see ``reference.dequantize``."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _dequantize_kernel[grid](q.contiguous(), out, scale.float().contiguous(), offset.float().contiguous(), n,
                             GROUPS=groups, INNER=inner, BLOCK=BLOCK)
    return out

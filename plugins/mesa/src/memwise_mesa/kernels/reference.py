"""Torch reference of the 8-bit range quantizer: the CPU path and the oracle of the triton kernels.

Both paths do the same fp32 arithmetic: ``y = (x - offset) * inv_scale``, then
``floor(y + u)`` with ``u ~ U[0, 1)`` (stochastic rounding, unbiased inside the range) or
``u = 0.5`` (round to nearest), clamped to ``[0, levels]`` so that values outside the
running range saturate instead of wrapping around in the byte. Work is done in chunks of
rows so the fp32 temporaries stay small next to the tensor being packed.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 20


def _chunks(outer: int, row: int) -> tuple[range, int]:
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    return range(0, outer, step), step


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
             levels: int = 255, stochastic: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 codes of ``x`` (contiguous, viewed as (outer, groups, inner)) with fp32 group ranges;
    stochastic rounding draws from ``generator`` (torch's default one when None)."""
    view = x.reshape(-1, groups, inner)
    q = torch.empty(view.shape, dtype=torch.uint8, device=x.device)
    offset = offset.float().reshape(1, groups, 1)
    inv_scale = inv_scale.float().reshape(1, groups, 1)
    starts, step = _chunks(view.shape[0], groups * inner)
    for start in starts:
        part = view[start:start + step]
        y = torch.sub(part.float(), offset)
        y.mul_(inv_scale)
        if stochastic:
            y.add_(torch.rand(y.shape, device=y.device, dtype=torch.float32, generator=generator))
        else:
            y.add_(0.5)
        # y >= 0 after the clamp, so the cast's truncation is the floor
        q[start:start + step].copy_(y.clamp_(0, levels))
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + offset`` per group, computed in fp32 and returned in ``dtype``."""
    view = q.reshape(-1, groups, inner)
    out = torch.empty(view.shape, dtype=dtype, device=q.device)
    scale = scale.float().reshape(1, groups, 1)
    offset = offset.float().reshape(1, groups, 1)
    starts, step = _chunks(view.shape[0], groups * inner)
    for start in starts:
        if dtype == torch.float32:
            torch.mul(view[start:start + step], scale, out=out[start:start + step]).add_(offset)
            continue
        y = torch.mul(view[start:start + step], scale)
        out[start:start + step].copy_(y.add_(offset))
    return out.reshape(q.shape)

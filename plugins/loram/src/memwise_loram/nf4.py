"""NF4: 4-bit NormalFloat storage of frozen weights (QLoRAM's base): the format and quantization.

Weights are cut into blocks of ``block`` values; each block stores its absmax (fp32) and
each value the index of the nearest of 16 levels that are quantiles of a standard normal
(so levels are dense where weights are), two indices per byte (even element in the high
nibble). Double quantization stores the absmax values themselves as int8 around their
mean, with one fp32 step per ``dq_block`` of them (symmetric linear 8-bit; bitsandbytes
uses a dynamic 8-bit map instead). Bytes = payload + scales, counted exactly by ``nbytes``.
Dequantization lives in ``memwise_loram.kernels`` (torch reference and triton kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_OFFSET = 0.9677083  # the outermost quantile: puts the levels ±1 at the 96.8% quantile


@functools.cache
def codebook() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending, with an exact zero (index 7).

    8 positive quantiles and 7 negative ones of N(0, 1) between 0.5 and the offset,
    so zero is represented exactly, normalised by the largest.
    """
    pos = torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.sort(torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])).values
    return (levels / levels.max()).to(torch.float32)


@dataclass
class NF4Tensor:
    """A weight in NF4: packed indices + block scales (+ double-quantized scales)."""

    payload: torch.Tensor  # uint8 [n_padded / 2]
    absmax: torch.Tensor  # fp32 [blocks], or int8 [blocks] with double quantization
    shape: tuple[int, ...]
    block: int = 64
    dq_step: torch.Tensor | None = None  # fp32 [ceil(blocks / dq_block)]
    dq_offset: torch.Tensor | None = None  # fp32 [1]
    dq_block: int = 256

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        """Stored bytes: payload + scales (+ second-level steps and offset)."""
        total = self.payload.numel() * self.payload.element_size() + self.absmax.numel() * self.absmax.element_size()
        for t in (self.dq_step, self.dq_offset):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def nf4_nbytes(numel: int, block: int = 64, double_quant: bool = False, dq_block: int = 256) -> int:
    """Closed form of ``NF4Tensor.nbytes`` for a weight of ``numel`` values."""
    blocks = -(-numel // block)
    payload = blocks * block // 2
    if not double_quant:
        return payload + 4 * blocks
    return payload + blocks + 4 * -(-blocks // dq_block) + 4


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block: int = 64, double_quant: bool = False, dq_block: int = 256) -> NF4Tensor:
    """Quantize ``weight`` to NF4 (any shape; padded with zeros to whole blocks)."""
    if block % 2:
        raise ValueError(f"block must be even, got {block}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / safe[:, None]).reshape(-1)
    code = codebook().to(flat.device)
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    payload = (idx[0::2] << 4) | idx[1::2]
    q = NF4Tensor(payload, absmax, tuple(weight.shape), block, dq_block=dq_block)
    if double_quant:
        offset = absmax.mean().reshape(1)
        centred = absmax - offset
        pad2 = (-centred.numel()) % dq_block
        groups = torch.cat([centred, centred.new_zeros(pad2)]).view(-1, dq_block)
        step = groups.abs().amax(1) / 127.0
        safe_step = torch.where(step > 0, step, torch.ones_like(step))
        q8 = torch.round(groups / safe_step[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: absmax.numel()].clone()
        q.absmax, q.dq_step, q.dq_offset = q8, step, offset
    return q

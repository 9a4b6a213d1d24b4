"""Per-group FP8 with Dynamic Range Expansion: the torch reference (CPU path, test oracle).

A group x of ``group_size`` values is stored as FP8 codes q and, per group, a scale s, an
expansion exponent k and a centre c:  y = sign(x)|x/c|^k,  q = fp8(y/s),  x ~ sign(q)|q s|^(1/k) c.
k stretches the group's dynamic range R = max|x| / min-nonzero|x| to fill the FP8 range, so small
moments keep relative precision. Every step is written so the triton kernel can mirror it
operation by operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from memwise.kernels.fp8 import FP8Format, fp8_format, round_to_grid


MIN_EXPANSION = 1 / 16
"""Default floor of k: one step of its 1/16 grid. k < 1 compresses a group whose range exceeds
Q^2/2 (as the paper does); flooring k at 1 instead lets wide second moments lose every small value."""


@dataclass(frozen=True)
class MomentCodec:
    """How one optimizer moment is stored."""

    fmt: FP8Format
    group_size: int = 128
    expansion: bool = True
    min_expansion: float = MIN_EXPANSION

    @property
    def log_range(self) -> float:
        """log2(Q^2 / 2): the dynamic range an expanded group may span (Q the format's maximum)."""
        return math.log2(self.fmt.max_value**2 / 2)

    @property
    def smallest(self) -> float:
        """The format's smallest positive (subnormal) value."""
        return 2.0 ** (self.fmt.min_normal_exp - self.fmt.mantissa_bits)

    def num_groups(self, numel: int) -> int:
        return -(-numel // self.group_size)

    def metadata_keys(self) -> tuple[str, ...]:
        return ("scale", "expand", "centre") if self.expansion else ("scale",)

    def nbytes(self, numel: int) -> int:
        """Payload plus per-group metadata (fp32 each), exactly as stored."""
        return numel + 4 * len(self.metadata_keys()) * self.num_groups(numel)


def codec(fmt: str = "e4m3", group_size: int = 128, expansion: bool = True,
          min_expansion: float = MIN_EXPANSION) -> MomentCodec:
    return MomentCodec(fp8_format(fmt), group_size, expansion, min_expansion)


def expansion_exponent(ratio: torch.Tensor, log_range: float, min_expansion: float = MIN_EXPANSION) -> torch.Tensor:
    """k = floor(log_range / log2(R) * 16) / 16, at least ``min_expansion`` (k < 1 for R > 2^log_range);
    R == 1 gives 1."""
    log_r = torch.log2(ratio)
    k = torch.floor(log_range / log_r * 16.0) / 16.0
    k = torch.where(log_r > 0, k, torch.ones_like(k))
    return k.clamp(min=min_expansion)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, group_size)


def quantize_groups(x: torch.Tensor, c: MomentCodec) -> dict[str, torch.Tensor]:
    """FP8 codes (shape of ``x``) and per-group metadata; zeros of padding never count."""
    g = _grouped(x, c.group_size)
    a = g.abs()
    big = a.amax(dim=1)
    small = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(dim=1)
    nonzero = big > 0
    flat = small == big  # every non-zero magnitude equal: stored exactly as +-1
    one = torch.ones_like(big)
    if c.expansion:
        k = expansion_exponent(big / small, c.log_range, c.min_expansion)
        k = torch.where(nonzero, k, one)
        centre = torch.where(flat, big, torch.sqrt(big) * torch.sqrt(small))
        centre = torch.where(nonzero, centre, one)
        y = torch.sign(g) * torch.exp2(k[:, None] * torch.log2(a / centre[:, None]))
        scale = y.abs().amax(dim=1) / c.fmt.max_value
        scale = torch.where(nonzero & ~flat, scale, one)
        meta = {"scale": scale, "expand": k, "centre": centre}
    else:
        y = g
        scale = torch.where(flat, big, big / c.fmt.max_value)
        scale = torch.where(nonzero, scale, one)
        meta = {"scale": scale}
    r = y / scale[:, None]
    r = torch.where(r == 0, r, torch.copysign(r.abs().clamp(min=c.smallest), r))  # non-zeros stay non-zero
    q = round_to_grid(r, c.fmt).to(c.fmt.dtype)
    meta["q"] = q.view(-1)[: x.numel()].view(x.shape)
    return meta


def dequantize_groups(q: torch.Tensor, meta: dict[str, torch.Tensor], c: MomentCodec) -> torch.Tensor:
    """fp32 values of codes ``q`` (shape kept)."""
    g = _grouped(q, c.group_size)
    ys = g * meta["scale"][:, None]
    if c.expansion:
        x = torch.sign(ys) * torch.exp2(torch.log2(ys.abs()) / meta["expand"][:, None]) * meta["centre"][:, None]
    else:
        x = ys
    return x.view(-1)[: q.numel()].view(q.shape)

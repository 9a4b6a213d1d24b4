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
from memwise.kernels.fp8 import FP8Format, as_float16, decode, fp8_format


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
    """``x`` flat as fp32 rows of ``group_size`` (zero padded); a view of ``x`` when no copy is needed."""
    return _rows(decode(x) if x.dtype in _FP8 else x.float(), group_size)


def _rows(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, group_size)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _least_nonzero(a: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Each row's smallest non-zero value of non-negative ``a`` (+inf for a row of zeros).

    Non-negative floats order as their int32 bit patterns; bits - 1 sends 0 to -1, which the mask
    0x7FFFFFFF turns into the largest pattern, so one integer minimum skips the zeros.
    """
    bits = torch.sub(a.view(torch.int32), 1, out=work.view(torch.int32)).bitwise_and_(0x7FFFFFFF)
    least = bits.amin(dim=1)
    least = torch.where(least == 0x7FFFFFFF, 0x7F7FFFFF, least)  # a row of zeros: +inf
    return least.add_(1).view(torch.float32)


def quantize_groups(x: torch.Tensor, c: MomentCodec, out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """FP8 codes (shape of ``x``; written into ``out`` when given) and per-group metadata; zeros of
    padding never count.

    Per element: y = sign(x) 2^(k log2|x/c|), r = y / s, |r| raised to the format's smallest
    value unless it is 0, then the saturating FP8 cast (torch's cast rounds as
    ``round_to_grid`` does). Written with few full-size temporaries, updated in place.
    """
    g = _grouped(x, c.group_size)
    a = g.abs()
    big = a.amax(dim=1)
    nonzero = big > 0
    small = _least_nonzero(a, work := torch.empty_like(a))
    flat = small == big  # every non-zero magnitude equal: stored exactly as +-1
    one = torch.ones_like(big)
    if c.expansion:
        k = expansion_exponent(big / small, c.log_range, c.min_expansion)
        k = torch.where(nonzero, k, one)
        centre = torch.where(flat, big, torch.sqrt(big) * torch.sqrt(small))
        centre = torch.where(nonzero, centre, one)
        mag = torch.div(a, centre[:, None], out=work).log2_().mul_(k[:, None]).exp2_()  # |y|
        scale = mag.amax(dim=1) / c.fmt.max_value
        scale = torch.where(nonzero & ~flat, scale, one)
        # |r| of each group's smallest non-zero, by the same operations as its element
        least = torch.exp2(torch.log2(small / centre) * k) / scale
        meta = {"scale": scale, "expand": k, "centre": centre}
    else:
        scale = torch.where(flat, big, big / c.fmt.max_value)
        scale = torch.where(nonzero, scale, one)
        mag = torch.abs(g, out=work)
        least = small / scale
        meta = {"scale": scale}
    mag.div_(scale[:, None])  # |r|
    if bool((least[nonzero] > _FAR_FROM_ZERO).all()):
        # |r| is 0 exactly where x is (log2, exp2 and division are monotonic): raise every |r| to
        # the smallest value, then multiply by sign(x), which is 0 there
        mag.clamp_(c.smallest, c.fmt.max_value)
        r = mag.mul_(torch.sign(g, out=a)) if c.expansion else torch.copysign(mag, g, out=mag).mul_(g != 0)
    else:  # some |r| underflows to 0 although x does not: it stays 0
        zero = mag == 0
        mag.clamp_(c.smallest, c.fmt.max_value).masked_fill_(zero, 0.0)
        r = mag.mul_(torch.sign(g, out=a)) if c.expansion else torch.copysign(mag, g, out=mag)
    # in expansion mode y = sign(x) |y| is +0 for x = -0; the plain mode's y = x keeps a zero's sign
    n = x.numel()
    if out is not None:
        out.view(-1).copy_(r.view(-1)[:n])
        meta["q"] = out
    else:
        meta["q"] = r.to(c.fmt.dtype).view(-1)[:n].view(x.shape)
    return meta


_FAR_FROM_ZERO = 2.0**-100
"""A group whose smallest non-zero |r| exceeds this has no non-zero |r| that rounds to 0."""


def dequantize_groups(q: torch.Tensor, meta: dict[str, torch.Tensor], c: MomentCodec) -> torch.Tensor:
    """fp32 values of codes ``q`` (shape kept): sign(ys) 2^(log2|ys| / k) c with ys = q s."""
    if q.dtype in _FP8:
        # h * (f scale) and (h f) * scale are the same product rounded once while f scale is finite
        half, factor = as_float16(q)
        scale = meta["scale"] * factor
        if factor != 1.0 and bool(scale.isinf().any()):
            ys = _rows(half.float().mul_(factor), c.group_size).mul_(meta["scale"][:, None])
        else:
            ys = _rows(half.float(), c.group_size).mul_(scale[:, None])
    else:
        ys = _grouped(q, c.group_size) * meta["scale"][:, None]
    if c.expansion:
        x = ys.abs().log2_().div_(meta["expand"][:, None]).exp2_()
        x = ys.sign_().mul_(x).mul_(meta["centre"][:, None])
    else:
        x = ys
    return x.view(-1)[: q.numel()].view(q.shape)

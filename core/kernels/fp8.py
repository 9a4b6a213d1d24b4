"""FP8 grids in fp32: round onto the E4M3/E5M2 grid first, then the cast is exact.

Rounding in fp32 ourselves sidesteps the triton interpreter's FP8 cast defect (values whose
rounding carries into the next power of two) and gives one rounding rule on every path:
round half to even, saturate at the format's maximum, keep the sign of zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FP8Format:
    """What a kernel needs to know of an FP8 format."""

    name: str
    dtype: torch.dtype
    mantissa_bits: int
    min_normal_exp: int
    max_value: float


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 3, -6, 448.0)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 2, -14, 57344.0)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def fp8_format(name: str) -> FP8Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown FP8 format '{name}'; use one of {', '.join(FORMATS)}") from None


def round_to_grid(x: torch.Tensor, fmt: FP8Format = E4M3) -> torch.Tensor:
    """fp32 values of ``x`` rounded to the nearest ``fmt`` value (ties to even, saturating)."""
    x = x.float()
    mag = x.abs().clamp(max=fmt.max_value)
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, m in [0.5, 1)
    e = (exp - 1).clamp(min=fmt.min_normal_exp)
    step = torch.ldexp(torch.ones_like(mag), (e - fmt.mantissa_bits).to(torch.int32))
    rounded = torch.round(mag / step) * step  # torch.round is half-to-even
    rounded = rounded.clamp(max=fmt.max_value)
    return torch.copysign(rounded, x)


def quantize(x: torch.Tensor, fmt: FP8Format = E4M3) -> torch.Tensor:
    """``x`` as an FP8 tensor, rounded as :func:`round_to_grid` rounds (saturating).

    torch's own cast rounds within range exactly as the grid does (tests check ties, subnormals
    and signed zeros), so the torch path casts after one clamp: two passes instead of ten, which
    matters when a KV cache encodes one token per layer per decoded token.
    """
    return x.float().clamp(-fmt.max_value, fmt.max_value).to(fmt.dtype)


_E4M3_IN_FP16 = 0xBF80 - 0x10000  # int16 mask: bit 15 (sign) and bits 7..13 (exponent, mantissa)
FLOAT16_PLACEMENT = {torch.float8_e4m3fn: (7, _E4M3_IN_FP16, 256.0), torch.float8_e5m2: (8, -1, 1.0)}
"""Per FP8 format: the left shift and int16 mask that place a code (read as int8) into float16's
fields, and the power of two between that float16 and the code's value (see :func:`as_float16`;
compiled kernels that widen codes themselves take the same three numbers)."""


def decode(q: torch.Tensor) -> torch.Tensor:
    """fp32 values of an FP8 tensor, exactly ``q.float()``, through float16 bit patterns.

    torch's own FP8 -> fp32 conversion is elementwise scalar code on CPU (tens of ns per value);
    every FP8 value is exactly a float16 (see :func:`as_float16`), and float16 -> fp32 is a
    vectorised cast.
    """
    half, factor = as_float16(q)
    out = half.float()
    return out.mul_(factor) if factor != 1.0 else out


def as_float16(q: torch.Tensor, finite: bool = False) -> tuple[torch.Tensor, float]:
    """``(h, f)`` with ``q``'s values equal to ``h * f`` exactly: ``h`` float16, ``f`` a power of two.

    Read as int8 a code sign-extends into int16. E5M2 is float16's top byte: times 2^8 (f = 1).
    E4M3 s.eeee.mmm times 2^7 lands as s.s.eeee.mmm0000000, and clearing bit 14 leaves the float16
    s.0eeee.mmm0000000, the same value times 2^-8 (normal and subnormal alike; f = 256). The
    shifts are in-place multiplies (torch's in-place shift copies). E4M3's NaN codes become NaN,
    unless the caller knows there are none (``finite``: one reduction fewer, for KV caches that
    decode every step).
    """
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"decode takes float8_e4m3fn or float8_e5m2, not {q.dtype}")
    shift, mask, factor = FLOAT16_PLACEMENT[q.dtype]
    bits = q.view(torch.int8).to(torch.int16).mul_(1 << shift)
    if q.dtype == torch.float8_e5m2:
        return bits.view(torch.float16), factor
    half = bits.bitwise_and_(mask).view(torch.float16)
    if not finite and q.numel() and q.view(torch.uint8).bitwise_and(0x7F).max() == 0x7F:
        half.masked_fill_(q.view(torch.uint8).bitwise_and(0x7F) == 0x7F, float("nan"))
    return half, factor

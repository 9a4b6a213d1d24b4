"""Triton device functions for FP8 grid rounding, shared by the plugins' kernels.

Imported only by kernel modules; it imports triton.
"""

import triton
import triton.language as tl


@triton.jit
def round_half_even(y):
    """Round non-negative fp32 ``y`` (below 2**23) to the nearest integer, ties to even."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def round_to_grid(x, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, MAX_VALUE: tl.constexpr):
    """fp32 ``x`` rounded onto an FP8 grid in fp32 (saturating, sign of zero kept)."""
    mag = tl.minimum(tl.abs(x), MAX_VALUE)
    bits = mag.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_NORMAL_EXP)
    step = ((e - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    r = round_half_even(mag / step) * step
    r = tl.minimum(r, MAX_VALUE)
    return tl.where(x < 0, -r, tl.where(x == 0, x, r))

"""FP8 rows with one bf16 scale per token.

The scale is rounded up to bf16 (same range as fp32, half the bytes), so scaled rows never
exceed the format's maximum and the stored scale is exactly the one used to encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memwise.kernels.fp8 import fp8_format, quantize
from memwise_kvprune.rows import BF16_TINY, QuantRows, bf16_ceil

_E4M3_IN_FP16 = 0xBF80 - 0x10000  # int16 mask: the sign bit and the 7 magnitude bits shifted to bits 7..13


@dataclass
class FP8Rows(QuantRows):
    """``payload * scale`` approximates the stored rows; payload [..., T, C] fp8, scale [..., T, 1] bf16."""

    @classmethod
    def encode(cls, x: torch.Tensor, fmt_name: str) -> FP8Rows:
        """Scale each row (last dim) to the format's maximum, round onto the grid in fp32, cast.

        Decoding encodes one token per layer per step, so this is written in few passes.
        """
        fmt = fp8_format(fmt_name)
        x32 = x.float()
        scale = bf16_ceil(x32.abs().amax(dim=-1, keepdim=True).div_(fmt.max_value).clamp_(min=BF16_TINY))
        return cls(quantize(x32 / scale, fmt), scale.to(torch.bfloat16))

    def widen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, scale)`` with ``rows * scale`` equal to :meth:`decode`, cheaply, for attention to fold
        ``scale`` [..., T] (fp32) into its scores and probabilities instead of scaling every element.

        An FP8 code's bits, shifted into a float16's sign, exponent and mantissa fields, are that
        number times 2^(bias_fp16 - bias_fp8) (subnormals included: both formats' subnormals scale
        alike), and float16 widens to fp32 in one vectorized pass; the power of two goes into
        ``scale``. Read as int8 the code sign-extends, so one shift (an in-place multiply: torch's
        in-place shift copies) and, for e4m3, one mask place it.
        The rows stay near 1 in magnitude: an fp32 placement would leave them near 2^-120, where
        products with the probabilities fall into slow subnormal arithmetic. torch's own FP8 cast
        is about 8x slower than these passes.
        """
        if self.payload.dtype == torch.float8_e4m3fn:
            bits = self.payload.view(torch.int8).to(torch.int16).mul_(1 << 7).bitwise_and_(_E4M3_IN_FP16)
            power = 2.0 ** 8
        else:  # e5m2 is the top byte of a float16
            bits = self.payload.view(torch.int8).to(torch.int16).mul_(1 << 8)
            power = 1.0
        return bits.view(torch.float16).to(dtype), self.scale.squeeze(-1).float() * power

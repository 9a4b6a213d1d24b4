"""FP8 rows with one bf16 scale per token (and part, when a row holds a key and a value).

The scale is rounded up to bf16 (same range as fp32, half the bytes), so scaled rows never
exceed the format's maximum and the stored scale is exactly the one used to encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memwise.kernels.fp8 import as_float16, fp8_format, quantize
from memwise_kvprune.rows import BF16_TINY, QuantRows, bf16_ceil


@dataclass
class FP8Rows(QuantRows):
    """``payload * scale`` approximates the stored rows; payload [..., T, C] fp8, scale [..., T, parts] bf16."""

    @classmethod
    def encode(cls, x: torch.Tensor, fmt_name: str, parts: int = 1) -> FP8Rows:
        """Scale each part of each row to the format's maximum, round onto the grid in fp32, cast.

        Decoding encodes one token per layer per step, so this is written in few passes.
        """
        fmt = fp8_format(fmt_name)
        x32 = x.float().unflatten(-1, (parts, -1))
        scale = bf16_ceil(x32.abs().amax(dim=-1, keepdim=True).div_(fmt.max_value).clamp_(min=BF16_TINY))
        return cls(quantize(x32 / scale, fmt).flatten(-2), scale.squeeze(-1).to(torch.bfloat16), parts)

    def widen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, scale)`` with each part times its scale equal to :meth:`decode`, cheaply, for attention
        to fold ``scale`` [..., T, parts] (fp32) into its scores and probabilities instead of scaling every
        element.

        The codes become float16 bit patterns (:func:`memwise.kernels.fp8.as_float16`; a cache holds
        no NaN codes, encoding clamps), then fp32 in one vectorized cast; the power of two between
        them goes into ``scale``. The rows stay near 1 in magnitude: a placement straight into fp32's
        fields would leave them near 2^-120, where products with the probabilities fall into slow
        subnormal arithmetic. torch's own FP8 cast is about 8x slower.
        """
        half, factor = as_float16(self.payload, finite=True)
        return half.to(dtype), self.scale.float().mul_(factor)

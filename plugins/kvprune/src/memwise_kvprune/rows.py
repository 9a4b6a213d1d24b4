"""Quantized token rows: the part every storage format shares (appending, byte count).

A format stores ``payload`` [..., T, C'] (one byte an element, or two elements a byte) and
``scale`` [..., T, groups] (bf16); ``widen`` gives attention ``(rows, scale)`` where
``rows * scale[..., None]`` is the decoded tensor, or ``(decoded rows, None)`` when the scale
cannot be folded into the scores (several groups a row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

BF16_TINY = torch.finfo(torch.bfloat16).tiny


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= ``x`` (positive, finite fp32), as fp32, in place: round the low 16 bits up.

    Scales rounded up never push a scaled element past the format's largest code.
    """
    return x.view(torch.int32).add_(0xFFFF).bitwise_and_(-0x10000).view(torch.float32)


@dataclass
class QuantRows:
    """Rows of one storage format; appendable, since a new token never rescales the past."""

    payload: torch.Tensor
    scale: torch.Tensor

    def widen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored tensor, as the attention reads it (the reference for ``widen``)."""
        rows, scale = self.widen(torch.float32)
        return (rows if scale is None else rows * scale[..., None]).to(dtype)

    def cat(self, other: QuantRows) -> QuantRows:
        """Append ``other``'s tokens (dim -2); concatenated through uint8 views (torch cannot cat fp8)."""
        payload = torch.cat([self.payload.view(torch.uint8), other.payload.view(torch.uint8)], dim=-2)
        return dataclasses.replace(self, payload=payload.view(self.payload.dtype),
                                   scale=torch.cat([self.scale, other.scale], dim=-2))

    def tokens(self) -> int:
        return self.payload.shape[-2]

    def nbytes(self) -> int:
        """Payload plus scales."""
        return self.payload.numel() * self.payload.element_size() + self.scale.numel() * self.scale.element_size()

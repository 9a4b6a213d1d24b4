"""Quantized token rows: the part every storage format shares (appending, byte count).

A format stores ``payload`` [..., T, C'] (one byte an element, or two elements a byte) and
``scale`` [..., T, groups] (bf16). A row may hold ``parts`` equal-width tensors side by side
(a token's key and value, so that decoding encodes, appends and widens once per layer);
``read`` gives attention each part as ``(rows, scale)`` with ``rows * scale[..., None]`` the
decoded part, or ``(decoded rows, None)`` when a part has several scale groups, which cannot be
folded into the scores.
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
    parts: int = 1

    def widen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rows [..., T, C], scale [..., T, parts] fp32)``, or ``(decoded rows, None)``."""
        raise NotImplementedError

    def read(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each part as ``(rows [..., T, C / parts], scale [..., T] or None)``: views of one widening."""
        rows, scale = self.widen(dtype)
        width = rows.shape[-1] // self.parts
        return [(rows[..., i * width:(i + 1) * width], None if scale is None else scale[..., i])
                for i in range(self.parts)]

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored tensor, as the attention reads it (the reference for ``read``)."""
        rows, scale = self.widen(torch.float32)
        if scale is not None:
            rows = (rows.unflatten(-1, (self.parts, -1)) * scale[..., None]).flatten(-2)
        return rows.to(dtype)

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

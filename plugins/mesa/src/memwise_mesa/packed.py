"""An activation saved for backward in 8 bits: payload plus the ranges it was packed with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedTensor:
    """``payload`` (uint8, contiguous, the original shape) with per-group ``scale`` and ``offset``.

    ``scale`` is alpha / levels and ``offset`` beta, both fp32 snapshots taken at packing
    time (the running ranges may move before backward, for example under gradient
    accumulation). ``groups`` and ``inner`` describe the (outer, groups, inner) view;
    ``transposed`` payloads hold a [B, H, N, D] tensor in [B, N, H, D] order.
    """

    payload: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    groups: int
    inner: int
    dtype: torch.dtype
    transposed: bool = False

    def nbytes(self) -> int:
        """Payload + scales + offsets, in bytes."""
        return (self.payload.numel() * self.payload.element_size()
                + self.scale.numel() * self.scale.element_size()
                + self.offset.numel() * self.offset.element_size())

    @property
    def shape(self) -> torch.Size:
        return self.payload.transpose(1, 2).shape if self.transposed else self.payload.shape

"""4-bit rows: symmetric integer codes -7..7, two a byte, one bf16 scale per token and group of channels.

Per-token scales (as KIVI quantizes values) keep the rows appendable: a decoded token is
encoded alone. With one group a part the scale folds into the attention scores as FP8's
does; with several, ``widen`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memwise_kvprune.rows import BF16_TINY, QuantRows, bf16_ceil

LEVELS = 7  # codes -7..7, stored offset by 8 (a nibble 1..15; 8 is zero)


@dataclass
class Int4Rows(QuantRows):
    """payload [..., T, ceil(C / 2)] uint8 (element 2i in the low nibble), scale [..., T, groups] bf16."""

    width: int = 0

    @classmethod
    def encode(cls, x: torch.Tensor, groups: int, parts: int = 1) -> Int4Rows:
        """Round ``x / scale`` to the nearest code, ``groups`` equal scale groups a row (a multiple of
        ``parts``); each group's scale is its absolute maximum / 7, rounded up to bf16 so no code overflows."""
        x32 = x.float()
        *lead, t, width = x32.shape
        grouped = x32.reshape(*lead, t, groups, -1)
        scale = bf16_ceil(grouped.abs().amax(dim=-1, keepdim=True).div_(LEVELS).clamp_(min=BF16_TINY))
        codes = grouped.div(scale).round_().add_(LEVELS + 1).to(torch.uint8).reshape(*lead, t, width)
        if width % 2:
            codes = F.pad(codes, (0, 1), value=LEVELS + 1)
        payload = codes[..., 0::2] | codes[..., 1::2].mul(16)
        return cls(payload, scale.squeeze(-1).to(torch.bfloat16), parts, width)

    def widen(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes, scale [..., T, parts])`` with one group a part; ``(decoded rows, None)`` with several."""
        p = self.payload
        codes = torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)[..., :self.width]
        rows = codes.to(torch.float32).sub_(LEVELS + 1)
        groups = self.scale.shape[-1]
        if groups == self.parts:
            return rows.to(dtype), self.scale.float()
        rows = rows.unflatten(-1, (groups, -1)).mul_(self.scale.float().unsqueeze(-1)).flatten(-2)
        return rows.to(dtype), None

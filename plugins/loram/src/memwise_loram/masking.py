"""Unstructured (Wanda) and semi-structured (2:4) pruning: weights masked in place.

Shapes stay the same, as in the paper's non-structured LoRAM variants: the saving is
in what sparse storage or kernels can exploit, and recovery needs no index expansion.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, norms: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """Keep-mask of Wanda: per output row, drop the ``ratio`` share with the lowest |W_ij|*||X_j||.

    Without activation norms the score is |W_ij| (magnitude pruning).
    """
    score = weight.detach().float().abs()
    if norms is not None:
        score = score * norms.float().unsqueeze(0)
    drop = int(weight.shape[1] * ratio)
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop > 0:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :drop]
        mask.scatter_(1, idx, False)
    return mask


@torch.no_grad()
def two_four_mask(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Keep-mask with exactly 2 of every 4 consecutive input weights kept per row (Wanda score)."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got {in_f}")
    score = weight.detach().float().abs()
    if norms is not None:
        score = score * norms.float().unsqueeze(0)
    groups = score.view(out_f, in_f // 4, 4)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :2]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.view(out_f, in_f)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> int:
    """Zero the masked weights of ``linear`` in place; return how many were zeroed."""
    before = int((linear.weight != 0).sum())
    linear.weight.mul_(mask.to(linear.weight.dtype))
    return before - int((linear.weight != 0).sum())

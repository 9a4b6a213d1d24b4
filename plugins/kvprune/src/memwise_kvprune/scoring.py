"""Scores computed once at prefill: ThinK key channels, SnapKV and StreamingLLM tokens.

Shapes: queries [B, H, G, S, D] (H KV heads, G query heads per group), keys [B, H, L, D],
``valid`` [B, L] (False on left padding). Query heads of a group share one choice, so
grouped-query attention keeps its saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ThinK: mean over window queries (and the group) of q^2 times mean over valid tokens of k^2: [B, H, D].

    ``valid`` is [B, H, L] here (after eviction each head keeps its own tokens).
    """
    q2 = queries.float().pow(2).mean(dim=(2, 3))
    w = valid.to(torch.float32)[..., None]
    k2 = (keys.float().pow(2) * w).sum(dim=2) / w.sum(dim=2).clamp(min=1.0)
    return q2 * k2


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` best channels per head, ascending, in the smallest integer type."""
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    dim = scores.shape[-1]
    dtype = torch.uint8 if dim <= 256 else torch.int16 if dim <= 32767 else torch.int32
    return idx.to(dtype)


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float,
                  kernel: int) -> torch.Tensor:
    """Attention of the observation window to every key, summed over window and group, pooled: [B, H, L].

    ``visible`` [B, 1 or H, S, L] says which keys each window query may attend to.
    """
    logits = torch.einsum("bhgsd,bhld->bhgsl", queries.float(), keys.float()) * scaling
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    votes = logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=(2, 3))
    if kernel > 1:
        b, h, l = votes.shape
        votes = F.avg_pool1d(votes.reshape(b * h, 1, l), kernel, stride=1, padding=kernel // 2,
                             count_include_pad=False).reshape(b, h, l)
    return votes


def sink_mask(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """The first ``sinks`` non-pad tokens of each row: [B, L] bool."""
    return valid & (valid.long().cumsum(-1) <= sinks)


def streaming_scores(valid: torch.Tensor, heads: int, sinks: int) -> torch.Tensor:
    """Sinks (the first ``sinks`` non-pad tokens of each row) first, then recency: [B, H, L]."""
    length = valid.shape[-1]
    recency = torch.arange(length, device=valid.device, dtype=torch.float32) / max(length, 1)
    score = recency.expand_as(valid).clone()
    score = torch.where(sink_mask(valid, sinks), torch.full_like(score, 2.0), score)
    return score[:, None, :].expand(-1, heads, -1)


def with_sinks(scores: torch.Tensor, valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """``scores`` [B, H, L] with the first ``sinks`` real tokens of each row ranked above every other."""
    return scores.masked_fill(sink_mask(valid, sinks)[:, None, :], float("inf"))


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, keep: int, always_last: int) -> torch.Tensor:
    """Positions of the ``keep`` best tokens per head, ascending; the last ``always_last`` are always kept
    and padding only when a row has too few real tokens: [B, H, keep] int64."""
    length = scores.shape[-1]
    s = scores.float().clone()
    if always_last > 0:
        s[..., length - always_last:] = float("inf")
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return s.topk(keep, dim=-1).indices.sort(dim=-1).values

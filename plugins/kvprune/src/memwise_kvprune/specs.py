"""What to prune: plain settings for ThinK, token eviction and quantized storage (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ThinK:
    """Key-channel pruning: keep the top ``1 - ratio`` channels per KV head, scored at prefill.

    The prompt's keys are all pruned by default (``window=0``); decoded tokens' keys stay full
    width, and with ``fold_every > 0`` the oldest ``fold_every`` of them are pruned once the
    full-width window holds ``window + fold_every``, so long generations save memory too.
    ThinK's authors keep the last 32 prompt tokens full width; on SmolLM2-135M that window
    pulled attention toward the question and cost retrieval when composed with eviction
    (docs/plugins/kvprune.md), so it is opt-in. A prompt no longer than ``observe`` is not
    pruned: its channel statistics are a handful of tokens, the saving is nil, and on the
    real model pruning one changed the answer.
    """

    ratio: float = 0.5
    window: int = 0
    observe: int = 32
    fold_every: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ThinK ratio must be in [0, 1), got {self.ratio}")
        if self.window < 0 or self.observe < 1 or self.fold_every < 0:
            raise ValueError("ThinK window and fold_every must be >= 0 and observe >= 1")

    def prunes(self, prompt: int) -> bool:
        """Whether a ``prompt``-token prompt has its key channels pruned."""
        return self.ratio > 0 and prompt > self.observe

    def kept_channels(self, head_dim: int) -> int:
        """Channels kept per head: D - floor(D * ratio)."""
        return head_dim - int(head_dim * self.ratio)


@dataclass(frozen=True)
class Eviction:
    """Token eviction at prefill; ``budget`` is the fraction of the prompt's tokens kept per KV head.

    The budget counts the whole prompt (sinks and windows included). ``streaming`` keeps
    ``sinks`` first non-pad tokens plus the most recent ones; ``snapkv`` keeps the
    ``observe`` last tokens, the ``sinks`` first non-pad tokens, and the prefix tokens the
    observation window attends to most (scores summed over the window and the query heads
    of a group, average-pooled with ``kernel``). SnapKV never keeps fewer than
    ``observe + sinks`` tokens, so a prompt that short is not evicted at all.
    """

    policy: Literal["streaming", "snapkv"] = "snapkv"
    budget: float = 0.5
    sinks: int = 4
    observe: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        if self.policy not in ("streaming", "snapkv"):
            raise ValueError(f"eviction policy must be 'streaming' or 'snapkv', got {self.policy!r}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"eviction budget must be in (0, 1], got {self.budget}")
        if self.sinks < 0 or self.observe < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("eviction sinks >= 0, observe >= 1 and an odd kernel >= 1 are required")


@dataclass(frozen=True)
class FP8:
    """FP8 storage of pruned keys and all values, one bf16 scale per token and KV head."""

    format: Literal["e4m3", "e5m2"] = "e4m3"

    def encode(self, x: Any, parts: int = 1) -> Any:
        """Rows of ``x`` [..., T, C], made of ``parts`` equal-width tensors scaled apart."""
        from memwise_kvprune.fp8store import FP8Rows

        return FP8Rows.encode(x, self.format, parts)

    def row_bytes(self, width: int) -> int:
        """Bytes of one token row of ``width`` elements: a byte each plus the scale."""
        return width + 2


@dataclass(frozen=True)
class Int4:
    """4-bit storage of pruned keys and all values: symmetric codes, one bf16 scale per token and
    ``group`` channels (one per row when ``group`` does not divide the row)."""

    group: int = 16

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"int4 group must be >= 1, got {self.group}")

    def encode(self, x: Any, parts: int = 1) -> Any:
        """Rows of ``x`` [..., T, C], made of ``parts`` equal-width tensors grouped apart."""
        from memwise_kvprune.int4store import Int4Rows

        return Int4Rows.encode(x, parts * groups_of(x.shape[-1] // parts, self.group), parts)

    def row_bytes(self, width: int) -> int:
        """Two elements a byte plus one bf16 scale per group."""
        return (width + 1) // 2 + 2 * groups_of(width, self.group)


def groups_of(width: int, group: int) -> int:
    """Int4 scale groups per row: ``width / group`` when it divides, else one group for the row."""
    return width // group if width % group == 0 else 1


Quant = FP8 | Int4
"""A storage format for the cache's pruned keys and values."""

"""Exact optimizer-state bytes of CoatAdamW and torch AdamW, for memory estimates."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from memwise.optim import ADAM_STEP_BYTES as STEP_BYTES
from memwise.optim import state_bytes

from memwise_coat.state import CoatState


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """torch.optim.AdamW: two moments like the parameter plus the step."""
    return state_bytes(params, "adamw")


def shard_of(p: torch.Tensor, shards: int = 1) -> torch.Tensor:
    """A meta tensor shaped like the largest of FSDP2's ``shards`` dim-0 shards of ``p`` (``p`` itself for 1)."""
    if shards == 1 or p.ndim == 0:
        return p
    return torch.empty((math.ceil(p.shape[0] / shards), *p.shape[1:]), dtype=p.dtype, device="meta")


def coat_param_state_bytes(p: torch.Tensor, quantized: bool, layout: CoatState, shards: int = 1) -> int:
    """One parameter's CoatAdamW state on one rank of ``shards`` (FSDP2; the largest shard): FP8
    payloads plus per-group fp32 metadata of the shard, or fp32 moments, and the step."""
    shard = shard_of(p, shards)
    if not quantized:
        return state_bytes([shard], "adamw")
    return layout.nbytes(shard.numel()) + STEP_BYTES

"""Exact optimizer-state bytes of CoatAdamW and torch AdamW, for memory estimates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from memwise.optim import ADAM_STEP_BYTES as STEP_BYTES
from memwise.optim import state_bytes

from memwise_coat.quantization import MomentCodec


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """torch.optim.AdamW: two moments like the parameter plus the step."""
    return state_bytes(params, "adamw")


def coat_param_state_bytes(p: torch.Tensor, quantized: bool, first: MomentCodec, second: MomentCodec) -> int:
    """One parameter's CoatAdamW state: FP8 payloads plus per-group fp32 metadata, or fp32 moments."""
    if not quantized:
        return state_bytes([p], "adamw")
    return first.nbytes(p.numel()) + second.nbytes(p.numel()) + STEP_BYTES

"""Exact optimizer-state bytes of CoatAdamW and torch AdamW, for memory estimates."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memwise_coat.quantization import MomentCodec

STEP_BYTES = 4  # the fp32 `step` tensor each parameter's state holds, as in torch.optim.AdamW


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """torch.optim.AdamW: two moments like the parameter plus the step."""
    return sum(2 * p.numel() * p.element_size() + STEP_BYTES for p in params)


def coat_param_state_bytes(p: torch.Tensor, quantized: bool, first: MomentCodec, second: MomentCodec) -> int:
    """One parameter's CoatAdamW state: FP8 payloads plus per-group fp32 metadata, or fp32 moments."""
    if not quantized:
        return 2 * p.numel() * p.element_size() + STEP_BYTES
    return first.nbytes(p.numel()) + second.nbytes(p.numel()) + STEP_BYTES

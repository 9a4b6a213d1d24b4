"""An HF transformers attention implementation: the baseline's SDPA, with q, k, v saved in 8 bits.

Registered (``memwise.attention.register_attention``, with the SDPA masks) under
``memwise_mesa_sdpa``. Forward calls transformers' own ``sdpa_attention_forward``, so the
computation is the one the baseline runs (never eager attention, which would store the
attention matrix). Backward re-runs that forward on q, k, v dequantized from one 8-bit
group per head (per KV head for k and v) and backpropagates through it; SDPA's output and
log-sum-exp are therefore not kept at all.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from memwise.attention import register_attention
from memwise.saved import SavedRecompute
from memwise_mesa.layers import codec

IMPLEMENTATION = "memwise_mesa_sdpa"
QUANTIZERS = ("mesa_query", "mesa_key", "mesa_value")


def mesa_sdpa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Same signature and result as transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    run = functools.partial(sdpa_attention_forward, module, attention_mask=attention_mask, dropout=dropout,
                            scaling=scaling, is_causal=is_causal, **kwargs)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not grad or QUANTIZERS[0] not in module._modules:
        return run(query, key, value)
    codecs = [codec(module, getattr(module, name)) for name in QUANTIZERS]
    out = SavedRecompute.apply(lambda q, k, v: run(q, k, v)[0], codecs, dropout > 0, 3, query, key, value)
    return out, None


@functools.cache
def register() -> str:
    """Register the implementation with transformers (once) and return its name."""
    return register_attention(IMPLEMENTATION, mesa_sdpa_attention_forward)

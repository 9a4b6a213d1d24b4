"""The attention function that reads the pruned cache directly, and its (un)installation on a model.

Prefill runs exact SDPA on the full prompt, then asks the layer to compress itself with
the prompt's queries (post-RoPE). Later steps score q[kept channels] against the
compact keys and q against the full-width window, so keys are never re-expanded.
Anything that is not a pruned view (training, a plain cache) goes to SDPA unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memwise.attention import attention_implementation, register_attention, set_attention_implementation
from memwise_kvprune import compat
from memwise_kvprune.kernels import cpu_attention
from memwise_kvprune.layer import PrunedLayer, PrunedView, visible_mask
from memwise_kvprune.rows import QuantRows

NAME = "memwise_kvprune"


def pruned_attention(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature; returns ([B, S, Hq, D], None)."""
    sdpa = compat.sdpa_forward()
    if not isinstance(key, PrunedView):
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = key.layer
    if key.prefill_keys is not None:
        out = sdpa(module, query, key.prefill_keys, key.prefill_values, attention_mask, dropout=dropout,
                   scaling=scaling, **kwargs)
        layer.compress(key, query, attention_mask, scaling)
        return out
    return attend(layer, query, attention_mask, scaling), None


def attend(layer: PrunedLayer, query: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float) -> torch.Tensor:
    """Exact attention over what the layer keeps: [B, S, Hq, D].

    The query heads of a group and their positions form one [G * S] row block per KV head, so
    each product is a single batched matmul (decoding calls this once per layer per token).
    """
    b, hq, s, d = query.shape
    if s == 1 and attention_mask is None and query.device.type == "cpu" and cpu_attention.serves(layer) \
            and (ext := cpu_attention.extension()) is not None:  # one unpadded decoding step on FP8 rows
        return cpu_attention.decode_attention(layer, query, scaling, ext)
    h = layer.window_k.shape[1]
    g = hq // h
    q = query.reshape(b, h, g * s, d)
    if layer.channels is not None:
        q_kept = q.gather(-1, layer.channels.long()[:, :, None, :].expand(-1, -1, g * s, -1))
    else:
        q_kept = q
    if layer.kv is not None:  # keys and values in one store: one widening
        (keys, k_scale), (values, v_scale) = layer.kv.read(query.dtype)
    else:
        (keys, k_scale), (values, v_scale) = _read(layer.pruned_k, query.dtype), _read(layer.vals, layer.dtype)
    scores = (q_kept @ keys.transpose(-1, -2)).float()  # q . (rows * s_t) = (q . rows) * s_t: scale the scores
    scores.mul_(scaling if k_scale is None else (k_scale * scaling)[:, :, None, :])
    if layer.window_k.shape[-2]:  # ThinK's full-width window (empty without channel pruning)
        window = (q @ layer.window_k.transpose(-1, -2)).float().mul_(scaling)
        scores = torch.cat([scores, window], dim=-1)
    if attention_mask is not None or s > 1:  # one query and no padding mask: every stored token is visible
        visible = visible_mask(attention_mask, b, s, layer.seen, layer.seen, query.device)  # [B, 1, S, seen]
        if layer.positions is None:
            visible = visible[..., :scores.shape[-1]]
        else:
            pos = layer.positions.long()[:, :, None, :].expand(-1, -1, s, -1)
            visible = visible.expand(-1, h, -1, -1).gather(-1, pos)
        scores = scores.view(b, h, g, s, -1).masked_fill(~visible[:, :, None], float("-inf")).view(b, h, g * s, -1)
    probs = scores.softmax(dim=-1)
    if v_scale is not None:
        probs.mul_(v_scale[:, :, None, :])
    out = probs.to(values.dtype) @ values
    return out.view(b, hq, s, d).transpose(1, 2).contiguous()


def _read(store: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, per-token scale or None)`` of a key or value store, quantized or not."""
    if isinstance(store, QuantRows):
        (part,) = store.read(dtype)
        return part
    return store, None


def install(model: torch.nn.Module) -> Callable[[], None]:
    """Switch ``model`` to the pruned attention; returns the undo (idempotent, restores the old name)."""
    register_attention(NAME, pruned_attention)
    previous = attention_implementation(model)
    if previous == NAME:
        return lambda: None
    set_attention_implementation(model, NAME)

    def undo() -> None:
        set_attention_implementation(model, previous)

    return undo

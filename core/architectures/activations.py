"""Closed-form saved-for-backward bytes of one decoder layer, from the adapter's traits.

Counted from what autograd keeps (no technique): per norm its input, the normalized
input and, when a projection reads it, the output; q and k after RoPE, v and the
attention output (o's input) under SDPA; a gated MLP's gate, up, activation and product.
The differences per architecture are terms below, each found by listing the tensors
autograd saves (``torch.autograd.graph.saved_tensors_hooks``) and checked against
MemTracker in tests/test_architectures.py (fp32, within 1% per layer). Under bf16 autocast
the Llama calibration is used for every architecture (not calibrated for the others).
"""

from __future__ import annotations

from typing import Any


def decoder_layer_bytes(adapter: Any, geo: Any, config: Any, batch: int, seq: int, precision: str) -> int:
    """Bytes one decoder layer of ``adapter``'s architecture saves for backward."""
    h, inter, heads = geo.hidden, geo.intermediate, geo.heads
    q, kv = geo.q_width, geo.kv_width
    small = 4 * 2 + 4 * heads  # two rsqrt columns, SDPA's logsumexp (fp32)
    if precision in ("bf16-mixed", "16-mixed"):
        return batch * seq * (4 * 4 * h + 2 * 5 * h + 2 * (2 * q + 2 * kv + 4 * inter) + small)
    size = 2 if precision in ("bf16-true", "16-true") else 4
    if adapter.projection == "conv1d":  # GPT-2: LayerNorm (input, output, mean, rstd), fused qkv kept whole
        mlp = 5 * inter if geo.activation == "gelu_new" else 2 * inter  # gelu_new keeps its tanh steps
        return batch * seq * (size * (4 * h + (q + 2 * kv) + q + mlp) + 4 * 4 + 4 * heads)
    floats = 6 * h + 2 * q + 2 * kv + 4 * inter
    if adapter.qkv is not None:  # v is a view of the fused output, which stays whole; o reads a copy
        floats += 2 * q + kv
    if adapter.qk_norms:  # per-head RMSNorm of q and k: input and normalized (RoPE keeps neither)
        floats += 2 * q + 2 * kv
        small += 4 * (heads + geo.kv_heads)
    per_layer = 0
    if len(adapter.norms) == 4:  # Gemma2 sandwich: post-norms keep input and normalized, 1 + weight per norm
        floats += 4 * h
        small += 4 * 2
        per_layer += 4 * 4 * h
    if not getattr(config, "_attn_implementation", "sdpa") == "sdpa":  # eager: scores, k and v per query head
        floats += 2 * q - 2 * kv
        small += 4 * 2 * heads * seq - 4 * heads  # soft-capped scores and softmax, no logsumexp
    return batch * seq * (size * floats + small) + per_layer


def outside_bytes(adapter: Any, geo: Any, config: Any, batch: int, seq: int, precision: str) -> int:
    """What an architecture saves outside its layers beyond (or short of) the Llama terms: a final LayerNorm
    keeps input, output, mean and rstd (RMSNorm: input, normalized, output, rsqrt); soft-capped logits
    keep their tanh."""
    size = 2 if precision in ("bf16-true", "16-true") else 4
    per_token = 0
    if adapter.norm == "layernorm":
        per_token += 4 - size * geo.hidden
    if getattr(config, "final_logit_softcapping", None):
        per_token += size * geo.vocab
    return batch * seq * per_token

"""Closed-form saved-for-backward bytes of one decoder layer, from the adapter's traits.

Counted from what autograd keeps (no technique): per norm its input, the normalized
input and, when a projection reads it, the output; q and k after RoPE, v and the
attention output (o's input) under SDPA; a gated MLP's gate, up, activation and product.
The differences per architecture are terms below, each found by listing the tensors
autograd saves (``torch.autograd.graph.saved_tensors_hooks``) and checked against
MemTracker in tests/test_architectures.py (fp32, within 1% per layer; bf16 autocast, whose
terms differ, within 5% of the whole model).
"""

from __future__ import annotations

from typing import Any


def decoder_layer_bytes(adapter: Any, geo: Any, config: Any, batch: int, seq: int, precision: str) -> int:
    """Bytes one decoder layer of ``adapter``'s architecture saves for backward."""
    h, inter, heads = geo.hidden, geo.intermediate, geo.heads
    q, kv = geo.q_width, geo.kv_width
    small = 4 * 2 + 4 * heads  # two rsqrt columns, SDPA's logsumexp (fp32)
    if precision in ("bf16-mixed", "16-mixed"):
        return _autocast_layer_bytes(adapter, geo, config, batch, seq, small)
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


def _autocast_layer_bytes(adapter: Any, geo: Any, config: Any, batch: int, seq: int, small: int) -> int:
    """Under bf16 (fp16) autocast: norms and residuals in fp32, each projection's input cast to bf16 and
    saved (q, k and v each keep their own copy of the shared input, a fused projection one), and each
    weight's bf16 copy saved for its backward (2 bytes a weight, whatever the tokens: at a few hundred
    tokens a layer's copies are a third of its activations; Llama's terms left them out before)."""
    h, inter, heads = geo.hidden, geo.intermediate, geo.heads
    q, kv = geo.q_width, geo.kv_width
    copies = autocast_weight_copy_bytes(adapter, geo)
    if adapter.projection == "conv1d":  # LayerNorm (input, mean, rstd) twice; fused qkv output, q and v copies;
        # gelu_new's steps
        mlp = 5 * inter if geo.activation == "gelu_new" else 2 * inter
        per_token = 2 * (4 * h + 8) + 4 * h + 2 * (q + 2 * kv) + 4 * q + 2 * kv + 2 * mlp + 4 * heads
        return batch * seq * per_token
    per_token = 4 * 4 * h + 2 * 5 * h + 2 * (2 * q + 2 * kv + 4 * inter) + small
    per_layer = 0
    if adapter.qkv is not None:  # one bf16 input for q, k and v; o reads a copy of the attention output; v, a
        # view of the fused bf16 output, keeps all of it (q and k are rotated copies)
        per_token += 2 * q - 4 * h + 2 * (q + kv)
    if adapter.gate_up is not None:  # one bf16 input for gate and up
        per_token -= 2 * h
    if adapter.qk_norms:  # per-head RMSNorm of q and k: fp32 input and rsqrt, bf16 output
        per_token += 6 * q + 6 * kv + 4 * (heads + geo.kv_heads)
    if len(adapter.norms) == 4:  # Gemma2's post-norms: input, rsqrt and normalized each; 1 + weight per norm
        per_token += 2 * (8 * h + 4)
        per_layer += 4 * 4 * h
    if not getattr(config, "_attn_implementation", "sdpa") == "sdpa":  # eager, soft-capped: q, k and v per
        # query head, tanh (bf16), softmax (fp32) and probabilities (bf16), o's input copied; no logsumexp
        per_token += 4 * q - 4 * kv + 8 * heads * seq - 4 * heads
    return batch * seq * per_token + per_layer + copies


def autocast_weight_copy_bytes(adapter: Any, geo: Any) -> int:
    """The bf16 copies of one decoder layer's projection weights that autocast casts and autograd saves
    (none under FSDP2, whose mixed-precision policy gathers bf16 weights and frees them after forward).
    GPT-2's Conv1D copies are not among the activations MemTracker measures (checked against it): 0."""
    if adapter.projection == "conv1d":
        return 0
    h, q, kv = geo.hidden, geo.q_width, geo.kv_width
    return 2 * (h * (q + 2 * kv) + q * h + 3 * h * geo.intermediate)


def outside_bytes(adapter: Any, geo: Any, config: Any, batch: int, seq: int, precision: str) -> int:
    """What an architecture saves outside its layers beyond (or short of) the Llama terms: a final LayerNorm
    keeps input, output, mean and rstd (RMSNorm: input, normalized, output, rsqrt); soft-capped logits
    keep their tanh."""
    size = 2 if precision in ("bf16-true", "16-true") else 4
    per_token = 0
    if adapter.norm == "layernorm":
        per_token += 4 - size * geo.hidden
    if getattr(config, "final_logit_softcapping", None):  # the tanh, bf16 under autocast
        per_token += (2 if precision in ("bf16-mixed", "16-mixed") else size) * geo.vocab
    return batch * seq * per_token

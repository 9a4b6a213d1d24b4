"""GPT-2: HF Conv1D projections (weight stored input x output), fused ``c_attn`` (q, k, v),
LayerNorm, plain GELU MLP, learned positions, no rotary, no GQA."""

from __future__ import annotations

from memwise.architectures.activations import decoder_layer_bytes
from memwise.architectures.base import Architecture

GPT2 = Architecture(
    model_type="gpt2", model_class="GPT2LMHeadModel", config_class="GPT2Config",
    backbone="transformer", layers="h", embed="wte", final_norm="ln_f", lm_head="lm_head",
    attention="attn", mlp="mlp", norms=("ln_1", "ln_2"), o="c_proj", down="c_proj", act="act",
    q=None, k=None, v=None, qkv="c_attn", gate=None, up=None, projection="conv1d", norm="layernorm",
    rotary=False, position_embed="wpe", hidden_field="n_embd", layers_field="n_layer", heads_field="n_head",
    kv_heads_field=None, intermediate_field="n_inner", activation_field="activation_function",
    layer_bytes=decoder_layer_bytes,
    # dropout off, as the other architectures train; a recipe may turn it back on
    builder_defaults=(("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0), ("bos_token_id", None),
                      ("eos_token_id", None)))

ADAPTERS = (GPT2,)

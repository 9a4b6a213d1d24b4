"""Qwen2 (Llama layout with q/k/v biases) and Qwen3 (per-head RMSNorm of q and k, no biases)."""

from __future__ import annotations

from memwise.architectures.activations import decoder_layer_bytes
from memwise.architectures.base import Architecture

_COMMON = dict(backbone="model", layers="layers", embed="embed_tokens", final_norm="norm", lm_head="lm_head",
               attention="self_attn", mlp="mlp", norms=("input_layernorm", "post_attention_layernorm"),
               o="o_proj", down="down_proj", act="act_fn", layer_bytes=decoder_layer_bytes)

QWEN2 = Architecture(model_type="qwen2", model_class="Qwen2ForCausalLM", config_class="Qwen2Config", qkv_bias=True,
                     builder_defaults=(("use_sliding_window", False),), **_COMMON)
QWEN3 = Architecture(model_type="qwen3", model_class="Qwen3ForCausalLM", config_class="Qwen3Config",
                     qk_norms=("q_norm", "k_norm"), builder_defaults=(("use_sliding_window", False),), **_COMMON)

ADAPTERS = (QWEN2, QWEN3)

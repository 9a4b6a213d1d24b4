"""Llama-style decoders: LlamaForCausalLM and Mistral (same module layout and names)."""

from __future__ import annotations

from memwise.architectures.activations import decoder_layer_bytes
from memwise.architectures.base import Architecture

_COMMON = dict(backbone="model", layers="layers", embed="embed_tokens", final_norm="norm", lm_head="lm_head",
               attention="self_attn", mlp="mlp", norms=("input_layernorm", "post_attention_layernorm"),
               o="o_proj", down="down_proj", act="act_fn", layer_bytes=decoder_layer_bytes)

LLAMA = Architecture(model_type="llama", model_class="LlamaForCausalLM", config_class="LlamaConfig", **_COMMON)
MISTRAL = Architecture(model_type="mistral", model_class="MistralForCausalLM", config_class="MistralConfig",
                       builder_defaults=(("sliding_window", None),), **_COMMON)

ADAPTERS = (LLAMA, MISTRAL)

"""Phi-3: Llama-like, but q/k/v fused in one ``qkv_proj`` and gate/up in one ``gate_up_proj``."""

from __future__ import annotations

from memwise.architectures.activations import decoder_layer_bytes
from memwise.architectures.base import Architecture

PHI3 = Architecture(
    model_type="phi3", model_class="Phi3ForCausalLM", config_class="Phi3Config",
    backbone="model", layers="layers", embed="embed_tokens", final_norm="norm", lm_head="lm_head",
    attention="self_attn", mlp="mlp", norms=("input_layernorm", "post_attention_layernorm"),
    o="o_proj", down="down_proj", act="activation_fn", q=None, k=None, v=None, qkv="qkv_proj",
    gate=None, up=None, gate_up="gate_up_proj", layer_bytes=decoder_layer_bytes,
    builder_defaults=(("pad_token_id", None), ("bos_token_id", None), ("eos_token_id", None),
                      ("sliding_window", None)))

ADAPTERS = (PHI3,)

"""Gemma2: four RMSNorms per layer (sandwich), GeGLU MLP, scaled embeddings, soft-capped
attention logits (eager attention only: SDPA cannot soft-cap) and soft-capped final logits."""

from __future__ import annotations

from memwise.architectures.activations import decoder_layer_bytes
from memwise.architectures.base import Architecture

GEMMA2 = Architecture(
    model_type="gemma2", model_class="Gemma2ForCausalLM", config_class="Gemma2Config",
    backbone="model", layers="layers", embed="embed_tokens", final_norm="norm", lm_head="lm_head",
    attention="self_attn", mlp="mlp",
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    o="o_proj", down="down_proj", act="act_fn", soft_capped=True, layer_bytes=decoder_layer_bytes,
    notes="attention runs eager (transformers has no SDPA soft-capping), so it saves the score matrices")

ADAPTERS = (GEMMA2,)

"""Where LoRAM finds the projections it prunes and adapts: from the model's architecture adapter.

Structured pruning removes coupled groups across seven separate projections: a KV head's rows
of q, k and v and its columns of o; an MLP channel's rows of gate and up and its column of
down. So LoRAM takes every architecture whose adapter names these seven as separate
``nn.Linear`` modules (llama, mistral, qwen2, qwen3, gemma2, ...) and refuses, by name, one
with fused projections (phi3's qkv_proj / gate_up_proj) or HF Conv1D (gpt2): pruning part of
a fused weight or leaving some projections unpruned would be a silent partial conversion.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memwise import architectures
from memwise.architectures import Architecture, UnsupportedArchitecture

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTENTION_ROLES + MLP_ROLES


def loram_architecture(model: nn.Module | Any) -> Architecture:
    """The adapter of ``model`` (an HF model or its config) if LoRAM can prune it whole; else an error naming it."""
    adapter = architectures.for_config(model) if not isinstance(model, nn.Module) else architectures.for_model(model)
    adapter = architectures.require(adapter, "loram", fused=False, conv1d=False, gated=True, separate_qkv=True)
    leaves = [path.rsplit(".", 1)[-1] for path in projection_paths(adapter).values()]
    if len(set(leaves)) < len(leaves):
        raise UnsupportedArchitecture(f"plugin 'loram' cannot convert architecture '{adapter.model_type}': its "
                                      f"projections share names ({', '.join(leaves)}), so adapters and recovery "
                                      "could not tell them apart")
    return adapter


def projection_paths(adapter: Architecture) -> dict[str, str]:
    """Role (q, k, v, o, gate, up, down) -> dotted path of the projection inside a decoder layer."""
    paths = adapter.projections()
    return {role: paths[role] for role in ROLES if role in paths}


def projection_names(model: nn.Module | Any) -> list[str]:
    """The seven projection names (module-name suffixes, PEFT's target_modules) of a model or config."""
    return [path.rsplit(".", 1)[-1] for path in projection_paths(loram_architecture(model)).values()]

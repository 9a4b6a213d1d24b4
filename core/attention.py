"""Registering an HF transformers attention implementation, and pointing a model at one.

Plugins that replace attention (Mesa's 8-bit SDPA, kvprune's pruned cache) register a
function with transformers' ``AttentionInterface`` under their own name, with SDPA's masks,
and set it on the model; this is the one place that knows how.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def register_attention(name: str, fn: Callable[..., Any]) -> str:
    """Register ``fn`` as attention implementation ``name`` with SDPA's boolean masks; returns ``name``.

    Registering again replaces the function (transformers' registries are global by name).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation the model's config names."""
    return model.config._attn_implementation


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Point ``model`` (every config inside it, for a model without ``set_attn_implementation``) at ``name``."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name

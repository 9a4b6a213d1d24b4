"""Wrap decoder layers so they recompute their activations in backward.

The layer's ``forward`` is wrapped in place (``memwise.surgery.wrap_forward``): module names
and state-dict keys stay the same, so checkpoints load with or without the plugin.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memwise import NoEffectWarning, surgery
from memwise.surgery import LayerSpec

OWNER = "checkpointing"


def _checkpointed(layer: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if layer.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def apply_checkpointing(model: torch.nn.Module, layers: LayerSpec = "all") -> list[str]:
    """Recompute the chosen decoder layers in backward; returns the names newly wrapped (idempotent)."""
    wrapped = []
    for name, layer in surgery.select_layers(model, layers):
        if surgery.wrapped_by(layer, OWNER):
            continue
        surgery.wrap_forward(layer, OWNER, _checkpointed)
        wrapped.append(name)
    if not wrapped:
        warnings.warn("apply_checkpointing changed nothing: the chosen layers were already checkpointed",
                      NoEffectWarning, stacklevel=2)
    return wrapped


def remove_checkpointing(model: torch.nn.Module) -> list[str]:
    """Undo ``apply_checkpointing``; returns the names unwrapped."""
    return surgery.restore(model, OWNER)

"""Wrap decoder layers so they recompute their activations in backward.

The layer's ``forward`` is wrapped in place: module names and state-dict keys stay the
same, so checkpoints load with or without the plugin.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memwise import NoEffectWarning
from memwise.models import decoder_layers, select_layers

_MARK = "_memwise_checkpointed"


def _checkpointed(layer: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if layer.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def apply_checkpointing(model: torch.nn.Module, layers: str | list[int] = "all") -> list[str]:
    """Recompute the chosen decoder layers in backward; returns the names newly wrapped (idempotent)."""
    wrapped = []
    for name, layer in select_layers(model, layers):
        if getattr(layer, _MARK, False):
            continue
        layer.forward = functools.partial(_checkpointed, layer, layer.forward)
        setattr(layer, _MARK, True)
        wrapped.append(name)
    if not wrapped:
        warnings.warn("apply_checkpointing changed nothing: the chosen layers were already checkpointed",
                      NoEffectWarning, stacklevel=2)
    return wrapped


def remove_checkpointing(model: torch.nn.Module) -> list[str]:
    """Undo ``apply_checkpointing``; returns the names unwrapped."""
    removed = []
    for name, layer in decoder_layers(model):
        if getattr(layer, _MARK, False):
            del layer.forward
            delattr(layer, _MARK)
            removed.append(name)
    return removed

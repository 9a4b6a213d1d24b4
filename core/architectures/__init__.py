"""Architecture adapters keyed by HF ``model_type``: where the decoder layers, projections and
norms of a causal LM are, and how big they are.

The core and every plugin look parts up here instead of hard-coding Llama names. An
architecture without an adapter is an error that names it and lists the supported ones;
third-party adapters register through the entry-point group ``memwise.architectures``
(the value is an :class:`Architecture`, or a list of them).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

from memwise.architectures.base import Architecture, Geometry
from memwise.errors import MemwiseError

GROUP = "memwise.architectures"

_REGISTRY: dict[str, Architecture] = {}
_entry_points_loaded = False


class UnsupportedArchitecture(MemwiseError, ValueError):
    """A model whose ``model_type`` has no adapter, or that a plugin cannot convert."""


def register(adapter: Architecture, replace: bool = False) -> Architecture:
    """Add ``adapter`` under its ``model_type``; a second one for the same type is an error unless ``replace``."""
    if not isinstance(adapter, Architecture):
        raise TypeError(f"register() takes a memwise.architectures.Architecture, got {type(adapter).__name__}")
    if adapter.model_type in _REGISTRY and not replace and _REGISTRY[adapter.model_type] is not adapter:
        raise MemwiseError(f"architecture '{adapter.model_type}' is already registered; pass replace=True to "
                           "override it")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=GROUP):
        value = ep.load()
        for adapter in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(adapter, Architecture):
                raise MemwiseError(f"entry point '{ep.name}' ({ep.value}) in group {GROUP} is not a "
                                   "memwise.architectures.Architecture")
            register(adapter, replace=True)


def supported() -> list[str]:
    """Every model_type with an adapter (built in and from entry points), sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get(model_type: str) -> Architecture:
    """The adapter of ``model_type``; an error naming it and listing the supported ones otherwise."""
    if model_type not in _REGISTRY:
        _load_entry_points()
    if model_type not in _REGISTRY:
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' has no memwise adapter; supported: {', '.join(supported())}. "
            f"Add one with memwise.architectures.register(Architecture(...)) or the entry-point group '{GROUP}' "
            "(docs/architecture.md, 'Adding an architecture')")
    return _REGISTRY[model_type]


def hf_root(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost HF ``PreTrainedModel`` inside ``model`` (a LightningModule, a PEFT wrapper, or itself)."""
    from transformers import PreTrainedModel

    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise UnsupportedArchitecture(f"{type(model).__name__} holds no HF transformers model (PreTrainedModel), so "
                                  f"memwise cannot find its decoder layers; supported: {', '.join(supported())}")


def model_type_of(model: torch.nn.Module) -> str:
    """The HF ``model_type`` of the transformers model inside ``model``."""
    return str(getattr(hf_root(model).config, "model_type", None) or type(hf_root(model)).__name__)


def for_model(model: torch.nn.Module) -> Architecture:
    """The adapter of the transformers model inside ``model`` (an error when there is none)."""
    return get(model_type_of(model))


def hf_adapter(model: torch.nn.Module) -> Architecture | None:
    """The adapter when ``model`` holds an HF transformers model (an error if its architecture has none);
    None for a plain torch module, which techniques that act on module types handle without one."""
    from transformers import PreTrainedModel

    if not any(isinstance(m, PreTrainedModel) for m in model.modules()):
        return None
    return for_model(model)


def for_config(config: Any) -> Architecture:
    """The adapter of an HF config."""
    return get(str(getattr(config, "model_type", None) or type(config).__name__))


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name in ``model``, module) of each decoder layer, found through the adapter."""
    root = hf_root(model)
    adapter = get(str(getattr(root.config, "model_type", "")))
    layers = adapter.decoder_layers(root)
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(layers)]
    return [(f"{prefix}.{i}" if prefix else str(i), layer) for i, layer in enumerate(layers)]


def require(model: torch.nn.Module | Architecture, plugin: str, *, fused: bool = True, conv1d: bool = True,
            gated: bool = False, separate_qkv: bool = False, **traits: Any) -> Architecture:
    """The model's adapter if ``plugin`` can convert it; otherwise an error naming both and why.

    ``fused=False``: the plugin cannot handle fused projections (qkv_proj, gate_up_proj);
    ``conv1d=False``: it cannot handle HF Conv1D; ``gated``/``separate_qkv``: it needs a
    gated MLP / separate q, k, v projections; further keywords are adapter fields that
    must equal the given value (``rotary=True``).
    """
    adapter = model if isinstance(model, Architecture) else for_model(model)
    why = []
    if not fused and adapter.fused:
        why.append(f"fused projections ({', '.join(adapter.fused)})")
    if not conv1d and adapter.projection == "conv1d":
        why.append("Conv1D projections")
    if gated and not adapter.gated:
        why.append("no gated MLP")
    if separate_qkv and adapter.q is None:
        why.append("no separate q/k/v projections")
    for field, value in traits.items():
        if getattr(adapter, field) != value:
            why.append(f"{field}={getattr(adapter, field)!r}")
    if why:
        ok = [t for t in supported() if _fits(get(t), fused, conv1d, gated, separate_qkv, traits)]
        raise UnsupportedArchitecture(
            f"plugin '{plugin}' cannot convert architecture '{adapter.model_type}' ({'; '.join(why)}); it would "
            f"only convert part of the model. Architectures it supports: {', '.join(ok)}")
    return adapter


def _fits(a: Architecture, fused: bool, conv1d: bool, gated: bool, separate_qkv: bool, traits: dict) -> bool:
    return ((fused or not a.fused) and (conv1d or a.projection != "conv1d") and (a.gated or not gated)
            and (a.q is not None or not separate_qkv) and all(getattr(a, f) == v for f, v in traits.items()))


def _register_builtins() -> None:
    from memwise.architectures import gemma, gpt2, llama, phi, qwen

    for module in (llama, qwen, gemma, phi, gpt2):
        for adapter in module.ADAPTERS:
            register(adapter)


_register_builtins()

__all__ = ["GROUP", "Architecture", "Geometry", "UnsupportedArchitecture", "decoder_layers", "for_config",
           "for_model", "get", "hf_adapter", "hf_root", "model_type_of", "register", "require", "supported"]

"""Model builders for every adapter: a random model from config fields, or a local folder.

Registered as ``model.builder`` names (``qwen2``, ``gpt2``, ...) so recipes and tests make
small random models of each architecture. No hub downloads, never remote code.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch

from memwise import architectures
from memwise.architectures.base import Architecture
from memwise.errors import MemwiseError


def _classes(adapter: Architecture) -> tuple[Any, Any]:
    import transformers

    try:
        return getattr(transformers, adapter.config_class), getattr(transformers, adapter.model_class)
    except AttributeError as err:
        raise MemwiseError(f"architecture '{adapter.model_type}' needs transformers' {adapter.model_class}, which "
                           f"transformers {transformers.__version__} does not have: upgrade transformers") from err


def config_fields(model_type: str) -> set[str]:
    """The config fields a recipe's ``model.config`` may set for ``model_type`` (its HF config's arguments,
    and the common ones every HF config takes)."""
    from transformers import PretrainedConfig

    config_class, _ = _classes(architectures.get(model_type))
    names = set()
    for cls in (config_class, PretrainedConfig):
        names |= {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")}
    return names | set(getattr(config_class, "attribute_map", {}))


def _attention(model_class: Any, wanted: str) -> str:
    """SDPA when the class supports it; Gemma2 soft-caps attention logits, which SDPA cannot, so eager."""
    if wanted == "sdpa" and getattr(model_class, "_supports_sdpa", True) is False:
        return "eager"
    return wanted


def build(adapter: Architecture, cfg: Any, vocab_size: int) -> torch.nn.Module:
    """``cfg`` is the recipe's ModelConfig: ``config`` fields over the adapter's defaults, or ``path``."""
    config_class, model_class = _classes(adapter)
    dtype = getattr(torch, cfg.dtype)
    if cfg.path is not None:
        found = json.loads((Path(cfg.path) / "config.json").read_text()).get("model_type")
        if found != adapter.model_type:
            raise MemwiseError(f"model.path '{cfg.path}' holds a '{found}' model but model.builder is "
                               f"'{adapter.model_type}': set model.builder={found}")
        model = model_class.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=False, dtype=dtype,
                                            attn_implementation=_attention(model_class, cfg.attn_implementation))
        return model.train()  # from_pretrained returns eval mode; memwise trains it
    fields = {"vocab_size": vocab_size, "pad_token_id": None, **dict(adapter.builder_defaults), **cfg.config}
    config = config_class(**fields)
    config._attn_implementation = _attention(model_class, cfg.attn_implementation)
    return model_class(config).to(dtype)


def builder(model_type: str) -> Callable[[Any, int], torch.nn.Module]:
    """The ``model.builder`` function of ``model_type``."""

    def build_it(cfg: Any, vocab_size: int) -> torch.nn.Module:
        return build(architectures.get(model_type), cfg, vocab_size)

    build_it.__name__ = f"build_{model_type}"
    build_it.__doc__ = f"HF {architectures.get(model_type).model_class} from a config or a local folder."
    return build_it


def architecture_builders() -> dict[str, Callable[[Any, int], torch.nn.Module]]:
    """A builder for every registered adapter, by model_type."""
    return {t: builder(t) for t in architectures.supported()}

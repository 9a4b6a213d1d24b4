"""Every difference between transformers releases that this plugin touches, in one place.

The cache argument was renamed: models and ``generate`` took ``past_key_values`` until
5.24, which renamed it ``cache`` (the old name still works, with a FutureWarning, until
6.0); the attention modules took ``past_key_value`` until 4.56. Caches became lists of
layer objects (``CacheLayerMixin``) in 4.56, which is the oldest release supported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def cache_kwarg(where: str = "generate") -> str:
    """The keyword that carries the cache into ``generate``/``forward`` ("generate"/"model") or into an
    attention module ("attention") for the installed transformers."""
    version = transformers_version()
    if version >= (5, 24):
        return "cache"
    if where == "attention" and version < (4, 56):
        return "past_key_value"
    return "past_key_values"


def sdpa_forward() -> Callable[..., tuple[torch.Tensor, Any]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

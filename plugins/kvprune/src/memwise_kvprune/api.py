"""The functional API: a pruned cache for a model, usable without the framework."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from memwise_kvprune.specs import FP8, Eviction, Int4, Quant, ThinK


def _spec(value: Any, cls: type, field: str) -> Any:
    """None/False -> None; a number -> ``cls(<field>=number)``; True -> defaults; a dict -> kwargs."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    if isinstance(value, str):
        return cls(**{field: value})
    return cls(**{field: float(value)})


def _quant(value: Any) -> Quant | None:
    """None/False -> None; True -> FP8 e4m3; "e4m3"/"e5m2" -> FP8; "int4" -> Int4; a spec as is."""
    if value is None or value is False:
        return None
    if value is True:
        return FP8()
    if isinstance(value, (FP8, Int4)):
        return value
    if value == "int4":
        return Int4()
    if value in ("e4m3", "e5m2"):
        return FP8(value)
    raise ValueError(f"quant must be True, 'e4m3', 'e5m2', 'int4', FP8(...) or Int4(...), got {value!r}")


def make_cache(model: torch.nn.Module, think: Any = None, eviction: Any = None, quant: Any = None,
               install: bool = True) -> Any:
    """A fresh pruned cache for one ``generate`` call (or a hand-written decoding loop).

    ``think``: a ratio, a dict or :class:`ThinK`; ``eviction``: a policy name, a dict or
    :class:`Eviction`; ``quant``: True (FP8 e4m3), "e4m3", "e5m2", "int4", :class:`FP8` or
    :class:`Int4`. With ``install`` the
    model is switched to the pruned attention (SDPA for everything else); undo it with
    :func:`uninstall` or use :func:`pruned_generation`.
    """
    from memwise_kvprune.attention import install as install_attention
    from memwise_kvprune.cache import PrunedCache
    from memwise_kvprune.compat import text_config

    if install:
        install_attention(model)
    layers = text_config(model).num_hidden_layers
    return PrunedCache(layers, _spec(think, ThinK, "ratio"), _spec(eviction, Eviction, "policy"),
                       _quant(quant))


def uninstall(model: torch.nn.Module, implementation: str = "sdpa") -> None:
    """Put ``model`` back on ``implementation`` (SDPA by default)."""
    from memwise.attention import set_attention_implementation

    set_attention_implementation(model, implementation)


@contextlib.contextmanager
def pruned_generation(model: torch.nn.Module, **settings: Any) -> Iterator[Any]:
    """``with pruned_generation(model, think=0.5) as cache: model.generate(..., past_key_values=cache)``."""
    from memwise_kvprune.attention import install as install_attention

    undo = install_attention(model)
    try:
        yield make_cache(model, install=False, **settings)
    finally:
        undo()

"""Quantize a tensor once when several operations save it (a norm's output feeding q, k and v).

The first saving operation packs the tensor with its own quantizer; later ones, while the
tensor is alive and unchanged (same version counter), reuse that packed copy. Entries
vanish with the tensor.
"""

from __future__ import annotations

import weakref

import torch

from memwise_mesa.packed import PackedTensor
from memwise_mesa.quantizer import RangeQuantizer

_cache: dict[int, tuple[weakref.ref, int, str, PackedTensor]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _cache.get(key)
    if entry is not None and entry[0] is ref:
        del _cache[key]


def pack_shared(quantizer: RangeQuantizer, x: torch.Tensor, update: bool) -> PackedTensor:
    """The packed form of ``x``, shared with every other save of the same tensor."""
    key = id(x)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is x and entry[1] == x._version and entry[2] == quantizer.layout:
        return entry[3]
    packed = quantizer.pack(x, update)
    ref = weakref.ref(x, lambda r, k=key: _forget(k, r))
    _cache[key] = (ref, x._version, quantizer.layout, packed)
    return packed


def shared_entries() -> int:
    """How many live tensors currently have a shared packed copy (for tests)."""
    return sum(1 for ref, *_ in _cache.values() if ref() is not None)

"""Generic Mesa for any model: every saved activation the layer rules did not reach, in 8 bits.

Built on ``torch.autograd.graph.saved_tensors_hooks``. There is no stable module to own
running ranges here, so each saved tensor is packed with its own exact per-group range
(min/max of this tensor: 4-D tensors one group per head, others channel groups).
Parameters, casts of parameters, small and non-float tensors are kept as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from memwise.saved import SharedCache
from memwise_mesa.packed import PackedTensor
from memwise_mesa.quantizer import channel_groups, group_min_max, group_view, pack_with_range, unpack

_CASTS = ("ToCopyBackward0", "_ToCopyBackward0")


def _skip(t: torch.Tensor, min_numel: int) -> bool:
    if not t.is_floating_point() or t.dim() == 0 or t.numel() < min_numel or isinstance(t, nn.Parameter):
        return True
    return t.grad_fn is not None and type(t.grad_fn).__name__ in _CASTS and t.grad_fn.next_functions and \
        type(t.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"


def pack_dynamic(x: torch.Tensor, groups: int = 256, stochastic: bool = True) -> PackedTensor:
    """``x`` in 8 bits with its own per-group min/max as range."""
    x = x.detach().contiguous()
    layout = "head" if x.dim() == 4 else "channel"
    n = x.shape[1] if layout == "head" else channel_groups(x.shape[-1], groups)
    g, inner = group_view(x.shape, layout, n)
    lo, hi = group_min_max(x, g, inner)
    return pack_with_range(x, hi - lo, lo, layout, n, 8, stochastic)


class DynamicCodec:
    """8 bits with each tensor's own per-group min/max (``pack_dynamic``)."""

    share_key = "dynamic"

    def __init__(self, groups: int = 256, stochastic: bool = True) -> None:
        self.groups, self.stochastic = groups, stochastic

    def pack(self, x: torch.Tensor) -> PackedTensor:
        return pack_dynamic(x, self.groups, self.stochastic)

    def unpack(self, packed: PackedTensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack(packed, dtype)

    def nbytes(self, packed: PackedTensor) -> int:
        return packed.nbytes()


@contextlib.contextmanager
def generic_mesa(min_numel: int = 4096, groups: int = 256, stochastic: bool = True) -> Iterator[None]:
    """Within this context, saved floating tensors of at least ``min_numel`` elements are 8-bit."""
    cache = SharedCache()  # one packed copy of a tensor saved by several operations
    codec = DynamicCodec(groups, stochastic)

    def pack(t: torch.Tensor) -> object:
        return t if _skip(t, min_numel) else cache.pack(codec, t)

    def unpack_hook(obj: object) -> torch.Tensor:
        return unpack(obj) if isinstance(obj, PackedTensor) else obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack_hook):
        yield

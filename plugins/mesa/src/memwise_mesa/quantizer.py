"""Per-group 8-bit range quantizer whose ranges follow running estimates of min and max.

Mesa's rule: on the first batch alpha = max - min and beta = min per group; afterwards
alpha <- decay * alpha + (1 - decay) * (max - min), and the same for beta with min.
Codes are ``floor((x - beta) * levels / alpha + u)`` clamped to ``[0, levels]``; the
reference implementation lacks the upper clamp and wraps around, this one saturates.

Layouts: ``channel`` (contiguous channel groups of the last dimension), ``head`` (one group
per head of a [B, H, N, D] tensor) and ``head_channel`` (one group per head and channel:
rotary embeddings give q and k channels of very different magnitudes, which one range per
head resolves poorly). ``head_channel`` packs the tensor in [B, N, H, D] order, the order a
projection followed by ``view(...).transpose(1, 2)`` already has in memory, so every group
is a column of the (tokens, H x D) matrix; ``unpack`` transposes back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from memwise_mesa import kernels
from memwise_mesa.packed import PackedTensor

Layout = Literal["channel", "head", "head_channel"]
TINY_RANGE = 1e-8


def group_view(shape: torch.Size, layout: Layout, groups: int) -> tuple[int, int]:
    """(groups, inner) of the (outer, groups, inner) view of a contiguous tensor of ``shape``.

    ``channel``: the last dimension split into ``groups`` contiguous channel groups.
    ``head``: dimension 1 (B, H, N, D), one group per head.
    ``head_channel``: ``shape`` is the packed [B, N, H, D] order, one group per (head, channel).
    """
    if layout == "head_channel":
        if len(shape) != 4 or shape[2] * shape[3] != groups:
            raise ValueError(f"head_channel layout expects [B, N, H, D] with H x D = {groups}, got {tuple(shape)}")
        return groups, 1
    if layout == "head":
        if len(shape) < 2 or shape[1] != groups:
            raise ValueError(f"head layout expects dimension 1 of size {groups}, got shape {tuple(shape)}")
        return groups, math.prod(shape[2:])
    channels = shape[-1]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    return groups, channels // groups


def channel_groups(channels: int, wanted: int) -> int:
    """Contiguous channel groups used for ``channels``: one per channel when ``wanted`` is 0, else the
    largest divisor of ``channels`` not above ``wanted``."""
    if wanted == 0 or wanted >= channels:
        return channels
    return max(d for d in range(1, wanted + 1) if channels % d == 0)


def packing_order(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x`` in the contiguous order it is packed in ([B, H, N, D] -> [B, N, H, D] for ``head_channel``)."""
    if layout == "head_channel":
        x = x.transpose(1, 2)
    return x.detach().contiguous()


def group_min_max(x: torch.Tensor, groups: int, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of contiguous ``x``, in fp32."""
    view = x.detach().reshape(-1, groups, inner)
    return view.amin(dim=(0, 2)).float(), view.amax(dim=(0, 2)).float()


def pack_with_range(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, layout: Layout, groups: int,
                    bits: int = 8, stochastic: bool = True) -> PackedTensor:
    """Quantize ``x`` with the given per-group range ``alpha`` and offset ``beta``."""
    return pack_ordered(packing_order(x, layout), alpha, beta, layout, groups, bits, stochastic)


def pack_ordered(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, layout: Layout, groups: int,
                 bits: int = 8, stochastic: bool = True) -> PackedTensor:
    """``pack_with_range`` of an ``x`` already in ``packing_order``."""
    groups, inner = group_view(x.shape, layout, groups)
    levels = 2**bits - 1
    alpha = alpha.float().clamp_min(TINY_RANGE)
    payload = kernels.quantize(x, levels / alpha, beta.float(), groups, inner, levels, stochastic)
    return PackedTensor(payload, alpha / levels, beta.float().clone(), groups, inner, x.dtype,
                        transposed=layout == "head_channel")


def unpack(packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized tensor, in ``dtype`` (default: the dtype it was packed from), in its original shape."""
    out = kernels.dequantize(packed.payload, packed.scale, packed.offset, packed.groups, packed.inner,
                             dtype or packed.dtype)
    return out.transpose(1, 2) if packed.transposed else out


class RangeQuantizer(nn.Module):
    """Running per-group ranges (buffers ``alpha``, ``beta``, ``steps``) and 8-bit packing.

    ``groups`` may be None for a channel quantizer whose width is only known at the first
    call (a standalone activation); its buffers are then sized on first use or on load.
    """

    def __init__(self, layout: Layout, groups: int | None, decay: float = 0.9, bits: int = 8,
                 stochastic: bool = True, wanted_groups: int = 256) -> None:
        super().__init__()
        self.layout = layout
        self.decay = decay
        self.bits = bits
        self.stochastic = stochastic
        self.wanted_groups = wanted_groups
        size = groups or 0
        self.register_buffer("alpha", torch.zeros(size))
        self.register_buffer("beta", torch.zeros(size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def groups(self) -> int:
        return self.alpha.numel()

    def _ensure_size(self, x: torch.Tensor) -> None:
        if self.groups == 0:
            sizes = {"head": x.shape[1], "head_channel": x.shape[1] * x.shape[-1]}
            n = sizes.get(self.layout) or channel_groups(x.shape[-1], self.wanted_groups)
            self.alpha = torch.zeros(n, device=x.device)
            self.beta = torch.zeros(n, device=x.device)

    def observe(self, x: torch.Tensor) -> None:
        """Fold the per-group min/max of ``x`` into the running ranges."""
        self._ensure_size(x)
        self._fold(packing_order(x, self.layout))

    @torch.no_grad()
    def _fold(self, x: torch.Tensor) -> None:
        groups, inner = group_view(x.shape, self.layout, self.groups)
        lo, hi = group_min_max(x, groups, inner)
        lo, hi = lo.to(self.alpha.device), hi.to(self.alpha.device)
        if int(self.steps) == 0:
            self.alpha.copy_(hi - lo)
            self.beta.copy_(lo)
        else:
            self.alpha.mul_(self.decay).add_((hi - lo) * (1 - self.decay))
            self.beta.mul_(self.decay).add_(lo * (1 - self.decay))
        self.steps += 1

    def pack(self, x: torch.Tensor, update: bool = True) -> PackedTensor:
        """8-bit ``x``; with ``update`` (training) the running ranges see this batch first."""
        self._ensure_size(x)
        ordered = packing_order(x, self.layout)  # one copy at most, shared by observing and packing
        if update or int(self.steps) == 0:
            self._fold(ordered)
        return pack_ordered(ordered, self.alpha, self.beta, self.layout, self.groups, self.bits, self.stochastic)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("alpha", "beta"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, groups={self.groups}, bits={self.bits}, decay={self.decay}"

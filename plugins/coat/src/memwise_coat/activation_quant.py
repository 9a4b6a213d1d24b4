"""FP8 storage of tensors saved for backward: per-tensor for linear inputs, 1x16 groups elsewhere.

Forward outputs are computed from the full-precision inputs (exact); only what autograd keeps
for backward is FP8, and backward works on its dequantized copy. The formats are codecs on
``memwise.saved``'s Functions, which Mesa's 8-bit activations use too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from memwise.kernels.fp8 import E4M3, E5M2, FP8Format, quantize
from memwise.saved import SavedLinear, SavedRecompute, shared

ACT_GROUP = 16
CHUNK = 1 << 17
"""Elements quantized at a time: bounds the fp32 workspace of the torch path (512 KiB a buffer)."""


class PerTensorFP8:
    """A tensor as FP8 codes and one fp32 scale (the maximum of its 1x16 group maxima)."""

    def __init__(self, x: torch.Tensor, fmt: FP8Format = E4M3, group: int = ACT_GROUP) -> None:
        flat = x.detach().reshape(-1)
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, flat.numel(), CHUNK):
            part = flat[i:i + CHUNK].abs()
            part = F.pad(part, (0, (-part.numel()) % group)).view(-1, group).amax(dim=1)
            amax = torch.maximum(amax, part.amax().float())
        self.scale = torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))
        self.codes = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
        out = self.codes.view(-1)
        for i in range(0, flat.numel(), CHUNK):
            out[i:i + CHUNK] = quantize(flat[i:i + CHUNK].float() / self.scale, fmt)
        self.dtype = x.dtype

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * self.scale).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4


class GroupedFP8:
    """A tensor as FP8 codes with one bf16 scale per 1x16 group along the last dimension."""

    def __init__(self, x: torch.Tensor, fmt: FP8Format = E4M3, group: int = ACT_GROUP) -> None:
        x = x.detach()
        self.shape, self.dtype, self.group = x.shape, x.dtype, group
        last = x.shape[-1] if x.dim() else 1
        rows = x.reshape(-1, last)
        groups = -(-last // group)
        self.codes = torch.empty(rows.shape[0], groups, group, dtype=fmt.dtype, device=x.device)
        self.scale = torch.empty(rows.shape[0], groups, 1, dtype=torch.bfloat16, device=x.device)
        step = max(1, CHUNK // (groups * group))
        for r in range(0, rows.shape[0], step):
            g = F.pad(rows[r:r + step].float(), (0, groups * group - last)).view(-1, groups, group)
            amax = g.abs().amax(dim=-1, keepdim=True)
            scale = torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax)).to(torch.bfloat16)
            self.scale[r:r + step] = scale
            self.codes[r:r + step] = quantize(g / scale.float(), fmt)  # saturating: a bf16 scale may fall short

    def dequantize(self) -> torch.Tensor:
        g = self.codes.float() * self.scale.float()
        last = self.shape[-1] if len(self.shape) else 1
        return g.reshape(g.shape[0], -1)[:, :last].reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scale.numel()


class PerTensorCodec:
    """``PerTensorFP8`` as a ``memwise.saved`` codec (shared: one copy per input read by q, k and v)."""

    def __init__(self, fmt: FP8Format = E4M3) -> None:
        self.fmt = fmt
        self.share_key = ("coat-per-tensor", fmt.name)

    def pack(self, x: torch.Tensor) -> PerTensorFP8:
        return PerTensorFP8(x, self.fmt)

    def unpack(self, packed: PerTensorFP8, dtype: torch.dtype) -> torch.Tensor:
        return packed.dequantize().to(dtype)

    def nbytes(self, packed: PerTensorFP8) -> int:
        return packed.nbytes


class GroupedCodec:
    """``GroupedFP8`` (1x16 groups) as a ``memwise.saved`` codec."""

    share_key = None

    def pack(self, x: torch.Tensor) -> GroupedFP8:
        return GroupedFP8(x)

    def unpack(self, packed: GroupedFP8, dtype: torch.dtype) -> torch.Tensor:
        return packed.dequantize().to(dtype)

    def nbytes(self, packed: GroupedFP8) -> int:
        return packed.nbytes


LINEAR_INPUT = shared(PerTensorCodec())
GRAD_E5M2 = PerTensorCodec(E5M2)
GROUPED = GroupedCodec()


def fp8_recompute(fn: Callable[..., torch.Tensor], acts: Sequence[torch.Tensor],
                  params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``fn(*acts)``, keeping ``acts`` for backward as 1x16-group FP8 (params kept as they are)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*acts, *params)):
        return fn(*acts)
    return SavedRecompute.apply(fn, [GROUPED] * len(acts), False, len(acts), *acts, *params)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               grad_format: str | None = None) -> torch.Tensor:
    """A linear layer whose saved input is per-tensor FP8 E4M3 (``grad_format="e5m2"``: FP8 gradients)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    return SavedLinear.apply(x, weight, bias, LINEAR_INPUT, GRAD_E5M2 if grad_format == "e5m2" else None)

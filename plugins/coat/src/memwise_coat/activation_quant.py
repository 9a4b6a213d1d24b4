"""FP8 storage of tensors saved for backward: per-tensor for linear inputs, 1x16 groups elsewhere.

Forward outputs are computed from the full-precision inputs (exact); only what autograd keeps
for backward is FP8, and backward works on its dequantized copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from memwise.kernels.fp8 import E4M3, E5M2, FP8Format, quantize

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


def _shared_per_tensor(x: torch.Tensor) -> PerTensorFP8:
    """One FP8 copy per input tensor, shared by every linear layer that reads it (q, k, v)."""
    cached = getattr(x, "_memwise_coat_fp8", None)
    if cached is not None and cached[0] == x._version:
        return cached[1]
    packed = PerTensorFP8(x)
    x._memwise_coat_fp8 = (x._version, packed)
    return packed


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class FP8Linear(torch.autograd.Function):
    """y = x W^T + b, saving x as per-tensor FP8 E4M3; optional E5M2 output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                grad_format: FP8Format | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        ctx.packed = _shared_per_tensor(x)
        ctx.grad_format = grad_format
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        if ctx.grad_format is not None:
            grad_out = PerTensorFP8(grad_out, ctx.grad_format).dequantize()
        dtype = grad_out.dtype
        x = ctx.packed.dequantize().to(dtype)
        grad_x = grad_out @ weight.to(dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.packed = None
        return grad_x, grad_w, grad_b, None


class FP8Recompute(torch.autograd.Function):
    """out = fn(*activations) with module parameters as extra inputs; activations saved as 1x16 FP8.

    Backward recomputes ``fn`` on the dequantized activations and takes its vector-Jacobian product.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], num_acts: int, *tensors: torch.Tensor) -> torch.Tensor:
        acts, params = tensors[:num_acts], tensors[num_acts:]
        ctx.fn, ctx.params = fn, params
        ctx.packed = [GroupedFP8(a) for a in acts]
        ctx.autocast = _autocast_state(acts[0].device)
        with torch.no_grad():
            return fn(*acts)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        kind, enabled, dtype = ctx.autocast
        acts = [p.dequantize().requires_grad_(True) for p in ctx.packed]
        wanted = [t for t, need in zip([*acts, *ctx.params], ctx.needs_input_grad[2:]) if need]
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            out = ctx.fn(*acts)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
        result = [next(grads) if need else None for need in ctx.needs_input_grad[2:]]
        ctx.packed = ctx.fn = ctx.params = None
        return (None, None, *result)


def fp8_recompute(fn: Callable[..., torch.Tensor], acts: Sequence[torch.Tensor],
                  params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``fn(*acts)``, keeping ``acts`` for backward as 1x16-group FP8 (params kept as they are)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*acts, *params)):
        return fn(*acts)
    return FP8Recompute.apply(fn, len(acts), *acts, *params)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               grad_format: str | None = None) -> torch.Tensor:
    """A linear layer whose saved input is per-tensor FP8 E4M3 (``grad_format="e5m2"``: FP8 gradients)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    return FP8Linear.apply(x, weight, bias, E5M2 if grad_format == "e5m2" else None)

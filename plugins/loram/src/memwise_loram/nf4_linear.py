"""A frozen Linear stored in NF4 (QLoRAM's base), dequantized on the fly.

The dequantized weight is a temporary: the autograd function saves only references to
the packed buffers and dequantizes again in backward, so the full-precision weight is
never kept between forward and backward (it would otherwise count as an activation
of every layer).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from memwise.errors import NoEffectWarning
from memwise_loram.kernels import dequantize
from memwise_loram.nf4 import NF4Tensor, quantize_nf4


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, module: NF4Linear) -> torch.Tensor:
        ctx.module = module
        return x @ module.dequantized(x.dtype).t()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        return grad @ ctx.module.dequantized(grad.dtype), None


class NF4Linear(nn.Module):
    """Frozen ``y = x W^T + b`` with W stored as NF4 buffers (payload + scales)."""

    def __init__(self, linear: nn.Linear, block: int = 64, double_quant: bool = True, dq_block: int = 256) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.block, self.dq_block = block, dq_block
        q = quantize_nf4(linear.weight, block, double_quant, dq_block)
        self.register_buffer("payload", q.payload)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("dq_step", q.dq_step)
        self.register_buffer("dq_offset", q.dq_offset)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.payload, self.absmax, (self.out_features, self.in_features), self.block,
                         self.dq_step, self.dq_offset, self.dq_block)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.nf4(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"double_quant={self.dq_step is not None}")


def quantize_model(model: nn.Module, targets: Iterable[str], block: int = 64, double_quant: bool = True,
                   dq_block: int = 256, exclude: Iterable[str] = ()) -> list[str]:
    """Replace each plain Linear whose leaf name is in ``targets`` by an NF4Linear (idempotent).

    Embeddings, norms and the LM head stay in their dtype (as in QLoRA). Returns the names
    replaced; warns (NoEffectWarning) when none was.
    """
    targets, exclude = set(targets), tuple(exclude)
    done = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or leaf not in targets or (exclude and name.startswith(exclude)):
            continue
        if ".lora_A" in name or ".lora_B" in name:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, NF4Linear(module, block, double_quant, dq_block))
        done.append(name)
    if not done:
        warnings.warn(f"quantize_model replaced nothing (targets {sorted(targets)})", NoEffectWarning, stacklevel=2)
    return done

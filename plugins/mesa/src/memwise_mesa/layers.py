"""Converted layers: the original module's class swapped for a subclass that saves 8-bit inputs.

Swapping the class (``memwise.surgery.swap_class``) instead of wrapping the module keeps
parameter names, parameter objects and the optimizer's view unchanged; the running ranges
are attached as quantizer submodules (``mesa_input``, ``mesa_gate``, ``mesa_up``), so they
travel in the model's state dict. ``memwise.surgery.restore(model, OWNER)`` undoes both.
The saved inputs go through ``RangeCodec`` on ``memwise.saved``'s Functions.
"""

from __future__ import annotations

import torch
from torch import nn

from memwise import surgery
from memwise.saved import (Codec, SavedGatedLinear, SavedLinear, SavedRecompute, saving, shared,
                           with_autocast_weights)
from memwise_mesa.packed import PackedTensor
from memwise_mesa.quantizer import RangeQuantizer, unpack

OWNER = "mesa"


class RangeCodec:
    """8 bits with the quantizer's running per-group ranges; the ranges move only when ``update``."""

    def __init__(self, quantizer: RangeQuantizer, update: bool) -> None:
        self.quantizer, self.update = quantizer, update
        self.share_key = quantizer.layout

    def pack(self, x: torch.Tensor) -> PackedTensor:
        return self.quantizer.pack(x, self.update)

    def unpack(self, packed: PackedTensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack(packed, dtype)

    def nbytes(self, packed: PackedTensor) -> int:
        return packed.nbytes()


def codec(module: nn.Module, quantizer: RangeQuantizer) -> Codec:
    """The codec of one saved input: shared with every other save of it, ranges updated only in training."""
    return shared(RangeCodec(quantizer, update=module.training))


def own_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module._parameters.values() if p is not None]


class MesaLinearMixin:
    """nn.Linear saving its input in 8 bits (autocast handled as F.linear does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not saving(x, self):
            return super().forward(x)
        c = codec(self, self.mesa_input)
        return with_autocast_weights(x, self.weight, self.bias, lambda w, b: SavedLinear.apply(x, w, b, c))


class MesaRecomputeMixin:
    """A norm or activation saving its input in 8 bits and recomputing itself in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not saving(x, self):
            return super().forward(x)
        return SavedRecompute.apply(super().forward, [codec(self, self.mesa_input)], False, 1, x, *own_params(self))


def fuses_down_proj(mlp: nn.Module) -> bool:
    """True when the down projection is a plain ``nn.Linear`` that the gated MLP computes itself."""
    return type(mlp.down_proj) is nn.Linear


class MesaGatedMLPMixin:
    """``down(act(gate(x)) * up(x))`` with the product's two inputs saved in 8 bits.

    The activation's input, both operands of the product and, when the down projection is
    a plain ``nn.Linear``, its input too collapse into the two 8-bit projections
    ``gate(x)`` and ``up(x)``; backward recomputes ``act(g) * u`` from them. A down
    projection of another class (an adapter, an already converted linear) is called as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        u = self.up_proj(x)
        act = self.act_fn
        down = self.down_proj
        if not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad)):
            return down(act(g) * u)
        codecs = [codec(self, self.mesa_gate), codec(self, self.mesa_up)]
        if fuses_down_proj(self):
            return with_autocast_weights(x, down.weight, down.bias,
                                         lambda w, b: SavedGatedLinear.apply(g, u.to(g.dtype), w, b, act, codecs))
        h = SavedRecompute.apply(lambda a, b: act(a) * b, codecs, False, 2, g, u)
        del g, u  # only their 8-bit copies are needed now: free them before down_proj runs
        return down(h)


def is_converted(module: nn.Module) -> bool:
    return surgery.touched(module, OWNER)

"""Converted layers: the original module's class swapped for a subclass that saves 8-bit inputs.

Swapping the class (instead of wrapping the module) keeps parameter names, parameter
objects and the optimizer's view unchanged; the running ranges are added as quantizer
submodules (``mesa_input``, ``mesa_gate``, ``mesa_up``), so they travel in the model's
state dict. ``restore_class`` undoes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memwise_mesa.functions import GatedDownFn, MesaLinearFn, RecomputeFn
from memwise_mesa.quantizer import RangeQuantizer
from memwise_mesa.sharing import pack_shared


def saving(x: torch.Tensor, module: nn.Module) -> bool:
    """True when this call records a graph that will save activations."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False))


def packer(module: nn.Module, quantizer: RangeQuantizer) -> Any:
    """The packing function of one saved input: shared, ranges updated only in training."""
    return lambda x: pack_shared(quantizer, x, update=module.training)


def with_autocast_weights(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: Any) -> Any:
    """``fn(weight, bias)``, under autocast with both cast to its dtype and autocast off inside
    (as ``F.linear`` under autocast computes), otherwise as they are."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return fn(weight, bias)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        return fn(weight.to(dtype), bias.to(dtype) if bias is not None else None)


def own_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module._parameters.values() if p is not None]


class MesaLinearMixin:
    """nn.Linear saving its input in 8 bits (autocast handled as F.linear does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not saving(x, self):
            return super().forward(x)
        pack = packer(self, self.mesa_input)
        return with_autocast_weights(x, self.weight, self.bias, lambda w, b: MesaLinearFn.apply(x, w, b, pack))


class MesaRecomputeMixin:
    """A norm or activation saving its input in 8 bits and recomputing itself in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not saving(x, self):
            return super().forward(x)
        return RecomputeFn.apply(super().forward, [packer(self, self.mesa_input)], False, 1, x, *own_params(self))


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
        packers = [packer(self, self.mesa_gate), packer(self, self.mesa_up)]
        if fuses_down_proj(self):
            return with_autocast_weights(x, down.weight, down.bias,
                                         lambda w, b: GatedDownFn.apply(g, u.to(g.dtype), w, b, act, packers))
        h = RecomputeFn.apply(lambda a, b: act(a) * b, packers, False, 2, g, u)
        del g, u  # only their 8-bit copies are needed now: free them before down_proj runs
        return down(h)


_CLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the Mesa subclass of its own class (created once per class)."""
    original = type(module)
    key = (mixin, original)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Mesa{original.__name__}", (mixin, original), {"mesa_original": original})
    module.__class__ = _CLASSES[key]


def restore_class(module: nn.Module) -> None:
    """Undo ``swap_class`` and drop the quantizer submodules."""
    original = getattr(type(module), "mesa_original", None)
    if original is not None:
        module.__class__ = original
    for name in [n for n in module._modules if n.startswith("mesa_")]:
        del module._modules[name]


def is_converted(module: nn.Module) -> bool:
    return hasattr(type(module), "mesa_original") or "mesa_query" in module._modules

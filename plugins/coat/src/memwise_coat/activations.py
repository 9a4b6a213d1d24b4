"""``apply_fp8_activations(model)``: layers of a model keep their saved activations in FP8.

Linear layers save their input per tensor; norms, SiLU/GELU and the SwiGLU product save 1x16
groups. Each converted module gets a subclass of its own class (same parameters, same state-dict
keys), so conversion is idempotent and ``remove_fp8_activations`` undoes it.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from memwise import NoEffectWarning, architectures
from torch import nn

from memwise_coat.activation_quant import fp8_linear, fp8_recompute

_ORIGINAL = "_memwise_coat_original"
_ACTIVATIONS = ("SiLU", "GELU", "SiLUActivation", "GELUActivation", "NewGELUActivation", "GELUTanh",
                "PytorchGELUTanh", "FastGELUActivation", "QuickGELUActivation")


def _plain(module: nn.Module) -> type:
    return getattr(type(module), _ORIGINAL, type(module))


class _FP8LinearMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self._memwise_coat_grad_format)


class _FP8NormMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = super().forward  # type: ignore[misc]
        return fp8_recompute(lambda a: plain(a), [x], [p for p in self.parameters(recurse=False)])


class _FP8ActivationMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = super().forward  # type: ignore[misc]
        return fp8_recompute(lambda a: plain(a), [x])


class _FP8SwiGLUMixin:
    """down(act(gate(x)) * up(x)) with act and the product fused: gate and up saved as 1x16 FP8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act_fn
        act_forward = _plain(act).forward

        def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return act_forward(act, gate) * up

        return self.down_proj(fp8_recompute(swiglu, [self.gate_proj(x), self.up_proj(x)]))


def _kind(module: nn.Module) -> type | None:
    cls = _plain(module)
    if isinstance(module, nn.Linear):
        return _FP8LinearMixin
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _FP8SwiGLUMixin
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or cls.__name__.endswith(("RMSNorm", "LayerNorm")):
        return _FP8NormMixin
    if cls.__name__ in _ACTIVATIONS:
        return _FP8ActivationMixin
    return None


_CLASSES: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"FP8{cls.__name__}", (mixin, cls), {_ORIGINAL: cls, "__module__": cls.__module__})
    module.__class__ = _CLASSES[key]


def _selected(name: str, include: Iterable[str] | None, exclude: Iterable[str]) -> bool:
    if any(fnmatch.fnmatch(name, pat) for pat in exclude):
        return False
    return include is None or any(fnmatch.fnmatch(name, pat) for pat in include)


def check_architecture(model: nn.Module) -> None:
    """An HF model must keep its projections as separate ``nn.Linear`` (fused gate/up or Conv1D would leave
    part of every layer in full precision); refused by name otherwise."""
    adapter = architectures.hf_adapter(model)
    if adapter is not None:
        architectures.require(adapter, "coat", fused=False, conv1d=False)


def apply_fp8_activations(model: nn.Module, *, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                          linear: bool = True, nonlinear: bool = True, grad_format: str | None = None) -> list[str]:
    """Convert the model's layers in place; return the names of the modules converted this call.

    ``include``/``exclude``: glob patterns on qualified module names (``"lm_head"``,
    ``"model.layers.0.*"``). ``grad_format="e5m2"`` also rounds output gradients of linear layers
    to per-tensor E5M2. Already converted modules are skipped; converting nothing warns.
    """
    if grad_format not in (None, "e5m2"):
        raise ValueError(f"grad_format must be None or 'e5m2', got {grad_format!r}")
    check_architecture(model)
    include = list(include) if include is not None else None
    exclude = list(exclude)
    converted: list[str] = []
    fused: set[str] = set()  # act_fn of a converted SwiGLU block: the fused function covers it
    for name, module in model.named_modules():
        if not name or name in fused or hasattr(type(module), _ORIGINAL) or not _selected(name, include, exclude):
            continue
        mixin = _kind(module)
        if mixin is None or (mixin is _FP8LinearMixin and not linear) or (mixin is not _FP8LinearMixin and not nonlinear):
            continue
        _swap(module, mixin)
        if mixin is _FP8SwiGLUMixin:
            fused.add(f"{name}.act_fn")
        if mixin is _FP8LinearMixin:
            module._memwise_coat_grad_format = grad_format
        converted.append(name)
    if not converted:
        warnings.warn("apply_fp8_activations converted no module (already converted, or nothing matched)",
                      NoEffectWarning, stacklevel=2)
    return converted


def remove_fp8_activations(model: nn.Module) -> list[str]:
    """Give every converted module its original class back; return their names."""
    restored = []
    for name, module in model.named_modules():
        original: Any = getattr(type(module), _ORIGINAL, None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_memwise_coat_grad_format", None)
            restored.append(name)
    return restored

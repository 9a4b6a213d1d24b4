"""``apply_fp8_activations(model)``: layers of a model keep their saved activations in FP8.

Linear layers save their input per tensor; norms, SiLU/GELU and the SwiGLU product save 1x16
groups. Module kinds, selection and the class swap are ``memwise.surgery``'s (a subclass of the
module's own class: same parameters, same state-dict keys), so conversion is idempotent and
``remove_fp8_activations`` (``surgery.restore``) undoes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from memwise import NoEffectWarning, architectures, surgery
from memwise.surgery import LayerSpec
from torch import nn

from memwise_coat.activation_quant import fp8_linear, fp8_recompute

OWNER = "coat"


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
        act_forward = surgery.original_class(act).forward

        def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return act_forward(act, gate) * up

        return self.down_proj(fp8_recompute(swiglu, [self.gate_proj(x), self.up_proj(x)]))


_MIXINS = {"linear": _FP8LinearMixin, "glu": _FP8SwiGLUMixin, "norm": _FP8NormMixin,
           "activation": _FP8ActivationMixin}


def check_architecture(model: nn.Module) -> None:
    """An HF model must keep its projections as separate ``nn.Linear`` (fused gate/up or Conv1D would leave
    part of every layer in full precision); refused by name otherwise."""
    adapter = architectures.hf_adapter(model)
    if adapter is not None:
        architectures.require(adapter, "coat", fused=False, conv1d=False)


def apply_fp8_activations(model: nn.Module, *, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                          linear: bool = True, nonlinear: bool = True, grad_format: str | None = None,
                          layers: LayerSpec = "all") -> list[str]:
    """Convert the model's layers in place; return the names of the modules converted this call.

    ``include``/``exclude``: glob patterns on qualified module names (``"lm_head"``,
    ``"model.layers.0.*"``); ``layers``: decoder layers whose modules are converted ('all',
    indices or ranges such as '1,3-5'). ``grad_format="e5m2"`` also rounds output gradients of
    linear layers to per-tensor E5M2. Already converted modules are skipped; converting
    nothing warns.
    """
    if grad_format not in (None, "e5m2"):
        raise ValueError(f"grad_format must be None or 'e5m2', got {grad_format!r}")
    check_architecture(model)
    kinds = [k for k, on in (("linear", linear), ("glu", nonlinear), ("norm", nonlinear),
                             ("activation", nonlinear)) if on]
    include = list(include) if include is not None else None
    converted: list[str] = []
    fused: set[str] = set()  # act_fn of a converted SwiGLU block: the fused function covers it
    for name, module, kind in surgery.select_modules(model, include, list(exclude), layers, kinds):
        if name in fused or surgery.swapped_by(module, OWNER):
            continue
        surgery.swap_class(module, _MIXINS[kind], OWNER, "FP8")
        if kind == "glu":
            fused.add(f"{name}.act_fn")
        if kind == "linear":
            surgery.attach(module, OWNER, "_memwise_coat_grad_format", grad_format)
        converted.append(name)
    if not converted:
        warnings.warn("apply_fp8_activations converted no module (already converted, or nothing matched)",
                      NoEffectWarning, stacklevel=2)
    return converted


def remove_fp8_activations(model: nn.Module) -> list[str]:
    """Give every converted module its original class back; return their names."""
    return surgery.restore(model, OWNER)

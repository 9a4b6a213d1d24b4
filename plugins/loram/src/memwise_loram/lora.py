"""LoRA layers of our own, named like PEFT's (``base_layer``, ``lora_A``, ``lora_B``).

Same names as PEFT, so the state-dict keys map one to one onto PEFT's adapter format;
``lora_A`` is [r, in] (Kaiming-uniform init), ``lora_B`` is [out, r] (zeros), and the
update is ``B @ A * alpha / r``. Only the adapters train; the base is frozen.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from memwise.errors import NoEffectWarning
from memwise_loram.layout import projection_names


@dataclass
class LoraSpec:
    """Rank, alpha, dropout and target modules (projection names, as PEFT's ``target_modules``) of the adapters.

    No targets: the seven projections LoRAM prunes, named by the model's architecture adapter
    (``for_model``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def for_model(self, model: nn.Module) -> LoraSpec:
        """This spec with its targets named: the given ones, or every projection of ``model``'s architecture."""
        return self if self.targets else replace(self, targets=projection_names(model))


class LoraLinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, spec: LoraSpec) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.scaling = spec.scaling
        ref = next(base_layer.parameters(), None)
        kw = {"device": ref.device if ref is not None else None, "dtype": _float_dtype(base_layer)}
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, spec.rank, bias=False, **kw)
        self.lora_B = nn.Linear(spec.rank, out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return out + (self.lora_dropout(x) @ a.t() @ b.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight: B @ A * scaling."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _float_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None:
        return dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return None


def inject_lora(model: nn.Module, spec: LoraSpec, include: Iterable[str] = (), exclude: Iterable[str] = (),
                freeze: bool = True) -> list[str]:
    """Wrap every target projection of ``model`` in a LoraLinear; return the wrapped names.

    Without targets in ``spec``, the targets are the projections of the model's architecture.
    Idempotent (already wrapped modules are left alone). ``include``: only modules whose
    full name starts with one of these prefixes; ``exclude``: skip those prefixes. With
    ``freeze`` every non-adapter parameter gets requires_grad False, so an optimizer
    built from trainable parameters holds the adapters only. Warns (NoEffectWarning)
    when nothing was wrapped.
    """
    spec = spec.for_model(model)
    include, exclude = tuple(include), tuple(exclude)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in spec.targets or isinstance(module, LoraLinear) or ".base_layer" in name:
            continue
        if include and not name.startswith(include):
            continue
        if exclude and name.startswith(exclude):
            continue
        shape = _shape(module)
        if shape is None:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, LoraLinear(module, shape[0], shape[1], spec))
        wrapped.append(name)
    if freeze:
        freeze_base(model)
    if not wrapped:
        warnings.warn(f"inject_lora wrapped nothing (targets {list(spec.targets)}, include {list(include)}, "
                      f"exclude {list(exclude)})", NoEffectWarning, stacklevel=2)
    return wrapped


def freeze_base(model: nn.Module) -> None:
    """Only LoRA adapter weights train: everything else gets requires_grad False."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Name -> LoraLinear for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().clone()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().clone()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter into its (plain Linear) base weight and unwrap it; return the names."""
    merged = []
    for name, m in lora_modules(model).items():
        base = m.base_layer
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: can only merge into a plain Linear base, got {type(base).__name__}")
        base.weight.add_(m.delta_weight().to(base.weight.dtype))
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], base)
        merged.append(name)
    return merged

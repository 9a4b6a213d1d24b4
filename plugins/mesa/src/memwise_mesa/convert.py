"""``apply_mesa``: find the layers Mesa covers, swap them, attach running-range quantizers.

Covered kinds: ``linear`` (input), ``norm`` (LayerNorm/RMSNorm input), ``activation``
(GELU/SiLU input), ``glu`` (the SwiGLU product of a gate/up/down MLP) and ``attention``
(q, k, v of HF attention run through SDPA), as ``memwise.surgery.kind`` decides. Selection
(``include``/``exclude`` patterns, ``layers`` of decoder layers) and the class swap are
``memwise.surgery``'s, with one meaning across plugins; ``revert_mesa`` is its ``restore``.
Idempotent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from memwise import architectures, surgery
from memwise.attention import set_attention_implementation
from memwise.errors import NoEffectWarning
from memwise.surgery import KINDS, LayerSpec
from memwise_mesa import attention, rounding
from memwise_mesa import layers as mesa_layers
from memwise_mesa.layers import OWNER, fuses_down_proj, is_converted
from memwise_mesa.quantizer import RangeQuantizer, channel_groups

ATTENTION_GROUPS = ("head", "head_channel")


@dataclass
class QuantizerSpec:
    """One quantizer to attach: attribute name, layout and group count (None: sized on first use)."""

    attr: str
    layout: str
    groups: int | None


@dataclass
class Conversion:
    name: str
    kind: str
    quantizers: list[QuantizerSpec]


@dataclass
class MesaReport:
    """What ``apply_mesa`` did: converted modules by kind, and those already converted."""

    converted: dict[str, str] = field(default_factory=dict)
    already: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.converted.values():
            out[kind] = out.get(kind, 0) + 1
        return out


def _norm_width(module: nn.Module) -> int:
    return int(module.weight.shape[-1])


def plan_mesa(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
              kinds: Sequence[str] = KINDS, groups: int = 256,
              attention_groups: str = "head_channel",
              partial: bool = False, layers: LayerSpec = "all") -> tuple[list[Conversion], MesaReport]:
    """The conversions ``apply_mesa`` would make, without touching ``model``.

    An HF model must be of an architecture whose attention and MLP Mesa converts whole
    (separate q/k/v and gate/up ``nn.Linear`` projections, SDPA attention); any other is
    refused rather than converted in part, unless ``partial`` (generic Mesa's saved-tensor
    hooks then pack what the layer rules leave).
    """
    adapter = architectures.hf_adapter(model)
    if adapter is not None and not partial:
        architectures.require(adapter, "mesa", fused=False, conv1d=False, soft_capped=False)
    report = MesaReport()
    plan: list[Conversion] = []
    glu_children: set[str] = set()
    for name, module, kind in surgery.select_modules(model, layers=layers):
        if is_converted(module):
            report.already.append(name)
            if kind == "glu":
                glu_children.add(f"{name}.act_fn")
                if fuses_down_proj(module):
                    glu_children.add(f"{name}.down_proj")
            continue
        if kind not in kinds:
            report.skipped[name] = f"kind '{kind}' not in layers"
            continue
        if not surgery.selected(name, include, exclude):
            report.skipped[name] = "excluded by include/exclude"
            continue
        if kind in ("activation", "linear") and name in glu_children:
            continue
        if kind == "linear":
            specs = [QuantizerSpec("mesa_input", "channel", channel_groups(module.in_features, groups))]
        elif kind == "norm":
            specs = [QuantizerSpec("mesa_input", "channel", channel_groups(_norm_width(module), groups))]
        elif kind == "activation":
            specs = [QuantizerSpec("mesa_input", "channel", None)]
        elif kind == "glu":
            width = channel_groups(module.gate_proj.out_features, groups)
            specs = [QuantizerSpec("mesa_gate", "channel", width), QuantizerSpec("mesa_up", "channel", width)]
            glu_children.add(f"{name}.act_fn")
            if fuses_down_proj(module):
                glu_children.add(f"{name}.down_proj")
        else:
            impl = getattr(module.config, "_attn_implementation", None)
            if impl not in ("sdpa", attention.IMPLEMENTATION):
                report.skipped[name] = (f"attention implementation '{impl}' is not sdpa; only SDPA attention is "
                                        "converted (use generic: true for explicit attention)")
                continue
            heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            per = module.head_dim if attention_groups == "head_channel" else 1
            specs = [QuantizerSpec(name, attention_groups, n * per)
                     for name, n in (("mesa_query", heads), ("mesa_key", kv_heads), ("mesa_value", kv_heads))]
        plan.append(Conversion(name, kind, specs))
        report.converted[name] = kind
    return plan, report


_MIXINS = {"linear": mesa_layers.MesaLinearMixin, "norm": mesa_layers.MesaRecomputeMixin,
           "activation": mesa_layers.MesaRecomputeMixin, "glu": mesa_layers.MesaGatedMLPMixin}


def apply_mesa(model: nn.Module, bits: int = 8, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
               kinds: Sequence[str] = KINDS, groups: int = 256, decay: float = 0.9,
               stochastic: bool = True, attention_groups: str = "head_channel",
               partial: bool = False, layers: LayerSpec = "all") -> MesaReport:
    """Convert ``model`` in place so that the covered layers save 8-bit activations.

    ``include``/``exclude``: fnmatch patterns on module names (``"*lm_head"``,
    ``"model.layers.0.*"``). ``groups``: ranges per non-attention tensor, n contiguous
    channel groups (one per channel up to width n), 0 for one per channel. ``attention_groups``: one range per head and
    channel (``head_channel``) or per head (``head``) for q, k and v. ``layers``: decoder
    layers whose modules are converted ('all', indices or ranges such as '1,3-5'; not 'all'
    leaves modules outside decoder layers, such as lm_head, alone). ``partial``: accept an
    architecture Mesa's layer rules cover only in part (fused or Conv1D projections, soft-capped
    attention), for use under ``generic_mesa``; otherwise it is refused by name. Warns
    ``NoEffectWarning`` when nothing changes.
    """
    if bits != 8:
        raise ValueError(f"bits={bits}: only 8-bit storage is implemented")
    if attention_groups not in ATTENTION_GROUPS:
        raise ValueError(f"attention_groups={attention_groups!r}: choose from {', '.join(ATTENTION_GROUPS)}")
    plan, report = plan_mesa(model, include, exclude, kinds, groups, attention_groups, partial, layers)
    if plan:  # the rounding stream follows the caller's seed (torch.manual_seed before conversion)
        rounding.reseed(int(torch.randint(0, 2**62, (1,)).item()))
    modules = dict(model.named_modules())
    attention_used = False
    for conv in plan:
        module = modules[conv.name]
        device = next((t.device for t in module.parameters()), None)
        for spec in conv.quantizers:
            q = RangeQuantizer(spec.layout, spec.groups, decay=decay, bits=bits, stochastic=stochastic,
                               wanted_groups=groups)
            surgery.attach(module, OWNER, spec.attr, q.to(device) if device is not None else q)
        if conv.kind == "attention":
            attention_used = True
        else:
            surgery.swap_class(module, _MIXINS[conv.kind], OWNER, "Mesa")
    if attention_used:
        set_attention_implementation(model, attention.register())
    if not plan:
        warnings.warn(f"apply_mesa converted nothing (already converted: {len(report.already)}, "
                      f"skipped: {len(report.skipped)})", NoEffectWarning, stacklevel=2)
    return report


def revert_mesa(model: nn.Module) -> None:
    """Undo ``apply_mesa``: original classes, no quantizers, SDPA attention."""
    reset_attention = any(attention.QUANTIZERS[0] in m._modules for m in model.modules())
    surgery.restore(model, OWNER)
    if reset_attention:
        set_attention_implementation(model, "sdpa")


def quantizers(model: nn.Module) -> dict[str, RangeQuantizer]:
    """Every running-range quantizer of a converted model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RangeQuantizer)}


def ranges_state_dict(model: nn.Module) -> dict[str, dict]:
    """The running ranges as plain tensors (loads with ``torch.load(weights_only=True)``)."""
    return {n: {"alpha": q.alpha.detach().cpu().clone(), "beta": q.beta.detach().cpu().clone(),
                "steps": int(q.steps)} for n, q in quantizers(model).items()}


def load_ranges_state_dict(model: nn.Module, state: dict[str, dict]) -> None:
    """Restore ``ranges_state_dict``; every quantizer of the model must be present in ``state``."""
    found = quantizers(model)
    missing = sorted(set(found) - set(state))
    unexpected = sorted(set(state) - set(found))
    if missing or unexpected:
        raise KeyError(f"Mesa ranges do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, q in found.items():
        q.load_state_dict({"alpha": state[name]["alpha"], "beta": state[name]["beta"],
                           "steps": torch.tensor(int(state[name]["steps"]), dtype=torch.int64)})

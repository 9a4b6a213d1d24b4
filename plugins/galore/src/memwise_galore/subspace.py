"""What GaLore and FRUGAL share: AdamW replaced for selected linear weights, with its state-byte estimate.

Both keep Adam state on a subspace of each chosen weight's gradient; they differ in the
subspace and in the bytes per parameter, which each passes in as ``state_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

import memwise
from memwise import MemoryDelta, Problem, hookimpl, surgery


def projected_parameters(model: Any, include: Optional[list[str]], exclude: list[str]) -> list:
    """Weights of ``nn.Linear`` modules whose names match ``include`` (None: all) and no ``exclude`` glob."""
    return [module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.weight.requires_grad
            and surgery.selected(name, include, exclude)]


def adamw_subspace_problems(plugin: str, ctx: Any, include: Optional[list[str]], exclude: list[str]) -> list:
    """What GaLore and FRUGAL both need: AdamW as the recipe's optimizer, and weights to act on."""
    name = ctx.config.optimizer.name if ctx.config else "adamw"
    problems = []
    if name != "adamw":
        problems.append(Problem(plugin, f"replaces AdamW, but the recipe's optimizer is '{name}'; "
                                "set optimizer.name: adamw"))
    if ctx.model is not None and not projected_parameters(ctx.model, include, exclude):
        problems.append(Problem(f"{plugin}.include", "matches no linear weight of the model; "
                                "check the include/exclude globs"))
    return problems


def subspace_state_delta(model: nn.Module, include: Optional[list[str]], exclude: list[str],
                         state_bytes: Callable[[torch.Tensor, bool], int], label: str) -> MemoryDelta:
    """Optimizer-state change against AdamW: ``state_bytes(p, chosen)`` of every trainable parameter,
    minus the same with nothing chosen (plain AdamW)."""
    chosen = {id(p) for p in projected_parameters(model, include, exclude)}
    params = [p for p in model.parameters() if p.requires_grad]
    ours = sum(state_bytes(p, id(p) in chosen) for p in params)
    base = sum(state_bytes(p, False) for p in params)
    return MemoryDelta(optimizer_state=ours - base,
                       note=f"{label} on {len(chosen)} weights: optimizer state {ours / max(base, 1):.3f}x AdamW's")


def replace_adamw(plugin: str, ctx: Any, cls: type, include: Optional[list[str]], exclude: list[str],
                  params_key: str, options: dict[str, Any]) -> None:
    """``ctx.optimizer`` (a torch AdamW) becomes ``cls.from_torch`` on the chosen weights."""
    if not isinstance(ctx.optimizer, torch.optim.AdamW):
        raise TypeError(f"{plugin} replaces torch.optim.AdamW, got {type(ctx.optimizer).__name__}")
    chosen = projected_parameters(ctx.model, include, exclude)
    ctx.optimizer = cls.from_torch(ctx.optimizer, **{params_key: chosen}, **options)


class SubspaceAdamWPlugin(memwise.Plugin):
    """What the GaLore and FRUGAL plugins share: they replace the recipe's AdamW (no model surgery),
    provide the optimizer states, and need AdamW and at least one selected linear weight."""

    strategy_notes = {"fsdp": "it chooses each weight's subspace (GaLore's projection, FRUGAL's columns) from the "
                              "whole 2-D gradient, which FSDP2 splits by rows across ranks; use trainer.strategy=ddp"}

    def transforms_model(self) -> bool:
        return False

    def provides(self) -> set[str]:
        return {"optimizer.states"}

    @hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        return adamw_subspace_problems(self.name, ctx, self.config.include, self.config.exclude)

"""The galore plugin: the recipe's AdamW becomes GaLoreAdamW for the selected linear weights."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal, Optional

import memwise
from memwise import MemoryDelta, Problem, RecipeError, hookimpl, option


def projected_parameters(model: Any, include: Optional[list[str]], exclude: list[str]) -> list:
    """Weights of ``nn.Linear`` modules whose names match ``include`` (None: all) and no ``exclude`` glob."""
    from torch import nn

    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        if include is not None and not any(fnmatch.fnmatch(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatch(name, pat) for pat in exclude):
            continue
        chosen.append(module.weight)
    return chosen



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

class GaLorePlugin(memwise.Plugin):
    """GaLore / Natural GaLore: Adam moments of low-rank projected gradients for linear weights."""

    name = "galore"
    summary = "GaLore / Natural GaLore: Adam states in a low-rank gradient subspace (2-D weights)"
    phase = "replace"
    distribution = "memwise-galore"

    @dataclass
    class Config:
        rank: int = option(128, "rank r of the gradient projection")
        update_proj_gap: int = option(200, "steps between projector refreshes (T)")
        scale: float = option(0.25, "scale alpha of the projected-back update")
        proj_type: Literal["auto", "left", "right"] = option("auto", "side to project (auto: by shape, the "
                                                            "projector spans the shorter side)")
        proj_method: Literal["svd", "randomized"] = option("svd", "projector from the gradient's SVD or a "
                                                            "randomized range finder")
        natural: bool = option(False, "Natural GaLore: precondition with the inverse empirical Fisher (Woodbury)")
        history: int = option(8, "projected gradients kept for the Fisher (natural only)")
        damping: float = option(0.1, "Fisher damping, relative to the history's mean squared entry")
        include: Optional[list[str]] = option(None, "globs on linear-module names to project (default: all)")
        exclude: list[str] = option(["*lm_head*", "*embed*"], "globs on module names kept on plain AdamW")

    def post_init(self) -> None:
        c, problems = self.config, []
        for key in ("rank", "update_proj_gap", "history"):
            if getattr(c, key) < 1:
                problems.append(Problem(f"galore.{key}", f"must be at least 1, got {getattr(c, key)}"))
        if c.damping <= 0:
            problems.append(Problem("galore.damping", f"must be positive, got {c.damping}"))
        if problems:
            raise RecipeError(problems)

    def transforms_model(self) -> bool:
        return False

    def provides(self) -> set[str]:
        return {"optimizer.states"}

    def options(self) -> dict[str, Any]:
        c = self.config
        return dict(rank=c.rank, update_proj_gap=c.update_proj_gap, scale=c.scale, proj_type=c.proj_type,
                    proj_method=c.proj_method, natural=c.natural, history=c.history, damping=c.damping)

    @hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        return adamw_subspace_problems(self.name, ctx, self.config.include, self.config.exclude)

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_galore.optimizer import galore_state_bytes

        c = self.config
        chosen = {id(p) for p in projected_parameters(ctx.model, c.include, c.exclude)}
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        ours = sum(galore_state_bytes(p, id(p) in chosen, c.rank, c.proj_type, c.natural, c.history) for p in params)
        base = sum(galore_state_bytes(p, False, 0, "", False, 0) for p in params)
        kind = "Natural GaLore" if c.natural else "GaLore"
        return MemoryDelta(optimizer_state=ours - base,
                           note=f"{kind} rank {c.rank} on {len(chosen)} weights: optimizer state "
                                f"{ours / max(base, 1):.3f}x AdamW's")

    @hookimpl
    def memwise_configure_optimizer(self, ctx: Any) -> None:
        import torch

        from memwise_galore.optimizer import GaLoreAdamW

        if not isinstance(ctx.optimizer, torch.optim.AdamW):
            raise TypeError(f"galore replaces torch.optim.AdamW, got {type(ctx.optimizer).__name__}")
        chosen = projected_parameters(ctx.model, self.config.include, self.config.exclude)
        ctx.optimizer = GaLoreAdamW.from_torch(ctx.optimizer, galore_params=chosen, **self.options())

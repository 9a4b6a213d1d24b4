"""The galore plugin: the recipe's AdamW becomes GaLoreAdamW for the selected linear weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from memwise import MemoryDelta, Problem, RecipeError, hookimpl, option
from memwise_galore.subspace import SubspaceAdamWPlugin, replace_adamw, subspace_state_delta


class GaLorePlugin(SubspaceAdamWPlugin):
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

    def options(self) -> dict[str, Any]:
        c = self.config
        return dict(rank=c.rank, update_proj_gap=c.update_proj_gap, scale=c.scale, proj_type=c.proj_type,
                    proj_method=c.proj_method, natural=c.natural, history=c.history, damping=c.damping)

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_galore.optimizer import galore_state_bytes

        c = self.config
        kind = "Natural GaLore" if c.natural else "GaLore"
        return subspace_state_delta(
            ctx.model, c.include, c.exclude,
            lambda p, chosen: galore_state_bytes(p, chosen, c.rank, c.proj_type, c.natural, c.history),
            f"{kind} rank {c.rank}")

    @hookimpl
    def memwise_configure_optimizer(self, ctx: Any) -> None:
        from memwise_galore.optimizer import GaLoreAdamW

        c = self.config
        replace_adamw(self.name, ctx, GaLoreAdamW, c.include, c.exclude, "galore_params", self.options())

"""The frugal plugin: the recipe's AdamW becomes FrugalAdamW for the selected linear weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from memwise import MemoryDelta, Problem, RecipeError, hookimpl, option
from memwise_galore.subspace import SubspaceAdamWPlugin, replace_adamw, subspace_state_delta


class FrugalPlugin(SubspaceAdamWPlugin):
    """FRUGAL: Adam on a state-full subspace of each linear weight's gradient, signSGD on the rest."""

    name = "frugal"
    summary = "FRUGAL: full-rank updates, Adam state only on a re-chosen subspace (density rho), signSGD elsewhere"
    phase = "replace"
    distribution = "memwise-frugal"

    @dataclass
    class Config:
        density: float = option(0.25, "fraction rho of each weight's columns (or rank) that keeps Adam state")
        update_gap: int = option(200, "steps between re-choosing the state-full subspace (T)")
        selection: Literal["columns", "svd"] = option("columns", "state-full subspace: random columns, or "
                                                      "the gradient's top singular directions (GaLore-style)")
        state_free: Literal["signsgd", "sgd"] = option("signsgd", "update of the rest of the gradient")
        free_lr_ratio: float = option(1.0, "learning rate of the state-free part, relative to the Adam one")
        include: Optional[list[str]] = option(None, "globs on linear-module names to split (default: all)")
        exclude: list[str] = option(["*lm_head*", "*embed*"], "globs on module names kept on plain AdamW")

    def post_init(self) -> None:
        c, problems = self.config, []
        if not 0 < c.density <= 1:
            problems.append(Problem("frugal.density", f"must be in (0, 1], got {c.density}"))
        if c.update_gap < 1:
            problems.append(Problem("frugal.update_gap", f"must be at least 1, got {c.update_gap}"))
        if c.free_lr_ratio < 0:
            problems.append(Problem("frugal.free_lr_ratio", f"must be 0 or more, got {c.free_lr_ratio}"))
        if problems:
            raise RecipeError(problems)

    def options(self) -> dict[str, Any]:
        c = self.config
        return dict(density=c.density, update_gap=c.update_gap, selection=c.selection, state_free=c.state_free,
                    free_lr_ratio=c.free_lr_ratio)

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_frugal.optimizer import frugal_state_bytes

        c = self.config
        return subspace_state_delta(ctx.model, c.include, c.exclude,
                                    lambda p, chosen: frugal_state_bytes(p, chosen, c.density, c.selection),
                                    f"FRUGAL density {c.density} ({c.selection})")

    @hookimpl
    def memwise_configure_optimizer(self, ctx: Any) -> None:
        from memwise_frugal.optimizer import FrugalAdamW

        c = self.config
        replace_adamw(self.name, ctx, FrugalAdamW, c.include, c.exclude, "frugal_params", self.options())

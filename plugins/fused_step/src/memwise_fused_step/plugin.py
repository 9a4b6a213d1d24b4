"""The fused_step plugin: the recipe's optimizer (or the one a state plugin made) steps in backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import memwise
from memwise import MemoryDelta, Problem, hookimpl

_CLIP = ("fused_step updates each parameter during backward, before the global gradient norm exists, "
         "so it cannot clip by norm (it does not implement two-pass clipping); set {key}: null, "
         "or remove fused_step")


class FusedStepPlugin(memwise.Plugin):
    """Optimizer step in backward: each gradient is used and freed as soon as it is accumulated."""

    name = "fused_step"
    summary = "optimizer step inside backward (post-accumulate-grad hooks): full gradients never exist"
    phase = "optimizer"
    after = ("coat", "galore", "frugal")  # wraps whatever optimizer the state plugins built
    distribution = "memwise-fused-step"
    strategies: ClassVar[tuple[str, ...]] = ("auto", "single_device")
    strategy_notes = {s: "it updates each parameter as its gradient is accumulated, before the ranks' gradients "
                         "are averaged, so ranks would drift apart; use one process (trainer.devices=1)"
                      for s in ("ddp", "ddp_spawn", "fsdp")}

    @dataclass
    class Config:
        pass

    def transforms_model(self) -> bool:
        return False

    @hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        problems = []
        t = ctx.config.trainer if ctx.config else None
        if t is not None and t.gradient_clip_val:
            problems.append(Problem("trainer.gradient_clip_val", _CLIP.format(key="trainer.gradient_clip_val")))
        processes = (int(t.devices) if str(t.devices).isdigit() else 2) if t is not None else 1
        if t is not None and processes * t.num_nodes > 1:
            problems.append(Problem("trainer.devices", "fused_step runs in one process: each rank would apply "
                                    "its own gradient before DDP averages them; set trainer.devices: 1, "
                                    "or remove fused_step"))
        problems += _trainer_problems(ctx.trainer)
        return problems

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        return MemoryDelta(gradients=-estimate.gradients,
                           note="no gradient outlives its parameter's update (at most a few tensors' "
                                "gradients live during backward)")

    @hookimpl
    def memwise_configure_optimizer(self, ctx: Any) -> None:
        from memwise_fused_step.fused import fuse_step

        problems = _trainer_problems(ctx.trainer)
        if problems:
            raise memwise.RecipeError(problems)
        ctx.optimizer = fuse_step(ctx.optimizer)

    @hookimpl
    def memwise_teardown(self, ctx: Any) -> None:
        from memwise_fused_step.fused import FusedStepOptimizer

        if isinstance(ctx.optimizer, FusedStepOptimizer):
            ctx.optimizer = ctx.optimizer.remove()


def _trainer_problems(trainer: Any) -> list[Problem]:
    """What a user's own Lightning Trainer asks that a step in backward cannot do."""
    if trainer is None:
        return []
    problems = []
    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        problems.append(Problem("accumulate_grad_batches", "fused_step applies each gradient as soon as it "
                                "exists, so gradients cannot accumulate over batches; use "
                                "accumulate_grad_batches=1 (a larger batch instead), or remove fused_step"))
    if getattr(trainer, "gradient_clip_val", None):
        problems.append(Problem("gradient_clip_val", _CLIP.format(key="Trainer(gradient_clip_val=...)")))
    return problems

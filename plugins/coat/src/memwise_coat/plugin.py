"""The COAT plugin: FP8 optimizer states (CoatAdamW) and FP8 activations, from a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import memwise
from memwise import MemoryDelta, Problem, RecipeError, hookimpl, option


class CoatPlugin(memwise.Plugin):
    """COAT: AdamW moments in per-group FP8 with dynamic range expansion; activations in FP8."""

    name = "coat"
    summary = "FP8 optimizer states (dynamic range expansion) and mixed-granularity FP8 activations"
    phase = "replace"
    distribution = "memwise-coat"
    strategies = (*memwise.Plugin.strategies, "fsdp")  # each rank quantizes its own shard (memwise_coat.state)
    per_rank_state = True  # its optimizer-state delta is one rank's shard's (groups within each shard)
    required_on_load = True  # its optimizer state holds FP8 moments a torch AdamW cannot load as they are
    capability_switch: ClassVar[dict[str, str]] = {"activation.storage": "coat.activations: false"}

    @dataclass
    class Config:
        optimizer: bool = option(True, "store AdamW moments as per-group FP8 (CoatAdamW)")
        activations: bool = option(True, "save activations for backward as FP8 (linear: per tensor, others: 1x16 groups)")
        group_size: int = option(128, "elements per optimizer-state quantization group")
        expansion: bool = option(True, "dynamic range expansion of each group (off: plain per-group FP8)")
        second_moment_format: Literal["e4m3", "e5m2"] = option("e4m3", "FP8 format of the second moment")
        min_numel: int = option(4096, "parameters with fewer elements keep fp32 moments")
        min_expansion: float = option(0.0625, "lower bound of the expansion exponent k (k < 1 compresses wide groups)")
        keep_fp32: list[str] = option(["*embed*", "*norm*"],
                                      "globs on parameter names or module class names whose moments stay fp32")
        fp8_gradients: bool = option(False, "round the output gradients of linear layers to per-tensor E5M2")
        include: Optional[list[str]] = option(None, "globs on module names to convert (default: all)")
        exclude: list[str] = option(["*.o_proj"], "globs on module names whose activations stay as they are "
                                    "(o_proj: SDPA already keeps its input)")

    def post_init(self) -> None:
        c, problems = self.config, []
        if not (c.optimizer or c.activations):
            problems.append(Problem("coat", "both parts are off (optimizer: false, activations: false); "
                                    "turn one on or remove the plugin"))
        if c.group_size < 1:
            problems.append(Problem("coat.group_size", f"must be at least 1, got {c.group_size}"))
        if c.min_numel < 0:
            problems.append(Problem("coat.min_numel", f"must be 0 or more, got {c.min_numel}"))
        if c.min_expansion <= 0:
            problems.append(Problem("coat.min_expansion", f"must be positive, got {c.min_expansion}"))
        if problems:
            raise RecipeError(problems)

    def transforms_model(self) -> bool:
        return self.config.activations

    def provides(self) -> set[str]:
        caps = set()
        if self.config.optimizer:
            caps.add("optimizer.states")
        if self.config.activations:
            caps.add("activation.storage")
        return caps

    def _optimizer_options(self) -> dict[str, Any]:
        c = self.config
        return dict(group_size=c.group_size, expansion=c.expansion, second_moment_format=c.second_moment_format,
                    min_numel=c.min_numel, min_expansion=c.min_expansion)

    def slowdown(self, ctx: Any) -> float:
        """FP8 quantization around the optimizer step and, with activations on, each linear layer; the
        paper reports its kernels at par with bf16 on GPUs, the CPU torch path is slower (not modelled)."""
        return 1.1 if self.config.activations else 1.05

    @hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        name = ctx.config.optimizer.name if ctx.config else "adamw"
        if self.config.optimizer and name != "adamw":
            return [Problem("coat.optimizer", f"replaces AdamW, but the recipe's optimizer is '{name}'; "
                            "set optimizer.name: adamw, or coat.optimizer: false")]
        if self.config.activations and ctx.model is not None:
            from memwise.architectures import UnsupportedArchitecture
            from memwise_coat.activations import check_architecture

            try:
                check_architecture(ctx.model)
            except UnsupportedArchitecture as err:
                return [Problem("coat.activations", f"{err} (coat.activations: false keeps the FP8 optimizer)")]
        return []

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_coat.estimate import activation_delta, optimizer_delta, transients

        notes, delta = [], MemoryDelta()
        if self.config.optimizer:
            shards = ctx.workload.shards if ctx.workload else 1  # FSDP2: each rank's shard of the state
            delta.optimizer_state, delta.optimizer_step, note = optimizer_delta(ctx.model, self.config, shards)
            notes.append(note)
        if self.config.activations:
            delta.activations, note = activation_delta(ctx.model, ctx.workload, self.config)
            delta.layer_backward, delta.layer_forward = transients(ctx.model, ctx.workload)
            notes.append(note)
        delta.note = "; ".join(notes)
        return delta

    @hookimpl
    def memwise_transform_model(self, ctx: Any) -> None:
        from memwise_coat.activations import apply_fp8_activations

        c = self.config
        names = apply_fp8_activations(ctx.model, include=c.include, exclude=c.exclude,
                                      grad_format="e5m2" if c.fp8_gradients else None)
        for name in names:
            ctx.claims.claim(name, self)

    @hookimpl
    def memwise_configure_optimizer(self, ctx: Any) -> None:
        if not self.config.optimizer:
            return
        import torch

        from memwise_coat.optimizer import CoatAdamW
        from memwise_coat.selection import fp32_parameters

        if not isinstance(ctx.optimizer, torch.optim.AdamW):
            raise TypeError(f"coat replaces torch.optim.AdamW, got {type(ctx.optimizer).__name__}")
        keep = fp32_parameters(ctx.model, self.config.keep_fp32)
        ctx.optimizer = CoatAdamW.from_torch(ctx.optimizer, fp32_params=keep, **self._optimizer_options())

    @hookimpl
    def memwise_teardown(self, ctx: Any) -> None:
        if self.config.activations and ctx.model is not None:
            from memwise_coat.activations import remove_fp8_activations

            remove_fp8_activations(ctx.model)

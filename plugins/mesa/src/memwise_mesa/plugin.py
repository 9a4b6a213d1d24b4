"""MesaPlugin: the memwise plugin around ``apply_mesa`` (phase replace, provides activation.storage)."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import memwise
from memwise.architectures import UnsupportedArchitecture
from memwise import MemoryDelta, Problem, RecipeError, option, surgery
from memwise.surgery import KINDS
from memwise_mesa.convert import ATTENTION_GROUPS


class MesaPlugin(memwise.Plugin):
    """8-bit saved activations with per-group ranges learned by running estimates (Mesa).

    State: the running ranges are buffers of the converted model (``*.mesa_*.alpha``,
    ``beta``, ``steps``), so any model checkpoint carries them; ``memwise_state_dict``
    returns the same values and, being loaded after the model, is authoritative, plus the
    stochastic-rounding stream (``memwise_mesa.rounding``), so resume is exact in callback
    mode too, where Lightning does not checkpoint torch's global RNG.
    """

    name = "mesa"
    summary = "8-bit saved activations with per-head/per-channel ranges learned by running estimates"
    stages = ("fit",)
    phase = "replace"
    distribution = "memwise-mesa"
    strategy_notes = {"fsdp": "Mesa's running quantization ranges are per-rank buffers; DDP broadcasts buffers "
                               "from rank 0 every step, FSDP2 does not, so each rank would quantize differently and "
                               "a sharded checkpoint would keep one rank's ranges. Use trainer.strategy=ddp, or the "
                               "checkpointing plugin under fsdp"}
    required_on_load = True

    @dataclasses.dataclass
    class Config:
        bits: int = option(8, "bits per saved activation value (only 8 is implemented)")
        decay: float = option(0.9, "running-range momentum: range <- decay * range + (1 - decay) * batch range")
        groups: int = option(256, "ranges per non-attention tensor: n contiguous channel groups (the largest "
                                  "divisor of the width not above n; one per channel up to width n), 0 = one "
                                  "per channel")
        attention_groups: str = option("head_channel", "ranges of q, k, v: one per head and channel "
                                                       "('head_channel') or one per head ('head')")
        stochastic: bool = option(True, "stochastic rounding (unbiased); false rounds to nearest")
        include: list[str] = option(["*"], "fnmatch patterns of module names to convert")
        exclude: list[str] = option([], "fnmatch patterns of module names to leave alone, e.g. '*lm_head'")
        kinds: list[str] = option(list(KINDS), "module kinds to convert: linear, norm, activation, glu, attention")
        layers: Union[str, list[Union[int, str]]] = option("all", "decoder layers whose modules are converted: "
                                                           "'all', indices or ranges such as '1,3-5' (not 'all' "
                                                           "leaves lm_head and other modules outside them alone)")
        generic: bool = option(False, "also pack every other saved activation with saved-tensor hooks")
        generic_min_numel: int = option(4096, "generic mode leaves saved tensors smaller than this alone")

    def post_init(self) -> None:
        c = self.config
        problems = []
        if c.bits != 8:
            problems.append(Problem("mesa.bits", f"got {c.bits}; only 8-bit storage is implemented: set bits: 8"))
        if not 0.0 <= c.decay < 1.0:
            problems.append(Problem("mesa.decay", f"got {c.decay}; use a momentum in [0, 1), e.g. 0.9"))
        if c.groups < 0:
            problems.append(Problem("mesa.groups", f"got {c.groups}; use 0 (one range per channel) or a positive "
                                                   "number of channel groups"))
        if c.attention_groups not in ATTENTION_GROUPS:
            problems.append(Problem("mesa.attention_groups",
                                    f"got {c.attention_groups!r}; choose from {', '.join(ATTENTION_GROUPS)}"))
        unknown = [k for k in c.kinds if k not in KINDS]
        if unknown:
            problems.append(Problem("mesa.kinds", f"unknown kinds {unknown}; choose from {', '.join(KINDS)}"))
        if isinstance(c.layers, list) and any(isinstance(k, str) for k in c.layers):
            problems.append(Problem("mesa.layers", f"got {c.layers}: mesa.layers now selects decoder layers, as in "
                                                   "every plugin ('all', indices or '1,3-5'); module kinds moved to "
                                                   f"mesa.kinds, e.g. kinds: {[k for k in c.layers if k in KINDS]}"))
        else:
            try:
                surgery.parse_layers(c.layers)
            except surgery.LayerSelectionError as err:
                problems.append(Problem("mesa.layers", str(err)))
        if c.generic_min_numel < 1:
            problems.append(Problem("mesa.generic_min_numel", f"got {c.generic_min_numel}; use 1 or more"))
        if problems:
            raise RecipeError(problems)

    def provides(self) -> set[str]:
        return {"activation.storage"}

    def _plan(self, model: Any) -> tuple[list, Any]:
        from memwise_mesa.convert import plan_mesa

        c = self.config
        return plan_mesa(model, c.include, c.exclude, c.kinds, c.groups, c.attention_groups, partial=c.generic,
                         layers=c.layers)

    def slowdown(self, ctx: Any) -> float:
        """Packing and unpacking every saved activation: 1.51x the step on tiny (docs/plugins/mesa.md)."""
        return 1.5

    @memwise.hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        if ctx.model is None:
            return []
        try:
            plan, report = self._plan(ctx.model)
        except UnsupportedArchitecture as err:
            return [Problem("mesa", f"{err}; or set generic: true (saved-tensor hooks pack what the layer rules "
                                    "leave)")]
        if not plan and not report.already and not self.config.generic:
            return [Problem("mesa.include", f"include {self.config.include} / exclude {self.config.exclude} / "
                                            f"kinds {self.config.kinds} / layers {self.config.layers} select no convertible module; widen "
                                            "them or set generic: true")]
        return []

    @memwise.hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_mesa.estimate import mesa_delta

        plan, _ = self._plan(ctx.model)
        w = ctx.workload
        act_bytes = w.activation_dtype.itemsize
        return mesa_delta(ctx.model, plan, self.config.groups, w.batch_size, w.seq_len, act_bytes,
                          mixed="mixed" in w.precision)

    @memwise.hookimpl
    def memwise_transform_model(self, ctx: Any) -> None:
        from memwise_mesa.convert import apply_mesa

        c = self.config
        plan, _ = self._plan(ctx.model)
        for conv in plan:
            ctx.claims.claim(conv.name, self)
        report = apply_mesa(ctx.model, c.bits, c.include, c.exclude, c.kinds, c.groups, c.decay, c.stochastic,
                            c.attention_groups, partial=c.generic, layers=c.layers)
        ctx.shared["mesa"] = {"converted": report.counts()}

    @memwise.hookimpl
    def memwise_step_context(self, ctx: Any) -> Any:
        if not self.config.generic:
            return None
        from memwise_mesa.generic import generic_mesa

        c = self.config
        return generic_mesa(c.generic_min_numel, c.groups, c.stochastic)

    @memwise.hookimpl
    def memwise_state_dict(self, ctx: Any) -> dict:
        from memwise_mesa import rounding
        from memwise_mesa.convert import ranges_state_dict

        return {"ranges": ranges_state_dict(ctx.model), "rounding": rounding.state_dict()}

    @memwise.hookimpl
    def memwise_load_state_dict(self, ctx: Any, state: dict) -> None:
        from memwise_mesa import rounding
        from memwise_mesa.convert import load_ranges_state_dict

        load_ranges_state_dict(ctx.model, state["ranges"])
        if "rounding" in state:  # checkpoints from before Mesa had its own stream lack it
            rounding.load_state_dict(state["rounding"])

    @memwise.hookimpl
    def memwise_teardown(self, ctx: Any) -> None:
        from memwise_mesa.convert import revert_mesa

        if ctx.model is not None:
            revert_mesa(ctx.model)

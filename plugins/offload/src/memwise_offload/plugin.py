"""OffloadPlugin: the memwise plugin around ``apply_offload`` (phase wrap, provides activation.placement)."""

from __future__ import annotations

import dataclasses
from typing import Any

import memwise
from memwise import MemoryDelta, Problem, RecipeError, option, surgery
from memwise.surgery import LayerSpec, select_layers


class OffloadPlugin(memwise.Plugin):
    """Saved activations of the chosen decoder layers go to host memory after their forward and
    come back for their backward; ``fraction`` of the tokens is swapped, the rest recomputed.

    It decides where activations live (``activation.placement``), not how they are stored, so it
    composes with Mesa (the 8-bit packed tensors are what travels) and with checkpointing on
    other layers; the same layer checkpointed and offloaded is a validation error.
    """

    name = "offload"
    summary = "offload decoder layers' saved activations to host (MEMO: token-wise swap + recompute)"
    strategy_notes = {"fsdp": "its per-layer swap beside FSDP2's per-layer gathering and resharding is not "
                              "checked yet; use trainer.strategy=ddp"}
    stages = ("fit",)
    phase = "wrap"
    distribution = "memwise-offload"

    @dataclasses.dataclass
    class Config:
        layers: LayerSpec = option("all", "decoder layers to offload: 'all', indices (negative count from the "
                                          "end) or inclusive ranges such as '1,3-5'")
        fraction: float = option(1.0, "share of each layer's tokens (whole sequences) swapped to host; the rest "
                                      "is recomputed in backward (0 = recompute all, 1 = swap all)")
        prefetch: int = option(1, "layers fetched back ahead of the one running backward")

    def post_init(self) -> None:
        c, problems = self.config, []
        try:
            surgery.parse_layers(c.layers)
        except surgery.LayerSelectionError as err:
            problems.append(Problem("offload.layers", str(err)))
        if not 0.0 <= c.fraction <= 1.0:
            problems.append(Problem("offload.fraction", f"got {c.fraction}; use a share in [0, 1]"))
        if c.prefetch < 0:
            problems.append(Problem("offload.prefetch", f"got {c.prefetch}; use 0 or more layers"))
        if problems:
            raise RecipeError(problems)

    def provides(self) -> set[str]:
        return {"activation.placement"}

    def _indices(self, model: Any) -> set[int]:
        found = len(select_layers(model))
        return set(surgery.layer_indices(self.config.layers, found))

    @memwise.hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        if ctx.model is None:
            return []
        try:
            mine = self._indices(ctx.model)
        except (IndexError, ValueError) as err:
            return [Problem("offload.layers", str(err))]
        ckpt = ctx.plugin("checkpointing")
        if ckpt is not None:
            theirs = set(surgery.layer_indices(ckpt.config.layers, len(select_layers(ctx.model))))
            both = sorted(mine & theirs)
            if both:
                return [Problem("offload.layers", f"layers {both} are both checkpointed and offloaded; give each "
                                                  "layer to one plugin (offload's fraction: 0 recomputes a layer)")]
        return []

    @memwise.hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise.memory import autocast_copy_bytes, llama_layer_activation_bytes

        w, config = ctx.workload, ctx.model.config
        n = len(self._indices(ctx.model))
        rows = w.batch_size
        share = min(rows, max(0, round(self.config.fraction * rows))) / rows
        layer = llama_layer_activation_bytes(config, w.batch_size, w.seq_len, w.precision)
        if estimate is not None:  # what the layers still save after the plugins before (Mesa's packed bytes)
            layer = min(layer, estimate.layer_activations // len(select_layers(ctx.model)))
        kept_input = (1 - share) * w.batch_size * w.seq_len * config.hidden_size * 4
        # prefetch + 1 whole layers; at prefetch 0 the running layer comes back a storage at a time, as
        # its backward reads each: counted whole here, an upper bound
        window = min(n, self.config.prefetch + 1)
        # autocast's weight copies are cast again in backward, not sent to host
        moved = max(0, layer - autocast_copy_bytes(config, w.precision) // max(1, len(select_layers(ctx.model))))
        return MemoryDelta(activations=int(-n * layer + n * kept_input), host=int(n * share * moved),
                           temporaries=int(window * share * moved + (1 - share) * layer),
                           note=f"{n} layers: {share:.0%} of tokens swapped to host, the rest recomputed; "
                                f"at most {window} layer(s) on the device in backward")

    @memwise.hookimpl
    def memwise_transform_model(self, ctx: Any) -> None:
        from memwise_offload.offload import apply_offload

        c = self.config
        for name in apply_offload(ctx.model, c.layers, c.fraction, c.prefetch):
            ctx.claims.claim(name, self)

    @memwise.hookimpl
    def memwise_teardown(self, ctx: Any) -> None:
        from memwise_offload.offload import remove_offload

        if ctx.model is not None:
            remove_offload(ctx.model)

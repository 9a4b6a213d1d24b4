"""The checkpointing plugin: activation recompute per decoder layer, with its estimate."""

from __future__ import annotations

from dataclasses import dataclass
import memwise
from memwise import MemoryDelta, Problem, architectures, hookimpl, option, surgery
from memwise.memory import llama_layer_activation_bytes
from memwise.models import decoder_layers
from memwise.surgery import LayerSpec, select_layers
from memwise_checkpointing.surgery import apply_checkpointing, remove_checkpointing


class CheckpointingPlugin(memwise.Plugin):
    """Keep only each chosen layer's input in forward; recompute the rest in backward."""

    name = "checkpointing"
    summary = "activation checkpointing: recompute decoder layers in backward"
    phase = "wrap"
    distribution = "memwise-checkpointing"
    strategies = (*memwise.Plugin.strategies, "fsdp")  # recompute inside each fully_shard unit, as torchtitan

    @dataclass
    class Config:
        layers: LayerSpec = option("all", "decoder layers to recompute: 'all', indices (negative count from "
                                          "the end) or inclusive ranges such as '1,3-5'")

    def post_init(self) -> None:
        try:
            surgery.parse_layers(self.config.layers)
        except surgery.LayerSelectionError as err:
            raise memwise.RecipeError([Problem("checkpointing.layers", str(err))]) from None

    def provides(self) -> set[str]:
        return {"activation.storage"}

    def _count(self, model) -> int:
        return len(select_layers(model, self.config.layers))

    def slowdown(self, ctx) -> float:
        """Each chosen layer's forward runs twice; a forward is about a third of a training step."""
        return 1.0 + self._count(ctx.model) / (3 * len(decoder_layers(ctx.model)))

    @hookimpl
    def memwise_validate(self, ctx) -> list:
        try:
            self._count(ctx.model)
        except architectures.UnsupportedArchitecture as err:
            return [Problem("checkpointing", str(err))]
        except (IndexError, ValueError) as err:
            return [Problem("checkpointing.layers", str(err))]
        return []

    @hookimpl
    def memwise_estimate_memory(self, ctx, estimate) -> MemoryDelta:
        w, config = ctx.workload, ctx.model.config
        adapter = architectures.for_model(ctx.model)
        layer = llama_layer_activation_bytes(config, w.batch_size, w.seq_len, w.precision)
        embed = getattr(adapter.backbone_of(architectures.hf_root(ctx.model)), adapter.embed)
        kept = w.batch_size * w.seq_len * adapter.geometry(config).hidden * embed.weight.element_size()
        n = self._count(ctx.model)
        masks = 0
        if n and getattr(config, "_attn_implementation", "sdpa") != "sdpa":
            # eager attention takes float masks (one per kind of layer: full, sliding), which become checkpoint inputs
            kinds = len(set(getattr(config, "layer_types", None) or ["full_attention"]))
            masks = kinds * w.batch_size * w.seq_len ** 2 * embed.weight.element_size()
        return MemoryDelta(activations=-n * (layer - kept) + masks, temporaries=layer,
                           note=f"{n} of {len(decoder_layers(ctx.model))} layers keep only their input; "
                                "one layer is recomputed at a time in backward")

    @hookimpl
    def memwise_transform_model(self, ctx) -> None:
        for name in apply_checkpointing(ctx.model, self.config.layers):
            ctx.claims.claim(name, self)

    @hookimpl
    def memwise_teardown(self, ctx) -> None:
        remove_checkpointing(ctx.model)

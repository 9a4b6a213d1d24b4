"""The memwise plugin: installs a pruned KV cache for ``memwise generate`` and predict."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import memwise
from memwise import Problem, RecipeError, option


class KVPrunePlugin(memwise.Plugin):
    """KV-cache pruning at generation: ThinK key channels, token eviction, FP8 or int4 storage."""

    name = "kvprune"
    summary = "KV-cache pruning: ThinK key channels (compact), StreamingLLM/SnapKV eviction, FP8/int4 storage"
    stages = ("generate",)
    phase = "runtime"
    distribution = "memwise-kvprune"
    plan_variants = (  # the defaults are ThinK at half the key channels
        {"think_ratio": 0.0, "quant": "e4m3"},
        {"think_ratio": 0.0, "quant": "int4"},
        {"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.7},
        {"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.5},
        {"think_ratio": 0.0, "eviction": "streaming", "budget": 0.5},
        {"quant": "e4m3"},
        {"eviction": "snapkv", "budget": 0.7, "quant": "e4m3"},
        {"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.7, "quant": "int4"},
    )
    """What ``memwise plan --stage generate`` tries: FP8, int4, ThinK, SnapKV, StreamingLLM and compositions."""

    @dataclasses.dataclass
    class Config:
        think_ratio: float = option(0.5, "fraction of key channels pruned per KV head (0 keeps all)")
        think_window: int = option(0, "last prompt tokens whose keys stay full width (ThinK's authors: 32)")
        think_observe: int = option(32, "last prompt queries that score the key channels")
        fold_every: int = option(0, "prune the oldest window tokens every N decoded tokens (0: never)")
        eviction: Literal["none", "streaming", "snapkv"] = option("none", "token eviction policy at prefill")
        budget: float = option(0.5, "fraction of the prompt's tokens kept per KV head when evicting")
        sinks: int = option(4, "streaming and snapkv: first non-pad tokens always kept")
        evict_observe: int = option(32, "snapkv: last prompt tokens whose attention votes")
        kernel: int = option(7, "snapkv: width of the average pooling of votes (odd)")
        quant: Literal["none", "e4m3", "e5m2", "int4"] = option(
            "none", "storage of pruned keys and values: FP8 (e4m3, e5m2) or 4-bit integers, per-token scales")
        quant_group: int = option(16, "int4: channels sharing one scale (one per row when it does not divide)")

    def post_init(self) -> None:
        c = self.config
        problems = []
        if not 0.0 <= c.think_ratio < 1.0:
            problems.append(Problem("kvprune.think_ratio", f"must be in [0, 1), got {c.think_ratio}"))
        for key in ("think_window", "fold_every", "sinks"):
            if getattr(c, key) < 0:
                problems.append(Problem(f"kvprune.{key}", f"must be >= 0, got {getattr(c, key)}"))
        for key in ("think_observe", "evict_observe", "quant_group"):
            if getattr(c, key) < 1:
                problems.append(Problem(f"kvprune.{key}", f"must be >= 1, got {getattr(c, key)}"))
        if not 0.0 < c.budget <= 1.0:
            problems.append(Problem("kvprune.budget", f"must be in (0, 1], got {c.budget}"))
        if c.kernel < 1 or c.kernel % 2 == 0:
            problems.append(Problem("kvprune.kernel", f"must be an odd number >= 1, got {c.kernel}"))
        if c.eviction == "none" and c.budget != 0.5:
            problems.append(Problem("kvprune.budget", "is set but eviction is 'none': set eviction to "
                                    "'streaming' or 'snapkv', or drop budget"))
        if c.quant != "int4" and c.quant_group != 16:
            problems.append(Problem("kvprune.quant_group", f"is set but quant is {c.quant!r}: set quant to 'int4', "
                                    "or drop quant_group"))
        if c.think_ratio == 0 and c.fold_every:
            problems.append(Problem("kvprune.fold_every", "folds into the ThinK store, but think_ratio is 0"))
        if problems:
            raise RecipeError(problems, source="plugin 'kvprune'")

    def provides(self) -> set[str]:
        return {"kv.cache"}

    def cache_settings(self) -> dict:
        """The keyword arguments of :func:`memwise_kvprune.make_cache` for this config."""
        from memwise_kvprune.specs import FP8, Eviction, Int4, ThinK

        c = self.config
        think = ThinK(c.think_ratio, c.think_window, c.think_observe, c.fold_every) if c.think_ratio > 0 else None
        eviction = None if c.eviction == "none" else Eviction(c.eviction, c.budget, c.sinks, c.evict_observe, c.kernel)
        quant = None if c.quant == "none" else Int4(c.quant_group) if c.quant == "int4" else FP8(c.quant)
        return {"think": think, "eviction": eviction, "quant": quant}

    @memwise.hookimpl
    def memwise_validate(self, ctx: memwise.RunContext) -> list:
        """The model must dispatch attention through transformers' AttentionInterface."""
        model = ctx.model
        if model is None:
            return []
        if not callable(getattr(model, "set_attn_implementation", None)) or not hasattr(model, "config"):
            return [Problem("kvprune", f"needs a transformers model with pluggable attention, got "
                            f"{type(model).__name__}: build the model with the llama builder")]
        from memwise.architectures import UnsupportedArchitecture, require

        try:  # the pruned attention is SDPA over the kept keys: soft-capped logits (Gemma2) would be lost
            require(model, "kvprune", soft_capped=False)
        except UnsupportedArchitecture as err:
            return [Problem("kvprune", str(err))]
        can_set = getattr(model, "_can_set_attn_implementation", lambda: True)
        if not can_set():
            return [Problem("kvprune", f"{type(model).__name__} does not dispatch attention through "
                            "AttentionInterface, so the pruned cache cannot be read: use a model that does")]
        self.warn_unsafe(sum(p.numel() for p in model.parameters()))
        return []

    def warn_unsafe(self, params: int) -> list[str]:
        """Warn (not fail) for each setting outside the range measured to keep retrieval at this model size."""
        from memwise_kvprune.safety import unsafe_settings

        c = self.config
        found = unsafe_settings(params, c.think_ratio, c.eviction, c.budget)
        for message in found:
            warnings.warn(f"kvprune: {message}", UserWarning, stacklevel=2)
        return found

    @memwise.hookimpl
    def memwise_estimate_memory(self, ctx: memwise.RunContext, estimate: Any) -> Any:
        """At stage generate: the pruned cache in place of the dense one (``predict_nbytes``, exact), and
        SnapKV's scoring at prefill as a transient inside the last layer's forward."""
        if ctx.stage != "generate":
            return None
        from memwise.architectures import for_config
        from memwise.memory import MemoryDelta, kv_cache_bytes

        from memwise_kvprune.bytes import kept_prompt_tokens, predict_nbytes
        from memwise_kvprune.compat import text_config

        config = text_config(ctx.model)
        geo = for_config(config).geometry(config)
        w = ctx.workload
        b, prompt, decoded = w.batch_size, w.seq_len, max(w.max_new_tokens - 1, 0)  # the last token is not fed
        size = w.activation_dtype.itemsize
        dense = kv_cache_bytes(config, b, prompt + decoded, size)
        settings = self.cache_settings()
        pruned = predict_nbytes(geo.layers, b, geo.kv_heads, geo.head_dim, prompt, decoded, dtype_bytes=size,
                                **settings)
        transient = 0
        c = self.config
        if c.eviction == "snapkv" and kept_prompt_tokens(prompt, settings["eviction"]) < prompt:
            # the prompt's causal visibility mask (bool) and the observation window's fp32 scores
            transient = b * prompt * prompt + b * geo.heads * c.evict_observe * prompt * 4
        return MemoryDelta(kv_cache=pruned - dense, layer_forward=transient,
                           note=f"pruned KV cache {pruned:,} B instead of {dense:,} B")

    def quality_cost(self, ctx: memwise.RunContext) -> float:
        """An ordering, not a measurement: the fraction of key channels and prompt tokens dropped (StreamingLLM's
        twice, it loses facts outside its window), a little for FP8 and more for int4 storage, and one more for
        each setting outside the range measured to keep retrieval at this model size (``safety``)."""
        from memwise_kvprune.safety import unsafe_settings

        c = self.config
        cost = c.think_ratio + {"none": 0.0, "snapkv": 1.0, "streaming": 2.0}[c.eviction] * (1.0 - c.budget)
        cost += {"none": 0.0, "e4m3": 0.02, "e5m2": 0.04, "int4": 0.1}[c.quant]
        if ctx.model is not None:
            cost += len(unsafe_settings(sum(p.numel() for p in ctx.model.parameters()), c.think_ratio, c.eviction,
                                        c.budget))
        return cost

    def predict_callback(self) -> object:
        """A Lightning callback giving each predict batch a fresh pruned cache (``pl_module.generate_kwargs``)."""
        from memwise.lightning.callback import MemwiseCallback

        return MemwiseCallback(plugins=[self])

    @memwise.hookimpl
    def memwise_wrap_generation(self, ctx: memwise.RunContext) -> None:
        from memwise_kvprune.api import make_cache
        from memwise_kvprune.attention import install
        from memwise_kvprune.compat import cache_kwarg

        ctx.on_teardown(install(ctx.model))
        cache = make_cache(ctx.model, install=False, **self.cache_settings())
        ctx.generate_kwargs[cache_kwarg("generate")] = cache
        ctx.shared.setdefault("kvprune", {})["cache"] = cache

"""ChunkedCEPlugin: the memwise plugin around ``apply_chunked_ce`` (phase wrap, provides loss.head)."""

from __future__ import annotations

import dataclasses
from typing import Any

import memwise
from memwise import MemoryDelta, Problem, RecipeError, option


class ChunkedCEPlugin(memwise.Plugin):
    """LM head + cross-entropy in token chunks: the full logits never exist in training.

    It claims the LM head module (its compute moves into the loss), so a plugin that would
    replace the head (Mesa with include '*') is a clear claim conflict, not a silent no-op.
    """

    name = "chunked_ce"
    summary = "LM head and cross-entropy in token chunks: no full logits (or their gradient) in training"
    strategy_notes = {"fsdp": "it reads the LM head's weight outside the head's forward, where FSDP2 has not "
                              "gathered it (each rank holds a shard); use trainer.strategy=ddp"}
    stages = ("fit",)
    phase = "wrap"
    distribution = "memwise-chunked-ce"

    @dataclasses.dataclass
    class Config:
        chunk_size: int = option(0, "tokens per chunk; 0 = auto (one chunk's logits about the size of the "
                                    "hidden states)")
        z_loss: float = option(0.0, "weight of the z-loss, z * mean(logsumexp^2); 0 = off")
        ignore_index: int = option(-100, "target id that counts for nothing (HF's -100)")

    def post_init(self) -> None:
        problems = []
        if self.config.chunk_size < 0:
            problems.append(Problem("chunked_ce.chunk_size", f"got {self.config.chunk_size}; use 0 (auto) or a "
                                                             "positive number of tokens"))
        if self.config.z_loss < 0:
            problems.append(Problem("chunked_ce.z_loss", f"got {self.config.z_loss}; use 0 (off) or a small "
                                                         "positive weight such as 1e-4"))
        if problems:
            raise RecipeError(problems)

    def provides(self) -> set[str]:
        return {"loss.head"}

    @memwise.hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        from memwise_chunked_ce.hf import head_problems

        if ctx.model is None:
            return []
        return [Problem("chunked_ce", msg) for msg in head_problems(ctx.model)]

    @memwise.hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise.memory import logits_activation_bytes, loss_temporary_bytes

        from memwise_chunked_ce.function import auto_chunk_size

        w, config = ctx.workload, ctx.model.config
        tokens = w.batch_size * w.seq_len
        chunk = min(tokens, self.config.chunk_size or auto_chunk_size(tokens, config.hidden_size,
                                                                      config.vocab_size))
        logits = logits_activation_bytes(config, w.batch_size, w.seq_len, w.precision)
        # instead of the fp32 log-softmax: one fp32 log-sum-exp per token; in backward one chunk of
        # fp32 logits turned into their gradient, plus its copy in the compute dtype under autocast
        mixed = "mixed" in w.precision
        per_row = 4 + (w.activation_dtype.itemsize if mixed else 0)
        chunk_grads = chunk * config.vocab_size * per_row
        # the head's weight gradient: a tied one pending until the embedding's backward adds its part
        # (three weight-sized tensors, as without chunks); an untied one summed chunk by chunk: the sum
        # and one chunk's fp32 product beside that chunk's gradient (under autocast the product in the
        # compute dtype too, beside the gradient's copy in it)
        weight = 4 * config.vocab_size * config.hidden_size
        if getattr(config, "tie_word_embeddings", False):
            head = 3 * weight
        elif mixed:
            head = 2 * weight + weight * w.activation_dtype.itemsize // 4 \
                + chunk * config.vocab_size * w.activation_dtype.itemsize
        else:
            head = 2 * weight + chunk_grads
        temporaries = max(chunk_grads, head) - loss_temporary_bytes(config, w.batch_size, w.seq_len, w.precision)
        saved = -logits + 4 * tokens  # all on the loss side, outside the decoder layers
        return MemoryDelta(activations=saved, outside_layers=saved, temporaries=temporaries,
                           note=f"logits never materialized; {chunk} tokens per chunk")

    @memwise.hookimpl
    def memwise_transform_model(self, ctx: Any) -> None:
        from memwise_chunked_ce.hf import apply_chunked_ce, head_name

        c = self.config
        ctx.claims.claim(head_name(ctx.model), self)
        if apply_chunked_ce(ctx.model, c.chunk_size, c.ignore_index, c.z_loss):
            ctx.shared["chunked_ce"] = {"head": head_name(ctx.model)}

    @memwise.hookimpl
    def memwise_teardown(self, ctx: Any) -> None:
        from memwise_chunked_ce.hf import remove_chunked_ce

        if ctx.model is not None:
            remove_chunked_ce(ctx.model)

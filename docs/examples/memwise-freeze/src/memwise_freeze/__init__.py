"""An example third-party memwise plugin: freeze chosen modules.

A frozen parameter needs no gradient and no optimizer state: with AdamW that is 12 of
the 16 bytes per fp32 parameter. Everything a plugin needs is here: a Config schema,
validation against the model, an exact memory estimate, the surgery with claims,
state for checkpoints, and undo.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import memwise
from memwise import MemoryDelta, Problem, hookimpl, option
from memwise.memory import tensor_bytes
from memwise.optim import state_bytes


def frozen_parameters(model, patterns: list[str]) -> dict[str, object]:
    """Parameters of the modules whose qualified names match any pattern (fnmatch)."""
    chosen = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatch(name, pat) for pat in patterns):
            for pname, p in module.named_parameters(prefix=name):
                chosen[pname] = p
    return chosen


class FreezePlugin(memwise.Plugin):
    """Stop training the matched modules (their weights stay, their training memory goes)."""

    name = "freeze"
    summary = "freeze modules: no gradients or optimizer state for them"
    phase = "adapt"
    distribution = "memwise-freeze"
    required_on_load = False

    @dataclass
    class Config:
        modules: list[str] = option(["model.embed_tokens"], "module name patterns (fnmatch) to freeze")

    @hookimpl
    def memwise_validate(self, ctx) -> list:
        if not frozen_parameters(ctx.model, self.config.modules):
            return [Problem("freeze.modules", f"no module of this model matches {self.config.modules}; "
                            "module names look like model.layers.0.mlp")]
        return []

    @hookimpl
    def memwise_estimate_memory(self, ctx, estimate) -> MemoryDelta:
        params = [p for p in frozen_parameters(ctx.model, self.config.modules).values() if p.requires_grad]
        grad = tensor_bytes(params)
        opt_state = state_bytes(params, ctx.config.optimizer if ctx.config else "adamw")
        return MemoryDelta(gradients=-grad, optimizer_state=-opt_state, note=f"{len(params)} tensors frozen")

    @hookimpl
    def memwise_transform_model(self, ctx) -> None:
        for name, p in frozen_parameters(ctx.model, self.config.modules).items():
            if p.requires_grad:
                p.requires_grad_(False)
                ctx.claims.claim(name, self)
                ctx.on_teardown(lambda p=p: p.requires_grad_(True))

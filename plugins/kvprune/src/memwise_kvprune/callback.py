"""Predict-time use in a user's own Lightning Trainer: a fresh pruned cache for every batch.

The core's MemwiseCallback covers fit; this callback runs the plugin's generation hook
around each predict batch and leaves the keyword arguments on ``pl_module.generate_kwargs``
for ``predict_step`` to pass to ``generate``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

import memwise


class KVPruneCallback(pl.Callback):
    """Wraps every predict batch in ``memwise_wrap_generation`` and its teardown."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self.ctx: memwise.RunContext | None = None

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.ctx = memwise.RunContext(stage="generate", model=model, trainer=trainer)
        self.plugin.memwise_wrap_generation(ctx=self.ctx)
        pl_module.generate_kwargs = self.ctx.generate_kwargs

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.ctx is not None:
            self.ctx.run_teardown()
            self.ctx = None

"""The Lightning Trainer of a recipe run, from the recipe's ``trainer:`` block."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from memwise.lightning.checkpoint_io import AtomicCheckpointIO


def make_trainer(t: Any, interactive: bool, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A Trainer for ``RecipeModule`` (manual optimization; its own checkpoints, validation and
    logging), with a progress bar when the recipe asks for one and stdout is a terminal, then ``callbacks``."""
    # RecipeDataModule resumes its sampler at the exact batch (skip_to); Lightning cannot see that
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    bar = t.progress_bar and interactive
    if bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks = [RichProgressBar(leave=True), *callbacks]
    strategy: Any = t.strategy
    if t.strategy == "fsdp":
        from memwise.sharding import make_strategy

        strategy = make_strategy(t.devices, t.num_nodes)
    return pl.Trainer(
        max_steps=t.max_steps, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, enable_progress_bar=bar, callbacks=list(callbacks),
        plugins=[AtomicCheckpointIO()], max_epochs=-1,
    )

"""RecipeDataModule: the recipe's windows, a resumable sampler, the plugins' data hooks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from memwise.data.sampler import ShuffledBatchSampler
from memwise.data.windows import collate


class RecipeDataModule(pl.LightningDataModule):
    """Training batches for a recipe; its state is the number of batches already trained."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run
        self.resume_batches = 0

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ctx, data = self.run.ctx, self.run.recipe.data
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        ctx.train_dataset = self.run.train_dataset()
        ctx.batch_sampler = ShuffledBatchSampler(len(ctx.train_dataset), data.batch_size, data.seed, rank, world)
        ctx.collate_fn = collate
        self.run.host.hook.memwise_wrap_train_dataloader(ctx=ctx)
        ctx.batch_sampler.skip_to(self.resume_batches)
        return torch.utils.data.DataLoader(ctx.train_dataset, batch_sampler=ctx.batch_sampler,
                                           collate_fn=ctx.collate_fn, num_workers=0)

    def state_dict(self) -> dict[str, Any]:
        skipped = getattr(self.run.ctx.module, "nonfinite_skips", 0)  # batches consumed without an update
        return {"batches": int(self.trainer.global_step) + skipped if self.trainer else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_batches = int(state.get("batches", 0))

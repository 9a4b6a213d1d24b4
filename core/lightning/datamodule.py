"""RecipeDataModule: the recipe's windows, a resumable sampler, the plugins' data hooks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from memwise.data import loaders


class RecipeDataModule(pl.LightningDataModule):
    """Training batches for a recipe; its state is the number of batches already trained."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run
        self.resume_batches = 0

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        run = self.run
        return loaders.train_loader(run.ctx, run.host, run.recipe.data, rank, world, self.resume_batches)

    def state_dict(self) -> dict[str, Any]:
        skipped = self.run.ctx.module.guard.skips  # batches consumed without an update
        return {"batches": int(self.trainer.global_step) + skipped if self.trainer else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_batches = int(state.get("batches", 0))

"""A recipe's data as loaders: training windows through the plugins' data hooks, and the fixed
validation batches. One place assembles them, for training and for the memory probe alike."""

from __future__ import annotations

from typing import Any

import torch

from memwise.data.sampler import ShuffledBatchSampler
from memwise.data.windows import ConcatChunkDataset, WindowDataset, collate


def train_dataset(corpus: Any, data: Any) -> WindowDataset:
    """The training windows of ``corpus`` as the recipe's ``data.packing`` asks."""
    if data.packing == "concat_chunk":
        return ConcatChunkDataset(corpus.train, data.seq_len, corpus.train_targets)
    return WindowDataset(corpus.train, data.seq_len, corpus.tokenizer.pad_id, corpus.train_targets)


def train_loader(ctx: Any, host: Any, data: Any, rank: int = 0, world: int = 1,
                 skip: int = 0) -> torch.utils.data.DataLoader:
    """The training windows and resumable sampler (this rank's share, ``skip`` batches already
    trained), after the plugins' data hooks; dataset, sampler and collate are left on ``ctx``."""
    ctx.train_dataset = train_dataset(ctx.corpus, data)
    ctx.batch_sampler = ShuffledBatchSampler(len(ctx.train_dataset), data.batch_size, data.seed, rank, world)
    ctx.collate_fn = collate
    host.wrap_train_data(ctx)
    ctx.batch_sampler.skip_to(skip)
    return torch.utils.data.DataLoader(ctx.train_dataset, batch_sampler=ctx.batch_sampler,
                                       collate_fn=ctx.collate_fn, num_workers=0)


def first_batch(ctx: Any) -> dict[str, torch.Tensor]:
    """The first training batch as the loader built by :func:`train_loader` would give it."""
    return ctx.collate_fn([ctx.train_dataset[i] for i in next(iter(ctx.batch_sampler))])


def val_batches(corpus: Any, data: Any) -> list[dict]:
    """A fixed validation set: the same windows, in the same order, at every evaluation."""
    ds = WindowDataset(corpus.val, data.seq_len, corpus.tokenizer.pad_id, corpus.val_targets)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234)).tolist()
    n = min(len(ds), data.val_batches * data.batch_size)
    chosen = order[:n]
    return [collate([ds[i] for i in chosen[j:j + data.batch_size]]) for j in range(0, n, data.batch_size)]

"""A shuffling batch sampler that is a pure function of (seed, batch number, rank).

Resuming needs no iterator state: ``skip_to(n)`` starts the next iteration at global batch
n, which is exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ShuffledBatchSampler(torch.utils.data.Sampler):
    """Each epoch a fresh seeded permutation; rank r takes every world_size-th item."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        per_rank = n // world_size
        self.per_epoch = per_rank // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{n} training windows cannot fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s): lower data.batch_size or use more data")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.next_batch = 0

    def skip_to(self, n: int) -> None:
        self.next_batch = n

    def __len__(self) -> int:
        return self.per_epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank::self.world_size][: self.per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.next_batch, self.per_epoch)
        order = self._epoch_order(epoch)
        for b in range(first, self.per_epoch):
            self.next_batch = epoch * self.per_epoch + b + 1
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

"""The functional API: documents in, a DataLoader of variable-length batches out (no framework)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memwise_decomposition.dataset import BucketDataset, collate
from memwise_decomposition.decompose import Buckets, LongDocuments, decompose
from memwise_decomposition.sampler import VariableLengthBatchSampler


def sampler_for(dataset: BucketDataset, tokens_per_step: int, curriculum: str = "grow_p2", cycles: int = 1,
                odds: Sequence[float] = (), longest_first: bool = False, seed: int = 0, rank: int = 0,
                world_size: int = 1, epoch_steps: int = 0) -> VariableLengthBatchSampler:
    """The batch sampler over a BucketDataset's buckets."""
    return VariableLengthBatchSampler(dataset.sizes, dataset.targets_per_sequence, tokens_per_step,
                                      curriculum=curriculum, cycles=cycles, odds=odds, longest_first=longest_first,
                                      seed=seed, rank=rank, world_size=world_size, epoch_steps=epoch_steps)


def decomposed_dataloader(documents: Sequence[np.ndarray], min_len: int, max_len: int, tokens_per_step: int,
                          curriculum: str = "grow_p2", cycles: int = 1, odds: Sequence[float] = (),
                          longest_first: bool = False, rule: LongDocuments = "paper", seed: int = 0,
                          rank: int = 0, world_size: int = 1,
                          targets: Sequence[np.ndarray] | None = None) -> tuple[torch.utils.data.DataLoader, Buckets]:
    """Decompose ``documents`` and return a DataLoader over the buckets, with the buckets.

    ``tokens_per_step`` counts targets per rank and must be a multiple of ``max_len``.
    """
    buckets = decompose(documents, min_len, max_len, rule=rule, seed=seed, targets=targets)
    dataset = BucketDataset(buckets)
    sampler = sampler_for(dataset, tokens_per_step, curriculum, cycles, odds, longest_first, seed, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate), buckets

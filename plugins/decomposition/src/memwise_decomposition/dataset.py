"""The bucketed sequences as a map-style dataset of ``{"input_ids", "labels"}`` items."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memwise_decomposition.decompose import Buckets

IGNORE_INDEX = -100


class BucketDataset(torch.utils.data.Dataset):
    """Item i is a whole chunk of one bucket; bucket b's items follow bucket b-1's (shortest first)."""

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        self.logs = buckets.logs
        self.sizes = [buckets.count(k) for k in self.logs]
        self.targets_per_sequence = [1 << k for k in self.logs]
        self.ends = np.cumsum(self.sizes)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, i: int) -> tuple[int, int]:
        """(log2 length, position in bucket) of item ``i``."""
        b = int(np.searchsorted(self.ends, i, side="right"))
        if i < 0 or b >= len(self.sizes):
            raise IndexError(i)
        return self.logs[b], i - int(self.ends[b] - self.sizes[b])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, j = self.locate(int(i))
        start = int(self.buckets.starts[k][j])
        stop = start + (1 << k) + 1
        ids = torch.from_numpy(self.buckets.tokens[start:stop].astype(np.int64))
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        if self.buckets.targets is not None:
            labels[~torch.from_numpy(self.buckets.targets[start:stop])] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items of one bucket (they all have the same length: no padding)."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}

"""Training windows cut from documents: no window spans two documents.

A document longer than the window is cut into windows that overlap by one token, so that
every token after the first is a target exactly once (the model shifts labels by one).
The last window is padded; padding and non-targets are -100 in the labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memwise.data.tokens import IGNORE_INDEX


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length windows over documents, padded at the end of each document."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, pad_id: int,
                 targets: list[np.ndarray] | None = None) -> None:
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        self.docs, self.targets, self.seq_len, self.pad_id = docs, targets, seq_len, pad_id
        stride = seq_len - 1
        index = []
        for d, doc in enumerate(docs):
            for start in range(0, max(len(doc) - 1, 1), stride):
                index.append((d, start))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, start = (int(v) for v in self.index[i])
        piece = self.docs[d][start:start + self.seq_len]
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        ids[:len(piece)] = piece
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[1:len(piece)] = piece[1:]
        if self.targets is not None:
            mask = np.zeros(self.seq_len, dtype=bool)
            mask[:len(piece)] = self.targets[d][start:start + self.seq_len]
            labels[~mask] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class ConcatChunkDataset(torch.utils.data.Dataset):
    """The usual baseline: concatenate every document and cut fixed-length chunks.

    Windows then span document boundaries (attention crosses documents); this exists only
    to compare against, and the run report says so.
    """

    def __init__(self, docs: list[np.ndarray], seq_len: int, targets: list[np.ndarray] | None = None) -> None:
        self.stream = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, dtype=np.int64)
        self.mask = np.concatenate(targets) if targets else None
        self.seq_len = seq_len
        self.n = max((len(self.stream) - 1) // (seq_len - 1), 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * (self.seq_len - 1)
        ids = torch.from_numpy(self.stream[start:start + self.seq_len].copy())
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        if self.mask is not None:  # chat data: the answers only
            labels[~torch.from_numpy(self.mask[start:start + self.seq_len])] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}

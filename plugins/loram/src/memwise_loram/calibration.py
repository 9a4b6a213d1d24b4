"""Batches for importance scores and alignment, cut from a corpus's token documents."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def windows(documents: Sequence[np.ndarray], num_batches: int, batch_size: int, seq_len: int,
            pad_id: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` batches of random windows of ``seq_len`` tokens (seeded).

    A document shorter than the window is padded, its padding masked out of the labels
    (-100); windows never span two documents.
    """
    if not documents:
        raise ValueError("no documents to cut calibration windows from")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
        for row in range(batch_size):
            doc = documents[int(rng.integers(len(documents)))]
            start = int(rng.integers(max(1, len(doc) - seq_len + 1)))
            piece = torch.as_tensor(np.asarray(doc[start:start + seq_len], dtype=np.int64))
            ids[row, : len(piece)] = piece
            labels[row, : len(piece)] = piece
        out.append({"input_ids": ids, "labels": labels})
    return out

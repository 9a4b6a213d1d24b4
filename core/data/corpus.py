"""A corpus: documents as token arrays, split into train and validation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwise.data.documents import is_validation


@dataclass
class Corpus:
    """Token arrays, one per document, each BOS first and EOD last.

    ``*_targets`` are None (every real token is a target) or bool masks aligned with the
    documents (only True positions are trained on, as in MQAR).
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    tokenizer: Any
    train_targets: list[np.ndarray] | None = None
    val_targets: list[np.ndarray] | None = None
    stats: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return int(sum(len(d) for d in self.train))


def from_documents(docs: Iterable[tuple[str, bytes]], tokenizer: Any, val_percent: float,
                   seed: int = 0, max_documents: int | None = None) -> Corpus:
    """Tokenize (name, text) documents and split them by name."""
    train, val = [], []
    n = 0
    for name, text in docs:
        if max_documents is not None and n >= max_documents:
            break
        ids = tokenizer.encode(text)
        if len(ids) == 0:
            continue
        n += 1
        arr = np.empty(len(ids) + 2, dtype=np.int32)
        arr[0], arr[-1] = tokenizer.bos_id, tokenizer.eod_id
        arr[1:-1] = ids
        (val if is_validation(name, val_percent, seed) else train).append(arr)
    return Corpus(train=train, val=val, tokenizer=tokenizer,
                  stats={"documents": n, "train_documents": len(train), "val_documents": len(val)})

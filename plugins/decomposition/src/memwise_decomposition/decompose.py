"""Split documents into power-of-two chunks by the binary expansion of their length.

A chunk of bucket k holds 2**k + 1 tokens and gives 2**k targets (the model shifts labels
by one). Consecutive chunks of a document share one token: the last token of a chunk is
its final target and the first input of the next chunk. So every token of a document
after its BOS is a target in exactly one chunk, or counted as dropped; no chunk spans
two documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

LongDocuments = Literal["paper", "longest"]


def log2_exact(n: int, what: str) -> int:
    """log2 of a power of two, or ValueError naming ``what``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1


@dataclass
class Buckets:
    """Chunks of a corpus grouped by length: start offsets into one concatenated token array.

    The chunk of bucket k starting at s is ``tokens[s : s + 2**k + 1]``; ``targets`` (when
    not None) is the aligned bool mask of positions that are trained on.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    min_log2: int
    max_log2: int
    starts: dict[int, np.ndarray]
    dropped: int
    targets: np.ndarray | None = None
    dropped_documents: int = 0
    rule: str = "paper"

    @property
    def logs(self) -> list[int]:
        """Bucket ids (log2 of targets per sequence), shortest first."""
        return list(range(self.min_log2, self.max_log2 + 1))

    def count(self, k: int) -> int:
        return int(len(self.starts[k]))

    @property
    def kept(self) -> int:
        """Targets held by the buckets."""
        return sum((1 << k) * self.count(k) for k in self.logs)

    @property
    def total_targets(self) -> int:
        """Every token of every document after its BOS: what kept + dropped must equal."""
        lengths = np.diff(self.doc_offsets)
        return int(np.maximum(lengths - 1, 0).sum())

    def chunk(self, k: int, i: int) -> np.ndarray:
        s = int(self.starts[k][i])
        return self.tokens[s:s + (1 << k) + 1]


def chunk_sizes(n_targets: int, min_log2: int, max_log2: int, rule: LongDocuments,
                rng: np.random.Generator, probs: np.ndarray) -> tuple[list[int], int]:
    """Bucket ids of the chunks of one document with ``n_targets`` targets, and the targets dropped.

    Largest power of two first. Above ``max_log2`` the rule ``paper`` draws k from
    [min_log2, max_log2] with p(k) proportional to 2**(max_log2 - k), which spreads a long
    document's tokens evenly over the buckets; ``longest`` cuts max-length chunks.
    """
    out: list[int] = []
    rest = n_targets
    while rest >= 1:
        k = rest.bit_length() - 1
        if k < min_log2:
            return out, rest
        if k > max_log2:
            k = int(min_log2 + np.searchsorted(probs, rng.random(), side="right")) if rule == "paper" else max_log2
        out.append(k)
        rest -= 1 << k
    return out, 0


def decompose(documents: Sequence[np.ndarray], min_len: int, max_len: int, rule: LongDocuments = "paper",
              seed: int = 0, targets: Sequence[np.ndarray] | None = None) -> Buckets:
    """Decompose token documents (BOS first, EOD last) into length buckets.

    ``min_len`` / ``max_len`` are targets per sequence (powers of two); remainders shorter
    than ``min_len`` are dropped and counted. Deterministic given ``seed``.
    """
    lo, hi = log2_exact(min_len, "min_len"), log2_exact(max_len, "max_len")
    if lo > hi:
        raise ValueError(f"min_len {min_len} is larger than max_len {max_len}")
    if rule not in ("paper", "longest"):
        raise ValueError(f"rule must be 'paper' or 'longest', got {rule!r}")
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(documents).astype(np.int32) if len(documents) else np.zeros(0, np.int32)
    mask = np.concatenate(targets).astype(bool) if targets is not None and len(documents) else None
    if mask is not None and len(mask) != len(tokens):
        raise ValueError("targets must be aligned with the documents (one bool per token)")
    weights = 2.0 ** np.arange(hi - lo, -1, -1)  # p(k) for k = lo..hi, proportional to 2**(hi - k)
    probs = np.cumsum(weights / weights.sum())
    probs[-1] = 1.0
    rng = np.random.default_rng(seed)
    starts: dict[int, list[int]] = {k: [] for k in range(lo, hi + 1)}
    dropped = dropped_docs = 0
    for d, n in enumerate(lengths.tolist()):
        ks, lost = chunk_sizes(max(n - 1, 0), lo, hi, rule, rng, probs)
        pos = int(offsets[d])
        for k in ks:
            starts[k].append(pos)
            pos += 1 << k
        dropped += lost
        dropped_docs += not ks and n > 1
    return Buckets(tokens=tokens, doc_offsets=offsets, min_log2=lo, max_log2=hi,
                   starts={k: np.asarray(v, dtype=np.int64) for k, v in starts.items()},
                   dropped=int(dropped), targets=mask, dropped_documents=dropped_docs, rule=rule)

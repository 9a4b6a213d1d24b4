"""Multi-query associative recall: key-value pairs, then filler with queries to answer."""

from __future__ import annotations

import numpy as np

from memwise.data.tokens import BOS, EOD


def make_mqar(num_examples: int, seq_len: int, num_pairs: int, num_keys: int = 64, num_values: int = 64,
              num_queries: int | None = None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets) per example: ``seq_len`` tokens in all, BOS first and EOD last.

    Keys are ids [0, num_keys), values [num_keys, num_keys + num_values), filler the ids above
    (up to 255). Each query repeats a key; its target is the value that followed that key.
    """
    num_queries = num_pairs if num_queries is None else num_queries
    filler_lo = num_keys + num_values
    if filler_lo >= 256:
        raise ValueError("mqar: num_keys + num_values must stay below 256 to leave filler byte ids")
    if num_pairs > num_keys:
        raise ValueError(f"mqar: num_pairs ({num_pairs}) cannot exceed num_keys ({num_keys})")
    body = seq_len - 2 - 2 * num_pairs
    if body < 2 * num_queries:
        raise ValueError(f"mqar: seq_len {seq_len} too short for {num_pairs} pairs and {num_queries} queries")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_examples):
        keys = rng.choice(num_keys, size=num_pairs, replace=False)
        values = rng.integers(num_keys, filler_lo, size=num_pairs)
        tokens = np.empty(seq_len, dtype=np.int32)
        targets = np.zeros(seq_len, dtype=bool)
        tokens[0], tokens[-1] = BOS, EOD
        tokens[1:1 + 2 * num_pairs:2] = keys
        tokens[2:2 + 2 * num_pairs:2] = values
        start = 1 + 2 * num_pairs
        tokens[start:-1] = rng.integers(filler_lo, 256, size=body)
        # query slots: disjoint pairs of positions inside the filler
        slots = rng.choice(body // 2, size=num_queries, replace=False) * 2 + start
        asked = rng.integers(0, num_pairs, size=num_queries)
        for pos, which in zip(slots, asked):
            tokens[pos], tokens[pos + 1] = keys[which], values[which]
            targets[pos + 1] = True
        out.append((tokens, targets))
    return out

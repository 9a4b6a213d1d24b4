"""Length curricula: in which order the batches of one epoch visit the buckets.

Odds-based curricula follow the paper: within a cycle a step draws bucket i with
probability proportional to odds_i x (its batches in the cycle), until that bucket is
used up. Odds favouring short buckets (grow-p2: 32 16 8 4 2 1, shortest first) make the
share of long sequences rise through each cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

CurriculumName = Literal["natural", "uniform", "grow_linear", "grow_p2", "custom"]
CURRICULA: tuple[str, ...] = ("natural", "uniform", "grow_linear", "grow_p2", "custom")


def curriculum_odds(name: str, n_buckets: int, custom: Sequence[float] = ()) -> np.ndarray | None:
    """Odds per bucket (shortest first) for a named curriculum; None for ``natural``."""
    if name == "natural":
        return None
    if name == "uniform":
        return np.ones(n_buckets)
    if name == "grow_linear":
        return np.arange(n_buckets, 0, -1, dtype=float)
    if name == "grow_p2":
        return 2.0 ** np.arange(n_buckets - 1, -1, -1)
    if name == "custom":
        odds = np.asarray(custom, dtype=float)
        if odds.shape != (n_buckets,) or (odds < 0).any() or not odds.any():
            raise ValueError(f"custom odds need {n_buckets} non-negative values (one per bucket, shortest "
                             f"first, not all zero), got {list(custom)}")
        return odds
    raise ValueError(f"unknown curriculum {name!r}; choose one of {', '.join(CURRICULA)}")


def split_cycles(batches: Sequence[int], cycles: int) -> list[list[int]]:
    """Batches per bucket in each of ``cycles`` cycles (as equal as integers allow)."""
    return [[n * (c + 1) // cycles - n * c // cycles for n in batches] for c in range(cycles)]


def order_cycle(batches: Sequence[int], odds: np.ndarray | None, rng: np.random.Generator) -> list[int]:
    """The bucket index of each step of one cycle, each bucket appearing ``batches[i]`` times."""
    if odds is None:
        steps = np.repeat(np.arange(len(batches)), batches)
        return rng.permutation(steps).tolist()
    left = np.asarray(batches, dtype=np.int64).copy()
    weights = odds * left
    out: list[int] = []
    for _ in range(int(left.sum())):
        live = np.where(left > 0, weights, 0.0)
        if live.sum() <= 0:  # only buckets with zero odds remain: take them shortest first
            live = (left > 0).astype(float)
        idx = np.flatnonzero(live > 0)
        cum = np.cumsum(live[idx])
        i = int(idx[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(idx) - 1)])
        out.append(i)
        left[i] -= 1
    return out


def epoch_schedule(batches: Sequence[int], name: str, cycles: int, rng: np.random.Generator,
                   custom: Sequence[float] = (), longest_first: bool = False) -> list[int]:
    """Bucket index of every step of an epoch: ``cycles`` cycles, optionally the longest batch first."""
    odds = curriculum_odds(name, len(batches), custom)
    steps: list[int] = []
    for part in split_cycles(batches, cycles):
        steps += order_cycle(part, odds, rng)
    if longest_first and steps:
        longest = max(steps)
        steps.insert(0, steps.pop(steps.index(longest)))
    return steps

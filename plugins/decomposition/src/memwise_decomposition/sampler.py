"""A batch sampler over length buckets: a fixed token budget per step, one bucket per step.

The batch of global step n is a pure function of (seed, n, rank): every rank computes the
same bucket schedule and takes its own slice of each global batch, so ranks agree on the
sequence length and never share a sequence, and ``skip_to(n)`` resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from memwise_decomposition.curriculum import curriculum_odds, epoch_schedule


def proportional(counts: Sequence[int], total: int) -> list[int]:
    """Integers proportional to ``counts`` summing to ``min(total, sum(counts))`` (largest remainder)."""
    total = min(total, sum(counts))
    exact = np.asarray(counts, dtype=float) * total / sum(counts)
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


class VariableLengthBatchSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices; bucket b holds indices ``offsets[b] .. offsets[b] + sizes[b]``.

    ``targets_per_sequence[b]`` is the number of targets of one sequence of bucket b; a
    batch holds ``tokens_per_step // targets_per_sequence[b]`` sequences on each rank.
    Sequences left over after whole global batches are skipped for that epoch (a fresh
    shuffle each epoch picks different ones). ``epoch_steps`` (0: a full pass) shortens an
    epoch to that many steps, taking from every bucket in proportion to its full-pass
    batches: the paper's subsampling of the buckets to the training budget, so that the
    curriculum's cycles span the run.
    """

    def __init__(self, sizes: Sequence[int], targets_per_sequence: Sequence[int], tokens_per_step: int,
                 curriculum: str = "grow_p2", cycles: int = 1, odds: Sequence[float] = (),
                 longest_first: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch_steps: int = 0) -> None:
        if len(sizes) != len(targets_per_sequence):
            raise ValueError("sizes and targets_per_sequence need one entry per bucket")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if cycles < 1:
            raise ValueError(f"cycles must be at least 1, got {cycles}")
        bad = [t for t in targets_per_sequence if tokens_per_step % t]
        if bad:
            raise ValueError(f"tokens_per_step {tokens_per_step} is not a multiple of sequence target "
                             f"length(s) {bad}: make it a multiple of the longest bucket")
        curriculum_odds(curriculum, len(sizes), odds)  # fail early on a bad name or odds
        self.sizes = [int(s) for s in sizes]
        self.targets_per_sequence = [int(t) for t in targets_per_sequence]
        self.batch_sizes = [tokens_per_step // t for t in self.targets_per_sequence]
        self.full_batches = [s // (bs * world_size) for s, bs in zip(self.sizes, self.batch_sizes)]
        if sum(self.full_batches) == 0:
            raise ValueError(f"no bucket has enough sequences for one global batch of {tokens_per_step} tokens "
                             f"per rank on {world_size} rank(s): lower tokens_per_step or use more data")
        if epoch_steps < 0:
            raise ValueError(f"epoch_steps must be 0 (a full pass) or positive, got {epoch_steps}")
        self.batches = proportional(self.full_batches, epoch_steps) if epoch_steps else list(self.full_batches)
        self.per_epoch = sum(self.batches)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.tokens_per_step, self.curriculum, self.cycles = tokens_per_step, curriculum, cycles
        self.odds, self.longest_first = tuple(odds), longest_first
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_batch = 0
        self._cache: tuple[int, np.ndarray, np.ndarray, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def skip_to(self, n: int) -> None:
        """Start the next iteration at global batch ``n`` (counted from the start of training)."""
        if n < 0:
            raise ValueError(f"cannot skip to batch {n}")
        self.next_batch = int(n)

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.skip_to(int(state["next_batch"]))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(bucket of each step, occurrence of that bucket so far, shuffled members per bucket)."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0])
            steps = np.asarray(epoch_schedule(self.batches, self.curriculum, self.cycles, rng, self.odds,
                                              self.longest_first), dtype=np.int64)
            occurrence = np.zeros(len(steps), dtype=np.int64)
            seen = np.zeros(len(self.sizes), dtype=np.int64)
            for t, b in enumerate(steps.tolist()):
                occurrence[t] = seen[b]
                seen[b] += 1
            perms = [np.random.default_rng([self.seed, epoch, 1, b]).permutation(s) for b, s in enumerate(self.sizes)]
            self._cache = (epoch, steps, occurrence, perms)
        return self._cache[1], self._cache[2], self._cache[3]

    def bucket_of(self, n: int) -> int:
        """Bucket index of global step ``n`` (the same on every rank)."""
        epoch, t = divmod(n, self.per_epoch)
        return int(self._epoch(epoch)[0][t])

    def batch(self, n: int) -> list[int]:
        """Dataset indices of global step ``n`` on this rank."""
        epoch, t = divmod(n, self.per_epoch)
        steps, occurrence, perms = self._epoch(epoch)
        b, c = int(steps[t]), int(occurrence[t])
        bs = self.batch_sizes[b]
        first = (c * self.world_size + self.rank) * bs
        return (perms[b][first:first + bs] + self.offsets[b]).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.next_batch, self.per_epoch)
        for t in range(first, self.per_epoch):
            n = epoch * self.per_epoch + t
            self.next_batch = n + 1
            yield self.batch(n)

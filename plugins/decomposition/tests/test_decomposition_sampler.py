"""The batch sampler: constant tokens per step, curricula, ranks, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from memwise_decomposition import VariableLengthBatchSampler, decomposed_dataloader, epoch_schedule

SIZES = [640, 320, 200, 96, 48, 24]  # sequences per bucket, shortest (16 targets) first
TARGETS = [16, 32, 64, 128, 256, 512]
BUDGET = 1024


def sampler(**kw) -> VariableLengthBatchSampler:
    args = dict(curriculum="grow_p2", seed=5)
    args.update(kw)
    return VariableLengthBatchSampler(SIZES, TARGETS, BUDGET, **args)


def bucket_of_index(s: VariableLengthBatchSampler, i: int) -> int:
    return int(np.searchsorted(s.offsets, i, side="right") - 1)


def test_tokens_per_step_constant_through_a_dataloader() -> None:
    rng = np.random.default_rng(0)
    docs = [np.r_[257, rng.integers(0, 256, n), 258].astype(np.int32) for n in rng.integers(10, 1500, 300)]
    loader, _ = decomposed_dataloader(docs, min_len=16, max_len=256, tokens_per_step=512, curriculum="grow_linear",
                                      cycles=2)
    lengths = set()
    steps = 0
    for batch in loader:
        b, n = batch["input_ids"].shape
        lengths.add(n)
        assert b * (n - 1) == 512  # 2**k + 1 tokens carry 2**k targets
        assert ((batch["labels"] != -100).sum(dim=1) == n - 1).all()
        steps += 1
    assert steps == len(loader.batch_sampler) and len(lengths) == 5


def test_each_bucket_in_a_step_and_every_sequence_at_most_once_per_epoch() -> None:
    s = sampler()
    seen = []
    for batch in iter(s):
        buckets = {bucket_of_index(s, i) for i in batch}
        assert len(buckets) == 1
        b = buckets.pop()
        assert len(batch) == BUDGET // TARGETS[b]
        seen += batch
    assert len(seen) == len(set(seen))
    assert len(seen) == sum(n * bs for n, bs in zip(s.batches, s.batch_sizes))


@pytest.mark.parametrize("curriculum", ["grow_p2", "grow_linear"])
def test_long_share_rises_within_each_cycle(curriculum: str) -> None:
    cycles = 4
    s = VariableLengthBatchSampler([8 * n for n in SIZES], TARGETS, BUDGET, curriculum=curriculum, cycles=cycles,
                                   seed=5)
    steps = [s.bucket_of(n) for n in range(s.per_epoch)]
    per_cycle = [sum(n * (c + 1) // cycles - n * c // cycles for n in s.batches) for c in range(cycles)]
    bounds = np.cumsum([0] + per_cycle)
    for c in range(cycles):
        cycle = np.asarray(steps[bounds[c]:bounds[c + 1]])
        thirds = np.array_split(cycle, 3)
        means = [float(np.mean(t)) for t in thirds]
        assert means[0] + 0.5 < means[2], (c, means)
        if curriculum == "grow_p2":  # steep odds: the mean length rises through every third
            assert means[0] < means[1] < means[2], (c, means)
        # the long buckets' share of steps rises from the first to the last third of the cycle
        long_share = [float(np.mean(t >= 3)) for t in thirds]
        assert long_share[0] < long_share[2]
        # each cycle uses its share of every bucket
        counts = np.bincount(cycle, minlength=len(SIZES))
        assert counts.tolist() == [n * (c + 1) // cycles - n * c // cycles for n in s.batches]


def test_natural_and_uniform_show_no_trend() -> None:
    for name in ("natural", "uniform"):
        s = sampler(curriculum=name, seed=11)
        steps = np.asarray([s.bucket_of(n) for n in range(s.per_epoch)])
        halves = np.array_split(steps, 2)
        assert abs(halves[0].mean() - halves[1].mean()) < 0.5


def test_custom_odds_zero_bucket_comes_last_and_longest_first() -> None:
    s = sampler(curriculum="custom", odds=[1, 1, 1, 1, 1, 0], longest_first=False)
    steps = [s.bucket_of(n) for n in range(s.per_epoch)]
    n_last = s.batches[5]
    assert steps[-n_last:] == [5] * n_last and 5 not in steps[:-n_last]
    f = sampler(curriculum="grow_p2", longest_first=True)
    for epoch in range(3):
        assert f.bucket_of(epoch * f.per_epoch) == 5
    assert sorted(f.bucket_of(n) for n in range(f.per_epoch)) == sorted(
        sampler(curriculum="grow_p2").bucket_of(n) for n in range(f.per_epoch))
    with pytest.raises(ValueError, match="odds"):
        sampler(curriculum="custom", odds=[1, 2])


def test_two_ranks_same_lengths_disjoint_data() -> None:
    r0, r1 = sampler(rank=0, world_size=2, cycles=2), sampler(rank=1, world_size=2, cycles=2)
    assert len(r0) == len(r1)
    used0, used1 = [], []
    for b0, b1 in zip(itertools.islice(iter(r0), 3 * len(r0)), itertools.islice(iter(r1), 3 * len(r1))):
        assert {bucket_of_index(r0, i) for i in b0} == {bucket_of_index(r1, i) for i in b1}
        assert len(b0) == len(b1) and not set(b0) & set(b1)
        used0 += b0
        used1 += b1
    epoch0 = used0[: sum(r0.batch_sizes[r0.bucket_of(n)] for n in range(len(r0)))]
    epoch1 = used1[: len(epoch0)]
    assert not set(epoch0) & set(epoch1)  # disjoint across the whole epoch, not only per step


def test_skip_to_resumes_exactly_mid_epoch_and_across_epochs() -> None:
    full = sampler(cycles=3, longest_first=True)
    it = iter(full)
    reference = [next(it) for _ in range(len(full))] + list(iter(full)) + list(iter(full))
    for n in (0, 7, len(full) - 1, len(full), len(full) + 13, 2 * len(full) + 1):
        resumed = sampler(cycles=3, longest_first=True)
        resumed.skip_to(n)
        got = list(iter(resumed))
        epoch_end = (n // len(full) + 1) * len(full)
        assert got == reference[n:epoch_end]
        assert resumed.state_dict() == {"next_batch": epoch_end}
    other_seed = sampler(cycles=3, longest_first=True, seed=6)
    assert list(iter(other_seed)) != reference[: len(full)]


def test_schedule_counts_match_batches() -> None:
    rng = np.random.default_rng(0)
    batches = [7, 0, 5, 3]
    for name in ("natural", "uniform", "grow_linear", "grow_p2"):
        steps = epoch_schedule(batches, name, cycles=3, rng=rng)
        assert np.bincount(steps, minlength=4).tolist() == batches


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        VariableLengthBatchSampler(SIZES, TARGETS, 1000)
    with pytest.raises(ValueError, match="one global batch"):
        VariableLengthBatchSampler([1, 1], [16, 32], 1024)


def test_short_run_takes_every_bucket_in_proportion() -> None:
    full = sampler()
    short = sampler(epoch_steps=20, cycles=2)
    assert len(short) == 20 and sum(short.batches) == 20
    expect = np.asarray(full.batches) * 20 / sum(full.batches)
    assert np.abs(np.asarray(short.batches) - expect).max() < 1
    assert sampler(epoch_steps=10_000).batches == full.batches  # never more than a full pass

"""Decomposition into buckets: every token accounted for, no chunk across documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memwise_decomposition import BucketDataset, decompose

BOS, EOD = 257, 258


def make_docs(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        d = rng.integers(0, 256, size=n).astype(np.int32)
        d[0] = BOS
        d[-1] = EOD
        docs.append(d)
    return docs


def random_lengths(n: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1, 2, 3, 9, 17, 129, 4097] + rng.integers(2, 3000, size=n).tolist()


def coverage(buckets) -> np.ndarray:
    """How many chunks make each token a target."""
    cover = np.zeros(len(buckets.tokens), dtype=np.int64)
    for k in buckets.logs:
        for s in buckets.starts[k].tolist():
            cover[s + 1:s + (1 << k) + 1] += 1
    return cover


@pytest.mark.parametrize("rule", ["paper", "longest"])
def test_every_token_is_a_target_once_or_dropped(rule: str) -> None:
    docs = make_docs(random_lengths(200))
    b = decompose(docs, min_len=16, max_len=256, rule=rule, seed=3)
    cover = coverage(b)
    assert cover.max() == 1
    assert b.kept + b.dropped == b.total_targets == sum(len(d) - 1 for d in docs)
    assert int(cover.sum()) == b.kept
    for d in range(len(docs)):
        lo, hi = int(b.doc_offsets[d]), int(b.doc_offsets[d + 1])
        assert cover[lo] == 0  # BOS is never a target: nothing precedes it
        doc_cover = cover[lo + 1:hi]
        uncovered = np.flatnonzero(doc_cover == 0)
        if len(uncovered):  # what is dropped is one tail shorter than min_len
            assert uncovered[0] == len(doc_cover) - len(uncovered) and len(uncovered) < 16
            assert doc_cover[uncovered[0]:].sum() == 0


@pytest.mark.parametrize("rule", ["paper", "longest"])
def test_no_chunk_crosses_a_document_boundary(rule: str) -> None:
    docs = make_docs(random_lengths(200))
    b = decompose(docs, min_len=8, max_len=128, rule=rule, seed=0)
    for k in b.logs:
        starts = b.starts[k]
        doc = np.searchsorted(b.doc_offsets, starts, side="right") - 1
        last = starts + (1 << k)  # index of the chunk's last token
        assert (last < b.doc_offsets[doc + 1]).all()
        for i in range(min(len(starts), 20)):  # the chunk really is that document's text
            assert (b.chunk(k, i) == docs[doc[i]][starts[i] - b.doc_offsets[doc[i]]:][: (1 << k) + 1]).all()


def test_binary_expansion_within_max_len() -> None:
    docs = make_docs([1 + 0b1011000, 1 + 0b1011000])  # 88 targets = 64 + 16 + 8
    b = decompose(docs, min_len=16, max_len=64, rule="longest")
    assert {k: b.count(k) for k in b.logs} == {4: 2, 5: 0, 6: 2}
    assert b.dropped == 16  # the two 8-target tails
    first = b.starts[6][0], b.starts[4][0]
    assert first == (0, 64)  # largest chunk first, the next one starts on its last token


def test_short_documents_are_dropped_whole() -> None:
    b = decompose(make_docs([5, 10, 40]), min_len=16, max_len=32)
    assert b.dropped_documents == 2 and b.kept == 32 and b.dropped == 4 + 9 + 7


def test_long_documents_paper_rule_spreads_tokens_evenly() -> None:
    docs = make_docs([200_001] * 4)
    b = decompose(docs, min_len=32, max_len=1024, rule="paper", seed=0)
    share = np.array([b.count(k) << k for k in b.logs]) / b.kept
    assert np.allclose(share, 1 / 6, atol=0.04)  # p(k) ~ 2^(max-k): equal tokens per bucket
    longest = decompose(docs, min_len=32, max_len=1024, rule="longest")
    assert longest.count(10) == 4 * (200_000 // 1024)
    again = decompose(docs, min_len=32, max_len=1024, rule="paper", seed=0)
    assert all((again.starts[k] == b.starts[k]).all() for k in b.logs)
    other = decompose(docs, min_len=32, max_len=1024, rule="paper", seed=1)
    assert any(len(other.starts[k]) != len(b.starts[k]) or (other.starts[k] != b.starts[k]).any() for k in b.logs)


def test_dataset_items_shift_labels_and_keep_target_masks() -> None:
    docs = make_docs([1 + 32 + 16, 1 + 32])
    masks = [np.arange(len(d)) % 2 == 0 for d in docs]
    b = decompose(docs, min_len=16, max_len=32, targets=masks)
    ds = BucketDataset(b)
    assert len(ds) == 3 and ds.sizes == [1, 2] and ds.targets_per_sequence == [16, 32]
    for i in range(len(ds)):
        k, j = ds.locate(i)
        item = ds[i]
        s = int(b.starts[k][j])
        assert item["input_ids"].shape == ((1 << k) + 1,)
        expect = torch.from_numpy(b.tokens[s:s + (1 << k) + 1].astype(np.int64))
        assert torch.equal(item["input_ids"], expect)
        keep = torch.from_numpy(b.targets[s:s + (1 << k) + 1])
        keep[0] = False
        assert torch.equal(item["labels"][keep], expect[keep])
        assert (item["labels"][~keep] == -100).all()


def test_bad_lengths_raise() -> None:
    with pytest.raises(ValueError, match="power of two"):
        decompose(make_docs([100]), min_len=24, max_len=64)
    with pytest.raises(ValueError, match="larger"):
        decompose(make_docs([100]), min_len=128, max_len=64)

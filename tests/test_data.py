"""Built-in data: documents stay documents, every token is a target once, exact resume order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memwise.data.corpus import from_documents
from memwise.data.datasets import MqarConfig, PyStdlibConfig, build_corpus
from memwise.data.documents import pystdlib_documents, split_definitions, stdlib_files
from memwise.data.mqar import make_mqar
from memwise.data.sampler import ShuffledBatchSampler
from memwise.data.tokens import BOS, EOD, IGNORE_INDEX, PAD, VOCAB_SIZE, ByteTokenizer
from memwise.data.windows import ConcatChunkDataset, WindowDataset


def test_byte_tokens_round_trip_and_specials_above_bytes():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return x  # ünïcode"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text).max() < 256 and VOCAB_SIZE == 260 and min(PAD, BOS, EOD) >= 256


def test_pystdlib_excludes_installed_packages_and_is_sorted():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.parts)


def test_definition_split_keeps_every_byte():
    src = b"import os\n\n@dec\ndef f():\n    pass\n\nclass A:\n    x = 1\n\nasync def g():\n    pass\n"
    parts = split_definitions(src)
    assert b"".join(parts) == src
    assert [p.split(b"\n")[0] for p in parts] == [b"import os", b"@dec", b"class A:", b"async def g():"]


def test_split_is_deterministic_by_name():
    docs = [(f"mod{i}.py", b"x = 1\n" * 3) for i in range(200)]
    a = from_documents(docs, ByteTokenizer(), val_percent=10)
    b = from_documents(list(reversed(docs)), ByteTokenizer(), val_percent=10)
    assert len(a.val) == len(b.val) and 5 < len(a.val) < 40
    assert all(d[0] == BOS and d[-1] == EOD for d in a.train)


def test_windows_never_span_documents_and_each_token_is_a_target_once():
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[BOS], rng.integers(0, 256, n), [EOD]]).astype(np.int32) for n in (3, 10, 29, 64)]
    ds = WindowDataset(docs, seq_len=8, pad_id=PAD)
    targets_per_doc = {}
    for i in range(len(ds)):
        d, start = ds.index[i]
        item = ds[i]
        ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
        real = min(8, len(docs[d]) - start)
        assert (ids[:real] == docs[d][start:start + real]).all()
        assert (ids[real:] == PAD).all() and (labels[real:] == IGNORE_INDEX).all()
        assert labels[0] == IGNORE_INDEX
        targets_per_doc.setdefault(d, []).extend((start + np.nonzero(labels != IGNORE_INDEX)[0]).tolist())
    for d, doc in enumerate(docs):
        assert sorted(targets_per_doc[d]) == list(range(1, len(doc)))  # each token after BOS, once


def test_concat_chunk_baseline_crosses_documents():
    docs = [np.arange(5, dtype=np.int32), np.arange(5, 12, dtype=np.int32)]
    ds = ConcatChunkDataset(docs, seq_len=4)
    assert ds[1]["input_ids"].tolist() == [3, 4, 5, 6]


def test_mqar_targets_are_the_queried_values():
    for tokens, targets in make_mqar(20, seq_len=64, num_pairs=6, seed=3):
        assert len(tokens) == 64 and tokens[0] == BOS and tokens[-1] == EOD
        pairs = dict(zip(tokens[1:13:2].tolist(), tokens[2:13:2].tolist()))
        where = np.nonzero(targets)[0]
        assert len(where) == 6
        for pos in where:
            assert pairs[int(tokens[pos - 1])] == int(tokens[pos])


def test_mqar_corpus_trains_only_on_answers():
    corpus = build_corpus(MqarConfig(builder="mqar", seq_len=48, num_examples=8, num_val_examples=4, num_pairs=4))
    item = WindowDataset(corpus.train, 48, PAD, corpus.train_targets)[0]
    assert int((item["labels"] != IGNORE_INDEX).sum()) == 4


def test_sampler_is_a_function_of_batch_number_and_rank():
    full = ShuffledBatchSampler(103, 4, seed=7)
    order = [b for _ in range(3) for b in full]  # three epochs
    resumed = ShuffledBatchSampler(103, 4, seed=7)
    resumed.skip_to(37)
    tail = [b for _ in range(2) for b in resumed]
    assert tail[: len(order) - 37] == order[37:]
    r0, r1 = ShuffledBatchSampler(103, 4, 7, 0, 2), ShuffledBatchSampler(103, 4, 7, 1, 2)
    assert not set(sum(list(r0), [])) & set(sum(list(r1), []))


def test_sampler_rejects_too_little_data():
    with pytest.raises(ValueError, match="lower data.batch_size"):
        ShuffledBatchSampler(3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("unit,expected", [("file", 1700), ("definition", 12000)])
def test_pystdlib_corpus_sizes(unit, expected):
    corpus = build_corpus(PyStdlibConfig(builder="pystdlib", unit=unit))
    assert corpus.stats["documents"] > expected
    assert corpus.train_tokens > 25_000_000
    assert torch.tensor([len(d) for d in corpus.val]).sum() > 0
    names = [n for n, _ in pystdlib_documents(unit)][:3]
    assert names == sorted(names)

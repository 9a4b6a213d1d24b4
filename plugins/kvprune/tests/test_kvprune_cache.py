"""The pruned cache against DynamicCache and a zeroing reference: tokens, logits and exact bytes."""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kvprune_helpers import dynamic_cache, dynamic_nbytes, generate, greedy_loop, prompts, tiny_llama  # noqa: E402

from memwise_kvprune.compat import cache_kwarg  # noqa: E402
from memwise_kvprune import FP8, Eviction, Int4, ThinK, make_cache, predict_nbytes, pruned_generation  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_ratio_zero_matches_dynamic_cache_tokens_and_bytes(model):
    ids, mask = prompts()
    dense = dynamic_cache(model)
    expected = generate(model, ids, mask, dense)
    with pruned_generation(model, think=0.0) as cache:
        got = generate(model, ids, mask, cache)
    assert torch.equal(got, expected)
    assert cache.nbytes() == dynamic_nbytes(dense)
    assert cache.dense_nbytes() == dynamic_nbytes(dense)


def _zero_pruned_channels(reference, pruned, window):
    """After prefill: zero, in the dense cache, the channels ThinK dropped from tokens outside the window."""
    for dense_layer, layer in zip(reference.layers, pruned.layers):
        keep = torch.zeros(dense_layer.keys.shape[0], dense_layer.keys.shape[1], dense_layer.keys.shape[-1],
                           dtype=torch.bool)
        keep.scatter_(-1, layer.channels.long(), True)
        old = dense_layer.keys.shape[-2] - window
        dense_layer.keys[:, :, :old] *= keep[:, :, None, :]


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_compact_keys_equal_zeroing_reference(model, ratio):
    ids, mask = prompts()
    think = ThinK(ratio=ratio, window=8)
    with pruned_generation(model, think=think) as cache:
        got, got_logits = greedy_loop(model, ids, mask, cache)
        # the same prefill in a dense cache, with the dropped channels zeroed instead of removed
        reference = dynamic_cache(model)
        want, want_logits = greedy_loop(model, ids, mask, reference,
                                        after_prefill=lambda c: _zero_pruned_channels(c, cache, 8))
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(layer.pruned_k.shape[-1] == think.kept_channels(16) for layer in cache.layers)


def test_custom_loop_equals_generate_with_every_option(model):
    ids, mask = prompts()
    settings = dict(think=ThinK(0.5, window=8, fold_every=4), eviction=Eviction("snapkv", 0.6, observe=8),
                    quant=FP8())
    with pruned_generation(model, **settings) as cache:
        want = generate(model, ids, mask, cache)
    with pruned_generation(model, **settings) as cache:
        got, _ = greedy_loop(model, ids, mask, cache)
    assert torch.equal(got, want)


_THINK, _FOLD = ThinK(0.5, window=8), ThinK(0.25, window=8, fold_every=3)
_STREAM, _SNAP = Eviction("streaming", 0.5, sinks=2), Eviction("snapkv", 0.4, observe=8)


@pytest.mark.parametrize("think,eviction,quant", [
    (None, None, None), (_THINK, None, None), (_FOLD, None, FP8()), (None, _SNAP, FP8()),
    (_THINK, _SNAP, None), (_FOLD, _STREAM, FP8()), (None, None, Int4()), (_THINK, _SNAP, Int4(8)),
    (ThinK(0.2, window=8), _STREAM, Int4(4)),  # 13 kept channels: an odd row, one scale for it
])
def test_nbytes_closed_form(model, think, eviction, quant):
    ids, mask = prompts()
    with pruned_generation(model, think=think, eviction=eviction, quant=quant) as cache:
        generate(model, ids, mask, cache, new=6)
    seen = cache.layers[0].seen
    assert seen == ids.shape[1] + 5  # the last generated token is never fed back
    want = predict_nbytes(2, 2, 2, 16, ids.shape[1], 5, think, eviction, quant, dtype_bytes=4)
    assert cache.nbytes() == want


def test_bytes_fall_monotonically_with_ratio(model):
    ids, mask = prompts()
    sizes = []
    for ratio in (0.0, 0.125, 0.25, 0.5, 0.75, 0.875):
        with pruned_generation(model, think=ThinK(ratio, window=8)) as cache, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg("model"): cache})
        sizes.append(cache.nbytes())
    assert all(a > b for a, b in zip(sizes, sizes[1:]))


def test_folding_moves_window_into_pruned_store(model):
    ids, mask = prompts()
    with pruned_generation(model, think=ThinK(0.5, window=8, fold_every=4)) as cache:
        generate(model, ids, mask, cache, new=7)
    layer = cache.layers[0]
    assert layer.window_k.shape[-2] < 8 + 4
    assert layer.pruned_k.shape[-2] > ids.shape[1] - 8  # decoded tokens were folded in
    assert layer.pruned_k.shape[-2] + layer.window_k.shape[-2] == layer.seen


def test_think_bound_at_long_prompt():
    """At L = 1024 and ratio r, the saving is within 1 point of r/2 x (1 - w/L), index overhead included."""
    model = tiny_llama(layers=1)
    torch.manual_seed(3)
    length, window, ratio = 1024, 32, 0.5
    ids = torch.randint(0, 256, (1, length))
    cache = make_cache(model, think=ThinK(ratio, window=window))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg("model"): cache})
    saving = 1 - cache.nbytes() / cache.dense_nbytes()
    bound = ratio / 2 * (1 - window / length)
    assert bound - 0.01 <= saving <= bound


@pytest.mark.parametrize("think", [ThinK(0.5, window=8), None], ids=["think", "joint"])
@pytest.mark.parametrize("quant", [FP8(), Int4(8)], ids=["fp8", "int4"])
def test_left_padding_row_matches_the_row_alone(model, quant, think):
    """ThinK and quantization see only real tokens: a padded row decodes as if it were alone."""
    ids, mask = prompts(pad=7)
    settings = dict(think=think, quant=quant)
    with pruned_generation(model, **settings) as cache:
        batched, batched_logits = greedy_loop(model, ids, mask, cache)
    alone_ids, alone_mask = ids[1:, 7:], mask[1:, 7:]
    with pruned_generation(model, **settings) as cache:
        alone, alone_logits = greedy_loop(model, alone_ids, alone_mask, cache)
    assert torch.equal(batched[1:], alone)
    for a, b in zip(batched_logits, alone_logits):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", [FP8(), FP8("e5m2"), Int4(8), Int4(16)], ids=["e4m3", "e5m2", "int4g8", "int4g16"])
def test_joint_key_value_rows_decode_as_separate_stores(model, quant, monkeypatch):
    """Without ThinK a token's key and value share one quantized row (scaled apart): same tokens, logits
    and bytes as separate key and value stores, and each part holds what encoding it alone would."""
    from memwise_kvprune.layer import PrunedLayer

    ids, mask = prompts(pad=7)
    with pruned_generation(model, eviction=_SNAP, quant=quant) as cache:
        got, got_logits = greedy_loop(model, ids, mask, cache)
    layer = cache.layers[0]
    assert layer.kv is not None and layer.pruned_k is None and layer.vals is None
    monkeypatch.setattr(PrunedLayer, "_joint", lambda self: False)
    with pruned_generation(model, eviction=_SNAP, quant=quant) as split:
        want, want_logits = greedy_loop(model, ids, mask, split)
    assert torch.equal(got, want) and cache.nbytes() == split.nbytes()
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    other = split.layers[0]
    keys, values = layer.kv.decode(torch.float32).chunk(2, dim=-1)
    assert torch.equal(keys, other.pruned_k.decode(torch.float32))
    assert torch.equal(values, other.vals.decode(torch.float32))


def test_streaming_sinks_are_first_real_tokens(model):
    ids, mask = prompts(pad=7)
    with pruned_generation(model, eviction=Eviction("streaming", 0.5, sinks=3)) as cache:
        greedy_loop(model, ids, mask, cache, new=1)
    positions = cache.layers[0].positions.long()
    keep = math.ceil(0.5 * ids.shape[1])
    assert positions.shape[-1] == keep + 1  # the prompt's survivors, then the one decoded token
    assert positions[:, :, -1].eq(ids.shape[1]).all()
    assert positions[0, :, :3].tolist() == [[0, 1, 2]] * 2
    assert positions[1, :, :3].tolist() == [[7, 8, 9]] * 2
    recent = list(range(ids.shape[1] - (keep - 3), ids.shape[1]))
    assert positions[1, 0, 3:-1].tolist() == recent


def test_snapkv_keeps_a_prompt_within_its_window_whole(model):
    """A prompt no longer than observe + sinks is not evicted: same tokens and logits as DynamicCache."""
    ids, mask = prompts(batch=1, length=20)
    want, want_logits = greedy_loop(model, ids, mask, dynamic_cache(model))
    with pruned_generation(model, eviction=Eviction("snapkv", 0.3, observe=16, sinks=4)) as cache:
        got, got_logits = greedy_loop(model, ids, mask, cache)
    assert cache.layers[0].positions is None and cache.layers[0].stored_tokens() == 20 + 6
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b)


def test_snapkv_keeps_sinks_window_and_at_least_both(model):
    ids, mask = prompts(pad=7)
    length = ids.shape[1]
    ev = Eviction("snapkv", 0.1, observe=8, sinks=3)  # 10% of 40 is below observe + sinks = 11
    with pruned_generation(model, eviction=ev) as cache:
        greedy_loop(model, ids, mask, cache, new=1)
    positions = cache.layers[0].positions.long()[..., :-1]  # the prompt's survivors
    assert positions.shape[-1] == 11
    assert positions[0, :, :3].tolist() == [[0, 1, 2]] * 2  # row 1 starts after 7 pads
    assert positions[1, :, :3].tolist() == [[7, 8, 9]] * 2
    assert positions[:, :, -8:].tolist() == [[list(range(length - 8, length))] * 2] * 2


def test_think_leaves_a_prompt_within_its_observation_window_whole(model):
    """A prompt no longer than ``observe`` keeps every key channel (and the closed form says so)."""
    ids, mask = prompts(length=12, pad=3)
    think = ThinK(0.5, observe=12)
    with pruned_generation(model, think=think) as cache:
        generate(model, ids, mask, cache, new=4)
    assert all(layer.channels is None for layer in cache.layers)
    assert cache.nbytes() == predict_nbytes(2, 2, 2, 16, 12, 3, think, dtype_bytes=4)
    longer, longer_mask = prompts(length=13, pad=3)
    with pruned_generation(model, think=think) as cache:
        generate(model, longer, longer_mask, cache, new=4)
    assert all(layer.channels is not None for layer in cache.layers)

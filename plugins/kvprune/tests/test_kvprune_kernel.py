"""The CPU FP8 decoding-attention kernel against the torch path it replaces."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kvprune_helpers import greedy_loop, prompts, tiny_llama  # noqa: E402

from memwise_kvprune import FP8, Eviction, ThinK, pruned_generation  # noqa: E402
from memwise_kvprune.attention import attend  # noqa: E402
from memwise_kvprune.kernels import cpu_attention  # noqa: E402
from memwise_kvprune.layer import PrunedLayer  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def ext():
    built = cpu_attention.extension()
    if built is None:
        pytest.skip("the CPU FP8 attention kernel cannot be built here (no C++ compiler or ninja)")
    return built


def _layer(fmt: str, batch: int, heads: int, group: int, tokens: int, dim: int,
           think: ThinK | None = None) -> tuple[PrunedLayer, torch.Tensor]:
    torch.manual_seed(0)
    keys = torch.randn(batch, heads, tokens, dim) * torch.logspace(-2, 1, tokens)[:, None]
    values = torch.randn(batch, heads, tokens, dim) * 3
    query = torch.randn(batch, heads * group, tokens, dim)
    layer = PrunedLayer(think=think, quant=FP8(fmt))
    view, _ = layer.update(keys, values)
    layer.compress(view, query, None, dim ** -0.5)
    for _ in range(3):  # decoded tokens: ThinK keeps their keys full width
        layer.update(torch.randn(batch, heads, 1, dim), torch.randn(batch, heads, 1, dim))
    return layer, torch.randn(batch, heads * group, 1, dim) * 4


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("think", [None, ThinK(0.5), ThinK(0.4, window=4)], ids=["joint", "think", "think-window"])
@pytest.mark.parametrize("dim,group", [(64, 3), (24, 1), (16, 2)])  # 24: a row's tail goes through the table
def test_kernel_equals_the_torch_attention(ext, monkeypatch, fmt, think, dim, group):
    layer, query = _layer(fmt, batch=2, heads=2, group=group, tokens=37, dim=dim, think=think)
    assert (layer.kv is not None) == (think is None)
    got = attend(layer, query, None, dim ** -0.5)
    monkeypatch.setattr(cpu_attention, "extension", lambda: None)
    want = attend(layer, query, None, dim ** -0.5)
    assert got.shape == want.shape == (2, 1, 2 * group, dim)
    # float32 rounding, in another summation order: against the output's own scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())


@pytest.mark.parametrize("think", [None, ThinK(0.5, window=8, fold_every=2)], ids=["joint", "think-fold"])
def test_decoding_through_the_kernel_matches_the_torch_path(ext, monkeypatch, think):
    """Whole generations: the kernel serves the unpadded decoding steps; tokens equal, logits within fp32 rounding."""
    model = tiny_llama()
    ids, _ = prompts(batch=1, pad=0)
    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a: calls.append(1) or real(*a))
    settings = dict(think=think, eviction=Eviction("snapkv", 0.5, observe=8), quant=FP8())
    with pruned_generation(model, **settings) as cache:
        got, got_logits = greedy_loop(model, ids, torch.ones_like(ids), cache)
    assert len(calls) == 6 * 2  # every decoding step of both layers
    monkeypatch.setattr(cpu_attention, "extension", lambda: None)
    with pruned_generation(model, **settings) as cache:
        want, want_logits = greedy_loop(model, ids, torch.ones_like(ids), cache)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_cannot_be_built_warns_once_and_leaves_the_torch_path(no_cpu_compiler):
    with pytest.warns(UserWarning, match="could not be built .*no C\\+\\+ compiler found.*torch operations"):
        assert cpu_attention.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_attention.extension() is None  # tried once per process
    layer, query = _layer("e4m3", batch=1, heads=1, group=1, tokens=5, dim=16)
    assert torch.isfinite(attend(layer, query, None, 0.25)).all()

"""Chunked cross-entropy: agreement with the unchunked loss and gradients, the HF hook (tied
embeddings, ignore_index), memory against MemTracker and the core's logits term, the plugin."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import memwise
from memwise_chunked_ce.measure import head_loss_peaks
from memwise.memory import llama_activation_bytes, logits_activation_bytes, loss_temporary_bytes, measure_step
from memwise_chunked_ce import (ChunkedCEPlugin, apply_chunked_ce, auto_chunk_size, chunked_linear_cross_entropy,
                                remove_chunked_ce)
from memwise.testing import tiny_llama


def reference(h, w, b, t, z_loss=0.0, ignore_index=-100):
    logits = F.linear(h, w, b).float()
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index)
    if z_loss:
        valid = t != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    return loss


def inputs(n=70, hidden=24, vocab=500, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = -100
    return h, w, b, t


@pytest.mark.parametrize("chunk", [1, 8, 33, 70, 1000, 0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_and_gradients_match_unchunked(chunk, z_loss):
    h, w, b, t = inputs()
    ref = reference(h, w, b, t, z_loss)
    want = torch.autograd.grad(ref, (h, w, b))
    got_loss = chunked_linear_cross_entropy(h, w, t, b, chunk_size=chunk, z_loss=z_loss)
    got = torch.autograd.grad(got_loss, (h, w, b))
    torch.testing.assert_close(got_loss, ref, rtol=1e-6, atol=1e-6)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_ignore_index_num_items_and_upstream_gradient():
    h, w, _, t = inputs(bias=False)
    t[t == -100] = -1
    t[:20] = -1
    ref = F.cross_entropy(F.linear(h, w), t, ignore_index=-1, reduction="sum") / 100
    got = chunked_linear_cross_entropy(h, w, t, chunk_size=16, ignore_index=-1, num_items=100)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # an upstream gradient other than 1 scales every gradient (loss used inside a bigger graph)
    want = torch.autograd.grad(3.0 * ref, (h, w))
    for a, e in zip(torch.autograd.grad(3.0 * got, (h, w)), want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    # ignored rows get exactly zero gradient
    gh = torch.autograd.grad(chunked_linear_cross_entropy(h, w, t, chunk_size=16, ignore_index=-1), h)[0]
    assert torch.count_nonzero(gh[:20]) == 0 and torch.count_nonzero(gh[20:]) > 0


def test_autocast_bf16_matches_hf_mixed_precision_path():
    h, w, _, t = inputs(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        got = chunked_linear_cross_entropy(h, w, t, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    want = torch.autograd.grad(ref, (h, w))
    for a, e in zip(torch.autograd.grad(got, (h, w)), want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


def test_bad_shapes_are_clear_errors():
    h, w, _, t = inputs(bias=False)
    with pytest.raises(ValueError, match="one id per hidden vector"):
        chunked_linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="does not fit hidden size"):
        chunked_linear_cross_entropy(h, w[:, :-1], t)


def test_auto_chunk_size_follows_liger_rule_above_a_floor():
    # Liger's rule: SmolLM2 (hidden 576, vocab 49,152) on 8 x 512 tokens: 4096 / ceil(49152/576) = 47.6 -> 64,
    # raised to the floor min(128, 4096 / 16) = 128 rows
    assert auto_chunk_size(4096, 576, 49152) == 128
    # tiny at 32k vocabulary, 1,024 tokens: Liger's 8 rows, the floor 1024 / 16 = 64
    assert auto_chunk_size(1024, 256, 32768) == 64
    # many tokens: Liger's rule is above the floor (65536 / 86 = 762.1 -> 1024)
    assert auto_chunk_size(65536, 576, 49152) == 1024
    assert auto_chunk_size(3, 64, 100) == 2
    assert auto_chunk_size(1, 64, 100000) == 1
    for tokens in (100, 1000, 3000):  # where the floor decides, a chunk is at most 1/16 of the tokens
        assert auto_chunk_size(tokens, 64, 32768) <= max(1, tokens // 16)


def llama(vocab=300, tied=True, seed=0):
    return tiny_llama(vocab=vocab, seed=seed, tie_word_embeddings=tied, pad_token_id=None)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_model_loss_and_gradients_match(tied):
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, 30:] = -100
    ref, chunked = llama(tied=tied), llama(tied=tied)
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied
    assert apply_chunked_ce(chunked, chunk_size=16)
    out_ref = ref(input_ids=ids, labels=labels)
    out = chunked(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    for (name, a), b in zip(chunked.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # eval mode and calls without labels keep the model's own forward (logits for generation)
    chunked.eval()
    assert chunked(input_ids=ids, labels=labels).logits.shape == (3, 40, 300)
    chunked.train()
    assert chunked(input_ids=ids).logits is not None
    with pytest.warns(memwise.NoEffectWarning):
        assert not apply_chunked_ce(chunked)
    assert remove_chunked_ce(chunked) and "forward" not in vars(chunked)
    assert chunked(input_ids=ids, labels=labels).logits is not None


@pytest.mark.slow
def test_logits_share_falls_eightfold_at_32k_vocab():
    """Head + loss alone under MemTracker: bytes above what both paths hold (hidden, weight, grads)."""
    n, hidden, vocab = 1024, 64, 32768
    base, chunked = head_loss_peaks(n, hidden, vocab, chunk_size=64)
    assert base >= 2 * n * vocab * 4  # logits and log-softmax at least
    assert chunked * 8 <= base, (chunked, base)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_model_memory_and_core_logits_term_at_32k_vocab(precision):
    """The core's prediction (with its logits term) and the plugin's estimate against MemTracker."""
    batch, seq, vocab = 4, 64, 32768
    ids = torch.randint(0, 260, (batch, seq))

    def measure(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else None
        kwargs = {"context": ctx} if ctx else {}
        return measure_step(m, opt, lambda: m(input_ids=ids, labels=ids).loss, **kwargs)

    base_model = llama(vocab=vocab)
    base = measure(base_model)
    predicted_base = llama_activation_bytes(base_model.config, batch, seq, precision)
    measured_base = base.after_forward["activations"]
    assert abs(predicted_base - measured_base) <= 0.15 * measured_base, (predicted_base, measured_base)
    # the logits term is most of this model's saved activations
    assert logits_activation_bytes(base_model.config, batch, seq, precision) > 0.8 * measured_base

    m = llama(vocab=vocab)
    apply_chunked_ce(m, chunk_size=32)
    chunked = measure(m)
    ctx = memwise.RunContext(stage="fit", model=m, workload=memwise.Workload(batch, seq, precision))
    delta = ChunkedCEPlugin(chunk_size=32).memwise_estimate_memory(ctx=ctx, estimate=None)
    predicted = predicted_base + delta.activations
    measured = chunked.after_forward["activations"]
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
    assert measured * 4 <= measured_base
    assert chunked.peak_total < base.peak_total
    # temporaries at their own maximum: the logits' gradients without chunks, the tied weight's with them
    temporaries = loss_temporary_bytes(base_model.config, batch, seq, precision)
    for predicted, report in ((temporaries, base), (temporaries + delta.temporaries, chunked)):
        measured = report.category_max["temporaries"]
        assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_plugin_config_validation_and_claims():
    with pytest.raises(memwise.RecipeError, match="chunked_ce.chunk_size"):
        ChunkedCEPlugin(chunk_size=-1)
    with pytest.raises(memwise.RecipeError, match="chunked_ce.z_loss"):
        ChunkedCEPlugin(z_loss=-0.1)
    m = llama()
    ctx = memwise.RunContext(stage="fit", model=m)
    plugin = ChunkedCEPlugin()
    assert plugin.memwise_validate(ctx=ctx) == []
    plugin.memwise_transform_model(ctx=ctx)
    assert ctx.claims.owner == {"lm_head": "chunked_ce"}
    other = type("Replacer", (memwise.Plugin,), {"name": "mesa"})()
    with pytest.raises(memwise.ClaimConflict, match="chunked_ce"):
        ctx.claims.claim("lm_head", other)
    plugin.memwise_teardown(ctx=ctx)
    assert "forward" not in vars(m)
    # a head replaced by another module type is refused with the fix
    m.lm_head = torch.nn.Sequential(m.lm_head)
    problems = plugin.memwise_validate(ctx=memwise.RunContext(stage="fit", model=m))
    assert problems and "not a plain torch.nn.Linear" in problems[0].message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChunkedCEPlugin(chunk_size=128)

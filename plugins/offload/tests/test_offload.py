"""Activation offload: bitwise gradients, the token split, host pool reuse, device memory against
MemTracker, the estimate, Mesa composition, the plugin's rules."""

from __future__ import annotations

import gc

import pytest
import torch

import memwise
from memwise.memory import HOST, llama_activation_bytes, measure_step
from memwise_offload import OffloadPlugin, apply_offload, offloader_of, remove_offload
from memwise.testing import tiny_llama

LAYERS = 4


def llama(seed=0):
    return tiny_llama(layers=LAYERS, seed=seed, pad_token_id=None)


IDS = torch.randint(0, 260, (4, 64), generator=torch.Generator().manual_seed(1))


def loss(m):
    return m(input_ids=IDS, labels=IDS, use_cache=False).loss


def grads(m):
    m.zero_grad(set_to_none=True)
    loss(m).backward()
    return [p.grad.clone() for p in m.parameters()]


def measure(m):
    return measure_step(m, torch.optim.SGD(m.parameters(), lr=0.0), lambda: loss(m))


def test_full_swap_gives_bitwise_gradients_and_reuses_host_buffers():
    want = grads(llama())
    m = llama()
    assert apply_offload(m) == [f"model.layers.{i}" for i in range(LAYERS)]
    got = grads(m)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    pool = offloader_of(m).pool
    buffers = {k: b.data_ptr() for k, b in pool.buffers.items()}
    assert len({k[0] for k in buffers}) == LAYERS and HOST.current >= pool.nbytes > 0
    got = grads(m)  # second step: same buffers, no new host allocation
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert {k: b.data_ptr() for k, b in pool.buffers.items()} == buffers
    assert remove_offload(m) == [f"model.layers.{i}" for i in range(LAYERS)]
    assert offloader_of(m) is None
    assert all(torch.equal(a, b) for a, b in zip(grads(m), want))


@pytest.mark.slow
def test_host_ledger_released_on_remove_and_on_garbage_collection():
    start = HOST.current
    m = llama()
    apply_offload(m)
    grads(m)
    size = offloader_of(m).pool.nbytes
    assert HOST.current == start + size
    remove_offload(m)
    assert HOST.current == start
    m = llama()
    apply_offload(m)
    grads(m)
    del m
    gc.collect()
    assert HOST.current == start


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75])
def test_token_split_matches_within_recompute_tolerance(fraction):
    want = grads(llama())
    m = llama()
    apply_offload(m, fraction=fraction)
    for a, b in zip(grads(m), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # host bytes scale with the swapped share (whole sequences: 4 rows -> steps of 1/4)
    pool = offloader_of(m).pool.nbytes
    full = llama()
    apply_offload(full)
    grads(full)
    assert pool == pytest.approx(fraction * offloader_of(full).pool.nbytes, rel=0.05, abs=70_000)


@pytest.mark.slow
def test_device_saved_activations_fall_below_one_layer_and_estimate_tracks():
    gc.collect()
    start = HOST.current  # the ledger is per process: other tests' pools may still be alive
    base_model = llama()
    base = measure(base_model)
    m = llama()
    apply_offload(m, prefetch=1)
    off = measure(m)
    saved_base, saved = base.after_forward["activations"], off.after_forward["activations"]
    # target: device-side saved activations <= 1/L of the baseline's (plus the prefetch window in backward)
    assert saved <= saved_base / LAYERS, (saved, saved_base)
    assert off.after_forward["host"] == start + offloader_of(m).pool.nbytes
    assert off.category_max["host"] == off.at_peak["host"] == off.after_forward["host"]
    assert off.peak_total < base.peak_total
    ctx = memwise.RunContext(stage="fit", model=m, workload=memwise.Workload(4, 64))
    delta = OffloadPlugin(prefetch=1).memwise_estimate_memory(ctx=ctx, estimate=None)
    predicted = llama_activation_bytes(m.config, 4, 64) + delta.activations
    assert abs(predicted - saved) <= 0.15 * saved, (predicted, saved)
    # host: the pool copies whole storages (views and rotary tables included): within 25%
    host = off.after_forward["host"] - start
    assert abs(delta.host - host) <= 0.25 * host, (delta.host, host)


@pytest.mark.slow
def test_prefetch_depth_sets_how_many_layers_are_back_on_the_device():
    peaks = {}
    for depth in (0, 2):
        m = llama()
        apply_offload(m, prefetch=depth)
        peaks[depth] = measure(m).category_max["temporaries"]
    per_layer = offloader_of(m).pool.nbytes / LAYERS
    # two more layers fetched early: about two layers' worth more device memory in backward
    assert peaks[2] - peaks[0] >= 1.5 * per_layer, (peaks, per_layer)


@pytest.mark.slow
def test_composes_with_mesa_and_moves_the_packed_bytes():
    from memwise_mesa import apply_mesa, rounding

    mesa_only, both = llama(), llama()
    apply_mesa(mesa_only, exclude=["*lm_head"])
    apply_mesa(both, exclude=["*lm_head"])
    apply_offload(both)
    torch.manual_seed(5)
    rounding.reseed(5)  # Mesa's stochastic rounding draws from its own stream
    want = grads(mesa_only)
    torch.manual_seed(5)
    rounding.reseed(5)
    got = grads(both)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    plain = llama()
    apply_offload(plain)
    grads(plain)
    # most of what travels is 8-bit: well under half the fp32 traffic
    assert offloader_of(both).pool.nbytes < 0.5 * offloader_of(plain).pool.nbytes
    # and it does travel: Mesa keeps its packed forms on ctx, out of saved-tensor hooks' sight;
    # the packed store hands them to offload, so the layers' 8-bit payloads leave the device
    saved_mesa = measure(mesa_only).after_forward["activations"]
    saved_plain = measure(plain).after_forward["activations"]  # what stays outside the layers
    report = measure(both)
    moved = saved_mesa - report.after_forward["activations"]
    assert report.after_forward["activations"] - saved_plain <= 0.1 * (saved_mesa - saved_plain), (
        report.after_forward["activations"], saved_plain, saved_mesa)
    assert offloader_of(both).pool.nbytes >= moved, (offloader_of(both).pool.nbytes, moved)


def test_plugin_rules():
    with pytest.raises(memwise.RecipeError) as err:
        OffloadPlugin(fraction=1.5, prefetch=-1, layers="some")
    assert {p.key for p in err.value.problems} == {"offload.fraction", "offload.prefetch", "offload.layers"}
    from memwise_checkpointing import CheckpointingPlugin

    m = llama()
    off, ckpt = OffloadPlugin(layers=[0, 1]), CheckpointingPlugin(layers=[1, 2])
    ctx = memwise.RunContext(stage="fit", model=m, plugins=[ckpt, off])
    problems = off.memwise_validate(ctx=ctx)
    assert problems and "[1]" in problems[0].message and "both checkpointed and offloaded" in problems[0].message
    ctx.plugins = [CheckpointingPlugin(layers=[2, 3]), off]
    assert off.memwise_validate(ctx=ctx) == []
    assert OffloadPlugin(layers=[9]).memwise_validate(ctx=ctx)[0].key == "offload.layers"
    from memwise.plan import check

    assert check([CheckpointingPlugin(layers=[2, 3]), off], "fit") == []
    other = type("OtherOffload", (OffloadPlugin,), {"name": "other_offload"})()
    problems = check([off, other], "fit")
    assert any("both provide 'activation.placement'" in p.message for p in problems)


def bf16_grads(m):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(m)
    out.backward()
    return [p.grad.clone() for p in m.parameters()]


def test_autocast_weight_copies_are_cast_again_not_offloaded(monkeypatch):
    from memwise.memory import autocast_copy_bytes
    from memwise_offload import offload

    want = bf16_grads(llama())
    m = llama()
    apply_offload(m)
    assert all(torch.equal(a, b) for a, b in zip(bf16_grads(m), want))  # the same bf16 values come back
    recast = offloader_of(m).pool.nbytes
    copying = llama()
    apply_offload(copying)
    monkeypatch.setattr(offload, "parameter_cast_of", lambda t, params: None)  # every saved tensor to host
    assert all(torch.equal(a, b) for a, b in zip(bf16_grads(copying), want))
    # exactly the layers' bf16 weight copies no longer travel
    assert offloader_of(copying).pool.nbytes - recast == autocast_copy_bytes(m.config, "bf16-mixed")
    # and the estimate leaves them out of host too (within 5%; counting them would be 8% over here)
    ctx = memwise.RunContext(stage="fit", model=m, workload=memwise.Workload(4, 64, "bf16-mixed"))
    host = OffloadPlugin().memwise_estimate_memory(ctx=ctx, estimate=None).host
    assert abs(host - recast) <= 0.05 * recast, (host, recast)


def test_a_parameter_changed_between_forward_and_backward_is_an_error():
    m = llama()
    apply_offload(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(m)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="offload: a parameter"):
        out.backward()


def _fetched_high_water(prefetch: int) -> tuple[int, int]:
    """The most bytes of offloaded storages on the device at once in backward, and one layer's bytes."""
    m = llama()
    apply_offload(m, prefetch=prefetch)
    off = offloader_of(m)
    high = 0
    bring = off._bring

    def counting(saved):
        nonlocal high
        bring(saved)
        high = max(high, sum(s.host.numel() for g in off.groups for s in g.saved if s.device is not None))

    off._bring = counting
    grads(m)
    return high, off.pool.nbytes // LAYERS


def test_without_prefetch_a_layer_comes_back_one_storage_at_a_time():
    high, layer = _fetched_high_water(0)
    # only what the running backward node reads: a fraction of the layer
    assert 0 < high <= 0.25 * layer, (high, layer)
    high, layer = _fetched_high_water(1)
    assert high >= 1.0 * layer, (high, layer)  # the layer ahead comes back whole


def test_the_estimate_moves_the_same_layers_after_chunked_ce_shrank_the_loss_side():
    """Chunked CE removes the logits, which are outside the decoder layers: what offload moves to host
    is the layers' bytes either way (at vocabulary 32,768 the logits outweigh the layers here)."""
    from memwise.memory import predict_baseline
    from memwise_chunked_ce import ChunkedCEPlugin

    m = tiny_llama(layers=LAYERS, vocab=32768, pad_token_id=None)
    ctx = memwise.RunContext(stage="fit", model=m, workload=memwise.Workload(4, 64))
    base = predict_baseline(m, 0, 4, 64, "32-true")
    alone = OffloadPlugin().memwise_estimate_memory(ctx=ctx, estimate=base)
    chunked = base.apply(ChunkedCEPlugin().memwise_estimate_memory(ctx=ctx, estimate=base))
    assert base.outside_layers > base.layer_activations  # the loss side is most of it
    after = OffloadPlugin().memwise_estimate_memory(ctx=ctx, estimate=chunked)
    assert after.host == alone.host > 0
    assert after.activations == alone.activations

"""Activation checkpointing: same gradients, layer selection, idempotence, undo, estimate."""

from __future__ import annotations

import warnings

import pytest
import torch

import memwise
from memwise.memory import llama_activation_bytes, measure_step
from memwise_checkpointing import CheckpointingPlugin, apply_checkpointing, remove_checkpointing
from memwise.testing import tiny_llama


def model(seed=0):
    return tiny_llama(layers=3, seed=seed)


def grads(m, ids):
    m.zero_grad()
    m(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in m.parameters()]


def test_gradients_are_unchanged():
    ids = torch.randint(0, 256, (2, 32))
    ref, ckpt = model(), model()
    assert apply_checkpointing(ckpt) == [f"model.layers.{i}" for i in range(3)]
    for a, b in zip(grads(ref, ids), grads(ckpt, ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_layer_selection_idempotence_and_undo():
    m = model()
    assert apply_checkpointing(m, [0, -1]) == ["model.layers.0", "model.layers.2"]
    with pytest.warns(memwise.NoEffectWarning):
        assert apply_checkpointing(m, [0]) == []
    assert remove_checkpointing(m) == ["model.layers.0", "model.layers.2"]
    assert "forward" not in vars(m.model.layers[0])
    with pytest.raises(IndexError, match="out of range"):
        apply_checkpointing(m, [5])


@pytest.mark.slow
def test_saved_activations_fall_and_estimate_tracks_them():
    ids = torch.randint(0, 256, (4, 64))

    def saved(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        # use_cache=False as in training: a KV cache would keep k and v of every layer
        return measure_step(m, opt, lambda: m(input_ids=ids, labels=ids, use_cache=False).loss
                            ).after_forward["activations"]

    base = saved(model())
    m = model()
    apply_checkpointing(m)
    ckpt = saved(m)
    assert ckpt < base / 3
    m = model()
    ctx = memwise.RunContext(stage="fit", model=m, workload=memwise.Workload(4, 64))
    delta = CheckpointingPlugin().memwise_estimate_memory(ctx=ctx, estimate=None)
    predicted = llama_activation_bytes(m.config, 4, 64) + delta.activations
    assert abs(predicted - ckpt) <= 0.15 * ckpt


def test_bad_layers_setting():
    with pytest.raises(memwise.RecipeError, match="checkpointing.layers"):
        CheckpointingPlugin(layers="some")
    ctx = memwise.RunContext(stage="fit", model=model())
    problems = CheckpointingPlugin(layers=[7]).memwise_validate(ctx=ctx)
    assert problems and "out of range" in problems[0].message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckpointingPlugin(layers=[0])

"""Mesa's 8-bit backward under fp16 autocast with a GradScaler."""

from __future__ import annotations

import math

import torch
from memwise_mesa import apply_mesa
from memwise.testing import tiny_llama


def _llama():
    return tiny_llama()


def test_fp16_grad_scaler_with_mesa_backward():
    """Scaled fp16 gradients flow through Mesa's 8-bit saved activations: training goes on, and an
    overflowing step is skipped with the weights untouched."""
    model = _llama()
    assert sum(apply_mesa(model).counts().values()) > 0
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    losses = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=batch, labels=batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    weights = [p.detach().clone() for p in model.parameters()]
    scaler.update(2.0 ** 40)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=batch, labels=batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # inf gradients: skipped
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 40

"""Alignment: full-parameter training of the pruned model before LoRA (the paper's step).

Pruning shifts the model's outputs; a short continual pretraining of the pruned model on
general text brings it back towards the unpruned one, so adapters trained on it transfer
better. The LM head stays frozen (as in the paper); AdamW with cosine decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def align_pruned(model: nn.Module, batches: Iterable[dict], steps: int, lr: float = 5e-5,
                 weight_decay: float = 0.0) -> list[float]:
    """Train every parameter except the LM head for ``steps`` batches; return the losses.

    ``batches``: an iterable of {"input_ids", "labels"} dicts, cycled if shorter than ``steps``.
    The requires_grad flags are restored afterwards and no optimizer state is kept.
    """
    if steps <= 0:
        return []
    flags = {p: p.requires_grad for p in model.parameters()}
    head = {id(p) for p in model.get_output_embeddings().parameters()} if hasattr(model, "get_output_embeddings") else set()
    params = [p for p in model.parameters() if id(p) not in head]
    for p in model.parameters():
        p.requires_grad_(id(p) not in head)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    was_training = model.training
    model.train()
    try:
        for _, batch in zip(range(steps), _cycle(batches)):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return losses


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    cache = list(batches)
    if not cache:
        raise ValueError("alignment needs at least one batch")
    while True:
        yield from cache

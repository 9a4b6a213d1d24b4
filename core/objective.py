"""The training objective: next-token loss, its target count, and evaluation over fixed batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memwise.data.tokens import IGNORE_INDEX


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token loss over target positions (no attention mask: padding sits at the end
    of each window, and causal attention never lets a real token see it)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss


def target_count(batch: dict) -> int:
    """Positions whose next token is a target: the loss's denominator, for token-weighted means."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: Any,
             forward_context: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Token-weighted loss over ``batches`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with forward_context():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = target_count(batch)
            if n:
                total += float(causal_lm_loss(model, batch)) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)

"""Non-finite guard: one fused check of loss and gradients per step, finite weights on save and load."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import get_total_norm

INF = float("inf")


def max_abs(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The largest absolute value over all tensors (NaN if any holds NaN), by foreach reductions.

    The infinity norm never overflows for finite values, unlike the 2-norm of huge gradients.
    """
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return None
    return get_total_norm(tensors, norm_type=INF)


def is_finite(loss: torch.Tensor, tensors: Iterable[torch.Tensor] = ()) -> bool:
    """True when the loss and every element of ``tensors`` are finite (one host sync)."""
    top = max_abs(tensors)
    values = loss.detach().float().reshape(1)
    if top is not None:
        values = torch.cat([values, top.float().reshape(1).to(values.device)])
    return bool(torch.isfinite(values).all())


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not torch.isfinite(value).all():
                bad.append(name)
    return bad


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written checkpoint of a report folder, or None."""
    found = [p for p in Path(folder).glob("*.ckpt") if p.is_file()] if Path(folder).is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None, recursively: JSON reports hold only finite numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value

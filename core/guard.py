"""Non-finite guard: one fused check of loss and gradients per step, the skip-or-stop policy for a
step that fails it, finite weights on save and load."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import get_total_norm

from memwise.errors import NonFiniteError

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


def step_is_finite(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaled: bool) -> bool:
    """A step's loss and gradients are finite. Under a GradScaler (``scaled``, 16-mixed) only the
    loss is checked: an overflow of the scaled gradients is the scaler's to skip (it lowers the scale)."""
    return is_finite(loss, [] if scaled else gradients(optimizer))


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


def stop_message(step: int, what: str, folder: Path) -> str:
    """Why a run stops at ``step``, the newest checkpoint of ``folder`` to resume from, and what to try."""
    last = newest_checkpoint(folder)
    resume = f"{last} (continue with resume={last})" if last else "none was written"
    return (f"step {step}: {what}; the run is stopped and no checkpoint holds this step. Last finite checkpoint: "
            f"{resume}. Try a lower optimizer.lr, more scheduler.warmup_steps, trainer.gradient_clip_val, "
            "bf16-mixed instead of 16-mixed, or check the data; trainer.on_nonfinite: skip drops such steps")


class SkipPolicy:
    """``trainer.on_nonfinite`` for a step whose loss or gradients are not finite: ``stop`` raises at
    once; ``skip`` drops the update (restoring the buffers its forward pass changed, e.g. Mesa's
    running ranges) and stops only after ``max_nonfinite_skips`` such steps in a row."""

    def __init__(self, on_nonfinite: str, max_skips: int) -> None:
        self.skip = on_nonfinite == "skip"
        self.max_skips = max_skips
        self.skips = 0
        """Steps whose update was dropped (all runs; counted in metrics.csv and the checkpoint)."""
        self.in_a_row = 0

    def keep(self, model: torch.nn.Module) -> list[torch.Tensor] | None:
        """The model's buffers before a step, when a dropped step has to restore them."""
        return [b.detach().clone() for b in model.buffers()] if self.skip else None

    def passed(self) -> None:
        """A finite step: the count of skips in a row starts again."""
        self.in_a_row = 0

    def drop(self, step: int, loss: torch.Tensor, model: torch.nn.Module, buffers: list[torch.Tensor] | None,
             folder: Path, show: bool) -> None:
        """Skip the step (buffers restored, a line printed when ``show``) or raise ``NonFiniteError``."""
        bad_loss = not torch.isfinite(loss.detach()).all()
        what = f"the loss is {float(loss.detach())}" if bad_loss else "the gradients hold NaN/inf"
        if self.skip:
            for b, saved in zip(model.buffers(), buffers or []):
                b.copy_(saved)
            self.skips += 1
            self.in_a_row += 1
            if self.in_a_row <= self.max_skips:
                if show:
                    print(f"step {step}: {what}; update skipped (trainer.on_nonfinite: skip, "
                          f"{self.in_a_row} in a row)", flush=True)
                return
            what += f", {self.in_a_row} steps in a row (trainer.max_nonfinite_skips: {self.max_skips})"
        raise NonFiniteError(stop_message(step, what, folder))

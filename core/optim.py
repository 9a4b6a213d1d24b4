"""Optimizer and LR-schedule registries, with exact optimizer-state byte counts."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Literal

import torch

from memwise.errors import Problem
from memwise.schema import option


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd", "adamw8bit"] = option(
        "adamw", "optimizer (registered name); adamw8bit is bitsandbytes' AdamW8bit (pip install bitsandbytes)")
    lr: float = option(3.0e-4, "peak learning rate", gt=0)
    weight_decay: float = option(0.0, "decoupled weight decay (adamw, adamw8bit) or L2 (adam, sgd)", ge=0)
    betas: list[float] = option([0.9, 0.95], "Adam betas", ge=0, lt=1)
    eps: float = option(1.0e-8, "Adam epsilon", gt=0)
    momentum: float = option(0.0, "SGD momentum", ge=0, lt=1)
    no_decay_norms_and_biases: bool = option(True, "no weight decay for norms, biases and 1-D parameters")


@dataclass
class SchedulerConfig:
    name: Literal["constant", "cosine", "linear"] = option("cosine", "learning-rate schedule")
    warmup_steps: int = option(0, "linear warm-up steps", ge=0)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if cfg.no_decay_norms_and_biases and p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameter: every parameter has requires_grad=False")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw8bit":
        import bitsandbytes  # checked at validation (optimizer_problems)

        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


ADAM_STEP_BYTES = 4
"""The fp32 ``step`` tensor torch's Adam and AdamW keep per parameter."""

BNB_MIN_8BIT, BNB_BLOCK = 4096, 256
"""bitsandbytes' AdamW8bit: tensors of at least 4,096 elements get uint8 moments with one fp32 absmax per
block of 256; smaller ones fp32 moments. Its two 256-entry fp32 code maps are shared by every tensor."""


def optimizer_problems(cfg: OptimizerConfig) -> list[Problem]:
    """An optimizer whose package is missing is a recipe problem, not an import error mid-run."""
    import importlib.util

    if cfg.name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return [Problem("optimizer.name", "adamw8bit is bitsandbytes' AdamW8bit, which is not installed: "
                        "pip install bitsandbytes (or use adamw)")]
    return []


def _bnb_8bit_bytes(numels: list[int]) -> int:
    total = sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT else 2 * 4 * n for n in numels)
    return total + (2 * 256 * 4 if any(n >= BNB_MIN_8BIT for n in numels) else 0)


def state_bytes(params: Iterable[torch.Tensor], optimizer: str | OptimizerConfig = "adamw") -> int:
    """Optimizer-state bytes of ``params`` after the first step, exactly as torch allocates them.

    The one place the formula lives: Adam/AdamW keep two moments shaped like the parameter
    plus a 4-byte ``step``; SGD keeps a momentum buffer when momentum is on; AdamW8bit as
    :data:`BNB_MIN_8BIT` says. Plugins whose optimizer leaves some parameters in plain AdamW
    count those with this function.
    """
    cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(name=optimizer)
    params = list(params)
    sizes = [p.numel() * p.element_size() for p in params]  # torch allocates zeros_like(p) per parameter
    if cfg.name == "adamw8bit":
        return _bnb_8bit_bytes([p.numel() for p in params])
    if cfg.name in ("adamw", "adam"):
        return sum(2 * size + ADAM_STEP_BYTES for size in sizes)
    if cfg.momentum:
        return sum(sizes)
    return 0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.name == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def repoint_schedulers(schedulers: list, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Move LR schedulers built on ``old`` onto its replacement ``new`` (same groups, same order).

    The new groups take the user's base rates (``initial_lr``) and the rate the schedule is at
    now (so a warm-up that started at 0 stays at 0), and ``new.step`` is marked the way torch's
    schedulers mark the optimizer they were built on, so their step-order check keeps working
    without the "optimizer.step() has been overridden" warning.
    """
    if len(new.param_groups) != len(old.param_groups):
        raise ValueError(f"the replacement optimizer has {len(new.param_groups)} parameter groups, the original "
                         f"{len(old.param_groups)}: schedulers cannot be moved onto it")
    for before, after in zip(old.param_groups, new.param_groups):
        after["initial_lr"] = before.get("initial_lr", before["lr"])
        after["lr"] = before["lr"]
    for scheduler in schedulers:
        scheduler.optimizer = new
        scheduler.base_lrs = [group["initial_lr"] for group in new.param_groups]
    if schedulers and not hasattr(new.step, "_wrapped_by_lr_sched"):
        step = new.step

        @functools.wraps(step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            new._opt_called = True  # what torch's scheduler wrapper records
            return step(*args, **kwargs)

        counted_step._wrapped_by_lr_sched = True
        new.step = counted_step

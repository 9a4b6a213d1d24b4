"""The memory probe of a recipe run: one plain step under ``memory.measure_step``, outside
Lightning, on the run's own first batch, optimizer and step contexts; everything it changes is
restored, so it can follow training (``memwise run``) or stand alone (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch

from memwise import assembly, memory
from memwise.data import loaders
from memwise.objective import causal_lm_loss


def measure(run: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            forward_context: Callable[[], Any] = contextlib.nullcontext) -> memory.MemoryReport:
    """One step of ``run`` (a ``memwise.runner.Run`` whose train loader was built) by category;
    model, optimizer, plugin and RNG states are restored afterwards."""
    ctx, host = run.ctx, run.host
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in loaders.first_batch(ctx).items()}
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_plugins = copy.deepcopy(host.state_dict(ctx))
    rng = torch.get_rng_state()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def context() -> contextlib.ExitStack:
        stack = host.step_context(ctx)
        stack.enter_context(forward_context())
        return stack

    was_training = model.training
    model.train()
    try:
        report = memory.measure_step(model, optimizer, lambda: causal_lm_loss(model, batch), context,
                                     external=[batch["input_ids"], batch["labels"]])
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        host.load_state_dict(ctx, saved_plugins)
        torch.set_rng_state(rng)
        model.train(was_training)
    return report


def without_training(run: Any, warm: bool = True) -> memory.MemoryReport:
    """Build data and optimizer as ``run`` would and measure one step; no Lightning, no training.

    With ``warm``, one unmeasured step first creates the optimizer state, so that it is live at
    the measured peak as in a running job.
    """
    ctx = run.ctx
    loaders.train_loader(ctx, run.host, run.recipe.data)
    optimizer = assembly.optimizer(ctx, run.host, run.cfg)
    precision = run.cfg.trainer.precision
    autocast = contextlib.nullcontext
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        autocast = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731
    if warm:
        batch = loaders.first_batch(ctx)
        with run.host.step_context(ctx), autocast():
            causal_lm_loss(ctx.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return measure(run, ctx.model, optimizer, autocast)

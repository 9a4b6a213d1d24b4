"""Helpers shared by the benchmarks: memory tables, interleaved timing, the machine's name."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from memwise.memory import CATEGORIES, DEVICE_CATEGORIES

MIB = 2 ** 20


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, {datetime.date.today().isoformat()}"


def memory_table(rows: list[tuple[str, dict[str, int]]], baseline: str) -> str:
    """Markdown: one column per variant (MiB), then each variant's ratio to the baseline."""
    base = dict(rows)[baseline]
    head = "| category | " + " | ".join(name for name, _ in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for cat in (*CATEGORIES, "total"):
        cells = []
        for _, m in rows:
            value = m.get(cat, sum(m.get(c, 0) for c in DEVICE_CATEGORIES) if cat == "total" else 0)
            ref = base.get(cat, sum(base.get(c, 0) for c in DEVICE_CATEGORIES) if cat == "total" else 0)
            ratio = f" ({ref / value:.2f}x)" if value and ref and value != ref else ""
            cells.append(f"{value / MIB:,.2f}{ratio}")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUICK_DATA = "data.max_documents=300"
"""The data override the benchmarks' probes and short training runs share."""


def val_history(folder: Path) -> dict | None:
    """A ``memwise run`` report folder's validation losses, from its last checkpoint (written before
    the run's memory probe): first, last, steps, wall seconds; None when the run has none."""
    import torch

    ckpt = Path(folder) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return None
    state = torch.load(ckpt, mmap=True, weights_only=True, map_location="cpu")
    val = [r for r in state["memwise"]["history"] if r.get("val_loss") is not None]
    return {"first": val[0]["val_loss"], "last": val[-1]["val_loss"], "steps": val[-1]["step"],
            "elapsed_s": val[-1]["elapsed_s"]}


def probe_and_step(workload: str, overrides: list[str]):
    """A reference workload (``tiny``, ``small``, ...) or a recipe file (``*.yaml``) with the plugins
    applied: its measured probe step and a step function.

    The step function runs forward, backward and the optimizer step on one fixed batch, for
    timing against a baseline with ``interleaved``.
    """
    from memwise import recipe
    from memwise.data.loaders import first_batch
    from memwise.runner import Run, causal_lm_loss

    name = workload if workload.endswith(".yaml") else f"base/{workload}"
    run = Run(recipe.load(name, [QUICK_DATA, *overrides]), "fit")
    run.build()
    run.transform()
    report = run.probe_without_training()
    ctx = run.ctx
    batch = first_batch(ctx)

    def step() -> None:
        with run.host.step_context(ctx):
            loss = causal_lm_loss(ctx.model, batch)
            loss.backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)

    return report, step


def interleaved(fns: dict[str, Callable[[], None]], repeats: int = 5, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, run A B A B ... after warm-up.

    ``clock=time.thread_time`` counts only this thread's CPU time: on a machine shared with other
    jobs, wall time also counts the time the scheduler gave them, which need not be in proportion.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}

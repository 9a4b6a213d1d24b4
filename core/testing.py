"""Helpers for plugin tests: a seconds-long workload, the CLI in a subprocess, run metrics.

Plugins test through the recipe runner the same way (exact resume, DDP on two CPU
processes); these keep those tests short and alike.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

MICRO = ["model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.intermediate_size=128",
         "data.seq_len=64", "data.batch_size=4", "data.max_documents=60", "data.val_batches=1",
         "data.val_percent=10.0", "trainer.val_every_n_steps=2", "trainer.progress_bar=false", "report.plots=false",
         "optimizer.lr=3.0e-3", "scheduler.warmup_steps=1"]
"""Overrides that shrink any shipped recipe to a run of a few seconds."""

DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
"""Overrides for two CPU processes under DDP (gloo)."""


def tiny_llama_config(hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, inter: int = 128,
                      vocab: int = 260, **config: Any) -> "LlamaConfig":
    """The config of :func:`tiny_llama`; ``config`` sets any other LlamaConfig field (e.g. ``use_cache``)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, **config)


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, inter: int = 128,
               vocab: int = 260, seed: int = 0, **config: Any) -> "LlamaForCausalLM":
    """A seeded random HF Llama small enough for unit tests (GQA: 4 query heads over 2 KV heads)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden, layers, heads, kv, inter, vocab, **config))


def run_under_triton_interpreter(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a Python script in a subprocess with TRITON_INTERPRET=1 (triton reads it at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(folder: Path) -> list[dict]:
    """The rows of a run's metrics.csv."""
    with open(Path(folder) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_losses(folder_a: Path, folder_b: Path) -> None:
    """Two runs logged the same steps with identical train and validation losses."""
    a, b = read_metrics(folder_a), read_metrics(folder_b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"], (ra, rb)


def assert_resume_is_exact(recipe: str, overrides: list[str], folder: Path, steps: int, at: int) -> dict:
    """Train ``steps`` steps saving a checkpoint every ``at``; resume from step ``at`` in another
    folder; assert identical losses. Returns the step-``at`` checkpoint for further checks."""
    from memwise.checkpoint import safe_load
    from memwise.cli import main

    full, resumed = Path(folder) / "full", Path(folder) / "resumed"
    args = [*overrides, f"trainer.max_steps={steps}", f"trainer.checkpoint_every_n_steps={at}"]
    assert main(["run", recipe, f"report.dir={full}", *args]) == 0
    ckpt = full / "checkpoints" / f"step-{at:06d}.ckpt"
    assert main(["run", recipe, f"report.dir={resumed}", *args, f"resume={ckpt}"]) == 0
    assert_same_losses(full, resumed)
    return safe_load(ckpt)


def assert_trained(folder: Path, steps: int) -> None:
    """A run logged ``steps`` training steps, every loss finite."""
    losses = [float(r["train_loss"]) for r in read_metrics(folder) if r.get("train_loss")]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`memwise ARGS` in a subprocess (DDP re-launches sys.argv, so never in the test process)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "memwise.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


REAL_MODEL = "SmolLM2-135M-Instruct"
"""The real test model's folder name under ``.cache/models`` (``make model`` writes it)."""


def real_model_path() -> Path | None:
    """The converted SmolLM2-135M-Instruct folder, or None when it has not been fetched.

    Looked up in ``$MEMWISE_MODELS`` when set, else in ``.cache/models`` of the current
    folder and of this checkout (``make model`` writes it there).
    """
    roots = [Path(os.environ["MEMWISE_MODELS"])] if os.environ.get("MEMWISE_MODELS") else []
    roots += [Path.cwd() / ".cache" / "models", Path(__file__).resolve().parents[1] / ".cache" / "models"]
    for root in roots:
        folder = root / REAL_MODEL
        if (folder / "memwise-source.json").is_file():
            return folder
    return None


def require_real_model() -> Path:
    """The real model's folder, or skip the calling test saying how to fetch it."""
    import pytest

    folder = real_model_path()
    if folder is None:
        pytest.skip(f"{REAL_MODEL} not fetched: run `make model` (tools/models/smollm2.py) first")
    return folder


def require_real_gguf() -> tuple[Path, str]:
    """(folder, file name) of the real model's GGUF (kept by ``make model``), or skip the calling test."""
    import pytest

    folder = require_real_model().parent / f"{REAL_MODEL}-GGUF"
    name = f"{REAL_MODEL}.Q4_1.gguf"
    if not (folder / name).is_file():
        pytest.skip(f"{folder / name} absent: fetch again with `python tools/models/smollm2.py --force`")
    return folder, name

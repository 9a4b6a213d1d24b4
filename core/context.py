"""The run context every hook receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memwise.plan import ClaimsLedger


@dataclass
class Workload:
    """The shape of one training step, for memory estimates."""

    batch_size: int
    seq_len: int
    precision: str = "32-true"

    @property
    def activation_dtype(self) -> torch.dtype:
        if self.precision.startswith("bf16"):
            return torch.bfloat16
        if self.precision.startswith("16"):
            return torch.float16
        return torch.float32


@dataclass
class RunContext:
    """What a hook may read and change: the recipe, model, optimizer, data, trainer."""

    stage: str
    plugins: list = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    model: Any = None
    optimizer: Any = None
    schedulers: list = field(default_factory=list)
    train_dataset: Any = None
    batch_sampler: Any = None
    collate_fn: Any = None
    corpus: Any = None
    """memwise.data.corpus.Corpus: the documents as token arrays (train and validation)."""
    tokenizer: Any = None
    trainer: Any = None
    module: Any = None
    workload: Workload | None = None
    report_dir: Path | None = None
    generate_kwargs: dict = field(default_factory=dict)
    claims: ClaimsLedger = field(default_factory=ClaimsLedger)
    shared: dict = field(default_factory=dict)
    """Free space for plugins to leave facts for each other (namespaced by plugin name)."""
    _undo: list = field(default_factory=list)

    def on_teardown(self, fn: Callable[[], Any]) -> None:
        """Register an undo action; run in reverse order at teardown."""
        self._undo.append(fn)

    def run_teardown(self) -> None:
        """Every undo action, newest first; a failing one never skips the others."""
        from memwise.errors import TeardownError

        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as err:  # noqa: BLE001 - gathered, reported together
                errors.append(err)
        if errors:
            raise TeardownError(errors)

    def plugin(self, name: str) -> Any:
        """The plugin of this plan with that name, or None."""
        return next((p for p in self.plugins if p.name == name), None)

    @property
    def is_global_zero(self) -> bool:
        return self.trainer is None or getattr(self.trainer, "is_global_zero", True)

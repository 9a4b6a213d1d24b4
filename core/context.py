"""The run context every hook receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memwise.errors import TeardownError
from memwise.plan import ClaimsLedger

ANY_OWNER = object()
"""``run_teardown``'s default: the undo actions of every plugin and of none."""


@dataclass
class Workload:
    """The shape of one training step, for memory estimates."""

    batch_size: int
    seq_len: int
    precision: str = "32-true"
    shards: int = 1
    """Processes FSDP2 shards each parameter over (dim 0): a plugin's delta to parameters, gradients
    or optimizer state is then one rank's, against the sharded baseline."""
    max_new_tokens: int = 0
    """Generation only: tokens decoded after a ``seq_len``-token prompt (``seq_len`` is then the prompt)."""

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
    """The resolved recipe as plain data (manifests); read settings from ``config`` instead."""
    config: Any = None
    """The typed recipe (memwise.recipe.RecipeConfig): ``ctx.config.optimizer.name``, ``ctx.config.data``...
    Built from ``recipe`` when only that is given; None in callback mode, where the user's own
    code holds these settings (a plugin then checks nothing against them)."""
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
    validation: Callable[[], list[dict]] | None = None
    """Gives the run's fixed validation batches; set by the front end that owns the data (the recipe
    runner), None in callback mode. Plugins read them through ``val_batches()``."""
    acting: str | None = None
    """The plugin whose hook runs now (set by the PluginHost): the owner of undo actions it registers."""
    _undo: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config is None and self.recipe:
            from memwise.recipe import RecipeConfig
            from memwise.schema import build

            self.config = build(RecipeConfig, dict(self.recipe), path="recipe")

    def on_teardown(self, fn: Callable[[], Any]) -> None:
        """Register an undo action; the PluginHost's teardown runs it in the registering plugin's
        turn (reverse plan order), newest first."""
        self._undo.append((self.acting, fn))

    def undo_mark(self) -> int:
        """How many undo actions are registered now (``run_teardown(since=...)`` runs the newer ones)."""
        return len(self._undo)

    def run_teardown(self, owner: Any = ANY_OWNER, since: int = 0) -> None:
        """Undo actions newest first (those of ``owner`` only when given, those registered after
        ``since`` only); a failing one never skips the others."""
        errors = []
        for i in range(len(self._undo) - 1, since - 1, -1):
            who, fn = self._undo[i]
            if owner is not ANY_OWNER and who != owner:
                continue
            del self._undo[i]
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - gathered, reported together
                errors.append(err)
        if errors:
            raise TeardownError(errors)

    def val_batches(self) -> list[dict]:
        """The run's fixed validation batches (the same windows at every evaluation); empty when the
        front end holds no validation data (a user's own Trainer)."""
        return self.validation() if self.validation is not None else []

    def plugin(self, name: str) -> Any:
        """The plugin of this plan with that name, or None."""
        return next((p for p in self.plugins if p.name == name), None)

    @property
    def is_global_zero(self) -> bool:
        return self.trainer is None or getattr(self.trainer, "is_global_zero", True)

"""A recipe's run: the recipe-mode front end behind ``memwise run``/``explain``/``generate``.

It holds what one command builds from a recipe and says when each step happens; what is built
and how lives in ``memwise.assembly`` (model, optimizer, baseline), ``memwise.data.loaders``,
``memwise.probe`` and ``memwise.lightning.trainer``, and every hook call in the plan's session.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memwise import assembly, memory, probe
from memwise.context import RunContext, Workload
from memwise.data import loaders
from memwise.data.tokens import check_vocabulary
from memwise.host import PluginHost, module_signature
from memwise.objective import causal_lm_loss
from memwise.recipe import Recipe
from memwise.session import Session

__all__ = ["Run", "causal_lm_loss", "check_vocabulary", "measure_recipe"]


class Run:
    """Everything one command needs from a recipe, built in the order the hooks expect."""

    def __init__(self, recipe: Recipe, stage: str) -> None:
        self.recipe = recipe
        self.cfg = recipe.config
        data, report = recipe.data, self.cfg.report.dir or f"runs/{self.cfg.name}"
        ctx = RunContext(stage=stage, plugins=recipe.plugins, recipe=recipe.resolved, config=recipe.config,
                         workload=Workload(data.batch_size, data.seq_len, self.cfg.trainer.precision),
                         validation=self.val_batches, report_dir=Path(report))
        self.session = Session(PluginHost(recipe.plugins), ctx, recipe.source)
        self.host, self.ctx = self.session.host, ctx
        self.baseline_signature: dict[str, str] = {}
        self.changes: dict[str, list[str]] = {}
        self._val_batches: list[dict] | None = None
        self.resume_without_plugin_state = False
        """Resume a checkpoint made without an optimizer-replacing plugin of this run (explicit flag)."""
        self.interactive = sys.stdout.isatty()
        """stdout is a terminal: a progress bar when the recipe asks for one; else a line every
        ``trainer.log_every_n_steps`` steps, so that a piped or logged run is never silent."""

    def build(self) -> None:
        """Seed, corpus, model, then the plugins' validation (every problem at once)."""
        assembly.build(self.ctx, self.host, self.recipe)
        self.baseline_signature = module_signature(self.ctx.model)

    def transform(self) -> None:
        """The plugins' model surgery, in plan order."""
        self.changes = self.host.transform_model(self.ctx)

    def estimate_and_transform(self) -> list[tuple[str, memory.MemoryEstimate, str]]:
        """The baseline prediction, then plugin by plugin its estimate and its surgery: each
        plugin predicts on the model as the plugins before it left it. Rows of (label, estimate, note)."""
        rows = self.host.estimate(self.ctx, assembly.baseline(self.ctx, self.cfg.optimizer), transform=True)
        self.changes = self.host.changes
        return rows

    def val_batches(self) -> list[dict]:
        """The fixed validation batches, built once (the same windows at every evaluation)."""
        if self._val_batches is None:
            self._val_batches = loaders.val_batches(self.ctx.corpus, self.recipe.data)
        return self._val_batches

    def checkpoint_path(self, step: int | str) -> Path:
        """``checkpoints/step-NNNNNN.ckpt`` for a step, ``checkpoints/<name>.ckpt`` for a name (``last``)."""
        name = f"step-{step:06d}.ckpt" if isinstance(step, int) else f"{step}.ckpt"
        return self.ctx.report_dir / "checkpoints" / name

    def probe_without_training(self, warm: bool = True) -> memory.MemoryReport:
        """One measured step as a run would take it, without Lightning or training (``memwise.probe``)."""
        return probe.without_training(self, warm)


def measure_recipe(path: str, overrides: list[str] | None = None,
                   warm: bool = True) -> tuple[list, memory.MemoryReport]:
    """(predicted rows, measured report) for a recipe, without training."""
    from memwise import recipe

    run = Run(recipe.load(path, overrides or []), "fit")
    run.build()
    rows = run.estimate_and_transform()
    return rows, run.probe_without_training(warm)

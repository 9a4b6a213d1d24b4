"""Session: one plan's host and context, with the lifecycle state the front ends share.

A front end says *when* (Lightning's callback hooks, the recipe runner); the session says what
happens then, in which order: the plan checked and ordered, validation before surgery and surgery
once, the optimizer replaced with its schedulers re-pointed, a step's context left before the
batch's end hook, plugin state saved with its manifest and checked on load, and teardown that
closes an open step first and undoes the surgery once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from memwise import plan
from memwise.checkpoint import check_manifest, manifest
from memwise.context import RunContext
from memwise.errors import MemwiseError, RecipeError
from memwise.host import PluginHost


class Session:
    """A plan's ``PluginHost`` and ``RunContext``, plus the open step and whether surgery ran."""

    def __init__(self, host: PluginHost, ctx: RunContext, source: str = "memwise") -> None:
        self.host, self.ctx, self.source = host, ctx, source
        self.transformed = False
        """Validation and surgery ran (reset by teardown)."""
        self._step: contextlib.ExitStack | None = None

    @classmethod
    def planned(cls, plugins: Sequence[Any], stage: str, source: str) -> Session:
        """Order ``plugins`` into one plan for ``stage``, refusing it with every problem at once."""
        problems = plan.check(list(plugins), stage)
        ordered, order_problems = plan.order(list(plugins))
        if problems or order_problems:
            raise RecipeError(problems + order_problems, source=source)
        return cls(PluginHost(ordered), RunContext(stage=stage, plugins=ordered), source)

    def attach(self, trainer: Any, module: Any) -> None:
        """The front end's Trainer and LightningModule; surgery now when the module already holds its
        model (one built in ``configure_model`` comes later, through ``MemwisePrecision``). Generation
        plugins act on the model that generates, ``module.model`` when there is one."""
        self.ctx.trainer, self.ctx.module = trainer, module
        if any(True for _ in module.parameters()):
            self.transform(getattr(module, "model", module) if self.ctx.stage == "generate" else module)

    def transform(self, model: Any) -> None:
        """Validation, then model surgery, once (idempotent until teardown)."""
        if self.transformed:
            return
        self.ctx.model = model
        problems = self.host.validate(self.ctx)
        if problems:
            raise RecipeError(problems, source=self.source)
        self.host.transform_model(self.ctx)
        self.transformed = True

    def start_fit(self, optimizers: Sequence[Any], schedulers: Sequence[Any]) -> Any:
        """Before the first step: the plugins' wrapping or replacement of a Trainer's single optimizer,
        its schedulers re-pointed; returns the replacement, or None when the Trainer keeps its own.

        A plugin that changes the model but never saw one (a model built in ``configure_model``
        without ``MemwisePrecision``) is refused: its optimizer would miss the surgery."""
        if not self.transformed and any(self.host.implements(p, "memwise_transform_model") and p.transforms_model()
                                        for p in self.host.plugins):
            raise MemwiseError("the model had no parameters at setup (built in configure_model?): add "
                               "MemwisePrecision(callback) to the Trainer's plugins so that memwise plugins can "
                               "convert it before the optimizer is created")
        if not optimizers:
            return None
        if len(optimizers) != 1:
            raise MemwiseError(f"memwise plugins need exactly one optimizer in callback mode, "
                               f"the module configured {len(optimizers)}")
        old = self.ctx.optimizer = optimizers[0]
        self.ctx.schedulers = list(schedulers)
        new = self.host.configure_optimizer(self.ctx, self.ctx.schedulers)
        return None if new is old else new

    def begin_step(self, batch: Any, batch_idx: int) -> None:
        """The batch-start hooks, then the plugins' step contexts, held open until ``end_step``."""
        self.host.batch_start(self.ctx, batch, batch_idx)
        self._step = self.host.step_context(self.ctx)

    def end_step(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Leave the step contexts (in reverse), then the batch-end hooks."""
        self.close_step()
        self.host.batch_end(self.ctx, outputs, batch, batch_idx)

    def close_step(self) -> None:
        """Leave an open step's contexts, if any (at step end, or when a fit stops inside a step)."""
        if self._step is not None:
            self._step, step = None, self._step
            step.close()

    def start_generation(self, module: Any, trainer: Any) -> dict[str, Any]:
        """The plugins' KV-cache policies for one predict batch of ``module`` (its ``model`` generates
        when it has one), as ``generate`` keyword arguments; pair with ``host.end_generation``."""
        self.ctx.model, self.ctx.module, self.ctx.trainer = getattr(module, "model", module), module, trainer
        return self.host.wrap_generation(self.ctx)

    def state_dict(self) -> dict[str, Any]:
        """The plugins' own state with the manifest that says which plugins wrote it."""
        return {"manifest": manifest(self.host.plugins), "plugins": self.host.state_dict(self.ctx)}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse state written with a ``required_on_load`` plugin that this plan lacks."""
        check_manifest(state.get("manifest", {}), self.host.plugins)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check ``state``'s manifest against this plan, then give each plugin its entry."""
        self.check_state(state)
        self.host.load_state_dict(self.ctx, state.get("plugins", {}))

    def teardown(self) -> None:
        """Close an open step, then undo the plugins in reverse plan order; nothing to undo when no
        model ever reached them (a fit that failed first)."""
        try:
            self.close_step()
        finally:
            self.transformed = False
            if self.ctx.model is not None:
                self.host.teardown(self.ctx)

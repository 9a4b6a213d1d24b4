"""MemwiseCallback: memwise plugins in a user's own Lightning Trainer.

Several memwise callbacks in one Trainer form one plan: the first one's ``setup``
gathers every plugin, orders them and checks conflicts; the others defer to it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl

from memwise import plan
from memwise.checkpoint import check_manifest, manifest
from memwise.context import RunContext
from memwise.errors import MemwiseError, RecipeError
from memwise.host import PluginHost


class MemwiseCallback(pl.Callback):
    """Apply plugins to the Trainer's LightningModule: surgery in ``setup``, optimizer
    replacement in ``on_fit_start``, step contexts around every training batch."""

    def __init__(self, plugins: list) -> None:
        self.plugins = list(plugins)
        self.leader: MemwiseCallback | None = None
        self.host: PluginHost | None = None
        self.ctx: RunContext | None = None
        self._step: contextlib.ExitStack | None = None
        self._transformed = False

    @property
    def state_key(self) -> str:
        return "MemwiseCallback[" + ",".join(f"{p.name}{p.config_dict()}" for p in self.plugins) + "]"

    def _gather(self, trainer: pl.Trainer) -> None:
        group = [cb for cb in trainer.callbacks if isinstance(cb, MemwiseCallback)]
        leader = group[0]
        for cb in group:
            cb.leader = leader
        if self is not leader or self.host is not None:
            return
        plugins = [p for cb in group for p in cb.plugins]
        stage = "generate" if trainer.state.fn == "predict" else "fit"
        problems = plan.check(plugins, stage)
        ordered, order_problems = plan.order(plugins)
        if problems or order_problems:
            raise RecipeError(problems + order_problems, source="MemwiseCallback")
        self.host = PluginHost(ordered)
        self.ctx = RunContext(stage=stage, plugins=ordered)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._gather(trainer)
        if self.leader is not self:
            return
        self.ctx.trainer, self.ctx.module = trainer, pl_module
        if any(True for _ in pl_module.parameters()):  # models built in configure_model: MemwisePrecision
            # generation plugins act on the model that generates (``pl_module.model``), as in predict
            self.transform(getattr(pl_module, "model", pl_module) if self.ctx.stage == "generate" else pl_module)

    def transform(self, module: Any) -> None:
        """Validation, then model surgery, once (idempotent across setup and MemwisePrecision)."""
        if self._transformed:
            return
        self.ctx.model = module
        problems = self.host.validate(self.ctx)
        if problems:
            raise RecipeError(problems, source="MemwiseCallback")
        self.host.transform_model(self.ctx)
        self._transformed = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.leader is not self:
            return
        if not self._transformed and any(self.host.implements(p, "memwise_transform_model") and p.transforms_model()
                                         for p in self.host.plugins):
            raise MemwiseError("the model had no parameters at setup (built in configure_model?): add "
                               "MemwisePrecision(callback) to the Trainer's plugins so that memwise plugins can "
                               "convert it before the optimizer is created")
        if not trainer.optimizers:
            return
        if len(trainer.optimizers) != 1:
            raise MemwiseError(f"memwise plugins need exactly one optimizer in callback mode, "
                               f"the module configured {len(trainer.optimizers)}")
        ctx = self.ctx
        old = ctx.optimizer = trainer.optimizers[0]
        ctx.schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if self.host.configure_optimizer(ctx, ctx.schedulers) is not old:
            trainer.optimizers = [ctx.optimizer]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.leader is not self:
            return
        self.host.batch_start(self.ctx, batch, batch_idx)
        self._step = self.host.step_context(self.ctx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.leader is self:
            self.host.before_optimizer_step(self.ctx, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.leader is not self:
            return
        if self._step is not None:
            self._step.close()
            self._step = None
        self.host.batch_end(self.ctx, outputs, batch, batch_idx)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.leader is self and trainer.is_global_zero:
            self.host.fit_end(self.ctx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        """Generate-stage plugins install their KV-cache policy for this batch into
        ``pl_module.generate_kwargs`` (pass them to ``generate`` in ``predict_step``)."""
        if self.leader is not self or self.host is None:
            return
        ctx = self.ctx
        ctx.model, ctx.module, ctx.trainer = getattr(pl_module, "model", pl_module), pl_module, trainer
        pl_module.generate_kwargs = self.host.wrap_generation(ctx)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.leader is self and self.host is not None:
            self.host.end_generation(self.ctx)

    def state_dict(self) -> dict[str, Any]:
        if self.leader is not self or self.host is None:
            return {}
        return {"manifest": manifest(self.host.plugins), "plugins": self.host.state_dict(self.ctx)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Every memwise manifest in the checkpoint, whichever callback wrote it, against this plan:
        a checkpoint made with a ``required_on_load`` plugin that this Trainer lacks is refused
        before its optimizer state reaches another optimizer."""
        if self.leader is not self or self.host is None:
            return
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if str(key).startswith("MemwiseCallback[") and isinstance(state, dict):
                check_manifest(state.get("manifest", {}), self.host.plugins)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._pending_state = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = getattr(self, "_pending_state", None)
        if self.leader is not self or state is None:
            return
        check_manifest(state.get("manifest", {}), self.host.plugins)
        self.host.load_state_dict(self.ctx, state.get("plugins", {}))
        self._pending_state = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failed fit undoes the surgery too (Lightning calls no ``teardown`` after an exception)."""
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.leader is not self or self.host is None:
            return
        try:
            if self._step is not None:
                self._step, step = None, self._step
                step.close()
        finally:
            self._transformed = False
            if self.ctx.model is not None:  # no model reached the plugins (a fit that failed first): nothing to undo
                self.host.teardown(self.ctx)

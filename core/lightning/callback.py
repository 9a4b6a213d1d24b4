"""MemwiseCallback: memwise plugins in a user's own Lightning Trainer.

Several memwise callbacks in one Trainer form one plan: the first one's ``setup``
gathers every plugin, orders them and checks conflicts; the others defer to it. What
happens at each Lightning hook is the plan's :class:`memwise.session.Session`'s.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from memwise.session import Session


class MemwiseCallback(pl.Callback):
    """Apply plugins to the Trainer's LightningModule: surgery in ``setup``, optimizer
    replacement in ``on_fit_start``, step contexts around every training batch."""

    def __init__(self, plugins: list) -> None:
        self.plugins = list(plugins)
        self.leader: MemwiseCallback | None = None
        self.session: Session | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "MemwiseCallback[" + ",".join(f"{p.name}{p.config_dict()}" for p in self.plugins) + "]"

    @property
    def lead(self) -> Session | None:
        """The plan's session when this callback leads it; None for the others (and before ``setup``)."""
        return self.session if self.leader is self else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        group = [cb for cb in trainer.callbacks if isinstance(cb, MemwiseCallback)]
        for cb in group:
            cb.leader = group[0]
        if self.leader is self and self.session is None:
            stage = "generate" if trainer.state.fn == "predict" else "fit"
            self.session = Session.planned([p for cb in group for p in cb.plugins], stage, "MemwiseCallback")
        if self.lead is not None:
            self.lead.attach(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lead is not None:
            new = self.lead.start_fit(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs])
            if new is not None:
                trainer.optimizers = [new]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.lead is not None:
            self.lead.begin_step(batch, batch_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.lead is not None:
            self.lead.host.before_optimizer_step(self.lead.ctx, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.lead is not None:
            self.lead.end_step(outputs, batch, batch_idx)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lead is not None and trainer.is_global_zero:
            self.lead.host.fit_end(self.lead.ctx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        """Generate-stage plugins install their KV-cache policy for this batch into
        ``pl_module.generate_kwargs`` (pass them to ``generate`` in ``predict_step``)."""
        if self.lead is not None:
            pl_module.generate_kwargs = self.lead.start_generation(pl_module, trainer)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.lead is not None:
            self.lead.host.end_generation(self.lead.ctx)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.lead is None else self.lead.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Every memwise manifest in the checkpoint, whichever callback wrote it, against this plan:
        a checkpoint made with a ``required_on_load`` plugin that this Trainer lacks is refused
        before its optimizer state reaches another optimizer."""
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if self.lead is not None and str(key).startswith("MemwiseCallback[") and isinstance(state, dict):
                self.lead.check_state(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until ``on_train_start``: the plugins' optimizers exist only after ``on_fit_start``."""
        self._pending_state = state_dict or self._pending_state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lead is not None and self._pending_state is not None:
            self.lead.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failed fit undoes the surgery too (Lightning calls no ``teardown`` after an exception)."""
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.lead is not None:
            self.lead.teardown()

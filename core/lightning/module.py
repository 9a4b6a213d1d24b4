"""RecipeModule: manual optimization, so a probe step is never inside Lightning's closure.

It adapts Lightning's calls to a recipe run: the loop hooks go to the plan's host, the step's
non-finite policy to ``memwise.guard``, the history to ``memwise.progress``, checkpoint
contents and resume checks to ``memwise.resume``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from memwise import assembly, guard, resume
from memwise.checkpoint import set_rng_state
from memwise.objective import causal_lm_loss, evaluate
from memwise.progress import Progress


class RecipeModule(pl.LightningModule):
    """Trains the recipe's causal LM; calls the loop hooks; validates on a fixed set."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.run, self.model = run, run.ctx.model
        t = run.cfg.trainer
        self.progress = Progress(t, run.interactive)
        self.guard = guard.SkipPolicy(t.on_nonfinite, t.max_nonfinite_skips)
        self._pending_rng: dict | None = None

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp``, shard the (already transformed) model with FSDP2."""
        t = self.run.cfg.trainer
        if t.strategy == "fsdp":
            from memwise.sharding import is_sharded, shard_model

            if not is_sharded(self.model):
                shard_model(self.model, self.device_mesh["data_parallel"], t.precision, t.fsdp)

    def configure_optimizers(self) -> Any:
        optimizer = assembly.optimizer(self.run.ctx, self.run.host, self.run.cfg)
        scheduler = assembly.scheduler(self.run.ctx, optimizer, self.run.cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ctx, host = self.run.ctx, self.run.host
        if self._pending_rng is not None:  # after the loader's first batch: it draws from the RNG
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        opt, sched = self.optimizers(), self.lr_schedulers()
        host.batch_start(ctx, batch, batch_idx)
        buffers = self.guard.keep(self.model)  # Mesa's running ranges, when a dropped step restores them
        with host.step_context(ctx):
            loss = causal_lm_loss(self.model, batch)
            self.manual_backward(loss)
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        finite = guard.step_is_finite(loss, opt.optimizer, scaled)
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):  # every rank drops it, or none
            opt.zero_grad(set_to_none=True)
            self.guard.drop(int(self.trainer.global_step) + 1, loss, self.model, buffers,
                            self.run.checkpoint_path("last").parent, self.trainer.is_global_zero)
            return loss.detach()
        self.guard.passed()
        host.before_optimizer_step(ctx, opt.optimizer)
        opt.step()  # clips in on_before_optimizer_step: after a GradScaler has unscaled the gradients
        opt.zero_grad(set_to_none=True)
        sched.step()
        host.batch_end(ctx, loss.detach(), batch, batch_idx)
        self._record(loss.detach(), batch, opt.optimizer)
        return loss.detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.run.cfg.trainer.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.run.cfg.trainer.gradient_clip_val,
                                gradient_clip_algorithm="norm")

    def _record(self, loss: torch.Tensor, batch: dict, optimizer: Any) -> None:
        row = self.progress.record(self.trainer, float(loss), optimizer.param_groups[0]["lr"], batch,
                                   self.guard.skips, self.evaluate)
        for key in ("val_loss", "train_loss"):
            if key in row:
                self.log(key, row[key], prog_bar=True, rank_zero_only=True)
        every = self.run.cfg.trainer.checkpoint_every_n_steps
        if every and row["step"] % every == 0:
            self.trainer.save_checkpoint(self.run.checkpoint_path(row["step"]), weights_only=False)

    def on_train_start(self) -> None:
        self.progress.start()
        if self.trainer.global_step == 0:
            self.progress.history.append({"step": 0, "val_loss": self.evaluate(), "tokens": 0, "elapsed_s": 0.0})

    def evaluate(self) -> float:
        """Token-weighted loss over the run's fixed validation windows."""
        return evaluate(self.model, self.run.val_batches(), self.device, self.trainer.precision_plugin.forward_context)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume.save(self.run, self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = resume.load(self.run, self, checkpoint)
        self.progress.load_state_dict(saved)
        self.guard.skips = int(saved.get("nonfinite_skips", 0))
        self._pending_rng = saved.get("rng")

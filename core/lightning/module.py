"""RecipeModule: manual optimization, so a probe step is never inside Lightning's closure."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from memwise.checkpoint import check_manifest, manifest, rng_state, set_rng_state
from memwise.errors import MemwiseError
from memwise.runner import causal_lm_loss, target_count


class RecipeModule(pl.LightningModule):
    """Trains the recipe's causal LM; calls the loop hooks; validates on a fixed set."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.run = run
        self.model = run.ctx.model
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.targets_seen = 0
        self._pending_rng: dict | None = None
        self._start = time.perf_counter()
        self._elapsed_before = 0.0

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp``, shard the (already transformed) model with FSDP2."""
        t = self.run.cfg.trainer
        if t.strategy != "fsdp":
            return
        from memwise.sharding import is_sharded, shard_model

        if not is_sharded(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"], t.precision, t.fsdp)

    # --- optimization ---------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = self.run.make_optimizer()
        scheduler = self.run.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ctx, hook = self.run.ctx, self.run.host.hook
        if self._pending_rng is not None:  # after the loader's first batch: it draws from the RNG
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        hook.memwise_on_train_batch_start(ctx=ctx, batch=batch, batch_idx=batch_idx)
        with self.run.step_context():
            loss = causal_lm_loss(self.model, batch)
            self.manual_backward(loss)
        hook.memwise_on_before_optimizer_step(ctx=ctx, optimizer=opt.optimizer)
        clip = self.run.cfg.trainer.gradient_clip_val
        if clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        hook.memwise_on_train_batch_end(ctx=ctx, outputs=loss.detach(), batch=batch, batch_idx=batch_idx)
        self._record(loss.detach(), batch, opt.optimizer)
        return loss.detach()

    def _record(self, loss: torch.Tensor, batch: dict, optimizer: Any) -> None:
        world = self.trainer.world_size
        self.tokens_seen += int(batch["input_ids"].numel()) * world
        self.targets_seen += target_count(batch) * world
        step = int(self.trainer.global_step)
        row = {"step": step, "train_loss": float(loss), "lr": optimizer.param_groups[0]["lr"],
               "tokens": self.tokens_seen, "targets": self.targets_seen, "seq_len": int(batch["input_ids"].shape[1]),
               "elapsed_s": round(self._elapsed_before + time.perf_counter() - self._start, 3)}
        every = self.run.cfg.trainer.val_every_n_steps
        if step % every == 0 or step == self.trainer.max_steps:
            row["val_loss"] = self.evaluate()
            self.log("val_loss", row["val_loss"], prog_bar=True, rank_zero_only=True)
            if not self.run.cfg.trainer.progress_bar and self.trainer.is_global_zero:
                print(f"step {step}/{self.trainer.max_steps}: train loss {row['train_loss']:.4f}, "
                      f"validation loss {row['val_loss']:.4f}, {row['elapsed_s']:.0f} s", flush=True)
        self.history.append(row)
        self.log("train_loss", row["train_loss"], prog_bar=True, rank_zero_only=True)
        ckpt_every = self.run.cfg.trainer.checkpoint_every_n_steps
        if ckpt_every and step % ckpt_every == 0:
            self.trainer.save_checkpoint(self.run.checkpoint_path(step), weights_only=False)

    def on_train_start(self) -> None:
        self._start = time.perf_counter()
        if self.trainer.global_step == 0:
            self.history.append({"step": 0, "val_loss": self.evaluate(), "tokens": 0, "elapsed_s": 0.0})

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted loss over the fixed validation windows."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        with self.trainer.precision_plugin.forward_context():
            for batch in self.run.val_batches():
                batch = {k: v.to(self.device) for k, v in batch.items()}
                n = target_count(batch)
                if n:
                    total += float(causal_lm_loss(self.model, batch)) * n
                    count += n
        self.model.train(was_training)
        return total / max(count, 1)

    # --- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run = self.run
        states = {p.name: s for p, s in run.host.each("memwise_state_dict", ctx=run.ctx) if s is not None}
        checkpoint["memwise"] = {
            "manifest": manifest(run.recipe.plugins, run.recipe.resolved),
            "world_size": int(self.trainer.world_size),
            "strategy": run.cfg.trainer.strategy,
            "model_config": self.model.config.to_dict() if hasattr(self.model, "config") else {},
            "plugins": states,
            "rng": rng_state(),
            "history": [dict(r) for r in self.history],
            "tokens_seen": self.tokens_seen,
            "targets_seen": self.targets_seen,
            "elapsed_s": self._elapsed_before + time.perf_counter() - self._start,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run = self.run
        saved = checkpoint.get("memwise", {})
        check_manifest(saved.get("manifest", {}), run.recipe.plugins)
        if run.cfg.trainer.strategy == "fsdp" and saved.get("world_size", self.trainer.world_size) != self.trainer.world_size:
            raise MemwiseError(f"this sharded checkpoint was saved by {saved['world_size']} processes; resume it with "
                               f"trainer.devices={saved['world_size']} (now {self.trainer.world_size}), or "
                               "consolidate it (memwise consolidate) and start from the weights")
        states = saved.get("plugins", {})
        for plugin in run.recipe.plugins:
            if plugin.name in states and run.host.implements(plugin, "memwise_load_state_dict"):
                plugin.memwise_load_state_dict(ctx=run.ctx, state=states[plugin.name])
        self.history = list(saved.get("history", []))
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        self.targets_seen = int(saved.get("targets_seen", 0))
        self._elapsed_before = float(saved.get("elapsed_s", 0.0))
        self._pending_rng = saved.get("rng")

"""RecipeModule: manual optimization, so a probe step is never inside Lightning's closure."""

from __future__ import annotations

import signal
import time
from typing import Any

import lightning.pytorch as pl
import torch

from memwise import guard
from memwise.checkpoint import check_manifest, manifest, rng_state, set_rng_state
from memwise.errors import InputError, MemwiseError, NonFiniteError, RunInterrupted
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
        self.nonfinite_skips = 0
        """Steps whose update was dropped because the loss or gradients were not finite (all runs)."""
        self._skips_in_a_row = 0

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
        ctx, host = self.run.ctx, self.run.host
        if self._pending_rng is not None:  # after the loader's first batch: it draws from the RNG
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        host.batch_start(ctx, batch, batch_idx)
        skip = self.run.cfg.trainer.on_nonfinite == "skip"
        buffers = [b.detach().clone() for b in self.model.buffers()] if skip else None  # Mesa's running ranges
        with self.run.step_context():
            loss = causal_lm_loss(self.model, batch)
            self.manual_backward(loss)
        if not self._step_is_finite(loss, opt.optimizer):
            return self._drop_step(loss, opt, buffers)
        self._skips_in_a_row = 0
        host.before_optimizer_step(ctx, opt.optimizer)
        opt.step()  # clips in on_before_optimizer_step: after a GradScaler has unscaled the gradients
        opt.zero_grad(set_to_none=True)
        sched.step()
        host.batch_end(ctx, loss.detach(), batch, batch_idx)
        self._record(loss.detach(), batch, opt.optimizer)
        return loss.detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        clip = self.run.cfg.trainer.gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def _step_is_finite(self, loss: torch.Tensor, optimizer: Any) -> bool:
        """Loss and gradients finite, on every rank (one fused reduction, one sync).

        Under a GradScaler (16-mixed) the gradients are scaled: an overflow there is the scaler's
        business (it skips the step and lowers the scale), so only the loss is checked.
        """
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        finite = guard.is_finite(loss, [] if scaled else guard.gradients(optimizer))
        return bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))

    def _drop_step(self, loss: torch.Tensor, opt: Any, buffers: list[torch.Tensor] | None) -> torch.Tensor:
        """No update for this batch; stop now (policy stop) or after too many in a row."""
        t = self.run.cfg.trainer
        opt.zero_grad(set_to_none=True)
        step = int(self.trainer.global_step) + 1
        bad_loss = not torch.isfinite(loss.detach()).all()
        what = f"the loss is {float(loss.detach())}" if bad_loss else "the gradients hold NaN/inf"
        if t.on_nonfinite == "skip":
            for b, saved in zip(self.model.buffers(), buffers or []):
                b.copy_(saved)
            self.nonfinite_skips += 1
            self._skips_in_a_row += 1
            if self._skips_in_a_row <= t.max_nonfinite_skips:
                if self.trainer.is_global_zero:
                    print(f"step {step}: {what}; update skipped (trainer.on_nonfinite: skip, "
                          f"{self._skips_in_a_row} in a row)", flush=True)
                return loss.detach()
            what += f", {self._skips_in_a_row} steps in a row (trainer.max_nonfinite_skips: {t.max_nonfinite_skips})"
        raise NonFiniteError(self.nonfinite_message(step, what))

    def nonfinite_message(self, step: int, what: str) -> str:
        last = guard.newest_checkpoint(self.run.checkpoint_path("last").parent)
        resume = f"{last} (continue with resume={last})" if last else "none was written"
        return (f"step {step}: {what}; the run is stopped and no checkpoint holds this step. Last finite checkpoint: "
                f"{resume}. Try a lower optimizer.lr, more scheduler.warmup_steps, trainer.gradient_clip_val, "
                "bf16-mixed instead of 16-mixed, or check the data; trainer.on_nonfinite: skip drops such steps")

    def _record(self, loss: torch.Tensor, batch: dict, optimizer: Any) -> None:
        world = self.trainer.world_size
        self.tokens_seen += int(batch["input_ids"].numel()) * world
        self.targets_seen += target_count(batch) * world
        step = int(self.trainer.global_step)
        row = {"step": step, "train_loss": float(loss), "lr": optimizer.param_groups[0]["lr"],
               "tokens": self.tokens_seen, "nonfinite_skips": self.nonfinite_skips, "targets": self.targets_seen,
               "seq_len": int(batch["input_ids"].shape[1]),
               "elapsed_s": round(self._elapsed_before + time.perf_counter() - self._start, 3)}
        t = self.run.cfg.trainer
        lines = not (t.progress_bar and self.run.interactive)  # no bar: progress as printed lines
        if step % t.val_every_n_steps == 0 or step == self.trainer.max_steps:
            row["val_loss"] = self.evaluate()
            self.log("val_loss", row["val_loss"], prog_bar=True, rank_zero_only=True)
            if lines and self.trainer.is_global_zero:
                print(f"step {step}/{self.trainer.max_steps}: train loss {row['train_loss']:.4f}, "
                      f"validation loss {row['val_loss']:.4f}, {row['elapsed_s']:.0f} s", flush=True)
        elif lines and not self.run.interactive and step % t.log_every_n_steps == 0 and self.trainer.is_global_zero:
            print(f"step {step}/{self.trainer.max_steps}: train loss {row['train_loss']:.4f}, "
                  f"{row['elapsed_s']:.0f} s", flush=True)
        self.history.append(row)
        self.log("train_loss", row["train_loss"], prog_bar=True, rank_zero_only=True)
        ckpt_every = self.run.cfg.trainer.checkpoint_every_n_steps
        if ckpt_every and step % ckpt_every == 0:
            self.trainer.save_checkpoint(self.run.checkpoint_path(step), weights_only=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After a SIGINT/SIGTERM: last.ckpt at this step (atomically), then stop."""
        asked = self.run.stop_signal is not None
        if self.trainer.world_size > 1:
            asked = bool(self.trainer.strategy.reduce_boolean_decision(asked, all=False))
        if asked:
            path = self.run.checkpoint_path("last")
            self.trainer.save_checkpoint(path, weights_only=False)
            raise RunInterrupted(self.run.stop_signal or signal.SIGTERM, str(path))

    def on_train_start(self) -> None:
        if self.run.signal_handler is not None:  # ours, not Lightning's (which exits 0 without a checkpoint)
            signal.signal(signal.SIGTERM, self.run.signal_handler)
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
        bad = guard.max_abs(self.model.parameters())
        if bad is not None and not torch.isfinite(bad):
            raise NonFiniteError(self.nonfinite_message(int(self.trainer.global_step), "the weights hold NaN/inf"))
        states = run.host.state_dict(run.ctx)
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
            "nonfinite_skips": self.nonfinite_skips,
            "elapsed_s": self._elapsed_before + time.perf_counter() - self._start,
        }

    def _check_match(self, checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
        """Refuse (exit 2) a checkpoint of another model shape, optimizer or plugin set, saying what differs."""
        run = self.run
        then = saved.get("recipe", {}) or {}
        now = run.recipe.resolved
        then_plugins = [e.get("name") for e in saved.get("plugins", [])]
        now_plugins = [p.name for p in run.recipe.plugins]
        plugins = f"plugins {then_plugins or 'none'} then, {now_plugins or 'none'} now"
        current = self.state_dict()
        ckpt = {} if run.cfg.trainer.strategy == "fsdp" else checkpoint["state_dict"]  # DCP checks sharded ones
        diffs = [] if not ckpt else [f"{k} is missing" for k in current if k not in ckpt]
        diffs += [f"{k} is not in this model" for k in ckpt if k not in current]
        diffs += [f"{k}: {tuple(ckpt[k].shape)} saved, {tuple(current[k].shape)} here" for k in current
                  if k in ckpt and hasattr(ckpt[k], "shape") and tuple(ckpt[k].shape) != tuple(current[k].shape)]
        if diffs:
            model_then = (then.get("model") or {}).get("config", {})
            model_now = (now.get("model") or {}).get("config", {})
            raise InputError(f"this checkpoint does not match the model: {len(diffs)} difference(s), e.g. "
                             f"{'; '.join(diffs[:3])}. model.config {model_then} then, {model_now} now; {plugins}")
        opt_then = (then.get("optimizer") or {}).get("name", "adamw")
        opt_now = run.cfg.optimizer.name
        if then and opt_then != opt_now:
            raise InputError(f"this checkpoint was trained with optimizer.name: {opt_then}, this run uses {opt_now}; "
                             "resume with the same optimizer")
        fresh = [p for p in run.recipe.plugins if p.name not in then_plugins and
                 ("optimizer.states" in p.provides() or p.required_on_load)]
        if fresh and then:
            names = ", ".join(p.name for p in fresh)
            if not run.resume_without_plugin_state:
                raise InputError(f"this checkpoint was made without plugin(s) {names} ({plugins}): their state (and "
                                 "the optimizer state they replace) is not in it. Pass --resume-without-plugin-state "
                                 "to resume its weights and progress with a fresh optimizer state, or resume "
                                 "without those plugins")
            checkpoint["optimizer_states"] = []  # the saved state is for another optimizer: start it fresh
            print(f"resuming without plugin state for {names}: fresh optimizer state (--resume-without-plugin-state)",
                  flush=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run = self.run
        saved = checkpoint.get("memwise")
        # a sharded (DCP) checkpoint is loaded into the sharded module by torch distributed checkpoint,
        # which checks names and shapes itself; the other formats carry the whole state dict here
        sharded = run.cfg.trainer.strategy == "fsdp"
        if not isinstance(saved, dict) or not (sharded or isinstance(checkpoint.get("state_dict"), dict)):
            raise InputError("this checkpoint was not written by `memwise run` (it has no memwise manifest); resume "
                             "only from a run's checkpoints/*.ckpt, or load pretrained weights with model.path")
        bad = [] if sharded else guard.nonfinite_tensors(checkpoint["state_dict"])
        if bad:
            raise InputError(f"this checkpoint's weights hold NaN/inf ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}); resume from an earlier checkpoint")
        saved_manifest = saved.get("manifest", {})
        check_manifest(saved_manifest, run.recipe.plugins)
        if run.cfg.trainer.strategy == "fsdp" and saved.get("world_size", self.trainer.world_size) != self.trainer.world_size:
            raise MemwiseError(f"this sharded checkpoint was saved by {saved['world_size']} processes; resume it with "
                               f"trainer.devices={saved['world_size']} (now {self.trainer.world_size}), or "
                               "consolidate it (memwise consolidate) and start from the weights")
        states = saved.get("plugins", {})
        self._check_match(checkpoint, saved_manifest)
        run.host.load_state_dict(run.ctx, states)
        self.history = list(saved.get("history", []))
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        self.targets_seen = int(saved.get("targets_seen", 0))
        self.nonfinite_skips = int(saved.get("nonfinite_skips", 0))
        self._elapsed_before = float(saved.get("elapsed_s", 0.0))
        self._pending_rng = saved.get("rng")

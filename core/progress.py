"""A recipe run's progress: one history row per step (and evaluation), tokens and targets seen,
wall time across resumes, and printed lines whenever no progress bar shows the run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from memwise.objective import target_count


class Progress:
    """The history behind metrics.csv and summary.json, kept in checkpoints so a resumed run continues it."""

    def __init__(self, trainer_cfg: Any, interactive: bool) -> None:
        self.cfg, self.interactive = trainer_cfg, interactive
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.targets_seen = 0
        self._start = time.perf_counter()
        self._elapsed_before = 0.0

    def start(self) -> None:
        """Training starts (or resumes) now: wall time counts from here, on top of the checkpoint's."""
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._start

    def record(self, trainer: Any, loss: float, lr: float, batch: dict, skips: int,
               evaluate: Callable[[], float]) -> dict[str, Any]:
        """Keep the row of a trained step (the batch counted once per rank: every rank trains its own),
        with the validation loss every ``val_every_n_steps`` and at the last step. Printed on rank zero
        unless a progress bar shows the run: evaluations always, training steps every
        ``log_every_n_steps`` when stdout is no terminal (a piped run is never silent)."""
        step, world, last = int(trainer.global_step), trainer.world_size, trainer.max_steps
        self.tokens_seen += int(batch["input_ids"].numel()) * world
        self.targets_seen += target_count(batch) * world
        row = {"step": step, "train_loss": loss, "lr": lr, "tokens": self.tokens_seen, "nonfinite_skips": skips,
               "targets": self.targets_seen, "seq_len": int(batch["input_ids"].shape[1]),
               "elapsed_s": round(self.elapsed(), 3)}
        lines = trainer.is_global_zero and not (self.cfg.progress_bar and self.interactive)
        if step % self.cfg.val_every_n_steps == 0 or step == last:
            row["val_loss"] = evaluate()
            if lines:
                print(f"step {step}/{last}: train loss {row['train_loss']:.4f}, "
                      f"validation loss {row['val_loss']:.4f}, {row['elapsed_s']:.0f} s", flush=True)
        elif lines and not self.interactive and step % self.cfg.log_every_n_steps == 0:
            print(f"step {step}/{last}: train loss {row['train_loss']:.4f}, {row['elapsed_s']:.0f} s", flush=True)
        self.history.append(row)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "tokens_seen": self.tokens_seen,
                "targets_seen": self.targets_seen, "elapsed_s": self.elapsed()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.history = list(saved.get("history", []))
        self.tokens_seen = int(saved.get("tokens_seen", 0))
        self.targets_seen = int(saved.get("targets_seen", 0))
        self._elapsed_before = float(saved.get("elapsed_s", 0.0))

"""Stopping a recipe run on SIGINT/SIGTERM: the first signal asks the run to stop after the
current step, which then writes ``last.ckpt`` (atomically) and raises ``RunInterrupted``; a
second signal stops at once. Lightning's own SIGTERM handling exits 0 without a checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from memwise.errors import RunInterrupted


class SignalStop(pl.Callback):
    """Catches SIGINT/SIGTERM while ``installed`` and turns them into a checkpointed stop at the step's end."""

    def __init__(self, last: Path, say: Callable[[str], Any] = print) -> None:
        self.last, self.say = last, say
        self.signum: int | None = None
        """The signal received, if any: the run stops after the current step."""
        self._handler: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Our handler for SIGINT and SIGTERM for the duration (the main thread only: signals go there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            self.say(f"{signal.Signals(signum).name} received: stopping after the current step "
                     "(send it again to stop at once)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._handler = handler
        try:
            yield
        finally:
            self._handler = None
            for s, h in old.items():
                signal.signal(s, h)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Ours again for SIGTERM: Lightning installs its own when the fit starts."""
        if self._handler is not None:
            signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After a signal on any rank: ``last.ckpt`` at this step, then stop."""
        asked = self.signum is not None
        if trainer.world_size > 1:
            asked = bool(trainer.strategy.reduce_boolean_decision(asked, all=False))
        if asked:
            trainer.save_checkpoint(self.last, weights_only=False)
            raise RunInterrupted(self.signum or signal.SIGTERM, str(self.last))

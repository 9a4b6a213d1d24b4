"""Lightning CheckpointIO with atomic writes and weights_only loading."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from memwise.checkpoint import atomic_save, safe_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash mid-save leaves the previous checkpoint intact; loading never unpickles code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location or "cpu")

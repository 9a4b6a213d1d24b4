"""Lightning CheckpointIO with atomic writes and weights_only loading."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from memwise.checkpoint import atomic_save, safe_load
from memwise.errors import InputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash mid-save leaves the previous checkpoint intact; loading never unpickles code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = safe_load(path, map_location=map_location or "cpu")
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise InputError(f"{path} is not a Lightning checkpoint (no state_dict); resume only from a run's "
                             "checkpoints/*.ckpt")
        if not isinstance(checkpoint.get("memwise"), dict) or "pytorch-lightning_version" not in checkpoint:
            raise InputError(f"{path} was not written by `memwise run` (it has no memwise manifest); resume only "
                             "from a run's checkpoints/*.ckpt, or load pretrained weights with model.path")
        return checkpoint

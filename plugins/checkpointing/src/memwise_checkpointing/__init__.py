"""memwise plugin: activation checkpointing per decoder layer."""

from memwise_checkpointing.plugin import CheckpointingPlugin
from memwise_checkpointing.surgery import apply_checkpointing, remove_checkpointing

__all__ = ["CheckpointingPlugin", "apply_checkpointing", "remove_checkpointing"]

"""memwise plugin: saved-activation offload to host per decoder layer (MEMO-style swap + recompute)."""

from memwise_offload.offload import apply_offload, offloader_of, remove_offload
from memwise_offload.plugin import OffloadPlugin

__all__ = ["OffloadPlugin", "apply_offload", "offloader_of", "remove_offload"]

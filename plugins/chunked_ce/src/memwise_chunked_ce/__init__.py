"""memwise plugin: LM head + cross-entropy in token chunks (no full logits in training)."""

from memwise_chunked_ce.function import auto_chunk_size, chunked_linear_cross_entropy
from memwise_chunked_ce.hf import apply_chunked_ce, remove_chunked_ce
from memwise_chunked_ce.plugin import ChunkedCEPlugin

__all__ = ["ChunkedCEPlugin", "apply_chunked_ce", "auto_chunk_size", "chunked_linear_cross_entropy",
           "remove_chunked_ce"]

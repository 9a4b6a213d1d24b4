"""A transformers ``Cache`` made of pruned layers, with an exact byte count and a report."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache

from memwise_kvprune.layer import PrunedLayer
from memwise_kvprune.specs import Eviction, Quant, ThinK


class PrunedCache(Cache):
    """One :class:`PrunedLayer` per decoder layer. Order: eviction, then ThinK, then quantization."""

    def __init__(self, num_layers: int, think: ThinK | None = None, eviction: Eviction | None = None,
                 quant: Quant | None = None) -> None:
        super().__init__(layers=[PrunedLayer(think, eviction, quant) for _ in range(num_layers)])
        self.think, self.eviction, self.quant = think, eviction, quant

    def nbytes(self) -> int:
        """Bytes held: payload + scales + channel indices + token positions, every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self, dtype_bytes: int | None = None) -> int:
        """Bytes a DynamicCache would hold for the same tokens, in the model dtype unless ``dtype_bytes``."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            per = dtype_bytes or layer.window_k.element_size()
            total += 2 * layer.batch_size * layer.window_k.shape[1] * layer.seen * layer.head_dim * per
        return total

    def report(self) -> dict[str, Any]:
        """Settings, composition order and bytes against the dense cache, for logs and benchmarks."""
        dense = self.dense_nbytes()
        first = self.layers[0]
        return {
            "order": "eviction -> think -> quant",
            "think": None if self.think is None else vars(self.think),
            "eviction": None if self.eviction is None else vars(self.eviction),
            "quant": None if self.quant is None else {"kind": type(self.quant).__name__, **vars(self.quant)},
            "prompt_tokens": first.prompt_length,
            "tokens_seen": first.seen,
            "tokens_stored": first.stored_tokens() if first.compressed else 0,
            "nbytes": self.nbytes(),
            "dense_nbytes": dense,
            "fraction": self.nbytes() / dense if dense else 1.0,
        }

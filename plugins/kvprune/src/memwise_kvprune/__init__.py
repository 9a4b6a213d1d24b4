"""memwise kvprune: ThinK key-channel pruning with compact storage, StreamingLLM / SnapKV eviction, FP8 or
int4 storage.

Importing this package loads no transformers internals; they load when a cache is made.
"""

from memwise_kvprune.api import make_cache, pruned_generation, uninstall
from memwise_kvprune.bytes import predict_nbytes
from memwise_kvprune.plugin import KVPrunePlugin
from memwise_kvprune.specs import FP8, Eviction, Int4, ThinK

__all__ = ["FP8", "Eviction", "Int4", "KVPrunePlugin", "ThinK", "make_cache", "predict_nbytes", "pruned_generation",
           "uninstall"]

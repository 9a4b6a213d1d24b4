"""memwise-decomposition: dataset decomposition into power-of-two length buckets, with a length curriculum.

Use it in a recipe (``use: decomposition``) or without memwise through
:func:`decomposed_dataloader` / :func:`decompose` and :class:`VariableLengthBatchSampler`.
"""

from memwise_decomposition.curriculum import CURRICULA, curriculum_odds, epoch_schedule
from memwise_decomposition.dataset import BucketDataset, collate
from memwise_decomposition.decompose import Buckets, decompose
from memwise_decomposition.loader import decomposed_dataloader, sampler_for
from memwise_decomposition.plugin import DecompositionPlugin
from memwise_decomposition.report import attention_flops_per_token, bucket_report, mean_context
from memwise_decomposition.sampler import VariableLengthBatchSampler

__all__ = [
    "CURRICULA", "BucketDataset", "Buckets", "DecompositionPlugin", "VariableLengthBatchSampler",
    "attention_flops_per_token", "bucket_report", "collate", "curriculum_odds", "decompose",
    "decomposed_dataloader", "epoch_schedule", "mean_context", "sampler_for",
]

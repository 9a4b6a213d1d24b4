"""What the decomposition did: per-bucket counts, tokens kept and dropped, attention cost."""

from __future__ import annotations

from typing import Any

from memwise_decomposition.decompose import Buckets
from memwise_decomposition.sampler import VariableLengthBatchSampler


def mean_context(sequence_tokens: int) -> float:
    """Mean number of keys a target attends to in a causal sequence of that many tokens.

    The prediction at input position t (0-based) attends t + 1 keys; a sequence of L tokens
    makes L - 1 predictions, so the mean is L / 2.
    """
    return sequence_tokens / 2


def attention_flops_per_token(context: float, hidden_size: int, num_layers: int) -> float:
    """Forward FLOPs of the attention scores and the weighted sum (QK^T and PV) per target token."""
    return 4.0 * hidden_size * num_layers * context


def bucket_report(buckets: Buckets, sampler: VariableLengthBatchSampler | None = None,
                  baseline_seq_len: int | None = None, hidden_size: int | None = None,
                  num_layers: int | None = None, steps_per_bucket: dict[int, int] | None = None) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the buckets, the schedule and the attention saving.

    ``baseline_seq_len`` is the concat-and-chunk window to compare with (its mean context is
    L / 2 for every token). Averages weight each bucket by its targets kept (what the data
    allows); ``mean_context_planned`` weights them by the targets one epoch of the sampler
    trains on (they differ when a short epoch rounds the buckets' shares).
    """
    rows = []
    for b, k in enumerate(buckets.logs):
        n = buckets.count(k)
        row: dict[str, Any] = {"log2": k, "sequence_tokens": (1 << k) + 1, "targets_per_sequence": 1 << k,
                               "sequences": n, "targets_kept": n << k,
                               "mean_context": mean_context((1 << k) + 1)}
        if sampler is not None:
            row["batch_size_per_rank"] = sampler.batch_sizes[b]
            row["batches_per_epoch"] = sampler.batches[b]
            used = sampler.batches[b] * sampler.batch_sizes[b] * sampler.world_size
            row["targets_per_epoch"] = used << k
            row["targets_unscheduled_per_epoch"] = (n - used) << k
        if steps_per_bucket is not None:
            row["steps_trained"] = int(steps_per_bucket.get(k, 0))
        rows.append(row)
    ctx = _weighted_context(rows, "targets_kept")
    out: dict[str, Any] = {
        "rule_for_long_documents": buckets.rule,
        "min_len": 1 << buckets.min_log2, "max_len": 1 << buckets.max_log2,
        "documents": len(buckets.doc_offsets) - 1,
        "tokens": int(len(buckets.tokens)),
        "targets_total": buckets.total_targets,
        "targets_kept": buckets.kept,
        "targets_dropped": buckets.dropped,
        "documents_dropped_whole": buckets.dropped_documents,
        "kept_fraction": buckets.kept / buckets.total_targets if buckets.total_targets else 0.0,
        "mean_context": ctx,
        "buckets": rows,
    }
    if sampler is not None:
        out.update({
            "tokens_per_step_per_rank": sampler.tokens_per_step, "world_size": sampler.world_size,
            "curriculum": sampler.curriculum, "cycles": sampler.cycles, "longest_first": sampler.longest_first,
            "steps_per_epoch": sampler.per_epoch, "steps_per_full_pass": sum(sampler.full_batches),
            "distinct_shapes": sum(1 for n in sampler.batches if n > 0),
            "mean_context_planned": _weighted_context(rows, "targets_per_epoch"),
        })
    if baseline_seq_len:
        base = mean_context(baseline_seq_len)
        out["baseline"] = {"packing": "concat_chunk", "seq_len": baseline_seq_len, "mean_context": base}
        out["attention_saving"] = base / ctx if ctx else None
    if hidden_size and num_layers:
        out["attention_flops_per_token"] = attention_flops_per_token(ctx, hidden_size, num_layers)
        if baseline_seq_len:
            out["baseline"]["attention_flops_per_token"] = attention_flops_per_token(
                mean_context(baseline_seq_len), hidden_size, num_layers)
    return out


def _weighted_context(rows: list[dict[str, Any]], weight: str) -> float:
    total = sum(r[weight] for r in rows)
    return sum(r[weight] * r["mean_context"] for r in rows) / total if total else 0.0

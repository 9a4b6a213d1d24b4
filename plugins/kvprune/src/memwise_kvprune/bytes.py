"""Closed-form KV bytes of a pruned cache, from shapes alone (for planning and as the test oracle)."""

from __future__ import annotations

import math

from memwise_kvprune.specs import Eviction, Quant, ThinK


def kept_prompt_tokens(prompt: int, eviction: Eviction | None) -> int:
    """Tokens of a ``prompt``-token prompt kept per KV head: ceil(budget x prompt), at least 1.

    SnapKV keeps at least its observation window plus ``sinks`` prefix tokens: the window
    is never evicted (it is what votes), and a prompt no longer than that is kept whole,
    since evicting there would drop its first tokens (BOS, the attention sink) first.
    """
    if eviction is None:
        return prompt
    keep = max(1, math.ceil(eviction.budget * prompt - 1e-9))
    if eviction.policy == "snapkv":
        keep = max(keep, eviction.observe + eviction.sinks)
    return min(prompt, keep)


def predict_nbytes(layers: int, batch: int, kv_heads: int, head_dim: int, prompt: int, decoded: int,
                   think: ThinK | None = None, eviction: Eviction | None = None, quant: Quant | None = None,
                   dtype_bytes: int = 2) -> int:
    """Bytes after prefilling ``prompt`` tokens and feeding ``decoded`` more, one at a time."""
    stored = kept_prompt_tokens(prompt, eviction)
    tokens = stored + decoded
    pruning = think is not None and think.prunes(prompt)
    if pruning:
        kept_dim = think.kept_channels(head_dim)
        w0 = min(think.window, stored)
        window = w0 + decoded
        if think.fold_every and window >= think.window + think.fold_every:
            window = think.window + (window - think.window) % think.fold_every
    else:  # one key store (quantized if asked), no full-width window
        kept_dim, window = head_dim, 0
    pruned = tokens - window

    def row(width: int) -> int:
        return quant.row_bytes(width) if quant else width * dtype_bytes

    per_head = (pruned * row(kept_dim)  # compact keys
                + window * head_dim * dtype_bytes  # full-width recent keys
                + tokens * row(head_dim))  # values
    if pruning:
        per_head += kept_dim * (1 if head_dim <= 256 else 2)  # channel indices
    if stored < prompt:
        per_head += tokens * (2 if prompt + decoded < 2 ** 15 else 4)  # token positions
    return layers * batch * kv_heads * per_head

"""One decoder layer's pruned KV cache: compact keys, optional eviction and quantization, exact byte count.

Storage per layer (B rows, H KV heads, head dim D, Dk kept channels):

- ``pruned_k`` [B, H, Tp, Dk]: keys of older tokens, kept channels only (FP8 or int4 rows if asked);
- ``channels`` [B, H, Dk]: the kept channel indices (smallest integer type; absent when all kept);
- ``window_k`` [B, H, Tw, D]: full-width keys of the most recent tokens, in the model dtype
  (ThinK only; without it every key goes to ``pruned_k`` at full width);
- ``vals`` [B, H, Tp + Tw, D]: values of every kept token (FP8 or int4 rows if asked);
- ``kv`` [B, H, T, 2D]: instead of ``pruned_k`` and ``vals`` when quantized rows keep every
  channel (no ThinK) and D is even: each token's key and value in one row, scaled apart, so a
  decoding step encodes, appends and widens once per layer (the bytes are the same);
- ``positions`` [B, H, Tp + Tw]: original positions of kept tokens, only after eviction
  (without eviction the stored tokens are exactly positions 0..seen-1).

``update`` returns a :class:`PrunedView` instead of tensors; the memwise attention
function computes attention on this storage directly. Masks are sized through
``get_mask_sizes`` to the logical length (every token seen), so the padding mask built by
transformers lines up with ``positions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from memwise_kvprune import scoring
from memwise_kvprune.bytes import kept_prompt_tokens
from memwise_kvprune.rows import QuantRows
from memwise_kvprune.specs import Eviction, Quant, ThinK


@dataclass
class PrunedView:
    """What ``update`` hands the attention function: the layer, and the prompt while it is uncompressed."""

    layer: PrunedLayer
    prefill_keys: torch.Tensor | None = None
    prefill_values: torch.Tensor | None = None


def _nbytes(t: Any) -> int:
    if t is None:
        return 0
    if isinstance(t, QuantRows):
        return t.nbytes()
    return t.numel() * t.element_size()


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return a.cat(b) if isinstance(a, QuantRows) else torch.cat([a, b], dim=-2)


def _tokens(t: Any) -> int:
    if t is None:
        return 0
    return t.tokens() if isinstance(t, QuantRows) else t.shape[-2]


class PrunedLayer(CacheLayerMixin):
    """A ``CacheLayerMixin`` holding ThinK-pruned keys, eviction-selected tokens and quantized rows."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, think: ThinK | None = None, eviction: Eviction | None = None, quant: Quant | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        self.think, self.eviction, self.quant = think, eviction, quant
        self.seen = 0
        self.pruned_k: Any = None
        self.channels: torch.Tensor | None = None
        self.window_k: torch.Tensor | None = None
        self.vals: Any = None
        self.kv: QuantRows | None = None
        self.positions: torch.Tensor | None = None
        self.compressed = False
        self.prompt_length = 0

    # --- transformers' layer protocol --------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[PrunedView, PrunedView]:
        """Hold the prompt until attention compresses it; afterwards append full-width tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if not self.compressed:
            self.seen += new
            view = PrunedView(self, key_states, value_states)
            return view, view
        self._append(key_states, value_states)
        self.seen += new
        self._fold()
        view = PrunedView(self)
        return view, view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Logical sizes (every token seen): the attention gathers the columns of the kept tokens."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (positions continue from here), not tokens stored."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.think, self.eviction, self.quant)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("memwise kvprune caches do not support beam search")

    # --- compression at prefill ----------------------------------------------------------

    def compress(self, view: PrunedView, query: torch.Tensor, attention_mask: torch.Tensor | None,
                 scaling: float) -> None:
        """Evict tokens, then prune key channels, then store (quantized if asked); drops the full prompt."""
        keys, values = view.prefill_keys, view.prefill_values
        b, h, length, d = keys.shape
        q = query.reshape(b, h, -1, query.shape[-2], d)
        visible = visible_mask(attention_mask, b, q.shape[-2], length, self.seen, keys.device)
        valid = visible[:, 0, -1, :]  # the last query sees every real token of its row
        self.prompt_length = length
        if self.eviction is not None:
            keep = kept_prompt_tokens(length, self.eviction)
            if keep < length:
                ev = self.eviction
                if ev.policy == "snapkv":  # here length > keep >= observe + sinks
                    obs = ev.observe
                    scores = scoring.snapkv_scores(q[..., -obs:, :], keys, visible[:, :, -obs:, :], scaling, ev.kernel)
                    scores = scoring.with_sinks(scores, valid, ev.sinks)
                    always = obs
                else:
                    scores = scoring.streaming_scores(valid, h, ev.sinks)
                    always = 0
                positions = scoring.select_tokens(scores, valid, keep, always)
                index = positions.unsqueeze(-1).expand(-1, -1, -1, d)
                keys, values = keys.gather(2, index), values.gather(2, index)
                valid = valid[:, None, :].expand(-1, h, -1).gather(2, positions)
                self.positions = positions.to(torch.int16 if self.seen < 2 ** 15 - 1 else torch.int32)
        valid_h = valid if valid.dim() == 3 else valid[:, None, :].expand(-1, h, -1)
        kept = keys.shape[-2]
        if self.think is not None and self.think.prunes(length):
            obs = min(self.think.observe, q.shape[-2])
            scores = scoring.channel_scores(q[..., -obs:, :], keys, valid_h)
            self.channels = scoring.top_channels(scores, self.think.kept_channels(d))
            window = min(self.think.window, kept)
            self.pruned_k = self._store_keys(self._select_channels(keys[:, :, :kept - window]))
            self.window_k = keys[:, :, kept - window:].clone()
            self.vals = self._store_values(values)
        else:  # no channel pruning: one key store, no window
            self.window_k = keys[:, :, :0].clone()
            if self._joint():
                self.kv = self.quant.encode(torch.cat([keys, values], dim=-1), parts=2)
            else:
                self.pruned_k, self.vals = self._store_keys(keys), self._store_values(values)
        self.compressed = True

    # --- decoding ----------------------------------------------------------------------

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New tokens join the full-width window under ThinK, else the (possibly quantized) key store directly."""
        if self.kv is not None:
            self.kv = self.kv.cat(self.quant.encode(torch.cat([key_states, value_states], dim=-1), parts=2))
        elif self.channels is not None:
            self.window_k = torch.cat([self.window_k, key_states.to(self.dtype)], dim=-2)
            self.vals = _cat(self.vals, self._store_values(value_states))
        else:
            self.pruned_k = _cat(self.pruned_k, self._store_keys(key_states.to(self.dtype)))
            self.vals = _cat(self.vals, self._store_values(value_states))
        if self.positions is not None:
            new = torch.arange(self.seen, self.seen + key_states.shape[-2], device=self.device)
            if self.seen + key_states.shape[-2] >= 2 ** 15 and self.positions.dtype == torch.int16:
                self.positions = self.positions.to(torch.int32)
            new = new.to(self.positions.dtype).expand(*self.positions.shape[:2], -1)
            self.positions = torch.cat([self.positions, new], dim=-1)

    def _fold(self) -> None:
        """Move the oldest ``fold_every`` window tokens into the pruned store once the window is full."""
        think = self.think
        if self.channels is None or think.fold_every == 0:  # no channel pruning (none asked, or a short prompt)
            return
        if self.window_k.shape[-2] < think.window + think.fold_every:
            return
        n = self.window_k.shape[-2] - think.window
        block, self.window_k = self.window_k[:, :, :n], self.window_k[:, :, n:].clone()
        self.pruned_k = _cat(self.pruned_k, self._store_keys(self._select_channels(block)))

    # --- storage helpers ---------------------------------------------------------------

    def _joint(self) -> bool:
        """Keys and values in one quantized row store (every channel kept, an even head dim)."""
        return self.quant is not None and self.head_dim % 2 == 0

    def _select_channels(self, keys: torch.Tensor) -> torch.Tensor:
        index = self.channels.long()[:, :, None, :].expand(-1, -1, keys.shape[-2], -1)
        return keys.gather(-1, index)

    def _store_keys(self, keys: torch.Tensor) -> Any:
        return self.quant.encode(keys) if self.quant else keys.contiguous()

    def _store_values(self, values: torch.Tensor) -> Any:
        return self.quant.encode(values) if self.quant else values.contiguous()

    def stored_tokens(self) -> int:
        return _tokens(self.vals if self.kv is None else self.kv)

    def nbytes(self) -> int:
        """Payload + scales + channel indices + positions, exactly."""
        return sum(_nbytes(t) for t in (self.pruned_k, self.channels, self.window_k, self.vals, self.kv,
                                        self.positions))


def visible_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, seen: int,
                 device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, S, L] of which logical keys each query sees (None from transformers means causal)."""
    if attention_mask is None:
        qpos = torch.arange(seen - q_len, seen, device=device)
        causal = torch.arange(kv_len, device=device)[None, :] <= qpos[:, None]
        return causal[None, None].expand(batch, 1, -1, -1)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attention_mask[..., :kv_len].expand(batch, -1, -1, -1)

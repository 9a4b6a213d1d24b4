"""The CPU kernel for one decoding step of attention on FP8 key/value rows (fp8_attention.cpp).

With torch operations, a decoding step widens a layer's whole FP8 store to fp32 (four passes over
memory) and attention then reads it again: FP8 decoded at about 0.8x the full cache's tokens/s on
SmolLM2. The kernel decodes each token's row into a buffer that stays in L1 and uses it at once,
so the cache is read once per step. It is built on first use with torch's C++ extension loader
(a C++ compiler and ninja; once per machine, then cached); where that fails, decoding keeps the
torch path and warns once with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memwise.kernels.cpu_extension import cpu_extension
from memwise.kernels.fp8 import FLOAT16_PLACEMENT, as_float16
from memwise_kvprune.fp8store import FP8Rows

_SOURCE = Path(__file__).with_name("fp8_attention.cpp")
_BUILT: dict[str, Any] = {}


def extension() -> Any | None:
    """The built extension, or None where it cannot be built (warned once, with the reason)."""
    return cpu_extension("memwise_kvprune_fp8_attention", _SOURCE, ["-O3", "-fopenmp-simd", "-ffast-math"],
                         "kvprune: the CPU FP8 attention kernel",
                         "FP8 caches decode with torch operations, about 0.8x the full cache's speed")


def _table(dtype: torch.dtype) -> torch.Tensor:
    """Each of the 256 codes widened as the kernel widens it (the tail of a row not a multiple of 16)."""
    key = f"table_{dtype}"
    if key not in _BUILT:
        codes = torch.arange(256, dtype=torch.uint8).view(dtype)
        half, _ = as_float16(codes, finite=True)
        _BUILT[key] = half.float()
    return _BUILT[key]


def serves(layer: Any) -> bool:
    """Whether the kernel can read ``layer``: FP8 keys and values (one joint store, or ThinK's split ones)."""
    return isinstance(layer.kv, FP8Rows) or (isinstance(layer.pruned_k, FP8Rows) and isinstance(layer.vals, FP8Rows))


def decode_attention(layer: Any, query: torch.Tensor, scaling: float, ext: Any) -> torch.Tensor:
    """Attention of one query position per head over what ``layer`` keeps: [B, 1, Hq, D].

    ``query`` [B, Hq, 1, D]. Joint key/value rows are passed as two strided views of one payload;
    under ThinK, the query's kept channels meet the compact keys and the full query the window.
    Equal to the torch path up to float32 rounding.
    """
    b, hq, _, d = query.shape
    h = layer.window_k.shape[1]
    n, g = b * h, hq // h
    q = query.reshape(n, g, d).float().contiguous()
    if layer.kv is not None:
        stored = layer.kv
        rows = stored.payload.view(torch.uint8).reshape(n, -1, 2 * d)
        scales = stored.scale.reshape(n, -1, 2)
        keys, key_scales, values, value_scales = rows[..., :d], scales[..., 0], rows[..., d:], scales[..., 1]
        q_kept = q
    else:
        stored = layer.vals
        keys = layer.pruned_k.payload.view(torch.uint8).reshape(n, -1, layer.pruned_k.payload.shape[-1])
        key_scales = layer.pruned_k.scale.reshape(n, -1)
        values, value_scales = stored.payload.view(torch.uint8).reshape(n, -1, d), stored.scale.reshape(n, -1)
        q_kept = q if layer.channels is None else q.gather(-1, layer.channels.long().reshape(n, 1, -1).expand(-1, g, -1))
    window = layer.window_k.reshape(n, -1, d).float().contiguous()
    shift, mask, factor = FLOAT16_PLACEMENT[stored.payload.dtype]
    out = ext.fp8_decode_attention(q_kept.contiguous(), q, keys, key_scales, window, values, value_scales,
                                   _table(stored.payload.dtype), factor * scaling, scaling, factor, shift, mask)
    return out.view(b, 1, hq, d).to(query.dtype)

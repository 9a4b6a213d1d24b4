"""Closed-form parameter counts and storage bytes of pruned (and NF4) models.

Used by the memory estimate, the benchmark and the LLaMA-3.1-70B shape check: the
counts follow from the config and the kept head/channel numbers alone, no weights needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memwise import architectures
from memwise.surgery import layer_indices
from memwise_loram.index_map import Geometry, kept_counts
from memwise_loram.layout import loram_architecture, projection_paths
from memwise_loram.nf4 import nf4_nbytes


def layer_shapes(config: Any, ratio: float, layers: str | Iterable[int] | None) -> list[tuple[int, int]]:
    """(KV heads, MLP channels) per decoder layer after structured pruning at ``ratio``."""
    geo = Geometry.of(config)
    pruned = set(layer_indices(layers, geo.num_layers))
    kept = kept_counts(geo, ratio)
    full = (geo.num_key_value_heads, geo.intermediate_size)
    return [kept if i in pruned else full for i in range(geo.num_layers)]


def layer_linears(config: Any, kv_heads: int, channels: int) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection (by the architecture's name, ``q_proj``) of a layer with ``kv_heads`` KV heads
    and ``channels`` MLP channels."""
    shapes = Geometry.of(config).shapes(kv_heads, channels)
    return {path.rsplit(".", 1)[-1]: shapes[role] for role, path in projection_paths(loram_architecture(config)).items()}


def _biases(config: Any, kv_heads: int, channels: int) -> int:
    shapes = Geometry.of(config).shapes(kv_heads, channels)
    n = 0
    if getattr(config, "attention_bias", False):
        n += sum(shapes[r][1] for r in ("q", "k", "v", "o"))
    elif architectures.for_config(config).qkv_bias:
        n += sum(shapes[r][1] for r in ("q", "k", "v"))
    if getattr(config, "mlp_bias", False):
        n += sum(shapes[r][1] for r in ("gate", "up", "down"))
    return n


def base_storage(config: Any, shapes: list[tuple[int, int]], dtype_bytes: int, nf4: dict | None = None) -> dict:
    """Parameter count and exact stored bytes of the frozen base.

    ``nf4``: None, or ``{"block", "double_quant", "dq_block"}``: the seven projections of
    every layer in NF4 (payload + scales); embeddings, norms, LM head and biases stay in
    ``dtype_bytes``. Returns {"parameters", "bytes"}.
    """
    geo = Geometry.of(config)
    adapter = architectures.for_config(config)
    h = geo.hidden_size
    tied = getattr(config, "tie_word_embeddings", False)
    other = config.vocab_size * h * (1 if tied else 2) + h  # embeddings, LM head, final norm
    params, nbytes = other, other * dtype_bytes
    # the layer's norms (two in Llama, four in Gemma2) and the per-head q/k norms (Qwen3), none of them pruned
    norms = len(adapter.norms) * h + len(adapter.qk_norms) * geo.head_dim
    for kv, ch in shapes:
        lin = layer_linears(config, kv, ch)
        extra = norms + _biases(config, kv, ch)
        params += extra
        nbytes += extra * dtype_bytes
        for i, o in lin.values():
            params += i * o
            nbytes += nf4_nbytes(i * o, nf4["block"], nf4["double_quant"], nf4["dq_block"]) if nf4 else i * o * dtype_bytes
    return {"parameters": params, "bytes": nbytes}


def lora_parameters(config: Any, shapes: list[tuple[int, int]], rank: int, targets: Iterable[str]) -> int:
    """Adapter parameters: r * (in + out) for each target projection of each layer."""
    targets = set(targets)
    return sum(rank * (i + o) for kv, ch in shapes for name, (i, o) in layer_linears(config, kv, ch).items()
               if name in targets)


def llama31_70b_config() -> Any:
    """LLaMA-3.1-70B's shape (hidden 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672, vocab 128256)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=131072, rope_theta=500000.0)

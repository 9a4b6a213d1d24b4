"""Predicted memory change of LoRAM, exact to the byte for parameters, gradients, optimizer state.

From the config alone (closed-form counts): the frozen base shrinks to the pruned shapes
(in NF4: payload + scales), adapters are added, and only the adapters have gradients
and AdamW moments (two tensors of the parameter's dtype plus a 4-byte step each).
Activations are approximate: the core's per-layer formula at the pruned shapes, less
what a frozen base no longer saves, plus what each adapter saves.
"""

from __future__ import annotations

import copy

from typing import Any

from torch import nn

from memwise import architectures
from memwise.memory import MemoryDelta, llama_layer_activation_bytes
from memwise_loram.counts import base_storage, layer_linears, layer_shapes, lora_parameters
from memwise_loram.index_map import Geometry
from memwise_loram.layout import projection_names

STEP_BYTES = 4  # torch AdamW keeps `step` as a float32 scalar tensor per parameter


def loram_delta(model: nn.Module, config: Any, nf4: dict | None, estimate: Any, workload: Any = None) -> MemoryDelta:
    """The change from ``estimate`` (the plan so far) to the LoRAM training state."""
    cfg = model.config
    dtype_bytes = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    ratio = config.ratio if config.method in ("l2", "taylor", "random") else 0.0
    shapes = layer_shapes(cfg, ratio, config.layers)
    full = base_storage(cfg, layer_shapes(cfg, 0.0, None), dtype_bytes)
    pruned = base_storage(cfg, shapes, dtype_bytes, nf4)
    targets = list(config.targets) or projection_names(cfg)
    adapters = lora_parameters(cfg, shapes, config.rank, targets)
    tensors = 2 * len(set(targets)) * len(shapes)
    lora_bytes = adapters * dtype_bytes
    activations = 0
    if workload is not None:
        activations = activation_delta(cfg, shapes, config.rank, targets, config.dropout, workload)
    return MemoryDelta(
        parameters=pruned["bytes"] - full["bytes"] + lora_bytes,
        gradients=lora_bytes - estimate.gradients,
        optimizer_state=2 * lora_bytes + STEP_BYTES * tensors - estimate.optimizer_state,
        activations=activations,
        note=f"loram: base {full['parameters']:,} -> {pruned['parameters']:,} parameters "
             f"({'NF4' if nf4 else f'{dtype_bytes} B each'}), {adapters:,} adapter parameters train",
    )


def _pruned_config(cfg: Any, kv_heads: int, channels: int) -> Any:
    """The config of one pruned layer: the model's own (its architecture's formula applies), fewer heads and channels."""
    adapter, geo = architectures.for_config(cfg), Geometry.of(cfg)
    layer = copy.copy(cfg)
    setattr(layer, adapter.intermediate_field, channels)
    setattr(layer, adapter.heads_field, kv_heads * geo.group)
    setattr(layer, adapter.kv_heads_field, kv_heads)
    layer.head_dim = geo.head_dim
    return layer


def activation_delta(cfg: Any, shapes: list[tuple[int, int]], rank: int, targets: list[str], dropout: float,
                     workload: Any) -> int:
    """Approximate change of saved activations against the unpruned, fully trained model.

    Per layer and token: the core's formula at the pruned shapes; minus the hidden vectors
    that only weight gradients of the frozen base needed (one per norm, and one more); plus r values per adapter
    (A's output) and, with dropout, the dropped input (its dtype) and its 1-byte mask.
    """
    geo = Geometry.of(cfg)
    # a frozen norm's weight needs no normalized input: one hidden vector per norm (Gemma2 has four)
    norms = len(architectures.for_config(cfg).norms)
    size = workload.activation_dtype.itemsize
    tokens = workload.batch_size * workload.seq_len
    total = 0
    for kv, ch in shapes:
        layer = _pruned_config(cfg, kv, ch)
        total += llama_layer_activation_bytes(layer, workload.batch_size, workload.seq_len, workload.precision)
        total -= llama_layer_activation_bytes(cfg, workload.batch_size, workload.seq_len, workload.precision)
        per_token = -(1 + norms) * geo.hidden_size * size
        for name, (fan_in, _) in layer_linears(cfg, kv, ch).items():
            if name in targets:
                per_token += rank * size + (fan_in * (size + 1) if dropout > 0 else 0)
        total += tokens * per_token
    return total

"""Predicted memory change of LoRAM, exact to the byte for parameters, gradients, optimizer state.

From the config alone (closed-form counts): the frozen base shrinks to the pruned shapes
(in NF4: payload + scales), adapters are added, and only the adapters have gradients
and AdamW moments (two tensors of the parameter's dtype plus a 4-byte step each).
Activations: the core's per-layer formula at the pruned shapes, less what a frozen base no
longer saves, plus what each adapter saves (``activation_delta``).
"""

from __future__ import annotations

import copy

from typing import Any

from torch import nn

from memwise import architectures
from memwise.memory import MemoryDelta, llama_layer_activation_bytes
from memwise_loram.counts import base_storage, layer_linears, layer_shapes, lora_parameters
from memwise_loram.index_map import Geometry
from memwise_loram.layout import loram_architecture, projection_names, projection_paths

STEP_BYTES = 4  # torch AdamW keeps `step` as a float32 scalar tensor per parameter


def loram_delta(model: nn.Module, config: Any, nf4: dict | None, estimate: Any, workload: Any = None,
                device_type: str = "cpu") -> MemoryDelta:
    """The change from ``estimate`` (the plan so far) to the LoRAM training state on ``device_type``'s kernels."""
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
        activations = activation_delta(cfg, shapes, config.rank, targets, config.dropout, workload, device_type)
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


# the tensor each projection reads: a pre-norm's output (q, k, v; gate, up), the attention output (o), the gated
# product (down)
SOURCE = {"q": "attention", "k": "attention", "v": "attention", "o": "output", "gate": "mlp", "up": "mlp",
          "down": "product"}


def activation_delta(cfg: Any, shapes: list[tuple[int, int]], rank: int, targets: list[str], dropout: float,
                     workload: Any, device_type: str = "cpu") -> int:
    """Change of saved activations against the unpruned, fully trained model (the core's formula).

    Counted from what autograd saves once the base is frozen (listed per layer with
    ``torch.autograd.graph.saved_tensors_hooks``): the core's layer formula at the pruned shapes,
    less what only the frozen weights' gradients needed, plus what the adapters save
    (``adapter_bytes``). A frozen norm weight needs no normalized input; a frozen projection no
    input, so the pre-norm outputs q, k, v, gate and up read (under autocast, their bf16 copies)
    and down's input (o's, a copy under eager attention) go, unless a dropout-free adapter reads
    the same tensor. The first layer's input has no gradient (the embedding is frozen):
    its input norm saves nothing, nor do the dropouts of q, k and v. After the layers the final
    norm keeps only its input and rsqrt: its normalized output and the frozen head's input go.
    """
    adapter, geo = architectures.for_config(cfg), Geometry.of(cfg)
    mixed = workload.precision in ("bf16-mixed", "16-mixed")
    size = workload.activation_dtype.itemsize
    compute = 2 if mixed else size  # what the projections read and write
    residual = 4 if mixed else size  # the residual stream and the decoder norms (fp32 under autocast)
    h, tokens = geo.hidden_size, workload.batch_size * workload.seq_len
    roles = {role: path.rsplit(".", 1)[-1] for role, path in projection_paths(loram_architecture(cfg)).items()}
    adapted = [role for role, name in roles.items() if name in targets]
    # sources a dropout-free adapter's A reads and saves as they are (under autocast the fp32 pre-norm outputs
    # are cast again, a copy per adapter)
    read_whole = set() if dropout > 0 else {SOURCE[r] for r in adapted} - ({"attention", "mlp"} if mixed else set())
    eager = getattr(cfg, "_attn_implementation", "sdpa") != "sdpa"
    total = 0
    for i, (kv, ch) in enumerate(shapes):
        layer = _pruned_config(cfg, kv, ch)
        total += llama_layer_activation_bytes(layer, workload.batch_size, workload.seq_len, workload.precision)
        total -= llama_layer_activation_bytes(cfg, workload.batch_size, workload.seq_len, workload.precision)
        linears = {role: layer_linears(cfg, kv, ch)[name] for role, name in roles.items()}
        per_token = -len(adapter.norms) * h * residual
        if adapter.qk_norms:  # per-head norms of q and k: their normalized q and k, in the projections' dtype
            per_token -= (linears["q"][1] + linears["k"][1]) * compute
        # what the frozen projections read, one tensor per source in the compute dtype; under autocast q, k
        # and v (gate and up) each their own bf16 copy; o reads SDPA's output (SDPA keeps it), under eager
        # attention a copy
        widths = {"attention": 3 * h if mixed else h, "mlp": 2 * h if mixed else h, "product": ch,
                  "output": linears["o"][0] if eager else 0}
        per_token -= sum(width * compute for source, width in widths.items() if source not in read_whole)
        for role in adapted:
            fan_in, fan_out = linears[role]
            source = 4 if mixed and SOURCE[role] in ("attention", "mlp") else compute
            gradless = i == 0 and SOURCE[role] == "attention"
            per_token += adapter_bytes(fan_in, rank, dropout, source, compute, device_type, gradless)
            if mixed:  # autocast's bf16 copies of A and B, per layer
                total += 2 * rank * (fan_in + fan_out)
        total += tokens * per_token
    total -= tokens * (h * residual + 4)  # the first layer's input norm: its input and rsqrt
    total -= tokens * h * (residual + compute)  # the final norm's normalized output, the head's input
    return total


def adapter_bytes(fan_in: int, rank: int, dropout: float, source: int, compute: int, device_type: str,
                  gradless: bool = False) -> int:
    """Bytes one adapter saves per token: A's output for B (r values); with dropout the dropped input
    for A (in the compute dtype) and the dropout's mask, unless the input has no gradient
    (``gradless``): on CPU a mask of the input's dtype (``source`` bytes: dropout is ``x * mask``
    there), on CUDA one byte (the fused kernel's bool mask). Without dropout A reads the source
    itself: nothing more in fp32 (the tensor is counted once, see ``activation_delta``), its own
    bf16 copy under autocast when the source is fp32 (``source`` 4, ``compute`` 2)."""
    if dropout <= 0:
        return rank * compute + (fan_in * compute if source != compute else 0)
    mask = 0 if gradless else fan_in * (1 if device_type == "cuda" else source)
    return rank * compute + fan_in * compute + mask

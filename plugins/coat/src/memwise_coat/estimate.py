"""COAT's predicted memory: optimizer state exact to the byte, saved activations and the FP8
SwiGLU's transients by formula."""

from __future__ import annotations

from typing import Any

from memwise import architectures
from torch import nn

from memwise_coat.activation_quant import ACT_GROUP, CHUNK
from memwise_coat.quantization import codec
from memwise_coat.selection import fp32_parameters
from memwise_coat.state import CoatState
from memwise_coat.state_bytes import adamw_state_bytes, coat_param_state_bytes, shard_of
from memwise_coat.update import step_workspace_bytes


def optimizer_delta(model: nn.Module, config: Any, shards: int = 1) -> tuple[int, int, str]:
    """CoatAdamW's state minus torch AdamW's, for the model's trainable parameters, on one rank of
    ``shards`` (FSDP2 shards each parameter on dim 0; groups lie within each shard); and its step's
    workspace (``update.step_workspace_bytes`` over the fp32-moment shards)."""
    layout = CoatState(codec("e4m3", config.group_size, config.expansion, config.min_expansion),
                       codec(config.second_moment_format, config.group_size, config.expansion, config.min_expansion))
    keep = {id(p) for p in fp32_parameters(model, config.keep_fp32)}
    params = [p for p in model.parameters() if p.requires_grad]
    coat, quantized, fp32_numels = 0, 0, []
    for p in params:
        q = id(p) not in keep and p.numel() >= config.min_numel
        quantized += p.numel() if q else 0
        coat += coat_param_state_bytes(p, q, layout, shards)
        if not q:
            fp32_numels.append(shard_of(p, shards).numel())
    base = adamw_state_bytes([shard_of(p, shards) for p in params])
    total = sum(p.numel() for p in params)
    per_rank = f", per rank of {shards} (groups within each shard)" if shards > 1 else ""
    note = (f"optimizer state {coat * shards / max(total, 1):.3f} B/param ({quantized:,} of {total:,} parameters in "
            f"FP8 groups of {config.group_size}{per_rank})")
    return coat - base, step_workspace_bytes(fp32_numels), note


def activation_delta(model: nn.Module, workload: Any, config: Any) -> tuple[int, str]:
    """Saved bytes of a Llama decoder stack with FP8 activations minus the baseline's.

    Per token and layer: each norm keeps its input as 1x16 FP8 (1 + 2/16 bytes) instead of its
    input and normalized input; the linear layers share one per-tensor FP8 copy of each norm
    output, down_proj gets one of the SwiGLU product; gate and up are kept as 1x16 FP8; attention
    (q, k after RoPE, v, output, which o_proj reads) stays as it is. Calibrated against MemTracker
    on `tiny` (fp32).
    """
    from memwise.memory import llama_layer_activation_bytes

    cfg = getattr(model, "config", None)
    if cfg is None or workload is None:
        return 0, "activations: no HF config, not predicted"
    adapter = architectures.for_config(cfg)
    geo = adapter.geometry(cfg)
    b, s, precision = workload.batch_size, workload.seq_len, workload.precision
    h, inter, heads = geo.hidden, geo.intermediate, geo.heads
    q, kv = geo.q_width, geo.kv_width
    size = 2 if precision.startswith(("bf16", "16")) else 4
    grouped = 1 + 2 / 16
    per_token = (2 * grouped * h + 2 * h  # two norm inputs (1x16) and their outputs (per tensor) for q/k/v, gate/up
                 + size * (2 * q + 2 * kv)  # q, k after RoPE, v, attention output (also o_proj's input)
                 + 2 * grouped * inter + inter  # SwiGLU gate and up (1x16), product for down_proj
                 + 4 * heads)  # SDPA logsumexp
    if adapter.qk_norms:  # per-head norms of q and k keep their input as 1x16 FP8 (and rsqrt per head)
        per_token += grouped * (q + kv) + 4 * (heads + geo.kv_heads)
    if len(adapter.norms) == 4:  # Gemma2's post-norms keep their input as 1x16 FP8
        per_token += 2 * grouped * h + 4 * 2
    if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":  # eager attention stays as it is (see memwise)
        per_token += size * (2 * q - 2 * kv) + 4 * 2 * heads * s - 4 * heads
    layers = geo.layers
    fp8 = layers * b * s * per_token
    base = layers * llama_layer_activation_bytes(cfg, b, s, precision)
    # final norm input (1x16) and lm_head input (per tensor) instead of norm input, normalized input, head input
    full_head = 4 * 3 * h if size == 4 else (4 * 2 * h + 2 * h if "mixed" in precision else 2 * 3 * h)
    head = b * s * ((grouped + 1) * h - full_head)
    delta = int(fp8 - base + head)
    return delta, f"activations: {layers} decoder layers keep FP8 copies ({fp8 / max(base, 1):.2f}x of their bytes)"


QUANTIZER_BUFFERS = 4
"""fp32 buffers of one chunk the 1x16 packing of an fp32 tensor holds at once: the padded copy,
its magnitudes (for the group maxima), the scaled copy and the clamp before the FP8 cast
(memwise.kernels.fp8.quantize), the FP8 codes a quarter more; checked with MemTracker. One more,
its fp32 copy, for a bf16 or fp16 tensor."""
SWIGLU_BACKWARD_TENSORS = 7
"""tokens x intermediate tensors the FP8 SwiGLU's backward holds at its worst: gate and up
dequantized, act(gate) and the product recomputed, the product's gradient, and the gradients
of gate and up as autograd returns them."""


def transients(model: nn.Module, workload: Any) -> tuple[int, int]:
    """(layer_backward, layer_forward) bytes of the last decoder layer's FP8 SwiGLU (memwise.memory.Transients).

    Forward: the residual and the norm output it reads, gate and up outputs, and the packing's
    workspace on one chunk (``activation_quant.CHUNK`` elements, whole rows of 1x16 groups).
    Backward: ``SWIGLU_BACKWARD_TENSORS`` tensors of tokens x intermediate, and the gradient
    arriving from the residual stream.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or workload is None:
        return 0, 0
    geo = architectures.for_config(cfg).geometry(cfg)
    tokens, precision = workload.batch_size * workload.seq_len, workload.precision
    size = 2 if precision.startswith(("bf16", "16")) else 4
    residual = 2 if precision in ("bf16-true", "16-true") else 4
    width = -(-geo.intermediate // ACT_GROUP) * ACT_GROUP
    chunk = min(tokens, max(1, CHUNK // width)) * width
    forward = 2 * residual * tokens * geo.hidden + 2 * size * tokens * geo.intermediate + (QUANTIZER_BUFFERS + (size != 4)) * 4 * chunk
    backward = SWIGLU_BACKWARD_TENSORS * size * tokens * geo.intermediate + residual * tokens * geo.hidden
    return backward, forward

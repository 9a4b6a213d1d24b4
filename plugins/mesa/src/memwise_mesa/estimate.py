"""Predicted memory change of Mesa for ``memwise explain``.

Parameters: the quantizer buffers, exact to the byte (alpha and beta fp32 per group, an
int64 step count). Activations: per converted layer, the bytes the baseline saves for
backward minus the 8-bit payloads (HF Llama-style layers; GQA attention through SDPA
saving q, k, v and log-sum-exp; its output is counted as o_proj's input, which on CPU is
the same tensor). Standalone activations of unknown width are
left out of the activation figure (their quantizer is sized on first use). Transients: the
gated MLP's backward, which rebuilds its inputs from the 8-bit copies (the peak of a step).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from memwise import architectures
from memwise.memory import MemoryDelta
from memwise_mesa.convert import Conversion
from memwise_mesa.layers import fuses_down_proj

QUANTIZER_FIXED_BYTES = 8  # the int64 step counter
SIBLING_INPUTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value")
"""Linears that read one shared input (the norm's output) in HF models."""


def quantizer_bytes(plan: Sequence[Conversion], groups: int) -> int:
    """Bytes of every quantizer buffer the plan adds (lazy ones counted at ``groups``)."""
    return sum(2 * 4 * (spec.groups or groups) + QUANTIZER_FIXED_BYTES for c in plan for spec in c.quantizers)


def _qk_norm_heads(model: nn.Module) -> dict[str, int]:
    """Per-head norms of q and k (Qwen3's q_norm, k_norm) normalize one head_dim slice per head: how many."""
    adapter = architectures.hf_adapter(model)
    if adapter is None or not adapter.qk_norms:
        return {}
    geo = adapter.geometry(architectures.hf_root(model).config)
    return dict(zip(adapter.qk_norms, (geo.heads, geo.kv_heads)))


def activation_delta(model: nn.Module, plan: Sequence[Conversion], tokens: int, act_bytes: int,
                     mixed: bool) -> int:
    """Signed change of saved-activation bytes for ``tokens`` tokens per step."""
    modules = dict(model.named_modules())
    norm_heads = _qk_norm_heads(model)
    residual = 4 if mixed else act_bytes
    delta = 0
    seen_inputs: set[tuple[str, int]] = set()
    for conv in plan:
        m = modules[conv.name]
        if conv.kind == "linear":
            parent, _, leaf = conv.name.rpartition(".")
            key = (parent, m.in_features) if leaf in SIBLING_INPUTS else (conv.name, m.in_features)
            first = key not in seen_inputs
            seen_inputs.add(key)
            base = 2 * m.in_features if mixed else (act_bytes * m.in_features if first else 0)
            delta += tokens * ((m.in_features if first else 0) - base)
        elif conv.kind == "norm":
            width = int(m.weight.shape[-1]) * norm_heads.get(conv.name.rpartition(".")[2], 1)
            base = 4 + residual if type(m).__name__.endswith("RMSNorm") else residual
            delta += tokens * width * (1 - base)
        elif conv.kind == "glu":
            width = m.gate_proj.out_features
            delta += tokens * width * (2 - 3 * act_bytes)
            if fuses_down_proj(m):  # the down projection's input is not saved at all
                delta -= tokens * width * (2 if mixed else act_bytes)
        elif conv.kind == "attention":
            d = m.head_dim
            heads = m.q_proj.out_features // d
            kv = m.k_proj.out_features // d
            base = act_bytes * d * (heads + 2 * kv) + 4 * heads  # its output is o_proj's input (linear)
            delta += tokens * (d * (heads + 2 * kv) - base)
    return delta


GATED_BACKWARD_TENSORS = 5
"""tokens x intermediate tensors a gated MLP's backward holds at its worst (memwise.saved's
SavedGatedLinear frees each once used): g and u unpacked, act(g), the product's gradient and
the gradient of u."""


def layer_backward_bytes(model: nn.Module, plan: Sequence[Conversion], tokens: int, act_bytes: int,
                         mixed: bool) -> int:
    """What the last layer's gated MLP holds in backward beside the saved activations and the
    parameter gradients (memwise.memory.Transients.layer_backward): ``GATED_BACKWARD_TENSORS``
    of its width, and the gradient arriving from the residual stream; 0 without a gated MLP."""
    modules = dict(model.named_modules())
    widths = [modules[c.name].gate_proj.out_features for c in plan if c.kind == "glu"]
    if not widths:
        return 0
    hidden = modules[next(c.name for c in plan if c.kind == "glu")].gate_proj.in_features
    residual = 4 if mixed else act_bytes
    return tokens * (GATED_BACKWARD_TENSORS * act_bytes * max(widths) + residual * hidden)


def mesa_delta(model: nn.Module, plan: Sequence[Conversion], groups: int, batch_size: int, seq_len: int,
               act_bytes: int, mixed: bool) -> MemoryDelta:
    """The MemoryDelta of converting ``model`` by ``plan``."""
    tokens = batch_size * seq_len
    return MemoryDelta(parameters=quantizer_bytes(plan, groups),
                       activations=activation_delta(model, plan, tokens, act_bytes, mixed),
                       layer_backward=layer_backward_bytes(model, plan, tokens, act_bytes, mixed),
                       note=f"Mesa: {len(plan)} layers save 8-bit activations")

"""What an architecture adapter says about an HF causal LM: where the parts are, how big they are.

Plugins ask the adapter instead of hard-coding Llama attribute names, so a technique
either finds the parts it needs in a new architecture or refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Geometry:
    """The sizes every plugin needs, read from an HF config through the adapter's field names."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    activation: str

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


# layer activation bytes of one decoder layer: (adapter, geometry, config, batch, seq, precision) -> bytes
LayerBytes = Callable[["Architecture", Geometry, Any, int, int, str], int]


@dataclass(frozen=True)
class Architecture:
    """One HF ``model_type``: module paths (dotted, relative to the parent named), config fields, traits.

    Projection attributes are ``None`` where the architecture does not have them separately:
    fused attention has ``qkv`` instead of ``q``/``k``/``v``, a fused gated MLP ``gate_up``
    instead of ``gate``/``up``, a plain MLP no gate at all.
    """

    model_type: str
    model_class: str  # transformers class of the causal LM (LlamaForCausalLM)
    config_class: str  # transformers config class (LlamaConfig)
    backbone: str  # the base model inside the causal LM: "model" / "transformer"
    layers: str  # the ModuleList of decoder layers inside the backbone: "layers" / "h"
    embed: str  # token embedding inside the backbone
    final_norm: str  # inside the backbone
    lm_head: str  # inside the causal LM
    attention: str  # inside a decoder layer
    mlp: str  # inside a decoder layer
    norms: tuple[str, ...]  # norms of a decoder layer, in forward order
    o: str  # attention output projection, inside the attention module
    down: str  # MLP output projection, inside the MLP
    act: str  # the activation module, inside the MLP
    q: Optional[str] = "q_proj"
    k: Optional[str] = "k_proj"
    v: Optional[str] = "v_proj"
    qkv: Optional[str] = None
    gate: Optional[str] = "gate_proj"
    up: Optional[str] = "up_proj"
    gate_up: Optional[str] = None
    qk_norms: tuple[str, ...] = ()  # per-head norms of q and k inside the attention module (Qwen3)
    projection: str = "linear"  # "linear" (nn.Linear, y = x W^T) or "conv1d" (HF Conv1D, y = x W)
    norm: str = "rms"  # "rms" or "layernorm"
    rotary: bool = True
    qkv_bias: bool = False  # q, k and v projections always have biases (Qwen2), whatever attention_bias says
    soft_capped: bool = False  # attention logits soft-capped (Gemma2): eager attention only, SDPA cannot
    position_embed: Optional[str] = None  # learned positions inside the backbone (GPT-2's wpe)
    hidden_field: str = "hidden_size"
    layers_field: str = "num_hidden_layers"
    heads_field: str = "num_attention_heads"
    kv_heads_field: Optional[str] = "num_key_value_heads"  # None: no GQA, as many KV heads as heads
    intermediate_field: str = "intermediate_size"
    activation_field: str = "hidden_act"
    builder_defaults: tuple[tuple[str, Any], ...] = ()  # config fields a random test model starts from
    layer_bytes: Optional[LayerBytes] = None  # saved-for-backward bytes of one layer (None: not predicted)
    notes: str = ""

    @property
    def gated(self) -> bool:
        """Gated MLP (SwiGLU/GeGLU): an activated gate times an up projection."""
        return self.gate is not None or self.gate_up is not None

    @property
    def fused(self) -> tuple[str, ...]:
        """Fused projections (several logical projections in one weight)."""
        return tuple(n for n in (self.qkv, self.gate_up) if n is not None)

    def geometry(self, config: Any) -> Geometry:
        """Sizes from an HF config; head_dim from the config when it says so (Qwen3, Gemma2)."""
        hidden = getattr(config, self.hidden_field)
        heads = getattr(config, self.heads_field)
        kv = getattr(config, self.kv_heads_field, None) if self.kv_heads_field else None
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        inter = getattr(config, self.intermediate_field, None) or 4 * hidden
        return Geometry(layers=getattr(config, self.layers_field, 1), hidden=hidden, heads=heads,
                        kv_heads=kv or heads, head_dim=head_dim, intermediate=inter,
                        vocab=getattr(config, "vocab_size", 0),
                        activation=str(getattr(config, self.activation_field, "")))

    # --- modules ---------------------------------------------------------------------------

    def backbone_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The base model (``LlamaModel``) of a causal LM, or the model itself when it is the base."""
        return getattr(model, self.backbone) if hasattr(model, self.backbone) else model

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(self.backbone_of(model), self.layers)

    def attention_of(self, layer: torch.nn.Module) -> torch.nn.Module:
        return _get(layer, self.attention)

    def mlp_of(self, layer: torch.nn.Module) -> torch.nn.Module:
        return _get(layer, self.mlp)

    def projections(self) -> dict[str, str]:
        """Logical role -> path inside a decoder layer, for the projections this architecture has."""
        out = {}
        for role in ("q", "k", "v", "qkv", "o"):
            if getattr(self, role) is not None:
                out[role] = f"{self.attention}.{getattr(self, role)}"
        for role in ("gate", "up", "gate_up", "down"):
            if getattr(self, role) is not None:
                out[role] = f"{self.mlp}.{getattr(self, role)}"
        return out

    def projection_names(self) -> tuple[str, ...]:
        """The attribute names of the projections (``q_proj``, ``c_attn``), as module-name suffixes."""
        return tuple(dict.fromkeys(p.split(".")[-1] for p in self.projections().values()))


def _get(root: torch.nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root

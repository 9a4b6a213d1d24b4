"""The index map: which KV heads and MLP channels each pruned layer kept.

Recovery needs it to put the adapters trained on the pruned model back onto the full
model's rows and columns, and reloading needs it to rebuild the pruned shapes, so it is
saved beside every pruned model and exported adapter (as JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwise import architectures
from memwise_loram.layout import loram_architecture, projection_paths

STRUCTURED = ("l2", "taylor", "random")
MASKING = ("wanda", "2:4")
METHODS = STRUCTURED + MASKING

INDEX_MAP_FILE = "loram_index_map.json"


@dataclass
class Geometry:
    """The unpruned model's shape, from its HF config (through its architecture adapter's field names)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def of(cls, config: Any) -> Geometry:
        geo = loram_architecture(config).geometry(config)
        return cls(geo.layers, geo.hidden, geo.heads, geo.kv_heads, geo.head_dim, geo.intermediate)

    @property
    def group(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def shapes(self, kv_heads: int | None = None, channels: int | None = None) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection role of a layer keeping ``kv_heads`` and ``channels`` (default: all)."""
        kv = self.num_key_value_heads if kv_heads is None else kv_heads
        inter = self.intermediate_size if channels is None else channels
        h, q, k = self.hidden_size, kv * self.group * self.head_dim, kv * self.head_dim
        return {"q": (h, q), "k": (h, k), "v": (h, k), "o": (q, h), "gate": (h, inter), "up": (h, inter),
                "down": (inter, h)}


@dataclass
class LayerKeep:
    """Kept KV heads and MLP channels of one layer (sorted, original numbering)."""

    kv_heads: list[int]
    mlp_channels: list[int]


@dataclass
class IndexMap:
    """What a pruning kept, per pruned layer; masking methods keep every shape.

    ``paths``: role (q, k, v, o, gate, up, down) -> the projection's path inside a decoder
    layer, from the architecture adapter, so recovery and reloading need no model.
    """

    method: str
    ratio: float
    geometry: Geometry
    layers: dict[int, LayerKeep] = field(default_factory=dict)
    paths: dict[str, str] = field(kw_only=True)

    @classmethod
    def for_config(cls, method: str, ratio: float, config: Any, layers: dict[int, LayerKeep] | None = None) -> IndexMap:
        """An index map of a model with ``config``: its geometry and projection paths from its adapter."""
        return cls(method, ratio, Geometry.of(config), dict(layers or {}),
                   paths=projection_paths(loram_architecture(config)))

    def role(self, module: str) -> str:
        """The role of a projection given by its name (``q_proj``) or path (``self_attn.q_proj``)."""
        for role, path in self.paths.items():
            if module in (path, path.rsplit(".", 1)[-1]):
                return role
        raise KeyError(f"'{module}' is none of the pruned projections ({', '.join(self.paths.values())})")

    @property
    def structured(self) -> bool:
        return self.method in STRUCTURED

    def query_heads(self, layer: int) -> list[int]:
        """Kept query heads: each kept KV head keeps its whole group."""
        g = self.geometry.group
        return [h * g + j for h in self.layers[layer].kv_heads for j in range(g)]

    def rows(self, layer: int, module: str) -> list[int] | None:
        """Kept output rows of ``module`` in ``layer`` (None: all rows kept)."""
        if layer not in self.layers or not self.structured:
            return None
        hd, role = self.geometry.head_dim, self.role(module)
        if role == "q":
            return _expand(self.query_heads(layer), hd)
        if role in ("k", "v"):
            return _expand(self.layers[layer].kv_heads, hd)
        if role in ("gate", "up"):
            return list(self.layers[layer].mlp_channels)
        return None

    def cols(self, layer: int, module: str) -> list[int] | None:
        """Kept input columns of ``module`` in ``layer`` (None: all columns kept)."""
        if layer not in self.layers or not self.structured:
            return None
        role = self.role(module)
        if role == "o":
            return _expand(self.query_heads(layer), self.geometry.head_dim)
        if role == "down":
            return list(self.layers[layer].mlp_channels)
        return None

    def to_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "geometry": vars(self.geometry).copy(), "paths": self.paths,
                "layers": {str(i): {"kv_heads": k.kv_heads, "mlp_channels": k.mlp_channels}
                           for i, k in sorted(self.layers.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> IndexMap:
        layers = {int(i): LayerKeep(list(v["kv_heads"]), list(v["mlp_channels"])) for i, v in data["layers"].items()}
        # maps written before they recorded the paths come from Llama-layout models
        paths = data.get("paths") or projection_paths(architectures.get("llama"))
        return cls(data["method"], float(data["ratio"]), Geometry(**data["geometry"]), layers, paths=dict(paths))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / INDEX_MAP_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> IndexMap:
        return cls.from_dict(json.loads((Path(folder) / INDEX_MAP_FILE).read_text()))


def _expand(heads: Iterable[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def kept_counts(geometry: Geometry, ratio: float) -> tuple[int, int]:
    """(KV heads, MLP channels) a pruned layer keeps at ``ratio``, as in the paper.

    It removes ceil(I * r) channels and floor(n_kv * r) KV heads, keeping at least one of each.
    """
    kv = max(1, geometry.num_key_value_heads - math.floor(geometry.num_key_value_heads * ratio))
    mlp = max(1, geometry.intermediate_size - math.ceil(geometry.intermediate_size * ratio))
    return kv, mlp

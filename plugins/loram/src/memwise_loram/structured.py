"""Physical shrinking of Llama decoder layers: fewer KV-head groups, fewer MLP channels.

Grouped-query attention keeps its group size: removing a KV head removes its query
heads and their o_proj columns too, so ``num_key_value_groups`` stays valid and the
HF attention code needs no change (it infers head counts from the projections).
"""

from __future__ import annotations

import torch
from torch import nn

from memwise_loram.index_map import Geometry, IndexMap, LayerKeep


def _select(linear: nn.Linear, rows: list[int] | None, cols: list[int] | None) -> nn.Linear:
    """A new Linear holding the kept rows and columns of ``linear`` (weights copied)."""
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, torch.tensor(rows, device=w.device))
    if cols is not None:
        w = w.index_select(1, torch.tensor(cols, device=w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.detach()
        new.bias.data.copy_(b.index_select(0, torch.tensor(rows, device=b.device)) if rows is not None else b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def shrink_layer(layer: nn.Module, index: int, imap: IndexMap) -> list[str]:
    """Replace the linears of decoder layer ``index`` by their kept parts; return their names."""
    attn, mlp = layer.self_attn, layer.mlp
    names = []
    for parent, prefix, mods in ((attn, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (mlp, "mlp", ("gate_proj", "up_proj", "down_proj"))):
        for m in mods:
            setattr(parent, m, _select(getattr(parent, m), imap.rows(index, m), imap.cols(index, m)))
            names.append(f"{prefix}.{m}")
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(imap.layers[index].mlp_channels)
    return names


def resize_layer(layer: nn.Module, geometry: Geometry, keep: LayerKeep) -> None:
    """Give decoder layer the pruned shapes with fresh (uninitialised) linears: for reloading.

    Works on the meta device, so a shape-only model of any size costs no memory.
    """
    attn, mlp = layer.self_attn, layer.mlp
    hd, g, h = geometry.head_dim, geometry.group, geometry.hidden_size
    nkv, inter = len(keep.kv_heads), len(keep.mlp_channels)
    ref = attn.q_proj.weight
    kw = {"device": ref.device, "dtype": ref.dtype}
    bias = attn.q_proj.bias is not None
    attn.q_proj = nn.Linear(h, nkv * g * hd, bias=bias, **kw)
    attn.k_proj = nn.Linear(h, nkv * hd, bias=bias, **kw)
    attn.v_proj = nn.Linear(h, nkv * hd, bias=bias, **kw)
    attn.o_proj = nn.Linear(nkv * g * hd, h, bias=attn.o_proj.bias is not None, **kw)
    mbias = mlp.gate_proj.bias is not None
    mlp.gate_proj = nn.Linear(h, inter, bias=mbias, **kw)
    mlp.up_proj = nn.Linear(h, inter, bias=mbias, **kw)
    mlp.down_proj = nn.Linear(inter, h, bias=mbias, **kw)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter

"""Physical shrinking of decoder layers: fewer KV-head groups, fewer MLP channels.

Grouped-query attention keeps its group size: removing a KV head removes its query
heads and their o columns too, so ``num_key_value_groups`` stays valid and the HF
attention code needs no change (it infers head counts from the projections). Per-head
norms of q and k (Qwen3's q_norm / k_norm) act on head_dim, which pruning keeps, so they
stay as they are. The projections are found by the index map's paths (from the
architecture adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from memwise_loram.index_map import IndexMap, LayerKeep


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


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, module)


def _set_intermediate(layer: nn.Module, paths: dict[str, str], channels: int) -> None:
    """HF MLPs that keep their width as an attribute get the pruned one."""
    mlp = layer.get_submodule(paths["down"].rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels


def shrink_layer(layer: nn.Module, index: int, imap: IndexMap) -> list[str]:
    """Replace the projections of decoder layer ``index`` by their kept parts; return their paths."""
    for path in imap.paths.values():
        _set(layer, path, _select(layer.get_submodule(path), imap.rows(index, path), imap.cols(index, path)))
    _set_intermediate(layer, imap.paths, len(imap.layers[index].mlp_channels))
    return list(imap.paths.values())


def resize_layer(layer: nn.Module, imap: IndexMap, keep: LayerKeep) -> None:
    """Give decoder layer the pruned shapes with fresh (uninitialised) linears: for reloading.

    Works on the meta device, so a shape-only model of any size costs no memory.
    """
    shapes = imap.geometry.shapes(len(keep.kv_heads), len(keep.mlp_channels))
    for role, path in imap.paths.items():
        old = layer.get_submodule(path)
        fan_in, fan_out = shapes[role]
        _set(layer, path, nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=old.weight.device,
                                    dtype=old.weight.dtype))
    _set_intermediate(layer, imap.paths, len(keep.mlp_channels))

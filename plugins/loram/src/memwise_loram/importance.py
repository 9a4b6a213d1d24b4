"""Importance of the coupled groups that structured pruning removes together.

A KV head's group is its rows of the k and v projections, the rows of q of the query
heads that share it, and the matching columns of o; an MLP channel's group is its row of
gate and up and its column of down. Removing part of a group would leave a shape
mismatch, so every score sums over the whole group. The projections are found by the
index map's paths (from the architecture adapter); gradients and norms are keyed by path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memwise import architectures
from memwise_loram.index_map import IndexMap


def group_scores(layer: nn.Module, imap: IndexMap, method: str, grads: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-KV-head scores, per-MLP-channel scores) of one decoder layer.

    ``l2``: the L2 norm of the group's weights. ``taylor``: first-order Taylor
    importance sum |w * dL/dw| over the group (``grads`` keyed by path, ``self_attn.q_proj``).
    ``random``: uniform scores from ``generator`` (seeded, reproducible).
    """
    geometry = imap.geometry
    g, hd = geometry.group, geometry.head_dim
    nkv, inter = geometry.num_key_value_heads, geometry.intermediate_size
    if method == "random":
        return torch.rand(nkv, generator=generator), torch.rand(inter, generator=generator)

    def elem(role: str) -> torch.Tensor:
        path = imap.paths[role]
        w = layer.get_submodule(path).weight.detach().float()
        if method == "l2":
            return w.pow(2)
        if grads is None or path not in grads:
            raise ValueError("taylor importance needs gradients from calibration batches")
        return (w * grads[path].float()).abs()

    q = elem("q").sum(1).view(nkv, g * hd).sum(1)
    k = elem("k").sum(1).view(nkv, hd).sum(1)
    v = elem("v").sum(1).view(nkv, hd).sum(1)
    o = elem("o").sum(0).view(nkv, g * hd).sum(1)
    heads = q + k + v + o
    channels = elem("gate").sum(1) + elem("up").sum(1) + elem("down").sum(0)
    if method == "l2":
        heads, channels = heads.sqrt(), channels.sqrt()
    return heads, channels


def top_k_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties broken by lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def _loss(model: nn.Module, batch: torch.Tensor | dict) -> torch.Tensor:
    if isinstance(batch, dict):
        labels = batch.get("labels", batch["input_ids"])
        return model(input_ids=batch["input_ids"], labels=labels).loss
    return model(input_ids=batch, labels=batch).loss


def taylor_grads(model: nn.Module, layers: Iterable[int], batches: Iterable,
                 paths: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """Gradients of the LM loss, summed over calibration batches, for the layers' projections (keyed by path).

    The model's requires_grad flags and .grad fields are restored afterwards.
    """
    decoder = [layer for _, layer in architectures.decoder_layers(model)]
    linears = {i: _linears(decoder[i], paths) for i in layers}
    params = [m.weight for mods in linears.values() for m in mods.values()]
    saved = [(p, p.requires_grad, p.grad) for p in params]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        was_training = model.training
        model.eval()
        count = 0
        for batch in batches:
            _loss(model, batch).backward()
            count += 1
        model.train(was_training)
        if count == 0:
            raise ValueError("taylor importance needs at least one calibration batch")
        return {i: {n: m.weight.grad.detach().clone() for n, m in mods.items()} for i, mods in linears.items()}
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _linears(layer: nn.Module, paths: dict[str, str]) -> dict[str, nn.Linear]:
    return {path: layer.get_submodule(path) for path in paths.values()}


@torch.no_grad()
def input_norms(model: nn.Module, layers: Iterable[int], batches: Iterable,
                paths: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """||X_j||_2 of every projection's input column j over all calibration tokens (for Wanda), keyed by path."""
    decoder = [layer for _, layer in architectures.decoder_layers(model)]
    sums: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i in layers:
        sums[i] = {}
        for name, lin in _linears(decoder[i], paths).items():
            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, i: int = i, name: str = name) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sq = x.pow(2).sum(0)
                sums[i][name] = sums[i].get(name, 0) + sq
            handles.append(lin.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            model(input_ids=ids)
            count += 1
        if count == 0:
            raise ValueError("wanda needs at least one calibration batch")
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {i: {n: s.sqrt() for n, s in d.items()} for i, d in sums.items()}

"""Importance of the coupled groups that structured pruning removes together.

A KV head's group is its rows of k_proj and v_proj, the rows of q_proj of the query
heads that share it, and the matching columns of o_proj; an MLP channel's group is its
row of gate_proj and up_proj and its column of down_proj. Removing part of a group would
leave a shape mismatch, so every score sums over the whole group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memwise import architectures
from memwise_loram.index_map import Geometry


def group_scores(layer: nn.Module, geometry: Geometry, method: str, grads: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-KV-head scores, per-MLP-channel scores) of one decoder layer.

    ``l2``: the L2 norm of the group's weights. ``taylor``: first-order Taylor
    importance sum |w * dL/dw| over the group (``grads`` keyed like ``q_proj``).
    ``random``: uniform scores from ``generator`` (seeded, reproducible).
    """
    g, hd = geometry.group, geometry.head_dim
    nkv, inter = geometry.num_key_value_heads, geometry.intermediate_size
    if method == "random":
        return torch.rand(nkv, generator=generator), torch.rand(inter, generator=generator)
    attn, mlp = layer.self_attn, layer.mlp

    def elem(name: str, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach().float()
        if method == "l2":
            return w.pow(2)
        if grads is None or name not in grads:
            raise ValueError("taylor importance needs gradients from calibration batches")
        return (w * grads[name].float()).abs()

    q = elem("q_proj", attn.q_proj).sum(1).view(nkv, g * hd).sum(1)
    k = elem("k_proj", attn.k_proj).sum(1).view(nkv, hd).sum(1)
    v = elem("v_proj", attn.v_proj).sum(1).view(nkv, hd).sum(1)
    o = elem("o_proj", attn.o_proj).sum(0).view(nkv, g * hd).sum(1)
    heads = q + k + v + o
    channels = elem("gate_proj", mlp.gate_proj).sum(1) + elem("up_proj", mlp.up_proj).sum(1) \
        + elem("down_proj", mlp.down_proj).sum(0)
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


def taylor_grads(model: nn.Module, layers: Iterable[int], batches: Iterable) -> dict[int, dict[str, torch.Tensor]]:
    """Gradients of the LM loss, summed over calibration batches, for the layers' linears.

    The model's requires_grad flags and .grad fields are restored afterwards.
    """
    decoder = [layer for _, layer in architectures.decoder_layers(model)]
    linears = {i: dict(_linears(decoder[i])) for i in layers}
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


def _linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    attn, mlp = layer.self_attn, layer.mlp
    return [("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj), ("o_proj", attn.o_proj),
            ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj)]


@torch.no_grad()
def input_norms(model: nn.Module, layers: Iterable[int], batches: Iterable) -> dict[int, dict[str, torch.Tensor]]:
    """||X_j||_2 of every linear's input column j over all calibration tokens (for Wanda)."""
    decoder = [layer for _, layer in architectures.decoder_layers(model)]
    sums: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i in layers:
        sums[i] = {}
        for name, lin in _linears(decoder[i]):
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

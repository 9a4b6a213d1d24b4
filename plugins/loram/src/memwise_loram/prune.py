"""``prune(model, method, ratio, layers=...)``: the pruning step of LoRAM, usable on its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from memwise import architectures
from memwise.surgery import layer_indices
from memwise_loram.importance import group_scores, input_norms, taylor_grads, top_k_sorted
from memwise_loram.index_map import METHODS, IndexMap, LayerKeep, kept_counts
from memwise_loram.masking import apply_mask, two_four_mask, wanda_mask
from memwise_loram.structured import shrink_layer


@torch.no_grad()
def prune(model: nn.Module, method: str, ratio: float, layers: str | Iterable[int] | None = None,
          calibration: Sequence | None = None, seed: int = 0) -> IndexMap:
    """Prune the decoder layers ``layers`` of an HF causal LM in place; return the index map.

    Structured methods (``l2``, ``taylor``, ``random``) remove whole KV-head groups and
    MLP channels, so the model physically shrinks; ``wanda`` and ``2:4`` zero weights in
    place (shapes kept; 2:4 ignores ``ratio``, it is always one half). ``taylor`` needs
    ``calibration`` batches (input_ids tensors or dicts); ``wanda``/``2:4`` use them for
    activation norms when given. Ratio 0 keeps everything (the identity). The projections
    come from the architecture adapter; an architecture without seven separate q/k/v/o and
    gate/up/down linears is refused before anything changes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method '{method}'; choose one of {', '.join(METHODS)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    imap = IndexMap.for_config(method, float(ratio), architectures.hf_root(model).config)
    geometry = imap.geometry
    chosen = layer_indices(layers, geometry.num_layers)
    decoder = [layer for _, layer in architectures.decoder_layers(model)]
    if method in ("wanda", "2:4"):
        norms = input_norms(model, chosen, calibration, imap.paths) if calibration else {}
        for i in chosen:
            for name in imap.paths.values():
                lin = decoder[i].get_submodule(name)
                n = norms.get(i, {}).get(name)
                mask = two_four_mask(lin.weight, n) if method == "2:4" else wanda_mask(lin.weight, n, ratio)
                apply_mask(lin, mask)
            imap.layers[i] = LayerKeep(list(range(geometry.num_key_value_heads)),
                                       list(range(geometry.intermediate_size)))
        return imap
    grads: dict = {}
    if method == "taylor":
        if not calibration:
            raise ValueError("taylor pruning needs calibration batches")
        with torch.enable_grad():
            grads = taylor_grads(model, chosen, calibration, imap.paths)
    gen = torch.Generator().manual_seed(seed)
    n_kv, n_mlp = kept_counts(geometry, ratio)
    for i in chosen:
        heads, channels = group_scores(decoder[i], imap, method, grads.get(i), gen)
        imap.layers[i] = LayerKeep(top_k_sorted(heads, n_kv), top_k_sorted(channels, n_mlp))
        shrink_layer(decoder[i], i, imap)
    return imap


def pruned_module_names(model: nn.Module, imap: IndexMap) -> list[str]:
    """Full names (in ``model``) of the modules a pruning replaced (for the claims ledger)."""
    if not imap.structured:
        return []
    layers = [name for name, _ in architectures.decoder_layers(model)]
    return [f"{layers[i]}.{path}" for i in sorted(imap.layers) for path in imap.paths.values()]

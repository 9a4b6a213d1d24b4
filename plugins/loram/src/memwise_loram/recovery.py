"""Recovery: adapters trained on the pruned model, expanded to the full model's shapes.

For a projection whose output rows were pruned, B grows to the full row count with zeros
on the removed rows; for one whose input columns were pruned, A grows with zero columns.
So the recovered update B A equals the pruned one on kept positions and is exactly zero
on pruned positions: the full model keeps its original weights there.
"""

from __future__ import annotations

import re

import torch

from memwise_loram.index_map import IndexMap

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _full_out(imap: IndexMap, module: str) -> int:
    g = imap.geometry
    return {"q_proj": g.num_attention_heads * g.head_dim, "k_proj": g.num_key_value_heads * g.head_dim,
            "v_proj": g.num_key_value_heads * g.head_dim, "o_proj": g.hidden_size,
            "gate_proj": g.intermediate_size, "up_proj": g.intermediate_size, "down_proj": g.hidden_size}[module]


def _full_in(imap: IndexMap, module: str) -> int:
    g = imap.geometry
    return {"o_proj": g.num_attention_heads * g.head_dim, "down_proj": g.intermediate_size}.get(module, g.hidden_size)


@torch.no_grad()
def recover(adapters: dict[str, torch.Tensor], imap: IndexMap) -> dict[str, torch.Tensor]:
    """Expand pruned-model adapter weights (``adapter_state`` keys) to the full model's shapes."""
    out = {}
    for key, w in adapters.items():
        m = _LAYER.search(key)
        if m is None or int(m.group(1)) not in imap.layers or not imap.structured:
            out[key] = w.clone()
            continue
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if which == "B":
            rows = imap.rows(layer, module)
            if rows is None:
                out[key] = w.clone()
                continue
            full = w.new_zeros(_full_out(imap, module), w.shape[1])
            full[torch.tensor(rows)] = w
        else:
            cols = imap.cols(layer, module)
            if cols is None:
                out[key] = w.clone()
                continue
            full = w.new_zeros(w.shape[0], _full_in(imap, module))
            full[:, torch.tensor(cols)] = w
        out[key] = full
    return out

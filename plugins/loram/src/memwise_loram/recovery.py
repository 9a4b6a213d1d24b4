"""Recovery: adapters trained on the pruned model, expanded to the full model's shapes.

For a projection whose output rows were pruned, B grows to the full row count with zeros
on the removed rows; for one whose input columns were pruned, A grows with zero columns.
So the recovered update B A equals the pruned one on kept positions and is exactly zero
on pruned positions: the full model keeps its original weights there. Keys are matched to
layers and projections through the index map's paths (the architecture adapter's names).
"""

from __future__ import annotations

import re

import torch

from memwise_loram.index_map import IndexMap


@torch.no_grad()
def recover(adapters: dict[str, torch.Tensor], imap: IndexMap) -> dict[str, torch.Tensor]:
    """Expand pruned-model adapter weights (``adapter_state`` keys) to the full model's shapes."""
    paths = "|".join(re.escape(p) for p in sorted(imap.paths.values(), key=len, reverse=True))
    pattern = re.compile(rf"(?:^|\.)(\d+)\.({paths})\.lora_([AB])\.weight$")
    full_shapes = imap.geometry.shapes()
    out = {}
    for key, w in adapters.items():
        m = pattern.search(key)
        if m is None or int(m.group(1)) not in imap.layers or not imap.structured:
            out[key] = w.clone()
            continue
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        fan_in, fan_out = full_shapes[imap.role(module)]
        if which == "B":
            rows = imap.rows(layer, module)
            if rows is None:
                out[key] = w.clone()
                continue
            full = w.new_zeros(fan_out, w.shape[1])
            full[torch.tensor(rows)] = w
        else:
            cols = imap.cols(layer, module)
            if cols is None:
                out[key] = w.clone()
                continue
            full = w.new_zeros(w.shape[0], fan_in)
            full[:, torch.tensor(cols)] = w
        out[key] = full
    return out

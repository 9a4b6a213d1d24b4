"""Conversions between CoatAdamW and torch.optim.AdamW state dicts, so no one is locked in."""

from __future__ import annotations

import copy
from typing import Any

from memwise_coat.groups import COAT_KEYS
from memwise_coat.state import CoatState

_TORCH_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": None, "decoupled_weight_decay": True}


def _group_of(state_dict: dict) -> dict[int, dict]:
    return {idx: g for g in state_dict["param_groups"] for idx in g["params"]}


def to_torch_adamw(state_dict: dict) -> dict:
    """A CoatAdamW state dict with dequantized fp32 moments and torch AdamW's group keys."""
    groups = _group_of(state_dict)
    state = {idx: CoatState.of_group(groups[idx]).to_adamw(s) for idx, s in state_dict["state"].items()}
    param_groups = []
    for g in state_dict["param_groups"]:
        g = {k: copy.copy(v) for k, v in g.items() if k not in COAT_KEYS}
        param_groups.append({**_TORCH_DEFAULTS, **g})
    return {"state": state, "param_groups": param_groups}


def from_torch_adamw(state_dict: dict, optimizer: Any) -> dict:
    """A torch AdamW state dict re-expressed for ``optimizer`` (a CoatAdamW with the same params)."""
    slots = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, s in state_dict["state"].items():
        p, group = slots[idx]
        state[idx] = CoatState.of_group(group).from_adamw(s, p, optimizer.quantizes(p, group))
    param_groups = []
    for g, mine in zip(state_dict["param_groups"], optimizer.param_groups):
        g = {k: v for k, v in g.items() if k not in _TORCH_DEFAULTS}
        g.update({k: mine[k] for k in COAT_KEYS})
        param_groups.append(g)
    return {"state": state, "param_groups": param_groups}

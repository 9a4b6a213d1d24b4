"""Conversions between CoatAdamW and torch.optim.AdamW state dicts, so no one is locked in."""

from __future__ import annotations

import copy
from typing import Any

import torch

from memwise_coat.groups import COAT_KEYS, group_codecs, is_quantized
from memwise_coat.quantization import quantize_groups
from memwise_coat.update import MOMENTS, load_moment

_TORCH_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                   "differentiable": False, "fused": None, "decoupled_weight_decay": True}


def _group_of(state_dict: dict) -> dict[int, dict]:
    return {idx: g for g in state_dict["param_groups"] for idx in g["params"]}


def to_torch_adamw(state_dict: dict) -> dict:
    """A CoatAdamW state dict with dequantized fp32 moments and torch AdamW's group keys."""
    groups = _group_of(state_dict)
    state = {}
    for idx, s in state_dict["state"].items():
        if is_quantized(s):
            first, second = group_codecs(groups[idx])
            state[idx] = {"step": s["step"].clone(), "exp_avg": load_moment(s, "exp_avg", first),
                          "exp_avg_sq": load_moment(s, "exp_avg_sq", second)}
        else:
            state[idx] = {k: v.clone() for k, v in s.items()}
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
        if "max_exp_avg_sq" in s:
            raise ValueError("cannot convert an amsgrad AdamW state to CoatAdamW")
        entry = {"step": torch.as_tensor(s["step"], dtype=torch.float32).clone()}
        if not optimizer.quantizes(p, group):
            entry.update(exp_avg=s["exp_avg"].clone(), exp_avg_sq=s["exp_avg_sq"].clone())
        else:
            for moment, c in zip(MOMENTS, optimizer.codecs(group)):
                packed = quantize_groups(s[moment].float(), c)
                entry[moment] = packed.pop("q")
                entry.update({f"{moment}_{k}": v for k, v in packed.items()})
        state[idx] = entry
    param_groups = []
    for g, mine in zip(state_dict["param_groups"], optimizer.param_groups):
        g = {k: v for k, v in g.items() if k not in _TORCH_DEFAULTS}
        g.update({k: mine[k] for k in COAT_KEYS})
        param_groups.append(g)
    return {"state": state, "param_groups": param_groups}

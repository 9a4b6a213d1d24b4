"""Which parameters keep fp32 moments: embeddings and norms by default (matched by name or class)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn


def fp32_parameters(model: nn.Module, patterns: Iterable[str]) -> list[torch.nn.Parameter]:
    """Parameters whose qualified name, or owning module's class name, matches a glob (case-insensitive)."""
    pats = [p.lower() for p in patterns]
    chosen: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        cls = type(module).__name__.lower()
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) not in seen and any(fnmatch.fnmatch(full.lower(), pat) or fnmatch.fnmatch(cls, pat) for pat in pats):
                seen.add(id(p))
                chosen.append(p)
    return chosen

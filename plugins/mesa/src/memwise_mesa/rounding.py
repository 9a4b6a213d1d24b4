"""Mesa's own random stream for stochastic rounding.

Drawing from torch's global generator would make a resumed run exact only where the
global RNG state is checkpointed too (memwise's runner does; Lightning's ModelCheckpoint
does not). With a stream of its own, Mesa saves and restores it with its ranges, so resume
is exact in either mode.
"""

from __future__ import annotations

import torch

_generators: dict[str, torch.Generator] = {}
_seed = 0


def generator(device: torch.device) -> torch.Generator:
    """The rounding generator of ``device`` (created from the current seed on first use)."""
    key = str(torch.device(device))
    if key not in _generators:
        _generators[key] = torch.Generator(device=device).manual_seed(_seed)
    return _generators[key]


def reseed(seed: int) -> None:
    """Restart every device's stream from ``seed`` (a conversion draws it from torch's RNG)."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def state_dict() -> dict:
    """The seed and every device's generator state (plain tensors: loads with weights_only=True)."""
    return {"seed": _seed, "states": {key: g.get_state() for key, g in _generators.items()}}


def load_state_dict(state: dict) -> None:
    reseed(state["seed"])
    for key, value in state["states"].items():
        generator(torch.device(key)).set_state(value)

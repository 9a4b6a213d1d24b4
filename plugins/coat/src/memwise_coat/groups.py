"""What a CoatAdamW param group and a parameter's state hold: the group options CoatAdamW adds,
the codecs they select, and whether a state is quantized. Shared by the optimizer and the
conversions to and from torch AdamW."""

from __future__ import annotations

import torch

from memwise_coat.quantization import MomentCodec, codec

COAT_KEYS = ("group_size", "expansion", "second_moment_format", "min_numel", "min_expansion")
"""Group options CoatAdamW adds to torch AdamW's (saved in its state dict)."""


def group_codecs(group: dict) -> tuple[MomentCodec, MomentCodec]:
    """How the first and second moments of a group's quantized parameters are stored."""
    first = codec("e4m3", group["group_size"], group["expansion"], group["min_expansion"])
    second = codec(group["second_moment_format"], group["group_size"], group["expansion"], group["min_expansion"])
    return first, second


def is_quantized(state: dict) -> bool:
    """True when a parameter's state holds FP8 moments."""
    return state["exp_avg"].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

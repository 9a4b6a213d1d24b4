"""What a CoatAdamW param group holds: the options CoatAdamW adds and the codecs they select
(a parameter's state layout is memwise_coat.state's)."""

from __future__ import annotations

from memwise_coat.quantization import MomentCodec, codec

COAT_KEYS = ("group_size", "expansion", "second_moment_format", "min_numel", "min_expansion")
"""Group options CoatAdamW adds to torch AdamW's (saved in its state dict)."""


def group_codecs(group: dict) -> tuple[MomentCodec, MomentCodec]:
    """How the first and second moments of a group's quantized parameters are stored."""
    first = codec("e4m3", group["group_size"], group["expansion"], group["min_expansion"])
    second = codec(group["second_moment_format"], group["group_size"], group["expansion"], group["min_expansion"])
    return first, second

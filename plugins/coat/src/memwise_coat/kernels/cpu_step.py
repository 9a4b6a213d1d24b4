"""The CPU kernel for one CoatAdamW step on FP8 moments (coat_adamw.cpp).

In eager torch, each element needs a log2 and an exp2 to decode each moment and again to encode
it: eight vectorised passes of transcendentals, several times torch AdamW's whole step. The kernel
does the reference's math a few quantization groups at a time while they sit in L1, with one exp2
per element to decode a moment (log2 of a code's magnitude is a table) and a log2 and an exp2 to
encode it (the group's scale folded into the exponent). It is built on first use with torch's C++ extension loader (once per machine);
where that fails, the step keeps the torch reference and warns once with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from memwise.kernels.cpu_extension import cpu_extension
from memwise.kernels.fp8 import decode

from memwise_coat.quantization import MomentCodec
from memwise_coat.scalars import StepScalars
from memwise_coat.state import CoatState

_SOURCE = Path(__file__).with_name("coat_adamw.cpp")
# no -ffast-math: zeros' signs, infinities and torch's rounding order matter; fused multiply-adds only where written
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
_TABLES: dict[torch.dtype, torch.Tensor] = {}


def extension() -> Any | None:
    """The built extension, or None where it cannot be built (warned once, with the reason)."""
    return cpu_extension("memwise_coat_adamw", _SOURCE, _FLAGS, "coat: the CPU CoatAdamW kernel",
                         "CoatAdamW steps with the torch reference, several times slower")


def _table(c: MomentCodec) -> torch.Tensor:
    """[2, 256]: each code's value and the log2 of its magnitude (0 for the zeros)."""
    if c.fmt.dtype not in _TABLES:
        value = decode(torch.arange(256, dtype=torch.uint8).view(c.fmt.dtype))
        mag = value.double().abs()
        log2mag = torch.where(mag > 0, mag.log2(), torch.zeros_like(mag)).float()
        _TABLES[c.fmt.dtype] = torch.stack([value, log2mag]).contiguous()
    return _TABLES[c.fmt.dtype]


def _format(c: MomentCodec) -> list[float]:
    f = c.fmt
    return [f.mantissa_bits, f.min_normal_exp, f.max_value, c.log_range, c.smallest]


def fp8_step_cpu(p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], s: StepScalars,
                 first: MomentCodec, second: MomentCodec, ext: Any) -> None:
    """One step for one contiguous CPU parameter and its (local) state, in place."""
    if first.group_size != second.group_size or first.expansion != second.expansion:
        raise ValueError("both moments must share group size and expansion")
    args = []
    for codes, scale, expand, centre in CoatState(first, second).tensors(state):
        args += [codes.view(torch.uint8), scale, expand, centre]
    scalars = [s.decay, 1 - s.beta1, s.beta2, 1 - s.beta2, s.eps, -s.step_size, s.bias_correction2_sqrt]
    ext.coat_adamw_step(p.detach(), grad.contiguous(), *args, _table(first), _table(second), first.group_size,
                        first.expansion, float(first.min_expansion), scalars, _format(first), _format(second))

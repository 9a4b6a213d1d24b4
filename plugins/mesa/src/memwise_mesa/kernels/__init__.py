"""Quantize/dequantize with per-group ranges: triton on CUDA (or the interpreter), torch elsewhere."""

from __future__ import annotations

import torch

from memwise.kernels.dispatch import use_triton
from memwise_mesa import rounding
from memwise_mesa.kernels import reference


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
             levels: int = 255, stochastic: bool = True) -> torch.Tensor:
    """uint8 codes of contiguous ``x`` seen as (outer, groups, inner); see ``reference.quantize``.

    Stochastic rounding draws from Mesa's own stream (``memwise_mesa.rounding``): the triton
    kernel takes one seed a call from the CPU stream, the torch path its device's stream.
    """
    if use_triton(x):
        from memwise_mesa.kernels import triton_quant

        seeds = rounding.generator(torch.device("cpu"))
        return triton_quant.quantize(x, inv_scale, offset, groups, inner, levels, stochastic, seeds)
    return reference.quantize(x, inv_scale, offset, groups, inner, levels, stochastic, rounding.generator(x.device))


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, groups: int, inner: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Values ``q * scale + offset`` per group, in ``dtype``; see ``reference.dequantize``."""
    if use_triton(q):
        from memwise_mesa.kernels import triton_quant

        return triton_quant.dequantize(q, scale, offset, groups, inner, dtype)
    return reference.dequantize(q, scale, offset, groups, inner, dtype)

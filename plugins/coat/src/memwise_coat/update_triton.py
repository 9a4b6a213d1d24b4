"""The fused CUDA path: dequantize both FP8 moments, AdamW update, requantize, in one pass.

One program per quantization group. Mirrors update.fp8_step_reference operation by operation;
rounding onto the FP8 grid happens in fp32 (memwise.kernels.fp8_triton) before the exact cast.
Imported only when a step runs on CUDA or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from memwise.kernels.fp8_triton import round_to_grid

from memwise_coat.quantization import MomentCodec
from memwise_coat.scalars import StepScalars
from memwise_coat.state import CoatState


@triton.jit
def _dequantize(q, scale, expand, centre, EXPAND: tl.constexpr):
    ys = q.to(tl.float32) * scale
    if EXPAND:
        sign = tl.where(ys < 0, -1.0, tl.where(ys > 0, 1.0, 0.0))
        return sign * tl.exp2(tl.log2(tl.abs(ys)) / expand) * centre
    return ys


@triton.jit
def _quantize(x, mask, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, MAX_VALUE: tl.constexpr,
              LOG_RANGE: tl.constexpr, SMALLEST: tl.constexpr, MIN_EXPANSION: tl.constexpr, EXPAND: tl.constexpr):
    """Codes (on the FP8 grid, fp32) and the group's scale, exponent and centre."""
    a = tl.where(mask, tl.abs(x), 0.0)
    big = tl.max(a, axis=0)
    small = tl.min(tl.where(a > 0, a, float("inf")), axis=0)
    nonzero = big > 0
    flat = small == big
    if EXPAND:
        log_r = tl.log2(big / small)
        k = tl.floor(LOG_RANGE / log_r * 16.0) / 16.0
        k = tl.where(log_r > 0, k, 1.0)
        k = tl.maximum(k, MIN_EXPANSION)
        k = tl.where(nonzero, k, 1.0)
        centre = tl.where(flat, big, tl.sqrt_rn(big) * tl.sqrt_rn(small))
        centre = tl.where(nonzero, centre, 1.0)
        sign = tl.where(x < 0, -1.0, tl.where(x > 0, 1.0, 0.0))
        y = sign * tl.exp2(k * tl.log2(a / centre))
        scale = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0) / MAX_VALUE
        scale = tl.where(nonzero & (small != big), scale, 1.0)
    else:
        k = 1.0
        centre = 1.0
        y = a * tl.where(x < 0, -1.0, 1.0)
        scale = tl.where(flat, big, big / MAX_VALUE)
        scale = tl.where(nonzero, scale, 1.0)
    r = y / scale
    r_mag = tl.maximum(tl.abs(r), SMALLEST)
    r = tl.where(r == 0, r, tl.where(r < 0, -r_mag, r_mag))
    q = round_to_grid(r, MANTISSA_BITS, MIN_NORMAL_EXP, MAX_VALUE)
    return q, scale, k, centre


@triton.jit
def _coat_adamw_kernel(p_ptr, g_ptr, m_ptr, m_scale, m_expand, m_centre, v_ptr, v_scale, v_expand, v_centre,
                       n, decay, beta1, beta2, eps, step_size, bc2_sqrt,
                       GROUP: tl.constexpr, BLOCK: tl.constexpr, EXPAND: tl.constexpr, MIN_EXPANSION: tl.constexpr,
                       M_MB: tl.constexpr, M_MNE: tl.constexpr, M_MAX: tl.constexpr, M_LOG: tl.constexpr,
                       M_SMALL: tl.constexpr, V_MB: tl.constexpr, V_MNE: tl.constexpr, V_MAX: tl.constexpr,
                       V_LOG: tl.constexpr, V_SMALL: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * GROUP + lane
    mask = (lane < GROUP) & (offs < n)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if EXPAND:
        mk = tl.load(m_expand + pid)
        mc = tl.load(m_centre + pid)
        vk = tl.load(v_expand + pid)
        vc = tl.load(v_centre + pid)
    else:
        mk = 1.0
        mc = 1.0
        vk = 1.0
        vc = 1.0
    m = _dequantize(tl.load(m_ptr + offs, mask=mask, other=0.0), tl.load(m_scale + pid), mk, mc, EXPAND)
    v = _dequantize(tl.load(v_ptr + offs, mask=mask, other=0.0), tl.load(v_scale + pid), vk, vc, EXPAND)

    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    qm, sm, km, cm = _quantize(m, mask, M_MB, M_MNE, M_MAX, M_LOG, M_SMALL, MIN_EXPANSION, EXPAND)
    tl.store(m_ptr + offs, qm.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(m_scale + pid, sm)
    qv, sv, kv, cv = _quantize(v, mask, V_MB, V_MNE, V_MAX, V_LOG, V_SMALL, MIN_EXPANSION, EXPAND)
    tl.store(v_ptr + offs, qv.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(v_scale + pid, sv)
    if EXPAND:
        tl.store(m_expand + pid, km)
        tl.store(m_centre + pid, cm)
        tl.store(v_expand + pid, kv)
        tl.store(v_centre + pid, cv)


def _format_args(c: MomentCodec) -> tuple:
    f = c.fmt
    return f.mantissa_bits, f.min_normal_exp, f.max_value, c.log_range, c.smallest


def fp8_step_triton(p: torch.Tensor, grad: torch.Tensor, state: dict, s: StepScalars,
                    first: MomentCodec, second: MomentCodec) -> None:
    """One fused CoatAdamW step for one parameter (contiguous tensors, in place)."""
    if first.group_size != second.group_size or first.expansion != second.expansion:
        raise ValueError("both moments must share group size and expansion")
    if not p.is_contiguous():
        raise ValueError("the fused CoatAdamW kernel needs a contiguous parameter")
    grad = grad.contiguous()
    n = p.numel()
    m, v = CoatState(first, second).tensors(state)
    group = first.group_size
    _coat_adamw_kernel[(first.num_groups(n),)](
        p, grad, *m, *v, n,
        s.decay, s.beta1, s.beta2, s.eps, s.step_size, s.bias_correction2_sqrt,
        GROUP=group, BLOCK=triton.next_power_of_2(group), EXPAND=first.expansion,
        MIN_EXPANSION=float(first.min_expansion), **dict(zip(("M_MB", "M_MNE", "M_MAX", "M_LOG", "M_SMALL"),
                                                              _format_args(first))),
        **dict(zip(("V_MB", "V_MNE", "V_MAX", "V_LOG", "V_SMALL"), _format_args(second))),
    )

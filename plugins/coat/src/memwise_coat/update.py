"""One AdamW step on FP8 moments: dequantize, update, requantize (torch reference and dispatch)."""

from __future__ import annotations

import torch

from memwise_coat.quantization import MomentCodec
from memwise_coat.scalars import StepScalars
from memwise_coat.state import MOMENTS, CoatState


CHUNK = 1 << 19
"""Elements updated at a time on the torch paths: bounds their fp32 workspace (a few MiB; the kernel needs
none) while keeping the per-operation overhead of eager torch small beside the work."""


def adamw_update_(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: StepScalars) -> None:
    """torch.optim.AdamW's single-tensor update, in place on fp32 moments, ``CHUNK`` elements at a time.

    Every operation is elementwise, so the result is bitwise the whole-tensor update's, while its two
    temporaries (the square root of ``v`` and its quotient) stay at most ``CHUNK`` elements each
    instead of the parameter's size (an embedding's moments kept in fp32 made 2 x its size).
    """
    if p.numel() <= CHUNK or not all(t.is_contiguous() for t in (p, grad, m, v)):
        _adamw_piece(p, grad, m, v, s)
        return
    flat = [t.view(-1) for t in (p, grad, m, v)]
    for start in range(0, flat[0].numel(), CHUNK):
        _adamw_piece(*(t[start:start + CHUNK] for t in flat), s)


def _adamw_piece(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: StepScalars) -> None:
    p.mul_(s.decay)
    m.lerp_(grad, 1 - s.beta1)
    v.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
    denom = (v.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    p.addcdiv_(m, denom, value=-s.step_size)


def step_workspace_bytes(fp32_numels: list[int]) -> int:
    """Bytes the step allocates beyond the gradients at its worst, on the fused kernels: the fp32-moment
    update's two temporaries on the largest chunk (the FP8 kernels keep theirs in registers and L1)."""
    return 2 * 4 * min(CHUNK, max(fp32_numels, default=0))


def fp8_step_reference(p: torch.Tensor, grad: torch.Tensor, state: dict, s: StepScalars,
                       first: MomentCodec, second: MomentCodec) -> None:
    """Dequantize both moments, update parameter and moments, requantize: the oracle of the kernel.

    Works through the parameter in group-aligned chunks, so its fp32 temporaries stay small.
    """
    layout = CoatState(first, second)
    flat_p, flat_g = p.detach().view(-1), grad.reshape(-1)
    group = first.group_size
    step = max(group, CHUNK // group * group)
    for start in range(0, flat_p.numel(), step):
        stop = min(start + step, flat_p.numel())
        sub = layout.slice(state, start, stop)
        m, v = (layout.load(sub, moment) for moment in MOMENTS)
        piece = flat_p[start:stop]
        work = piece.float() if piece.dtype != torch.float32 else piece
        adamw_update_(work, flat_g[start:stop].float(), m, v, s)
        if work is not piece:
            piece.copy_(work)
        for moment, value in zip(MOMENTS, (m, v)):
            layout.store(sub, moment, value)


def fp8_step(p: torch.Tensor, grad: torch.Tensor, state: dict, s: StepScalars,
             first: MomentCodec, second: MomentCodec, use_kernel: bool | None = None) -> None:
    """The fused triton kernel on CUDA (or under TRITON_INTERPRET=1), the fused C++ kernel on CPU where it
    builds, else the reference. ``use_kernel``: True for triton, False for the reference, None to choose.

    ``p``, ``grad`` and ``state`` are plain tensors (a DTensor parameter's local shard and
    ``CoatState.local`` of its state)."""
    from memwise.kernels.dispatch import use_triton

    if use_kernel is None:
        use_kernel = use_triton(p)
        if not use_kernel and p.device.type == "cpu" and p.is_contiguous():
            from memwise_coat.kernels import cpu_step

            if (ext := cpu_step.extension()) is not None:
                return cpu_step.fp8_step_cpu(p, grad, state, s, first, second, ext)
    if use_kernel:
        from memwise_coat.update_triton import fp8_step_triton

        fp8_step_triton(p, grad, state, s, first, second)
    else:
        fp8_step_reference(p, grad, state, s, first, second)

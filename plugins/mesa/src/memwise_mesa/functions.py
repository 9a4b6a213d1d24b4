"""Autograd functions whose forward is the exact baseline computation and whose saved
activations are 8-bit packed tensors.

``MesaLinearFn`` computes the linear backward directly from the dequantized input.
``GatedDownFn`` is a SwiGLU MLP's ``down(act(g) * u)``: it keeps only g and u in 8 bits.
``RecomputeFn`` serves norms, activations, the SwiGLU product and attention: it keeps
only its packed inputs and, in backward, re-runs the same forward on the dequantized
inputs and backpropagates through it (autocast state and, when asked, RNG state replayed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from memwise_mesa.packed import PackedTensor
from memwise_mesa.quantizer import unpack

Packer = Callable[[torch.Tensor], PackedTensor]


def linear_param_grads(grad: torch.Tensor, x: torch.Tensor | None, need_w: bool,
                       need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients of ``F.linear(x, weight, bias)`` from the output gradient."""
    flat = grad.reshape(-1, grad.shape[-1])
    grad_w = flat.t() @ x.reshape(-1, x.shape[-1]).to(flat.dtype) if need_w else None
    grad_b = flat.sum(0) if need_b else None
    return grad_w, grad_b


class MesaLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` saving ``x`` in 8 bits (the weight is kept as is)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                packer: Packer) -> torch.Tensor:
        out = F.linear(x.to(weight.dtype), weight, bias)
        ctx.packed = packer(x) if ctx.needs_input_grad[1] else None
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = (grad @ weight).to(ctx.x_dtype) if need_x else None
        x_hat = unpack(ctx.packed, weight.dtype) if need_w else None
        grad_w, grad_b = linear_param_grads(grad, x_hat, need_w, ctx.has_bias and need_b)
        ctx.packed = None  # autograd frees saved tensors after backward, not attributes of ctx
        return grad_x, grad_w, grad_b, None


class GatedDownFn(torch.autograd.Function):
    """``F.linear(act(g) * u, weight, bias)`` saving only ``g`` and ``u`` in 8 bits.

    The product ``h`` (the down projection's input, heavy-tailed as a product of two
    projections) is neither saved nor quantized: backward rebuilds it from the 8-bit g and u,
    which keeps one tensor fewer and gives the down projection's weight gradient the
    resolution of g and u instead of that of one range stretched over h's tails.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, act: Callable, packers: Sequence[Packer]) -> torch.Tensor:
        out = F.linear(act(g) * u, weight, bias)
        ctx.act = act
        ctx.packed = [packers[0](g), packers[1](u)]
        ctx.dtypes = (g.dtype, u.dtype)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        need_g, need_u, need_w, need_b = ctx.needs_input_grad[:4]
        g, u = (unpack(p, dt).requires_grad_(n) for p, dt, n in zip(ctx.packed, ctx.dtypes, (need_g, need_u)))
        with torch.enable_grad():
            h = ctx.act(g) * u
        grad_w, grad_b = linear_param_grads(grad, h.detach(), need_w, ctx.has_bias and need_b)
        grad_g = grad_u = None
        if need_g or need_u:
            grad_h = (grad @ weight).to(h.dtype)
            targets = [t for t, n in ((g, need_g), (u, need_u)) if n]
            found = iter(torch.autograd.grad(h, targets, grad_h))
            grad_g = next(found) if need_g else None
            grad_u = next(found) if need_u else None
        ctx.packed = None
        return grad_g, grad_u, grad_w, grad_b, None, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class RecomputeFn(torch.autograd.Function):
    """``fn(*inputs)`` saving only 8-bit ``inputs``; backward recomputes ``fn`` on them.

    ``params`` are the parameters ``fn`` reads (so their gradients are routed back);
    ``fn`` must be a deterministic function of inputs and params, or ``keep_rng`` must be
    set so the forward's RNG state is replayed (attention dropout).
    """

    @staticmethod
    def forward(ctx, fn: Callable, packers: Sequence[Packer], keep_rng: bool, n_inputs: int,  # type: ignore[override]
                *tensors: torch.Tensor) -> torch.Tensor:
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        device = inputs[0].device
        ctx.fn = fn
        ctx.autocast = _autocast_state(device.type)
        ctx.device = device
        ctx.rng = None
        if keep_rng:
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        out = fn(*inputs)
        ctx.packed = [pack(x) for pack, x in zip(packers, inputs)]
        ctx.dtypes = [x.dtype for x in inputs]
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        xs = [unpack(p, dt).requires_grad_(bool(n)) for p, dt, n in zip(ctx.packed, ctx.dtypes, needs)]
        rng_ctx = contextlib.nullcontext()
        if ctx.rng is not None:
            devices = [ctx.device] if ctx.device.type == "cuda" else []
            rng_ctx = torch.random.fork_rng(devices=devices)
        device_type, enabled, dtype = ctx.autocast
        with rng_ctx, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same), \
                torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            out = ctx.fn(*xs)
        targets = [t for t, n in zip(list(xs) + list(params), needs) if n]
        found = iter(torch.autograd.grad(out, targets, grad, allow_unused=True))
        grads = [next(found) if n else None for n in needs]
        ctx.packed = ctx.fn = None
        return (None, None, None, None, *grads)


def _same(t: torch.Tensor) -> torch.Tensor:
    """Identity hook: shields the recompute from any outer saved-tensor hooks (generic mode)."""
    return t

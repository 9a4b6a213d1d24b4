"""Linear layer + cross-entropy over token chunks, never holding the full logits.

Forward computes, chunk by chunk, the logits of a few tokens, their log-sum-exp and the
loss, and keeps only the log-sum-exp (one float per token). Backward recomputes each
chunk's logits, turns them into ``softmax - onehot`` in place and accumulates the
gradients of the hidden states and of the head weight (the approach of Apple's Cut
Cross-Entropy; Liger's fused linear cross-entropy computes the gradients in forward
instead, which keeps a second copy of the weight gradient alive until backward).
The price is one extra head matmul per chunk in backward.
"""

from __future__ import annotations

import math

import torch


MIN_ROWS, MAX_SHARE = 128, 16
"""A chunk has at least min(128, tokens / 16) rows (a power of two, rounded down)."""


def auto_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: Liger's rule (the next power of two of tokens / ceil(vocab / hidden), so
    that one chunk's logits are about as large as the hidden states), but at least
    min(128, tokens / 16) rows. Backward adds each chunk's head-weight gradient into one (V, H)
    accumulator, a full pass over it per chunk: with chunks of a few rows that pass costs more than
    the matmuls (on CPU, at 1,024 tokens and vocabulary 32k, 8-row chunks took 7.7x the unchunked
    head's time, 64-row 1.2-1.8x). The floor keeps a chunk's logits at most 1/16 of the full ones."""
    rows = max(1, math.ceil(tokens / max(1, math.ceil(vocab / hidden))))
    floor = max(1, min(MIN_ROWS, tokens // MAX_SHARE))
    return max(1 << (rows - 1).bit_length(), 1 << (floor.bit_length() - 1))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits += bias.float()
    return logits


class _ChunkedLinearCE(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V) or None, targets (N)) -> mean loss (scalar, fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, z_loss, denominator):  # noqa: D102
        n = hidden.shape[0]
        valid = targets != ignore_index
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logits = _chunk_logits(hidden[s:e], weight, bias)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            t, v = targets[s:e], valid[s:e]
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            del logits
            nll += torch.where(v, chunk_lse - picked, 0.0).sum()
            if z_loss:
                z += torch.where(v, chunk_lse * chunk_lse, 0.0).sum()
            lse[s:e] = chunk_lse
        if denominator is None:
            denominator = valid.sum().clamp(min=1).to(torch.float32)
        else:
            denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, denominator)
        ctx.chunk_size, ctx.ignore_index, ctx.z_loss = chunk_size, ignore_index, z_loss
        return (nll + z_loss * z) / denominator

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, bias, targets, lse, denominator = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, z_loss = hidden.shape[0], ctx.z_loss
        scale = (grad_out.float() / denominator)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            h, t, chunk_lse = hidden[s:e], targets[s:e], lse[s:e]
            v = t != ctx.ignore_index
            # d loss / d logits = coef * (softmax * (1 + 2 z lse) - onehot(target)), coef = valid / denominator
            coef = v.to(torch.float32) * scale
            grad = _chunk_logits(h, weight, bias)
            grad.sub_(chunk_lse.unsqueeze(1)).exp_()
            row = coef * (1.0 + 2.0 * z_loss * chunk_lse) if z_loss else coef
            grad.mul_(row.unsqueeze(1))
            rows = torch.arange(e - s, device=grad.device)
            grad[rows, t.clamp(min=0)] -= coef
            if grad_b is not None:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:e] = grad @ weight.to(hidden.dtype)
            if grad_w is not None:  # accumulated in place: no (V, H) temporary per chunk
                if grad.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)
                else:
                    grad_w += (grad.t() @ h).float()
            del grad
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, chunk_size: int = 0, ignore_index: int = -100,
                                 z_loss: float = 0.0, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without the full logits.

    ``hidden`` is (..., H) and ``targets`` the matching (...) token ids; targets equal to
    ``ignore_index`` count for nothing. The loss is divided by the number of counted
    targets, or by ``num_items`` when given (HF's ``num_items_in_batch`` for gradient
    accumulation). ``z_loss`` adds ``z_loss * mean(logsumexp^2)`` (PaLM's auxiliary loss).
    ``chunk_size`` 0 picks one with ``auto_chunk_size``. Under autocast the matmuls run in the
    autocast dtype, the softmax and the loss in fp32, as HF's head and loss do.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match: "
                         "targets need one id per hidden vector")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head weight {tuple(weight.shape)} does not fit hidden size {hidden.shape[-1]}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    if chunk_size <= 0:
        chunk_size = auto_chunk_size(h.shape[0], weight.shape[1], weight.shape[0])
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != h.dtype:
        h = h.to(weight.dtype)
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearCE.apply(h, weight, bias, t, chunk_size, ignore_index, float(z_loss), num_items)

"""The LM head and loss alone under MemTracker: what chunking saves, measured one way for tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memwise_chunked_ce.function import chunked_linear_cross_entropy


def head_loss_peaks(tokens: int, hidden: int, vocab: int, chunk_size: int = 0) -> tuple[int, int]:
    """Peak bytes of HF's path (linear + cross-entropy) and of the chunked one (``chunk_size`` 0: auto),
    each above what both hold (hidden states, the weight and their gradients), on the CPU."""
    from memwise.memory import _tracker

    def peak(loss) -> int:
        torch.manual_seed(0)
        h = torch.randn(tokens, hidden, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(vocab, hidden) / hidden ** 0.5)
        t = torch.randint(0, vocab, (tokens,))
        mt = _tracker()
        mt.track_external(w, h, t)
        with mt:
            loss(h, w, t).backward()
        held = sum(x.numel() * x.element_size() for x in (h, w, h.grad, w.grad))
        return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - held

    base = peak(lambda h, w, t: F.cross_entropy(F.linear(h, w), t))
    chunked = peak(lambda h, w, t: chunked_linear_cross_entropy(h, w, t, chunk_size=chunk_size))
    return base, chunked

"""memwise.saved: the Functions compute what autograd computes from what the codec gives back, and
an input read by several layers is packed once."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from memwise.saved import SHARED, SavedGatedLinear, SavedLinear, SavedRecompute, SharedCache, shared


class Half:
    """A test codec: fp16 copies, counting its packs."""

    share_key = "half"

    def __init__(self) -> None:
        self.packs = 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        self.packs += 1
        return x.detach().to(torch.float16)

    def unpack(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return packed.to(dtype)

    def nbytes(self, packed: torch.Tensor) -> int:
        return packed.numel() * packed.element_size()


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).half().float().requires_grad_() for s in shapes]  # fp16-exact values


def grads(out, tensors):
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    found = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return found


def test_linear_gradients_are_autograd_on_the_decoded_input():
    x, w, b = leaves((3, 5, 8), (6, 8), (6,))
    codec = Half()
    out = SavedLinear.apply(x, w, b, codec)
    assert torch.equal(out, F.linear(x, w, b))
    ours = grads(out, [x, w, b])
    ref = grads(F.linear(x, w, b), [x, w, b])
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    assert codec.packs == 1


def test_linear_with_a_frozen_weight_packs_nothing():
    x, = leaves((4, 8))
    w = torch.randn(6, 8)
    codec = Half()
    SavedLinear.apply(x, w, None, codec).sum().backward()
    assert codec.packs == 0 and torch.allclose(x.grad, w.sum(0).expand(4, 8))


def test_recompute_routes_parameter_gradients_and_replays_rng():
    x, weight = leaves((4, 16), (16,))
    codec = Half()

    def fn(a):
        return F.dropout(F.layer_norm(a, (16,), weight), p=0.5, training=True)

    torch.manual_seed(3)
    out = SavedRecompute.apply(fn, [codec], True, 1, x, weight)
    ours = grads(out, [x, weight])
    torch.manual_seed(3)
    ref = grads(fn(x), [x, weight])
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_gated_linear_keeps_g_and_u_only():
    g, u, w = leaves((2, 3, 8), (2, 3, 8), (4, 8))
    codecs = [Half(), Half()]
    out = SavedGatedLinear.apply(g, u, w, None, F.silu, codecs)
    assert torch.equal(out, F.linear(F.silu(g) * u, w))
    ours = grads(out, [g, u, w])
    ref = grads(F.linear(F.silu(g) * u, w), [g, u, w])
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert [c.packs for c in codecs] == [1, 1]


def test_shared_codec_saves_one_copy_for_q_k_v():
    cache, codec = SharedCache(), Half()
    x, = leaves((2, 4, 8))
    weights = leaves((8, 8), (4, 8), (4, 8), seed=1)
    outs = [SavedLinear.apply(x, w, None, shared(codec, cache)) for w in weights]
    packed = [o.grad_fn.packed for o in outs]
    assert codec.packs == 1 and packed[0] is packed[1] is packed[2] and cache.live() == 1
    assert codec.nbytes(packed[0]) == x.numel() * 2
    x.data.add_(0)  # the same tensor, unchanged: still shared
    x2 = x.detach().clone().requires_grad_()
    SavedLinear.apply(x2, weights[0], None, shared(codec, cache))
    assert codec.packs == 2 and cache.live() == 2  # another tensor, its own copy
    with torch.no_grad():
        x.mul_(2)  # changed in place: packed again
    SavedLinear.apply(x, weights[0], None, shared(codec, cache))
    assert codec.packs == 3
    del outs, packed, x, x2
    gc.collect()
    assert cache.live() == 0


def test_the_process_wide_cache_forgets_dead_tensors():
    codec = Half()
    before = SHARED.live()
    x, w = leaves((3, 8), (2, 8))
    out = SavedLinear.apply(x, w, None, shared(codec))
    assert SHARED.live() == before + 1
    del out, x
    gc.collect()
    assert SHARED.live() == before


def test_packed_store_takes_every_packed_tensor_and_gives_it_back():
    from dataclasses import dataclass

    from memwise.saved import packed_store

    @dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor
        tag: str = "pair"

    class PairCodec(Half):
        def pack(self, x):
            self.packs += 1
            return Pair(x.detach().half(), torch.ones(1))

        def unpack(self, packed, dtype):
            assert isinstance(packed.a, torch.Tensor) and packed.tag == "pair"
            return packed.a.to(dtype)

    x, w, b, g, u, w2 = leaves((3, 5, 8), (6, 8), (6,), (3, 5, 8), (3, 5, 8), (6, 8))
    want = [grads(SavedLinear.apply(x, w, b, PairCodec()), [x, w, b]),
            grads(SavedGatedLinear.apply(g, u, w2, None, F.silu, [PairCodec(), PairCodec()]), [g, u, w2]),
            grads(SavedRecompute.apply(torch.sin, [PairCodec()], False, 1, x), [x])]
    kept, back = [], []

    def pack(t):
        kept.append(t.clone())
        return len(kept) - 1  # the store holds the bytes; ctx only an index

    def unpack(i):
        back.append(i)
        return kept[i]

    with packed_store(pack, unpack):
        outs = [SavedLinear.apply(x, w, b, PairCodec()), SavedGatedLinear.apply(g, u, w2, None, F.silu,
                                                                                 [PairCodec(), PairCodec()]),
                SavedRecompute.apply(torch.sin, [PairCodec()], False, 1, x)]
    assert len(kept) == 2 * 4  # two tensors in each of the four packed forms
    got = [grads(outs[0], [x, w, b]), grads(outs[1], [g, u, w2]), grads(outs[2], [x])]
    assert sorted(back) == list(range(8))
    for a, b_ in zip(got, want):
        assert all(torch.equal(p, q) for p, q in zip(a, b_))
    with packed_store(pack, unpack), packed_store(lambda t: t, lambda t: t):  # the innermost store applies
        SavedLinear.apply(x, w, b, PairCodec())
    assert len(kept) == 8


def test_gated_linear_backward_holds_five_intermediate_tensors_at_most():
    """Its backward's worst moment, measured: five (tokens, intermediate) tensors beside the incoming
    gradient and the weight's gradient (autograd on ``act(g) * u`` held seven)."""
    from torch import nn

    from memwise.memory import measure_step

    tokens, inter, hidden = 256, 96, 32
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))
    m = nn.ModuleDict({"gate": nn.Linear(hidden, inter, bias=False), "up": nn.Linear(hidden, inter, bias=False),
                       "down": nn.Linear(inter, hidden, bias=False)})

    def loss():
        g, u = m["gate"](x), m["up"](x)
        return SavedGatedLinear.apply(g, u, m["down"].weight, None, F.silu, [Half(), Half()]).square().mean()

    report = measure_step(m, torch.optim.SGD(m.parameters(), lr=0.0), loss)
    assert report.category_max["temporaries"] == 4 * (5 * tokens * inter + tokens * hidden + hidden * inter)


def test_gated_linear_gradients_are_autograd_bitwise_in_fp32_and_bf16():
    """The hand-written product rule does autograd's operations on ``act(g) * u``, so the same bits."""
    for dtype in (torch.float32, torch.bfloat16):
        g, u, w = [t.detach().to(dtype).requires_grad_() for t in leaves((2, 3, 8), (2, 3, 8), (4, 8), seed=1)]
        ours = grads(SavedGatedLinear.apply(g, u, w, None, F.silu, [Half(), Half()]), [g, u, w])
        ref = grads(F.linear(F.silu(g) * u, w), [g, u, w])
        assert all(torch.equal(a, r) for a, r in zip(ours, ref)), dtype

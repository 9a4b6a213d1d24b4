"""Tensors saved for backward in a compact form: the codec interface, the autograd Functions that use it,
and one cache for an input that several layers save.

A plugin that stores activations differently (Mesa's 8-bit ranges, COAT's FP8) writes a
``Codec``; the Functions here are the exact baseline computation in forward and keep only
``codec.pack(input)`` for backward, which works on ``codec.unpack(packed, dtype)``:

- ``SavedLinear``: ``F.linear(x, weight, bias)``, backward straight from the decoded input.
- ``SavedRecompute``: ``fn(*inputs)`` for norms, activations, attention: backward re-runs ``fn``
  on the decoded inputs (autocast and, when asked, RNG state replayed) and backpropagates.
- ``SavedGatedLinear``: a gated MLP's ``F.linear(act(g) * u, weight, bias)`` keeping g and u only.

``shared(codec)`` packs through ``SHARED``, so a tensor read by several layers (a norm's
output feeding q, k and v) is stored once.

The packed forms are kept on ``ctx``, where torch's saved-tensor hooks never see them; a plugin
that moves saved tensors elsewhere (offload) also enters ``packed_store(pack, unpack)``, through
which the tensors of every packed form kept while it is active go in forward and come back in
backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Codec(Protocol):
    """How one saved tensor is stored: ``pack`` in forward, ``unpack`` in backward, ``nbytes`` of a pack.

    ``share_key``: packs of one tensor by codecs with the same key are interchangeable (the
    shared cache reuses them); None means never share.
    """

    share_key: Hashable | None

    def pack(self, x: torch.Tensor) -> Any: ...

    def unpack(self, packed: Any, dtype: torch.dtype) -> torch.Tensor: ...

    def nbytes(self, packed: Any) -> int: ...


class SharedCache:
    """The packed form of each live tensor, reused while the tensor is unchanged (same version counter).

    Keyed by the tensor's identity; an entry vanishes with its tensor. A pack by a codec with
    another ``share_key`` replaces the entry.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, Hashable, Any]] = {}

    def pack(self, codec: Codec, x: torch.Tensor) -> Any:
        key = id(x)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is x and entry[1] == x._version and entry[2] == codec.share_key:
            return entry[3]
        packed = codec.pack(x)
        ref = weakref.ref(x, lambda r, k=key: self._forget(k, r))
        self._entries[key] = (ref, x._version, codec.share_key, packed)
        return packed

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]

    def live(self) -> int:
        """How many live tensors have a packed copy here."""
        return sum(1 for ref, *_ in self._entries.values() if ref() is not None)


SHARED = SharedCache()
"""The process-wide cache the layer conversions share (one packed copy per input tensor)."""


class _Shared:
    """A codec whose packs go through a shared cache."""

    def __init__(self, codec: Codec, cache: SharedCache) -> None:
        self.codec, self.cache, self.share_key = codec, cache, codec.share_key

    def pack(self, x: torch.Tensor) -> Any:
        return self.cache.pack(self.codec, x)

    def unpack(self, packed: Any, dtype: torch.dtype) -> torch.Tensor:
        return self.codec.unpack(packed, dtype)

    def nbytes(self, packed: Any) -> int:
        return self.codec.nbytes(packed)


def shared(codec: Codec, cache: SharedCache = SHARED) -> Codec:
    """``codec`` with one pack per input tensor, however many layers save it."""
    return _Shared(codec, cache)


def saving(x: torch.Tensor, module: nn.Module) -> bool:
    """True when this call records a graph that will save activations of ``module``."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False))


def with_autocast_weights(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: Callable) -> Any:
    """``fn(weight, bias)``, under autocast with both cast to its dtype and autocast off inside
    (as ``F.linear`` under autocast computes), otherwise as they are."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return fn(weight, bias)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        return fn(weight.to(dtype), bias.to(dtype) if bias is not None else None)


def linear_param_grads(grad: torch.Tensor, x: torch.Tensor | None, need_w: bool,
                       need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients of ``F.linear(x, weight, bias)`` from the output gradient."""
    flat = grad.reshape(-1, grad.shape[-1])
    grad_w = flat.t() @ x.reshape(-1, x.shape[-1]).to(flat.dtype) if need_w else None
    grad_b = flat.sum(0) if need_b else None
    return grad_w, grad_b


_STORES = threading.local()


@contextlib.contextmanager
def packed_store(pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor]):
    """While active (in this thread), every tensor inside a packed form that the Functions here keep
    for backward goes through ``pack`` in forward, and what ``pack`` returned through ``unpack`` in
    backward: what ``torch.autograd.graph.saved_tensors_hooks`` does for ``save_for_backward``,
    for the packed forms kept on ``ctx``. The innermost store applies."""
    stack = _STORES.__dict__.setdefault("stack", [])
    stack.append((pack, unpack))
    try:
        yield
    finally:
        stack.pop()


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A tensor of a packed form as a store's ``pack`` returned it, with the store's ``unpack``."""

    value: Any
    unpack: Callable[[Any], torch.Tensor]


def _map_tensors(obj: Any, fn: Callable[[Any], Any], match: type) -> Any:
    """``obj`` with every ``match`` inside lists, tuples, dicts and dataclass fields replaced by
    ``fn(it)``; ``obj`` itself (not a copy) where it holds none."""
    if isinstance(obj, match):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [_map_tensors(o, fn, match) for o in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    if isinstance(obj, dict):
        items = {k: _map_tensors(v, fn, match) for k, v in obj.items()}
        return obj if all(items[k] is v for k, v in obj.items()) else items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn, match) for f in dataclasses.fields(obj) if f.init}
        same = all(v is getattr(obj, k) for k, v in changes.items())
        return obj if same else dataclasses.replace(obj, **changes)
    return obj


def stash(packed: Any) -> Any:
    """``packed`` as the active store keeps it (unchanged when none is active)."""
    stack = getattr(_STORES, "stack", None)
    if not stack or packed is None:
        return packed
    pack, unpack = stack[-1]
    return _map_tensors(packed, lambda t: _Stored(pack(t), unpack), torch.Tensor)


def unstash(packed: Any) -> Any:
    """The packed form ``stash`` was given, its tensors brought back by their store."""
    return _map_tensors(packed, lambda s: s.unpack(s.value), _Stored)


def _keep(ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, packed: Any, dtype: Any) -> None:
    """What a saved linear keeps: its packed input(s) (through the active ``packed_store``, if any) and
    their dtype(s), whether it has a bias, and the weight (through ``save_for_backward``, so autograd
    checks it was not changed in place)."""
    ctx.packed, ctx.dtype, ctx.has_bias = stash(packed), dtype, bias is not None
    ctx.save_for_backward(weight)


def _release(ctx: Any) -> tuple[torch.Tensor, Any, Any]:
    """The weight, the packed input(s) and their dtype(s); ``ctx`` lets go of the packed bytes at once."""
    (weight,) = ctx.saved_tensors
    packed, ctx.packed = ctx.packed, None
    return weight, unstash(packed), ctx.dtype


class SavedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` keeping ``codec.pack(x)`` (only when the weight needs a gradient).

    ``grad_codec``: when given, the output gradient is rounded through it before use (COAT's
    FP8 gradients). Under autocast the input keeps its dtype and ``F.linear`` casts as usual.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                codec: Codec, grad_codec: Codec | None = None) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        out = F.linear(x if autocast else x.to(weight.dtype), weight, bias)
        ctx.codec, ctx.grad_codec = codec, grad_codec
        _keep(ctx, weight, bias, codec.pack(x) if ctx.needs_input_grad[1] else None, x.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        weight, packed, x_dtype = _release(ctx)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.grad_codec is not None:
            grad = ctx.grad_codec.unpack(ctx.grad_codec.pack(grad), grad.dtype)
        grad_x = (grad @ weight.to(grad.dtype)).to(x_dtype) if need_x else None
        x_hat = ctx.codec.unpack(packed, grad.dtype) if need_w else None
        grad_w, grad_b = linear_param_grads(grad, x_hat, need_w, ctx.has_bias and need_b)
        return grad_x, grad_w, grad_b, None, None


class SavedGatedLinear(torch.autograd.Function):
    """``F.linear(act(g) * u, weight, bias)`` keeping only ``g`` and ``u`` packed.

    The product ``h`` (the down projection's input, heavy-tailed as a product of two
    projections) is neither saved nor packed: backward rebuilds it from the decoded g and u,
    which keeps one tensor fewer and gives the weight gradient the resolution of g and u.
    """

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, act: Callable, codecs: Sequence[Codec]) -> torch.Tensor:
        out = F.linear(act(g) * u, weight, bias)
        ctx.act, ctx.codecs = act, codecs
        _keep(ctx, weight, bias, [codecs[0].pack(g), codecs[1].pack(u)], (g.dtype, u.dtype))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        """The product rule by hand, each (tokens, intermediate) tensor freed once used: at most five
        live at once (g, u, act(g), grad_h and grad_u, then grad_a and the recomputed act's
        gradient) instead of seven under autograd on ``act(g) * u``; the same operations, so the
        same gradients."""
        weight, packed, dtypes = _release(ctx)
        need_g, need_u, need_w, need_b = ctx.needs_input_grad[:4]
        g, u = (c.unpack(p, dt) for c, p, dt in zip(ctx.codecs, packed, dtypes))
        del packed
        a = ctx.act(g)
        h = a * u
        grad_w, grad_b = linear_param_grads(grad, h, need_w, ctx.has_bias and need_b)
        dtype = h.dtype
        del h
        grad_g = grad_u = None
        if need_g or need_u:
            grad_h = (grad @ weight).to(dtype)
            grad_u = (grad_h * a).to(u.dtype) if need_u else None
            del a
            if need_g:
                grad_a = (grad_h * u).to(g.dtype)
                del grad_h, u
                with torch.enable_grad():
                    x = g.requires_grad_()
                    (grad_g,) = torch.autograd.grad(ctx.act(x), x, grad_a)
        return grad_g, grad_u, grad_w, grad_b, None, None


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class SavedRecompute(torch.autograd.Function):
    """``fn(*inputs)`` keeping only the packed ``inputs``; backward recomputes ``fn`` on them.

    ``params`` (the tensors after the first ``n_inputs``) are what ``fn`` reads besides its
    inputs, kept as they are so their gradients are routed back; ``fn`` must be a
    deterministic function of inputs and params, or ``keep_rng`` must be set so the forward's
    RNG state is replayed (attention dropout).
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable, codecs: Sequence[Codec], keep_rng: bool,  # type: ignore[override]
                n_inputs: int, *tensors: torch.Tensor) -> torch.Tensor:
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        device = inputs[0].device
        ctx.fn, ctx.codecs = fn, codecs
        ctx.autocast = _autocast_state(device.type)
        ctx.device = device
        ctx.rng = None
        if keep_rng:
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        out = fn(*inputs)
        ctx.packed = stash([codec.pack(x) for codec, x in zip(codecs, inputs)])
        ctx.dtypes = [x.dtype for x in inputs]
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        packed, ctx.packed = unstash(ctx.packed), None
        xs = [c.unpack(p, dt).requires_grad_(bool(n))
              for c, p, dt, n in zip(ctx.codecs, packed, ctx.dtypes, needs)]
        del packed
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
        return (None, None, None, None, *grads)


def _same(t: torch.Tensor) -> torch.Tensor:
    """Identity hook: shields the recompute from any outer saved-tensor hooks."""
    return t

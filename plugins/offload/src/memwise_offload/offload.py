"""Saved-activation offload per decoder layer (MEMO-style swap + recompute), on saved-tensor hooks.

For each chosen layer, the tensors its forward saves for backward are copied into host
buffers that are allocated once and reused every step (pinned on CUDA), and brought back
when backward reaches that layer; while layer i runs backward, layers i-1 .. i-prefetch
are already being fetched, whole (the first layer in backward comes back whole at its first
unpack). With prefetch 0 nothing is fetched ahead: each storage comes back when backward first
reads it. On CUDA the copies run on a side stream ordered by events; on
CPU the same code runs with the host as the "device" (the copies are then synchronous),
so every test runs here.

Token-wise split (MEMO): ``fraction`` of each chosen layer's tokens have their activations
swapped to host; the layer is recomputed in backward for the others, keeping only their
input. Tokens are split by whole sequences (rows of the batch), so that no layer needs to
be cut inside a sequence: attention mixes a sequence's tokens, rows are independent. With
batch b the split has steps of 1/b (it rounds to the nearest row).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import checkpoint

from memwise import NoEffectWarning, surgery
from memwise.memory import HOST
from memwise.saved import packed_store

OWNER = "offload"
_MARK = "_memwise_offload"  # the model's Offloader


def _untracked() -> Any:
    """Host-side work (buffers, device-to-host copies) outside any dispatch mode: on CPU a memory
    tracker would otherwise count host buffers as device memory."""
    return _disable_current_modes()


class HostPool:
    """Host buffers by (layer slot, ordinal), reused across steps while their size matches."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        weakref.finalize(self, _release, self.buffers)

    def get(self, slot: int, ordinal: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, ordinal)
        buf = self.buffers.get(key)
        if buf is not None and buf.shape == like.shape and buf.dtype == like.dtype:
            return buf
        with _untracked():
            if buf is not None:
                HOST.release(buf.untyped_storage().nbytes())
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pin)
        HOST.add(buf.untyped_storage().nbytes())
        self.buffers[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self.buffers.values())

    def clear(self) -> None:
        _release(self.buffers)


def _release(buffers: dict) -> None:
    """Give the pool's bytes back to the host ledger (also when the pool is garbage collected)."""
    for buf in buffers.values():
        HOST.release(buf.untyped_storage().nbytes())
    buffers.clear()


@dataclass
class _Saved:
    """One storage in host memory (the bytes behind every view of it that backward needs);
    ``device`` holds it once fetched, until its last unpack."""

    host: torch.Tensor  # uint8, the storage's bytes
    device_type: torch.device
    uses: int = 1
    device: torch.Tensor | None = None
    ready: Any = None  # CUDA event of the host-to-device copy


@dataclass(frozen=True)
class _View:
    """A saved tensor as a view of an offloaded storage."""

    storage: _Saved
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int


@dataclass(frozen=True)
class _Recast:
    """A saved cast of a parameter (autocast's copy of a weight), or a view of one (the transposed
    weight a matmul keeps): cast again when unpacked."""

    param: torch.Tensor
    version: int
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int


_CASTS = ("ToCopyBackward0", "_ToCopyBackward0")


def parameter_cast_of(t: torch.Tensor, params: set[int]) -> torch.Tensor | None:
    """The parameter that ``t`` is a whole-tensor dtype cast of (autograd records it as a copy node
    whose input is the parameter's gradient accumulator), or None."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ not in _CASTS or len(fn.next_functions) != 1:
        return None
    acc = fn.next_functions[0][0]
    param = getattr(acc, "variable", None)
    if param is None or param.untyped_storage().data_ptr() not in params:
        return None
    if param.shape != t.shape or not t.is_contiguous() or param.dtype == t.dtype:
        return None
    return param


@dataclass
class _Group:
    """The saved tensors of one layer call."""

    slot: int
    saved: list[_Saved] = field(default_factory=list)
    by_storage: dict[int, tuple[Any, _Saved]] = field(default_factory=dict)  # data_ptr -> (weakref, saved)
    pending: int = 0  # unpacks still to come in backward


class Offloader:
    """Packs and unpacks saved tensors of the wrapped layers; one per model.

    Offload works per storage: several views of one tensor saved by different ops (a
    linear's 3-D input and its 2-D reshape) are copied once, and come back as views with
    their own shapes and strides, so backward reads exactly the bytes it would have read.
    """

    def __init__(self, model: torch.nn.Module, prefetch: int = 1) -> None:
        self.prefetch = prefetch
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        cuda = any(p.is_cuda for p in model.parameters())
        self.pool = HostPool(pin=cuda)
        self.stream = torch.cuda.Stream() if cuda else None
        self.groups: list[_Group] = []

    # --- forward --------------------------------------------------------------------------

    def begin_layer(self) -> _Group:
        if self.groups and all(g.pending == 0 for g in self.groups):
            self.groups.clear()  # the previous step's backward consumed everything: a new step
        group = _Group(slot=len(self.groups))
        self.groups.append(group)
        return group

    def hooks(self, group: _Group) -> contextlib.ExitStack:
        """Saved-tensor hooks, and the same pair as the packed store of memwise.saved, so that the
        packed forms other plugins keep on ``ctx`` (Mesa's 8-bit payloads) are offloaded too."""
        pack, unpack = functools.partial(self._pack, group), functools.partial(self._unpack, group)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        stack.enter_context(packed_store(pack, unpack))
        return stack

    def _pack(self, group: _Group, t: torch.Tensor) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params or t.device.type == "meta" or ptr == 0:
            return t  # weights (and empty tensors) stay where they are
        param = parameter_cast_of(t if t._base is None else t._base, self.params)
        if param is not None:
            group.pending += 1
            return _Recast(param, param._version, t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        known = group.by_storage.get(ptr)
        # the weak reference proves the storage is still the one copied (not a new one at a freed address)
        if known is not None and known[0]() is not None:
            saved = known[1]
            saved.uses += 1
        else:
            with _untracked():
                flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
            host = self.pool.get(group.slot, len(group.saved), flat)
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(flat, non_blocking=True)
                t.record_stream(self.stream)  # t's memory is not reused before the copy has read it
            else:
                with _untracked():
                    host.copy_(flat)
            saved = _Saved(host, t.device)
            group.saved.append(saved)
            group.by_storage[ptr] = (weakref.ref(t), saved)
        group.pending += 1
        return _View(saved, t.dtype, tuple(t.shape), t.stride(), t.storage_offset())

    # --- backward -------------------------------------------------------------------------

    def _fetch(self, group: _Group) -> None:
        for saved in group.saved:
            if saved.device is None and saved.uses > 0:
                self._bring(saved)

    def _bring(self, saved: _Saved) -> None:
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                saved.device = torch.empty_like(saved.host, device=saved.device_type)
                saved.device.copy_(saved.host, non_blocking=True)
                saved.ready = torch.cuda.Event()
                saved.ready.record(self.stream)
            saved.device.record_stream(torch.cuda.current_stream(saved.device_type))
        else:
            saved.device = torch.empty_like(saved.host, device=saved.device_type)
            saved.device.copy_(saved.host)

    def _unpack(self, group: _Group, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _Recast):
            return self._recast(group, packed)
        saved = packed.storage
        if saved.device is None and self.prefetch == 0:
            # nothing is fetched ahead: each storage comes back when backward first reads it (the MLP's
            # backward then does not hold the attention's tensors as well)
            self._bring(saved)
        elif saved.device is None:
            self._fetch(group)
        index = self.groups.index(group) if group in self.groups else -1
        for ahead in range(1, self.prefetch + 1):
            if index - ahead >= 0:
                self._fetch(self.groups[index - ahead])
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device_type).wait_event(saved.ready)
        out = saved.device.view(packed.dtype).as_strided(packed.shape, packed.stride, packed.offset)
        saved.uses -= 1
        group.pending -= 1
        if saved.uses == 0:
            saved.device = None  # autograd holds the view while the node that needs it runs
        return out

    def _recast(self, group: _Group, packed: _Recast) -> torch.Tensor:
        if packed.param._version != packed.version:
            raise RuntimeError("offload: a parameter whose low-precision copy a layer saved for backward was "
                               "changed in place between forward and backward; offload casts it again in "
                               "backward, which would differ from what forward used. Update parameters after "
                               "backward (not inside it), or remove offload")
        group.pending -= 1
        return packed.param.detach().to(packed.dtype).as_strided(packed.shape, packed.stride, packed.offset)


def _slice_rows(value: Any, start: int, stop: int, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, tuple):
        return tuple(_slice_rows(v, start, stop, rows) for v in value)
    if isinstance(value, list):
        return [_slice_rows(v, start, stop, rows) for v in value]
    return value


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


def _without_cache(kwargs: dict) -> dict:
    """Recomputing (or splitting) a layer would write its keys and values into a KV cache twice;
    in training the cache serves nothing, so, as HF does under gradient checkpointing, it is dropped."""
    if not any(kwargs.get(k) is not None for k in _CACHE_KEYS):
        return kwargs
    warnings.warn("offload: the KV cache passed to recomputed decoder layers is ignored in training "
                  "(call the model with use_cache=False)", stacklevel=4)
    return {k: (None if k in _CACHE_KEYS else v) for k, v in kwargs.items()}


def _join_rows(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, tuple) and a and isinstance(a[0], torch.Tensor):
        return (torch.cat([a[0], b[0]], dim=0), *a[1:])
    raise TypeError(f"offload cannot join a decoder layer's outputs of type {type(a).__name__}")


def _offloaded(layer: torch.nn.Module, forward: Any, offloader: Offloader, fraction: float,
               hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if not (layer.training and torch.is_grad_enabled()):
        return forward(hidden, *args, **kwargs)
    rows = hidden.shape[0]
    swap = min(rows, max(0, round(fraction * rows)))
    if swap < rows:
        kwargs = _without_cache(kwargs)

    def swapped(start: int, stop: int) -> Any:
        group = offloader.begin_layer()
        a, kw = _slice_rows((hidden, *args), start, stop, rows), _slice_rows(kwargs, start, stop, rows)
        if stop - start < rows:  # its own storage: offload copies storages, not just the rows a view shows
            a = (a[0].clone(), *a[1:])
        with offloader.hooks(group):
            return forward(*a, **kw)

    def recomputed(start: int, stop: int) -> Any:
        a, kw = _slice_rows((hidden, *args), start, stop, rows), _slice_rows(kwargs, start, stop, rows)
        return checkpoint(forward, *a, use_reentrant=False, **kw)

    if swap == rows:
        return swapped(0, rows)
    if swap == 0:
        return recomputed(0, rows)
    return _join_rows(swapped(0, swap), recomputed(swap, rows))


def apply_offload(model: torch.nn.Module, layers: Any = "all", fraction: float = 1.0,
                  prefetch: int = 1) -> list[str]:
    """Offload the chosen decoder layers' saved activations to host (``fraction`` of the rows;
    the rest recomputed); returns the names newly wrapped (idempotent: warns when none)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"offload fraction must be in [0, 1], got {fraction}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be 0 or more layers, got {prefetch}")
    offloader = getattr(model, _MARK, None)
    if offloader is None:
        offloader = Offloader(model, prefetch)
    wrapped = []
    for name, layer in surgery.select_layers(model, layers):
        if surgery.wrapped_by(layer, OWNER):
            continue
        surgery.wrap_forward(layer, OWNER, _offloaded, offloader, fraction)
        wrapped.append(name)
    if wrapped:
        setattr(model, _MARK, offloader)
    else:
        warnings.warn("apply_offload changed nothing: the chosen layers were already offloaded",
                      NoEffectWarning, stacklevel=2)
    return wrapped


def offloader_of(model: torch.nn.Module) -> Offloader | None:
    """The model's offloader (its host pool), or None."""
    return getattr(model, _MARK, None)


def remove_offload(model: torch.nn.Module) -> list[str]:
    """Undo ``apply_offload`` and free the host buffers; returns the names unwrapped."""
    removed = surgery.restore(model, OWNER)
    offloader = getattr(model, _MARK, None)
    if offloader is not None:
        offloader.pool.clear()
        delattr(model, _MARK)
    return removed

"""Memory by category: predicted (``explain``) and measured (a probe step with MemTracker).

Categories: parameters (with buffers), gradients, optimizer state, activations (saved for
backward), KV cache, temporaries, and host: bytes a plugin keeps in host memory on the
device's behalf (offloaded activations), which are not device memory and not in the total.
Measured on CPU exactly with MemTracker on one plain PyTorch step outside Lightning's
closure; on CUDA also the allocator's statistics; host from the ``HOST`` ledger that
offloading plugins keep.
"""

from __future__ import annotations

import contextlib
import gc
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

DEVICE_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "kv_cache", "temporaries")
CATEGORIES = (*DEVICE_CATEGORIES, "host")


@dataclass
class ByCategory:
    """Bytes per memory category."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    kv_cache: int = 0
    temporaries: int = 0
    host: int = 0

    def as_dict(self) -> dict[str, int]:
        return {c: int(getattr(self, c)) for c in CATEGORIES}


@dataclass
class Transients:
    """Short-lived bytes inside one decoder layer, or the optimizer step, that no category holds at
    the end of forward.

    Plugins whose layers rebuild their saved inputs in their own backward (FP8 or 8-bit
    activations) peak inside a layer rather than at the start of backward; the planner
    (``memwise.planner.predict_peak``) places these on top of what is saved at that point.
    """

    layer_backward: int = 0
    """beyond the saved activations and the parameter gradients, at the worst moment of the last
    decoder layer's backward: the unpacked copies, what is recomputed from them, the incoming
    gradient and the gradients of the layer's inputs"""
    layer_forward: int = 0
    """beyond the saved activations, at the worst moment of the last decoder layer's forward: the
    tensors it reads and writes and the packing code's workspace"""

    optimizer_step: int = 0
    """beyond the gradients, at the worst moment of the optimizer step, where a plugin's optimizer
    declares it; 0: torch AdamW's single-tensor step, two temporaries of the largest parameter"""

    def transients(self) -> dict[str, int]:
        return {"layer_backward": self.layer_backward, "layer_forward": self.layer_forward,
                "optimizer_step": self.optimizer_step}


@dataclass
class OutsideLayers:
    """Of the activations, the part saved outside the decoder layers (embeddings, final norm, head,
    loss), so that a plugin working per layer (offload, the planner's walk down the layers) finds what
    each layer still saves after the plugins before it, whatever they did to the loss side."""

    outside_layers: int = 0


@dataclass
class MemoryDelta(ByCategory, Transients, OutsideLayers):
    """A plugin's predicted change per category, in signed bytes, with a short reason; the transients
    its layers add (absolute bytes, not a change); and how much of its activations change is outside
    the decoder layers (chunked cross-entropy's all of it)."""

    note: str = ""


@dataclass
class MemoryEstimate(ByCategory, Transients, OutsideLayers):
    """Predicted bytes per category, the transients inside a layer (the largest any plugin declares)
    and the activations outside the decoder layers."""

    def apply(self, delta: MemoryDelta | None) -> MemoryEstimate:
        if delta is None:
            return MemoryEstimate(**self.as_dict(), **self.transients(), outside_layers=self.outside_layers)
        return MemoryEstimate(**{c: getattr(self, c) + getattr(delta, c) for c in CATEGORIES},
                              **{k: max(v, getattr(delta, k)) for k, v in self.transients().items()},
                              outside_layers=self.outside_layers + delta.outside_layers)

    @property
    def layer_activations(self) -> int:
        """What the decoder layers save, all together."""
        return max(0, self.activations - self.outside_layers)

    @property
    def total(self) -> int:
        """Device bytes (host memory is not counted)."""
        return sum(getattr(self, c) for c in DEVICE_CATEGORIES)


class HostLedger:
    """Host bytes held for the device (offload buffers): plugins ``add``/``release`` as they
    allocate and free; a measured step reports the peak since ``reset_peak``. MemTracker
    cannot tell these from device memory on CPU, so they are allocated outside its view."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def release(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current


HOST = HostLedger()
"""The process's host ledger (one per process, as the host memory is)."""


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = st.data_ptr() if st.data_ptr() else id(st)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients a backward pass creates (trainable parameters)."""
    return tensor_bytes(p for p in model.parameters() if p.requires_grad)


# --- measurement ------------------------------------------------------------------------

_KEYS = {
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


def _categorise(snap: dict) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for key, value in snap.items():
        name = getattr(key, "value", key)
        if name in _KEYS:
            out[_KEYS[name]] += int(value)
    return out


def _tracker() -> Any:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    grad_type = _MemRefType.GRAD

    class CategoryPeaks(MemTracker):
        """MemTracker that also keeps each category's own maximum.

        Recomputation during backward (activation checkpointing) is counted as
        temporaries, not activations: activations are what the forward pass saves.
        """

        def __init__(self) -> None:
            super().__init__()
            self.category_max: dict[Any, dict[Any, int]] = {}

        @property
        def _in_ac(self) -> bool:  # noqa: D401 - MemTracker's flag, pinned off
            return False

        @_in_ac.setter
        def _in_ac(self, value: bool) -> None:
            pass

        def _track_module_params_and_buffers(self, module: torch.nn.Module,
                                             install_grad_hooks: bool = True) -> tuple[int, int]:
            # MemTracker hooks every parameter; frozen ones (adapters, pruned bases) cannot take hooks
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if not install_grad_hooks:
                return out

            def on_grad(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, grad_type)

            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(on_grad),
                        # a step in backward (fused_step) may already have used and freed the gradient
                        p.register_post_accumulate_grad_hook(lambda q: None if q.grad is None else on_grad(q.grad)))
            return out

        def _update_snap(self, *args: Any, **kwargs: Any) -> None:
            super()._update_snap(*args, **kwargs)
            for dev, snap in self._curr_mem_snap.items():
                best = self.category_max.setdefault(dev, {})
                for key, value in snap.items():
                    if value > best.get(key, 0):
                        best[key] = value

    return CategoryPeaks()


def measure_generation_peak(model: torch.nn.Module, generate: Callable[[], Any], external: Iterable[Any] = ()) -> int:
    """MemTracker's peak bytes over ``generate()`` (e.g. ``model.generate(...)`` under no_grad): the
    weights, the cache and every temporary of the prefill and decoding steps. MemTracker refuses a
    second forward of the root module; each decoding step starts its module statistics afresh (the
    peak is kept)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class EveryStep(MemTracker):
        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            name = self._mod_tracker.get_known_fqn(module)
            if module in self.memory_tracking and not self._mod_tracker.is_bw \
                    and set(self._mod_tracker.parents) - {name} == {"Global"}:
                self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

    gc.collect()
    mt = EveryStep()
    mt.track_external(model, *external)
    with mt:
        generate()
    peak = mt.get_tracker_snapshot("peak")
    return int(next(iter(peak.values()), {}).get("Total", 0))


@dataclass
class MemoryReport:
    """Measured bytes: at the total peak, each category's own maximum, after forward, after the step.

    ``host`` is the host ledger's peak during the step in ``at_peak`` and ``category_max``
    (not necessarily at the device's peak moment), and its current value elsewhere.

    ``after_forward`` activations are what the forward pass saved for backward (plus the
    loss); ``category_max`` activations also include short-lived forward temporaries.
    """

    at_peak: dict[str, int] = field(default_factory=dict)
    after_forward: dict[str, int] = field(default_factory=dict)
    category_max: dict[str, int] = field(default_factory=dict)
    after_step: dict[str, int] = field(default_factory=dict)
    peak_total: int = 0
    peak_rss: int = 0
    cuda: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def headline(self) -> dict[str, int]:
        """One figure per category: persistent state after the step, activations saved by
        forward, temporaries at their own maximum."""
        out = dict(self.after_step)
        out["activations"] = self.after_forward.get("activations", 0)
        out["temporaries"] = self.category_max.get("temporaries", 0)
        out["kv_cache"] = self.category_max.get("kv_cache", 0)
        out["host"] = self.category_max.get("host", 0)
        return out


def measure_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    external: Iterable[Any] = (),
) -> MemoryReport:
    """Run one plain step (forward, backward, optimizer step) under MemTracker.

    ``loss_fn`` runs the forward pass and returns the loss; ``context`` wraps forward and
    backward (the plugins' step contexts, autocast). Gradients are cleared first and after.
    """
    optimizer.zero_grad(set_to_none=True)
    gc.collect()  # host pools of models already dropped are released by their finalizers, not counted here
    HOST.reset_peak()
    mt = _tracker()
    mt.track_external(model, optimizer, *external)
    device = next(model.parameters()).device
    with mt:
        with context():
            loss = loss_fn()
            forward = mt.get_tracker_snapshot("current")
            host_forward = HOST.current
            loss.backward()
        del loss
        optimizer.step()
        after = mt.get_tracker_snapshot("current")
        optimizer.zero_grad(set_to_none=True)
    peak = mt.get_tracker_snapshot("peak")
    dev = next(iter(peak)) if peak else device
    report = MemoryReport(
        at_peak=_categorise(peak.get(dev, {})),
        category_max=_categorise(mt.category_max.get(dev, {})),
        after_forward=_categorise(forward.get(dev, {})),
        after_step=_categorise(after.get(dev, {})),
        peak_total=int(peak.get(dev, {}).get("Total", 0)),
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    report.after_forward["host"] = host_forward
    report.at_peak["host"] = report.category_max["host"] = HOST.peak
    report.after_step["host"] = HOST.current
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        report.cuda = {"max_allocated": int(torch.cuda.max_memory_allocated(device)),
                       "max_reserved": int(torch.cuda.max_memory_reserved(device)),
                       "num_alloc_retries": int(stats.get("num_alloc_retries", 0))}
    return report


# --- prediction ----------------------------------------------------------------------------


def _adapter(config: Any) -> Any:
    """The architecture adapter of an HF config; a bare namespace of sizes is read as Llama."""
    from memwise import architectures

    return architectures.for_config(config) if getattr(config, "model_type", None) else architectures.get("llama")


def llama_layer_activation_bytes(config: Any, batch: int, seq: int, precision: str = "32-true") -> int:
    """Bytes one decoder layer saves for backward (no technique), from the architecture adapter of
    ``config.model_type`` (a config without one is read as Llama); see memwise.architectures.activations."""
    adapter = _adapter(config)
    return adapter.layer_bytes(adapter, adapter.geometry(config), config, batch, seq, precision)


def logits_activation_bytes(config: Any, batch: int, seq: int, precision: str = "32-true") -> int:
    """Bytes the LM head and HF's cross-entropy keep from forward to backward: the fp32
    log-softmax the loss saves, whatever the precision (HF upcasts the logits; the logits
    themselves are dropped with the model output when the caller keeps only the loss).
    For a real vocabulary (49,152 on SmolLM2) this is the largest activation of a small
    model; in backward its gradient and the logits' gradient add two more of the same size
    as temporaries (``logits_temporary_bytes``). Checked against MemTracker at vocabulary 32,768 (plugins/chunked_ce tests)."""
    return batch * seq * 4 * config.vocab_size


def logits_temporary_bytes(config: Any, batch: int, seq: int) -> int:
    """Beyond what forward saved, at the start of backward: the gradients of the fp32 log-softmax
    and of the fp32 logits, 8 bytes per token and vocabulary entry under autocast too (the bf16
    logits' gradient comes once the log-softmax's is freed). The planner's loss-side term at the
    start of backward, and a part of the baseline's temporaries (``loss_temporary_bytes``)."""
    return 8 * batch * seq * config.vocab_size


def head_temporary_bytes(config: Any, batch: int, seq: int, precision: str = "32-true") -> int:
    """Temporaries of the head's and the embedding's backward, as MemTracker shows them: a tied
    weight's gradient stays pending until the embedding's backward adds its own part, three
    weight-sized tensors then (the head's part, the embedding's dense gradient, their sum); an
    untied head's weight gradient is born beside the logits' fp32 gradient (under autocast beside
    its own bf16 form instead) and the hidden states' gradient."""
    weight = 4 * config.vocab_size * config.hidden_size
    if getattr(config, "tie_word_embeddings", False):
        return 3 * weight
    hidden_grad = 4 * batch * seq * config.hidden_size
    if precision in ("bf16-mixed", "16-mixed"):
        return weight + weight // 2 + hidden_grad
    return weight + 4 * batch * seq * config.vocab_size + hidden_grad


def loss_temporary_bytes(config: Any, batch: int, seq: int, precision: str = "32-true") -> int:
    """The baseline's temporaries at their own maximum: the loss side's at the start of backward or
    the head's later, whichever is larger (on SmolLM2, tied, the head's: three times 108 MiB).
    Checked against MemTracker in tests/test_memory.py."""
    return max(logits_temporary_bytes(config, batch, seq), head_temporary_bytes(config, batch, seq, precision))


def llama_activation_bytes(config: Any, batch: int, seq: int, precision: str = "32-true",
                           layers: int | None = None) -> int:
    """Saved-for-backward bytes of the whole model: embeddings, layers, final norm, head, loss."""
    from memwise.architectures.activations import outside_bytes

    adapter = _adapter(config)
    geo = adapter.geometry(config)
    n = geo.layers if layers is None else layers
    h = geo.hidden
    head = 0
    if precision in ("bf16-mixed", "16-mixed"):
        outside = 4 * 2 * h + 2 * h  # fp32 embedding output and final norm; bf16 head input
        head = 2 * config.vocab_size * h  # autocast's bf16 copy of the head weight, saved for its backward
    elif precision in ("bf16-true", "16-true"):
        outside = 2 * 3 * h
    else:
        outside = 4 * 3 * h
    return (n * llama_layer_activation_bytes(config, batch, seq, precision) + batch * seq * (outside + 4) + head
            + logits_activation_bytes(config, batch, seq, precision) + outside_bytes(adapter, geo, config, batch, seq,
                                                                                     precision))


def autocast_copy_bytes(config: Any, precision: str) -> int:
    """The bf16 weight copies every decoder layer saves under autocast (counted in the activations)."""
    from memwise.architectures.activations import autocast_weight_copy_bytes

    if precision not in ("bf16-mixed", "16-mixed"):
        return 0
    adapter = _adapter(config)
    geo = adapter.geometry(config)
    return geo.layers * autocast_weight_copy_bytes(adapter, geo)


GENERATION_INPUT_BYTES = 32
"""Bytes per prompt token that ``generate`` holds beside the model's own tensors: the int64 input
ids, attention mask, position ids and cache positions."""


def kv_cache_bytes(config: Any, batch: int, tokens: int, dtype_bytes: int) -> int:
    """A dense (transformers DynamicCache) cache holding ``tokens`` tokens: keys and values of every
    layer and KV head. A pruned cache's bytes are its plugin's (``memwise_estimate_memory`` at stage
    generate, e.g. kvprune's ``predict_nbytes``)."""
    geo = _adapter(config).geometry(config)
    return 2 * geo.layers * batch * geo.kv_heads * geo.head_dim * tokens * dtype_bytes


def prefill_temporary_bytes(config: Any, batch: int, prompt: int, dtype_bytes: int) -> int:
    """Beyond the weights and the cache, at the worst moment of a prompt's forward without autograd:
    the last decoder layer's MLP (its activation, up projection and their product, intermediate
    wide), the layer's input and residual sum and the normed input, the embeddings (kept by the
    model's forward), the rotary cos and sin, and ``generate``'s inputs. SDPA materializes no
    attention scores; eager attention (soft-capped models) adds the scores and their softmax. The
    logits are of the last position only (``generate`` asks for ``logits_to_keep=1``). Checked
    against MemTracker in tests/test_plan_generate.py."""
    geo = _adapter(config).geometry(config)
    hidden = (4 if geo.layers > 1 else 3) * geo.hidden  # embeddings, the layer's input, residual sum, normed
    per_token = (hidden + 3 * geo.intermediate + 2 * geo.head_dim) * dtype_bytes + GENERATION_INPUT_BYTES
    scores = 0
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        scores = 2 * batch * geo.heads * prompt * prompt * 4
    return batch * prompt * per_token + scores


def predict_baseline(model: torch.nn.Module, optimizer_state_bytes: int, batch: int, seq: int,
                     precision: str) -> MemoryEstimate:
    """The baseline's memory: parameters, gradients, optimizer state exact; activations and
    temporaries by formula."""
    config = getattr(model, "config", None)
    activations = llama_activation_bytes(config, batch, seq, precision) if config is not None else 0
    outside = llama_activation_bytes(config, batch, seq, precision, layers=0) if config is not None else 0
    temporaries = loss_temporary_bytes(config, batch, seq, precision) if config is not None else 0
    return MemoryEstimate(parameters=parameter_bytes(model), gradients=trainable_bytes(model),
                          optimizer_state=optimizer_state_bytes, activations=activations, temporaries=temporaries,
                          outside_layers=outside)

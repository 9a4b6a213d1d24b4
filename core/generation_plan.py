"""``memwise plan --stage generate``: which KV cache fits a model's generation in a memory budget.

Generation holds the weights (at the generation dtype), the KV cache and the forward's
temporaries. The peak is either in the prompt's forward (prefill: the cache of the prompt,
the last layer's temporaries, any transient a cache plugin declares for compressing the
prompt) or at the last decoding step (the cache of prompt + max_new_tokens - 1 tokens and
one layer's keys and values being extended or widened), whichever is larger. The dense
cache is the core's (``memory.kv_cache_bytes``); a cache plugin states its own through
``memwise_estimate_memory`` at stage generate (kvprune: ``predict_nbytes``). Combinations
are ranked by whether they fit, then by the quality cost each plugin declares
(``Plugin.quality_cost``), then by slowdown, then by peak.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from memwise import memory, plan
from memwise.context import RunContext, Workload
from memwise.errors import MemwiseError
from memwise.host import PluginHost, check_plugin
from memwise.memory import MemoryEstimate
from memwise.planner import Candidate, Target, describe, meta_model, plannable_plugins, recipe_for, variants

DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
"""``--precision`` at stage generate: the dtype the weights and the cache are held in."""
MODEL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_precision(precision: str) -> torch.dtype:
    """The weights' dtype for a generation plan; mixed precision is a training setting."""
    if precision not in DTYPES:
        raise MemwiseError(f"--precision {precision} is a training setting; generation holds the weights in one "
                           f"dtype: give --precision {' or '.join(DTYPES)}")
    return DTYPES[precision]


@dataclasses.dataclass
class GenerationShape:
    """Sizes of one candidate at the two moments the peak may fall."""

    prefill: MemoryEstimate
    """the estimate once the prompt is in the cache (the cache of the prompt; temporaries of its forward)"""
    end: MemoryEstimate
    """the estimate after the last decoding step (the cache of prompt + max_new_tokens - 1 tokens)"""
    decode_transient: int
    """one layer's keys and values at the final length in the weights' dtype: a dense cache extends one
    tensor at a time by copying it, a quantized one widens a layer's keys and values to attend"""
    decode_inputs: int
    """``generate``'s growing input ids and attention mask at the final length"""


def predict_generation_peak(shape: GenerationShape) -> int:
    """Weights plus the larger of the prefill moment and the last decoding step. Checked against
    MemTracker's measured peak of ``generate`` in tests/test_plan_generate.py."""
    pre, end = shape.prefill, shape.end
    prefill = pre.kv_cache + pre.temporaries + pre.layer_forward
    decode = end.kv_cache + shape.decode_transient + shape.decode_inputs
    return end.parameters + max(prefill, decode)


def _host(plugins: list) -> PluginHost:
    for p in plugins:
        check_plugin(p)
    return PluginHost(plugins, checked=True)


def _phase(model: torch.nn.Module, plugins: list, host: PluginHost,
           workload: Workload) -> list[tuple[str, MemoryEstimate, str]]:
    """(label, estimate, note) at ``workload``: the dense baseline, then after each plugin's delta."""
    size = workload.activation_dtype.itemsize
    config, b = model.config, workload.batch_size
    numel = sum(t.numel() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    base = MemoryEstimate(parameters=numel * size,
                          kv_cache=memory.kv_cache_bytes(config, b, final_tokens(workload), size),
                          temporaries=memory.prefill_temporary_bytes(config, b, workload.seq_len, size))
    return host.estimate(_context(model, plugins, workload), base)


def _context(model: torch.nn.Module, plugins: list, workload: Workload) -> RunContext:
    ctx = RunContext(stage="generate", plugins=plugins, workload=workload)
    ctx.model = model
    return ctx


def final_tokens(workload: Workload) -> int:
    """Tokens in the cache after generating: the prompt and every new token but the last (never fed back)."""
    return workload.seq_len + max(workload.max_new_tokens - 1, 0)


def estimate_generation(model: torch.nn.Module, plugins: list, workload: Workload) -> Candidate:
    """The prediction for ``plugins`` (instances, plan order) generating ``workload.max_new_tokens`` tokens
    after a ``workload.seq_len``-token prompt, on ``model`` (meta or real)."""
    host = _host(plugins)
    prefill = _phase(model, plugins, host, dataclasses.replace(workload, max_new_tokens=1))[-1][1]
    rows = _phase(model, plugins, host, workload)
    end = rows[-1][1]
    size, b = workload.activation_dtype.itemsize, workload.batch_size
    final = final_tokens(workload)
    shape = GenerationShape(prefill, end,
                            decode_transient=memory.kv_cache_bytes(model.config, b, final, size)
                            // model.config.num_hidden_layers,
                            decode_inputs=16 * b * (final + 1))
    ctx = _context(model, plugins, workload)
    slowdown = 1.0
    for p in plugins:
        slowdown *= p.slowdown(ctx)
    est = dataclasses.replace(end, temporaries=prefill.temporaries, layer_forward=prefill.layer_forward)
    notes = [f"{describe(p)}: {note}" for (_, _, note), p in zip(rows[1:], plugins) if note]
    return Candidate([describe(p) for p in plugins], 1, est, predict_generation_peak(shape), slowdown, notes=notes,
                     instances=list(plugins), quality=sum(p.quality_cost(ctx) for p in plugins),
                     prefill_kv=prefill.kv_cache)


def combinations(classes: list[type]) -> list[list]:
    """No plugin (the dense cache), and each plannable generate plugin in each variant, alone and
    with the others that pass the plan's checks."""
    import itertools

    options = {cls: variants(cls) for cls in classes}
    out = []
    for r in range(len(classes) + 1):
        for subset in itertools.combinations(classes, r):
            for plugins in itertools.product(*(options[cls] for cls in subset)):
                if plan.check(list(plugins), "generate"):
                    continue
                ordered, problems = plan.order(list(plugins))
                if not problems:
                    out.append(ordered)
    return out


def plan_generation(target: Target, budget: int, max_new_tokens: int) -> tuple[list[Candidate], list[str]]:
    """Every combination's prediction, best first: those that fit by quality cost, slowdown and
    peak, then the others by peak."""
    dtype = check_precision(target.precision)
    model = meta_model(target.config).eval()
    workload = Workload(target.batch_size, target.seq_len, target.precision, max_new_tokens=max_new_tokens)
    classes, notes = plannable_plugins("generate")
    rows = []
    for plugins in combinations(classes):
        try:
            cand = estimate_generation(model, plugins, workload)
        except Exception as err:  # noqa: BLE001 - a plugin that cannot estimate this model is reported
            notes.append(f"{' + '.join(p.name for p in plugins)}: no estimate ({err})")
            continue
        cand.fits = cand.peak <= budget
        rows.append(cand)
    rows.sort(key=lambda c: (not c.fits, c.quality if c.fits else 0.0, c.slowdown if c.fits else c.peak, c.peak))
    if not classes:
        notes.append("no generate-stage plugin installed: only the dense cache planned (pip install memwise-kvprune "
                     "for pruned and quantized caches)")
    notes.append(f"weights and cache in {MODEL_DTYPES[dtype]}")
    return rows, notes


def generate_recipe_for(target: Target, cand: Candidate, max_new_tokens: int) -> dict[str, Any]:
    """A recipe ``memwise generate`` accepts for a candidate."""
    out = recipe_for(target, cand)
    out.pop("trainer", None)
    if "model" in out:
        out["model"]["dtype"] = MODEL_DTYPES[DTYPES[target.precision]]
    else:
        out["model"] = {"dtype": MODEL_DTYPES[DTYPES[target.precision]]}
    out["generate"] = {"max_new_tokens": max_new_tokens}
    out.pop("data", None)
    return out


def measure_peak(model: torch.nn.Module, plugins: list, workload: Workload, seed: int = 0) -> int:
    """MemTracker's peak over greedy ``generate`` of exactly ``workload.max_new_tokens`` tokens after a
    random ``workload.seq_len``-token prompt, with the caches the plugins install
    (``memwise_wrap_generation``): what the generation predictions are checked against."""
    torch.manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (workload.batch_size, workload.seq_len))
    host = _host(plugins)
    ctx = _context(model, plugins, workload)
    kwargs = host.wrap_generation(ctx)
    new = workload.max_new_tokens

    def run() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)

    try:
        return memory.measure_generation_peak(model, run)
    finally:
        host.end_generation(ctx)

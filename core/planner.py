"""``memwise plan``: which combination of plugins (and sharding) fits a model in a memory budget.

The model is built on the meta device (no weights, no memory: a 70B config plans in
seconds); each combination's memory is the baseline prediction plus the plugins'
``memwise_estimate_memory`` deltas, as ``memwise explain`` computes them; FSDP divides
parameters, gradients and optimizer state by the number of processes. Combinations are
ranked by whether their predicted peak fits the budget, then by the slowdown each plugin
declares (``Plugin.slowdown``), then by peak.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memwise import manager, memory, plan
from memwise.context import RunContext, Workload
from memwise.errors import MemwiseError, Problem, RecipeError
from memwise.host import EstimateMemo, PluginHost, check_plugin
from memwise.memory import MemoryEstimate
from memwise.optim import OptimizerConfig, state_bytes
from memwise.recipe import RecipeConfig, TrainerConfig

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTE_VOCAB = 260
"""Vocabulary of memwise's byte tokenizer: what a recipe's model gets without a model folder."""


def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m:
        raise MemwiseError(f"budget '{text}' is not a size; write e.g. 24GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


@dataclass
class Target:
    """What to plan for: a model config and the step shape."""

    config: dict
    source: str
    kind: str  # folder, config, recipe
    seq_len: int = 2048
    batch_size: int = 1
    precision: str = "bf16-mixed"
    model_dtype: str | None = None
    """a recipe's ``model.dtype``, memwise's float32 unless set (generation plans hold the weights in it)"""
    max_new_tokens: int = 64
    """a recipe's ``generate.max_new_tokens`` (generation plans)"""


def _read_config(file: Path) -> dict:
    from memwise.models import check_folder

    problems = check_folder(str(file.parent), "MODEL") if file.name == "config.json" else []
    if problems:
        raise RecipeError(problems, source=str(file))
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MemwiseError(f"cannot read the model config '{file}': {err}") from None
    if "auto_map" in data:
        raise MemwiseError(f"{file} asks for remote code (auto_map); memwise plans only architectures "
                           "transformers ships")
    return data


def load_target(model: str) -> Target:
    """MODEL as a HF folder, a config.json file or a recipe (file or shipped name)."""
    path = Path(model)
    if path.is_dir():
        return Target(_read_config(path / "config.json"), model, "folder")
    if path.suffix == ".json":
        if not path.is_file():
            raise MemwiseError(f"model config '{model}' does not exist")
        return Target(_read_config(path), model, "config")
    from memwise import recipe

    try:
        raw = recipe.to_plain(recipe.load_raw(model))
    except RecipeError:
        raise MemwiseError(f"'{model}' is neither a model folder, a config.json nor a recipe; give a local HF "
                           "folder (config.json inside), a config.json file or a recipe path") from None
    m, data, trainer = raw.get("model", {}) or {}, raw.get("data", {}) or {}, raw.get("trainer", {}) or {}
    generate = raw.get("generate", {}) or {}
    if m.get("path"):
        config = {**_read_config(Path(m["path"]) / "config.json"), **(m.get("config") or {})}
    else:
        config = {"vocab_size": BYTE_VOCAB, **(m.get("config") or {})}
    return Target(config, model, "recipe", seq_len=int(data.get("seq_len", 256)),
                  batch_size=int(data.get("batch_size", 16)), precision=trainer.get("precision", "32-true"),
                  model_dtype=m.get("dtype", "float32"), max_new_tokens=int(generate.get("max_new_tokens", 64)))


def meta_model(config: dict) -> torch.nn.Module:
    """The model on the meta device: shapes and dtypes only, no memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kind = config.get("model_type", "llama")
    if kind != "llama":
        raise MemwiseError(f"model_type '{kind}' is not supported by the planner (memwise builds Llama-family "
                           "decoders: model_type llama)")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "torch_dtype",
                                                          "dtype", "model_type")}
    cfg = LlamaConfig(**fields)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.train()


# --- exact counts on the meta device ------------------------------------------------------


def _distinct(tensors: Any) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _bytes(t: torch.Tensor, shards: int = 1) -> int:
    """Bytes of one rank's FSDP2 shard of ``t`` (dim 0 padded to a multiple of ``shards``)."""
    if shards == 1 or t.ndim == 0:
        return t.numel() * t.element_size()
    rows = math.ceil(t.shape[0] / shards)
    return rows * (t.numel() // max(t.shape[0], 1)) * t.element_size()


def _shard(t: torch.Tensor, shards: int) -> torch.Tensor:
    """A meta tensor shaped like one rank's FSDP2 shard of ``t`` (what its optimizer state is sized by)."""
    if shards == 1 or t.ndim == 0:
        return t
    return torch.empty((math.ceil(t.shape[0] / shards), *t.shape[1:]), dtype=t.dtype, device="meta")


def sharded_state(model: torch.nn.Module, shards: int) -> dict[str, int]:
    """Parameters (with replicated buffers), gradients and AdamW state per rank."""
    params = _distinct(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    buffers = sum(_bytes(b) for b in _distinct(model.buffers()))
    grads = sum(_bytes(p, shards) for p in trainable)
    return {"parameters": sum(_bytes(p, shards) for p in params) + buffers, "gradients": grads,
            "optimizer_state": state_bytes([_shard(p, shards) for p in trainable]), "largest": max((_bytes(p) for p in params), default=0)}


def _layer_bytes(model: torch.nn.Module, shards: int = 1) -> int:
    """The largest decoder layer's parameter bytes (one rank's shard of them)."""
    from memwise.models import decoder_layers

    return max(sum(_bytes(p, shards) for p in layer.parameters()) for _, layer in decoder_layers(model))


# --- combinations ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One combination and its prediction (per rank)."""

    plugins: list[str]
    devices: int
    estimate: MemoryEstimate
    peak: int
    slowdown: float
    fits: bool = False
    notes: list[str] = field(default_factory=list)
    instances: list = field(default_factory=list)
    quality: float = 0.0
    """the plugins' declared quality cost (``Plugin.quality_cost``; generation plans)"""
    prefill_kv: int = 0
    """the KV cache once the prompt is in (generation plans; ``estimate.kv_cache`` is at the end)"""

    @property
    def strategy(self) -> str:
        return "fsdp" if self.devices > 1 else "auto"

    @property
    def label(self) -> str:
        names = " + ".join(self.plugins) or "baseline"
        return f"{names} (fsdp x{self.devices})" if self.devices > 1 else names


@dataclass
class StepShape:
    """Sizes that decide where in the step the peak falls."""

    largest_param: int
    """torch AdamW's single-tensor step holds two temporaries of one parameter's size (the square
    root of the second moment and its quotient)"""
    loss_grads: int
    """at the start of backward, beyond the saved activations: the gradients of the log-softmax and of
    the fp32 logits (memory.logits_temporary_bytes); or, once both the log-softmax's gradient and its
    saved output (memory.logits_activation_bytes) are freed, the logits' gradient in the output's
    place, the head's weight gradient and the hidden states' gradient, whichever is larger (measured:
    SmolLM2 at 1 x 512 and small at vocabulary 32,768 peak on the first, the head's gradient not yet born)"""
    temporaries: int
    """the baseline's temporaries (memory.loss_temporary_bytes): what plugins add beyond them is
    recomputation in backward"""
    head_activations: int
    """what forward saved for the loss (the log-softmax), freed once backward has passed the head"""
    layer_backward: int
    """the head's and one decoder layer's parameter gradients, and the gradient of the layer's input"""
    layer_grads: int
    """one decoder layer's parameter gradients"""
    layers: int
    head_grad: int
    """the head's parameter gradient, the first one backward creates"""
    tied_embedding: int = 0
    """an embedding tied to the head: its bytes (else 0). Its gradient is accumulated at the end of
    backward, which holds two more of its size beside all the gradients (measured: SmolLM2 at 1 x 512
    with COAT's optimizer, to 0.01%); an untied embedding's gradient is only created there"""


def predict_peak(est: MemoryEstimate, shape: StepShape) -> int:
    """The step's peak from its categories and the transients plugins declare.

    Parameters and optimizer state live all step. The peak is either at the start of
    backward (everything forward saved, plus ``loss_grads``), or, when plugins recompute
    in backward (temporaries beyond the baseline's), during a layer's recompute: the head's activations are
    freed by then; going down the layers each step frees what one layer kept and adds its
    gradients, so the first layer is the worst when gradients outweigh what a layer keeps,
    the last one otherwise; or inside a layer whose backward unpacks its saved inputs
    (``est.layer_backward``: what the last layer holds then, beside the head's gradient,
    the same walk down the layers); or inside the last layer's forward
    (``est.layer_forward``, on top of all but the head's activations); or in the optimizer
    step (all gradients plus the step's workspace: what the plugins' optimizer declares, else torch
    AdamW's two temporaries of the largest parameter); or at the end of backward, accumulating a
    tied embedding's gradient (``shape.tied_embedding``), whichever is largest. Checked against
    MemTracker's measured peak in tests/test_planner.py.
    """
    kept = est.layer_activations // max(shape.layers, 1)
    walk = max(0, (shape.layers - 1) * (shape.layer_grads - kept))
    recompute = est.temporaries - shape.temporaries
    # a plugin that shrinks the loss side (chunked cross-entropy) shrinks what backward starts with alike
    backward = shape.loss_grads + min(recompute, 0)
    if recompute > 0:
        backward = max(backward, recompute - shape.head_activations + shape.layer_backward + walk)
    if est.layer_backward:
        backward = max(backward, est.layer_backward - shape.head_activations + shape.head_grad + walk)
    backward = max(backward, est.layer_forward - shape.head_activations)
    step = est.gradients + (est.optimizer_step or 2 * shape.largest_param)
    end = est.gradients + 2 * shape.tied_embedding
    return est.parameters + est.optimizer_state + max(est.activations + est.kv_cache + backward, step, end)


def plannable_plugins(stage: str = "fit") -> tuple[list[type], list[str]]:
    """Installed plugins the planner may combine, and notes on those it leaves out."""
    chosen, notes = [], []
    for name in manager.available():
        try:
            cls = manager.load(name)
        except Exception as err:  # noqa: BLE001 - one broken plugin must not stop planning
            notes.append(f"{name}: cannot be imported ({err})")
            continue
        if stage not in cls.stages:
            continue
        if not cls.planned:
            notes.append(f"{name}: not combined automatically (it changes what is trained); add it yourself")
            continue
        chosen.append(cls)
    return chosen, notes


@dataclass
class PlanMemo:
    """What the candidates of one plan share, computed once: the model's sizes by device count, each
    plugin's delta (by plugin, settings and the estimate before it) and slowdown. Valid while the
    model and the workload stay as they are (the planner's meta model is never transformed)."""

    sizes: dict[int, dict[str, int]] = field(default_factory=dict)
    configs: dict[str, RecipeConfig] = field(default_factory=dict)
    deltas: EstimateMemo = field(default_factory=EstimateMemo)
    slowdowns: dict = field(default_factory=dict)
    checked: set[int] = field(default_factory=set)
    """ids of the plugin instances that passed ``check_plugin``"""
    walks: int = 0
    """How many times the model's parameters were walked for its sizes."""

    def sizes_of(self, model: torch.nn.Module, workload: Workload, devices: int) -> dict[str, int]:
        """``sharded_state``, the largest layer's bytes and the baseline activations (all, and outside
        the decoder layers), per rank over ``devices``."""
        if devices not in self.sizes:
            self.walks += 1
            b, s, precision = workload.batch_size, workload.seq_len, workload.precision
            self.sizes[devices] = {**sharded_state(model, devices), "layer": _layer_bytes(model, devices),
                                   "activations": memory.llama_activation_bytes(model.config, b, s, precision),
                                   "outside": memory.llama_activation_bytes(model.config, b, s, precision, layers=0)}
        return self.sizes[devices]

    def config(self, optimizer: str) -> RecipeConfig:
        """The typed recipe the plugins see: the optimizer, and no clipping by global norm (which
        fused_step cannot do; a recipe written for a candidate with it turns clipping off)."""
        if optimizer not in self.configs:
            self.configs[optimizer] = RecipeConfig(optimizer=OptimizerConfig(name=optimizer),
                                                   trainer=TrainerConfig(gradient_clip_val=None))
        return self.configs[optimizer]

    def host(self, plugins: list) -> PluginHost:
        """A host over ``plugins``, each checked once for all the candidates it appears in."""
        for p in plugins:
            if id(p) not in self.checked:
                check_plugin(p)
                self.checked.add(id(p))
        return PluginHost(plugins, checked=True)

    def slowdown(self, plugin: Any, ctx: RunContext) -> float:
        key = (type(plugin), repr(plugin.config))
        if key not in self.slowdowns:
            self.slowdowns[key] = plugin.slowdown(ctx)
        return self.slowdowns[key]


def estimate(model: torch.nn.Module, plugins: list, workload: Workload, devices: int = 1,
             optimizer: str = "adamw", memo: PlanMemo | None = None, config: RecipeConfig | None = None) -> Candidate:
    """Per-rank prediction for ``plugins`` (instances, plan order) on ``model`` (meta or real);
    ``memo`` shares work between the candidates of one plan; ``config``: a recipe's typed config,
    for the plugins' checks (else the planner's, ``PlanMemo.config``)."""
    memo = memo or PlanMemo()
    ctx = RunContext(stage="fit", plugins=plugins, recipe={"optimizer": {"name": optimizer}},
                     workload=dataclasses.replace(workload, shards=devices), config=config or memo.config(optimizer))
    ctx.model = model
    state = memo.sizes_of(model, workload, 1)
    batch, seq, precision = workload.batch_size, workload.seq_len, workload.precision
    base_temporaries = memory.loss_temporary_bytes(model.config, batch, seq, precision)
    est = MemoryEstimate(parameters=state["parameters"], gradients=state["gradients"],
                         optimizer_state=state["optimizer_state"], activations=state["activations"],
                         temporaries=base_temporaries, outside_layers=state["outside"])
    notes = []
    slowdown = 1.0
    host = memo.host(plugins)
    problems = host.validate(ctx)
    if problems:  # what `memwise run` would refuse (e.g. the same layers checkpointed and offloaded)
        raise RecipeError(problems, source="plan")
    rows = host.estimate(ctx, est, memo=memo.deltas)
    est = rows[-1][1]
    for plugin in plugins:
        if host.implements(plugin, "memwise_estimate_memory"):
            slowdown *= memo.slowdown(plugin, ctx)
    notes += [f"{label.removeprefix('+ ')}: {note}" for label, _, note in rows[1:] if note and note != "no change"]
    largest = state["largest"]
    shard = memo.sizes_of(model, workload, devices)
    head = model.get_output_embeddings().weight
    tokens = batch * seq
    shape = StepShape(largest_param=largest,
                      loss_grads=max(memory.logits_temporary_bytes(model.config, batch, seq),
                                     _bytes(head, devices) + 4 * tokens * model.config.hidden_size),
                      temporaries=base_temporaries,
                      head_activations=memory.logits_activation_bytes(model.config, batch, seq, precision),
                      layer_backward=shard["layer"] + _bytes(head, devices) + 4 * tokens * model.config.hidden_size,
                      layer_grads=shard["layer"], layers=model.config.num_hidden_layers,
                      head_grad=_bytes(head, devices),
                      tied_embedding=_bytes(head, devices) if head is model.get_input_embeddings().weight else 0)
    if devices > 1:
        for cat in ("parameters", "gradients", "optimizer_state"):
            setattr(est, cat, getattr(est, cat) - state[cat] + shard[cat])
        gathered = 2 * state["layer"]  # the layer being computed and the next one, prefetched
        est.temporaries += gathered
        copies = memory.autocast_copy_bytes(model.config, precision)
        if copies and est.activations == state["activations"]:  # FSDP2 gathers bf16 weights: autocast copies none
            est.activations -= copies
        elif copies:  # a plugin changed the layers' activations: which copies are left is not modelled
            notes.append(f"fsdp: {copies:,} B of autocast weight copies still counted (FSDP2 gathers bf16 weights "
                         "and keeps none; conservative beside activation plugins)")
        shape.largest_param = math.ceil(largest / devices)
        notes.append(f"fsdp: parameters, gradients and optimizer state / {devices}; temporaries + {gathered:,} B "
                     "of gathered layer parameters (not measured here); communication time not modelled")
    return Candidate([describe(p) for p in plugins], devices, est, predict_peak(est, shape), slowdown, notes=notes,
                     instances=list(plugins))


def variants(cls: type) -> list[Any]:
    """The plugin with default settings, with each capability switched off by its
    ``capability_switch`` (e.g. COAT's optimizer only: ``coat.activations: false``), and with each
    of its ``plan_variants``."""
    import yaml

    out = [cls()] + [cls(**settings) for settings in cls.plan_variants]
    for switch in cls.capability_switch.values():
        key, _, value = switch.partition(":")
        field_name = key.strip().split(".", 1)[-1]
        out.append(cls(**{field_name: yaml.safe_load(value)}))
    return out


@functools.cache
def _defaults(cls: type) -> dict:
    return cls().config_dict()


def _changed(plugin: Any) -> dict:
    default = _defaults(type(plugin))
    return {k: v for k, v in plugin.config_dict().items() if default.get(k) != v}


def describe(plugin: Any) -> str:
    """``name``, or ``name(key=value)`` for the settings that differ from the defaults."""
    changed = _changed(plugin)
    return plugin.name + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def combinations(classes: list[type], devices: int) -> list[tuple[list, int]]:
    """Every subset of the plannable plugins (each in each variant) that passes the plan's checks,
    on one device and, when ``devices`` > 1, sharded over all of them."""
    options = {cls: variants(cls) for cls in classes}  # one set of instances, shared by the combinations
    subsets = [list(itertools.product(*(options[cls] for cls in subset)))
               for r in range(len(classes) + 1) for subset in itertools.combinations(classes, r)]
    out = []
    for plugins in (list(p) for group in subsets for p in group):
        if plan.check(plugins, "fit"):
            continue
        ordered, problems = plan.order(plugins)
        if problems:
            continue
        for n in sorted({1, devices}):
            if n == 1 or all("fsdp" in p.strategies for p in ordered):
                out.append((ordered, n))
    return out


def plan_model(target: Target, budget: int, devices: int = 1) -> tuple[list[Candidate], list[str]]:
    """Every combination's prediction, best first: those that fit by slowdown (then peak), then
    the others by peak."""
    model = meta_model(target.config)
    workload = Workload(target.batch_size, target.seq_len, target.precision)
    classes, notes = plannable_plugins()
    memo = PlanMemo()
    rows, refused = [], []
    for plugins, n in combinations(classes, devices):
        try:
            cand = estimate(model, plugins, workload, n, memo=memo)
        except RecipeError as err:
            refused.append(f"{' + '.join(p.name for p in plugins)}: {err.problems[0].key}: {err.problems[0].message}")
            continue
        except Exception as err:  # noqa: BLE001 - a plugin that cannot estimate this model is reported
            notes.append(f"{' + '.join(p.name for p in plugins)}: no estimate ({err})")
            continue
        cand.fits = cand.peak <= budget
        rows.append(cand)
    rows.sort(key=lambda c: (not c.fits, c.slowdown if c.fits else c.peak, c.peak))
    if refused:
        notes.append(f"{len(refused)} combination(s) refused by validation, e.g. {refused[0]}")
    return rows, notes


def _recipe_fields(config: dict) -> dict:
    """The config's LlamaConfig fields that differ from the defaults, in this transformers'
    spelling (older names such as rope_scaling are converted by LlamaConfig itself)."""
    from transformers import LlamaConfig

    from memwise.models import _llama_fields

    drop = ("architectures", "transformers_version", "torch_dtype", "dtype", "model_type",
            "bos_token_id", "eos_token_id", "pad_token_id")
    full = LlamaConfig(**{k: v for k, v in config.items() if k not in drop}).to_dict()
    default = LlamaConfig().to_dict()
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: v for k, v in full.items()
            if k in _llama_fields() and k not in drop and (k in keep or v != default.get(k))}


def recipe_for(target: Target, cand: Candidate) -> dict:
    """A recipe ``memwise run`` accepts for a candidate."""
    if target.kind == "recipe":
        out: dict[str, Any] = {"extends": [str(Path(target.source).resolve())] if Path(target.source).is_file()
                               else [target.source]}
    elif target.kind == "folder":
        out = {"model": {"builder": "llama", "path": str(Path(target.source).resolve())}}
    else:
        out = {"model": {"builder": "llama", "config": _recipe_fields(target.config)}}
    out["data"] = {"seq_len": target.seq_len, "batch_size": target.batch_size}
    trainer: dict[str, Any] = {"precision": target.precision}
    if any(p.name == "fused_step" for p in cand.instances):
        trainer["gradient_clip_val"] = None  # as the candidate was planned: fused_step cannot clip by norm
    if cand.devices > 1:
        trainer.update(strategy="fsdp", devices=cand.devices)
    out["trainer"] = trainer
    out["plugins"] = [{"use": p.name, **({"with": changed} if (changed := _changed(p)) else {})} for p in cand.instances]
    return out


def check_args(budget: int, devices: int, seq_len: int | None, batch_size: int | None,
               max_new_tokens: int | None = None) -> list[Problem]:
    problems = []
    if budget <= 0:
        problems.append(Problem("--budget", "must be a positive size, e.g. 24GiB"))
    for key, value in (("--devices", devices), ("--seq-len", seq_len), ("--batch-size", batch_size),
                       ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            problems.append(Problem(key, f"must be at least 1, got {value}"))
    return problems

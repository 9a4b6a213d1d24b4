"""Recipes: load YAML, merge ``extends:``, apply overrides, validate everything at once.

Every name in a recipe (plugin, model builder, dataset, optimizer, schedule, strategy)
resolves through a registry; nothing is imported from a dotted path, so a recipe from a
stranger cannot run code.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memwise import manager, plan
from memwise.data.datasets import DATASETS, DataConfig
from memwise.data.tokens import TokenizerConfig, check_tokenizer
from memwise.errors import MemwiseError, Problem, RecipeError
from memwise.models import ModelConfig, check_model
from memwise.optim import OptimizerConfig, SchedulerConfig, optimizer_problems
from memwise.plugin import Plugin
from memwise.schema import build, check, option, suggest
from memwise.sharding import FsdpConfig

STRATEGIES = ("auto", "ddp", "ddp_spawn", "single_device", "fsdp", "deepspeed")


@dataclass(kw_only=True)
class TrainerConfig:
    """Passed to Lightning's Trainer (strategy, devices, num_nodes, precision) and the loop."""

    max_steps: int = option(200, "optimizer steps to train", ge=1)
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = option("32-true", "Lightning precision")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = option("auto", "Lightning accelerator")
    devices: Union[int, str] = option(1, "devices (processes) per node", ge=1)
    num_nodes: int = option(1, "nodes", ge=1)
    strategy: str = option("auto", f"Lightning strategy: {', '.join(STRATEGIES)} (fsdp: FSDP2 sharding)")
    fsdp: FsdpConfig = option(FsdpConfig(), "FSDP2 settings, used with strategy fsdp")
    gradient_clip_val: Optional[float] = option(1.0, "clip the gradient norm to this value (None: off)", gt=0)
    val_every_n_steps: int = option(50, "validate every N steps (also before the first and after the last)",
                                    ge=1)
    log_every_n_steps: int = option(10, "write a metrics row every N steps", ge=1)
    checkpoint_every_n_steps: Optional[int] = option(None, "save a resumable checkpoint every N steps (None: off)",
                                                    ge=1)
    num_threads: Optional[int] = option(None, "torch CPU threads (None: torch's default)", ge=1)
    progress_bar: bool = option(True, "rich progress bar")
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "a step whose loss or gradients are NaN/inf: stop (exit 1, no checkpoint after it) or skip its "
        "update (counted in metrics.csv as nonfinite_skips)")
    max_nonfinite_skips: int = option(10, "with on_nonfinite: skip, stop after this many skipped steps in a row",
                                      ge=1)


@dataclass(kw_only=True)
class ReportConfig:
    dir: Optional[str] = option(None, "report folder (default runs/<name>)")
    plots: bool = option(True, "write memory.png and loss.png")
    probe_memory: bool = option(True, "measure memory per category on a probe step after training")
    save_model: bool = option(False, "save the trained model as a HF folder (config.json + safetensors) in "
                              "<report>/model, loadable with model.path")


@dataclass(kw_only=True)
class GenerateConfig:
    max_new_tokens: int = option(64, "tokens to generate", ge=1)
    do_sample: bool = option(False, "sample (True) or greedy (False)")
    temperature: float = option(1.0, "sampling temperature", gt=0)
    top_k: Optional[int] = option(None, "sample among the k most likely tokens", ge=1)
    checkpoint: Optional[str] = option(None, "memwise checkpoint whose weights to generate with")
    chat: Optional[bool] = option(None, "wrap each prompt as a user turn in the tokenizer's chat template "
                                  "(default: when the tokenizer has one)")
    system_prompt: Optional[str] = option(None, "system turn before each chat prompt (default: the template's)")


@dataclass(kw_only=True)
class RecipeConfig:
    extends: list[str] = option([], "recipes merged first, in order (paths relative to this file)")
    name: str = option("run", "run name (report folder, checkpoints)")
    seed: int = option(0, "global seed (model init, data order)", ge=0, lt=2 ** 32)
    model: ModelConfig = option(ModelConfig(), "the model")
    tokenizer: TokenizerConfig = option(TokenizerConfig(), "the tokenizer of the data, the model and generate")
    data: dict = option({}, "the dataset (see data builders)")
    trainer: TrainerConfig = option(TrainerConfig(), "Lightning trainer settings")
    optimizer: OptimizerConfig = option(OptimizerConfig(), "the base optimizer")
    scheduler: SchedulerConfig = option(SchedulerConfig(), "the learning-rate schedule")
    plugins: list[dict] = option([], "plugins: [{use: NAME, with: {...}}]")
    report: ReportConfig = option(ReportConfig(), "report folder")
    generate: GenerateConfig = option(GenerateConfig(), "generation settings")
    resume: Optional[str] = option(None, "checkpoint to resume training from")


@dataclass
class Recipe:
    """A validated recipe: typed sections, plugin instances in plan order, plain dict."""

    config: RecipeConfig
    data: DataConfig
    plugins: list[Plugin]
    resolved: dict
    source: str = ""
    plugin_order: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    """Training-only plugins left out of a generate command (reported, never silent)."""


def shipped_root() -> Path:
    return Path(str(resources.files("memwise.recipes")))


def shipped() -> list[str]:
    """Names of the recipes installed with memwise (relative paths without .yaml)."""
    root = shipped_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find(path: str) -> Path:
    """A recipe file by path, or a shipped recipe by name."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (shipped_root() / path, shipped_root() / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise RecipeError([Problem(str(path), "no such recipe file" + suggest(path, shipped())
                               + f"; shipped recipes: {', '.join(shipped())}")])


MAX_NODES = 100_000
"""Values in a recipe file after expanding YAML aliases (a recipe has hundreds; an alias bomb billions)."""
MAX_DEPTH = 64
"""Nesting depth of a recipe file (a recipe needs about five)."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses duplicate keys (YAML says keys are unique; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (lines {seen[key]} and {line}): keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node) -> str | None:
    """Why a composed YAML document is too large once its aliases are expanded, or None.

    Iterative, with sizes memoized per node: an alias bomb is measured without expanding it.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, done = stack.pop()
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[id(node)] > MAX_NODES:
                return f"expands to more than {MAX_NODES:,} values (YAML aliases): refused"
            if depth[id(node)] > MAX_DEPTH:
                return f"nests deeper than {MAX_DEPTH} levels: refused"
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            return "holds a YAML alias that refers to itself (a cycle): refused"
        open_nodes.add(id(node))
        stack.append((node, True))
        stack += [(c, False) for c in children if id(c) not in size]
    return None


def _read(path: Path) -> dict:
    try:
        loader = _RecipeLoader(path.read_text())
        try:
            node = loader.get_single_node()
            why = _check_size(node) if node is not None else None
            if why:
                raise RecipeError([Problem(str(path), why)])
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise RecipeError([Problem(str(path), f"not valid YAML: {err}")]) from None
    except RecursionError:
        raise RecipeError([Problem(str(path), f"nests deeper than {MAX_DEPTH} levels: refused")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([Problem(str(path), f"cannot be read as a text recipe: {err}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([Problem(str(path), f"a recipe is a YAML mapping, this file holds a {type(data).__name__}")])
    problems = _check_containers(RecipeConfig, data, "")
    if problems:
        raise RecipeError(problems, source=str(path))
    return data


def _check_containers(cls: type, data: dict, path: str) -> list[Problem]:
    """Mappings where the schema has sections, lists where it has lists, before anything is merged
    (OmegaConf cannot merge a list into a mapping and raises a bare TypeError)."""
    problems = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data or data[f.name] is None:
            continue
        value, key = data[f.name], f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        origin = typing.get_origin(tp) or tp
        if f.name == "extends":
            ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            if not ok:
                problems.append(Problem(key, f"expected a recipe path or a list of them, got {value!r}"))
        elif dataclasses.is_dataclass(tp) or origin is dict:
            if not isinstance(value, dict):
                problems.append(Problem(key, f"expected a mapping, got {type(value).__name__} {value!r}"))
            elif dataclasses.is_dataclass(tp):
                problems += _check_containers(tp, value, key)
        elif origin is list and not isinstance(value, list):
            problems.append(Problem(key, f"expected a list, got {type(value).__name__} {value!r}"))
    return problems


def load_raw(path: str, _seen: tuple = ()) -> DictConfig:
    """The recipe with its ``extends`` merged (earlier first, this file last)."""
    file = find(path).resolve()
    if file in _seen:
        raise RecipeError([Problem(str(file), "extends itself (a cycle through: "
                                   + " -> ".join(str(s) for s in _seen) + ")")])
    data = _read(file)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        local = file.parent / parent
        target = str(local) if local.is_file() else parent
        merged = OmegaConf.merge(merged, load_raw(target, _seen + (file,)))
    try:
        return OmegaConf.merge(merged, OmegaConf.create(data))
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise RecipeError([Problem(str(file), f"cannot be merged with what it extends: {err}")]) from None


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> list[Problem]:
    """``key.path=value`` overrides (values parsed as YAML); ``plugins.NAME`` means that plugin's entry."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "an override is KEY=VALUE, e.g. trainer.max_steps=50"))
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "plugins" and not parts[1].isdigit():
            entries = cfg.get("plugins")
            uses = [p.get("use") if isinstance(p, DictConfig) else None
                    for p in (entries if isinstance(entries, ListConfig) else [])]
            if parts[1] not in uses:
                problems.append(Problem(key, f"no plugin '{parts[1]}' in this recipe" + suggest(parts[1], uses)))
                continue
            parts[1] = str(uses.index(parts[1]))
        try:
            # a mapping merges into the section; an empty one ({}) clears it (e.g. an inherited model.config)
            merge = not (isinstance(value, dict) and not value)
            OmegaConf.update(cfg, ".".join(parts), value, merge=merge, force_add=True)
        except (OmegaConfBaseException, IndexError, KeyError, ValueError, TypeError) as err:
            problems.append(Problem(key, f"cannot set this key: {err}"))
    return problems


RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
"""``${name:...}``: a resolver call (``oc.env``, ``oc.decode``, custom ones); ``${a.b}`` is a key reference."""


def resolver_uses(cfg: DictConfig | ListConfig) -> list[Problem]:
    """Every value that calls a resolver, by key path (nothing resolved)."""
    problems = []
    stack: list[tuple[str, Any]] = [("", OmegaConf.to_container(cfg, resolve=False))]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value)]
        elif isinstance(value, str) and (m := RESOLVER.search(value)):
            problems.append(Problem(path, f"uses the resolver '{m.group(1)}' ({value!r}): a recipe does not read the "
                                    "environment or call resolvers unless you pass --allow-resolvers; key "
                                    "references like ${trainer.max_steps} need no flag"))
    return sorted(problems, key=lambda p: p.key)


def to_plain(cfg: DictConfig | ListConfig | dict, allow_resolvers: bool = False) -> dict:
    """Plain Python containers with interpolations resolved (OmegaConf objects never leave here).

    Resolvers (``${oc.env:HOME}`` and the like) are refused unless ``allow_resolvers``: otherwise
    the environment would leak into run names, reports and checkpoint manifests.
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        problems = [] if allow_resolvers else resolver_uses(cfg)
        if problems:
            raise RecipeError(problems)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "recipe"
            why = getattr(err, "msg", None) or str(err)
            raise RecipeError([Problem(str(key), f"an interpolation cannot be resolved: {why}")]) from None
    return copy.deepcopy(cfg)


def _plugin_entries(entries: Any, problems: list[Problem]) -> list[tuple[int, type[Plugin], dict]]:
    found = []
    for i, entry in enumerate(entries):
        key = f"plugins.{i}"
        if not isinstance(entry, dict):
            problems.append(Problem(key, "each plugin entry is a mapping {use: NAME, with: {...}}"))
            continue
        for extra in set(entry) - {"use", "with"}:
            problems.append(Problem(f"{key}.{extra}", "unknown key" + suggest(extra, ["use", "with"])
                                    + "; a plugin entry has 'use' and 'with'"))
        name = entry.get("use")
        if not isinstance(name, str):
            problems.append(Problem(f"{key}.use", "missing required value: the plugin's registered name"))
            continue
        settings = entry.get("with") or {}
        if not isinstance(settings, dict):
            problems.append(Problem(f"{key}.with", f"expected a mapping of settings, got {settings!r}"))
            continue
        try:
            cls = manager.load(name)
        except MemwiseError as err:
            problems.append(Problem(f"{key}.use", str(err)))
            continue
        found.append((i, cls, settings))
    return found


def validate(raw: dict, stage: str, source: str = "") -> Recipe:
    """Check every section; raise RecipeError listing every problem, or return the Recipe."""
    problems: list[Problem] = []
    top = {k: v for k, v in raw.items() if k not in ("data", "plugins")}
    problems += check(RecipeConfig, top)
    opt_raw = raw.get("optimizer") or {}
    if isinstance(opt_raw, dict) and not check(OptimizerConfig, opt_raw, "optimizer"):
        problems += optimizer_problems(build(OptimizerConfig, opt_raw, "optimizer"))
    plugin_list = raw.get("plugins", []) or []
    if not isinstance(plugin_list, list):
        problems.append(Problem("plugins", f"expected a list of {{use: NAME, with: {{...}}}}, got {plugin_list!r}"))
        plugin_list = []
    model_raw = raw.get("model", {}) or {}
    if isinstance(model_raw, dict) and not check(ModelConfig, model_raw, "model"):  # never hidden by other sections
        problems += check_model(build(ModelConfig, model_raw, "model"))
        problems += check_model_sizes(model_raw, raw.get("data"))
    data_raw = raw.get("data", {})
    data_cfg = None
    if not isinstance(data_raw, dict):
        problems.append(Problem("data", "expected a mapping"))
    else:
        if "tokenizer" in data_raw:
            problems.append(Problem("data.tokenizer", "the tokenizer is set once for the recipe: move it to "
                                    f"tokenizer.path (top level), e.g. tokenizer: {{path: {data_raw['tokenizer']}}}"))
            data_raw = {k: v for k, v in data_raw.items() if k != "tokenizer"}
        builder = data_raw.get("builder", "pystdlib")
        if builder not in DATASETS:
            hint = ("'" + str(builder) + "' looks like an import path; recipes name a registered dataset"
                    if "." in str(builder) or ":" in str(builder) else f"unknown dataset '{builder}'"
                    + suggest(builder, DATASETS))
            problems.append(Problem("data.builder", f"{hint}; known: {', '.join(DATASETS)}"))
        else:
            sub = check(DATASETS[builder][0], data_raw, "data")
            problems += sub
            if not sub:
                data_cfg = build(DATASETS[builder][0], data_raw, "data")
    trainer = raw.get("trainer", {}) or {}
    if isinstance(trainer, dict) and isinstance(trainer.get("strategy"), str) and trainer["strategy"] not in STRATEGIES:
        problems.append(Problem("trainer.strategy", _registry_hint("strategy", trainer["strategy"], STRATEGIES)))
    config = None
    if not problems:
        entries = [e for e in plugin_list if isinstance(e, dict)]  # the others are reported below
        config = build(RecipeConfig, {**top, "data": data_raw, "plugins": entries})
        problems += check_tokenizer(config.tokenizer, config.model.path, config.model.gguf_file)
    plugins: list[Plugin] = []
    for i, cls, settings in _plugin_entries(plugin_list, problems):
        sub = check(cls.Config, settings, f"plugins.{i}.with")
        problems += sub
        if sub:
            continue
        try:
            plugins.append(cls(settings))
        except RecipeError as err:
            problems += [Problem(_with_key(i, cls.name, p.key), p.message) for p in err.problems]
    for p in plugins:
        problems += manager.check_hook_api(p)
        strategy = config.trainer.strategy if config else "auto"
        if strategy not in p.strategies:
            why = p.strategy_notes.get(strategy)
            problems.append(Problem("trainer.strategy", f"plugin '{p.name}' supports strategies "
                                    f"{', '.join(p.strategies)}, not '{strategy}'" + (f": {why}" if why else "")))
    set_aside = []
    if stage == "generate":  # the recipe trained with these; generation runs without them
        set_aside = [p.name for p in plugins if "generate" not in p.stages]
        plugins = [p for p in plugins if "generate" in p.stages]
    problems += plan.check(plugins, stage)
    ordered, order_problems = plan.order(plugins)
    problems += order_problems
    if problems:
        raise RecipeError(problems, source=source)
    return Recipe(config=config, data=data_cfg, plugins=ordered, resolved=raw, source=source,
                  plugin_order=[p.name for p in ordered], set_aside=set_aside)


def _with_key(index: int, plugin: str, key: str) -> str:
    """A plugin's own problem key ('coat.group_size') as a recipe key path."""
    rest = key[len(plugin) + 1:] if key.startswith(plugin + ".") else key
    return f"plugins.{index}.with" + (f".{rest}" if rest and rest != plugin else "")


def _registry_hint(kind: str, name: str, registry: Any) -> str:
    if "." in name or ":" in name:
        return f"'{name}' looks like an import path; recipes name a registered {kind}: {', '.join(registry)}"
    return f"unknown {kind} '{name}'{suggest(name, registry)}; known: {', '.join(registry)}"


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_model_sizes(model: dict, data: Any) -> list[Problem]:
    """Sizes >= 1, hidden divisible by heads, heads by KV heads, data.seq_len within the positions.

    Values come from ``model.config`` over the folder's config.json (``model.path``) over
    LlamaConfig's defaults, as the builder combines them.
    """
    import json

    if model.get("builder", "llama") != "llama":
        return []
    sizes: dict[str, Any] = {}
    if model.get("path"):
        try:
            sizes.update(json.loads((Path(model["path"]) / "config.json").read_text()))
        except (OSError, ValueError):
            return []  # reported by check_model
    given = dict(model.get("config") or {})
    sizes.update(given)
    problems = []
    for name in SIZE_FIELDS:
        value = sizes.get(name)
        if value is None:
            continue
        key = f"model.config.{name}" if name in given else f"model.path ({name} in config.json)"
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(Problem(key, f"must be a whole number >= 1, got {value!r}"))
            sizes[name] = None
    if problems:
        return problems
    from transformers import LlamaConfig

    defaults = LlamaConfig()
    hidden = sizes.get("hidden_size") or defaults.hidden_size
    heads = sizes.get("num_attention_heads") or defaults.num_attention_heads
    kv = sizes.get("num_key_value_heads") or heads
    if not sizes.get("head_dim") and hidden % heads:
        problems.append(Problem("model.config.hidden_size", f"{hidden} is not divisible by num_attention_heads "
                                f"{heads}; pick a multiple (or set head_dim)"))
    if heads % kv:
        problems.append(Problem("model.config.num_key_value_heads", f"num_attention_heads {heads} is not divisible "
                                f"by num_key_value_heads {kv}"))
    positions = sizes.get("max_position_embeddings") or defaults.max_position_embeddings
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > positions:
        problems.append(Problem("data.seq_len", f"{seq_len} is longer than the model's max_position_embeddings "
                                f"{positions}; shorten it or raise model.config.max_position_embeddings"))
    return problems


def load(path: str, overrides: list[str] | None = None, stage: str = "fit",
         allow_resolvers: bool = False) -> Recipe:
    """Load, merge, override and validate a recipe; every problem is reported at once.

    ``allow_resolvers``: let ``${oc.env:...}`` and other resolvers resolve (the CLI's --allow-resolvers).
    """
    cfg = load_raw(path)
    problems = apply_overrides(cfg, overrides or [])
    if problems:
        raise RecipeError(problems, source=str(path))
    try:
        plain = to_plain(cfg, allow_resolvers)
    except RecipeError as err:
        raise RecipeError(err.problems, source=str(path)) from None
    return validate(plain, stage, source=str(path))


"""Recipes: load YAML, merge ``extends:``, apply overrides, validate everything at once.

Every name in a recipe (plugin, model builder, dataset, optimizer, schedule, strategy)
resolves through a registry; nothing is imported from a dotted path, so a recipe from a
stranger cannot run code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memwise import manager, plan
from memwise.data.datasets import DATASETS, DataConfig
from memwise.errors import MemwiseError, Problem, RecipeError
from memwise.models import ModelConfig, check_model
from memwise.optim import OptimizerConfig, SchedulerConfig
from memwise.plugin import Plugin
from memwise.schema import build, check, option, suggest
from memwise.sharding import FsdpConfig

STRATEGIES = ("auto", "ddp", "ddp_spawn", "single_device", "fsdp", "deepspeed")


@dataclass(kw_only=True)
class TrainerConfig:
    """Passed to Lightning's Trainer (strategy, devices, num_nodes, precision) and the loop."""

    max_steps: int = option(200, "optimizer steps to train")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = option("32-true", "Lightning precision")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = option("auto", "Lightning accelerator")
    devices: Union[int, str] = option(1, "devices (processes) per node")
    num_nodes: int = option(1, "nodes")
    strategy: str = option("auto", f"Lightning strategy: {', '.join(STRATEGIES)} (fsdp: FSDP2 sharding)")
    fsdp: FsdpConfig = option(FsdpConfig(), "FSDP2 settings, used with strategy fsdp")
    gradient_clip_val: Optional[float] = option(1.0, "clip the gradient norm to this value (None: off)")
    val_every_n_steps: int = option(50, "validate every N steps (also before the first and after the last)")
    log_every_n_steps: int = option(10, "write a metrics row every N steps")
    checkpoint_every_n_steps: Optional[int] = option(None, "save a resumable checkpoint every N steps")
    num_threads: Optional[int] = option(None, "torch CPU threads (None: torch's default)")
    progress_bar: bool = option(True, "rich progress bar")


@dataclass(kw_only=True)
class ReportConfig:
    dir: Optional[str] = option(None, "report folder (default runs/<name>)")
    plots: bool = option(True, "write memory.png and loss.png")
    probe_memory: bool = option(True, "measure memory per category on a probe step after training")
    save_model: bool = option(False, "save the trained model as a HF folder (config.json + safetensors) in "
                              "<report>/model, loadable with model.path")


@dataclass(kw_only=True)
class GenerateConfig:
    max_new_tokens: int = option(64, "tokens to generate")
    do_sample: bool = option(False, "sample (True) or greedy (False)")
    temperature: float = option(1.0, "sampling temperature")
    top_k: Optional[int] = option(None, "sample among the k most likely tokens")
    checkpoint: Optional[str] = option(None, "memwise checkpoint whose weights to generate with")


@dataclass(kw_only=True)
class RecipeConfig:
    extends: list[str] = option([], "recipes merged first, in order (paths relative to this file)")
    name: str = option("run", "run name (report folder, checkpoints)")
    seed: int = option(0, "global seed (model init, data order)")
    model: ModelConfig = option(ModelConfig(), "the model")
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


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError([Problem(str(path), f"not valid YAML: {err}")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError([Problem(str(path), f"cannot be read as a text recipe: {err}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([Problem(str(path), f"a recipe is a YAML mapping, this file holds a {type(data).__name__}")])
    return data


def load_raw(path: str, _seen: tuple = ()) -> DictConfig:
    """The recipe with its ``extends`` merged (earlier first, this file last)."""
    file = find(path).resolve()
    if file in _seen:
        raise RecipeError([Problem(str(file), "extends itself (a cycle through: "
                                   + " -> ".join(str(s) for s in _seen) + ")")])
    data = _read(file)
    parents = data.pop("extends", []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        local = file.parent / parent
        target = str(local) if local.is_file() else parent
        merged = OmegaConf.merge(merged, load_raw(target, _seen + (file,)))
    try:
        return OmegaConf.merge(merged, OmegaConf.create(data))
    except OmegaConfBaseException as err:
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
            uses = [p.get("use") for p in (cfg.get("plugins") or [])]
            if parts[1] not in uses:
                problems.append(Problem(key, f"no plugin '{parts[1]}' in this recipe" + suggest(parts[1], uses)))
                continue
            parts[1] = str(uses.index(parts[1]))
        try:
            OmegaConf.update(cfg, ".".join(parts), value, merge=True, force_add=True)
        except (OmegaConfBaseException, IndexError, KeyError, ValueError, TypeError) as err:
            problems.append(Problem(key, f"cannot set this key: {err}"))
    return problems


def to_plain(cfg: DictConfig | ListConfig | dict) -> dict:
    """Plain Python containers with interpolations resolved (OmegaConf objects never leave here)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise RecipeError([Problem("recipe", f"an interpolation cannot be resolved: {err}")]) from None
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
    if not isinstance(raw.get("plugins", []), list):
        problems.append(Problem("plugins", "expected a list of {use: NAME, with: {...}}"))
    data_raw = raw.get("data", {})
    data_cfg = None
    if not isinstance(data_raw, dict):
        problems.append(Problem("data", "expected a mapping"))
    else:
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
        config = build(RecipeConfig, {**top, "data": data_raw, "plugins": raw.get("plugins", [])})
        problems += check_model(config.model)
    plugins: list[Plugin] = []
    for i, cls, settings in _plugin_entries(raw.get("plugins", []) or [], problems):
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


def load(path: str, overrides: list[str] | None = None, stage: str = "fit") -> Recipe:
    """Load, merge, override and validate a recipe; every problem is reported at once."""
    cfg = load_raw(path)
    problems = apply_overrides(cfg, overrides or [])
    if problems:
        raise RecipeError(problems, source=str(path))
    return validate(to_plain(cfg), stage, source=str(path))


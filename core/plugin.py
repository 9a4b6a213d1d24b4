"""The Plugin base class: metadata, a Config dataclass, hook methods.

In a user's own Trainer a plugin runs through ``memwise.lightning.MemwiseCallback(plugins=[...])``."""

from __future__ import annotations

import dataclasses
import functools
from importlib import metadata
from typing import Any, ClassVar

import pluggy

from memwise.errors import MemwiseError, PluginHookError, RecipeError
from memwise.hookspecs import HOOK_API
from memwise.schema import as_dict, build

hookimpl = pluggy.HookimplMarker("memwise")

def _name_errors(fn: Any, hook: str) -> Any:
    """Re-raise any exception of a hook method as a PluginHookError naming plugin and hook."""

    @functools.wraps(fn)
    def wrapper(self: Plugin, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except MemwiseError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point is to name who failed
            raise PluginHookError(self.name, hook, exc) from exc

    return wrapper


class Plugin:
    """One memory-efficiency technique.

    Subclasses set the class attributes below, define a ``Config`` dataclass (the schema
    of the recipe's ``with:`` block) and implement hooks as methods marked with
    ``memwise.hookimpl``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("fit",)
    phase: ClassVar[str] = "runtime"
    before: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    composes_with: ClassVar[tuple[str, ...]] = ()
    """Plugins that may provide the same capability as this one (they cooperate)."""
    wraps: ClassVar[bool] = False
    """True when this plugin may replace modules another plugin already claimed."""
    required_on_load: ClassVar[bool] = False
    """True when a checkpoint made with this plugin cannot be loaded without it."""
    strategies: ClassVar[tuple[str, ...]] = ("auto", "ddp", "ddp_spawn", "single_device")
    strategy_notes: ClassVar[dict[str, str]] = {}
    """Why a strategy outside ``strategies`` is refused and what to do instead (shown in the error)."""
    per_rank_state: ClassVar[bool] = False
    """True when the plugin's estimate of parameters, gradients or optimizer state is one rank's
    FSDP2 shard, read from ``ctx.workload.shards`` (``memwise plan`` then asks it per device count)."""
    planned: ClassVar[bool] = True
    """False for plugins that change what is trained (pruning, data): ``memwise plan`` then leaves
    them out of its combinations."""
    hook_api: ClassVar[int] = HOOK_API
    distribution: ClassVar[str] = ""
    """The distribution that ships the plugin, for install hints and manifests."""
    capability_switch: ClassVar[dict[str, str]] = {}
    """Per capability it provides, the recipe setting that turns that part off (e.g. COAT's
    ``{"activation.storage": "coat.activations: false"}``), quoted in clash messages."""
    plan_variants: ClassVar[tuple[dict, ...]] = ()
    """Settings ``memwise plan`` tries besides the defaults and the capability switches (e.g. kvprune's
    FP8, int4, ThinK and SnapKV caches and their compositions)."""

    @dataclasses.dataclass
    class Config:
        pass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if attr.startswith("memwise_") and callable(value) and hasattr(value, "memwise_impl"):
                setattr(cls, attr, _name_errors(value, attr))

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        if isinstance(config, self.Config):
            cfg = dataclasses.replace(config, **overrides) if overrides else config
        else:
            data = dict(config or {})
            data.update(overrides)
            try:
                cfg = build(self.Config, data, path=self.name)
            except RecipeError as err:
                raise RecipeError(err.problems, source=f"plugin '{self.name}'") from None
        self.config = cfg
        self.post_init()

    def post_init(self) -> None:
        """Check config values that the type alone cannot (raise RecipeError)."""

    def provides(self) -> set[str]:
        """Capabilities this plugin takes, given its config."""
        return set()

    def requires(self) -> set[str]:
        """Capabilities another plugin must provide for this one to work."""
        return set()

    def slowdown(self, ctx: Any) -> float:
        """Expected step time with this plugin over the step time without it, given ``ctx.model`` and
        ``ctx.workload`` (the planner's cost model; 1.0 = no cost)."""
        return 1.0

    def quality_cost(self, ctx: Any) -> float:
        """How much this config may change the output against the exact computation, for the planner's
        ranking at equal fit: 0.0 = exact (the default; memory techniques that keep the maths), larger =
        more approximate (e.g. a KV cache that drops tokens)."""
        return 0.0

    def transforms_model(self) -> bool:
        """False when this config asks for no model surgery: the core then skips
        ``memwise_transform_model`` and its no-effect warning."""
        return True

    def config_dict(self) -> dict:
        """The resolved config as a plain dict (manifests, reports)."""
        return as_dict(self.config)

    @classmethod
    def version(cls) -> str:
        """Version of the distribution that ships this plugin, or 'unknown'."""
        if not cls.distribution:
            return "unknown"
        try:
            return metadata.version(cls.distribution)
        except metadata.PackageNotFoundError:
            return "unknown"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config_dict()})"

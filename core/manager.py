"""Plugin discovery (entry points) and the per-plan pluggy host."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from memwise import hookspecs
from memwise.errors import MemwiseError, NoEffectWarning, PluginHookError, Problem, TeardownError
from memwise.plugin import Plugin
from memwise.schema import suggest

GROUP = "memwise.plugins"


@dataclass(frozen=True)
class Available:
    """An installed plugin, known from entry-point metadata alone (nothing imported)."""

    name: str
    distribution: str
    version: str
    target: str


def _env_allow() -> set[str] | None:
    raw = os.environ.get("MEMWISE_PLUGINS", "").strip()
    return {n.strip() for n in raw.split(",") if n.strip()} if raw else None


def autoload_disabled() -> bool:
    return os.environ.get("MEMWISE_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false", "no")


def available() -> dict[str, Available]:
    """Installed plugins by name, honouring MEMWISE_DISABLE_PLUGIN_AUTOLOAD and MEMWISE_PLUGINS."""
    if autoload_disabled():
        return {}
    allow = _env_allow()
    found: dict[str, Available] = {}
    for ep in metadata.entry_points(group=GROUP):
        if allow is not None and ep.name not in allow:
            continue
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "unknown"
        found[ep.name] = Available(ep.name, dist, version, ep.value)
    return dict(sorted(found.items()))


def why_unavailable(name: str) -> str:
    """A sentence saying why ``name`` cannot be used, with what to do."""
    if autoload_disabled():
        return ("plugin autoloading is off (MEMWISE_DISABLE_PLUGIN_AUTOLOAD is set); unset it, or pass "
                "plugin objects directly in Python")
    names = list(available())
    allow = _env_allow()
    if allow is not None and name not in allow:
        return f"MEMWISE_PLUGINS allows only {', '.join(sorted(allow))}; add '{name}' to it"
    if "." in name or ":" in name:
        return ("recipes name plugins by their registered name, never by import path (a recipe must not be able "
                f"to run arbitrary code); installed plugins: {', '.join(names) or 'none'}")
    hint = suggest(name, names)
    return (f"unknown plugin '{name}'{hint}; installed plugins: {', '.join(names) or 'none'}. "
            f"If it is a memwise plugin, install its distribution: pip install memwise-{name}")


def load(name: str) -> type[Plugin]:
    """Import the plugin class registered under ``name``."""
    if name not in available():
        raise MemwiseError(why_unavailable(name))
    ep = next(e for e in metadata.entry_points(group=GROUP) if e.name == name)
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise MemwiseError(f"entry point '{name}' ({ep.value}) is not a memwise.Plugin subclass")
    if cls.name != name:
        raise MemwiseError(f"entry point '{name}' loads plugin class {cls.__name__} whose name is '{cls.name}'")
    return cls


def check_hook_api(plugin: Plugin) -> list[Problem]:
    if plugin.hook_api > hookspecs.HOOK_API:
        return [Problem(f"plugin '{plugin.name}'", f"written for hook API {plugin.hook_api}, this memwise has "
                        f"{hookspecs.HOOK_API}; upgrade memwise")]
    return []


class PluginHost:
    """A pluggy manager for one plan, calling hooks in plan order."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = list(plugins)
        self.pm = pluggy.PluginManager("memwise")
        self.pm.add_hookspecs(hookspecs)
        # pluggy calls the last registered first: register in reverse plan order
        for p in reversed(self.plugins):
            self.pm.register(p, name=p.name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            name = getattr(getattr(err, "plugin", None), "name", "?")
            raise MemwiseError(f"plugin '{name}' implements a hook that memwise does not define: {err}. "
                               "Hook names start with 'memwise_' and are listed in docs/hooks.md") from None

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def each(self, hook_name: str, **kwargs: Any) -> Iterable[tuple[Plugin, Any]]:
        """Call one hook plugin by plugin, in plan order, yielding (plugin, result)."""
        for p in self.plugins:
            method = getattr(p, hook_name, None)
            if method is not None and hasattr(method, "memwise_impl"):
                yield p, method(**kwargs)

    def implements(self, plugin: Plugin, hook_name: str) -> bool:
        return hasattr(getattr(plugin, hook_name, None), "memwise_impl")

    def step_context(self, ctx: Any) -> contextlib.ExitStack:
        """The plugins' step contexts, entered in plan order (left in reverse); an error raised by
        one on entry or exit names the plugin and the hook."""
        stack = contextlib.ExitStack()
        try:
            for plugin, cm in self.each("memwise_step_context", ctx=ctx):
                if cm is not None:
                    stack.enter_context(_NamedContext(plugin.name, cm))
        except BaseException:
            stack.close()
            raise
        return stack

    def teardown(self, ctx: Any) -> None:
        """Every plugin's teardown in reverse plan order, then the registered undo actions; a
        failing one never skips the others, and every failure is reported together."""
        errors: list[BaseException] = []
        for plugin in reversed(self.plugins):
            if self.implements(plugin, "memwise_teardown"):
                try:
                    plugin.memwise_teardown(ctx=ctx)
                except Exception as err:  # noqa: BLE001 - gathered, the others still run
                    errors.append(err)
        try:
            ctx.run_teardown()
        except TeardownError as err:
            errors += err.errors
        if errors:
            raise TeardownError(errors)

    def transform_model(self, ctx: Any) -> dict[str, list[str]]:
        """Run model surgery plugin by plugin; warn for each that changed nothing."""
        changes: dict[str, list[str]] = {}
        for p in self.plugins:
            if not self.implements(p, "memwise_transform_model") or not p.transforms_model():
                continue
            before = module_signature(ctx.model)
            claimed = len(ctx.claims.claims_of(p.name))
            p.memwise_transform_model(ctx=ctx)
            after = module_signature(ctx.model)
            changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
            changes[p.name] = changed
            if not changed and len(ctx.claims.claims_of(p.name)) == claimed:
                warnings.warn(f"plugin '{p.name}' changed no module of this model: check its include/layers "
                              "settings against the model's module names", NoEffectWarning, stacklevel=2)
        return changes


class _NamedContext(contextlib.AbstractContextManager):
    """A plugin's step context whose own errors (on entry or exit) name the plugin and hook."""

    def __init__(self, plugin: str, cm: Any) -> None:
        self.plugin, self.cm = plugin, cm

    def __enter__(self) -> Any:
        try:
            return self.cm.__enter__()
        except MemwiseError:
            raise
        except Exception as err:  # noqa: BLE001 - the point is to name who failed
            raise PluginHookError(self.plugin, "memwise_step_context (entering)", err) from err

    def __exit__(self, et: Any, ev: Any, tb: Any) -> Any:
        try:
            return self.cm.__exit__(et, ev, tb)
        except MemwiseError:
            raise
        except Exception as err:  # noqa: BLE001
            if err is ev:  # the step's own error passing through
                raise
            raise PluginHookError(self.plugin, "memwise_step_context (leaving)", err) from err


def module_signature(model: Any) -> dict[str, str]:
    """Module types and parameter shapes by name: what surgery changes."""
    sig = {}
    for name, mod in model.named_modules():
        shapes = ",".join(f"{n}{tuple(t.shape)}{str(t.dtype).replace('torch.', '')}"
                          for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                          if t is not None)
        sig[name or "<root>"] = f"{type(mod).__name__}[{shapes}]"
    return sig

"""Plugin discovery: installed plugins from entry-point metadata, loaded by registered name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from memwise import hookspecs
from memwise.errors import MemwiseError, Problem
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


def _entry_points() -> dict[str, metadata.EntryPoint]:
    """Registered plugin entry points by name, honouring MEMWISE_DISABLE_PLUGIN_AUTOLOAD and MEMWISE_PLUGINS."""
    if autoload_disabled():
        return {}
    allow = _env_allow()
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP) if allow is None or ep.name in allow}


def available() -> dict[str, Available]:
    """Installed plugins by name."""
    found = {name: Available(name, ep.dist.name if ep.dist else "unknown", ep.dist.version if ep.dist else "unknown",
                             ep.value) for name, ep in _entry_points().items()}
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
    ep = _entry_points().get(name)
    if ep is None:
        raise MemwiseError(why_unavailable(name))
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

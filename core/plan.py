"""The plan: plugin order (phases, before/after, recipe order), capabilities, claims."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memwise.errors import ClaimConflict, Problem

if TYPE_CHECKING:
    from memwise.plugin import Plugin

STAGES = ("fit", "generate")
"""Stages a plugin may act at (``Plugin.stages``): training, or generation and prediction."""
PHASES = ("data", "prune", "adapt", "replace", "wrap", "optimizer", "runtime")
"""Plan order of ``Plugin.phase``: a plugin runs after every plugin of an earlier phase."""
CAPABILITIES = ("activation.storage", "activation.placement", "optimizer.states", "kv.cache", "data.batching",
                "linear.compute", "loss.head")
"""What a plugin may take (``provides``) or need (``requires``); two providers of one clash."""


def order(plugins: Sequence[Plugin]) -> tuple[list[Plugin], list[Problem]]:
    """Sort by phase; inside a phase honour before/after, then recipe order."""
    problems: list[Problem] = []
    for p in plugins:
        if p.phase not in PHASES:
            problems.append(Problem(f"plugin '{p.name}'", f"unknown phase '{p.phase}'; phases: {', '.join(PHASES)}"))
    if problems:
        return list(plugins), problems
    position = {p.name: i for i, p in enumerate(plugins)}
    names = set(position)
    edges: dict[str, set[str]] = {p.name: set() for p in plugins}  # a -> b: a runs before b
    for p in plugins:
        for other in p.before:
            if other in names:
                edges[p.name].add(other)
        for other in p.after:
            if other in names:
                edges[other].add(p.name)
    by_name = {p.name: p for p in plugins}
    for a, targets in edges.items():
        for b in targets:
            if PHASES.index(by_name[a].phase) > PHASES.index(by_name[b].phase):
                problems.append(Problem(f"plugin '{a}'", f"must run before '{b}', but its phase "
                                        f"'{by_name[a].phase}' comes after '{by_name[b].phase}'"))
    indegree = {n: 0 for n in names}
    for targets in edges.values():
        for b in targets:
            indegree[b] += 1
    ready = [n for n in names if indegree[n] == 0]
    result: list[Plugin] = []
    while ready:
        ready.sort(key=lambda n: (PHASES.index(by_name[n].phase), position[n]))
        n = ready.pop(0)
        result.append(by_name[n])
        for b in edges[n]:
            indegree[b] -= 1
            if indegree[b] == 0:
                ready.append(b)
    if len(result) < len(plugins):
        stuck = sorted(names - {p.name for p in result})
        problems.append(Problem("plugins", f"before/after constraints form a cycle among: {', '.join(stuck)}"))
        result += [by_name[n] for n in stuck]
    return result, problems


def check(plugins: Sequence[Plugin], stage: str) -> list[Problem]:
    """Stage fit, duplicate names, exclusive capabilities and unmet requirements."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, p in enumerate(plugins):
        key = f"plugins.{i}"
        if p.name in seen:
            problems.append(Problem(key, f"plugin '{p.name}' is listed twice (also plugins.{seen[p.name]})"))
        seen.setdefault(p.name, i)
        if stage in STAGES and stage not in p.stages:
            problems.append(Problem(key, f"plugin '{p.name}' acts at stage {'/'.join(p.stages)}, but this command "
                                    f"runs stage '{stage}': remove it from the recipe or use the matching command "
                                    f"({'memwise generate' if 'generate' in p.stages else 'memwise run'})"))
        for cap in p.provides() | p.requires():
            if cap not in CAPABILITIES:
                problems.append(Problem(key, f"plugin '{p.name}' names unknown capability '{cap}'"))
    providers: dict[str, list[Plugin]] = {}
    for p in plugins:
        for cap in p.provides():
            providers.setdefault(cap, []).append(p)
    for cap, ps in providers.items():
        for i, a in enumerate(ps):
            for b in ps[i + 1:]:
                if b.name in a.composes_with or a.name in b.composes_with:
                    continue
                problems.append(Problem("plugins", f"plugins '{a.name}' and '{b.name}' both provide '{cap}'; "
                                        + _clash_hint(a, b, cap)))
    provided = set(providers)
    for i, p in enumerate(plugins):
        for cap in p.requires() - provided:
            problems.append(Problem(f"plugins.{i}", f"plugin '{p.name}' requires capability '{cap}', "
                                    "which no plugin in this recipe provides"))
    return problems


def _clash_hint(a: Plugin, b: Plugin, cap: str) -> str:
    """What to do: a plugin's own switch for that part when one has it, else keep one plugin."""
    switches = [f"{p.name}: set {p.capability_switch[cap]}" for p in (a, b) if cap in p.capability_switch]
    if switches:
        return "keep one, or switch that part off (" + "; ".join(switches) + ")"
    return f"keep one of them (neither has a setting that turns '{cap}' off)"


class ClaimsLedger:
    """Which plugin replaced which module: two replacements of one module conflict."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.by_plugin: dict[str, list[str]] = {}

    def claim(self, module_name: str, plugin: Plugin) -> None:
        """Record that ``plugin`` replaces ``module_name``; raises ClaimConflict when taken."""
        current = self.owner.get(module_name)
        if current is not None and current != plugin.name and not plugin.wraps:
            raise ClaimConflict(f"plugin '{plugin.name}' tried to replace module '{module_name}', already replaced "
                                f"by plugin '{current}'; only a plugin that declares wraps=True may do that")
        self.owner[module_name] = plugin.name
        self.by_plugin.setdefault(plugin.name, []).append(module_name)

    def claims_of(self, plugin_name: str) -> list[str]:
        return list(self.by_plugin.get(plugin_name, []))

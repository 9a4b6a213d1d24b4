"""pytest fixtures for plugin authors, loaded by pytest through memwise's ``pytest11`` entry point.

Installing memwise gives every plugin repository the same fixtures the first-party plugins
use: a tiny Llama, the real test model, triton's interpreter, a machine without a C++ compiler
for the CPU kernels, and a plugin registered as if its distribution were installed, without
running pip inside a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from memwise import testing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about ten seconds (deselect with -m 'not slow')")


@pytest.fixture
def tiny_llama() -> Callable:
    """Factory of seeded random HF Llama models: ``tiny_llama(hidden=64, layers=2, ...)``."""
    return testing.tiny_llama


@pytest.fixture
def real_model() -> Path:
    """The SmolLM2-135M-Instruct folder; the test is skipped, saying how to fetch it, when absent."""
    return testing.require_real_model()


@pytest.fixture
def triton_interpreter() -> Callable:
    """``run(script)`` runs a script under TRITON_INTERPRET=1 in a subprocess; skips without triton."""
    pytest.importorskip("triton")
    return testing.run_under_triton_interpreter


@pytest.fixture
def no_cpu_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every :func:`memwise.kernels.cpu_extension.cpu_extension` build fails as on a machine without a
    C++ compiler ("no C++ compiler found"), with nothing built earlier in the process remembered."""
    import torch.utils.cpp_extension

    from memwise.kernels import cpu_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_extension, "_BUILT", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)


@dataclass(frozen=True)
class _Dist:
    name: str
    version: str


@dataclass(frozen=True)
class _EntryPoint:
    """The part of importlib.metadata.EntryPoint that memwise's discovery reads."""

    name: str
    value: str
    group: str
    dist: _Dist
    target: type

    def load(self) -> type:
        return self.target


@pytest.fixture
def installed_plugin(monkeypatch: pytest.MonkeyPatch) -> Callable:
    """``install(PluginClass)`` makes memwise discover the class as an installed entry point.

    Discovery, ``memwise plugins list`` and recipes then see it exactly as they would after
    ``pip install``; the registration ends with the test.
    """
    import types
    from importlib import metadata

    from memwise import manager

    extra: list[_EntryPoint] = []

    def entry_points(**params):
        found = list(metadata.entry_points(**params))
        return found + extra if params.get("group") == manager.GROUP else found

    # only memwise's discovery sees the extra entry point; importlib.metadata itself is untouched
    monkeypatch.setattr(manager, "metadata", types.SimpleNamespace(entry_points=entry_points))

    def install(cls: type, distribution: str | None = None, version: str = "0.0.0") -> None:
        dist = _Dist(distribution or f"memwise-{cls.name}", version)
        extra.append(_EntryPoint(cls.name, f"{cls.__module__}:{cls.__qualname__}", manager.GROUP, dist, cls))

    return install

"""Compiled CPU kernels: a C++ source built once per machine, with the torch path kept where it cannot be.

The plugins' CPU kernels are C++ files built on first use by torch's extension loader (a C++
compiler and ninja; the binary is cached per CPU capability, so a machine without AVX2 never
loads one built with it). A failed build is not an error: the caller keeps its torch path, and
the reason is warned once per process.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_BUILT: dict[str, Any] = {}


def arch_flags() -> list[str]:
    """Vector instructions only where this machine has them (the binary is cached per capability)."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def cpu_extension(name: str, source: Path, flags: list[str], owner: str, fallback: str) -> Any | None:
    """The module built from ``source``, or None where it cannot be built (warned once, with the reason).

    ``name`` is suffixed with the CPU capability; ``flags`` are compiler flags besides
    :func:`arch_flags`; ``owner`` names the plugin and kernel in messages and ``fallback`` says
    what runs instead.
    """
    key = f"{name}_{torch.backends.cpu.get_cpu_capability().lower()}"
    if key not in _BUILT:
        _BUILT[key] = None
        try:
            from torch.utils.cpp_extension import load

            log.info("%s: building the kernel (once per machine)", owner)
            _BUILT[key] = load(name=key, sources=[str(source)], extra_cflags=flags + arch_flags(), verbose=False)
        except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
            warnings.warn(f"{owner} could not be built ({type(exc).__name__}: {exc}); {fallback}", stacklevel=3)
    return _BUILT[key]

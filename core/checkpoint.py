"""What memwise adds to a checkpoint: a manifest, RNG states, plugin states; atomic writes."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memwise import manager
from memwise.errors import InputError, WriteError
from memwise.files import write_failure
from memwise.hookspecs import HOOK_API
from memwise.version import __version__


def manifest(plugins: list, recipe: dict | None = None) -> dict:
    """Plugins, their distributions, versions and resolved configs, as plain dicts."""
    return {
        "memwise_version": __version__,
        "hook_api": HOOK_API,
        "plugins": [{"name": p.name, "distribution": p.distribution, "version": p.version(),
                     "config": p.config_dict(), "required_on_load": p.required_on_load} for p in plugins],
        "recipe": recipe or {},
    }


def check_manifest(saved: dict, plugins: list) -> None:
    """Fail with the recipe snippet to add when a required plugin is missing now."""
    present = {p.name for p in plugins}
    for entry in saved.get("plugins", []):
        if entry.get("required_on_load") and entry["name"] not in present:
            installed = entry["name"] in manager.available()
            snippet = f"plugins:\n  - use: {entry['name']}\n    with: {entry.get('config', {})}"
            how = "" if installed else f" and install it (pip install {entry.get('distribution') or 'memwise-' + entry['name']})"
            raise InputError(f"this checkpoint was made with plugin '{entry['name']}', which is required to load "
                               f"it; add it to the recipe{how}:\n{snippet}")


def rng_state() -> dict:
    """torch, numpy and python RNG states as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise WriteError(write_failure(path, err)) from err
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain data only."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint '{path}' does not exist") from None
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise InputError(f"checkpoint '{path}' cannot be loaded safely (weights_only=True): {err}") from None

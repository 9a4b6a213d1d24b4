"""Model surgery shared by plugins: which modules a plugin acts on, and one way to change and undo them.

Selection has one meaning in every plugin:

- ``layers``: decoder layers, ``"all"``, a list of indices (negative ones count from the end)
  or a string of inclusive ranges (``"1,3-5"``). A plugin that acts on modules (Mesa, COAT)
  keeps to the modules inside the chosen decoder layers when ``layers`` is not ``"all"``.
- ``include`` / ``exclude``: ``fnmatch`` patterns on qualified module names.
- ``kinds``: what a module is (``KINDS``), decided by ``kind`` for every plugin alike.

Changes are recorded on the module with the name of the plugin that made them (its owner):
a class swap (``swap_class``: a subclass of the module's own class, so parameter names,
parameter objects and state-dict keys stay), a wrapped ``forward`` (``wrap_forward``) and
attached submodules or attributes (``attach``). ``restore(model, owner)`` is the one undo.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from fnmatch import fnmatch
from typing import Any, Union

from torch import nn

from memwise import architectures

KINDS = ("linear", "norm", "activation", "glu", "attention")
"""Module kinds plugins convert: nn.Linear, LayerNorm/RMSNorm, a parameter-free activation, a gated
(SwiGLU) MLP with gate/up/down projections, and an HF attention module with separate q/k/v."""

ACTIVATIONS = ("SiLU", "GELU", "SiLUActivation", "GELUActivation", "GELUTanh", "PytorchGELUTanh",
               "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation")
"""Class names of the activation modules (torch's and transformers') counted as kind ``activation``."""

LayerSpec = Union[str, list[int]]
"""A ``layers`` setting: "all", decoder-layer indices, or inclusive ranges such as "1,3-5"."""

_ORIGINAL = "memwise_original"
_OWNER = "memwise_owner"
_WRAPS = "_memwise_wraps"
_ATTACHED = "_memwise_attached"


class LayerSelectionError(IndexError, ValueError):
    """A ``layers`` setting that names no valid decoder layer (an index out of range, an unreadable range)."""


def parse_layers(spec: LayerSpec | None) -> list[int] | None:
    """The indices ``spec`` names (None: every layer), checked for form but not against a model, so a
    plugin can refuse a bad setting before any model exists.

    ``"all"`` (or None), a list of ints (negative ones count from the end) or a string of
    inclusive ranges such as ``"4-77"`` or ``"0,2,5-6"``.
    """
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        wanted: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            try:
                wanted += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            except ValueError:
                raise LayerSelectionError(f"cannot read layers '{spec}': write 'all', indices such as [0, 2] "
                                          "or ranges such as '1,3-5'") from None
        return wanted
    wanted = list(spec)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
        raise LayerSelectionError(f"layers {wanted} are not decoder-layer indices: write 'all', indices such as "
                                  "[0, 2] or ranges such as '1,3-5'")
    return wanted


def layer_indices(spec: LayerSpec | None, n: int) -> list[int]:
    """Sorted decoder-layer indices of ``spec`` (see ``parse_layers``) for a model with ``n`` layers."""
    wanted = parse_layers(spec)
    if wanted is None:
        return list(range(n))
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise LayerSelectionError(f"layer indices {bad} out of range for a model with {n} decoder layers")
    return sorted({i % n for i in wanted})


def select_layers(model: nn.Module, layers: LayerSpec | None = "all") -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the decoder layers named by ``layers`` (see ``layer_indices``)."""
    found = architectures.decoder_layers(model)
    return [found[i] for i in layer_indices(layers, len(found))]


def selected(name: str, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> bool:
    """True when ``name`` matches an ``include`` pattern (None: every name) and no ``exclude`` pattern."""
    if any(fnmatch(name, p) for p in exclude):
        return False
    return include is None or any(fnmatch(name, p) for p in include)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before any ``swap_class``."""
    cls = type(module)
    while _ORIGINAL in cls.__dict__:
        cls = cls.__dict__[_ORIGINAL]
    return cls


def kind(module: nn.Module) -> str | None:
    """The module's kind (one of ``KINDS``) or None; a swapped module has the kind of its original class."""
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "glu"
    if isinstance(module, nn.Linear):
        return "linear"
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")) and hasattr(module, "config"):
        return "attention"
    cls = original_class(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (cls.endswith(("RMSNorm", "LayerNorm")) and
                                                          isinstance(getattr(module, "weight", None), nn.Parameter)):
        return "norm"
    if cls in ACTIVATIONS and not any(True for _ in module.parameters()):
        return "activation"
    return None


def select_modules(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                   layers: LayerSpec | None = "all",
                   kinds: Sequence[str] = KINDS) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module of a kind in ``kinds`` that the selection keeps.

    ``layers`` other than ``"all"`` keeps only modules inside the chosen decoder layers.
    """
    prefixes = None
    if layers not in (None, "all"):
        prefixes = tuple(f"{name}." for name, _ in select_layers(model, layers))
    for name, module in model.named_modules():
        found = kind(module) if name else None
        if found is None or found not in kinds or not selected(name, include, exclude):
            continue
        if prefixes is not None and not name.startswith(prefixes):
            continue
        yield name, module, found


# --- change and undo ---------------------------------------------------------------------

@functools.cache
def _subclass(mixin: type, cls: type, prefix: str, owner: str) -> type:
    return type(f"{prefix}{cls.__name__}", (mixin, cls),
                {_ORIGINAL: cls, _OWNER: owner, "__module__": cls.__module__})


def swap_class(module: nn.Module, mixin: type, owner: str, prefix: str) -> None:
    """Give ``module`` the subclass ``(mixin, its class)``, named ``prefix + class name`` (made once per class)."""
    module.__class__ = _subclass(mixin, type(module), prefix, owner)


def owner(module: nn.Module) -> str | None:
    """The owner of the module's newest class swap (also under a class another library put on top), or None."""
    return next((vars(cls)[_OWNER] for cls in type(module).__mro__ if _OWNER in vars(cls)), None)


def swapped_by(module: nn.Module, owner_name: str) -> bool:
    """True when one of the module's class swaps is ``owner_name``'s."""
    return any(vars(cls).get(_OWNER) == owner_name for cls in type(module).__mro__)


def wrap_forward(module: nn.Module, owner_name: str, wrapper: Callable[..., Any], *extra: Any) -> None:
    """``module.forward`` becomes ``wrapper(module, previous forward, *extra, *args, **kwargs)``."""
    previous = module.__dict__.get("forward")
    module.__dict__.setdefault(_WRAPS, []).append((owner_name, previous))
    module.forward = functools.partial(wrapper, module, module.forward, *extra)


def wrapped_by(module: nn.Module, owner_name: str) -> bool:
    return any(o == owner_name for o, _ in module.__dict__.get(_WRAPS, ()))


def attach(module: nn.Module, owner_name: str, name: str, value: Any) -> None:
    """Set a submodule (it joins the state dict) or a plain attribute that ``restore`` removes."""
    if isinstance(value, nn.Module):
        module.add_module(name, value)
    else:
        setattr(module, name, value)
    module.__dict__.setdefault(_ATTACHED, {}).setdefault(owner_name, []).append(name)


def attached(module: nn.Module, owner_name: str) -> list[str]:
    return list(module.__dict__.get(_ATTACHED, {}).get(owner_name, ()))


def touched(module: nn.Module, owner_name: str) -> bool:
    """True when ``owner_name`` swapped, wrapped or attached anything on ``module``."""
    return swapped_by(module, owner_name) or wrapped_by(module, owner_name) or bool(attached(module, owner_name))


def _unwrap(module: nn.Module, owner_name: str) -> None:
    wraps = module.__dict__[_WRAPS]
    if wraps[-1][0] != owner_name:
        raise RuntimeError(f"cannot undo {owner_name}'s wrap of {type(module).__name__}.forward: "
                           f"{wraps[-1][0]} wrapped it later; undo {wraps[-1][0]} first")
    _, previous = wraps.pop()
    if previous is None:
        del module.forward
    else:
        module.forward = previous
    if not wraps:
        del module.__dict__[_WRAPS]


def restore(model: nn.Module, owner_name: str) -> list[str]:
    """Undo every change ``owner_name`` made to ``model``; returns the names of the modules restored.

    Class swaps, wrapped forwards and attachments go, so the model is the one it was before,
    with the same parameter objects. Changes are undone newest first: a class swap that another
    class was later put on top of stays (with a warning), a wrap under another is an error.
    """
    restored = []
    for name, module in model.named_modules():
        if not touched(module, owner_name):
            continue
        if vars(type(module)).get(_OWNER) == owner_name:
            module.__class__ = vars(type(module))[_ORIGINAL]
        elif swapped_by(module, owner_name):
            warnings.warn(f"{name}: {owner_name}'s class swap stays, {type(module).__name__} was put on top of "
                          "it later (undo that first)", stacklevel=2)
        while wrapped_by(module, owner_name):
            _unwrap(module, owner_name)
        names = module.__dict__.get(_ATTACHED, {}).pop(owner_name, [])
        for attr in names:
            if attr in module._modules:
                del module._modules[attr]
            else:
                module.__dict__.pop(attr, None)
        if not module.__dict__.get(_ATTACHED, True):
            del module.__dict__[_ATTACHED]
        restored.append(name)
    return restored

"""Validate plain dicts against config dataclasses, reporting every problem at once.

OmegaConf's structured configs stop at the first error; recipes need all of them with
full key paths and a "did you mean", so validation is done here and OmegaConf is used
for loading, merging and interpolation only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from memwise.errors import Problem, RecipeError


def option(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a default and the one-line doc shown in references.

    ``ge``/``gt``/``le``/``lt`` declare the field's numeric range (each element of a list);
    a ranged number must also be finite. Checked with every other problem by ``check``.
    """
    meta: dict[str, Any] = {"doc": doc}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_BOUND_TEXT = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def describe_range(bounds: dict[str, float]) -> str:
    """'>= 1', 'in [0, 1)' ... for messages and references."""
    lo = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    hi = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{_num(lo[1])}, {_num(hi[1])}{']' if hi[0] == 'le' else ')'}"
    k, v = lo or hi
    return _BOUND_TEXT[k].format(_num(v))


def check_range(bounds: dict[str, float], value: Any, path: str) -> list[Problem]:
    """Problems of a number (or each number of a list) against declared bounds."""
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in check_range(bounds, v, _join(path, i))]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    ok = math.isfinite(value) and all((k == "ge" and value >= b) or (k == "gt" and value > b)
                                      or (k == "le" and value <= b) or (k == "lt" and value < b)
                                      for k, b in bounds.items())
    return [] if ok else [Problem(path, f"must be {describe_range(bounds)}, got {value!r}")]


def required(doc: str) -> Any:
    """A dataclass field the user must set."""
    return dataclasses.field(metadata={"doc": doc, "required": True})


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}.{key}" if path else str(key)
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def check_value(tp: Any, value: Any, path: str) -> list[Problem]:
    """Problems of ``value`` against the type annotation ``tp``."""
    if tp is Any:
        return []
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        for arg in args:
            if arg is type(None):
                continue
            if not check_value(arg, value, path):
                return []
        return [Problem(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")]
    if origin is Literal:
        if value in args:
            return []
        return [Problem(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
                        + suggest(value, [str(a) for a in args]))]
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return [Problem(path, f"expected a list, got {type(value).__name__} {value!r}")]
        item = args[0] if args else Any
        out: list[Problem] = []
        for i, v in enumerate(value):
            out += check_value(item, v, _join(path, i))
        return out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return [Problem(path, f"expected a mapping, got {type(value).__name__} {value!r}")]
        item = args[1] if len(args) == 2 else Any
        out = []
        for k, v in value.items():
            out += check_value(item, v, _join(path, k))
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return [Problem(path, f"expected a mapping, got {type(value).__name__} {value!r}")]
        return check(tp, value, path)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if ok:
        return []
    return [Problem(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")]


def check(cls: type, data: dict, path: str = "") -> list[Problem]:
    """Every unknown key, wrong type and missing required value of ``data`` for ``cls``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[Problem] = []
    for key, value in data.items():
        if key not in fields:
            problems.append(Problem(_join(path, key), "unknown key" + suggest(key, fields)
                                    + f"; valid keys: {', '.join(fields)}"))
            continue
        found = check_value(hints[key], value, _join(path, key))
        if not found and "range" in fields[key].metadata:
            found = check_range(fields[key].metadata["range"], value, _join(path, key))
        problems += found
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in data:
            problems.append(Problem(_join(path, name), "missing required value: " + f.metadata.get("doc", "")))
    return problems


def build(cls: type, data: dict, path: str = "") -> Any:
    """Instantiate ``cls`` from ``data`` or raise RecipeError with every problem."""
    problems = check(cls, data, path)
    if problems:
        raise RecipeError(problems)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build(tp, value, _join(path, key))
        elif typing.get_origin(tp) is tuple or tp is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) for each field: for references and `plugins describe`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        doc = f.metadata.get("doc", "")
        if "range" in f.metadata:
            doc += f"; must be {describe_range(f.metadata['range'])}"
        rows.append((f.name, _type_name(hints[f.name]), default, doc))
    return rows


def as_dict(obj: Any) -> dict:
    """A config dataclass as a plain dict (tuples become lists), for manifests."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}

"""Write docs/hooks.md from core/hookspecs.py (the docstrings are the reference)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from memwise import hookspecs


def render() -> str:
    lines = ["# Hook reference", "",
             "Generated from `core/hookspecs.py` by `python tools/docs/hooks_md.py`; "
             f"hook API version {hookspecs.HOOK_API}.",
             "Implement a hook as a method of your `memwise.Plugin` subclass marked with `@memwise.hookimpl`,",
             "with the same argument names. `memwise.host.PluginHost` calls every hook plugin by plugin in plan",
             "order (teardown in reverse); see architecture.md.", ""]
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("memwise_"):
            continue
        sig = str(inspect.signature(fn)).replace("'", "")
        lines += [f"## `{name}{sig}`", "", inspect.getdoc(fn) or "", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")

"""Document sources: the Python standard library's own source, a user's glob of files."""

from __future__ import annotations

import glob
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TOP_LEVEL = re.compile(rb"^(?:@|def |async def |class )", re.MULTILINE)


def stdlib_files(root: str | None = None) -> list[Path]:
    """Sorted ``.py`` files of the running Python's standard library, without installed packages."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(base):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        files += [Path(d) / n for n in names if n.endswith(".py")]
    return sorted(files)


def split_definitions(source: bytes) -> list[bytes]:
    """Cut a module into its prelude and each top-level function or class (with decorators).

    A line-based cut (no parsing) so that a file Python cannot parse still splits.
    """
    starts = [m.start() for m in _TOP_LEVEL.finditer(source)]
    # a decorator line starts the definition; the def right under it does not start another
    merged: list[int] = []
    for s in starts:
        if merged and source[merged[-1]:merged[-1] + 1] == b"@" and not source[merged[-1]:s].count(b"\n\n"):
            prev_lines = source[merged[-1]:s].splitlines()
            if all(line.startswith((b"@", b" ", b"\t", b")")) or not line.strip() for line in prev_lines):
                continue
        merged.append(s)
    cuts = [0] + [s for s in merged if s > 0] + [len(source)]
    parts = [source[a:b] for a, b in zip(cuts, cuts[1:])]
    return [p for p in parts if p.strip()]


def is_validation(name: str, val_percent: float, seed: int = 0) -> bool:
    """Deterministic split by document name: the same file is always on the same side."""
    return (zlib.crc32(f"{seed}:{name}".encode()) % 10_000) < val_percent * 100


def pystdlib_documents(unit: str = "file", root: str | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) for each stdlib file, or for each top-level definition of it."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        rel = str(path.relative_to(base))
        data = path.read_bytes()
        if unit == "file":
            yield rel, data
        else:
            for i, part in enumerate(split_definitions(data)):
                yield f"{rel}#{i}", part


def glob_documents(pattern: str | list[str], max_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) for each file matching the glob pattern(s), sorted."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat), recursive=True)})
    for p in paths:
        if os.path.isfile(p):
            data = Path(p).read_bytes()
            yield p, data[:max_bytes] if max_bytes else data

"""Files of a report folder: atomic writes, a clear disk-full message, the run lock, stale temporaries."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from memwise.errors import InputError, WriteError


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename: a reader (or a full disk) never
    leaves a truncated file; a failure names the path and the free space."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink(tmp)
        raise WriteError(write_failure(path, err)) from err
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def write_failure(path: Path, err: OSError) -> str:
    """'cannot write PATH: REASON (N MiB free on that disk)'."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2 ** 20:,.0f} MiB free on that disk"
    except OSError:
        free = "free space unknown"
    return f"cannot write {path}: {err.strerror or err} ({free}); free some space or set report.dir elsewhere"


def check_folder(folder: Path) -> None:
    """The report folder can be created and written: fail in seconds, not after training."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "the report folder" if existing == folder else f"its parent {existing}"
        raise InputError(f"report folder {folder}: {what} is a file, not a folder; set report.dir to a folder")
    try:
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".memwise-write-test.", suffix=".tmp")
        probe.close()
    except OSError as err:
        raise InputError(f"report folder {folder} cannot be written: {err.strerror or err}; set report.dir to a "
                           "writable folder") from None


def check_space(folder: Path, needed: int, what: str = "one checkpoint") -> None:
    """At least ``needed`` bytes free where the report folder lives."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InputError(f"report folder {folder}: {free / 2 ** 20:,.0f} MiB free, {what} needs about "
                           f"{needed / 2 ** 20:,.0f} MiB; free some space or set report.dir elsewhere")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of interrupted writes (``.NAME.XXXX.tmp``); call under the lock."""
    removed = []
    for sub in (Path(folder), Path(folder) / "checkpoints"):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


LOCK_NAME = ".memwise.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file in a report folder: one run per folder.

    A lock left by a process that no longer exists (on this host) is taken over.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is None and self._age() < 5.0:  # just created, its owner is writing it
                    other = {"pid": "?", "host": "?", "started": "just now", "command": "?"}
                elif other is None or (other.get("host") == me["host"] and not _alive(int(other.get("pid", -1)))):
                    with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
                        self.path.unlink()
                    continue
                raise InputError(
                    f"report folder {self.path.parent} is in use by another memwise run (process {other.get('pid')} "
                    f"on {other.get('host')}, started {other.get('started')}: {other.get('command')}); wait for it "
                    f"or set another report.dir. If that process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise InputError(f"could not take the lock {self.path}: it keeps reappearing; is another run starting?")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: a crashed writer

    def release(self) -> None:
        if self.held:
            mine = self._read()
            if mine and mine.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

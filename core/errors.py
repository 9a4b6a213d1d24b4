"""Errors and problems: every message names the key, plugin or file and what to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe or a plan, reported beside all the others."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class MemwiseError(Exception):
    """Base class of memwise's own errors."""


class RecipeError(MemwiseError):
    """A recipe, its overrides or a plugin config is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class InputError(MemwiseError):
    """Bad input that is not a recipe key: a report folder, a checkpoint that does not match (exit 2)."""


class PluginHookError(MemwiseError):
    """A plugin raised inside one of its hooks; names both."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin, self.hook, self.cause = plugin, hook, cause
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {type(cause).__name__}: {cause}")


class ClaimConflict(MemwiseError):
    """Two plugins tried to replace the same module."""


class NoEffectWarning(UserWarning):
    """A plugin was asked to act but changed nothing."""


class NonFiniteError(MemwiseError):
    """The loss, the gradients or the weights became NaN or infinite; the run stops."""


class WriteError(MemwiseError, OSError):
    """A report or checkpoint file could not be written (disk full, permissions); names path and free space."""


class TeardownError(MemwiseError):
    """One or more teardowns or undo actions failed; all of them ran, every failure is listed."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {type(e).__name__}: {e}" if not isinstance(e, MemwiseError) else f"  - {e}"
                          for e in self.errors)
        super().__init__(f"{len(self.errors)} teardown step(s) failed (all were run):\n{lines}")


class RunInterrupted(MemwiseError):
    """SIGINT or SIGTERM stopped a run after its current step; exit code 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: stopped after the current step; resume with "
                         f"resume={checkpoint}")

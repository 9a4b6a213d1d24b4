"""memwise: memory-efficiency techniques for transformers, as composable Lightning plugins."""

from memwise.context import RunContext, Workload
from memwise.errors import ClaimConflict, MemwiseError, NoEffectWarning, PluginHookError, Problem, RecipeError
from memwise.hookspecs import HOOK_API
from memwise.memory import MemoryDelta, MemoryEstimate
from memwise.plugin import Plugin, hookimpl
from memwise.schema import option, required
from memwise.version import __version__

__all__ = [
    "HOOK_API", "ClaimConflict", "MemoryDelta", "MemoryEstimate", "MemwiseError", "NoEffectWarning",
    "Plugin", "PluginHookError", "Problem", "RecipeError", "RunContext", "Workload", "hookimpl",
    "option", "required", "__version__",
]

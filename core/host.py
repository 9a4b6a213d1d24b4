"""PluginHost: the one owner of the plugin lifecycle.

Every hook call memwise makes goes through a host, which calls the plugins in plan order
(phase, then before/after, then recipe order) and owns the one undo path. The front ends
(the recipe runner behind ``memwise run``/``explain``/``generate``, the Lightning recipe
module and datamodule, and ``MemwiseCallback`` in a user's own Trainer) only say *when*;
:class:`memwise.session.Session` keeps the state that spans calls (surgery done, the open step).

A fit: ``validate`` -> ``estimate`` (each plugin's estimate, then its surgery, one plugin at a
time) or ``transform_model`` -> ``configure_optimizer`` -> ``wrap_train_data`` -> per batch
``batch_start``, ``step_context`` (entered in plan order, left in reverse),
``before_optimizer_step``, ``batch_end`` -> ``state_dict``/``load_state_dict`` at checkpoints
-> ``fit_end`` -> ``teardown``. Generation: ``validate`` -> ``transform_model`` ->
``wrap_generation``/``end_generation`` around each prompt or predict batch -> ``teardown``.

Ordering does not rely on pluggy's registration order: pluggy only checks each plugin's hook
names against the specs (:func:`check_plugin`), and the host calls each hook plugin by plugin; a
hookimpl that asks pluggy for its own position (``tryfirst``, ``trylast``, wrappers) is refused,
since the plan (``phase``, ``before``, ``after``) is what orders plugins.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from memwise import hookspecs
from memwise.errors import MemwiseError, NoEffectWarning, PluginHookError, Problem, TeardownError
from memwise.memory import MemoryEstimate
from memwise.optim import repoint_schedulers

if TYPE_CHECKING:
    from memwise.plugin import Plugin

ORDER_OPTIONS = ("tryfirst", "trylast", "hookwrapper", "wrapper")


class _HookManager(pluggy.PluginManager):
    """Looks only at ``memwise_*`` attributes for hook implementations: pluggy otherwise inspects every
    attribute of every plugin, which made checking plugins slow."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        if not name.startswith("memwise_"):
            return None
        return super().parse_hookimpl_opts(plugin, name)


class PluginHost:
    """The plugins of one plan and every hook call on them, in plan order."""

    def __init__(self, plugins: Sequence[Plugin], checked: bool = False) -> None:
        """``checked``: every plugin already passed :func:`check_plugin` (the planner checks each
        plugin once, then builds a host per combination of them)."""
        self.plugins = list(plugins)
        self._generation_mark = 0
        self._torn_down = False
        self.changes: dict[str, list[str]] = {}
        """Per plugin, the modules its surgery changed (after ``estimate(transform=True)`` or ``transform_model``)."""
        if not checked:
            for p in self.plugins:
                check_plugin(p)

    # --- calling ----------------------------------------------------------------------------

    @property
    def hook(self) -> _PlanOrder:
        """``host.hook.memwise_x(**kwargs)``: every implementation in plan order, non-None results as a list."""
        return _PlanOrder(self)

    def implements(self, plugin: Plugin, hook_name: str) -> bool:
        return hasattr(getattr(plugin, hook_name, None), "memwise_impl")

    def each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[Plugin, Any]]:
        """Call one hook plugin by plugin, in plan order, yielding (plugin, result).

        While a plugin's hook runs, undo actions it registers with ``ctx.on_teardown`` are
        recorded as that plugin's, so that teardown undoes them in its turn.
        """
        ctx = kwargs.get("ctx")
        for p in self.plugins:
            if self.implements(p, hook_name):
                with _acting(ctx, p.name):
                    result = getattr(p, hook_name)(**kwargs)
                yield p, result

    def call(self, hook_name: str, ctx: Any, **kwargs: Any) -> None:
        """A hook whose results are not used, on every plugin in plan order."""
        for _ in self.each(hook_name, ctx=ctx, **kwargs):
            pass

    # --- before training: check, predict, change the model ---------------------------------

    def validate(self, ctx: Any) -> list[Problem]:
        """Every plugin's problems, each keyed (a problem without a key is keyed by its plugin)."""
        self._torn_down = False  # a new setup: the next teardown has work to do
        problems = []
        for plugin, found in self.each("memwise_validate", ctx=ctx):
            problems += [p if p.key else Problem(f"plugin '{plugin.name}'", p.message) for p in found or []]
        return problems

    def estimate(self, ctx: Any, baseline: MemoryEstimate, transform: bool = False,
                 memo: EstimateMemo | None = None) -> list[tuple[str, MemoryEstimate, str]]:
        """(label, estimate, note) for the baseline and after each plugin, in plan order.

        With ``transform``, each plugin's surgery runs right after its own estimate, so the
        next plugin predicts on the model as the plugins before it left it (an optimizer
        plugin after a freezing one sees the frozen parameters); the changes land in
        ``self.changes``. Without it (the planner's meta models) every plugin sees ``ctx.model`` as given.
        ``memo`` (the planner's, shared by the hosts of one plan) asks each plugin at most once per
        settings and estimate.
        """
        rows = [("baseline", baseline, "")]
        current = baseline
        for plugin in self.plugins:
            if self.implements(plugin, "memwise_estimate_memory"):
                compute = functools.partial(self._estimate_one, plugin, ctx)
                shards = getattr(getattr(ctx, "workload", None), "shards", 1)
                delta = compute(current) if memo is None else memo.delta(plugin, current, compute, shards)
                current = current.apply(delta)
                rows.append((f"+ {plugin.name}", current, getattr(delta, "note", "") if delta else "no change"))
            if transform:
                self._transform_one(plugin, ctx)
        return rows

    def _estimate_one(self, plugin: Plugin, ctx: Any, current: Any) -> Any:
        with _acting(ctx, plugin.name):
            return plugin.memwise_estimate_memory(ctx=ctx, estimate=current)

    def transform_model(self, ctx: Any) -> dict[str, list[str]]:
        """Run model surgery plugin by plugin; warn for each that changed nothing."""
        for p in self.plugins:
            self._transform_one(p, ctx)
        return self.changes

    def _transform_one(self, p: Plugin, ctx: Any) -> None:
        self._torn_down = False  # new surgery: the next teardown has something to undo
        if not self.implements(p, "memwise_transform_model") or not p.transforms_model():
            return
        before = module_signature(ctx.model)
        claimed = len(ctx.claims.claims_of(p.name))
        with _acting(ctx, p.name):
            p.memwise_transform_model(ctx=ctx)
        after = module_signature(ctx.model)
        changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        self.changes[p.name] = changed
        if not changed and len(ctx.claims.claims_of(p.name)) == claimed:
            warnings.warn(f"plugin '{p.name}' changed no module of this model: check its include/layers "
                          "settings against the model's module names", NoEffectWarning, stacklevel=3)

    # --- optimizer and data -----------------------------------------------------------------

    def configure_optimizer(self, ctx: Any, schedulers: Sequence[Any] = ()) -> Any:
        """The plugins' wrapping or replacement of ``ctx.optimizer``; schedulers already built on
        the old optimizer are moved onto a replacement. Returns the optimizer to step."""
        self._torn_down = False
        old = ctx.optimizer
        self.call("memwise_configure_optimizer", ctx)
        if ctx.optimizer is not old and schedulers:
            repoint_schedulers(list(schedulers), old, ctx.optimizer)
        return ctx.optimizer

    def wrap_train_data(self, ctx: Any) -> None:
        """The plugins' replacement of ``ctx.train_dataset``/``batch_sampler``/``collate_fn``."""
        self.call("memwise_wrap_train_dataloader", ctx)

    # --- every step -------------------------------------------------------------------------

    def batch_start(self, ctx: Any, batch: Any, batch_idx: int) -> None:
        self.call("memwise_on_train_batch_start", ctx, batch=batch, batch_idx=batch_idx)

    def step_context(self, ctx: Any) -> contextlib.ExitStack:
        """The plugins' step contexts, entered in plan order (left in reverse); an error raised by
        one on entry or exit names the plugin and the hook."""
        stack = contextlib.ExitStack()
        try:
            for plugin, cm in self.each("memwise_step_context", ctx=ctx):
                if cm is not None:
                    stack.enter_context(_NamedContext(plugin.name, cm))
        except BaseException:
            stack.close()
            raise
        return stack

    def before_optimizer_step(self, ctx: Any, optimizer: Any) -> None:
        self.call("memwise_on_before_optimizer_step", ctx, optimizer=optimizer)

    def batch_end(self, ctx: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.call("memwise_on_train_batch_end", ctx, outputs=outputs, batch=batch, batch_idx=batch_idx)

    # --- state, end of fit, generation ------------------------------------------------------

    def state_dict(self, ctx: Any) -> dict[str, Any]:
        """Each plugin's own checkpoint state, by plugin name (plugins without state are left out)."""
        return {p.name: s for p, s in self.each("memwise_state_dict", ctx=ctx) if s is not None}

    def load_state_dict(self, ctx: Any, states: dict[str, Any]) -> None:
        """Give each plugin its entry of ``states`` (plugins without one are left as they are)."""
        for p in self.plugins:
            if p.name in states and self.implements(p, "memwise_load_state_dict"):
                with _acting(ctx, p.name):
                    p.memwise_load_state_dict(ctx=ctx, state=states[p.name])

    def fit_end(self, ctx: Any) -> None:
        self.call("memwise_on_fit_end", ctx)

    def wrap_generation(self, ctx: Any) -> dict[str, Any]:
        """Fresh ``ctx.generate_kwargs`` from the plugins' KV-cache policies; pair with ``end_generation``."""
        ctx.generate_kwargs = {}
        self._generation_mark = ctx.undo_mark()
        self.call("memwise_wrap_generation", ctx)
        return ctx.generate_kwargs

    def end_generation(self, ctx: Any) -> None:
        """Undo what ``wrap_generation`` installed (the undo actions registered since), newest first."""
        ctx.run_teardown(since=self._generation_mark)

    def add_cli_commands(self, subparsers: Any) -> None:
        """Each plugin's own subcommands; one that fails is reported and left out."""
        for plugin in self.plugins:
            if self.implements(plugin, "memwise_add_cli_commands"):
                try:
                    plugin.memwise_add_cli_commands(subparsers=subparsers)
                except Exception as err:  # noqa: BLE001 - reported, the other commands stay usable
                    warnings.warn(f"plugin '{plugin.name}' could not add its commands: {err}", stacklevel=2)

    def teardown(self, ctx: Any) -> None:
        """The one undo path: plugin by plugin in reverse plan order, its ``ctx.on_teardown``
        actions (newest first), then its ``memwise_teardown``; then actions registered outside
        any hook. A failing one never skips the others; every failure is reported together.
        Runs once: a second call (a front end's ``finally`` after its own teardown) does nothing
        until the next validation, surgery or optimizer setup."""
        if self._torn_down:
            return
        self._torn_down = True
        errors: list[BaseException] = []
        for plugin in reversed(self.plugins):
            try:
                ctx.run_teardown(owner=plugin.name)
            except TeardownError as err:
                errors += err.errors
            if self.implements(plugin, "memwise_teardown"):
                try:
                    plugin.memwise_teardown(ctx=ctx)
                except Exception as err:  # noqa: BLE001 - gathered, the others still run
                    errors.append(err)
        try:
            ctx.run_teardown()
        except TeardownError as err:
            errors += err.errors
        if errors:
            raise TeardownError(errors)


def check_plugin(plugin: Plugin) -> None:
    """Every ``memwise_*`` method of ``plugin`` matches a hook spec and asks pluggy for no position of its own."""
    pm = _HookManager("memwise")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=plugin.name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise MemwiseError(f"plugin '{plugin.name}' implements a hook that memwise does not define: {err}. "
                           "Hook names start with 'memwise_' and are listed in docs/hooks.md") from None
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            asked = [o for o in ORDER_OPTIONS if getattr(impl, o, False)]
            if asked:
                raise MemwiseError(f"plugin '{plugin.name}' marks {caller.name} with {', '.join(asked)}: memwise "
                                   "orders plugins by the plan, so set the plugin's phase, before or after "
                                   "instead (docs/writing-plugins.md)")


class EstimateMemo:
    """Plugins' estimate deltas kept across the hosts of one plan, over one model and workload that
    never change: by plugin and settings when the plugin did not read the estimate it was given (its
    delta then holds for every combination), else by plugin, settings and that estimate; and by the
    number of shards for a plugin that sizes one rank's shard (``Plugin.per_rank_state``)."""

    def __init__(self) -> None:
        self._by_settings: dict[tuple, Any] = {}
        self._by_estimate: dict[tuple, Any] = {}
        self.calls = 0
        """How many estimate hooks actually ran."""

    def delta(self, plugin: Plugin, current: MemoryEstimate, compute: Any, shards: int = 1) -> Any:
        """``compute(estimate)``'s delta for ``plugin`` given ``current`` on ``shards`` FSDP2 ranks,
        computed at most once."""
        settings = (type(plugin), repr(plugin.config), shards if plugin.per_rank_state else 1)
        if settings in self._by_settings:
            return self._by_settings[settings]
        key = (*settings, repr(current))
        if key not in self._by_estimate:
            watched = _ReadWatch(current)
            delta = compute(watched)
            self.calls += 1
            if not watched.read:
                self._by_settings[settings] = delta
                return delta
            self._by_estimate[key] = delta
        return self._by_estimate[key]


class _ReadWatch:
    """An estimate that notes whether a hook read anything of it."""

    def __init__(self, estimate: MemoryEstimate) -> None:
        self._estimate = estimate
        self.read = False

    def __getattr__(self, name: str) -> Any:
        self.read = True
        return getattr(self._estimate, name)


class _PlanOrder:
    """``host.hook``: hook calls by name, dispatched in plan order."""

    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        if not hasattr(hookspecs, name):
            raise AttributeError(f"memwise defines no hook '{name}' (see docs/hooks.md)")
        return lambda **kwargs: [r for _, r in self._host.each(name, **kwargs) if r is not None]


@contextlib.contextmanager
def _acting(ctx: Any, name: str) -> Iterator[None]:
    """Mark ``name`` as the plugin whose hook runs now (the owner of undo actions it registers)."""
    if not hasattr(ctx, "acting"):
        yield
        return
    previous, ctx.acting = ctx.acting, name
    try:
        yield
    finally:
        ctx.acting = previous


class _NamedContext(contextlib.AbstractContextManager):
    """A plugin's step context whose own errors (on entry or exit) name the plugin and hook."""

    def __init__(self, plugin: str, cm: Any) -> None:
        self.plugin, self.cm = plugin, cm

    def __enter__(self) -> Any:
        try:
            return self.cm.__enter__()
        except MemwiseError:
            raise
        except Exception as err:  # noqa: BLE001 - the point is to name who failed
            raise PluginHookError(self.plugin, "memwise_step_context (entering)", err) from err

    def __exit__(self, et: Any, ev: Any, tb: Any) -> Any:
        try:
            return self.cm.__exit__(et, ev, tb)
        except MemwiseError:
            raise
        except Exception as err:  # noqa: BLE001
            if err is ev:  # the step's own error passing through
                raise
            raise PluginHookError(self.plugin, "memwise_step_context (leaving)", err) from err


def module_signature(model: Any) -> dict[str, str]:
    """Module types and parameter shapes by name: what surgery changes."""
    sig = {}
    for name, mod in model.named_modules():
        shapes = ",".join(f"{n}{tuple(t.shape)}{str(t.dtype).replace('torch.', '')}"
                          for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                          if t is not None)
        sig[name or "<root>"] = f"{type(mod).__name__}[{shapes}]"
    return sig

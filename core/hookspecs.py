"""Every hook a memwise plugin can implement: the reference for plugin authors.

Each hook gets ``ctx`` (a :class:`memwise.context.RunContext`): the typed recipe, model,
optimizer, dataloaders, trainer, memory estimate and claims ledger. Every hook is called by
:class:`memwise.host.PluginHost`, plugin by plugin in plan order (phase, then before/after,
then recipe order), and sees the changes of the plugins before it through ``ctx``; the one
exception is teardown, in reverse plan order. Plugins are ordered by the plan only: a
hookimpl marked ``tryfirst``, ``trylast`` or as a wrapper is refused. This module holds only
specifications.
"""

from __future__ import annotations

from typing import Any

import pluggy

HOOK_API = 1
"""Version of this hook specification; a plugin states the one it targets in ``hook_api``."""

hookspec = pluggy.HookspecMarker("memwise")


@hookspec
def memwise_validate(ctx: Any) -> list:
    """Check the plugin's config against the model, the hardware and the other plugins.

    Return a list of :class:`memwise.Problem` (empty when all is well). The core collects
    the problems of every plugin and reports them all at once; nothing runs until the
    list is empty.
    """


@hookspec
def memwise_estimate_memory(ctx: Any, estimate: Any) -> Any:
    """Predict the plugin's effect on each memory category, for ``memwise explain``.

    ``estimate`` is the :class:`memwise.memory.MemoryEstimate` after the plugins before
    this one; ``ctx.model`` is the model as the plugins before this one left it (their
    surgery has run, this plugin's has not; ``memwise plan`` passes a meta model without
    surgery) and ``ctx.workload`` the batch shape. Count plain AdamW state with
    :func:`memwise.optim.state_bytes`. A change to the activations outside the decoder layers
    (the loss side) goes in ``outside_layers`` too, so that a plugin working per layer reads
    the layers' share as ``estimate.layer_activations``.
    At ``ctx.stage == "generate"`` (``memwise plan --stage generate``) the estimate holds the weights,
    the dense KV cache of ``ctx.workload.seq_len`` prompt tokens and ``max_new_tokens - 1`` fed-back
    tokens, and the prompt's forward temporaries: a KV-cache plugin returns its cache's change
    (and, in ``layer_forward``, what compressing the prompt adds inside a layer's forward).
    Return a :class:`memwise.memory.MemoryDelta` (signed bytes per category) or None. Depend only
    on ``ctx.model``, ``ctx.workload``, ``ctx.config``, the plugin's config and ``estimate``:
    ``memwise plan`` reuses a delta across combinations (one that did not read ``estimate``
    across all of them).
    """


@hookspec
def memwise_transform_model(ctx: Any) -> None:
    """Module surgery on ``ctx.model``: prune, swap layers, inject adapters.

    Claim each module you replace with ``ctx.claims.claim(name, self)``. A plugin whose
    transform changes nothing gets a no-effect warning from the core.
    """


@hookspec
def memwise_configure_optimizer(ctx: Any) -> None:
    """Wrap or replace ``ctx.optimizer``; the core re-points the schedulers afterwards."""


@hookspec
def memwise_wrap_train_dataloader(ctx: Any) -> None:
    """Replace ``ctx.train_dataset`` or ``ctx.batch_sampler`` before the dataloader is built."""


@hookspec
def memwise_step_context(ctx: Any) -> Any:
    """Return a context manager entered around every training step, or None.

    Contexts are entered in plan order and left in reverse.
    """


@hookspec
def memwise_on_train_batch_start(ctx: Any, batch: Any, batch_idx: int) -> None:
    """Called before the forward pass of every training batch."""


@hookspec
def memwise_on_before_optimizer_step(ctx: Any, optimizer: Any) -> None:
    """Called after backward (gradients are ready) and before ``optimizer.step()``.

    For example, read the learning rate the schedule set for this step, or clip or inspect
    gradients of the parameters the plugin manages.
    """


@hookspec
def memwise_on_train_batch_end(ctx: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Called after the optimizer step of every training batch (``outputs``: the detached loss).

    For example, refresh a plugin's per-step statistics or log what it changed.
    """


@hookspec
def memwise_wrap_generation(ctx: Any) -> None:
    """Install a KV-cache policy for generation or prediction.

    Set entries of ``ctx.generate_kwargs`` (for example ``past_key_values``) and register
    undo actions with ``ctx.on_teardown``.
    """


@hookspec
def memwise_on_fit_end(ctx: Any) -> None:
    """Export artifacts after training, for example recovered adapters, into ``ctx.report_dir``."""


@hookspec
def memwise_state_dict(ctx: Any) -> dict | None:
    """Return the plugin's own checkpoint state as plain tensors and Python values.

    The core stores it under the plugin's name; it must load with ``weights_only=True``.
    """


@hookspec
def memwise_load_state_dict(ctx: Any, state: dict) -> None:
    """Restore what ``memwise_state_dict`` returned (only this plugin's entry)."""


@hookspec
def memwise_teardown(ctx: Any) -> None:
    """Undo the plugin's changes; called in reverse plan order, once, also after a failure.

    A plugin's own ``ctx.on_teardown`` actions run just before this hook (newest first).
    """


@hookspec
def memwise_add_cli_commands(subparsers: Any) -> None:
    """Add the plugin's own subcommands to the ``memwise`` CLI (argparse subparsers).

    Called on an instance with the default config, without a run context; keep heavy
    imports inside the command's handler. Set ``func`` (via ``set_defaults``) to a
    callable taking the parsed arguments and returning an exit code.
    """

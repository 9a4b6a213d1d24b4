"""A recipe run's checkpoints: what memwise adds to Lightning's (manifest, plugin states, RNG,
progress), and what resuming one checks before any state reaches the model or the plugins."""

from __future__ import annotations

from typing import Any

import torch

from memwise import guard
from memwise.checkpoint import check_manifest, manifest, rng_state
from memwise.errors import InputError, MemwiseError, NonFiniteError


def save(run: Any, module: Any, checkpoint: dict[str, Any]) -> None:
    """``checkpoint["memwise"]`` for ``module`` (a RecipeModule) of ``run``; weights that hold
    NaN/inf are never written."""
    trainer = module.trainer
    bad = guard.max_abs(module.model.parameters())
    if bad is not None and not torch.isfinite(bad):
        raise NonFiniteError(guard.stop_message(int(trainer.global_step), "the weights hold NaN/inf",
                                                run.checkpoint_path("last").parent))
    checkpoint["memwise"] = {
        "manifest": manifest(run.recipe.plugins, run.recipe.resolved),
        "world_size": int(trainer.world_size),
        "strategy": run.cfg.trainer.strategy,
        "model_config": module.model.config.to_dict() if hasattr(module.model, "config") else {},
        "plugins": run.host.state_dict(run.ctx),
        "rng": rng_state(),
        **module.progress.state_dict(),
        "nonfinite_skips": module.guard.skips,
    }


def load(run: Any, module: Any, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Check that ``checkpoint`` belongs to this run (exit 2 saying what differs), give the plugins
    their state, and return the memwise entry (progress, RNG) for the module to restore."""
    saved = checkpoint.get("memwise")
    world = module.trainer.world_size
    # a sharded (DCP) checkpoint is loaded into the sharded module by torch distributed checkpoint,
    # which checks names and shapes itself; the other formats carry the whole state dict here
    sharded = run.cfg.trainer.strategy == "fsdp"
    if not isinstance(saved, dict) or not (sharded or isinstance(checkpoint.get("state_dict"), dict)):
        raise InputError("this checkpoint was not written by `memwise run` (it has no memwise manifest); resume "
                         "only from a run's checkpoints/*.ckpt, or load pretrained weights with model.path")
    bad = [] if sharded else guard.nonfinite_tensors(checkpoint["state_dict"])
    if bad:
        raise InputError(f"this checkpoint's weights hold NaN/inf ({', '.join(bad[:4])}"
                         f"{', ...' if len(bad) > 4 else ''}); resume from an earlier checkpoint")
    saved_manifest = saved.get("manifest", {})
    check_manifest(saved_manifest, run.recipe.plugins)
    if sharded and saved.get("world_size", world) != world:
        raise MemwiseError(f"this sharded checkpoint was saved by {saved['world_size']} processes; resume it with "
                           f"trainer.devices={saved['world_size']} (now {world}), or "
                           "consolidate it (memwise consolidate) and start from the weights")
    _check_match(run, module.state_dict(), checkpoint, saved_manifest)
    run.host.load_state_dict(run.ctx, saved.get("plugins", {}))
    return saved


def _check_match(run: Any, current: dict[str, Any], checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse (exit 2) a checkpoint of another model shape, optimizer or plugin set, saying what differs."""
    then = saved.get("recipe", {}) or {}
    now = run.recipe.resolved
    then_plugins = [e.get("name") for e in saved.get("plugins", [])]
    now_plugins = [p.name for p in run.recipe.plugins]
    plugins = f"plugins {then_plugins or 'none'} then, {now_plugins or 'none'} now"
    ckpt = {} if run.cfg.trainer.strategy == "fsdp" else checkpoint["state_dict"]  # DCP checks sharded ones
    diffs = [] if not ckpt else [f"{k} is missing" for k in current if k not in ckpt]
    diffs += [f"{k} is not in this model" for k in ckpt if k not in current]
    diffs += [f"{k}: {tuple(ckpt[k].shape)} saved, {tuple(current[k].shape)} here" for k in current
              if k in ckpt and hasattr(ckpt[k], "shape") and tuple(ckpt[k].shape) != tuple(current[k].shape)]
    if diffs:
        model_then = (then.get("model") or {}).get("config", {})
        model_now = (now.get("model") or {}).get("config", {})
        raise InputError(f"this checkpoint does not match the model: {len(diffs)} difference(s), e.g. "
                         f"{'; '.join(diffs[:3])}. model.config {model_then} then, {model_now} now; {plugins}")
    opt_then = (then.get("optimizer") or {}).get("name", "adamw")
    opt_now = run.cfg.optimizer.name
    if then and opt_then != opt_now:
        raise InputError(f"this checkpoint was trained with optimizer.name: {opt_then}, this run uses {opt_now}; "
                         "resume with the same optimizer")
    fresh = [p for p in run.recipe.plugins if p.name not in then_plugins and
             ("optimizer.states" in p.provides() or p.required_on_load)]
    if fresh and then:
        names = ", ".join(p.name for p in fresh)
        if not run.resume_without_plugin_state:
            raise InputError(f"this checkpoint was made without plugin(s) {names} ({plugins}): their state (and "
                             "the optimizer state they replace) is not in it. Pass --resume-without-plugin-state "
                             "to resume its weights and progress with a fresh optimizer state, or resume "
                             "without those plugins")
        checkpoint["optimizer_states"] = []  # the saved state is for another optimizer: start it fresh
        print(f"resuming without plugin state for {names}: fresh optimizer state (--resume-without-plugin-state)",
              flush=True)

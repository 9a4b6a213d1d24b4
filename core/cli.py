"""The ``memwise`` command: plugins, recipes, validate, explain, run, generate."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from memwise import manager
from memwise.errors import InputError, MemwiseError, PluginHookError, Problem, RecipeError, RunInterrupted

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
MIB = 2 ** 20


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.2f}"


# --- plugins / recipes ------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from memwise.schema import describe

    found = manager.available()
    if args.action == "list":
        table = Table(title="installed memwise plugins")
        for col in ("name", "distribution", "version", "summary"):
            table.add_column(col)
        for name, av in found.items():
            try:
                summary = manager.load(name).summary
            except Exception as err:  # noqa: BLE001 - a broken plugin must not hide the others
                summary = f"[red]cannot be imported: {err}[/red]"
            table.add_row(name, av.distribution, av.version, summary)
        console.print(table)
        return 0
    if not args.name:
        raise MemwiseError("plugins describe needs a plugin name: memwise plugins describe NAME")
    cls = manager.load(args.name)
    console.print(f"[bold]{cls.name}[/bold] ({cls.distribution} {cls.version()}): {cls.summary}")
    console.print(f"stages: {', '.join(cls.stages)}; phase: {cls.phase}; strategies: {', '.join(cls.strategies)}; "
                  f"required on load: {cls.required_on_load}")
    table = Table(title="settings (recipe: with:)")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col)
    for row in describe(cls.Config):
        table.add_row(*row)
    console.print(table)
    provides = sorted(cls().provides())
    console.print(f"provides (default settings): {', '.join(provides) or 'nothing exclusive'}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from memwise import recipe

    if args.action == "list":
        table = Table(title="shipped recipes")
        table.add_column("recipe")
        table.add_column("plugins needed")
        table.add_column("missing")
        installed = manager.available()
        for name in recipe.shipped():
            try:
                raw = recipe.to_plain(recipe.load_raw(name))
            except RecipeError:
                continue
            needed = [p.get("use", "?") for p in raw.get("plugins", []) or [] if isinstance(p, dict)]
            missing = [n for n in needed if n not in installed]
            table.add_row(name, ", ".join(needed) or "-", ", ".join(f"memwise-{m}" for m in missing) or "-")
        console.print(table)
        return 0
    if not args.name:
        raise MemwiseError("recipes show needs a recipe name or path: memwise recipes show quickstart")
    import yaml

    console.print(yaml.safe_dump(recipe.to_plain(recipe.load_raw(args.name)), sort_keys=False))
    return 0


# --- recipe commands --------------------------------------------------------------------


def _plan_table(run: Any) -> Table:
    table = Table(title="plan (plugins in call order)")
    for col in ("#", "plugin", "phase", "stages", "provides"):
        table.add_column(col)
    for i, p in enumerate(run.recipe.plugins):
        table.add_row(str(i), p.name, p.phase, "/".join(p.stages), ", ".join(sorted(p.provides())) or "-")
    return table


def _estimate_table(rows: list, measured: dict | None = None) -> Table:
    from memwise.memory import CATEGORIES

    table = Table(title="memory per category (MiB)")
    table.add_column("category")
    for label, _, _ in rows:
        table.add_column(f"predicted {label}" if label == "baseline" else label, justify="right")
    if measured:
        table.add_column("measured", justify="right")
        table.add_column("own max", justify="right")
        table.add_column("at total peak", justify="right")
    for cat in CATEGORIES:
        cells = [_fmt(getattr(est, cat)) for _, est, _ in rows]
        if measured:
            cells += [_fmt(measured["headline"].get(cat)), _fmt(measured["category_max"].get(cat)),
                      _fmt(measured["at_peak"].get(cat))]
        table.add_row(cat, *cells)
    totals = [_fmt(est.total) for _, est, _ in rows]
    if measured:
        totals += ["", "", _fmt(measured["peak_total"])]
    table.add_row("[bold]total[/bold]", *totals)
    return table


def _prepare(args: argparse.Namespace, stage: str) -> Any:
    from memwise import recipe
    from memwise.runner import Run

    rec = recipe.load(args.recipe, args.overrides, stage=stage, allow_resolvers=args.allow_resolvers)
    run = Run(rec, stage)
    run.build()
    return run


def cmd_validate(args: argparse.Namespace) -> int:
    run = _prepare(args, args.stage)
    console.print(f"[green]{args.recipe}: valid[/green] ({len(run.recipe.plugins)} plugin(s): "
                  f"{', '.join(run.recipe.plugin_order) or 'none'})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    run = _prepare(args, "fit")
    rows = run.estimate_and_transform()
    console.print(_plan_table(run))
    console.print(_estimate_table(rows))
    for label, _, note in rows[1:]:
        if note:
            console.print(f"  {label}: {note}")
    console.print("[bold]module changes[/bold]")
    if not run.changes:
        console.print("  no plugin changes the model")
    for name, changed in run.changes.items():
        claimed = run.ctx.claims.claims_of(name)
        console.print(f"  {name}: {len(changed)} module(s) changed, {len(claimed)} claimed"
                      + (f", e.g. {', '.join((changed or claimed)[:4])}" if changed or claimed else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from memwise import recipe
    from memwise.runner import Run

    rec = recipe.load(args.recipe, args.overrides, stage="fit", allow_resolvers=args.allow_resolvers)
    run = Run(rec, "fit")
    run.resume_without_plugin_state = args.resume_without_plugin_state
    created = not run.ctx.report_dir.exists()
    lock = _claim_report_folder(run.ctx.report_dir)
    primary: BaseException | None = None
    try:
        return _train(run, args)
    except BaseException as err:
        primary = err
        raise
    finally:
        try:
            run.session.teardown()  # always, in reverse plan order, whatever failed above
        except MemwiseError as err:
            if primary is None:
                raise
            err_console.print(f"[red]also:[/red] {err}", soft_wrap=True)
        finally:
            if lock is not None:
                lock.release()
            if created and isinstance(primary, RecipeError):  # a rejected recipe leaves nothing behind
                _remove_if_empty(run.ctx.report_dir)


def _remove_if_empty(folder: Any) -> None:
    """Remove the report folder this command created when it holds only the empty checkpoints folder."""
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()) and [p.name for p in folder.iterdir()] == ["checkpoints"]:
        checkpoints.rmdir()
        folder.rmdir()


def _claim_report_folder(folder: Any) -> Any:
    """Check the report folder, lock it, remove temporaries of interrupted writes (rank zero only:
    the other ranks of a DDP run are this command re-launched)."""
    import os

    from memwise import files

    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return None
    files.check_folder(folder)
    lock = files.RunLock(folder).acquire()
    for tmp in files.remove_stale_temporaries(folder):
        console.print(f"removed {tmp} (left by an interrupted write)", soft_wrap=True)
    return lock


def quiet_lightning() -> None:
    """Hide Lightning's banner (hardware summary, logger tips) and its pytree deprecation warning:
    a run's own output says what it trains, on what, and how it goes."""
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _train(run: Any, args: argparse.Namespace) -> int:
    from memwise import files, report
    from memwise.checkpoint import manifest
    from memwise.errors import NonFiniteError
    from memwise.lightning.datamodule import RecipeDataModule
    from memwise.lightning.module import RecipeModule
    from memwise.lightning.stopping import SignalStop
    from memwise.lightning.trainer import make_trainer
    from memwise.probe import measure

    run.build()
    rows = run.estimate_and_transform()
    est = rows[-1][1]
    files.check_space(run.ctx.report_dir, int(1.1 * (est.parameters + est.optimizer_state)) + 2 ** 20)
    reshaped = [name for name, changed in run.changes.items() if changed]
    if run.cfg.report.save_model and reshaped:
        raise RecipeError([Problem("report.save_model", f"plugin(s) {', '.join(reshaped)} change the model's modules, "
                                   "so it would not load as a plain model folder; keep the checkpoint instead "
                                   "(or use the plugin's own export)")], source=args.recipe)
    quiet_lightning()
    stop = SignalStop(run.checkpoint_path("last"), err_console.print)
    trainer = make_trainer(run.cfg.trainer, run.interactive, [stop])
    run.ctx.trainer = trainer
    module, datamodule = RecipeModule(run), RecipeDataModule(run)
    run.ctx.module = module
    if trainer.is_global_zero:
        console.print(_plan_table(run))
    folder = run.ctx.report_dir
    try:
        with stop.installed():
            trainer.fit(module, datamodule, ckpt_path=run.cfg.resume)
    except (NonFiniteError, RunInterrupted) as err:
        if trainer.is_global_zero and module.progress.history:  # what was trained stays readable
            summ = report.summary(module.progress.history)
            summ["stopped"] = str(err)
            report.write_metrics(folder, module.progress.history)
            report.write_json(folder, "summary.json", summ)
        raise
    trainer.save_checkpoint(run.checkpoint_path("last"), weights_only=False)
    sharded = run.cfg.trainer.strategy == "fsdp"
    measured = None
    if sharded and run.cfg.report.probe_memory:  # every rank: the sharded step needs all of them
        measured = measure(run, module.model, run.ctx.optimizer, trainer.precision_plugin.forward_context)
        folder.mkdir(parents=True, exist_ok=True)
        report.write_json(folder, f"memory-rank{trainer.global_rank}.json",
                          {"world_size": trainer.world_size,
                           "measured": {**measured.as_dict(), "headline": measured.headline()}})
    if not trainer.is_global_zero:
        return 0
    run.host.fit_end(run.ctx)
    mem: dict[str, Any] = {"predicted": rows[-1][1].as_dict(),
                           "predicted_steps": [{"label": lbl, **e.as_dict(), "note": note} for lbl, e, note in rows]}
    if run.cfg.report.probe_memory:
        if measured is None:
            measured = measure(run, module.model, run.ctx.optimizer, trainer.precision_plugin.forward_context)
        mem["measured"] = {**measured.as_dict(), "headline": measured.headline()}
        console.print(_estimate_table(rows, mem["measured"]))
        console.print("measured: parameters, gradients and optimizer state after the step; activations "
                      "saved by the forward pass; temporaries at their own maximum")
        console.print(f"process peak resident memory: {_fmt(measured.peak_rss)} MiB")
    summ = report.summary(module.progress.history)
    summ["manifest"] = manifest(run.recipe.plugins)
    if run.cfg.report.save_model and sharded:
        from memwise.sharding import consolidate

        consolidate(run.checkpoint_path("last"), folder / "model")
    elif run.cfg.report.save_model:
        module.model.save_pretrained(folder / "model", safe_serialization=True)
    report.write_recipe(folder, run.recipe.resolved)
    report.write_metrics(folder, module.progress.history)
    report.write_json(folder, "memory.json", mem)
    report.write_json(folder, "summary.json", summ)
    if run.cfg.report.plots:
        report.plot(folder, module.progress.history, mem)
    first, final = summ["first_val_loss"], summ["final_val_loss"]
    console.print(f"validation loss {_loss(first)} -> {_loss(final)} after {summ['steps']} steps; report in {folder}")
    return 0

def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def prompt_ids(tok: Any, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
    """A prompt's token ids: a user turn in the chat template for chat models, else BOS + text."""
    if chat is None:
        chat = getattr(tok, "has_chat_template", False)
    if chat:
        from memwise.data.chat import render

        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tok.encode(render(tok, turns, add_generation_prompt=True)).tolist()
    return [tok.bos_id, *tok.encode(prompt).tolist()]


def cmd_generate(args: argparse.Namespace) -> int:
    run = _prepare(args, "generate")
    if run.recipe.set_aside:
        console.print(f"training-only plugins not used for generation: {', '.join(run.recipe.set_aside)}")
    run.transform()
    try:
        return _generate(run, args)
    finally:
        run.session.teardown()  # always, in reverse plan order


def _generate(run: Any, args: argparse.Namespace) -> int:
    import torch

    from memwise.checkpoint import safe_load

    ctx, gen = run.ctx, run.cfg.generate
    if args.max_new_tokens is not None:
        gen.max_new_tokens = args.max_new_tokens
    if gen.checkpoint:
        from memwise.guard import nonfinite_tensors
        from memwise.sharding import is_dcp_checkpoint, load_model_state

        if is_dcp_checkpoint(gen.checkpoint):  # a sharded run's folder: gathered here, one process
            state = load_model_state(gen.checkpoint)
        else:
            state = {k.removeprefix("model."): v for k, v in safe_load(gen.checkpoint)["state_dict"].items()}
        bad = nonfinite_tensors(state)
        if bad:
            raise InputError(f"checkpoint {gen.checkpoint}: its weights hold NaN/inf ({', '.join(bad[:4])}); "
                             "generate with an earlier checkpoint")
        ctx.model.load_state_dict(state)
    ctx.model.eval()
    tok = ctx.tokenizer
    for prompt in args.prompt:
        ids = torch.tensor([prompt_ids(tok, prompt, gen.chat, gen.system_prompt)])
        run.host.wrap_generation(ctx)
        try:
            with torch.no_grad():
                out = ctx.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                                         temperature=gen.temperature if gen.do_sample else None,
                                         top_k=gen.top_k if gen.do_sample else None,
                                         pad_token_id=tok.pad_id, eos_token_id=tok.eod_id, **ctx.generate_kwargs)
            cache = ctx.generate_kwargs.get("cache", ctx.generate_kwargs.get("past_key_values"))
        finally:
            run.host.end_generation(ctx)
        console.print(f"[bold]{prompt}[/bold]{tok.decode(out[0, ids.shape[1]:].tolist())}")
        if cache is not None and hasattr(cache, "nbytes"):
            console.print(f"  KV cache: {cache.nbytes():,} bytes")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import time

    from memwise import planner

    start, cpu = time.perf_counter(), time.process_time()
    budget = planner.parse_bytes(args.budget)
    problems = planner.check_args(budget, args.devices, args.seq_len, args.batch_size, args.max_new_tokens)
    if problems:
        raise RecipeError(problems, source="memwise plan")
    target = planner.load_target(args.model)
    for key in ("seq_len", "batch_size", "precision"):
        if getattr(args, key) is not None:
            setattr(target, key, getattr(args, key))
    if args.stage == "generate":
        return _plan_generation(args, target, budget, start, cpu)
    if args.max_new_tokens is not None:
        raise RecipeError([Problem("--max-new-tokens", "is a generation setting: add --stage generate")],
                          source="memwise plan")
    rows, notes = planner.plan_model(target, budget, args.devices)
    unit, gib = _plan_unit(budget)
    table = _ranked_table(f"plan for {args.model}: seq {target.seq_len}, batch {target.batch_size} per device, "
                        f"{target.precision}, budget {args.budget} per device ({unit} per device)",
                        ("peak", "parameters", "gradients", "optimizer", "activations", "temporaries", "slowdown"),
                        rows, lambda c: [f"{v / gib:,.2f}" for v in (c.peak, *(getattr(c.estimate, k) for k in (
                            "parameters", "gradients", "optimizer_state", "activations", "temporaries")))]
                        + [f"{c.slowdown:.2f}x"])
    return _finish_plan(args, table, rows, notes, (start, cpu), lambda best: planner.recipe_for(target, best),
                        (gib, f"{unit} per device"), "combination",
                        "more --devices, a shorter --seq-len or a smaller --batch-size", "run it with: memwise run {path}")


def _plan_unit(budget: int) -> tuple[str, int]:
    """The unit a plan prints its bytes in: GiB from a 1 GiB budget up, else MiB."""
    return ("GiB", 2 ** 30) if budget >= 2 ** 30 else ("MiB", 2 ** 20)


def _ranked_table(title: str, figures: tuple[str, ...], rows: list, cells: Callable[[Any], list[str]]) -> Any:
    """``memwise plan``'s table: each row's rank, label and whether it fits, then ``cells(row)``."""
    table = Table(title=title)
    for col in ("#", "combination", "fits", *figures):
        table.add_column(col, justify="left" if col in ("combination", "fits") else "right")
    for i, c in enumerate(rows):
        table.add_row(str(i + 1), c.label, "yes" if c.fits else "no", *cells(c))
    return table


def _finish_plan(args: argparse.Namespace, table: Any, rows: list, notes: list[str], started: tuple[float, float],
                 recipe_for: Any, unit: tuple[int, str], what: str, hint: str, use: str) -> int:
    """Print a plan's table and notes; with ``--write``, write the best fitting row's recipe (``recipe_for``).
    Exit 0 when a row fits, else 1. ``unit``: (bytes, name) of the printed peak; ``what`` a row is, what
    to ``hint`` when none fits, how to ``use`` the written file."""
    import time
    from pathlib import Path

    import yaml

    Console(highlight=False, width=max(console.width, 150)).print(table)  # never cut the labels
    for note in notes:
        console.print(f"  {note}")
    console.print(f"planned {len(rows)} combination(s) in {time.perf_counter() - started[0]:.1f} s "
                  f"({time.process_time() - started[1]:.1f} s CPU)")
    if args.write:
        best = next((c for c in rows if c.fits), None)
        if best is None:
            raise MemwiseError(f"no {what} fits {args.budget}; nothing written to {args.write} (try {hint})")
        stage = " --stage generate" if args.stage == "generate" else ""
        Path(args.write).write_text(f"# written by memwise plan {args.model}{stage} --budget {args.budget}: "
                                    f"{best.label}, predicted peak {best.peak / unit[0]:,.3f} {unit[1]}\n"
                                    + yaml.safe_dump(recipe_for(best), sort_keys=False))
        console.print(f"wrote {args.write} ({best.label}); {use.format(path=args.write)}")
    return 0 if any(c.fits for c in rows) else 1


def _plan_generation(args: argparse.Namespace, target: Any, budget: int, start: float, cpu: float) -> int:
    """``memwise plan --stage generate``: the KV cache choices, ranked; ``--write`` a generate recipe."""
    from memwise import generation_plan

    if args.devices != 1:
        raise RecipeError([Problem("--devices", "generation plans one device (memwise generate runs one process)")],
                          source="memwise plan")
    if args.precision is None:  # a recipe's model dtype; a model folder or config.json in bf16
        target.precision = {"float32": "32-true", "float16": "16-true"}.get(target.model_dtype or "", "bf16-true")
    new = args.max_new_tokens if args.max_new_tokens is not None else target.max_new_tokens
    rows, notes = generation_plan.plan_generation(target, budget, new)
    unit, scale = _plan_unit(budget)
    table = _ranked_table(f"generation plan for {args.model}: prompt {target.seq_len} + {new} new tokens, batch "
                        f"{target.batch_size}, {target.precision}, budget {args.budget} ({unit})",
                        ("peak", "weights", "KV at prompt", "KV at end", "prefill temporaries", "quality cost",
                         "slowdown"),
                        rows, lambda c: [f"{v / scale:,.3f}" for v in (
                            c.peak, c.estimate.parameters, c.prefill_kv, c.estimate.kv_cache,
                            c.estimate.temporaries + c.estimate.layer_forward)]
                        + [f"{c.quality:.2f}", f"{c.slowdown:.2f}x"])
    return _finish_plan(args, table, rows, notes, (start, cpu),
                        lambda best: generation_plan.generate_recipe_for(target, best, new), (scale, unit), "cache",
                        "a shorter --seq-len, fewer --max-new-tokens, a smaller --batch-size or bf16-true",
                        "use it with: memwise generate {path} --prompt ...")


def cmd_consolidate(args: argparse.Namespace) -> int:
    from memwise.sharding import consolidate, read_metadata

    out = consolidate(args.checkpoint, args.out)
    world = read_metadata(args.checkpoint).get("memwise", {}).get("world_size", "?")
    console.print(f"{args.checkpoint} (saved by {world} processes) -> {out}; load it with "
                  f"from_pretrained('{args.out}') or model.path={args.out}")
    return 0


# --- entry point ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memwise", description="memory-efficient transformer training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list or describe installed plugins")
    p.add_argument("action", choices=["list", "describe"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("recipes", help="list or show shipped recipes")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_recipes)
    for name, func, text in (("validate", cmd_validate, "check a recipe, report every problem"),
                             ("explain", cmd_explain, "predicted memory, plan and module changes; no training"),
                             ("run", cmd_run, "train a recipe and measure its memory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
        p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, e.g. trainer.max_steps=50")
        p.set_defaults(func=func)
        _allow_resolvers_flag(p)
        if name == "run":
            p.add_argument("--resume-without-plugin-state", action="store_true",
                           help="resume a checkpoint made without an optimizer-replacing plugin of this recipe "
                                "(its weights and progress; that plugin's optimizer state starts fresh)")
        if name == "validate":
            p.add_argument("--stage", choices=["fit", "generate"], default="fit",
                           help="the command the recipe is meant for (run: fit, generate: generate)")
    p = sub.add_parser("generate", help="generate text with a recipe's model and its generate-stage plugins")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.set_defaults(func=cmd_generate)
    _allow_resolvers_flag(p)
    p = sub.add_parser("plan", help="which plugins (and sharding) fit a model in a memory budget")
    p.add_argument("model", help="a local HF model folder, a config.json or a recipe")
    p.add_argument("--budget", required=True, help="memory per device, e.g. 24GiB, 80GB")
    p.add_argument("--devices", type=int, default=1, help="devices to shard over with FSDP (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence; with --stage generate, of the prompt (default: recipe's or 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per device (default: recipe's or 1)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"], default=None,
                   help="training precision; with --stage generate the weights' dtype: 32-true, bf16-true or 16-true "
                        "(default: the recipe's model.dtype, else bf16-true)")
    p.add_argument("--stage", choices=["fit", "generate"], default="fit",
                   help="fit: plan training (memwise run); generate: plan the KV cache (memwise generate)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="--stage generate: tokens generated after the --seq-len prompt (default: recipe's or 64)")
    p.add_argument("--write", metavar="RECIPE", default=None, help="write the best fitting combination as a recipe")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("consolidate", help="a sharded (FSDP) checkpoint folder -> one safetensors model folder")
    p.add_argument("checkpoint", help="checkpoint folder written by trainer.strategy=fsdp")
    p.add_argument("out", help="output folder (model.safetensors and config.json)")
    p.set_defaults(func=cmd_consolidate)
    _plugin_commands(sub)
    return parser


def _allow_resolvers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-resolvers", action="store_true",
                   help="let the recipe use OmegaConf resolvers such as ${oc.env:VAR} (off: a recipe never reads "
                        "the environment)")


def _plugin_commands(sub: Any) -> None:
    """Subcommands that plugins add through the memwise_add_cli_commands hook.

    A plugin that fails to load or to add its commands is reported and left out, so one
    broken plugin never breaks the whole command line.
    """
    instances = []
    for name in manager.available():
        try:
            instances.append(manager.load(name)())
        except Exception as err:  # noqa: BLE001 - one broken plugin must not break the CLI
            warnings.warn(f"plugin '{name}' could not be loaded: {err}", stacklevel=2)
    if instances:
        from memwise.host import PluginHost

        PluginHost(instances).add_cli_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RecipeError as err:
        err_console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    except InputError as err:
        err_console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2
    except RunInterrupted as err:
        err_console.print(f"[yellow]interrupted:[/yellow] {err}", soft_wrap=True)
        return err.exit_code
    except PluginHookError as err:
        err_console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 1
    except MemwiseError as err:
        err_console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        return 2 if args.command in ("validate", "explain", "plugins", "recipes", "plan", "consolidate") else 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())


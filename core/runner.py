"""A recipe's run: build model and data, apply plugins, train, measure, report."""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from memwise import memory
from memwise.context import RunContext, Workload
from memwise.data.datasets import build_corpus
from memwise.data.tokens import IGNORE_INDEX, build_tokenizer
from memwise.data.windows import WindowDataset, collate
from memwise.errors import Problem, RecipeError
from memwise.host import PluginHost, module_signature
from memwise.models import build_model
from memwise.optim import build_optimizer, build_scheduler, state_bytes
from memwise.recipe import Recipe


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token loss over target positions (no attention mask: padding sits at the end
    of each window, and causal attention never lets a real token see it)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss


def check_vocabulary(corpus: Any, model: torch.nn.Module, tokenizer: Any) -> list[Problem]:
    """Every token id of the data must be a row of the model's embedding (else indexing garbage or a crash)."""
    rows = model.get_input_embeddings().num_embeddings
    problems = []
    if tokenizer.vocab_size > rows:
        problems.append(Problem("tokenizer", f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's "
                                f"embedding only {rows:,}: use the model's own tokenizer (tokenizer.kind: auto)"))
    if corpus is not None:
        docs = [d for d in (*corpus.train, *corpus.val) if len(d)]
        top = max((int(d.max()) for d in docs), default=-1)
        if top >= rows:
            problems.append(Problem("data", f"token id {top:,} in the data is outside the model's vocabulary "
                                    f"({rows:,} ids): the data was tokenized for another model; set the "
                                    "recipe's tokenizer to the model's own"))
    return problems


def target_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class Run:
    """Everything one command needs from a recipe, built in the order the hooks expect."""

    def __init__(self, recipe: Recipe, stage: str) -> None:
        self.recipe = recipe
        self.cfg = recipe.config
        self.host = PluginHost(recipe.plugins)
        data = recipe.data
        self.ctx = RunContext(stage=stage, plugins=recipe.plugins, recipe=recipe.resolved, config=recipe.config,
                              workload=Workload(data.batch_size, data.seq_len, self.cfg.trainer.precision),
                              validation=self.val_batches)
        report = self.cfg.report.dir or f"runs/{self.cfg.name}"
        self.ctx.report_dir = Path(report)
        self.baseline_signature: dict[str, str] = {}
        self.changes: dict[str, list[str]] = {}
        self._val_batches: list[dict] | None = None
        self.resume_without_plugin_state = False
        """Resume a checkpoint made without an optimizer-replacing plugin of this run (explicit flag)."""
        self.stop_signal: int | None = None
        """Set by the CLI's SIGINT/SIGTERM handler: stop after the current step."""
        self.signal_handler: Any = None
        self.interactive = sys.stdout.isatty()
        """stdout is a terminal: a progress bar when the recipe asks for one; else a line every
        ``trainer.log_every_n_steps`` steps, so that a piped or logged run is never silent."""

    # --- building -------------------------------------------------------------------------

    def build(self) -> None:
        """Seed, corpus, model, then the plugins' validation (every problem at once)."""
        import lightning.pytorch as pl

        if self.cfg.trainer.num_threads:
            torch.set_num_threads(self.cfg.trainer.num_threads)
        pl.seed_everything(self.cfg.seed, workers=True, verbose=False)
        ctx = self.ctx
        model_cfg = self.cfg.model
        ctx.tokenizer = build_tokenizer(self.cfg.tokenizer, model_cfg.path, model_cfg.gguf_file)
        if ctx.stage != "generate":  # generation needs the tokenizer, never the corpus
            ctx.corpus = build_corpus(self.recipe.data, ctx.tokenizer)
        ctx.model = build_model(model_cfg, ctx.tokenizer.vocab_size)
        problems = check_vocabulary(ctx.corpus, ctx.model, ctx.tokenizer) + self.host.validate(ctx)
        if problems:
            raise RecipeError(problems, source=self.recipe.source)
        self.baseline_signature = module_signature(ctx.model)

    def transform(self) -> None:
        """The plugins' model surgery, in plan order."""
        self.changes = self.host.transform_model(self.ctx)

    def estimate_and_transform(self) -> list[tuple[str, memory.MemoryEstimate, str]]:
        """The baseline prediction, then plugin by plugin its estimate and its surgery: each
        plugin predicts on the model as the plugins before it left it. Rows of (label, estimate, note)."""
        model, w = self.ctx.model, self.ctx.workload
        trainable = [p for p in model.parameters() if p.requires_grad]
        base = memory.predict_baseline(model, state_bytes(trainable, self.cfg.optimizer), w.batch_size, w.seq_len,
                                       w.precision)
        rows = self.host.estimate(self.ctx, base, transform=True)
        self.changes = self.host.changes
        return rows

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer, then the plugins' wrapping or replacement."""
        ctx = self.ctx
        ctx.optimizer = build_optimizer(ctx.model, self.cfg.optimizer)
        return self.host.configure_optimizer(ctx)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        sched = build_scheduler(optimizer, self.cfg.scheduler, self.cfg.trainer.max_steps)
        self.ctx.schedulers = [sched]
        return sched

    def step_context(self) -> contextlib.ExitStack:
        """The plugins' step contexts, entered in plan order (left in reverse)."""
        return self.host.step_context(self.ctx)

    def train_dataloader(self, rank: int = 0, world: int = 1, skip: int = 0) -> torch.utils.data.DataLoader:
        """The recipe's training windows and resumable sampler (this rank's share, ``skip`` batches
        already trained), after the plugins' data hooks; also left on ``ctx`` for the probe."""
        from memwise.data.sampler import ShuffledBatchSampler

        ctx, data = self.ctx, self.recipe.data
        ctx.train_dataset = self.train_dataset()
        ctx.batch_sampler = ShuffledBatchSampler(len(ctx.train_dataset), data.batch_size, data.seed, rank, world)
        ctx.collate_fn = collate
        self.host.wrap_train_data(ctx)
        ctx.batch_sampler.skip_to(skip)
        return torch.utils.data.DataLoader(ctx.train_dataset, batch_sampler=ctx.batch_sampler,
                                           collate_fn=ctx.collate_fn, num_workers=0)

    def train_dataset(self) -> WindowDataset:
        from memwise.data.windows import ConcatChunkDataset

        corpus, data = self.ctx.corpus, self.recipe.data
        if data.packing == "concat_chunk":
            return ConcatChunkDataset(corpus.train, data.seq_len, corpus.train_targets)
        return WindowDataset(corpus.train, data.seq_len, corpus.tokenizer.pad_id, corpus.train_targets)

    def val_batches(self) -> list[dict]:
        """A fixed validation set: the same windows, in the same order, at every evaluation."""
        if self._val_batches is None:
            corpus, data = self.ctx.corpus, self.recipe.data
            ds = WindowDataset(corpus.val, data.seq_len, corpus.tokenizer.pad_id, corpus.val_targets)
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234)).tolist()
            n = min(len(ds), data.val_batches * data.batch_size)
            chosen = order[:n]
            self._val_batches = [collate([ds[i] for i in chosen[j:j + data.batch_size]])
                                 for j in range(0, n, data.batch_size)]
        return self._val_batches

    # --- memory ---------------------------------------------------------------------------

    def probe(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              forward_context: Any = contextlib.nullcontext) -> memory.MemoryReport:
        """One plain step under MemTracker, outside Lightning; everything it changes is restored."""
        ctx = self.ctx
        indices = next(iter(ctx.batch_sampler))
        batch = ctx.collate_fn([ctx.train_dataset[i] for i in indices])
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        saved_opt = copy.deepcopy(optimizer.state_dict())
        saved_plugins = copy.deepcopy(self.host.state_dict(ctx))
        rng = torch.get_rng_state()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def context() -> contextlib.ExitStack:
            stack = self.step_context()
            stack.enter_context(forward_context())
            return stack

        was_training = model.training
        model.train()
        try:
            report = memory.measure_step(model, optimizer, lambda: causal_lm_loss(model, batch), context,
                                         external=[batch["input_ids"], batch["labels"]])
        finally:
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_opt)
            self.host.load_state_dict(ctx, saved_plugins)
            torch.set_rng_state(rng)
            model.train(was_training)
        return report

    def checkpoint_path(self, step: int | str) -> Path:
        name = f"step-{step:06d}.ckpt" if isinstance(step, int) else f"{step}.ckpt"
        return self.ctx.report_dir / "checkpoints" / name

    def make_trainer(self) -> Any:
        """Lightning Trainer from the recipe's trainer block (manual optimization, our own loop extras)."""
        import lightning.pytorch as pl

        from memwise.lightning.checkpoint_io import AtomicCheckpointIO

        t = self.cfg.trainer
        # RecipeDataModule resumes its sampler at the exact batch (skip_to); Lightning cannot see that
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        callbacks = []
        bar = t.progress_bar and self.interactive
        if bar:
            from lightning.pytorch.callbacks import RichProgressBar

            callbacks.append(RichProgressBar(leave=True))
        strategy: Any = t.strategy
        if t.strategy == "fsdp":
            from memwise.sharding import make_strategy

            strategy = make_strategy(t.devices, t.num_nodes)
        return pl.Trainer(
            max_steps=t.max_steps, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
            num_nodes=t.num_nodes, strategy=strategy, logger=False, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            use_distributed_sampler=False, enable_progress_bar=bar, callbacks=callbacks,
            plugins=[AtomicCheckpointIO()], max_epochs=-1,
        )

    def probe_without_training(self, warm: bool = True) -> memory.MemoryReport:
        """Build data and optimizer as a run would and measure one step; no Lightning, no training.

        For tests and benchmarks: the same probe ``memwise run`` takes after training. With
        ``warm``, one unmeasured step first creates the optimizer state, so that it is live at
        the measured peak as in a running job.
        """
        ctx = self.ctx
        self.train_dataloader()
        optimizer = self.make_optimizer()
        precision = self.cfg.trainer.precision
        autocast = contextlib.nullcontext
        if precision in ("bf16-mixed", "16-mixed"):
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
            autocast = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731
        if warm:
            batch = ctx.collate_fn([ctx.train_dataset[i] for i in next(iter(ctx.batch_sampler))])
            with self.step_context(), autocast():
                causal_lm_loss(ctx.model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return self.probe(ctx.model, optimizer, autocast)


def measure_recipe(path: str, overrides: list[str] | None = None,
                   warm: bool = True) -> tuple[list, memory.MemoryReport]:
    """(predicted rows, measured report) for a recipe, without training."""
    from memwise import recipe

    run = Run(recipe.load(path, overrides or []), "fit")
    run.build()
    rows = run.estimate_and_transform()
    return rows, run.probe_without_training(warm)

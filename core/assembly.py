"""What a recipe names, built in the order the hooks expect: seed, tokenizer, corpus and model
checked by every plugin; the baseline's memory; the optimizer and its schedule after the plugins'
replacement."""

from __future__ import annotations

from typing import Any

import torch

from memwise import memory
from memwise.data.datasets import build_corpus
from memwise.data.tokens import build_tokenizer, check_vocabulary
from memwise.errors import RecipeError
from memwise.models import build_model
from memwise.optim import build_optimizer, build_scheduler, state_bytes


def build(ctx: Any, host: Any, recipe: Any) -> None:
    """Seed, tokenizer, corpus (not for generation) and model onto ``ctx``, then the vocabulary
    check and the plugins' validation, every problem at once."""
    import lightning.pytorch as pl

    cfg = recipe.config
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ctx.tokenizer = build_tokenizer(cfg.tokenizer, cfg.model.path, cfg.model.gguf_file)
    if ctx.stage != "generate":  # generation needs the tokenizer, never the corpus
        ctx.corpus = build_corpus(recipe.data, ctx.tokenizer)
    ctx.model = build_model(cfg.model, ctx.tokenizer.vocab_size)
    problems = check_vocabulary(ctx.corpus, ctx.model, ctx.tokenizer) + host.validate(ctx)
    if problems:
        raise RecipeError(problems, source=recipe.source)


def baseline(ctx: Any, optimizer: Any) -> memory.MemoryEstimate:
    """The prediction for ``ctx.model`` with no plugin, trained by the recipe's ``optimizer``."""
    w = ctx.workload
    trainable = [p for p in ctx.model.parameters() if p.requires_grad]
    return memory.predict_baseline(ctx.model, state_bytes(trainable, optimizer), w.batch_size, w.seq_len, w.precision)


def optimizer(ctx: Any, host: Any, cfg: Any) -> torch.optim.Optimizer:
    """The recipe's optimizer, then the plugins' wrapping or replacement (the one to step)."""
    ctx.optimizer = build_optimizer(ctx.model, cfg.optimizer)
    return host.configure_optimizer(ctx)


def scheduler(ctx: Any, optimizer: torch.optim.Optimizer, cfg: Any) -> Any:
    """The recipe's LR schedule on the final optimizer, also left on ``ctx.schedulers``."""
    sched = build_scheduler(optimizer, cfg.scheduler, cfg.trainer.max_steps)
    ctx.schedulers = [sched]
    return sched

"""DecompositionPlugin: replaces the training batches with variable-length buckets and a curriculum."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Literal

import memwise
from memwise import MemoryDelta, Problem, RecipeError, option

from memwise_decomposition.curriculum import CurriculumName, curriculum_odds
from memwise_decomposition.dataset import BucketDataset, collate
from memwise_decomposition.decompose import LongDocuments, decompose
from memwise_decomposition.loader import sampler_for
from memwise_decomposition.report import bucket_report


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


class DecompositionPlugin(memwise.Plugin):
    """Dataset decomposition (variable sequence length training).

    Each document is cut into power-of-two chunks by the binary expansion of its length;
    each step takes one bucket with a fixed token budget, in the order a length
    curriculum gives. No sequence spans two documents.
    """

    name = "decomposition"
    summary = "variable sequence length: documents cut into power-of-two buckets, one bucket per step, curriculum"
    stages = ("fit",)
    phase = "data"
    distribution = "memwise-decomposition"
    planned = False  # it changes the batches (lengths, counts): a data choice, not a memory setting
    strategies = (*memwise.Plugin.strategies, "fsdp")  # the same bucket on every rank; sharding is orthogonal

    @dataclasses.dataclass
    class Config:
        min_len: int = option(64, "shortest sequence in targets (a power of two); shorter remainders are dropped")
        max_len: int = option(0, "longest sequence in targets (a power of two); 0 takes data.seq_len")
        tokens_per_step: int = option(0, "targets per step on each rank, a multiple of max_len; "
                                         "0 takes data.batch_size x max_len (the baseline's budget)")
        curriculum: CurriculumName = option(
            "grow_p2", "order of the buckets: natural (random), uniform, grow_linear, grow_p2 (odds 2^(n-1)..1, "
                       "shortest first) or custom (odds)")
        cycles: int = option(1, "curriculum cycles per span; each cycle uses 1/cycles of every bucket")
        span: Literal["run", "epoch"] = option(
            "run", "what the cycles divide: run (trainer.max_steps, buckets subsampled in proportion when the "
                   "run is shorter than a pass, as in the paper) or epoch (a full pass over the buckets)")
        odds: list[float] = option([], "custom curriculum odds, one per bucket, shortest bucket first")
        longest_first: bool = option(False, "put one batch of the longest bucket first in every epoch "
                                            "(an out-of-memory shows at step 1)")
        long_documents: LongDocuments = option(
            "paper", "chunks of documents longer than max_len: paper draws k with p(k) ~ 2^(max-k); "
                     "longest cuts max_len chunks")
        seed: int = option(0, "seed of the long-document draws, the shuffles and the curriculum")
        trace: bool = option(False, "write each rank's sequence length and dataset indices per step to "
                                    "report_dir/decomposition-trace/rank<r>.jsonl (to check DDP agreement)")

    def post_init(self) -> None:
        c, problems = self.config, []
        if not _power_of_two(c.min_len):
            problems.append(Problem("decomposition.min_len", f"must be a power of two, got {c.min_len}"))
        if c.max_len and not _power_of_two(c.max_len):
            problems.append(Problem("decomposition.max_len", f"must be a power of two (or 0), got {c.max_len}"))
        if c.max_len and _power_of_two(c.min_len) and c.min_len > c.max_len:
            problems.append(Problem("decomposition.min_len", f"{c.min_len} is larger than max_len {c.max_len}"))
        if c.tokens_per_step < 0 or (c.tokens_per_step and c.max_len and c.tokens_per_step % c.max_len):
            problems.append(Problem("decomposition.tokens_per_step",
                                    f"must be a positive multiple of max_len {c.max_len}, got {c.tokens_per_step}"))
        if c.cycles < 1:
            problems.append(Problem("decomposition.cycles", f"must be at least 1, got {c.cycles}"))
        if c.curriculum == "custom" and not c.odds:
            problems.append(Problem("decomposition.odds", "curriculum 'custom' needs odds: one number per bucket, "
                                    "shortest first"))
        if c.odds and c.curriculum != "custom":
            problems.append(Problem("decomposition.odds", f"odds are only read by curriculum 'custom', "
                                    f"not '{c.curriculum}': remove them or set curriculum: custom"))
        if c.odds and c.max_len and _power_of_two(c.max_len) and _power_of_two(c.min_len) and c.min_len <= c.max_len:
            n = c.max_len.bit_length() - c.min_len.bit_length() + 1
            try:
                curriculum_odds("custom", n, c.odds)
            except ValueError as err:
                problems.append(Problem("decomposition.odds", str(err)))
        if problems:
            raise RecipeError(problems)
        self.sampler = None
        self.buckets = None
        self.steps_seen = 0
        self.steps_per_bucket: dict[int, int] = {}
        self._pending_fingerprint: list[int] | None = None

    def provides(self) -> set[str]:
        return {"data.batching"}

    # -- resolution of the settings that default to the data block --------------------------------
    def resolved(self, ctx: Any) -> tuple[int, int, int, list[Problem]]:
        """(min_len, max_len, tokens_per_step) with the 0 defaults filled from ctx.workload."""
        c, problems = self.config, []
        max_len, budget = c.max_len, c.tokens_per_step
        work = ctx.workload
        if not max_len:
            if work is None:
                problems.append(Problem("decomposition.max_len", "set it: 0 means data.seq_len, unknown here"))
            elif not _power_of_two(work.seq_len):
                problems.append(Problem("decomposition.max_len", f"0 takes data.seq_len {work.seq_len}, which is "
                                        "not a power of two: set max_len or data.seq_len to one"))
            else:
                max_len = work.seq_len
        if max_len and not budget:
            if work is None:
                problems.append(Problem("decomposition.tokens_per_step", "set it: 0 means data.batch_size x max_len"))
            else:
                budget = work.batch_size * max_len
        if max_len and budget % max_len:
            problems.append(Problem("decomposition.tokens_per_step",
                                    f"{budget} is not a multiple of max_len {max_len}"))
        if max_len and c.min_len > max_len:
            problems.append(Problem("decomposition.min_len", f"{c.min_len} is larger than max_len {max_len}"))
        if max_len and c.curriculum == "custom":
            try:
                curriculum_odds("custom", max_len.bit_length() - c.min_len.bit_length() + 1, c.odds)
            except ValueError as err:
                problems.append(Problem("decomposition.odds", str(err)))
        return c.min_len, max_len, budget, problems

    @memwise.hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        problems = self.resolved(ctx)[3]
        packing = ctx.config.data.get("packing") if ctx.config else None
        if packing == "concat_chunk":
            problems.append(Problem("data.packing", "concat_chunk packs documents itself; decomposition replaces "
                                    "the batches: set data.packing: window or remove the decomposition plugin"))
        return problems

    @memwise.hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> Any:
        """Activations scale with the tokens of the largest batch (the shortest bucket: budget x (1 + 1/min_len))."""
        min_len, max_len, budget, problems = self.resolved(ctx)
        work = ctx.workload
        if problems or work is None or not estimate.activations:
            return None
        largest = budget // min_len * (min_len + 1)
        base = work.batch_size * work.seq_len
        return MemoryDelta(activations=int(estimate.activations * largest / base) - estimate.activations,
                           note=f"largest batch {largest} tokens (bucket {min_len}) vs {base}")

    @memwise.hookimpl
    def memwise_wrap_train_dataloader(self, ctx: Any) -> None:
        min_len, max_len, budget, problems = self.resolved(ctx)
        if problems:
            raise RecipeError(problems)
        if ctx.corpus is None or not ctx.corpus.train:
            raise RecipeError([Problem("decomposition", "needs a dataset that yields documents (ctx.corpus.train)")])
        c = self.config
        trainer = ctx.trainer
        rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        self.buckets = decompose(ctx.corpus.train, min_len, max_len, rule=c.long_documents, seed=c.seed,
                                 targets=ctx.corpus.train_targets)
        dataset = BucketDataset(self.buckets)
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        epoch_steps = max_steps if c.span == "run" and max_steps and max_steps > 0 else 0
        self.sampler = sampler_for(dataset, budget, c.curriculum, c.cycles, c.odds, c.longest_first, c.seed,
                                   rank, world, epoch_steps)
        if c.span == "run" and not epoch_steps:
            warnings.warn("decomposition: span 'run' needs trainer.max_steps; the curriculum cycles span a full "
                          "pass over the buckets instead", memwise.NoEffectWarning, stacklevel=2)
        self._check_fingerprint()
        self.sampler.skip_to(self.steps_seen)
        ctx.train_dataset, ctx.batch_sampler, ctx.collate_fn = dataset, self.sampler, collate
        ctx.shared.setdefault(self.name, {}).update(self.report(ctx))

    @memwise.hookimpl
    def memwise_on_train_batch_start(self, ctx: Any, batch: Any, batch_idx: int) -> None:
        length = int(batch["input_ids"].shape[1])
        k = (length - 1).bit_length() - 1  # length is 2**k + 1
        self.steps_per_bucket[k] = self.steps_per_bucket.get(k, 0) + 1
        self.steps_seen += 1
        ctx.shared.setdefault(self.name, {}).update(seq_len=length, batch_size=int(batch["input_ids"].shape[0]))
        if self.config.trace and ctx.report_dir is not None and self.sampler is not None:
            self._trace(ctx, length)

    def _trace(self, ctx: Any, length: int) -> None:
        folder = ctx.report_dir / "decomposition-trace"
        folder.mkdir(parents=True, exist_ok=True)
        step = self.steps_seen - 1
        line = {"step": step, "seq_len": length, "indices": self.sampler.batch(step)}
        with open(folder / f"rank{self.sampler.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    @memwise.hookimpl
    def memwise_on_fit_end(self, ctx: Any) -> None:
        if ctx.report_dir is None or self.buckets is None or not ctx.is_global_zero:
            return
        ctx.report_dir.mkdir(parents=True, exist_ok=True)
        (ctx.report_dir / "decomposition.json").write_text(json.dumps(self.report(ctx), indent=2))

    @memwise.hookimpl
    def memwise_state_dict(self, ctx: Any) -> dict:
        fingerprint = self._fingerprint()
        return {"steps_seen": self.steps_seen, "fingerprint": fingerprint,
                "steps_per_bucket": {str(k): v for k, v in self.steps_per_bucket.items()}}

    @memwise.hookimpl
    def memwise_load_state_dict(self, ctx: Any, state: dict) -> None:
        self.steps_seen = int(state["steps_seen"])
        self.steps_per_bucket = {int(k): int(v) for k, v in state.get("steps_per_bucket", {}).items()}
        self._pending_fingerprint = list(state.get("fingerprint", [])) or None
        if self.sampler is not None:
            self._check_fingerprint()
            self.sampler.skip_to(self.steps_seen)

    def _fingerprint(self) -> list[int]:
        """Sequences per bucket, then batches per bucket in an epoch: what the batch order depends on."""
        if self.buckets is None or self.sampler is None:
            return []
        return [self.buckets.count(k) for k in self.buckets.logs] + list(self.sampler.batches)

    def _check_fingerprint(self) -> None:
        if self._pending_fingerprint is None or self.buckets is None:
            return
        now = self._fingerprint()
        if now != self._pending_fingerprint:
            raise RecipeError([Problem("decomposition", f"the checkpoint's buckets and batches per epoch "
                                       f"{self._pending_fingerprint} differ from this run's {now}: the data, "
                                       "trainer.max_steps or the decomposition settings changed, so "
                                       "resuming would not replay the same batches; restore them or start afresh")])
        self._pending_fingerprint = None

    def report(self, ctx: Any) -> dict:
        """The per-bucket report, with attention FLOPs per token for ctx.model when it is known."""
        cfg = getattr(ctx.model, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        layers = getattr(cfg, "num_hidden_layers", None)
        base = ctx.workload.seq_len if ctx.workload is not None else None
        out = bucket_report(self.buckets, self.sampler, baseline_seq_len=base, hidden_size=hidden, num_layers=layers,
                            steps_per_bucket=self.steps_per_bucket)
        out["steps_seen"] = self.steps_seen
        return out

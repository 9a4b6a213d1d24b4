"""LoramPlugin: LoRAM inside a memwise run (prune, align, NF4, adapters; recover at fit end)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import memwise
from memwise import MemoryDelta, Plugin, Problem, RecipeError, hookimpl, option
from memwise.surgery import LayerSpec, layer_indices, parse_layers
from memwise_loram.index_map import IndexMap
from memwise_loram.lora import LoraSpec

Method = Literal["l2", "taylor", "random", "wanda", "2:4"]


class LoramPlugin(Plugin):
    """Train LoRA on a pruned (optionally NF4) copy of the frozen base; recover for the full model.

    Its transform does, in this order: prune, align (optional), quantize the base to NF4
    (optional), inject adapters and freeze everything else. So it runs in phase ``prune``
    and adapters exist before any later phase (``adapt``, ``replace``...) sees the model.
    """

    name = "loram"
    summary = "LoRA on a pruned (and optionally NF4) base; adapters recovered for the full model (PEFT format)"
    stages = ("fit",)
    phase = "prune"
    composes_with = ("coat", "mesa")
    required_on_load = True
    distribution = "memwise-loram"
    planned = False  # it prunes the model and trains adapters: a different job, not a memory setting
    strategy_notes = {"fsdp": "LoRAM prunes and may store the frozen base in NF4 (packed bytes plus scales), which "
                               "fully_shard cannot split along dim 0 as parameters; use trainer.strategy=ddp: the "
                               "pruned base is already a fraction of the model"}

    @dataclasses.dataclass
    class Config:
        method: Method = option("l2", "pruning: l2 / taylor / random (structured), wanda or 2:4 (masked in place)")
        ratio: float = option(0.5, "share pruned in each pruned layer (ceil(I*r) MLP channels, floor(n_kv*r) KV heads)")
        layers: LayerSpec = option("all", "decoder layers to prune: 'all', indices, or inclusive ranges like '4-77' or "
                                          "'1,3-5'")
        seed: int = option(0, "seed of random pruning and of the calibration windows")
        calibration_batches: int = option(4, "batches of training windows for taylor / wanda scores")
        calibration_batch_size: int = option(4, "sequences per calibration or alignment batch")
        align_steps: int = option(0, "steps of full-parameter training of the pruned model before LoRA (0: none)")
        align_lr: float = option(5.0e-5, "learning rate of the alignment (AdamW, cosine, LM head frozen)")
        align_on: Literal["pystdlib", "train"] = option(
            "pystdlib", "alignment text: pystdlib (general text in the run's tokenizer, as the paper's pretraining data) "
                        "or the run's train set")
        rank: int = option(8, "LoRA rank r")
        alpha: float = option(16.0, "LoRA alpha (update scaled by alpha / r)")
        dropout: float = option(0.05, "dropout on the adapter input")
        targets: list[str] = option([], "projections that get adapters, by the architecture's names (q_proj, ...); "
                                        "empty: all seven (q, k, v, o, gate, up, down)")
        nf4: bool = option(False, "QLoRAM: store the frozen pruned projections in NF4")
        nf4_block: int = option(64, "values per NF4 block (one absmax each)")
        double_quant: bool = option(True, "store the NF4 block absmax values in int8 (double quantization)")
        export: bool = option(True, "at fit end, write the recovered adapter (PEFT format) to <report>/adapter")
        save_pruned: bool = option(False, "at fit end, also save the pruned model with its adapters to <report>/pruned")
        evaluate: bool = option(True, "at fit end, score the full base (model.path) with the recovered adapter")

    def post_init(self) -> None:
        c = self.config
        problems = []
        if not 0.0 <= c.ratio < 1.0:
            problems.append(Problem("loram.ratio", f"must be in [0, 1), got {c.ratio}; 0.5 and 0.85 are the paper's"))
        if c.rank < 1:
            problems.append(Problem("loram.rank", f"must be >= 1, got {c.rank}"))
        if not 0.0 <= c.dropout < 1.0:
            problems.append(Problem("loram.dropout", f"must be in [0, 1), got {c.dropout}"))
        if c.nf4_block < 2 or c.nf4_block % 2:
            problems.append(Problem("loram.nf4_block", f"must be an even number >= 2, got {c.nf4_block}"))
        if c.align_steps < 0 or c.calibration_batches < 0 or c.calibration_batch_size < 1:
            problems.append(Problem("loram.align_steps", "align_steps and calibration_batches must be >= 0, "
                                    "calibration_batch_size >= 1"))
        if c.method == "2:4" and c.ratio not in (0.0, 0.5):
            problems.append(Problem("loram.ratio", f"2:4 always prunes one half; set ratio 0.5, not {c.ratio}"))
        if c.nf4 and c.method in ("wanda", "2:4"):
            problems.append(Problem("loram.nf4", "NF4 would fill the zeroed weights of wanda / 2:4 with non-zero "
                                    "levels; use a structured method with nf4"))
        try:
            parse_layers(c.layers)
        except ValueError as exc:
            problems.append(Problem("loram.layers", f"cannot read '{c.layers}': {exc}; write 'all' or '4-77'"))
        if problems:
            raise RecipeError(problems)
        self.index_map: IndexMap | None = None
        self.lora_spec: LoraSpec | None = None  # the spec with the model's projection names, once transformed

    @property
    def spec(self) -> LoraSpec:
        c = self.config
        return LoraSpec(c.rank, c.alpha, c.dropout, list(c.targets))

    def nf4_settings(self) -> dict | None:
        c = self.config
        return {"block": c.nf4_block, "double_quant": c.double_quant, "dq_block": 256} if c.nf4 else None

    # -- checks and estimates ----------------------------------------------------------------

    @hookimpl
    def memwise_validate(self, ctx: Any) -> list:
        c = self.config
        problems = []
        from memwise.architectures import UnsupportedArchitecture
        from memwise_loram.index_map import Geometry
        from memwise_loram.layout import projection_names

        try:
            names = projection_names(ctx.model)
        except UnsupportedArchitecture as err:
            return [Problem("loram", str(err))]
        config = ctx.model.config
        bad = [t for t in c.targets if t not in names]
        if bad:
            problems.append(Problem("loram.targets", f"unknown targets {bad}; this model's projections are {names}"))
        num_layers = Geometry.of(config).num_layers
        try:
            layer_indices(c.layers, num_layers)
        except ValueError as exc:
            problems.append(Problem("loram.layers", f"{exc}; the model has {num_layers} layers"))
        needs_data = (c.method == "taylor" and c.calibration_batches > 0) or (c.align_steps > 0 and c.align_on == "train")
        if needs_data and ctx.corpus is None:
            problems.append(Problem("loram.method", "taylor scores and alignment need training data (ctx.corpus); "
                                    "use l2 / random, or a recipe with a data block"))
        if c.method == "taylor" and c.calibration_batches == 0:
            problems.append(Problem("loram.calibration_batches", "taylor needs at least one calibration batch"))
        hidden = Geometry.of(config).hidden_size
        if c.method == "2:4" and hidden % 4:
            problems.append(Problem("loram.method", f"2:4 needs in_features divisible by 4 (hidden {hidden})"))
        if ctx.config and ctx.config.optimizer.name != "adamw":
            problems.append(Problem("loram", f"memory estimate assumes AdamW, recipe optimizer is "
                                    f"{ctx.config.optimizer.name}"))
        return problems

    @hookimpl
    def memwise_estimate_memory(self, ctx: Any, estimate: Any) -> MemoryDelta:
        from memwise_loram.estimate import loram_delta

        return loram_delta(ctx.model, self.config, self.nf4_settings(), estimate, ctx.workload, _device_type(ctx))

    # -- the transform ---------------------------------------------------------------------

    def _batches(self, ctx: Any, count: int, salt: int, corpus: Any = None) -> list[dict]:
        from memwise_loram.calibration import windows

        corpus = corpus or ctx.corpus
        seq_len = ctx.workload.seq_len if ctx.workload is not None else 256
        return windows(corpus.train, count, self.config.calibration_batch_size, seq_len,
                       corpus.tokenizer.pad_id, self.config.seed + salt)

    @hookimpl
    def memwise_transform_model(self, ctx: Any) -> None:
        from memwise_loram.apply import apply_loram
        from memwise_loram.prune import pruned_module_names

        c = self.config
        model = ctx.model
        calibration = None
        if c.method in ("taylor", "wanda", "2:4") and ctx.corpus is not None and c.calibration_batches > 0:
            calibration = self._batches(ctx, c.calibration_batches, 0)
        align = None
        if c.align_steps > 0:
            tokenizer = ctx.tokenizer or getattr(ctx.corpus, "tokenizer", None)
            corpus = _pystdlib(tokenizer) if c.align_on == "pystdlib" else ctx.corpus
            align = {"batches": self._batches(ctx, min(c.align_steps, 64), 1, corpus), "steps": c.align_steps,
                     "lr": c.align_lr}
        self.lora_spec = self.spec.for_model(model)
        imap, adapted = apply_loram(model, c.method, c.ratio, c.layers, self.lora_spec, calibration, c.seed,
                                    self.nf4_settings(), align)
        self.index_map = imap
        for name in sorted(set(pruned_module_names(model, imap)) | set(adapted)):
            ctx.claims.claim(name, self)
        ctx.shared["loram"] = {"index_map": imap.to_dict(), "adapted": adapted}

    # -- checkpoints and export --------------------------------------------------------------

    @hookimpl
    def memwise_state_dict(self, ctx: Any) -> dict | None:
        if self.index_map is None:
            return None
        return {"index_map": self.index_map.to_dict(), "lora": dataclasses.asdict(self.lora_spec),
                "nf4": self.nf4_settings()}

    @hookimpl
    def memwise_load_state_dict(self, ctx: Any, state: dict) -> None:
        saved = IndexMap.from_dict(state["index_map"])
        if self.index_map is not None and saved.to_dict() != self.index_map.to_dict():
            raise memwise.MemwiseError(
                "loram: the checkpoint was pruned differently from this run (other kept heads/channels); "
                "resume with the same base model, method, ratio, layers, seed and calibration data")
        self.index_map = saved
        self.lora_spec = self.lora_spec or LoraSpec(**state["lora"])

    @hookimpl
    def memwise_on_fit_end(self, ctx: Any) -> None:
        if self.index_map is None or ctx.report_dir is None or not ctx.is_global_zero:
            return
        from pathlib import Path

        from memwise_loram.apply import export_recovered

        report = Path(ctx.report_dir)
        if self.config.export:
            export_recovered(ctx.model, self.index_map, self.lora_spec, report / "adapter",
                             base_model=_base_path(ctx))
        if self.config.save_pruned:
            from memwise_loram.storage import save_pruned

            save_pruned(ctx.model, self.index_map, report / "pruned", self.lora_spec, self.nf4_settings())
        base = _base_path(ctx)
        batches = ctx.val_batches() if self.config.export and self.config.evaluate and base else []
        if batches:
            import json

            from memwise_loram.evaluate import evaluate_recovered

            result = evaluate_recovered(base, report / "adapter", batches)
            (report / "loram_eval.json").write_text(json.dumps(result, indent=1))
            print(f"loram: full base val loss {result['base_val_loss']:.4f}, with the recovered adapter "
                  f"{result['recovered_val_loss']:.4f} ({100 * result['relative_change']:+.1f}%)")

    @hookimpl
    def memwise_add_cli_commands(self, subparsers: Any) -> None:
        from memwise_loram.cli import add_commands

        add_commands(subparsers)


def _device_type(ctx: Any) -> str:
    """The device whose kernels the activation estimate counts ("cuda" or "cpu"; dropout's saved mask differs):
    the recipe's accelerator when it names one, else (``auto``, no recipe) the model's device at estimate time,
    where memwise's probe measures it (on CPU: an overestimate for a CUDA run, by the mask's extra bytes)."""
    accelerator = ctx.config.trainer.accelerator if ctx.config is not None else "auto"
    if accelerator == "auto":
        return next(ctx.model.parameters()).device.type
    return "cuda" if accelerator in ("gpu", "cuda") else "cpu"


def _base_path(ctx: Any) -> str | None:
    """The full base model's folder when the recipe loads one (model.path)."""
    path = ctx.config.model.path if ctx.config else None
    return str(path) if path else None


def _pystdlib(tokenizer: Any) -> Any:
    """The general-text corpus for alignment: the Python standard library, in the run's tokens (bytes without one)."""
    from memwise.data.datasets import PyStdlibConfig, build_corpus

    return build_corpus(PyStdlibConfig(), tokenizer)


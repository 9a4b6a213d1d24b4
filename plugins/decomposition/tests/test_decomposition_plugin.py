"""The plugin: config checks, hooks on a run context, state, report."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import memwise
from memwise.data.corpus import Corpus
from memwise.data.tokens import ByteTokenizer
from memwise_decomposition import DecompositionPlugin


def corpus(n_docs: int = 120, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    docs = [np.r_[257, rng.integers(0, 256, n), 258].astype(np.int32) for n in rng.integers(20, 900, n_docs)]
    return Corpus(train=docs, val=docs[:4], tokenizer=ByteTokenizer())


def context(tmp_path: Path, plugin: DecompositionPlugin, max_steps: int = 40, packing: str = "window",
            **work) -> memwise.RunContext:
    trainer = SimpleNamespace(global_rank=0, world_size=1, max_steps=max_steps, is_global_zero=True)
    w = memwise.Workload(batch_size=work.get("batch_size", 4), seq_len=work.get("seq_len", 256))
    return memwise.RunContext(stage="fit", plugins=[plugin], corpus=corpus(), trainer=trainer, workload=w,
                              report_dir=tmp_path, recipe={"data": {"packing": packing}})


def test_entry_point_names_the_plugin() -> None:
    eps = {ep.name: ep for ep in metadata.entry_points(group="memwise.plugins")}
    assert eps["decomposition"].load() is DecompositionPlugin
    p = DecompositionPlugin()
    assert p.provides() == {"data.batching"} and p.phase == "data" and p.distribution == "memwise-decomposition"


@pytest.mark.parametrize("settings, key", [
    ({"min_len": 24}, "decomposition.min_len"),
    ({"max_len": 1000}, "decomposition.max_len"),
    ({"min_len": 512, "max_len": 256}, "decomposition.min_len"),
    ({"max_len": 256, "tokens_per_step": 1000}, "decomposition.tokens_per_step"),
    ({"curriculum": "custom"}, "decomposition.odds"),
    ({"odds": [1, 2]}, "decomposition.odds"),
    ({"curriculum": "custom", "odds": [1, 2], "min_len": 64, "max_len": 1024}, "decomposition.odds"),
    ({"cycles": 0}, "decomposition.cycles"),
])
def test_bad_settings_name_their_key(settings: dict, key: str) -> None:
    with pytest.raises(memwise.RecipeError) as err:
        DecompositionPlugin(settings)
    assert key in {p.key for p in err.value.problems}


def test_validate_reports_workload_and_packing_problems(tmp_path: Path) -> None:
    p = DecompositionPlugin()
    ctx = context(tmp_path, p, seq_len=300, packing="concat_chunk")
    keys = {prob.key for prob in p.memwise_validate(ctx=ctx)}
    assert keys == {"decomposition.max_len", "data.packing"}
    assert DecompositionPlugin().memwise_validate(ctx=context(tmp_path, p)) == []


def test_hooks_replace_the_loader_log_length_and_write_the_report(tmp_path: Path) -> None:
    p = DecompositionPlugin({"min_len": 32, "curriculum": "grow_p2", "cycles": 2})
    ctx = context(tmp_path, p, max_steps=12)
    p.memwise_wrap_train_dataloader(ctx=ctx)
    assert ctx.batch_sampler is p.sampler and len(ctx.batch_sampler) == 12
    loader = torch.utils.data.DataLoader(ctx.train_dataset, batch_sampler=ctx.batch_sampler,
                                         collate_fn=ctx.collate_fn)
    lengths = []
    for i, batch in enumerate(loader):
        p.memwise_on_train_batch_start(ctx=ctx, batch=batch, batch_idx=i)
        n = ctx.shared["decomposition"]["seq_len"]
        assert n == batch["input_ids"].shape[1] and batch["input_ids"].shape[0] * (n - 1) == 4 * 256
        lengths.append(n)
    assert set(lengths) == {33, 65, 129, 257}
    p.memwise_on_fit_end(ctx=ctx)
    rep = json.loads((tmp_path / "decomposition.json").read_text())
    assert rep["targets_kept"] + rep["targets_dropped"] == rep["targets_total"]
    assert rep["distinct_shapes"] == 4 and rep["steps_seen"] == 12
    assert sum(b["steps_trained"] for b in rep["buckets"]) == 12
    assert rep["attention_saving"] > 1 and rep["baseline"]["mean_context"] == 128


def test_state_round_trip_resumes_the_batch_order(tmp_path: Path) -> None:
    first = DecompositionPlugin({"min_len": 32})
    ctx = context(tmp_path, first)
    first.memwise_wrap_train_dataloader(ctx=ctx)
    batches = list(iter(ctx.batch_sampler))
    for i in range(5):
        first.memwise_on_train_batch_start(ctx=ctx, batch={"input_ids": torch.zeros(1, 33)}, batch_idx=i)
    torch.save(first.memwise_state_dict(ctx=ctx), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    second = DecompositionPlugin({"min_len": 32})
    ctx2 = context(tmp_path, second)
    second.memwise_load_state_dict(ctx=ctx2, state=state)
    second.memwise_wrap_train_dataloader(ctx=ctx2)
    assert list(iter(ctx2.batch_sampler)) == batches[5:]
    other = DecompositionPlugin({"min_len": 64})
    other.memwise_load_state_dict(ctx=ctx2, state=state)
    with pytest.raises(memwise.RecipeError, match="differ"):
        other.memwise_wrap_train_dataloader(ctx=ctx2)


@pytest.mark.slow
def test_estimate_matches_what_the_largest_batch_saves(tmp_path: Path) -> None:
    """The predicted activations are those of the largest batch the sampler really yields,
    measured with MemTracker on a model (SDPA: saved bytes grow with the tokens)."""
    from memwise.memory import measure_step
    from memwise.testing import tiny_llama

    p = DecompositionPlugin({"min_len": 32})
    ctx = context(tmp_path, p)
    p.memwise_wrap_train_dataloader(ctx=ctx)
    batches = [ctx.collate_fn([ctx.train_dataset[i] for i in b]) for b in ctx.batch_sampler]
    largest = max(batches, key=lambda b: b["input_ids"].numel())

    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def saved(batch: dict) -> int:
        report = measure_step(model, optimizer, lambda: model(input_ids=batch["input_ids"],
                                                               labels=batch["labels"]).loss)
        return report.after_forward["activations"]

    ids = torch.randint(0, 256, (4, 256))
    base = saved({"input_ids": ids, "labels": ids})
    delta = p.memwise_estimate_memory(ctx=ctx, estimate=memwise.MemoryEstimate(activations=base))
    measured = saved(largest)
    assert abs(base + delta.activations - measured) <= 0.05 * measured, (base + delta.activations, measured)
    assert delta.parameters == delta.gradients == delta.optimizer_state == 0



"""Recipe optimizers: bitsandbytes' AdamW8bit (``optimizer.name: adamw8bit``) beside torch's."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memwise import recipe
from memwise.errors import RecipeError
from memwise.memory import measure_step
from memwise.optim import OptimizerConfig, build_optimizer, state_bytes
from memwise.runner import Run
from memwise.testing import MICRO, assert_resume_is_exact, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    return measure_step(model, optimizer, lambda: model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [64, 48])
def test_adamw8bit_state_bytes_are_predicted_to_the_byte(hidden):
    """8-bit moments for tensors of >= 4,096 elements, fp32 below; hidden 48 leaves a tail block."""
    model = tiny_llama(hidden=hidden, inter=2 * hidden + 8)
    cfg = OptimizerConfig(name="adamw8bit", lr=1e-3)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    report = _step(model, optimizer)
    predicted = state_bytes(model.parameters(), cfg)
    assert report.after_step["optimizer_state"] == predicted
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    assert sum(held.values()) == predicted
    kinds = {s["state1"].dtype for s in optimizer.state.values()}
    assert kinds == {torch.uint8, torch.float32}  # both of AdamW8bit's layouts are counted


def test_weight_decay_groups_reach_adamw8bit():
    model = tiny_llama()
    optimizer = build_optimizer(model, OptimizerConfig(name="adamw8bit", weight_decay=0.1))
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]


def test_missing_bitsandbytes_is_a_recipe_problem_naming_the_key(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RecipeError) as info:
        recipe.load("recipes/baseline.yaml", ["optimizer.name=adamw8bit"])
    problem = next(p for p in info.value.problems if p.key == "optimizer.name")
    assert "pip install bitsandbytes" in problem.message


@pytest.mark.parametrize("plugin", ["coat", "galore"])
def test_optimizer_replacing_plugins_refuse_adamw8bit(plugin):
    run = Run(recipe.load("recipes/baseline.yaml", [*MICRO, "optimizer.name=adamw8bit", f"plugins=[{{use: {plugin}}}]"]),
              "fit")
    with pytest.raises(RecipeError) as info:
        run.build()
    assert any("adamw8bit" in p.message and "optimizer.name: adamw" in p.message for p in info.value.problems)


@pytest.mark.slow
def test_recipe_with_adamw8bit_resumes_exactly(tmp_path):
    assert_resume_is_exact("recipes/baseline.yaml", [*MICRO, "optimizer.name=adamw8bit"], tmp_path, steps=4, at=2)

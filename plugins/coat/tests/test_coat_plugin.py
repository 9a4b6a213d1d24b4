"""The coat plugin: capabilities, config errors, exact optimizer-state estimate, recipe resume and DDP."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memwise import MemoryEstimate, RecipeError, RunContext, Workload
from memwise.memory import measure_step
from memwise.plan import check
from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_trained, run_cli, tiny_llama
from memwise_coat import CoatAdamW, CoatPlugin

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "coat.yaml")


def _model():
    return tiny_llama()


class _Other:
    """A stand-in for another plugin that owns activation storage."""

    name, composes_with = "mesa", ()
    capability_switch: dict = {}

    def provides(self):
        return {"activation.storage"}

    def requires(self):
        return set()

    stages = ("fit",)


def test_capabilities_follow_config_and_conflicts_name_the_switch():
    assert CoatPlugin().provides() == {"optimizer.states", "activation.storage"}
    assert CoatPlugin(activations=False).provides() == {"optimizer.states"}
    problems = check([CoatPlugin(), _Other()], "fit")
    assert len(problems) == 1 and "coat.activations: false" in problems[0].message
    assert check([CoatPlugin(activations=False), _Other()], "fit") == []


def test_bad_config_reports_every_problem():
    with pytest.raises(RecipeError) as err:
        CoatPlugin(group_size=0, min_expansion=0.0)
    keys = {p.key for p in err.value.problems}
    assert keys == {"coat.group_size", "coat.min_expansion"}
    with pytest.raises(RecipeError, match="both parts are off"):
        CoatPlugin(optimizer=False, activations=False)
    with pytest.raises(RecipeError, match="second_moment_format"):
        CoatPlugin(second_moment_format="e3m4")


def test_validate_rejects_non_adamw_recipes():
    ctx = RunContext(stage="fit", recipe={"optimizer": {"name": "sgd"}})
    assert [p.key for p in CoatPlugin().memwise_validate(ctx=ctx)] == ["coat.optimizer"]
    assert CoatPlugin(optimizer=False).memwise_validate(ctx=ctx) == []


def _measured_optimizer_state(model, optimizer, ids):
    report = measure_step(model, optimizer, lambda: model(input_ids=ids, labels=ids).loss)
    return report.after_step["optimizer_state"]


@pytest.mark.slow
def test_estimate_is_exact_for_optimizer_state_and_configure_replaces_adamw():
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    plugin = CoatPlugin(activations=False)
    base_model = _model()
    groups = [{"params": [p for p in base_model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in base_model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    baseline = _measured_optimizer_state(base_model, torch.optim.AdamW(groups, lr=1e-3), ids)
    ctx = RunContext(stage="fit", model=_model(), workload=Workload(2, 32))
    delta = plugin.memwise_estimate_memory(ctx=ctx, estimate=MemoryEstimate())
    ctx.optimizer = torch.optim.AdamW([{"params": [p for p in ctx.model.parameters() if p.ndim >= 2],
                                        "weight_decay": 0.1},
                                       {"params": [p for p in ctx.model.parameters() if p.ndim < 2],
                                        "weight_decay": 0.0}], lr=1e-3)
    plugin.memwise_configure_optimizer(ctx=ctx)
    assert isinstance(ctx.optimizer, CoatAdamW)
    assert [g["weight_decay"] for g in ctx.optimizer.param_groups] == [0.1, 0.0]
    measured = _measured_optimizer_state(ctx.model, ctx.optimizer, ids)
    assert measured == baseline + delta.optimizer_state
    assert measured < 0.45 * baseline
    emb = ctx.optimizer.state[ctx.model.model.embed_tokens.weight]["exp_avg"]
    assert emb.dtype == torch.float32  # embeddings keep fp32 moments by default


def test_transform_claims_each_converted_module_and_teardown_restores():
    plugin = CoatPlugin()
    ctx = RunContext(stage="fit", model=_model(), workload=Workload(2, 32))
    plugin.memwise_transform_model(ctx=ctx)
    claimed = ctx.claims.claims_of("coat")
    assert "model.layers.0.mlp" in claimed and "lm_head" in claimed
    assert not any(n.endswith("o_proj") for n in claimed)
    plugin.memwise_teardown(ctx=ctx)
    assert type(ctx.model.lm_head) is torch.nn.Linear
    assert CoatPlugin().transforms_model() and not CoatPlugin(activations=False).transforms_model()


@pytest.mark.slow
def test_recipe_resume_matches_uninterrupted_run(tmp_path):
    saved = assert_resume_is_exact(RECIPE, MICRO, tmp_path, steps=6, at=3)
    states = saved["optimizer_states"][0]["state"]
    assert any(s["exp_avg"].dtype == torch.float8_e4m3fn for s in states.values())


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)


@pytest.mark.slow
def test_import_is_light():
    """Plugin discovery must never import triton (nor transformers)."""
    code = "import sys, memwise_coat; print('triton' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr

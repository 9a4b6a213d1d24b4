"""fused_step: bitwise the unfused optimizer's results, gradients freed in backward, exact estimate,
clear refusals, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from memwise import RecipeError, RunContext, recipe
from memwise.cli import main
from memwise.runner import measure_recipe
from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_same_losses, tiny_llama
from memwise_coat import CoatAdamW
from memwise_frugal import FrugalAdamW
from memwise_fused_step import FusedStepOptimizer, FusedStepPlugin, fuse_step
from memwise_galore import GaLoreAdamW

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "fused_step.yaml")
BASELINE = str(ROOT / "recipes" / "baseline.yaml")


def _model():
    return tiny_llama()


def _optimizer(model, kind):
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2)
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    if kind == "galore":
        return GaLoreAdamW(groups, lr=1e-2, galore_params=linear, rank=8, update_proj_gap=2, natural=True)
    if kind == "frugal":
        return FrugalAdamW(groups, lr=1e-2, frugal_params=linear, update_gap=2)
    return CoatAdamW(groups, lr=1e-2, min_numel=1024)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adamw", "coat", "galore", "frugal"])
def test_bitwise_equal_to_the_unfused_optimizer_with_a_schedule(kind):
    plain, fused = _model(), _model()
    opts = [_optimizer(plain, kind), fuse_step(_optimizer(fused, kind))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)) for o in opts]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 260, (2, 32), generator=gen)
        losses = []
        for model, opt, sched in zip((plain, fused), opts, scheds):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if model is fused:
                assert all(p.grad is None for p in model.parameters())  # used and freed inside backward
            opt.step()
            opt.zero_grad()
            sched.step()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert opts[1].param_groups[0]["lr"] == opts[0].param_groups[0]["lr"] == 1e-2 * (1 / 5)
    saved, ref = opts[1].state_dict(), opts[0].state_dict()
    assert saved["param_groups"] == ref["param_groups"]
    opts[1].load_state_dict(ref)  # new group dicts: the scheduler and the hooks must follow them
    assert opts[1].param_groups is opts[1].optimizer.param_groups
    sched = scheds[1]
    sched.step()
    assert opts[1].optimizer.param_groups[0]["lr"] == 1e-2 * (1 / 6)
    for key, state in ref["state"].items():
        for name, value in state.items():
            assert torch.equal(saved["state"][key][name], value), (key, name)


def test_remove_restores_the_plain_step_and_double_wrapping_is_refused():
    model = _model()
    fused = fuse_step(torch.optim.AdamW(model.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match="already steps in backward"):
        FusedStepOptimizer(fused)
    plain = fused.remove()
    ids = torch.randint(0, 260, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    plain.step()
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_gradients_never_all_exist_and_estimate_is_exact():
    """MemTracker: no gradient survives the step (predicted to the byte), and the largest gradient
    alive at any moment is one tensor's (the 260 x 64 embedding)."""
    overrides = [*MICRO, "trainer.gradient_clip_val=null"]
    rows, base = measure_recipe(BASELINE, overrides)
    rows_fused, fused = measure_recipe(RECIPE, overrides)
    assert rows_fused[-1][1].gradients == fused.after_step["gradients"] == 0
    assert rows[-1][1].gradients == base.after_step["gradients"] > 0
    assert fused.category_max["gradients"] == 260 * 64 * 4
    assert fused.category_max["gradients"] <= 0.16 * base.category_max["gradients"]
    assert fused.at_peak["gradients"] <= 0.05 * max(base.at_peak["gradients"], base.category_max["gradients"])
    assert rows_fused[-1][1].optimizer_state == fused.after_step["optimizer_state"] == base.after_step[
        "optimizer_state"]


@pytest.mark.slow
def test_recipe_losses_equal_the_unfused_run_and_resume_is_exact(tmp_path):
    args = [*MICRO, "trainer.max_steps=4"]
    assert main(["run", BASELINE, f"report.dir={tmp_path / 'plain'}", *args, "trainer.gradient_clip_val=null"]) == 0
    assert main(["run", RECIPE, f"report.dir={tmp_path / 'fused'}", *args]) == 0
    assert_same_losses(tmp_path / "plain", tmp_path / "fused")
    assert_resume_is_exact(RECIPE, MICRO, tmp_path / "resume", steps=4, at=2)


def test_clipping_accumulation_and_several_processes_are_refused_with_the_key():
    ctx = RunContext(stage="fit", recipe={"trainer": {"gradient_clip_val": 1.0, "devices": 2}})
    problems = FusedStepPlugin().memwise_validate(ctx=ctx)
    assert [p.key for p in problems] == ["trainer.gradient_clip_val", "trainer.devices"]
    assert "gradient_clip_val: null" in problems[0].message
    ok = RunContext(stage="fit", recipe={"trainer": {"gradient_clip_val": None, "devices": 1}})
    assert FusedStepPlugin().memwise_validate(ctx=ok) == []

    class Trainer:  # a user's own Lightning Trainer in callback mode
        accumulate_grad_batches, gradient_clip_val = 4, None

    ctx = RunContext(stage="fit", model=_model(), trainer=Trainer())
    ctx.optimizer = torch.optim.AdamW(ctx.model.parameters())
    with pytest.raises(RecipeError, match="accumulate_grad_batches=1"):
        FusedStepPlugin().memwise_configure_optimizer(ctx=ctx)
    with pytest.raises(RecipeError, match="supports strategies auto, single_device, not 'ddp'"):
        recipe.load(RECIPE, DDP)

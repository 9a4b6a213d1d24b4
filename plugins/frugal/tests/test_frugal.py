"""FRUGAL: state-full columns follow AdamW on their block, the rest signSGD; re-choice every T steps;
exact state bytes (<= 0.3x AdamW at density 0.25 on tiny); resume and DDP through recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from memwise import MemoryEstimate, RecipeError, RunContext, Workload
from memwise.memory import measure_step
from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_trained, run_cli, tiny_llama
from memwise_frugal import FrugalAdamW, FrugalPlugin

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "frugal.yaml")


def _model(hidden=64, layers=2, inter=128):
    return tiny_llama(hidden=hidden, layers=layers, inter=inter)


def test_stateful_columns_are_adamw_on_their_block_and_the_rest_is_signsgd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen)
    a = torch.nn.Parameter(w.clone())
    opt = FrugalAdamW([a], lr=1e-2, weight_decay=0.1, frugal_params=[a], density=0.25, update_gap=3)
    block, ref = None, None
    for step in range(6):
        g = torch.randn(24, 16, generator=gen)
        before = a.detach().clone()
        a.grad = g.clone()
        opt.step()
        cols = opt.state[a]["columns"].clone()
        assert cols.numel() == 4 and opt.state[a]["exp_avg"].shape == (24, 4)
        if step % 3 == 0:  # a new subspace: AdamW on the block starts afresh
            assert block is None or not torch.equal(cols, block) or step == 0
            block = cols
            ref_p = torch.nn.Parameter(before[:, cols].clone())
            ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1)
        ref_p.grad = g[:, cols].clone()
        ref.step()
        torch.testing.assert_close(a.detach()[:, cols], ref_p.detach(), rtol=0, atol=1e-7)
        rest = torch.ones(16, dtype=torch.bool)
        rest[cols] = False
        expected = before[:, rest] * (1 - 1e-2 * 0.1) - 1e-2 * g[:, rest].sign()
        torch.testing.assert_close(a.detach()[:, rest], expected, rtol=0, atol=1e-7)


def test_svd_selection_splits_the_gradient_into_projected_and_residual_parts():
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.zeros(32, 20))
    opt = FrugalAdamW([a], lr=1e-2, weight_decay=0.0, frugal_params=[a], density=0.25, selection="svd",
                      state_free="sgd", free_lr_ratio=1.0)
    g = torch.randn(32, 20, generator=gen)
    a.grad = g.clone()
    opt.step()
    p = opt.state[a]["projector"]  # 20 x 5: the top right singular vectors
    assert p.shape == (20, 5)
    residual = g - (g @ p) @ p.T
    low = g @ p
    adam = (low / (low.abs() + 1e-8)) @ p.T  # first Adam step: m_hat / sqrt(v_hat) = sign
    torch.testing.assert_close(a.detach(), -1e-2 * (adam + residual), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["columns", "svd"])
def test_estimate_is_exact_against_memtracker(selection):
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    plugin = FrugalPlugin(density=0.25, selection=selection)
    model = _model()
    base = measure_step(model, torch.optim.AdamW(model.parameters()), lambda: model(input_ids=ids, labels=ids).loss)
    ctx = RunContext(stage="fit", model=_model(), workload=Workload(2, 32))
    delta = plugin.memwise_estimate_memory(ctx=ctx, estimate=MemoryEstimate())
    ctx.optimizer = torch.optim.AdamW(ctx.model.parameters(), lr=1e-3)
    plugin.memwise_configure_optimizer(ctx=ctx)
    assert isinstance(ctx.optimizer, FrugalAdamW)
    measured = measure_step(ctx.model, ctx.optimizer, lambda: ctx.model(input_ids=ids, labels=ids).loss)
    assert measured.after_step["optimizer_state"] == base.after_step["optimizer_state"] + delta.optimizer_state


def test_state_is_at_most_three_tenths_of_adamw_on_tiny_at_density_quarter():
    """The tiny workload's model (hidden 256, 4 layers, MLP 688): embeddings, head and norms keep AdamW."""
    ctx = RunContext(stage="fit", model=_model(256, 4, 688), workload=Workload(16, 256))
    base = sum(2 * p.numel() * 4 + 4 for p in ctx.model.parameters())
    delta = FrugalPlugin(density=0.25).memwise_estimate_memory(ctx=ctx, estimate=MemoryEstimate())
    assert (base + delta.optimizer_state) / base <= 0.3


def test_bad_config_names_the_key():
    with pytest.raises(RecipeError) as err:
        FrugalPlugin(density=0.0, update_gap=0)
    assert {p.key for p in err.value.problems} == {"frugal.density", "frugal.update_gap"}
    ctx = RunContext(stage="fit", recipe={"optimizer": {"name": "sgd"}}, model=_model())
    assert [p.key for p in FrugalPlugin().memwise_validate(ctx=ctx)] == ["frugal"]


@pytest.mark.slow
def test_recipe_resume_is_exact_across_a_subspace_change(tmp_path):
    saved = assert_resume_is_exact(RECIPE, [*MICRO, "plugins.0.with.update_gap=2"], tmp_path, steps=5, at=3)
    assert any("columns" in s for s in saved["optimizer_states"][0]["state"].values())


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)

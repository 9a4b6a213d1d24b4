"""GaLore / Natural GaLore: projection and update against the reference math, plain AdamW for the
rest, Woodbury against the dense inverse, exact state bytes, resume and DDP through recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from memwise import MemoryEstimate, RecipeError, RunContext, Workload
from memwise.memory import measure_step
from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_trained, run_cli, tiny_llama
from memwise_galore import GaLoreAdamW, GaLorePlugin, natural_gradient, projected_parameters, projector
from memwise_galore.projection import choose_side

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "galore.yaml")


def _model():
    return tiny_llama()


def test_projector_spans_the_top_singular_subspace():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(96, 6, generator=gen) @ torch.randn(6, 40, generator=gen)
    assert choose_side(low_rank.shape, "auto") == "right" and choose_side((40, 96), "auto") == "left"
    for method in ("svd", "randomized"):
        for side in ("left", "right"):
            p = projector(low_rank, 6, side, method, torch.Generator().manual_seed(1))
            assert p.shape == ((96, 6) if side == "left" else (40, 6))
            torch.testing.assert_close(p.T @ p, torch.eye(6), atol=1e-5, rtol=0)
            back = p @ (p.T @ low_rank) if side == "left" else (low_rank @ p) @ p.T  # rank 6: nothing lost
            torch.testing.assert_close(back, low_rank, atol=1e-4, rtol=1e-4)


def test_first_step_follows_the_reference_math_and_plain_parameters_match_adamw():
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(48, 20, generator=gen), torch.randn(48, 20, generator=gen)
    bias, gb = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(bias.clone())
    ref_b = torch.nn.Parameter(bias.clone())
    opt = GaLoreAdamW([a, b], lr=1e-2, weight_decay=0.1, galore_params=[a], rank=4, scale=0.5)
    ref = torch.optim.AdamW([ref_b], lr=1e-2, weight_decay=0.1)
    a.grad, b.grad, ref_b.grad = g.clone(), gb.clone(), gb.clone()
    opt.step()
    ref.step()
    assert torch.equal(b, ref_b)  # 1-D parameters: torch's AdamW bit for bit
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    p = vh[:4].T  # 48 x 20 is tall: project on the right with the top right singular vectors
    low = g @ p
    m, v = 0.1 * low, 0.001 * low.square()
    direction = (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)
    expected = w * (1 - 1e-2 * 0.1) - 1e-2 * 0.5 * direction @ p.T
    torch.testing.assert_close(a.detach(), expected, atol=1e-6, rtol=1e-5)


def test_natural_gradient_equals_the_dense_inverse_fisher():
    gen = torch.Generator().manual_seed(3)
    history = torch.randn(5, 8, 6, generator=gen)
    g = history[4]
    c = 5
    a = history.reshape(5, -1)
    lam = 0.1 * a.square().mean()
    fisher = lam * torch.eye(48) + a.T @ a / c
    dense = lam * torch.linalg.solve(fisher.double(), g.reshape(-1).double())
    torch.testing.assert_close(natural_gradient(g, history, c, 0.1).reshape(-1).double(), dense, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("natural", [False, True])
def test_estimate_is_exact_against_memtracker(natural):
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    plugin = GaLorePlugin(rank=8, natural=natural, history=3)
    ctx = RunContext(stage="fit", model=_model(), workload=Workload(2, 32))
    base = torch.optim.AdamW(ctx.model.parameters(), lr=1e-3)
    base_state = measure_step(ctx.model, base, lambda: ctx.model(input_ids=ids, labels=ids).loss).after_step[
        "optimizer_state"]
    ctx.model = _model()
    delta = plugin.memwise_estimate_memory(ctx=ctx, estimate=MemoryEstimate())
    ctx.optimizer = torch.optim.AdamW(ctx.model.parameters(), lr=1e-3)
    plugin.memwise_configure_optimizer(ctx=ctx)
    assert isinstance(ctx.optimizer, GaLoreAdamW)
    measured = measure_step(ctx.model, ctx.optimizer, lambda: ctx.model(input_ids=ids, labels=ids).loss)
    assert measured.after_step["optimizer_state"] == base_state + delta.optimizer_state
    chosen = projected_parameters(ctx.model, None, ["*lm_head*", "*embed*"])
    assert len(chosen) == 2 * 7 and all("projector" in ctx.optimizer.state[p] for p in chosen)
    assert ("history" in ctx.optimizer.state[chosen[0]]) == natural


def test_bad_config_and_recipe_errors_name_the_key():
    with pytest.raises(RecipeError) as err:
        GaLorePlugin(rank=0, damping=0.0)
    assert {p.key for p in err.value.problems} == {"galore.rank", "galore.damping"}
    ctx = RunContext(stage="fit", recipe={"optimizer": {"name": "sgd"}}, model=_model())
    keys = [p.key for p in GaLorePlugin(include=["nothing*"]).memwise_validate(ctx=ctx)]
    assert keys == ["galore", "galore.include"]


@pytest.mark.slow
@pytest.mark.parametrize("natural", ["false", "true"])
def test_recipe_resume_is_exact_with_projections(tmp_path, natural):
    overrides = [*MICRO, "plugins.0.with.rank=8", "plugins.0.with.update_proj_gap=2", f"plugins.0.with.natural={natural}"]
    saved = assert_resume_is_exact(RECIPE, overrides, tmp_path, steps=5, at=3)
    states = saved["optimizer_states"][0]["state"]
    assert any("projector" in s for s in states.values())


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3",
                   "plugins.0.with.rank=8", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)

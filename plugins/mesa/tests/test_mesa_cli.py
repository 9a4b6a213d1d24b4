"""Mesa through the recipe runner: resume restores ranges and reproduces losses; DDP on two CPU processes."""

import pytest
from pathlib import Path

import torch

from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_trained, run_cli

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "mesa.yaml")

@pytest.mark.slow
def test_recipe_resume_restores_ranges_and_matches_uninterrupted_run(tmp_path):
    saved = assert_resume_is_exact(RECIPE, MICRO, tmp_path, steps=4, at=2)
    key = "model.model.layers.1.self_attn.mesa_key.alpha"
    ranges = saved["memwise"]["plugins"]["mesa"]["ranges"]
    assert torch.equal(saved["state_dict"][key], ranges["model.layers.1.self_attn.mesa_key"]["alpha"])
    assert int(saved["state_dict"]["model.model.layers.1.self_attn.mesa_key.steps"]) == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(saved["state_dict"]["model.model.layers.0.self_attn.mesa_query.steps"]) == 3

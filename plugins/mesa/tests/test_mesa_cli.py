"""Mesa through the recipe runner: resume restores ranges and reproduces losses; DDP on two CPU processes."""

from pathlib import Path

import torch

from memwise.testing import DDP, MICRO, assert_same_losses, assert_trained, run_cli

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "mesa.yaml")

def test_recipe_resume_restores_ranges_and_matches_uninterrupted_run(tmp_path):
    from memwise.cli import main

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*MICRO, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"]
    assert main(["run", RECIPE, f"report.dir={full}", *args]) == 0
    ckpt = full / "checkpoints" / "step-000002.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    key = "model.model.layers.1.self_attn.mesa_key.alpha"
    ranges = saved["memwise"]["plugins"]["mesa"]["ranges"]
    assert torch.equal(saved["state_dict"][key], ranges["model.layers.1.self_attn.mesa_key"]["alpha"])
    assert int(saved["state_dict"]["model.model.layers.1.self_attn.mesa_key.steps"]) == 2
    assert main(["run", RECIPE, f"report.dir={resumed}", *args, f"resume={ckpt}"]) == 0
    assert_same_losses(full, resumed)


def test_ddp_two_cpu_processes(tmp_path):
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(saved["state_dict"]["model.model.layers.0.self_attn.mesa_query.steps"]) == 3

"""Mesa through the recipe runner: resume restores ranges and reproduces losses; DDP on two CPU processes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "mesa.yaml")
MICRO = ["model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.intermediate_size=128",
         "data.seq_len=64", "data.batch_size=4", "data.max_documents=60", "data.val_batches=1",
         "data.val_percent=10.0", "trainer.val_every_n_steps=2", "trainer.progress_bar=false", "report.plots=false",
         "optimizer.lr=3.0e-3", "scheduler.warmup_steps=1"]


def _metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


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
    a, b = _metrics(full), _metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"], (ra, rb)


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "memwise.cli", "run", RECIPE, f"report.dir={tmp_path}", *MICRO,
                           "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                           "trainer.max_steps=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(r["train_loss"]) for r in _metrics(tmp_path) if r["train_loss"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(saved["state_dict"]["model.model.layers.0.self_attn.mesa_query.steps"]) == 3

"""`memwise run`: report folder, exact resume, explain, generate, DDP, and the quickstart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memwise.checkpoint import safe_load
from memwise.memory import CATEGORIES
from memwise.testing import assert_resume_is_exact, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_writes_the_report(cli, micro, tmp_path):
    code, out, err = cli("run", micro, f"report.dir={tmp_path}", "report.plots=true", "report.save_model=true")
    assert code == 0, err
    for name in ("recipe.yaml", "metrics.csv", "memory.json", "summary.json", "memory.png", "loss.png",
                 "model/config.json", "model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert set(memory["predicted"]) == set(CATEGORIES)
    assert set(memory["measured"]["headline"]) == set(CATEGORIES)
    assert memory["measured"]["headline"]["parameters"] == memory["predicted"]["parameters"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_per_s"] > 0
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert "measured" in out and "activations" in out
    ckpt = safe_load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["memwise"]["manifest"]["plugins"] == []
    # the saved folder loads as the recipe's model, in training mode, with the trained weights
    from memwise import recipe
    from memwise.runner import Run

    run = Run(recipe.load(micro, [f"model.path={tmp_path / 'model'}", "model.config={}"]), "fit")
    run.build()
    assert run.ctx.model.training
    for name, value in run.ctx.model.state_dict().items():
        assert (value == ckpt["state_dict"][f"model.{name}"]).all(), name


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(micro, tmp_path):
    saved = assert_resume_is_exact(micro, ["plugins=[{use: checkpointing}]"], tmp_path, steps=8, at=3)
    assert saved["global_step"] == 3


@pytest.mark.slow
def test_resume_without_a_required_plugin_names_the_snippet(cli, micro, tmp_path):
    import torch

    from memwise.checkpoint import atomic_save

    assert cli("run", micro, f"report.dir={tmp_path}", "trainer.max_steps=2")[0] == 0
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["memwise"]["manifest"]["plugins"].append(
        {"name": "loram", "distribution": "memwise-loram", "version": "0.1.0", "config": {"ratio": 0.5},
         "required_on_load": True})
    atomic_save(ckpt, path)
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'again'}", "trainer.max_steps=3", f"resume={path}")
    assert code == 2 and "use: loram" in err  # a checkpoint that does not match is bad input


def test_explain_prints_plan_and_prediction(cli):
    code, out, _ = cli("explain", "quickstart", "data.max_documents=50")
    assert code == 0
    assert "checkpointing" in out and "predicted baseline" in out and "activations" in out


@pytest.mark.slow
def test_generate_from_a_checkpoint(cli, micro, tmp_path):
    assert cli("run", micro, f"report.dir={tmp_path}", "trainer.max_steps=2")[0] == 0
    code, out, err = cli("generate", micro, f"generate.checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}",
                         "--prompt", "def ", "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith("def ")


@pytest.mark.slow
def test_ddp_two_cpu_processes(micro, tmp_path):
    proc = run_cli("run", micro, f"report.dir={tmp_path}", "trainer.strategy=ddp", "trainer.devices=2",
                    "trainer.accelerator=cpu", "trainer.max_steps=3", "plugins=[{use: checkpointing}]", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3
    # two ranks: the tokens counted are those of both processes
    rows = read_metrics(tmp_path)
    assert int(rows[-1]["tokens"]) == 3 * 2 * 4 * 64


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The README's quickstart recipe as shipped: the loss falls at least 35%."""
    proc = run_cli("run", "recipes/quickstart.yaml", f"report.dir={tmp_path}", "trainer.progress_bar=false",
                    "report.plots=false", cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val_loss"] <= 0.65 * summary["first_val_loss"], summary

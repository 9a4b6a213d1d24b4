"""FSDP2 through Lightning on two CPU processes (gloo): DDP's losses, half the per-rank state,
sharded checkpoints that resume exactly and consolidate to one safetensors file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from memwise.testing import DDP, read_metrics, run_cli

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "recipes" / "micro.yaml")
FSDP = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
STEPS = ["trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2"]


def _run(folder: Path, *args: str) -> Path:
    proc = run_cli("run", MICRO, f"report.dir={folder}", *STEPS, "report.save_model=true", *args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp")
    return {"ddp": _run(base / "ddp", *DDP), "fsdp": _run(base / "fsdp", *FSDP)}


def _losses(folder: Path) -> list[tuple[float, float]]:
    return [(float(r["train_loss"] or "nan"), float(r["val_loss"] or "nan")) for r in read_metrics(folder)]


@pytest.mark.slow
def test_fsdp_losses_equal_ddp(runs):
    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 5
    for a, b in zip(ddp, fsdp):
        for x, y in zip(a, b):
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 * abs(x), (ddp, fsdp)


@pytest.mark.slow
def test_fsdp_per_rank_state_is_half_of_ddp(runs):
    """Parameters, gradients and optimizer state per rank: half of DDP's, except the few bytes every
    rank keeps whole (rotary buffers, AdamW's scalar step per parameter)."""
    ddp = json.loads((runs["ddp"] / "memory.json").read_text())["measured"]["after_step"]
    for rank in (0, 1):
        mem = json.loads((runs["fsdp"] / f"memory-rank{rank}.json").read_text())
        assert mem["world_size"] == 2
        fsdp = mem["measured"]["after_step"]
        buffers = ddp["parameters"] - ddp["gradients"]          # every parameter trains
        steps = ddp["optimizer_state"] - 2 * ddp["gradients"]  # exp_avg, exp_avg_sq + one fp32 step each
        assert 0 < buffers + steps < 0.001 * (ddp["parameters"] + ddp["optimizer_state"])
        assert 2 * fsdp["gradients"] == ddp["gradients"]
        assert 2 * (fsdp["parameters"] - buffers) == ddp["parameters"] - buffers
        assert 2 * (fsdp["optimizer_state"] - steps) == ddp["optimizer_state"] - steps


@pytest.mark.slow
def test_sharded_checkpoint_consolidates_to_ddp_weights(runs):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from memwise.sharding import read_metadata

    ckpt = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    meta = read_metadata(ckpt)["memwise"]
    assert meta["world_size"] == 2 and meta["strategy"] == "fsdp"
    assert len(load_file(runs["fsdp"] / "model" / "model.safetensors")) == 21  # 2 layers x 9 + embed, norm, head
    sharded = LlamaForCausalLM.from_pretrained(runs["fsdp"] / "model")
    plain = LlamaForCausalLM.from_pretrained(runs["ddp"] / "model")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sharded_resume_is_exact_and_generate_reads_the_folder(runs, tmp_path):
    ckpt = runs["fsdp"] / "checkpoints" / "step-000002.ckpt"
    resumed = _run(tmp_path / "resumed", *FSDP, f"resume={ckpt}")
    full, again = read_metrics(runs["fsdp"]), read_metrics(resumed)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in full] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in again]
    proc = run_cli("generate", MICRO, f"generate.checkpoint={runs['fsdp'] / 'checkpoints' / 'last.ckpt'}",
                   "--prompt", "def ", "--max-new-tokens", "4", cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-2000:]


def _train_losses(folder: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(folder) if r.get("train_loss")]


def _same_losses_as_ddp(tmp_path: Path, recipe: str, *args: str) -> None:
    common = [*args, "report.probe_memory=false", "trainer.progress_bar=false", "report.plots=false"]
    for name, strategy in (("ddp", DDP), ("fsdp", FSDP)):
        proc = run_cli("run", recipe, f"report.dir={tmp_path / name}", *common, *strategy, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, fsdp = _train_losses(tmp_path / "ddp"), _train_losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) > 0
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ddp, fsdp)), (ddp, fsdp)


@pytest.mark.slow
def test_checkpointing_composes_with_fsdp(tmp_path):
    """Recompute inside each sharded layer: the gathered parameters are there for the recompute."""
    _same_losses_as_ddp(tmp_path, MICRO, "trainer.max_steps=3", "plugins=[{use: checkpointing}]")


@pytest.mark.slow
def test_decomposition_composes_with_fsdp(tmp_path):
    recipe = str(ROOT / "recipes" / "decomposition.yaml")
    _same_losses_as_ddp(tmp_path, recipe, "trainer.max_steps=3", "data.max_documents=400", "data.val_batches=1",
                        "data.seq_len=256", "data.batch_size=4", "plugins.0.with.max_len=256",
                        "plugins.0.with.tokens_per_step=1024", "plugins.0.with.min_len=32",
                        "model.config.hidden_size=64", "model.config.num_hidden_layers=2",
                        "model.config.intermediate_size=128")


@pytest.mark.parametrize("plugin, reason, instead", [
    ("mesa", "per-rank buffers", "trainer.strategy=ddp"), ("loram", "NF4", "trainer.strategy=ddp"),
    ("galore", "whole 2-D gradient", "trainer.strategy=ddp"), ("frugal", "whole 2-D gradient", "trainer.strategy=ddp"),
    ("offload", "gathering", "trainer.strategy=ddp"), ("chunked_ce", "not gathered", "trainer.strategy=ddp"),
    ("fused_step", "before the ranks' gradients are averaged", "trainer.devices=1")])
def test_plugins_that_cannot_shard_refuse_with_the_reason(cli, plugin, reason, instead):
    overrides = ["trainer.gradient_clip_val=null"] if plugin == "fused_step" else []
    code, _, err = cli("validate", MICRO, *FSDP, *overrides, f"plugins=[{{use: {plugin}}}]")
    assert code == 2
    flat = " ".join(err.split())
    assert f"plugin '{plugin}' supports strategies" in flat and "not 'fsdp'" in flat and reason in flat, flat
    assert instead in flat


def test_coat_is_accepted_under_fsdp(cli):
    """COAT quantizes each rank's shard (plugins/coat/tests/test_coat_fsdp.py runs it)."""
    code, _, err = cli("validate", MICRO, *FSDP, "plugins=[{use: coat}]")
    assert code == 0, err


def test_fsdp_needs_a_number_of_devices():
    from memwise.errors import MemwiseError
    from memwise.sharding import make_strategy

    with pytest.raises(MemwiseError, match="trainer.devices as a number"):
        make_strategy("auto", 1)

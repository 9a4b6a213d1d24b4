"""Through `memwise run` in a subprocess: DDP on two CPU processes, and exact resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "decomposition.yaml"
SMALL = ["data.max_documents=400", "data.val_batches=1", "data.seq_len=256", "data.batch_size=4",
         "plugins.0.with.max_len=256", "plugins.0.with.tokens_per_step=1024", "plugins.0.with.min_len=32",
         "model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.intermediate_size=128",
         "trainer.progress_bar=false", "report.plots=false", "report.probe_memory=false", "trainer.num_threads=1",
         "trainer.accelerator=cpu"]


def memwise_run(*overrides: str) -> None:
    exe = Path(sys.executable).parent / "memwise"
    env = {**os.environ, "MEMWISE_PLUGINS": "decomposition"}
    out = subprocess.run([str(exe), "run", str(RECIPE), *SMALL, *overrides], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def rows(folder: Path) -> dict[int, dict]:
    with open(folder / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.skipif(not RECIPE.exists(), reason="needs the repository checkout")
def test_ddp_two_cpu_processes_same_lengths_disjoint_sequences(tmp_path: Path) -> None:
    memwise_run("trainer.max_steps=6", "trainer.val_every_n_steps=6", "trainer.strategy=ddp", "trainer.devices=2",
                "plugins.0.with.trace=true", f"report.dir={tmp_path}")
    traces = [[json.loads(line) for line in open(tmp_path / "decomposition-trace" / f"rank{r}.jsonl")]
              for r in (0, 1)]
    assert [s["step"] for s in traces[0]] == [s["step"] for s in traces[1]] == list(range(6))
    for a, b in zip(*traces):
        assert a["seq_len"] == b["seq_len"]
        assert len(a["indices"]) == len(b["indices"]) == 1024 // (a["seq_len"] - 1)
    seen = [i for t in traces for s in t for i in s["indices"]]
    assert len(seen) == len(set(seen))  # no sequence is trained twice, on one rank or across ranks
    report = json.loads((tmp_path / "decomposition.json").read_text())
    assert report["world_size"] == 2 and report["steps_seen"] == 6


@pytest.mark.slow
@pytest.mark.skipif(not RECIPE.exists(), reason="needs the repository checkout")
def test_resume_mid_run_replays_the_same_batches(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["trainer.max_steps=8", "trainer.val_every_n_steps=4"]
    memwise_run(*common, "trainer.checkpoint_every_n_steps=4", f"report.dir={full}")
    memwise_run(*common, f"resume={full / 'checkpoints' / 'step-000004.ckpt'}", f"report.dir={resumed}")
    a, b = rows(full), rows(resumed)
    for step in range(5, 9):
        assert a[step]["seq_len"] == b[step]["seq_len"]
        assert a[step]["train_loss"] == b[step]["train_loss"]
    assert len({a[s]["seq_len"] for s in range(1, 9)}) > 1

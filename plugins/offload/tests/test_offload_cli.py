"""Offload through the recipe runner: exact resume, DDP on two CPU processes, host bytes in
memory.json and `memwise explain`, composition with Mesa, overlap with checkpointing."""

import pytest
import json
from pathlib import Path

from memwise.testing import DDP, MICRO, assert_resume_is_exact, assert_trained, run_cli

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "recipes" / "offload.yaml")


@pytest.mark.slow
def test_recipe_resume_matches_uninterrupted_run_and_reports_host(tmp_path):
    assert_resume_is_exact(RECIPE, MICRO, tmp_path, steps=4, at=2)
    memory = json.loads((tmp_path / "full" / "memory.json").read_text())
    predicted, measured = memory["predicted"], memory["measured"]["headline"]
    assert predicted["host"] > 0 and measured["host"] > 0
    assert abs(predicted["host"] - measured["host"]) <= 0.25 * measured["host"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_mesa(tmp_path):
    plugins = "plugins=[{use: mesa, with: {exclude: ['*lm_head']}}, {use: offload, with: {layers: [0], fraction: 0.5}}]"
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, *DDP, "trainer.max_steps=3", plugins, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained(tmp_path, 3)


@pytest.mark.slow
def test_explain_shows_host_and_overlap_is_a_clear_error(tmp_path):
    proc = run_cli("explain", RECIPE, *MICRO, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host" in proc.stdout and "offload" in proc.stdout
    clash = "plugins=[{use: checkpointing, with: {layers: all}}, {use: offload, with: {layers: [1]}}]"
    proc = run_cli("run", RECIPE, f"report.dir={tmp_path}", *MICRO, clash, cwd=ROOT)
    assert proc.returncode != 0
    assert "both checkpointed and offloaded" in proc.stdout + proc.stderr

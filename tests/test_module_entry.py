"""`python -m memwise` is the same command line as the `memwise` script."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_python_dash_m_memwise_lists_plugins():
    out = subprocess.run([sys.executable, "-m", "memwise", "plugins", "list"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "checkpointing" in out.stdout


@pytest.mark.slow
def test_python_dash_m_memwise_reports_bad_recipe_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {max_stepz: 3}\n")
    out = subprocess.run([sys.executable, "-m", "memwise", "validate", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "trainer.max_stepz" in out.stdout + out.stderr

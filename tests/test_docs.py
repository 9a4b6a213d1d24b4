"""Docs stay true: the hook and recipe references match the code; the example plugin works."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memwise import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_hookspec_is_in_the_hook_reference():
    text = (ROOT / "docs" / "hooks.md").read_text()
    names = [n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("memwise_")]
    assert len(names) >= 15
    missing = [n for n in names if f"`{n}(" not in text]
    assert not missing, f"docs/hooks.md lacks {missing}: run python tools/docs/hooks_md.py"
    assert text == load_tool("hooks_md").render(), "docs/hooks.md is stale: run python tools/docs/hooks_md.py"


def test_recipe_reference_is_current():
    text = (ROOT / "docs" / "recipes.md").read_text()
    assert text == load_tool("recipes_md").render(), "docs/recipes.md is stale: run python tools/docs/recipes_md.py"


@pytest.fixture(scope="module")
def example_plugin():
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e",
                           str(ROOT / "docs" / "examples" / "memwise-freeze")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ROOT / "docs" / "examples" / "memwise-freeze"


def memwise_cli(*args):
    return subprocess.run([sys.executable, "-m", "memwise.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_third_party_plugin_through_its_entry_point(example_plugin, tmp_path):
    listed = memwise_cli("plugins", "list")
    assert "freeze" in listed.stdout and "memwise-freeze" in listed.stdout
    micro = [f"report.dir={tmp_path}", "model.config.hidden_size=64", "model.config.num_hidden_layers=2",
             "model.config.intermediate_size=128", "data.seq_len=64", "data.batch_size=4", "data.max_documents=80",
             "data.val_batches=1", "trainer.max_steps=2", "trainer.progress_bar=false", "report.plots=false"]
    proc = memwise_cli("run", str(example_plugin / "recipe.yaml"), *micro)
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads((tmp_path / "memory.json").read_text())
    baseline, final = memory["predicted_steps"][0], memory["predicted"]
    embed = 260 * 64 * 4
    assert baseline["gradients"] - final["gradients"] == embed
    assert memory["measured"]["headline"]["gradients"] == final["gradients"]
    assert memory["measured"]["headline"]["optimizer_state"] == final["optimizer_state"]

"""Shared fixtures: a micro recipe and the CLI in-process (models come from memwise's pytest plugin)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "recipes" / "micro.yaml")

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture
def micro() -> str:
    return MICRO


@pytest.fixture
def cli(capsys):
    """Run `memwise ...` in this process; returns (exit code, stdout, stderr)."""
    from memwise.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def make_llama():
    """The tiny Llama factory of memwise.testing (also the ``tiny_llama`` fixture of memwise's pytest plugin)."""
    from memwise.testing import tiny_llama

    return tiny_llama

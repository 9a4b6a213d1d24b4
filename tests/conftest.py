"""Shared fixtures: a micro recipe, the CLI in-process, and small Llama models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
    return llama


def llama(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=260, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab)
    return LlamaForCausalLM(cfg)

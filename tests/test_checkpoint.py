"""Checkpoint safety: atomic writes, weights_only loading, manifests."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import memwise
from memwise.checkpoint import atomic_save, check_manifest, manifest, rng_state, safe_load, set_rng_state
from memwise.errors import MemwiseError


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(MemwiseError, match="weights_only=True"):
        safe_load(path)


class Layered(memwise.Plugin):
    name = "layered"

    @dataclasses.dataclass
    class Config:
        layers: list[int] = memwise.option([], "layer indices")


def test_manifest_is_plain_and_rng_round_trips(tmp_path):
    m = manifest([Layered(layers=[0, 1])], {"name": "r"})
    state = {"manifest": m, "rng": rng_state()}
    atomic_save(state, tmp_path / "s.pt")
    loaded = safe_load(tmp_path / "s.pt")
    assert loaded["manifest"]["plugins"][0]["config"] == {"layers": [0, 1]}
    set_rng_state(loaded["rng"])
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(loaded["rng"])
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_missing_required_plugin_gives_the_snippet():
    saved = {"plugins": [{"name": "coat", "distribution": "memwise-coat", "config": {"group_size": 64},
                          "required_on_load": True}]}
    with pytest.raises(MemwiseError, match=r"use: coat\n    with: \{'group_size': 64\}"):
        check_manifest(saved, [])

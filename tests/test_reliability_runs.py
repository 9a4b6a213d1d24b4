"""Reliability of training runs: non-finite steps, non-finite checkpoints, signals, stale files."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import memwise
from memwise.checkpoint import atomic_save, safe_load
from memwise.testing import read_metrics

pytestmark = pytest.mark.slow


class Spy(memwise.Plugin):
    """Test-local plugin: records its teardowns."""

    name = "spy"
    torn_down: list = []

    @memwise.hookimpl
    def memwise_teardown(self, ctx):
        type(self).torn_down.append(self.name)


class SwapOptimizer(memwise.Plugin):
    """Test-local optimizer-replacing plugin (what COAT is to a checkpoint without it)."""

    name = "swapopt"
    phase = "optimizer"

    def provides(self):
        return {"optimizer.states"}

    @memwise.hookimpl
    def memwise_configure_optimizer(self, ctx):
        ctx.optimizer = torch.optim.AdamW(ctx.optimizer.param_groups)


@pytest.fixture
def local_plugins(monkeypatch):
    """Recipes may name the test-local plugins (as if installed through an entry point)."""
    from memwise import manager

    real = manager.load
    local = {p.name: p for p in (Spy, SwapOptimizer)}
    monkeypatch.setattr(manager, "load", lambda name: local[name] if name in local else real(name))
    Spy.torn_down = []
    return local


@pytest.fixture
def poisoned(monkeypatch):
    """Make the training loss NaN at the given (1-based) training-step calls; count the calls."""
    from memwise.lightning import module

    real = module.causal_lm_loss
    state = {"calls": 0, "bad": set(), "signal": None}

    def loss(model, batch):
        out = real(model, batch)
        if model.training and torch.is_grad_enabled():
            state["calls"] += 1
            if state["calls"] in state["bad"]:
                out = out * float("nan")
            if state["signal"] and state["calls"] == state["signal"][0]:
                os.kill(os.getpid(), state["signal"][1])
        return out

    monkeypatch.setattr(module, "causal_lm_loss", loss)
    return state


def steps_of(ckpt):
    return int(safe_load(ckpt)["global_step"])


def test_nonfinite_loss_stops_the_run_without_a_nonfinite_checkpoint(cli, micro, tmp_path, poisoned):
    poisoned["bad"] = {3}
    report = tmp_path / "r"
    code, _, err = cli("run", micro, f"report.dir={report}", "trainer.checkpoint_every_n_steps=1")
    err = " ".join(err.split())
    assert code == 1
    assert "step 3: the loss is nan" in err and "step-000002.ckpt" in err and "optimizer.lr" in err
    ckpts = sorted(p.name for p in (report / "checkpoints").iterdir())
    assert ckpts == ["step-000001.ckpt", "step-000002.ckpt"]  # no last.ckpt, nothing after the fault
    rows = [r for r in read_metrics(report) if r["train_loss"]]
    assert [r["step"] for r in rows] == ["1", "2"] and all(math.isfinite(float(r["train_loss"])) for r in rows)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["steps"] == 2 and "step 3" in summary["stopped"]


def test_skip_policy_drops_the_update_and_counts_it(cli, micro, tmp_path, poisoned):
    poisoned["bad"] = {3}
    report = tmp_path / "r"
    code, _, _ = cli("run", micro, f"report.dir={report}", "trainer.on_nonfinite=skip", "report.probe_memory=false")
    assert code == 0
    rows = [r for r in read_metrics(report) if r["train_loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["nonfinite_skips"]) for r in rows] == [0, 0, 1, 1, 1, 1]
    ckpt = safe_load(report / "checkpoints" / "last.ckpt")
    # six updates from seven batches: the optimizer never saw the skipped one
    assert ckpt["global_step"] == 6
    assert {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {6}
    assert ckpt["RecipeDataModule"]["batches"] == 7  # a resume continues after the skipped batch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_skip_policy_stops_after_too_many_in_a_row(cli, micro, tmp_path, poisoned):
    poisoned["bad"] = {2, 3, 4}
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'r'}", "trainer.on_nonfinite=skip",
                       "trainer.max_nonfinite_skips=2")
    assert code == 1 and "3 steps in a row (trainer.max_nonfinite_skips: 2)" in " ".join(err.split())


def test_divergence_never_replaces_last_ckpt_and_nonfinite_weights_are_refused(cli, micro, tmp_path, poisoned):
    report = tmp_path / "r"
    args = ["run", micro, f"report.dir={report}", "trainer.max_steps=2", "report.probe_memory=false"]
    assert cli(*args)[0] == 0
    last = report / "checkpoints" / "last.ckpt"
    poisoned.update(calls=0, bad={1})  # the first step after resuming
    code, _, err = cli(*args[:3], "trainer.max_steps=4", f"resume={last}")
    assert code == 1 and f"Last finite checkpoint: {last}" in " ".join(err.split())
    assert steps_of(last) == 2
    # a checkpoint whose weights went bad is refused for resume and for generate
    state = safe_load(last)
    key = next(iter(state["state_dict"]))
    state["state_dict"][key] = state["state_dict"][key] * float("nan")
    atomic_save(state, tmp_path / "bad.ckpt")
    poisoned["bad"] = set()
    code, _, err = cli(*args[:3], "trainer.max_steps=4", f"resume={tmp_path / 'bad.ckpt'}")
    assert code == 2 and "weights hold NaN/inf" in " ".join(err.split()) and key in err
    code, _, err = cli("generate", micro, f"generate.checkpoint={tmp_path / 'bad.ckpt'}", "--prompt", "def")
    assert code == 2 and "weights hold NaN/inf" in " ".join(err.split())


def test_diverging_learning_rate_stops_with_exit_1(cli, micro, tmp_path):
    report = tmp_path / "r"
    code, _, err = cli("run", micro, f"report.dir={report}", "optimizer.lr=1.0e+9", "optimizer.name=sgd",
                       "trainer.gradient_clip_val=null", "trainer.checkpoint_every_n_steps=1")
    assert code == 1 and "the run is stopped" in " ".join(err.split())
    for ckpt in (report / "checkpoints").glob("*.ckpt"):
        weights = safe_load(ckpt)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), ckpt
    summary = (report / "summary.json").read_text()
    assert "NaN" not in summary and "Infinity" not in summary


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_ckpt_at_the_current_step(cli, micro, tmp_path, poisoned, local_plugins, signum, code):
    poisoned["signal"] = (2, signum)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a shell's background job
    report = tmp_path / "r"
    (report / "checkpoints").mkdir(parents=True)
    stale = report / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    got, out, err = cli("run", micro, f"report.dir={report}", "trainer.max_steps=6", "plugins=[{use: spy}]")
    assert got == code, err
    assert Spy.torn_down == ["spy"]
    assert f"resume={report / 'checkpoints' / 'last.ckpt'}" in " ".join(err.split())
    assert steps_of(report / "checkpoints" / "last.ckpt") == 2
    assert not stale.exists() and f"removed {stale}" in " ".join(out.split())
    assert not (report / ".memwise.lock").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the run restores the handler it found


# --- checkpoints that do not match ---------------------------------------------------------


def _micro():
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "recipes" / "micro.yaml")


@pytest.fixture(scope="module")
def last_ckpt(tmp_path_factory):
    from memwise.cli import main

    folder = tmp_path_factory.mktemp("trained")
    assert main(["run", _micro(), f"report.dir={folder}", "trainer.max_steps=2", "report.probe_memory=false"]) == 0
    return folder / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_model_shape_says_what_differs(cli, micro, tmp_path, last_ckpt):
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'r'}", f"resume={last_ckpt}",
                       "model.config.hidden_size=128", "model.config.intermediate_size=256")
    err = " ".join(err.split())
    assert code == 2 and "does not match the model" in err and "'hidden_size': 64" in err
    assert "'hidden_size': 128" in err and "size mismatch" not in err


def test_checkpoint_of_another_optimizer(cli, micro, tmp_path, last_ckpt):
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'r'}", f"resume={last_ckpt}", "optimizer.name=sgd")
    assert code == 2 and "optimizer.name: adamw, this run uses sgd" in " ".join(err.split())


def test_checkpoint_made_by_something_else(cli, micro, tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "lightning.ckpt")
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'a'}", f"resume={tmp_path / 'other.pt'}")
    assert code == 2 and "is not a Lightning checkpoint" in " ".join(err.split())
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'b'}", f"resume={tmp_path / 'lightning.ckpt'}")
    assert code == 2 and "not written by `memwise run`" in " ".join(err.split())


def test_adding_an_optimizer_plugin_on_resume_needs_the_flag(cli, micro, tmp_path, last_ckpt, local_plugins):
    swap = ["plugins=[{use: swapopt}]", "report.probe_memory=false", "trainer.max_steps=3"]
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'a'}", f"resume={last_ckpt}", *swap)
    err = " ".join(err.split())
    assert code == 2 and "made without plugin(s) swapopt" in err and "--resume-without-plugin-state" in err
    code, out, err = cli("run", micro, f"report.dir={tmp_path / 'b'}", f"resume={last_ckpt}", *swap,
                         "--resume-without-plugin-state")
    assert code == 0, err
    assert "fresh optimizer state" in out
    assert steps_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 3

"""Reliability of training runs: non-finite steps, non-finite checkpoints, signals, stale files."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from memwise.checkpoint import atomic_save, safe_load
from memwise.testing import read_metrics

pytestmark = pytest.mark.slow


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
def test_signal_saves_last_ckpt_at_the_current_step(cli, micro, tmp_path, poisoned, monkeypatch, signum, code):
    from memwise_checkpointing import CheckpointingPlugin

    torn_down = []
    real = CheckpointingPlugin.memwise_teardown

    def spy(self, ctx):
        torn_down.append(self.name)
        return real(self, ctx)

    spy.memwise_impl = real.memwise_impl
    monkeypatch.setattr(CheckpointingPlugin, "memwise_teardown", spy)
    poisoned["signal"] = (2, signum)
    report = tmp_path / "r"
    (report / "checkpoints").mkdir(parents=True)
    stale = report / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    got, out, err = cli("run", micro, f"report.dir={report}", "trainer.max_steps=6", "plugins=[{use: checkpointing}]")
    assert got == code, err
    assert torn_down == ["checkpointing"]
    assert f"resume={report / 'checkpoints' / 'last.ckpt'}" in " ".join(err.split())
    assert steps_of(report / "checkpoints" / "last.ckpt") == 2
    assert not stale.exists() and f"removed {stale}" in " ".join(out.split())
    assert not (report / ".memwise.lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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


def test_adding_an_optimizer_plugin_on_resume_needs_the_flag(cli, micro, tmp_path, last_ckpt):
    pytest.importorskip("memwise_coat")
    coat = ["plugins=[{use: coat, with: {activations: false}}]", "report.probe_memory=false", "trainer.max_steps=3"]
    code, _, err = cli("run", micro, f"report.dir={tmp_path / 'a'}", f"resume={last_ckpt}", *coat)
    err = " ".join(err.split())
    assert code == 2 and "made without plugin(s) coat" in err and "--resume-without-plugin-state" in err
    code, out, err = cli("run", micro, f"report.dir={tmp_path / 'b'}", f"resume={last_ckpt}", *coat,
                         "--resume-without-plugin-state")
    assert code == 0, err
    assert "fresh optimizer state" in out
    assert steps_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 3


# --- callback mode -------------------------------------------------------------------------


class AdamModule:
    """A user's LightningModule with torch AdamW (what COAT replaces)."""

    @staticmethod
    def make(llama):
        import lightning.pytorch as pl

        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = llama()

            def training_step(self, batch, batch_idx):
                return self.net(input_ids=batch, labels=batch).loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.net.parameters(), lr=1e-3)

            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.randint(0, 256, (8, 16)), batch_size=4)

        return M()


def test_callback_mode_refuses_a_coat_checkpoint_without_coat(tmp_path, make_llama):
    pytest.importorskip("memwise_coat")
    import lightning.pytorch as pl

    from memwise.errors import InputError
    from memwise.lightning.callback import MemwiseCallback
    from memwise_checkpointing import CheckpointingPlugin
    from memwise_coat import CoatPlugin

    def trainer(callbacks, steps):
        return pl.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    t = trainer([CoatPlugin(activations=False, min_numel=1).as_callback()], 2)
    t.fit(AdamModule.make(make_llama))
    t.save_checkpoint(tmp_path / "coat.ckpt")
    with pytest.raises(InputError, match=r"(?s)made with plugin 'coat'.*use: coat"):
        trainer([MemwiseCallback([CheckpointingPlugin()])], 4).fit(AdamModule.make(make_llama), ckpt_path=tmp_path / "coat.ckpt")


# --- fp16 with a gradient scaler -----------------------------------------------------------


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    return params, state


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(a[1], b[1]))


def test_fp16_grad_scaler_with_coat_optimizer_and_mesa_backward(make_llama):
    """fp16 autocast + GradScaler (what Lightning's 16-mixed does on a GPU): COAT's optimizer and Mesa's
    8-bit backward train with it, and an overflowing step is skipped with their state untouched."""
    pytest.importorskip("memwise_coat")
    pytest.importorskip("memwise_mesa")
    from memwise_coat import CoatAdamW
    from memwise_mesa import apply_mesa

    model = make_llama()
    assert sum(apply_mesa(model).counts().values()) > 0
    optimizer = CoatAdamW.from_torch(torch.optim.AdamW(model.parameters(), lr=1e-3), min_numel=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=batch, labels=batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), finite

    losses = [step() for _ in range(3)]
    assert all(f and math.isfinite(v) for v, f in losses) and losses[-1][0] < losses[0][0], losses
    assert {int(s["step"]) for s in optimizer.state.values()} == {3}
    assert any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for s in optimizer.state.values()
               for v in s.values())
    before = _snapshot(model, optimizer)
    scaler.update(2.0 ** 40)  # fp16 gradients overflow at this scale: the scaler must skip the step
    _, finite = step()
    assert not finite and _same(before, _snapshot(model, optimizer))
    assert scaler.get_scale() < 2.0 ** 40

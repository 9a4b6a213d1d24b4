"""Reliability: recipe values and containers, YAML, report folder, files, teardown, step contexts.

Fast tests (no training); the training-run cases are in test_reliability_runs.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tracemalloc

import pytest
import torch

import memwise
from memwise import files, guard, recipe, report
from memwise.context import RunContext
from memwise.errors import InputError, PluginHookError, RecipeError, TeardownError, WriteError
from memwise.host import PluginHost


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(path, *overrides, **kw):
    with pytest.raises(RecipeError) as info:
        recipe.load(path, list(overrides), **kw)
    return {p.key: p.message for p in info.value.problems}


# --- recipe values -------------------------------------------------------------------------


def test_every_out_of_range_value_is_reported_at_once(micro):
    found = problems(micro, "trainer.max_steps=-1", "trainer.val_every_n_steps=0", "optimizer.lr=.nan",
                     "optimizer.betas=[0.9,1.0]", "optimizer.eps=0", "data.val_percent=0", "data.seq_len=1",
                     "data.batch_size=0", "data.val_batches=0", "trainer.checkpoint_every_n_steps=0",
                     "scheduler.warmup_steps=-2", "scheduler.min_lr_ratio=1.5", "trainer.gradient_clip_val=0",
                     "trainer.num_threads=0", "trainer.devices=0")
    assert found == {
        "trainer.max_steps": "must be >= 1, got -1",
        "trainer.val_every_n_steps": "must be >= 1, got 0",
        "optimizer.lr": "must be > 0, got nan",
        "optimizer.betas.1": "must be in [0, 1), got 1.0",
        "optimizer.eps": "must be > 0, got 0",
        "data.val_percent": "must be in (0, 100), got 0",
        "data.seq_len": "must be >= 2, got 1",
        "data.batch_size": "must be >= 1, got 0",
        "data.val_batches": "must be >= 1, got 0",
        "trainer.checkpoint_every_n_steps": "must be >= 1, got 0",
        "scheduler.warmup_steps": "must be >= 0, got -2",
        "scheduler.min_lr_ratio": "must be in [0, 1], got 1.5",
        "trainer.gradient_clip_val": "must be > 0, got 0",
        "trainer.num_threads": "must be >= 1, got 0",
        "trainer.devices": "must be >= 1, got 0",
    }
    # off values stay allowed
    assert recipe.load(micro, ["trainer.checkpoint_every_n_steps=null", "trainer.gradient_clip_val=null"])


def test_model_sizes_and_shapes(micro):
    found = problems(micro, "model.config.hidden_size=66", "model.config.num_key_value_heads=3",
                     "model.config.num_hidden_layers=0", "data.seq_len=8192")
    assert found["model.config.num_hidden_layers"] == "must be a whole number >= 1, got 0"
    found = problems(micro, "model.config.hidden_size=66", "model.config.num_key_value_heads=3", "data.seq_len=8192")
    assert "not divisible by num_attention_heads 4" in found["model.config.hidden_size"]
    assert "not divisible by num_key_value_heads 3" in found["model.config.num_key_value_heads"]
    assert "longer than the model's max_position_embeddings 4096" in found["data.seq_len"]


def test_one_section_never_hides_another(micro):
    found = problems(micro, "model.config.hiden_size=3", "trainer.max_step=3")
    assert set(found) == {"model.config.hiden_size", "trainer.max_step"}


@pytest.mark.parametrize("text, key, message", [
    ("model: [1]", "model", "expected a mapping"),
    ("data: [1]", "data", "expected a mapping"),
    ("extends: 5", "extends", "expected a recipe path"),
    ("plugins: 5", "plugins", "expected a list"),
    ("model: {config: [1]}", "model.config", "expected a mapping"),
])
def test_wrong_container_types_name_the_key(tmp_path, micro, text, key, message):
    body = text if text.startswith("extends") else f"extends: [{micro}]\n{text}"
    found = problems(write(tmp_path, body + "\n"))
    assert message in found[key]


def test_plugin_entries_of_the_wrong_type(tmp_path, micro):
    found = problems(write(tmp_path, f"extends: [{micro}]\nplugins: [5, {{use: 3}}]\n"))
    assert set(found) == {"plugins.0", "plugins.1.use"}


@pytest.mark.slow
def test_deep_nesting_is_a_problem_not_a_recursion_error(tmp_path, micro):
    found = problems(write(tmp_path, f"extends: [{micro}]\nmodel: {{config: {'[' * 3000}{']' * 3000}}}\n"))
    assert any("nests deeper" in m for m in found.values())


# --- YAML ----------------------------------------------------------------------------------


def test_duplicate_keys_are_refused(tmp_path, micro):
    found = problems(write(tmp_path, f"extends: [{micro}]\ntrainer:\n  max_steps: 3\n  max_steps: 5\n"))
    (message,) = found.values()
    assert "duplicate key 'max_steps' (lines 3 and 4)" in message


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(8):
        prev, cur = chr(97 + i), chr(98 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    assert len(text) < 600  # expands to 9**9 strings
    path = write(tmp_path, text)
    tracemalloc.start()
    try:
        found = problems(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20, peak  # measured without expanding: no GiB of strings
    assert any("expands to more than" in m for m in found.values())


def test_resolvers_need_an_explicit_opt_in(tmp_path, micro, monkeypatch):
    monkeypatch.setenv("MEMWISE_SECRET", "hunter2")
    path = write(tmp_path, f"extends: [{micro}]\nname: ${{oc.env:MEMWISE_SECRET}}\n"
                           "report: {dir: 'runs/${name}-${trainer.max_steps}'}\n")
    found = problems(path)
    assert set(found) == {"name"} and "--allow-resolvers" in found["name"]
    assert recipe.load(path, allow_resolvers=True).config.name == "hunter2"
    # key references resolve without the flag
    ok = recipe.load(micro, ["report.dir=runs/${name}-${trainer.max_steps}"])
    assert ok.config.report.dir == "runs/micro-6"


def test_cli_exit_code_2_for_recipe_problems(cli, micro, tmp_path):
    for bad, message in (("trainer.max_steps=-1", "trainer.max_steps: must be >= 1, got -1"),
                         ("name=${oc.env:HOME}", "name: uses the resolver 'oc.env'")):
        code, _, err = cli("run", micro, f"report.dir={tmp_path / 'r'}", bad)
        assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "r").exists()


# --- report folder and files ---------------------------------------------------------------


def test_report_folder_that_is_a_file(cli, micro, tmp_path, monkeypatch):
    from memwise.runner import Run

    def build(self):
        raise AssertionError("the model and data were built before the report folder was checked")

    monkeypatch.setattr(Run, "build", build)  # the check comes first: nothing is built, nothing trains
    target = tmp_path / "taken"
    target.write_text("x")
    code, _, err = cli("run", micro, f"report.dir={target}")
    assert code == 2 and "is a file, not a folder" in " ".join(err.split())


def test_report_folder_that_cannot_be_written(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot be written"):
            files.check_folder(ro / "run")
    finally:
        ro.chmod(0o700)


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / files.LOCK_NAME).write_text(json.dumps(
            {"pid": other.pid, "host": __import__("socket").gethostname(), "started": "s", "command": "memwise run x"}))
        with pytest.raises(InputError, match=f"in use by another memwise run \\(process {other.pid}"):
            files.RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    lock = files.RunLock(tmp_path).acquire()  # its process is gone: taken over
    assert json.loads((tmp_path / files.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(InputError, match=f"process {os.getpid()}"):
        files.RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / files.LOCK_NAME).exists()


def test_second_run_on_a_locked_folder_exits_2(cli, micro, tmp_path):
    with files.RunLock(tmp_path):
        code, _, err = cli("run", micro, f"report.dir={tmp_path}")
    assert code == 2 and f"process {os.getpid()}" in " ".join(err.split())


def test_disk_full_keeps_the_previous_summary_and_names_the_path(tmp_path, monkeypatch):
    report.write_json(tmp_path, "summary.json", {"steps": 1, "loss": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 1, "loss": None}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as info:
        report.write_json(tmp_path, "summary.json", {"steps": 2})
    assert str(tmp_path / "summary.json") in str(info.value) and "MiB free" in str(info.value)
    assert "No space left" in str(info.value)
    monkeypatch.undo()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_not_enough_space_for_a_checkpoint(tmp_path, monkeypatch):
    usage = type("Usage", (), {"free": 10 * 2 ** 20})
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(InputError, match="10 MiB free, one checkpoint needs about 200 MiB"):
        files.check_space(tmp_path, 200 * 2 ** 20)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.ckpt.a1b2.tmp", tmp_path / ".summary.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"kept")
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


# --- non-finite helpers ----------------------------------------------------------------------


def test_finite_check_sees_nan_and_inf_but_not_huge_values():
    big = [torch.full((1000,), 3e38), torch.ones(3, dtype=torch.bfloat16)]
    assert guard.is_finite(torch.tensor(2.0), big)  # a 2-norm would overflow here
    assert not guard.is_finite(torch.tensor(2.0), [torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not guard.is_finite(torch.tensor(2.0), [torch.tensor([float("-inf")])])
    assert not guard.is_finite(torch.tensor(float("nan")), [])
    assert guard.nonfinite_tensors({"a": torch.ones(2), "b": torch.tensor([float("inf")]), "n": 3}) == ["b"]


# --- plugin faults ---------------------------------------------------------------------------


class Recorder(memwise.Plugin):
    name = "recorder"
    log: list = []

    @memwise.hookimpl
    def memwise_teardown(self, ctx):
        type(self).log.append(self.name)
        if self.name.startswith("bad"):
            raise RuntimeError(f"{self.name} cannot undo")


def named(name, phase):
    return type(f"P_{name}", (Recorder,), {"name": name, "phase": phase})()


def test_teardown_runs_everything_in_reverse_and_reports_errors_together():
    Recorder.log = []
    plugins = [named("first", "adapt"), named("bad_middle", "replace"), named("bad_last", "runtime")]
    ctx = RunContext(stage="fit", plugins=plugins)
    undone = []
    ctx.on_teardown(lambda: undone.append("u1"))
    ctx.on_teardown(lambda: (_ for _ in ()).throw(ValueError("undo 2 failed")))
    ctx.on_teardown(lambda: undone.append("u3"))
    with pytest.raises(TeardownError) as info:
        PluginHost(plugins).teardown(ctx)
    assert Recorder.log == ["bad_last", "bad_middle", "first"]
    assert undone == ["u3", "u1"]
    text = str(info.value)
    assert "3 teardown step(s) failed" in text
    assert "plugin 'bad_last' failed in hook 'memwise_teardown'" in text
    assert "plugin 'bad_middle' failed in hook 'memwise_teardown'" in text and "undo 2 failed" in text


class Stepper(memwise.Plugin):
    name = "stepper"
    fail_on = ""

    @memwise.hookimpl
    def memwise_step_context(self, ctx):
        @contextlib.contextmanager
        def cm():
            if self.fail_on == "enter":
                raise RuntimeError("cannot enter")
            yield
            if self.fail_on == "exit":
                raise RuntimeError("cannot leave")
        return cm()


@pytest.mark.parametrize("where, hook", [("enter", "entering"), ("exit", "leaving")])
def test_step_context_errors_name_plugin_and_hook(where, hook):
    plugin = Stepper()
    plugin.fail_on = where
    host = PluginHost([plugin])
    with pytest.raises(PluginHookError, match=f"plugin 'stepper' failed in hook 'memwise_step_context \\({hook}\\)'"):
        with host.step_context(RunContext(stage="fit")):
            pass


def test_step_body_errors_pass_through_the_step_context():
    host = PluginHost([Stepper()])
    with pytest.raises(KeyError, match="from the step"):
        with host.step_context(RunContext(stage="fit")):
            raise KeyError("from the step")

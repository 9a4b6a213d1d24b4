"""The plugin host owns the lifecycle: estimates see earlier surgery, teardown is one reverse path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memwise
from memwise import MemoryDelta, hookimpl
from memwise.context import RunContext
from memwise.errors import MemwiseError, TeardownError
from memwise.host import PluginHost
from memwise.optim import OptimizerConfig, state_bytes


class FreezeEmbeddings(memwise.Plugin):
    """Freezes the token embedding: no gradient and no optimizer state for it."""

    name = "freeze_embeddings"
    phase = "adapt"

    @hookimpl
    def memwise_estimate_memory(self, ctx, estimate):
        params = [p for p in ctx.model.get_input_embeddings().parameters() if p.requires_grad]
        return MemoryDelta(gradients=-sum(p.numel() * p.element_size() for p in params),
                           optimizer_state=-state_bytes(params, ctx.config.optimizer.name))

    @hookimpl
    def memwise_transform_model(self, ctx):
        for name, p in ctx.model.get_input_embeddings().named_parameters():
            p.requires_grad_(False)
            ctx.claims.claim(f"embed_tokens.{name}", self)
            ctx.on_teardown(lambda p=p: p.requires_grad_(True))


class Momentum(memwise.Plugin):
    """Replaces the recipe's AdamW by SGD with momentum (one buffer per trainable parameter)."""

    name = "momentum"
    phase = "optimizer"

    @hookimpl
    def memwise_estimate_memory(self, ctx, estimate):
        trainable = [p for p in ctx.model.parameters() if p.requires_grad]
        sgd = state_bytes(trainable, OptimizerConfig(name="sgd", momentum=0.9))
        return MemoryDelta(optimizer_state=sgd - state_bytes(trainable, ctx.config.optimizer.name))

    @hookimpl
    def memwise_configure_optimizer(self, ctx):
        groups = [{"params": g["params"]} for g in ctx.optimizer.param_groups]
        ctx.optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def test_estimate_sees_the_model_as_the_plugins_before_left_it(micro, installed_plugin, tmp_path):
    """An optimizer plugin after a freezing plugin predicts the state of the parameters still
    trained: predicted optimizer state and gradients equal the measured bytes exactly."""
    from memwise.runner import measure_recipe

    installed_plugin(FreezeEmbeddings)
    installed_plugin(Momentum)
    path = tmp_path / "frozen.yaml"
    path.write_text(f"extends: [{micro}]\nplugins:\n  - use: freeze_embeddings\n  - use: momentum\n")
    rows, report = measure_recipe(str(path), ["data.max_documents=60"])
    predicted, measured = rows[-1][1].as_dict(), report.headline()
    assert [label for label, _, _ in rows] == ["baseline", "+ freeze_embeddings", "+ momentum"]
    for cat in ("parameters", "gradients", "optimizer_state"):
        assert predicted[cat] == measured[cat], cat
    assert rows[-1][1].optimizer_state < rows[1][1].optimizer_state < rows[0][1].optimizer_state


class Recorder(memwise.Plugin):
    """Records its teardown (and its undo action) in ``log``; ``fail`` makes its teardown raise."""

    phase = "wrap"
    log: list = []

    @dataclasses.dataclass
    class Config:
        fail: bool = memwise.option(False, "raise in teardown")

    @hookimpl
    def memwise_transform_model(self, ctx):
        ctx.claims.claim(self.name, self)
        ctx.on_teardown(lambda: self.log.append(f"undo {self.name}"))

    @hookimpl
    def memwise_teardown(self, ctx):
        self.log.append(f"teardown {self.name}")
        if self.config.fail:
            raise RuntimeError(f"{self.name} cannot undo")


def recorders(log: list, failing: str = "") -> list:
    made = []
    for name in ("first", "second", "third"):
        cls = type(name.title(), (Recorder,), {"name": name, "log": log})
        made.append(cls(fail=name == failing))
    return made


def test_teardown_runs_in_reverse_plan_order_once_even_after_a_failure(make_llama):
    log: list = []
    plugins = recorders(log, failing="second")
    host, ctx = PluginHost(plugins), RunContext(stage="fit", plugins=plugins, model=make_llama())
    host.transform_model(ctx)
    with pytest.raises(TeardownError, match="second cannot undo"):
        host.teardown(ctx)
    assert log == ["undo third", "teardown third", "undo second", "teardown second", "undo first", "teardown first"]
    host.teardown(ctx)  # a front end's second call undoes nothing twice
    assert log.count("undo first") == log.count("teardown first") == 1


def test_callback_tears_down_in_reverse_once_when_the_fit_fails(make_llama):
    """A step that raises still ends the fit with every plugin's teardown, newest plugin first."""
    import lightning.pytorch as pl

    from memwise.lightning.callback import MemwiseCallback

    log: list = []

    class Failing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_llama()

        def training_step(self, batch, batch_idx):
            raise ValueError("step failed")

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randint(0, 256, (4, 8)), batch_size=2)

    trainer = pl.Trainer(max_steps=2, callbacks=[MemwiseCallback(plugins=recorders(log))], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match="step failed"):
        trainer.fit(Failing())
    assert log == ["undo third", "teardown third", "undo second", "teardown second", "undo first", "teardown first"]


def test_hooks_asking_pluggy_for_their_own_order_are_refused():
    class Eager(memwise.Plugin):
        name = "eager"

        @hookimpl(tryfirst=True)
        def memwise_on_train_batch_start(self, ctx, batch, batch_idx):
            pass

    with pytest.raises(MemwiseError, match="eager.*tryfirst.*phase, before or after"):
        PluginHost([Eager()])


@pytest.mark.slow
def test_piped_run_prints_progress_lines_without_lightning_banner(cli, micro, tmp_path, caplog):
    """stdout is not a terminal under capsys: a line every log_every_n_steps steps (and at each
    validation), and none of Lightning's hardware banner, logger tip or LeafSpec warning."""
    import logging
    import warnings

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli("run", micro, f"report.dir={tmp_path}", "trainer.log_every_n_steps=2",
                             "trainer.progress_bar=true")
    assert code == 0, err
    steps = [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["step 2/6", "step 3/6", "step 4/6", "step 6/6"]
    shown = out + err + caplog.text
    for noise in ("GPU available", "TPU available", "litlogger"):
        assert noise not in shown, noise
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_memory_figure_shows_baseline_plan_and_measured_with_totals():
    from memwise.memory import CATEGORIES
    from memwise.report import memory_figure

    mib = 2 ** 20
    base = {c: 4 * mib for c in CATEGORIES}
    plan = {**base, "optimizer_state": mib}
    memory = {"predicted": plan, "predicted_steps": [{"label": "baseline", **base}, {"label": "+ x", **plan}],
              "measured": {"peak_total": 20 * mib, "headline": plan}}
    fig, ax = memory_figure(memory)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["baseline (predicted)", "plan (predicted)", "measured"]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    optimizer = CATEGORIES.index("optimizer_state")
    assert [h[optimizer] for h in heights] == [4.0, 1.0, 1.0]
    assert ax.get_title() == "device memory per step (MiB): baseline 24.0, plan 21.0, measured peak 20.0"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plugins_read_the_runs_validation_batches_from_the_context(micro):
    """Plugins get validation data through ``ctx.val_batches()``, never through the Lightning module."""
    from memwise import recipe
    from memwise.runner import Run

    assert RunContext(stage="fit").val_batches() == []  # callback mode: the user's Trainer holds the data
    run = Run(recipe.load(micro, ["data.max_documents=60"]), "fit")
    run.build()
    batches = run.ctx.val_batches()
    assert batches and batches is run.val_batches()

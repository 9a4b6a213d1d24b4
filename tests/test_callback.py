"""Plugins as callbacks in a user's own Trainer, and MemwisePrecision for configure_model."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch

import memwise
from memwise import hookimpl
from memwise.errors import MemwiseError, RecipeError
from memwise.lightning.callback import MemwiseCallback
from memwise.lightning.precision import MemwisePrecision
from memwise.models import decoder_layers


class UserModule(pl.LightningModule):
    """A user's own module: automatic optimization, a scheduler, the model built eagerly or late."""

    def __init__(self, make_llama, late: bool = False):
        super().__init__()
        self.make_llama, self.late = make_llama, late
        self.net = None if late else make_llama()

    def configure_model(self):
        if self.net is None:
            self.net = self.make_llama()

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, 256, (8, 16)), batch_size=4)


def trainer(callbacks, plugins=None, steps=2):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, plugins=plugins, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


class Tag(memwise.Plugin):
    """Core-only surgery for these tests: marks every decoder layer, and unmarks it at teardown."""

    name = "tag"
    phase = "wrap"

    @dataclasses.dataclass
    class Config:
        layers: list[int] = memwise.option([], "decoder layers to mark (empty: all)")

    @hookimpl
    def memwise_transform_model(self, ctx):
        for i, (name, layer) in enumerate(decoder_layers(ctx.model)):
            if not self.config.layers or i in self.config.layers:
                layer.tagged = True
                ctx.claims.claim(name, self)

    @hookimpl
    def memwise_teardown(self, ctx):
        for _, layer in decoder_layers(ctx.model):
            layer.__dict__.pop("tagged", None)


def tagged(module):
    """Which decoder layers the Tag surgery marked."""
    return [getattr(layer, "tagged", False) for layer in module.net.model.layers]


def test_plugin_as_callback_applies_and_tears_down(make_llama):
    module = UserModule(make_llama)
    seen = []

    class Spy(memwise.Plugin):
        name = "spy"

        @hookimpl
        def memwise_on_train_batch_end(self, ctx, outputs, batch, batch_idx):
            seen.append(tagged(ctx.module))

    trainer([MemwiseCallback(plugins=[Tag()]), MemwiseCallback(plugins=[Spy()])]).fit(module)
    assert seen == [[True, True], [True, True]]
    assert tagged(module) == [False, False]  # teardown undid the surgery


def test_callbacks_form_one_plan(make_llama):
    a, b = MemwiseCallback(plugins=[Tag(layers=[0])]), MemwiseCallback(plugins=[Tag(layers=[1])])
    with pytest.raises(RecipeError, match="listed twice"):
        trainer([a, b]).fit(UserModule(make_llama))


def test_optimizer_replacement_repoints_the_scheduler(make_llama):
    class Swap(memwise.Plugin):
        name = "swap"

        @hookimpl
        def memwise_configure_optimizer(self, ctx):
            groups = [{"params": g["params"]} for g in ctx.optimizer.param_groups]
            ctx.optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    module = UserModule(make_llama)
    t = trainer([MemwiseCallback(plugins=[Swap()])])
    t.fit(module)
    opt = t.optimizers[0]
    assert opt.defaults["momentum"] == 0.9 and opt.state  # the new optimizer took the steps
    assert t.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)  # one epoch: one StepLR step


def test_optimizer_replacement_keeps_warm_up_and_base_rates(make_llama):
    """A swapped optimizer continues the user's schedule: warm-up from 0, the user's base rate,
    and no warning from torch's scheduler that optimizer.step was overridden."""
    import warnings

    rates = []

    class Swap(memwise.Plugin):
        name = "swap"

        @hookimpl
        def memwise_configure_optimizer(self, ctx):
            groups = [{"params": g["params"]} for g in ctx.optimizer.param_groups]
            ctx.optimizer = torch.optim.SGD(groups, lr=5.0)  # a default the schedule must not leak

        @hookimpl
        def memwise_on_before_optimizer_step(self, ctx, optimizer):
            rates.append(optimizer.param_groups[0]["lr"])

    class WarmUp(UserModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.net.parameters(), lr=0.2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer([MemwiseCallback(plugins=[Swap()])], steps=4)
        t.fit(WarmUp(make_llama))
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert t.lr_scheduler_configs[0].scheduler.base_lrs == [0.2]
    assert not [w for w in caught if "overridden" in str(w.message) or "before `optimizer.step()`" in str(w.message)]


def test_configure_model_needs_memwise_precision(make_llama):
    cb = MemwiseCallback(plugins=[Tag()])
    with pytest.raises(MemwiseError, match="MemwisePrecision"):
        trainer([cb]).fit(UserModule(make_llama, late=True))
    seen = []

    class Spy(memwise.Plugin):
        name = "spy"

        @hookimpl
        def memwise_on_train_batch_start(self, ctx, batch, batch_idx):
            seen.append(tagged(ctx.module))

    cb = MemwiseCallback([Tag(), Spy()])
    module = UserModule(make_llama, late=True)
    trainer([cb], plugins=[MemwisePrecision(cb)]).fit(module)
    assert seen[0] == [True, True]

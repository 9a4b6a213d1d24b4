"""COAT under faults: a COAT checkpoint refused without COAT (callback mode); fp16 with a GradScaler."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import memwise
import pytest
import torch
from memwise.errors import InputError
from memwise.lightning.callback import MemwiseCallback
from memwise_coat import CoatAdamW, CoatPlugin
from memwise.testing import tiny_llama


def _llama():
    return tiny_llama()


class AdamModule(pl.LightningModule):
    """A user's module with torch AdamW, what COAT replaces."""

    def __init__(self):
        super().__init__()
        self.net = _llama()

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, 256, (8, 16)), batch_size=4)


def _trainer(callbacks, steps):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_callback_mode_refuses_a_coat_checkpoint_without_coat(tmp_path):
    """Before: the FP8 moments were cast into the other optimizer's state and training went on."""
    t = _trainer([MemwiseCallback(plugins=[CoatPlugin(activations=False, min_numel=1)])], 2)
    t.fit(AdamModule())
    t.save_checkpoint(tmp_path / "coat.ckpt")

    class Other(memwise.Plugin):  # any memwise plan without COAT
        name = "other"

    with pytest.raises(InputError, match=r"(?s)made with plugin 'coat'.*use: coat"):
        _trainer([MemwiseCallback([Other()])], 4).fit(
            AdamModule(), ckpt_path=tmp_path / "coat.ckpt")


def _state(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()])


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(a[1], b[1]))


def test_fp16_grad_scaler_with_coat_adamw():
    """fp16 autocast + GradScaler, as Lightning's 16-mixed does on a GPU: CoatAdamW trains with it, and
    an overflowing step is skipped with the parameters and the FP8 moments untouched."""
    model = _llama()
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
    assert any(v.dtype == torch.float8_e4m3fn for s in optimizer.state.values() for v in s.values())
    before = _state(model, optimizer)
    scaler.update(2.0 ** 40)  # fp16 gradients overflow at this scale: the scaler must skip the step
    _, finite = step()
    assert not finite and _same(before, _state(model, optimizer))
    assert scaler.get_scale() < 2.0 ** 40

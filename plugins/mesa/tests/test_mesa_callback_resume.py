"""Mesa as a callback in a user's own Trainer: resume through Lightning's ModelCheckpoint is exact.

Lightning does not checkpoint torch's global RNG, so this holds only because Mesa's stochastic
rounding draws from its own stream, saved in the callback's state with the running ranges.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from memwise.lightning.callback import MemwiseCallback
from memwise.testing import tiny_llama
from memwise_mesa import MesaPlugin


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_llama(seed=0)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=3e-3)

    def train_dataloader(self):
        data = torch.randint(0, 260, (8, 32), generator=torch.Generator().manual_seed(1))  # 2 steps an epoch
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(folder, steps, ckpt_path=None, every=None):
    callbacks = [MemwiseCallback(plugins=[MesaPlugin()])]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    torch.manual_seed(123)  # the global RNG moves on differently in the resumed run below
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.losses


def test_resume_through_model_checkpoint_is_exact(tmp_path):
    full = fit(tmp_path, steps=4, every=2)
    torch.manual_seed(999)
    resumed = fit(tmp_path / "again", steps=4, ckpt_path=tmp_path / "step=2.ckpt")
    assert resumed == full[2:]  # bitwise: the same floats, not merely close


def test_checkpoint_carries_the_rounding_stream(tmp_path):
    fit(tmp_path, steps=2, every=2)
    state = torch.load(tmp_path / "step=2.ckpt", weights_only=True)
    (callback_state,) = [v for k, v in state["callbacks"].items() if k.startswith("MemwiseCallback")]
    rounding = callback_state["plugins"]["mesa"]["rounding"]
    assert rounding["states"] and all(s.dtype == torch.uint8 for s in rounding["states"].values())

"""The host-side numbers of one AdamW step, shared by the torch and triton FP8 updates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepScalars:
    """The host-side numbers of one AdamW step, computed as torch.optim.AdamW does."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5

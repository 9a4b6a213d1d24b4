"""MemwisePrecision: what a callback cannot reach, through the precision plugin.

Models built in ``configure_model`` (FSDP, meta-device init) exist only after the
callbacks' ``setup``; the strategy hands them to ``convert_module``, where the plan's
surgery runs, before the optimizer is created. Step contexts are entered by the
callback around each training batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision


class MemwisePrecision(Precision):
    """Wraps the user's precision plugin (default: full precision) and a MemwiseCallback."""

    def __init__(self, callback: Any, inner: Precision | None = None) -> None:
        super().__init__()
        self.callback = callback
        self.inner = inner or Precision()

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module = self.inner.convert_module(module)
        leader = self.callback.leader or self.callback
        if leader.session is not None:
            leader.session.transform(module)
        return module

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.inner.forward_context()

    def train_step_context(self) -> contextlib.AbstractContextManager:
        return self.inner.train_step_context()

    def __getattr__(self, name: str) -> Any:
        # everything else (backward, optimizer_step, scaler state) is the inner plugin's
        if name in ("inner", "callback"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def backward(self, tensor: torch.Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.backward(tensor, model, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        return self.inner.optimizer_step(optimizer, model, closure, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

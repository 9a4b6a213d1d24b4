"""The optimizer step in backward: each parameter is updated as soon as its gradient is accumulated.

A post-accumulate-grad hook on every trainable parameter runs the wrapped optimizer's own
``step`` on that parameter alone (its param group narrowed to it for the call) and then drops
the gradient, so the gradients of the whole model never exist at once (LOMO, torchtune's
"optimizer in backward"). Any optimizer whose update is per parameter works unchanged
(torch AdamW, COAT's CoatAdamW, GaLore, FRUGAL), and the arithmetic is the unfused step's, so
results are bitwise equal on CPU. What needs every gradient before any update cannot be fused:
clipping by global norm and gradient accumulation are refused by the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FusedStepOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that backward performs its step; ``step()`` then only runs the closure.

    Shares the wrapped optimizer's ``param_groups`` and ``state`` (a learning-rate scheduler
    built on this object drives the real update) and delegates its state dict, so checkpoints are
    the wrapped optimizer's. ``remove()`` takes the hooks off and returns the wrapped optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, FusedStepOptimizer):
            raise ValueError("this optimizer already steps in backward")
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self._group_of: dict[int, dict] = {}
        self._share_groups()
        self._handles = [p.register_post_accumulate_grad_hook(self._step_parameter)
                         for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _share_groups(self) -> None:
        """Point at the wrapped optimizer's groups and state (torch's load_state_dict makes new ones)."""
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}

    def _step_parameter(self, p: torch.Tensor) -> None:
        """The wrapped optimizer's step on ``p`` alone, then its gradient is released."""
        group = self._group_of[id(p)]
        groups, params = self.optimizer.param_groups, group["params"]
        group["params"] = [p]
        self.optimizer.param_groups = [group]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
            group["params"] = params
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Backward already applied the update: only evaluate ``closure`` (which runs backward)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._share_groups()

    def remove(self) -> torch.optim.Optimizer:
        """Take the hooks off the parameters; the wrapped optimizer steps normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.optimizer

    def __repr__(self) -> str:
        return f"FusedStepOptimizer({self.optimizer!r})"


def fuse_step(optimizer: torch.optim.Optimizer) -> FusedStepOptimizer:
    """Make backward apply ``optimizer``'s update parameter by parameter and free each gradient."""
    return FusedStepOptimizer(optimizer)

"""CoatAdamW: torch.optim.AdamW with both moments stored as per-group FP8 (COAT)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from memwise_coat.conversion import from_torch_adamw, to_torch_adamw
from memwise_coat.groups import group_codecs
from memwise_coat.quantization import MIN_EXPANSION
from memwise_coat.scalars import StepScalars
from memwise_coat.state import MOMENTS, STEP, CoatState, is_quantized, local_tensor
from memwise_coat.update import adamw_update_, fp8_step

# torch.optim.AdamW group options CoatAdamW does not support, with the value it requires.
_UNSUPPORTED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
_TORCH_ONLY = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


class CoatAdamW(torch.optim.Optimizer):
    """AdamW whose first and second moments live in FP8 groups with Dynamic Range Expansion.

    The update is torch.optim.AdamW's. Parameters below ``min_numel`` elements, and those in
    ``fp32_params`` (embeddings and norms, chosen by the caller), keep fp32 moments and get
    exactly torch's update. FSDP2 (DTensor) parameters are updated on their local shards, in
    groups within each shard, with the state sharded alike (memwise_coat.state). Per-group options (saved in the state dict): ``group_size``,
    ``expansion``, ``second_moment_format`` ("e4m3" or "e5m2"), ``min_numel``, ``min_expansion``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, group_size: int = 128, expansion: bool = True,
                 second_moment_format: str = "e4m3", min_numel: int = 4096,
                 min_expansion: float = MIN_EXPANSION,
                 fp32_params: Iterable[torch.Tensor] = ()) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if second_moment_format not in ("e4m3", "e5m2"):
            raise ValueError(f"second_moment_format must be 'e4m3' or 'e5m2', got {second_moment_format!r}")
        if min_expansion <= 0:
            raise ValueError(f"min_expansion must be positive, got {min_expansion}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, group_size=group_size,
                        expansion=expansion, second_moment_format=second_moment_format, min_numel=min_numel,
                        min_expansion=min_expansion)
        super().__init__(params, defaults)
        self._fp32_ids = {id(p) for p in fp32_params}

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, **options: Any) -> CoatAdamW:
        """The same param groups and hyper-parameters as a torch AdamW (its state too, quantized)."""
        groups = []
        for group in optimizer.param_groups:
            for key, required in _UNSUPPORTED.items():
                if group.get(key, required) != required:
                    raise ValueError(f"CoatAdamW does not support {key}={group[key]!r}")
            groups.append({k: v for k, v in group.items() if k not in _TORCH_ONLY})
        new = cls(groups, **options)
        if optimizer.state:
            new.load_torch_adamw_state_dict(optimizer.state_dict())
        return new

    # --- state ------------------------------------------------------------------------------

    codecs = staticmethod(group_codecs)

    def quantizes(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p`` gets FP8 moments (decided by its state once it has one)."""
        state = self.state.get(p)
        if state:
            return is_quantized(state)
        return id(p) not in self._fp32_ids and p.numel() >= group["min_numel"]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state.update(CoatState.of_group(group).create(p, self.quantizes(p, group)))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then the stored dtypes back (torch casts every moment to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        id_map = {old: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  for old, p in zip(saved["params"], group["params"])}
        for old, saved in state_dict["state"].items():
            p = id_map[old]
            state = self.state[p]
            for key, value in saved.items():
                if key != STEP and isinstance(value, torch.Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(device=p.device, copy=True)

    # --- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CoatAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, group)
                state[STEP] += 1
                s = StepScalars(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state[STEP].item())
                layout = CoatState.of_group(group)
                # FSDP2: this rank's shard of a DTensor parameter, quantized in groups of its own
                local, shard, grad = layout.local(state), local_tensor(p), local_tensor(p.grad)
                if is_quantized(local):
                    fp8_step(shard, grad, local, s, *layout.codecs)
                else:
                    adamw_update_(shard, grad, *(local[m] for m in MOMENTS), s)
        return loss

    # --- no lock-in -------------------------------------------------------------------------

    def to_torch_adamw_state_dict(self) -> dict:
        """This optimizer's state dict in torch.optim.AdamW's format (fp32 moments)."""
        return to_torch_adamw(self.state_dict())

    def load_torch_adamw_state_dict(self, state_dict: dict) -> None:
        """Load a torch.optim.AdamW state dict, quantizing its moments."""
        self.load_state_dict(from_torch_adamw(state_dict, self))


"""FrugalAdamW: full-rank updates every step, Adam state only on a subspace (FRUGAL).

Each selected 2-D weight's gradient is split: a state-full part (a random block of columns, or a
GaLore-style SVD projection) updated with Adam, and the rest updated state-free (signSGD or SGD).
The state-full subspace is re-chosen every ``update_gap`` steps and its moments restart then;
``density`` is the fraction of columns (or of the rank) that is state-full, the memory knob.
Other parameters (embeddings, head, norms) get torch's AdamW update bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from memwise.optim import state_bytes
from memwise_galore.optimizer import GaLoreAdamW, adam_denominator, adamw_moments_
from memwise_galore.projection import choose_side, project, project_back, projector

FRUGAL_DEFAULTS = dict(density=0.25, update_gap=200, selection="columns", state_free="signsgd",
                       free_lr_ratio=1.0, seed=0)


def stateful_size(p: torch.Tensor, density: float, selection: str) -> int:
    """Columns (or rank) in the state-full subspace: ceil(density x columns (or min side)), at least 1."""
    full = p.shape[1] if selection == "columns" else min(p.shape)
    return max(1, min(full, math.ceil(density * full)))


class FrugalAdamW(GaLoreAdamW):
    """AdamW on a state-full subspace of each weight in ``frugal_params``; signSGD (or SGD) on the rest.

    Shares GaLoreAdamW's step loop and plain AdamW path; only the subspace step differs.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, frugal_params: Iterable[torch.Tensor] = (),
                 **options: Any) -> None:
        unknown = set(options) - set(FRUGAL_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown FRUGAL option(s): {', '.join(sorted(unknown))}")
        merged = {**FRUGAL_DEFAULTS, **options}
        _check(merged)
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                                          weight_decay=weight_decay, **merged))
        frugal_params = list(frugal_params)
        for p in frugal_params:
            if p.ndim != 2:
                raise ValueError(f"FRUGAL splits 2-D weights only, got a parameter of shape {tuple(p.shape)}")
        self._subspace_ids = {id(p) for p in frugal_params}

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, frugal_params: Iterable[torch.Tensor],  # type: ignore[override]
                   **options: Any) -> FrugalAdamW:
        if optimizer.state:
            raise ValueError("FrugalAdamW replaces an AdamW before its first step (its moments are full-size)")
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
                  for g in optimizer.param_groups]
        return cls(groups, frugal_params=frugal_params, **options)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to the parameter's dtype: the column indices go back
        to int64 (exact: indices are far below 2^24)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "columns" in state:
                state["columns"] = state["columns"].long()

    def projects(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s update is split (decided by its state once it has one)."""
        state = self.state.get(p)
        return ("columns" in state or "projector" in state) if state else id(p) in self._subspace_ids

    def _subspace_step(self, p: torch.Tensor, group: dict) -> None:
        """FRUGAL's split update for one weight."""
        state, grad = self.state[p], p.grad.float()
        size = stateful_size(p, group["density"], group["selection"])
        columns = group["selection"] == "columns"
        side = choose_side(p.shape, "auto")
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if columns:
                low_shape = (p.shape[0], size)
                state["columns"] = torch.zeros(size, dtype=torch.long, device=p.device)
            else:
                low_shape = (size, p.shape[1]) if side == "left" else (p.shape[0], size)
                state["projector"] = torch.zeros(p.shape[0 if side == "left" else 1], size, device=p.device)
            state["exp_avg"] = torch.zeros(low_shape, device=p.device)
            state["exp_avg_sq"] = torch.zeros(low_shape, device=p.device)
        step = int(state["step"].item())
        if step % group["update_gap"] == 0:  # a new state-full subspace; its moments restart
            gen = torch.Generator(device=p.device).manual_seed(group["seed"] * 1_000_003 + step)
            if columns:
                state["columns"].copy_(torch.randperm(p.shape[1], generator=gen, device=p.device)[:size].sort().values)
            else:
                state["projector"].copy_(projector(grad, size, side, "svd", gen))
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        state["step"] += 1
        sub_step = step % group["update_gap"] + 1  # Adam's bias correction counts from the re-choice
        beta1, beta2 = group["betas"]
        if columns:
            low = grad[:, state["columns"]]
            free = grad
        else:
            low = project(grad, state["projector"], side)
            free = grad - project_back(low, state["projector"], side)
        adamw_moments_(low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        direction = state["exp_avg"] / adam_denominator(state["exp_avg_sq"], beta2, group["eps"], sub_step)
        direction.mul_(group["lr"] / (1 - beta1**sub_step))
        update = free.sign() if group["state_free"] == "signsgd" else free.clone()
        update.mul_(group["lr"] * group["free_lr_ratio"])
        if columns:
            update[:, state["columns"]] = direction
        else:
            update.add_(project_back(direction, state["projector"], side))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(update.to(p.dtype))


def _check(options: dict) -> None:
    if not 0 < options["density"] <= 1:
        raise ValueError(f"density must be in (0, 1], got {options['density']}")
    if options["update_gap"] < 1:
        raise ValueError(f"update_gap must be at least 1, got {options['update_gap']}")
    if options["selection"] not in ("columns", "svd"):
        raise ValueError(f"selection must be columns or svd, got {options['selection']!r}")
    if options["state_free"] not in ("signsgd", "sgd"):
        raise ValueError(f"state_free must be signsgd or sgd, got {options['state_free']!r}")


def frugal_state_bytes(p: torch.Tensor, split: bool, density: float, selection: str) -> int:
    """One parameter's FrugalAdamW state in bytes, as allocated (``step`` 4 bytes; column indices int64)."""
    if not split:
        return state_bytes([p], "adamw")
    m, n = p.shape
    size = stateful_size(p, density, selection)
    if selection == "columns":
        return 4 * 2 * m * size + 8 * size + 4
    side = choose_side(p.shape, "auto")
    low = size * (n if side == "left" else m)
    return 4 * ((m if side == "left" else n) * size + 2 * low) + 4

"""GaLoreAdamW: AdamW whose 2-D gradients are projected onto a low-rank subspace (GaLore), optionally
preconditioned by the inverse empirical Fisher of recent projected gradients (Natural GaLore)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from memwise.optim import state_bytes

from memwise_galore.projection import choose_side, project, project_back, projector

GALORE_DEFAULTS = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="auto", proj_method="svd",
                       natural=False, history=8, damping=0.1, seed=0)
_TORCH_ONLY = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def adamw_moments_(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float) -> None:
    """torch.optim.AdamW's moment update, in place."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_denominator(v: torch.Tensor, beta2: float, eps: float, step: float) -> torch.Tensor:
    return (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)


def natural_gradient(low: torch.Tensor, history: torch.Tensor, count: int, damping: float) -> torch.Tensor:
    """lambda F^-1 g for F = lambda I + (1/c) sum_i g_i g_i^T over the last c projected gradients.

    Woodbury: F^-1 g = (g - A^T (c lambda I + A A^T)^-1 A g) / lambda with A (c x k) the history; the
    factor 1/lambda is dropped (Adam is invariant to the gradient's scale), so only a c x c system
    is solved. lambda is ``damping`` times the mean squared entry of the history.
    """
    a = history[:count].reshape(count, -1)
    g = low.reshape(-1)
    lam = damping * float(a.square().mean())
    if lam <= 0:
        return low
    system = a @ a.T + count * lam * torch.eye(count, dtype=a.dtype, device=a.device)
    coeff = torch.linalg.solve(system, a @ g)
    return (g - a.T @ coeff).view_as(low)


class GaLoreAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW, except that parameters in ``galore_params`` (2-D) keep Adam moments of their
    gradient projected on a rank-``rank`` subspace, refreshed every ``update_proj_gap`` steps from the
    gradient's SVD (or a randomized range finder); the update is mapped back and scaled by ``scale``.
    ``natural=True`` preconditions the projected gradient with the inverse empirical Fisher over the
    last ``history`` projected gradients (Natural GaLore). Other parameters get torch's AdamW update
    bit for bit. All options are per group and saved in the state dict.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, galore_params: Iterable[torch.Tensor] = (),
                 **options: Any) -> None:
        unknown = set(options) - set(GALORE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown GaLore option(s): {', '.join(sorted(unknown))}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **{**GALORE_DEFAULTS, **options})
        _check(defaults)
        super().__init__(params, defaults)
        self._subspace_ids = {id(p) for p in galore_params}
        for p in galore_params:
            if p.ndim != 2:
                raise ValueError(f"GaLore projects 2-D weights only, got a parameter of shape {tuple(p.shape)}")

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, galore_params: Iterable[torch.Tensor],
                   **options: Any) -> GaLoreAdamW:
        """The same param groups and hyper-parameters as a fresh torch AdamW."""
        if optimizer.state:
            raise ValueError("GaLoreAdamW replaces an AdamW before its first step (its moments are full-rank)")
        groups = [{k: v for k, v in g.items() if k not in _TORCH_ONLY} for g in optimizer.param_groups]
        return cls(groups, galore_params=galore_params, **options)

    def projects(self, p: torch.Tensor) -> bool:
        """Whether ``p`` has low-rank moments (decided by its state once it has one)."""
        state = self.state.get(p)
        return "projector" in state if state else id(p) in self._subspace_ids

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if self.projects(p):
                    self._subspace_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - group["lr"] * group["weight_decay"])
        adamw_moments_(p.grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        denom = adam_denominator(state["exp_avg_sq"], beta2, group["eps"], step)
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))

    def _subspace_step(self, p: torch.Tensor, group: dict) -> None:
        state, grad = self.state[p], p.grad.float()
        side = choose_side(p.shape, group["proj_type"])
        rank = min(group["rank"], *p.shape)
        if not state:
            low_shape = (rank, p.shape[1]) if side == "left" else (p.shape[0], rank)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["projector"] = torch.zeros(p.shape[0 if side == "left" else 1], rank, device=p.device)
            state["exp_avg"] = torch.zeros(low_shape, device=p.device)
            state["exp_avg_sq"] = torch.zeros(low_shape, device=p.device)
            if group["natural"]:
                state["history"] = torch.zeros(group["history"], *low_shape, device=p.device)
        beta1, beta2 = group["betas"]
        step = int(state["step"].item())
        if step % group["update_proj_gap"] == 0:
            gen = torch.Generator(device=p.device).manual_seed(group["seed"] * 1_000_003 + step)
            state["projector"].copy_(projector(grad, rank, side, group["proj_method"], gen))
        state["step"] += 1
        step += 1
        low = project(grad, state["projector"], side)
        if group["natural"]:
            history = state["history"]
            history[(step - 1) % len(history)].copy_(low)
            low = natural_gradient(low, history, min(step, len(history)), group["damping"])
        adamw_moments_(low, state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        denom = adam_denominator(state["exp_avg_sq"], beta2, group["eps"], step)
        direction = state["exp_avg"] / denom
        p.mul_(1 - group["lr"] * group["weight_decay"])
        update = project_back(direction, state["projector"], side).to(p.dtype)
        p.add_(update, alpha=-group["lr"] / (1 - beta1**step) * group["scale"])


def _check(options: dict) -> None:
    if options["rank"] < 1:
        raise ValueError(f"rank must be at least 1, got {options['rank']}")
    if options["update_proj_gap"] < 1:
        raise ValueError(f"update_proj_gap must be at least 1, got {options['update_proj_gap']}")
    if options["proj_type"] not in ("auto", "left", "right"):
        raise ValueError(f"proj_type must be auto, left or right, got {options['proj_type']!r}")
    if options["proj_method"] not in ("svd", "randomized"):
        raise ValueError(f"proj_method must be svd or randomized, got {options['proj_method']!r}")
    if options["history"] < 1:
        raise ValueError(f"history must be at least 1, got {options['history']}")


def galore_state_bytes(p: torch.Tensor, projected: bool, rank: int, proj_type: str, natural: bool,
                       history: int) -> int:
    """One parameter's GaLoreAdamW state in bytes, as allocated (fp32; ``step`` 4 bytes)."""
    if not projected:
        return state_bytes([p], "adamw")
    m, n = p.shape
    r = min(rank, m, n)
    side = choose_side(p.shape, proj_type)
    low = r * (n if side == "left" else m)
    proj = (m if side == "left" else n) * r
    return 4 * (proj + 2 * low + (history * low if natural else 0)) + 4

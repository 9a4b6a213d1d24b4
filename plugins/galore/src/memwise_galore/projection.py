"""Low-rank gradient projection (GaLore): which side to project, the projector, and the maps."""

from __future__ import annotations

from typing import Literal

import torch

Side = Literal["left", "right"]


def choose_side(shape: torch.Size, proj_type: str) -> Side:
    """GaLore's rule for ``auto``: a gradient m x n with m >= n is projected on the right (G P,
    m x r), otherwise on the left (P^T G, r x n); the projector then spans the shorter side."""
    if proj_type in ("left", "right"):
        return proj_type  # type: ignore[return-value]
    return "right" if shape[0] >= shape[1] else "left"


def projector(grad: torch.Tensor, rank: int, side: Side, method: str = "svd",
              generator: torch.Generator | None = None, power_iters: int = 2) -> torch.Tensor:
    """Orthonormal basis of the gradient's top-``rank`` singular subspace on ``side``.

    ``svd``: exact singular vectors. ``randomized``: a range finder (Halko et al.) with
    ``power_iters`` power iterations, drawing its test matrix from ``generator``.
    Left: m x r (left singular vectors); right: n x r (right singular vectors).
    """
    g = grad.float() if side == "left" else grad.float().T
    if method == "svd":
        u, _, _ = torch.linalg.svd(g, full_matrices=False)
        return u[:, :rank].contiguous()
    omega = torch.randn(g.shape[1], rank, generator=generator, dtype=g.dtype, device=g.device)
    q, _ = torch.linalg.qr(g @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(g @ (g.T @ q))
    return q.contiguous()


def project(grad: torch.Tensor, p: torch.Tensor, side: Side) -> torch.Tensor:
    """The low-rank gradient: P^T G (left, r x n) or G P (right, m x r)."""
    return p.T @ grad if side == "left" else grad @ p


def project_back(low: torch.Tensor, p: torch.Tensor, side: Side) -> torch.Tensor:
    """A low-rank update mapped back to the parameter's shape: P N (left) or N P^T (right)."""
    return p @ low if side == "left" else low @ p.T

"""Preconditioned conjugate gradients for symmetric positive (semi-)definite systems with many right-hand sides."""
from __future__ import annotations

from typing import Callable

import torch


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    precond: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Solve ``apply(x) = rhs`` column by column, all columns in one loop (a 4D series shares the operator).

    Parameters
    ----------
    apply : maps [N, C] -> [N, C], symmetric positive definite
    rhs : [N, C]
    precond : [N] diagonal (Jacobi) preconditioner, i.e. the inverse of the operator's diagonal
    tol : stop when every column's relative residual ``|r| / |rhs|`` is below this

    Returns
    -------
    x : [N, C]; info : dict with ``iterations`` and ``relative_residual`` (list per iteration, worst column)
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - apply(x) if x0 is not None else rhs.clone()
    z = precond[:, None] * r
    p = z.clone()
    rz = (r * z).sum(0)
    bnorm = rhs.norm(dim=0).clamp_min(1e-30)
    history: list[float] = []
    it = 0
    for it in range(1, max_iter + 1):
        ap = apply(p)
        alpha = rz / (p * ap).sum(0).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rel = float((r.norm(dim=0) / bnorm).max())
        history.append(rel)
        if rel < tol:
            break
        z = precond[:, None] * r
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    return x, {"iterations": it, "relative_residual": history}

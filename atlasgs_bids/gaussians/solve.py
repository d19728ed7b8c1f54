"""Preconditioned conjugate gradients for symmetric positive (semi-)definite systems with many right-hand sides."""
from __future__ import annotations

from typing import Callable

import torch


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    precond: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
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
    precond : [N] diagonal (Jacobi) preconditioner, i.e. the inverse of the operator's diagonal, or a callable
        applying a symmetric positive definite ``M^-1`` to [N, C] (e.g. :mod:`atlasgs_bids.gaussians.precondition`)
    tol : stop when every column's relative residual ``|r| / |rhs|`` is below this

    Returns
    -------
    x : [N, C]; info : dict with ``iterations`` and ``relative_residual`` (list per iteration, worst column)
    """
    # In place where possible: on the CPU the [N, C] temporaries, not the products, dominated an iteration.
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - apply(x) if x0 is not None else rhs.clone()
    if callable(precond):
        apply_m = precond
    else:
        def apply_m(res: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.mul(res, precond[:, None], out=out)
    z = apply_m(r)
    p = z.clone()
    rz = torch.linalg.vecdot(r, z, dim=0)
    bnorm = rhs.norm(dim=0).clamp_min(1e-30)
    history: list[float] = []
    it = 0
    for it in range(1, max_iter + 1):
        ap = apply(p)
        alpha = rz / torch.linalg.vecdot(p, ap, dim=0).clamp_min(1e-30)
        x.addcmul_(p, alpha[None, :])
        r.addcmul_(ap, alpha[None, :], value=-1.0)
        rel = float((r.norm(dim=0) / bnorm).max())
        history.append(rel)
        if rel < tol:
            break
        z = apply_m(r)
        rz_new = torch.linalg.vecdot(r, z, dim=0)
        p.mul_((rz_new / rz.clamp_min(1e-30))[None, :]).add_(z)
        rz = rz_new
    return x, {"iterations": it, "relative_residual": history}


def projected_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    precond: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Minimise ``1/2 x^T H x - rhs^T x`` over a convex set, column by column (``H = apply``, SPD).

    Scaled spectral projected gradient with an exact line search, the standard convergent method for a convex
    quadratic over a set with a cheap projection (Birgin, Martinez & Raydan 2000): from a feasible ``x``, the
    trial point ``z = project(x - alpha D g)`` (``D = diag(precond)``, ``g = H x - rhs``) gives a feasible descent
    direction ``d = z - x``; the step ``t`` in [0, 1] along ``d`` minimises the quadratic exactly, so the objective
    never increases and every iterate stays feasible (the set is convex). ``alpha`` is the Barzilai-Borwein step in
    the ``D^-1`` metric, ``d^T D^-1 d / d^T H d``. One ``apply`` per iteration, like CG.

    Parameters
    ----------
    apply : maps [N, C] -> [N, C], symmetric positive definite
    rhs : [N, C]
    precond : [N] positive diagonal scaling D (the Jacobi preconditioner)
    project : maps [N, C] onto the feasible set, nearest point in the ``D^-1``-weighted norm (the caller's
        projection must use the same metric for the step to be a descent direction)
    x0 : [N, C] start; projected first, so it need not be feasible (e.g. the unconstrained CG solution)
    tol : a column stops (for good) when its ``|d| / |x|`` (the projected-gradient step, a stationarity measure)
        is below; the loop ends when every column has

    Returns
    -------
    x : [N, C] feasible; info : ``iterations``, ``step`` (worst column's ``|d| / |x|`` per iteration) and
    ``objective_decrease`` (per column, from the projected start to the end; >= 0)
    """
    x = project(x0)
    hx = apply(x)
    g = hx - rhs
    f_start = (x * (0.5 * hx - rhs)).sum(0)
    alpha = torch.ones(rhs.shape[1], dtype=rhs.dtype, device=rhs.device)
    history: list[float] = []
    it = 0
    active = torch.ones(rhs.shape[1], dtype=torch.bool, device=rhs.device)
    for it in range(1, max_iter + 1):
        d = project(x - alpha * precond[:, None] * g) - x
        rel = d.norm(dim=0) / x.norm(dim=0).clamp_min(1e-30)
        history.append(float(rel.max()))
        # A column stops for good once stationary, so each column's iterates are those it would have alone.
        active &= rel >= tol
        if not bool(active.any()):
            break
        hd = apply(d)
        dhd = (d * hd).sum(0).clamp_min(1e-30)
        t = torch.where(active, (-(g * d).sum(0) / dhd).clamp(0.0, 1.0), torch.zeros_like(dhd))
        x = x + t * d
        g = g + t * hd
        alpha = ((d * d / precond[:, None]).sum(0) / dhd).clamp(1e-3, 1e3)
    f_end = (x * (0.5 * (g + rhs) - rhs)).sum(0)
    return x, {"iterations": it, "step": history, "objective_decrease": (f_start - f_end).tolist()}

"""Regularised linear least squares for per-Gaussian coefficients on a frozen geometry.

Solves, for every column (volume) of ``y``,

    min_v ||y - A (sum_k basis_k * v_k)||^2 + sum_k lam_k v_k^T L v_k + ridge ||v||^2

by preconditioned conjugate gradients on the normal equations: block Jacobi over each Gaussian's channels, plus a
coarse-grid correction when ``coarse`` is given (:mod:`atlasgs_bids.gaussians.precondition`). ``A`` [M, N] is a
sparse measurement operator, ``basis`` [N, nb] scales each Gaussian's coefficient in each of nb basis channels,
``L`` [N, N] a graph Laplacian (or none).

With ``free_gain``, some row blocks (stacks of a multi-stack fit) are measured up to an unknown gain each:
``g_b y_b ~ A_b c`` with ``g_b`` free per block and volume. The model stays linear in ``(c, g)``; eliminating
``g_b = <y_b, A_b c> / |y_b|^2`` (variable projection, Golub & Pereyra 1973) leaves
``||(I - P_b) A_b c||^2`` with ``P_b`` the projection on ``y_b``: a rank-one change of the normal operator per
block and volume, and no right-hand side from the block (its shape constrains ``c``, its scale does not). The
blocks whose gain is fixed (at least one, the reference) set the scale.

With ``bounds``, each Gaussian's amplitude ``c_i = sum_k basis_ik v_ik`` is constrained to ``[lower_i, upper_i]``
(per volume): CG gives the unconstrained minimiser, and a projected-gradient refinement
(:func:`~atlasgs_bids.gaussians.solve.projected_gradient`) moves it to the constrained minimiser of the same
objective. The feasible set is, per Gaussian, a slab in its nb channels, so the projection is closed form.
Because every Gaussian is non-negative everywhere, ``c >= 0`` makes the field itself non-negative everywhere.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from atlasgs_bids.gaussians.precondition import BlockJacobi, two_level
from atlasgs_bids.gaussians.solve import conjugate_gradient, projected_gradient
from atlasgs_bids.gaussians.sparse import SparseMatrix


def fit_coefficients(
    a_mat: SparseMatrix,
    y: torch.Tensor,
    basis: torch.Tensor,
    *,
    laplacian: SparseMatrix | None = None,
    lams: list[float] | None = None,
    ridge: float = 0.0,
    max_iter: int = 400,
    tol: float = 1e-4,
    v0: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    bound_iter: int = 100,
    bound_tol: float = 1e-4,
    coarse: tuple[np.ndarray, int] | None = None,
    extra_rhs: torch.Tensor | None = None,
    preconditioner=None,
    free_gain: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Per-Gaussian field amplitudes [N, V] that reproduce ``y`` [M, V] through ``a_mat`` ([M, N]).

    ``v0`` [N, nb, V] is an optional starting point (the minimiser does not depend on it, the iteration count does).
    ``bounds`` = (lower or None, upper or None), each [N] (every volume) or [N, V]: box on each amplitude ``c_i``
    (same units as ``c``); refined by at most ``bound_iter`` projected-gradient iterations (stop at ``bound_tol``).
    ``coarse`` = (means [N, 3] in T1w voxel coordinates, block side in voxels): add the two-level coarse-grid
    correction (:func:`~atlasgs_bids.gaussians.precondition.two_level`) to the Jacobi preconditioner of CG.
    ``extra_rhs`` [nb * N, V] (channel-major) is added to the normal equations' right-hand side ``B^T A^T y`` (the
    prior's perturbation of a posterior sample, :mod:`atlasgs_bids.gaussians.uncertainty`); ``preconditioner``: a
    previous solve's ``info["preconditioner"]`` on the same operator, reused instead of built (``coarse`` ignored).
    ``free_gain`` = row ranges ``(start, stop)`` of ``y`` whose gain is a free unknown (module docstring); the
    fitted gains ``g_b`` [n_blocks, V] are returned in the info as ``gains`` (1 = the block agrees with the rest).
    Returns the amplitudes ``c = sum_k basis_k * v_k`` and the solver's info (iterations, residual history; with
    bounds also ``bound_iterations``, ``bound_step`` history, and ``n_at_bound_cg`` the amplitudes outside the box
    after CG, worst volume, and ``preconditioner``, the ``M^-1`` CG used: an approximate ``H^-1``).
    """
    n, nb = basis.shape
    n_vol = y.shape[1]
    device = y.device
    lams = list(lams) if lams is not None else [0.0] * nb
    basis_t = basis.T.contiguous()  # [nb, N]

    # Unknowns are laid out channel-major [nb * N, V]: rows k * N .. (k + 1) * N - 1 are channel k, one column per
    # volume, so each channel's block is contiguous for the Laplacian's sparse product.
    def expand(v: torch.Tensor) -> torch.Tensor:
        vv = v.view(nb, n, n_vol)
        out = vv[0] * basis_t[0, :, None]
        for k in range(1, nb):
            out.addcmul_(vv[k], basis_t[k, :, None])
        return out

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        return (basis_t[:, :, None] * a_mat.rmatmul(r)[None]).reshape(-1, n_vol)

    # Free-gain blocks: unit directions u_b = y_b / |y_b| per volume (an all-zero block keeps its gain fixed).
    blocks = []
    for start, stop in free_gain or []:
        norm = y[start:stop].norm(dim=0)
        if bool((norm > 0).all()):
            blocks.append((start, stop, y[start:stop] / norm[None, :], norm))
    fixed = None  # rows whose gain is fixed (1) or free (0), when any is free
    if blocks:
        fixed = torch.ones(y.shape[0], 1, dtype=y.dtype, device=device)
        for start, stop, _, _ in blocks:
            fixed[start:stop] = 0.0

    def data_term(c: torch.Tensor) -> torch.Tensor:
        """``(I - sum_b P_b) A c``: the forward prediction, minus its component along each free block's data."""
        ac = a_mat.matmul(c)
        for start, stop, u, _ in blocks:
            ac[start:stop].addcmul_(u, torch.linalg.vecdot(u, ac[start:stop], dim=0)[None, :], value=-1.0)
        return ac

    def normal(v: torch.Tensor) -> torch.Tensor:
        out = adjoint(data_term(expand(v)))
        if ridge:
            out.add_(v, alpha=ridge)
        if laplacian is not None:
            vv, oo = v.view(nb, n, n_vol), out.view(nb, n, n_vol)
            for k in range(nb):
                if lams[k]:
                    oo[k].add_(laplacian.matmul(vv[k]), alpha=lams[k])
        return out

    col_sq = a_mat.column_sq_sums().to(device)
    reg_diag = torch.full((nb, n), float(ridge), device=device, dtype=y.dtype)
    if laplacian is not None:
        lam_col = torch.tensor(lams, device=device, dtype=y.dtype)[:, None]
        reg_diag = reg_diag + lam_col * laplacian.diagonal().to(device)[None, :]
    diag = basis_t**2 * col_sq[None, :] + reg_diag
    precond = 1.0 / diag.reshape(-1).clamp_min(1e-8)  # Jacobi: the scaling of the bounded refinement
    rhs = adjoint(y if fixed is None else y * fixed)  # a free-gain block adds no right-hand side
    if extra_rhs is not None:
        rhs.add_(extra_rhs.to(device))
    x0 = None if v0 is None else v0.permute(1, 0, 2).reshape(-1, n_vol).contiguous()
    m_inv = preconditioner if preconditioner is not None else (
        precond if nb == 1 else BlockJacobi.build(basis, col_sq, reg_diag))
    coarse_info = None
    if coarse is not None and preconditioner is None:
        smoother = m_inv if nb > 1 else BlockJacobi.build(basis, col_sq, reg_diag)
        two = two_level(a_mat, basis, laplacian, lams, smoother, coarse[0], block=int(coarse[1]), ridge=ridge)
        m_inv, coarse_info = two, {"block": int(coarse[1]), "n_coarse": two.n_coarse * nb, "seconds": two.seconds,
                                  "factor_nnz": int(two.lu.L.nnz + two.lu.U.nnz)}
    v, info = conjugate_gradient(normal, rhs, m_inv, x0=x0, max_iter=max_iter, tol=tol)
    info["coarse"] = coarse_info
    info["preconditioner"] = m_inv  # an approximate inverse of H: the posterior's read-out (gaussians.uncertainty)

    def gains(c: torch.Tensor) -> list[list[float]]:
        if not blocks:
            return []
        ac = a_mat.matmul(c)
        return [(torch.linalg.vecdot(u, ac[start:stop], dim=0) / norm).tolist() for start, stop, u, norm in blocks]

    if bounds is not None and (bounds[0] is not None or bounds[1] is not None):
        c = expand(v)
        lower, upper = (None if b is None else (b[:, None] if b.dim() == 1 else b).to(device) for b in bounds)
        outside = torch.zeros_like(c, dtype=torch.bool)
        if lower is not None:
            outside |= c < lower
        if upper is not None:
            outside |= c > upper
        info["n_at_bound_cg"] = int(outside.sum(0).max())
        project = _slab_projection(basis_t, precond.view(nb, n), lower, upper, n_vol)
        v, pg = projected_gradient(normal, rhs, precond, project, v, max_iter=bound_iter, tol=bound_tol)
        info["bound_iterations"] = pg["iterations"]
        info["bound_step"] = pg["step"]
        # The iterate is feasible in exact arithmetic; float32 rounding of sum_k basis_k v_k can leave an amplitude
        # a few ulp outside (measured: -5e-8 after inversion on the demo), so snap those to the bound.
        c = expand(v)
        snapped = c.clamp(min=lower, max=upper)
        info["bound_rounding"] = float((snapped - c).abs().max())
        info["gains"] = gains(snapped)
        return snapped, info
    c = expand(v)
    info["gains"] = gains(c)
    return c, info


def _slab_projection(basis_t: torch.Tensor, scale: torch.Tensor, lower: torch.Tensor | None,
                     upper: torch.Tensor | None, n_vol: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projection onto ``lower_i <= sum_k basis_ki v_ki <= upper_i`` in the norm weighted by ``1 / scale``.

    ``basis_t``, ``scale`` [nb, N]; ``lower``, ``upper`` [N, V] or None; unknowns laid out channel-major
    [nb * N, V]. For one Gaussian the set is a slab with normal ``w = basis_i``; the nearest point of ``z`` in the
    ``diag(scale)^-1`` metric is ``z - (w.z - clamp(w.z)) / (w^T S w) * S w``.
    """
    nb, n = basis_t.shape
    sw = scale * basis_t  # [nb, N]
    wsw = (basis_t * sw).sum(0).clamp_min(1e-30)  # [N]
    lo, hi = lower, upper

    def project(v: torch.Tensor) -> torch.Tensor:
        vv = v.view(nb, n, n_vol)
        t = (basis_t[:, :, None] * vv).sum(0)  # [N, V]
        excess = t - t.clamp(min=lo, max=hi)
        return (vv - (excess / wsw[:, None])[None, :, :] * sw[:, :, None]).reshape(-1, n_vol)

    return project

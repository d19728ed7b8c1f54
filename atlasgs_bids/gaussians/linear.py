"""Regularised linear least squares for per-Gaussian coefficients on a frozen geometry.

Solves, for every column (volume) of ``y``,

    min_v ||y - A (sum_k basis_k * v_k)||^2 + sum_k lam_k v_k^T L v_k + ridge ||v||^2

by Jacobi-preconditioned conjugate gradients on the normal equations. ``A`` [M, N] is a sparse measurement
operator, ``basis`` [N, nb] scales each Gaussian's coefficient in each of nb basis channels, ``L`` [N, N] a graph
Laplacian (or none).
"""
from __future__ import annotations

import torch

from atlasgs_bids.gaussians.solve import conjugate_gradient
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
) -> tuple[torch.Tensor, dict]:
    """Per-Gaussian field amplitudes [N, V] that reproduce ``y`` [M, V] through ``a_mat`` ([M, N]).

    ``v0`` [N, nb, V] is an optional starting point (the minimiser does not depend on it, the iteration count does).
    Returns the amplitudes ``c = sum_k basis_k * v_k`` and the solver's info (iterations, residual history).
    """
    n, nb = basis.shape
    n_vol = y.shape[1]
    device = y.device
    lam_t = torch.tensor(lams if lams is not None else [0.0] * nb, device=device, dtype=y.dtype)

    # Unknowns are laid out [N * nb, V]: row i * nb + k is channel k of Gaussian i; one column per volume.
    def expand(v: torch.Tensor) -> torch.Tensor:
        return (basis[:, :, None] * v.view(n, nb, n_vol)).sum(1)

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        return (basis[:, :, None] * a_mat.rmatmul(r)[:, None, :]).reshape(-1, n_vol)

    def normal(v: torch.Tensor) -> torch.Tensor:
        out = adjoint(a_mat.matmul(expand(v))) + ridge * v
        if laplacian is not None:
            reg = lam_t[None, :, None] * laplacian.matmul(v.reshape(n, nb * n_vol)).view(n, nb, n_vol)
            out = out + reg.reshape(-1, n_vol)
        return out

    col_sq = a_mat.column_sq_sums().to(device)
    diag = basis**2 * col_sq[:, None] + ridge
    if laplacian is not None:
        diag = diag + lam_t[None, :] * laplacian.diagonal().to(device)[:, None]
    v, info = conjugate_gradient(
        normal,
        adjoint(y),
        1.0 / diag.reshape(-1).clamp_min(1e-8),
        x0=None if v0 is None else v0.reshape(-1, n_vol),
        max_iter=max_iter,
        tol=tol,
    )
    return expand(v), info

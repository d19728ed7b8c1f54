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


def _sparse_diag(mat: torch.Tensor) -> torch.Tensor:
    coo = mat.to_sparse_coo().coalesce()
    on = coo.indices()[0] == coo.indices()[1]
    return torch.zeros(mat.shape[0], device=mat.device, dtype=coo.values().dtype).index_add_(
        0, coo.indices()[0][on], coo.values()[on]
    )


def fit_coefficients(
    a_mat: torch.Tensor,
    y: torch.Tensor,
    basis: torch.Tensor,
    *,
    laplacian: torch.Tensor | None = None,
    lams: list[float] | None = None,
    ridge: float = 0.0,
    max_iter: int = 400,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Per-Gaussian field amplitudes [N, V] that reproduce ``y`` [M, V] through ``a_mat`` (CSR [M, N]).

    Returns the amplitudes ``c = sum_k basis_k * v_k`` and the solver's info (iterations, residual history).
    """
    n, nb = basis.shape
    n_vol = y.shape[1]
    device = y.device
    a_t = a_mat.to_sparse_coo().t().coalesce().to_sparse_csr()
    lam_t = torch.tensor(lams if lams is not None else [0.0] * nb, device=device, dtype=y.dtype)

    # Unknowns are laid out [N * nb, V]: row i * nb + k is channel k of Gaussian i; one column per volume.
    def expand(v: torch.Tensor) -> torch.Tensor:
        return (basis[:, :, None] * v.view(n, nb, n_vol)).sum(1)

    def adjoint(r: torch.Tensor) -> torch.Tensor:
        return (basis[:, :, None] * (a_t @ r)[:, None, :]).reshape(-1, n_vol)

    def normal(v: torch.Tensor) -> torch.Tensor:
        out = adjoint(a_mat @ expand(v)) + ridge * v
        if laplacian is not None:
            reg = lam_t[None, :, None] * (laplacian @ v.view(n, nb * n_vol)).view(n, nb, n_vol)
            out = out + reg.reshape(-1, n_vol)
        return out

    col_sq = torch.zeros(n, device=device, dtype=y.dtype).index_add_(0, a_mat.col_indices(), a_mat.values() ** 2)
    diag = basis**2 * col_sq[:, None] + ridge
    if laplacian is not None:
        diag = diag + lam_t[None, :] * _sparse_diag(laplacian)[:, None]
    v, info = conjugate_gradient(
        normal, adjoint(y), 1.0 / diag.reshape(-1).clamp_min(1e-8), max_iter=max_iter, tol=tol
    )
    return expand(v), info

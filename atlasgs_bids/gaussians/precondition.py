"""A two-level preconditioner for the stage-2 normal equations: Jacobi plus a coarse-grid correction.

Jacobi-preconditioned CG on ``H = B^T A^T A B + Lambda L`` (thick slices, a weak edge-aware Laplacian) converges
slowly in the smooth directions: the Laplacian couples each Gaussian only to its neighbours, so information crosses
the brain one neighbour per iteration, and 400 iterations did not reach a relative residual of 1e-5 at x5. The
coarse space fixes that: Gaussians are grouped into blocks of ``block`` x ``block`` x ``block`` T1w voxels
(aggregates), ``P`` maps one value per aggregate and channel to its Gaussians (piecewise constant), and

    M^-1 r = J^-1 r + P (P^T H P)^-1 P^T r

(additive two-level Schwarz; Toselli & Widlund 2005, ch. 2), ``J`` the block-Jacobi part
(:class:`BlockJacobi`). ``P^T H P`` is assembled exactly from the sparse
operator (``A B P`` is a sparse product) and factorised once by sparse LU; each iteration then costs one
restriction, one triangular solve pair on the coarse system and one prolongation. ``M`` is symmetric positive
definite, so plain CG stays valid. CPU only (scipy's SuperLU); on CUDA the coarse system is solved on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import splu

from atlasgs_bids.gaussians.sparse import SparseMatrix


@dataclass
class BlockJacobi:
    """``M^-1`` that inverts, for every Gaussian, the nb x nb block of ``H`` that couples its channels.

    A Gaussian's channels feed one amplitude (``c_i = sum_k basis_ik v_ik``), so the data term's block is the rank-one
    ``colsq_i basis_i basis_i^T``, made definite by the channels' Laplacian diagonals: plain Jacobi ignores that
    coupling. blocks_inv : [N, nb, nb]; unknowns channel-major [nb * N, V].
    """

    blocks_inv: torch.Tensor

    @classmethod
    def build(cls, basis: torch.Tensor, col_sq: torch.Tensor, reg_diag: torch.Tensor) -> "BlockJacobi":
        """``basis`` [N, nb]; ``col_sq`` [N] the diagonal of ``A^T A``; ``reg_diag`` [nb, N] the diagonal of the
        regulariser (lambda_k L_ii + ridge) per channel."""
        blocks = col_sq[:, None, None] * basis[:, :, None] * basis[:, None, :]
        blocks = (blocks + torch.diag_embed(reg_diag.T)).double()
        # Inverse by eigen-decomposition with the eigenvalues floored at 1e-6 of the block's largest: a Gaussian
        # whose channels only the data see (no Laplacian edge, no ridge) has a singular block, and its inverse must
        # stay bounded for CG's float32 arithmetic.
        w, v = torch.linalg.eigh(blocks)
        w = torch.maximum(w, 1e-6 * w[:, -1:].clamp_min(1e-30))
        inv = (v / w[:, None, :]) @ v.transpose(1, 2)
        return cls(inv.to(basis.dtype))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        n, nb, _ = self.blocks_inv.shape
        if nb == 2:  # elementwise: a batched 2 x 2 matmul is several times slower on the CPU
            inv = self.blocks_inv
            r0, r1 = r[:n], r[n:]
            out = torch.empty_like(r)
            torch.mul(r0, inv[:, 0, 0, None], out=out[:n]).addcmul_(r1, inv[:, 0, 1, None])
            torch.mul(r0, inv[:, 1, 0, None], out=out[n:]).addcmul_(r1, inv[:, 1, 1, None])
            return out
        rr = r.view(nb, n, -1).permute(1, 0, 2)  # [N, nb, V]
        return torch.bmm(self.blocks_inv, rr).permute(1, 0, 2).reshape(r.shape)


@dataclass
class TwoLevel:
    """``M^-1`` for unknowns laid out channel-major [nb * N, V] (see :mod:`atlasgs_bids.gaussians.linear`).

    smoother : the one-level part (:class:`BlockJacobi`)
    restrict, prolong : ``P^T`` [nb * n_coarse, nb * N] and ``P`` (piecewise constant over the aggregates)
    n_coarse : aggregates per channel
    lu : the factorised coarse system
    seconds : time to assemble and factorise the coarse system
    """

    smoother: BlockJacobi
    restrict: sp.csr_matrix
    prolong: sp.csr_matrix
    n_coarse: int
    lu: object
    seconds: float = 0.0

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        coarse = self.restrict @ r.detach().cpu().numpy().astype(np.float64)  # P^T r, [nb * n_coarse, V]
        fine = self.prolong @ self.lu.solve(coarse)  # P (P^T H P)^-1 P^T r, [nb * N, V]
        out = self.smoother(r)
        return out.add_(torch.as_tensor(fine, dtype=r.dtype, device=r.device))


def aggregates(means_vox: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """Aggregate id [N] of each Gaussian from its position in T1w voxel units: the ``block``-voxel cube it lies in."""
    cells = np.floor(np.asarray(means_vox, dtype=np.float64) / float(block)).astype(np.int64)
    if not len(cells):
        return np.zeros(0, dtype=np.int64), 0
    cells -= cells.min(0)
    dims = cells.max(0) + 1
    _, inverse = np.unique((cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2], return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


def two_level(a_mat: SparseMatrix, basis: torch.Tensor, laplacian: SparseMatrix | None, lams: list[float],
              smoother: BlockJacobi, means_vox: np.ndarray, *, block: int = 6, ridge: float = 0.0) -> TwoLevel:
    """Assemble and factorise the coarse system ``P^T H P`` of the stage-2 normal operator.

    Parameters
    ----------
    a_mat : the measurement operator [M, N]; basis : [N, nb] the channels' scaling of each Gaussian
    laplacian : [N, N] graph Laplacian (or None), weighted by ``lams`` per channel
    smoother : the one-level part
    means_vox : [N, 3] Gaussian means in T1w voxel coordinates (defines the aggregates)
    block : aggregate side in T1w voxels
    """
    import time

    t0 = time.perf_counter()
    n, nb = basis.shape
    agg, nc = aggregates(means_vox, block)
    # The products in float32 (the operator's own precision; a float64 copy of A would double the peak memory),
    # the coarse system in float64 for the factorisation.
    b = basis.detach().cpu().float().numpy()
    a = a_mat.to_scipy()
    rows = np.arange(n)
    # One pass over A for every channel: P_B = [diag(b_0) P_0 | diag(b_1) P_0 | ...] has nb entries per row.
    p_b = sp.csr_matrix((b.reshape(-1), (np.repeat(rows, nb), (agg[:, None] + nc * np.arange(nb)[None, :]).reshape(-1))),
                        shape=(n, nb * nc))
    g = (a @ p_b).tocsr()
    coarse = (g.T @ g).tocsr().astype(np.float64)
    del g
    p0 = sp.csr_matrix((np.ones(n, dtype=np.float32), (rows, agg)), shape=(n, nc))
    # The Laplacian's Galerkin product once for every channel, in float32 (a float64 copy of a 26-neighbour
    # Laplacian at 1 mm is 0.7 GB); the small coarse matrix is then float64.
    lap_c = None if laplacian is None else (p0.T @ laplacian.to_scipy() @ p0).astype(np.float64)
    extra = []
    for k in range(nb):
        part = sp.csr_matrix((nc, nc))
        if lap_c is not None and lams[k]:
            part = part + lams[k] * lap_c
        if ridge:
            part = part + ridge * (p0.T @ p0).astype(np.float64)
        extra.append(part)
    coarse = coarse + sp.block_diag(extra, format="csr")
    # A tiny shift keeps an aggregate that no measurement and no Laplacian edge reaches from making it singular.
    scale = float(np.abs(coarse.diagonal()).mean()) if coarse.shape[0] else 1.0
    coarse = coarse + sp.identity(coarse.shape[0]) * (1e-9 * scale)
    lu = splu(coarse.tocsc(), permc_spec="MMD_AT_PLUS_A")
    prolong = sp.block_diag([p0] * nb, format="csr")
    return TwoLevel(smoother=smoother, restrict=prolong.T.tocsr(), prolong=prolong, n_coarse=nc, lu=lu,
                    seconds=time.perf_counter() - t0)

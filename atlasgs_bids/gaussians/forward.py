"""The forward model of a target: which T1w-world points its voxels sit at and through which PSF they look.

Frames: a target voxel index (i, j, k) goes to the target's own world by ``acquisition.affine`` and then to the T1w
world (mm RAS) by ``target2t1w``; both are 4x4 homogeneous matrices. The PSF covariance in T1w world is
``P = A diag(sigma_vox^2) A^T`` with ``A`` the 3x3 part of ``target2t1w @ affine`` and ``sigma_vox = FWHM_vox / 2.3548``.
Because the PSF is the same for every voxel of an affine image, one blurred copy of the Gaussians serves them all.
"""
from __future__ import annotations

import numpy as np
import torch

from atlasgs_bids.gaussians.field import CUTOFF, MAX_PAIRS, blur, measure_pairs
from atlasgs_bids.gaussians.spatial_hash import build_hash
from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition


def psf_covariance(vox2world: np.ndarray, fwhm_vox) -> np.ndarray:
    """PSF covariance (3, 3) in world mm^2 of a voxel with the given FWHM (voxel units) along its axes."""
    a = np.asarray(vox2world, dtype=np.float64)[:3, :3]
    sig = np.asarray(fwhm_vox, dtype=np.float64) * FWHM_TO_SIGMA
    return (a * sig**2) @ a.T


def voxel_centres(vox2world: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World coordinates [M, 3] of voxel indices ``ijk`` [M, 3] under a (4, 4) voxel-to-world affine."""
    aff = np.asarray(vox2world, dtype=np.float64)
    return np.asarray(ijk, dtype=np.float64) @ aff[:3, :3].T + aff[:3, 3]


def target_vox2t1w(acquisition: Acquisition, target2t1w: np.ndarray) -> np.ndarray:
    """(4, 4) map from target voxel index to T1w world mm RAS."""
    return np.asarray(target2t1w, dtype=np.float64) @ acquisition.affine


def measurement_matrix(
    means: torch.Tensor,
    covs: torch.Tensor,
    vox2world: np.ndarray,
    ijk: np.ndarray,
    acquisition: Acquisition,
    *,
    cutoff: float = CUTOFF,
    max_pairs: int = MAX_PAIRS,
) -> SparseMatrix:
    """The sparse operator A [M, N] with ``y = A a``: voxels ``ijk`` measured through the acquisition's PSF.

    Parameters
    ----------
    means : [N, 3] T1w world mm RAS; covs : [N, 3, 3] mm^2 (frozen geometry: no gradient is kept)
    vox2world : (4, 4) target voxel index -> T1w world mm RAS
    ijk : [M, 3] voxel indices of the measured voxels
    acquisition : slice profile (Gaussian, or box by K Gaussian sub-slices)

    Returns
    -------
    :class:`~atlasgs_bids.gaussians.sparse.SparseMatrix` [M, N], float32, on the device of ``means``.
    """
    device = means.device
    offsets, weights, fwhm = acquisition.sub_slices()
    axis_dir = np.asarray(vox2world, dtype=np.float64)[:3, acquisition.slice_axis]
    base = voxel_centres(vox2world, ijk)
    psf = torch.as_tensor(psf_covariance(vox2world, fwhm), dtype=covs.dtype, device=device)
    with torch.no_grad():
        blurred = blur(covs, psf, cutoff)
        grid = build_hash(means, blurred.half_extent)
        rows, cols, vals = [], [], []
        for off, w in zip(offsets, weights):
            pts = torch.as_tensor(base + off * axis_dir, dtype=means.dtype, device=device)
            for start, pt, g, v in measure_pairs(pts, means, blurred, cutoff=cutoff, grid=grid, max_pairs=max_pairs):
                rows.append(start + pt)
                cols.append(g)
                vals.append(v * float(w))
    m, n = ijk.shape[0], means.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return SparseMatrix(
        torch.cat(rows) if rows else empty,
        torch.cat(cols) if cols else empty,
        torch.cat(vals) if vals else torch.zeros(0, device=device),
        (m, n),
        device,
    )

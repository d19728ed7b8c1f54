"""The forward model of a target: which T1w-world points its voxels sit at and through which PSF they look.

Frames: a target voxel index (i, j, k) goes to the target's own world by ``acquisition.affine`` and then to the T1w
world (mm RAS) by ``target2t1w``; both are 4x4 homogeneous matrices. The PSF covariance in T1w world is
``P = A diag(sigma_vox^2) A^T`` with ``A`` the 3x3 part of ``target2t1w @ affine`` and ``sigma_vox = FWHM_vox / 2.3548``.
Because the PSF is the same for every voxel of an affine image, one blurred copy of the Gaussians serves them all.
"""
from __future__ import annotations

import numpy as np
import torch
from nibabel.affines import apply_affine

from atlasgs_bids.gaussians import lattice as lattice_mod
from atlasgs_bids.gaussians.field import CUTOFF, MAX_PAIRS, blur, measure, measure_pairs
from atlasgs_bids.gaussians.spatial_hash import build_hash
from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition


def psf_covariance(vox2world: np.ndarray, fwhm_vox) -> np.ndarray:
    """PSF covariance (3, 3) in world mm^2 of a voxel with the given FWHM (voxel units) along its axes."""
    a = np.asarray(vox2world, dtype=np.float64)[:3, :3]
    sig = np.asarray(fwhm_vox, dtype=np.float64) * FWHM_TO_SIGMA
    return (a * sig**2) @ a.T


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
    base = apply_affine(vox2world, ijk)
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


def scaffold_lattice(scaffold, device: str | torch.device = "cpu") -> "lattice_mod.Lattice | None":
    """The scaffold's :class:`~atlasgs_bids.gaussians.lattice.Lattice` on ``device`` (None when it is not one),
    computed once per scaffold object."""
    device = torch.device(device)
    return scaffold.cached(f"lattice:{device}", lambda: lattice_mod.as_lattice(scaffold, device=device))


def _acquisition_kernels(lat: "lattice_mod.Lattice", vox2t1w: np.ndarray,
                         acquisition: Acquisition) -> list["lattice_mod.Kernel"]:
    offsets, weights, fwhm = acquisition.sub_slices()
    axis_dir = np.asarray(vox2t1w, dtype=np.float64)[:3, acquisition.slice_axis]
    psf = psf_covariance(vox2t1w, fwhm)
    return lattice_mod.kernels(lat, [psf] * len(offsets), [o * axis_dir for o in offsets], list(weights))


def scaffold_operator(scaffold, vox2t1w: np.ndarray, ijk: np.ndarray, acquisition: Acquisition, *,
                      device: str | torch.device = "cpu") -> SparseMatrix:
    """The measurement operator [M, N] of target voxels ``ijk`` for a scaffold: the lattice's direct evaluation
    when the scaffold is a lattice, else the pairwise one (:func:`measurement_matrix`). Same values either way.

    ``vox2t1w``: (4, 4) target voxel index -> T1w world mm RAS; ``scaffold`` is used on ``device``.
    """
    lat = scaffold_lattice(scaffold, device)
    if lat is None:
        sc = scaffold.to(device)
        return measurement_matrix(sc.means, sc.covs(), vox2t1w, ijk, acquisition)
    pts = lat.grid.to_voxels(apply_affine(vox2t1w, ijk))
    return lattice_mod.operator(lat, pts, _acquisition_kernels(lat, vox2t1w, acquisition))


def scaffold_measure(scaffold, points: np.ndarray, psf_cov: np.ndarray | None, amplitudes: torch.Tensor) -> torch.Tensor:
    """Measure the scaffold's field with ``amplitudes`` [N, C] at ``points`` [M, 3] (T1w world mm RAS) through
    the Gaussian PSF ``psf_cov`` (3, 3) mm^2 (None: sample it): [M, C] on the amplitudes' device, no gradient."""
    device = amplitudes.device
    lat = scaffold_lattice(scaffold, device)
    with torch.no_grad():
        if lat is not None:
            psf = np.zeros((3, 3)) if psf_cov is None else np.asarray(psf_cov, dtype=np.float64)
            return lattice_mod.apply(lat, lat.grid.to_voxels(points), lattice_mod.kernels(lat, [psf]), amplitudes)
        sc = scaffold.to(device)
        psf_t = None if psf_cov is None else torch.as_tensor(psf_cov, dtype=torch.float32, device=device)
        pts = torch.as_tensor(points, dtype=torch.float32, device=device)
        return measure(pts, sc.means, sc.covs(), amplitudes, psf_cov=psf_t)

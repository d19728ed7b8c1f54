"""Render a fitted appearance on any voxel grid: each output voxel measures the field through its own PSF."""
from __future__ import annotations

import numpy as np
import torch
from nibabel.affines import apply_affine

from atlasgs_bids.gaussians.appearance import Appearance
from atlasgs_bids.gaussians.forward import psf_covariance, scaffold_measure
from atlasgs_bids.imaging.grid import Grid


def _default_mask(appearance: Appearance, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The scaffold's brain mask when rendering on its own grid, else every voxel of the grid."""
    sc = appearance.scaffold
    if tuple(shape) == tuple(sc.mask.shape) and np.allclose(affine, sc.t1w_affine, atol=1e-4):
        return sc.mask
    return np.ones(shape, dtype=bool)


def render(
    appearance: Appearance,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    *,
    fwhm_vox: tuple[float, float, float] = (1.0, 1.0, 1.0),
    device: str | torch.device = "cpu",
    mask: np.ndarray | None = None,
    chunk_voxels: int = 400_000,
    within_target: bool = True,
) -> np.ndarray:
    """Evaluate the fitted field on a grid.

    Parameters
    ----------
    appearance : stage-2 result
    affine : (4, 4) output voxel index -> T1w world mm RAS
    shape : (I, J, K) output grid
    fwhm_vox : PSF FWHM of an output voxel along its axes, voxel units (1 = the voxel itself)
    mask : (I, J, K) bool, voxels to render (others are 0); the scaffold's brain mask on its own grid by default
    within_target : also leave 0 the voxels outside the target's field of view (its slab of slices), where no
        measurement constrains the field

    Returns
    -------
    float32 array (I, J, K), or (I, J, K, V) for a series, in the target's own units, at most the appearance's
    ``intensity_cap`` (per volume) when it has one.
    """
    device = torch.device(device)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    sel = _default_mask(appearance, affine, shape) if mask is None else np.asarray(mask, dtype=bool)
    if sel.shape != shape:
        raise ValueError(f"render mask shape {sel.shape} differs from the grid shape {shape}")
    coeffs = appearance.coeffs.to(device)
    psf = psf_covariance(affine, fwhm_vox)
    if within_target:
        sel = sel & appearance.field_of_view(Grid(affine, shape))
    ijk = np.argwhere(sel)
    out = np.zeros((len(ijk), coeffs.shape[1]), dtype=np.float32)
    for start in range(0, len(ijk), chunk_voxels):
        pts = apply_affine(affine, ijk[start : start + chunk_voxels])
        out[start : start + len(pts)] = scaffold_measure(appearance.scaffold, pts, psf, coeffs).cpu().numpy()
    vol = np.zeros(shape + (coeffs.shape[1],), dtype=np.float32)
    vals = appearance.intensity.invert(out)
    if appearance.intensity_cap is not None:
        # The bound on each Gaussian's intensity holds for the field only up to the overlap normaliser, which a
        # Gaussian with fewer neighbours (the mask's edge) exceeds by ~10-25 %: the output keeps the same cap.
        vals = np.minimum(vals, np.asarray(appearance.intensity_cap, dtype=np.float32)[None, :])
    vol[tuple(ijk.T)] = vals
    return vol[..., 0] if coeffs.shape[1] == 1 else vol

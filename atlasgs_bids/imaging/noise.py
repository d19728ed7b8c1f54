"""Noise level of an image estimated from the image itself (no background, no repeat scan needed).

Both estimators take a high-pass residual whose expectation is zero where the signal is locally smooth (linear),
so that in smooth tissue the residual is noise only, and take a robust scale of it (the median absolute value,
x 1.4826 for a Gaussian): edges and vessels, where the residual is large for reasons other than noise, are a
minority of voxels and move the median little.

- :func:`noise_sigma_inplane`: Immerkaer's (1996) 3x3 kernel ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (zero response to
  any plane, L2 norm 6) applied within each slice of a thick-slice image. In plane only, because neighbouring
  thick slices are too far apart (and too differently blurred) to cancel the signal.
- :func:`graph_noise_sigma`: the residual of each value against the mean of its ``k`` nearest neighbours on a point
  set (the Gaussians of a scaffold; on the default lattice scaffold the T1w voxels and their 6 face neighbours).

Magnitude MRI noise is Rician; above an SNR of about 3 (any brain tissue) it is close to Gaussian with the same
sigma, which is what these estimators assume. Units: those of the input values.
"""
from __future__ import annotations

import numpy as np

#: Median absolute value of a zero-mean Gaussian is 0.6745 sigma.
MAD_TO_SIGMA = 1.4826


def noise_sigma_inplane(vol: np.ndarray, mask: np.ndarray, slice_axis: int) -> float:
    """Noise SD of a (thick-slice) image from its in-plane high-pass residual inside ``mask``.

    Parameters
    ----------
    vol : (I, J, K) image, any units
    mask : (I, J, K) bool, voxels that may be used (e.g. the brain); only voxels whose whole 3x3 in-plane
        neighbourhood is in the mask are scored
    slice_axis : voxel axis across slices (the kernel acts on the other two)

    Returns
    -------
    The noise standard deviation in ``vol``'s units (nan when fewer than 100 voxels can be scored).
    """
    from scipy.ndimage import binary_erosion, convolve

    vol = np.asarray(vol, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if vol.shape != mask.shape or vol.ndim != 3:
        raise ValueError(f"vol and mask must be 3D of one shape, got {vol.shape} and {mask.shape}")
    k2 = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    kernel = np.expand_dims(k2, axis=slice_axis)
    resid = convolve(vol, kernel, mode="nearest") / 6.0
    footprint = np.expand_dims(np.ones((3, 3), dtype=bool), axis=slice_axis)
    inner = binary_erosion(mask, structure=footprint)
    values = resid[inner]
    if values.size < 100:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(values)))


def graph_noise_sigma(values: np.ndarray, neighbours: np.ndarray) -> float:
    """Noise SD of values on a point set from the residual against the mean of each point's neighbours.

    Parameters
    ----------
    values : [N] the value at each point (e.g. a scaffold's normalised T1w per Gaussian)
    neighbours : [N, k] int, indices of each point's k nearest neighbours (itself excluded)

    Returns
    -------
    The noise SD in ``values``' units: ``1.4826 median|v_i - mean_j v_j| / sqrt(1 + 1/k)`` (the residual of
    independent noise of SD sigma has SD ``sigma sqrt(1 + 1/k)``).
    """
    values = np.asarray(values, dtype=np.float64)
    nb = np.asarray(neighbours)
    if nb.ndim != 2 or nb.shape[0] != values.shape[0] or nb.shape[1] < 1:
        raise ValueError(f"neighbours must be [N, k] with N = {values.shape[0]}, got {nb.shape}")
    resid = values - values[nb].mean(axis=1)
    return float(MAD_TO_SIGMA * np.median(np.abs(resid)) / np.sqrt(1.0 + 1.0 / nb.shape[1]))

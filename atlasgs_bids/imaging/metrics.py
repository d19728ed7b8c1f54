"""Image similarity inside a mask: PSNR, MAE, 3D SSIM and normalised cross-correlation.

All functions take arrays on the same voxel grid (no resampling here) and a mask of the voxels to score. The
data range for PSNR and SSIM is ``max - min`` of the *reference* inside the mask, so scores do not depend on
what lies outside the brain. Computations are in float64; every function returns a Python float.
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

#: SSIM constants (Wang et al. 2004): C1 = (K1 R)^2, C2 = (K2 R)^2 with R the data range.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: Gaussian window of the SSIM statistics, in voxels (scikit-image cuts it at 3.5 sigma).
SSIM_SIGMA = 1.5


def _prepare(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and return float64 arrays and a bool mask broadcastable to them (4D series share a 3D mask)."""
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    if mask is None:
        mask = np.ones(ref.shape[:3], dtype=bool)
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape == ref.shape:
        full = mask
    elif ref.ndim == 4 and mask.shape == ref.shape[:3]:
        full = np.broadcast_to(mask[..., None], ref.shape)
    else:
        raise ValueError(f"shape mismatch: mask {mask.shape} vs images {ref.shape}")
    if not full.any():
        raise ValueError("the mask is empty")
    return pred, ref, full


def data_range(ref: np.ndarray, mask: np.ndarray | None) -> float:
    """``max - min`` of ``ref`` inside ``mask`` (the R of PSNR and SSIM)."""
    _, ref, full = _prepare(ref, ref, mask)
    values = ref[full]
    return float(values.max() - values.min())


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> float:
    """Peak signal-to-noise ratio in dB inside ``mask``: ``10 log10(R^2 / MSE)``.

    Parameters
    ----------
    pred, ref : array, shape (I, J, K) or (I, J, K, V)
        Prediction and reference on the same grid, same units.
    mask : bool array, shape (I, J, K) (or the images' shape), or None for every voxel
        Voxels scored. ``R = max - min`` of ``ref`` inside the mask.

    Returns
    -------
    float
        PSNR in dB; ``inf`` when ``pred == ref`` in the mask.

    Raises
    ------
    ValueError
        Shape mismatch, empty mask, or a reference that is constant in the mask (R = 0).
    """
    pred, ref, full = _prepare(pred, ref, mask)
    rng = float(ref[full].max() - ref[full].min())
    if rng <= 0:
        raise ValueError("PSNR undefined: the reference is constant inside the mask (data range 0)")
    mse = float(np.mean((pred[full] - ref[full]) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(rng**2 / mse))


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean absolute error inside ``mask``, in the images' units (shapes as :func:`psnr`)."""
    pred, ref, full = _prepare(pred, ref, mask)
    return float(np.mean(np.abs(pred[full] - ref[full])))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box of slices holding every True voxel of a non-empty 3D ``mask``."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def ssim_map(x: np.ndarray, y: np.ndarray, rng: float, *, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Local SSIM of two 3D arrays with a Gaussian window (Wang et al. 2004, population covariances).

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``, ``rng`` the data
    range R; scikit-image's ``structural_similarity`` map (local moments from a Gaussian filter of ``sigma`` voxels
    cut at 3.5 sigma, edges reflected). Same shape as ``x``.
    """
    # With Gaussian weights, win_size only feeds scikit-image's extent check and the border crop of its mean (not
    # used here), never the map: an odd size that fits lets a mask's small bounding box through.
    smallest = min(np.shape(x))
    win_size = max(1, min(2 * int(3.5 * sigma + 0.5) + 1, smallest - (1 - smallest % 2)))
    _, smap = structural_similarity(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                    win_size=win_size, data_range=rng, gaussian_weights=True, sigma=sigma,
                                    use_sample_covariance=False, K1=SSIM_K1, K2=SSIM_K2, full=True)
    return smap


def ssim3d(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean 3D SSIM over the mask voxels, computed on the mask's bounding box.

    Both images are cropped to the bounding box of ``mask`` (voxels outside the mask but inside the box
    still enter the local windows; the box edges are reflected), the Gaussian-window SSIM map is computed
    (sigma 1.5 voxels, see :func:`ssim_map`) with ``R = max - min`` of ``ref`` in the mask, and averaged over
    the mask's voxels.

    Parameters
    ----------
    pred, ref : array, shape (I, J, K)
    mask : bool array, shape (I, J, K), or None for the whole volume

    Returns
    -------
    float
        In [-1, 1]; 1 for identical images.

    Raises
    ------
    ValueError
        Shape mismatch, non-3D images, empty mask, or a constant reference in the mask.
    """
    pred, ref, full = _prepare(pred, ref, mask)
    if ref.ndim != 3:
        raise ValueError(f"ssim3d needs 3D images, got shape {ref.shape}")
    rng = float(ref[full].max() - ref[full].min())
    if rng <= 0:
        raise ValueError("SSIM undefined: the reference is constant inside the mask (data range 0)")
    box = _bounding_box(full)
    smap = ssim_map(pred[box], ref[box], rng)
    return float(np.mean(smap[full[box]]))


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> float:
    """Normalised cross-correlation (Pearson r) of ``a`` and ``b`` inside ``mask``.

    ``sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))`` over the mask voxels;
    invariant to a positive linear change of either image's intensities. Returns 0.0 when either image is
    constant in the mask (no linear relation can be measured).
    """
    a, b, full = _prepare(a, b, mask)
    x = a[full] - a[full].mean()
    y = b[full] - b[full].mean()
    den = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
    if den == 0:
        return 0.0
    return float(np.clip(np.sum(x * y) / den, -1.0, 1.0))

"""Brain extraction of a T1w with deepbet (weights ship inside the deepbet wheel: runs offline, CPU or GPU).

See ``docs/adr/0003-brain-extraction.md`` for why deepbet.
"""
from __future__ import annotations

import functools

import nibabel as nib
import numpy as np

from atlasgs_bids.errors import InputError, ProcessingError

__all__ = ["brain_mask"]


@functools.lru_cache(maxsize=2)
def _extractor(no_gpu: bool):
    """One deepbet ``BrainExtraction`` per device (loading its two TorchScript models takes about a second)."""
    from deepbet import BrainExtraction  # heavy import (torch), only when needed

    return BrainExtraction(no_gpu=no_gpu)


def brain_mask(
    t1w: nib.Nifti1Image,
    *,
    threshold: float = 0.5,
    n_dilate: int = 0,
    device: str = "cpu",
) -> nib.Nifti1Image:
    """Binary brain mask of a T1-weighted image, on the T1w's own grid.

    Parameters
    ----------
    t1w : nibabel image, shape (I, J, K)
        T1-weighted head (or already brain-extracted) image in any orientation; deepbet reorients to RAS+
        internally and maps its result back to the input's voxel order.
    threshold : float
        Cut-off on deepbet's brain probability (0..1).
    n_dilate : int
        Layers of 6-connected dilation (positive) or erosion (negative) applied by deepbet after thresholding.
    device : {"cpu", "auto"}
        ``"cpu"`` forces the CPU; ``"auto"`` lets deepbet pick CUDA (or Apple MPS) when available.

    Returns
    -------
    nibabel Nifti1Image, shape (I, J, K), uint8
        1 inside the brain, 0 outside; same affine (voxel index -> world mm RAS) as ``t1w``.

    Raises
    ------
    InputError
        If the image is not 3D (a 4D series must be reduced to one volume first).
    ProcessingError
        If deepbet returns an empty mask.
    """
    if device not in ("cpu", "auto"):
        raise ValueError(f"device must be 'cpu' or 'auto', got {device!r}")
    name = t1w.get_filename() or "T1w image"
    if len(t1w.shape) != 3:
        raise InputError(f"{name}: brain extraction needs a 3D T1w, got shape {t1w.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    # deepbet reads get_fdata(float32), reorients to RAS+, runs its bounding-box and mask networks, keeps the
    # largest connected component, fills holes, and reorients back. Passing the image object skips file I/O.
    img = nib.Nifti1Image(np.asarray(t1w.dataobj), t1w.affine, t1w.header)
    _, mask_img, _ = _extractor(device == "cpu").run(img, threshold=threshold, n_dilate=n_dilate)
    mask = np.asarray(mask_img.dataobj).astype(bool)
    if mask.shape != t1w.shape:  # deepbet maps back to the input's voxel order; guard against API drift
        raise ProcessingError(f"{name}: deepbet returned a mask of shape {mask.shape}, expected {t1w.shape}")
    if not mask.any():
        raise ProcessingError(f"{name}: deepbet found no brain (empty mask); is this a T1-weighted head image?")
    header = t1w.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    out = nib.Nifti1Image(mask.astype(np.uint8), t1w.affine, header)
    out.set_sform(t1w.affine, code=int(t1w.header["sform_code"]) or 1)
    out.set_qform(t1w.affine, code=int(t1w.header["qform_code"]) or 1)
    return out

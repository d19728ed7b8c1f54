"""Registration QC: how well the registered target reference agrees with the T1w, inside the T1w brain mask.

The target's 3D reference is resampled onto the T1w grid through the rigid map (linear interpolation,
:func:`atlasgs_bids.imaging.registration.apply_rigid`) and compared with the T1w in the voxels of the T1w brain mask
that lie inside the target's field of view:

- ``ncc``: the normalised cross-correlation (Pearson r) of the two images' gradient-magnitude (edge) maps
  (Gaussian derivatives, sigma :data:`EDGE_SIGMA_MM`). Contrasts differ (a T2w or PDw is roughly the T1w's
  negative in the brain, and a FLAIR neither), so the raw intensities correlate poorly even when aligned (measured
  |r| 0.03-0.16 on well-registered pairs, reported as ``intensity_ncc``); edges line up whatever the contrast.
- ``mask_dice``: Dice of the registered target's Otsu foreground and the T1w brain mask (inside the target's
  field of view); only meaningful for a skull-stripped target, so it is ``None`` when the foreground is more than
  :data:`DICE_MAX_FOREGROUND_RATIO` times the brain (a head image).

Thresholds (module constants, on ``ncc``), from measurements (``registered``: after the app's own antspyx
registration; ``offset``: the correct transform plus a translation along x, no registration):

========================================================  =========
case                                                      edge NCC
========================================================  =========
tiny sample T2w (7.5 mm), registered                      0.87
tiny sample T2w, affine +80 mm (x or z), registered       0.87 (centre-of-mass start recovers it)
MNI152 T2w 1 mm / x5 thick slices, true transform         0.81 / 0.82
bids-chris PDw (2.4 mm, not skull-stripped), registered   0.55
tiny / MNI x5, offset 2 mm                                0.78 / -
tiny / MNI x5, offset 5 mm                                0.50 / 0.43
tiny / MNI x5, offset 10 mm                               0.15 / 0.13
tiny, offset 20 mm                                        -0.01
tiny affine rotated 90 deg about x, registered (fails)    0.20
tiny affine rotated 180 deg, registered (fails)           -0.07
bids-chris PDw rotated 90 deg, registered (fails)         0.14
========================================================  =========

A registration whose edge NCC falls below :data:`FAIL_NCC` (0.25: between a 10 mm error / failed registrations,
<= 0.20, and a 5 mm error, >= 0.43) is treated as failed: the output would be meaningless. Below :data:`WARN_NCC`
(0.45: a ~5 mm error; the real not-skull-stripped PDw registers at 0.55) it is flagged ``registration_poor``.
"""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from atlasgs_bids.imaging import metrics
from atlasgs_bids.imaging.registration import apply_rigid

#: Gaussian derivative scale of the edge maps, mm.
EDGE_SIGMA_MM = 2.0
#: Edge NCC below this: the registration failed (ProcessingError in the workflow).
FAIL_NCC = 0.25
#: Edge NCC below this: flagged ``registration_poor``.
WARN_NCC = 0.45
#: A target foreground larger than this many times the brain (in the field of view) is a head: no Dice.
DICE_MAX_FOREGROUND_RATIO = 1.5
#: Fewer brain voxels than this inside the target's field of view: no overlap to speak of (NCC reported as 0).
MIN_OVERLAP_VOXELS = 64


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2 |a & b| / (|a| + |b|)`` of two bool arrays (0.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    den = int(a.sum()) + int(b.sum())
    return 0.0 if den == 0 else float(2.0 * np.logical_and(a, b).sum() / den)


def registration_qc(t1w: nib.Nifti1Image, brain_mask: nib.Nifti1Image, target_ref: nib.Nifti1Image,
                    target2t1w: np.ndarray) -> dict:
    """Similarity of the registered target reference and the T1w inside the T1w brain mask.

    Parameters
    ----------
    t1w : RAS+ T1w, (I, J, K), affine voxel -> T1w world mm RAS
    brain_mask : its brain mask on the same grid (non-zero = brain)
    target_ref : the target's 3D reference volume on its own grid, affine voxel -> target world mm RAS
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS (the registration's result)

    Returns
    -------
    dict: ``ncc`` (edge NCC, -1..1), ``intensity_ncc`` (Pearson r of the intensities), ``mask_dice`` (float or
    None), ``n_voxels`` (brain voxels
    in the target's field of view), ``fail_threshold_ncc``, ``warn_threshold_ncc``, ``failed`` (ncc < fail),
    ``flag`` (ncc < warn), ``seconds``.
    """
    t0 = time.perf_counter()
    t1 = np.asarray(t1w.get_fdata(dtype=np.float32))
    mask = np.asarray(brain_mask.dataobj).reshape(t1.shape) > 0
    ref = nib.Nifti1Image(np.asarray(target_ref.get_fdata(dtype=np.float32)), target_ref.affine)
    moved = np.asarray(apply_rigid(ref, t1w, target2t1w, "linear").dataobj)
    ones = nib.Nifti1Image(np.ones(ref.shape, dtype=np.float32), ref.affine)
    fov = np.asarray(apply_rigid(ones, t1w, target2t1w, "linear").dataobj) > 0.5
    sel = mask & fov
    n = int(sel.sum())
    signed = metrics.ncc(moved, t1, sel) if n >= MIN_OVERLAP_VOXELS else 0.0
    zooms = np.linalg.norm(t1w.affine[:3, :3], axis=0)
    sig = EDGE_SIGMA_MM / zooms
    g_t1 = ndimage.gaussian_gradient_magnitude(t1, sig)
    g_mv = ndimage.gaussian_gradient_magnitude(moved, sig)
    edge = metrics.ncc(g_mv, g_t1, sel) if n >= MIN_OVERLAP_VOXELS else 0.0
    value = edge
    mask_dice = None
    if n >= MIN_OVERLAP_VOXELS:
        vals = moved[fov]
        fg = (moved > threshold_otsu(vals)) & fov
        if fg.sum() <= DICE_MAX_FOREGROUND_RATIO * sel.sum():
            mask_dice = dice(fg, sel)
    return {"ncc": float(value), "intensity_ncc": float(signed), "mask_dice": mask_dice, "n_voxels": n,
            "fail_threshold_ncc": FAIL_NCC, "warn_threshold_ncc": WARN_NCC, "failed": bool(value < FAIL_NCC),
            "flag": bool(value < WARN_NCC), "seconds": time.perf_counter() - t0}

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

The edge NCC is blind to a small miss (a 2 mm shift still scores 0.78). A second figure looks at the answer's
stability under the slice-aware model of :mod:`atlasgs_bids.imaging.refine`: ``spread_mm`` is the largest
brain-surface displacement between the final transform and the refinements restarted from it after perturbations of
:data:`RESTART_DEG` degrees and :data:`RESTART_MM` mm (:func:`restart_spread`). A correct transform sits at the
bottom of that model's misfit and every restart comes back to it; a transform off by a millimetre or a degree is
not at the bottom, and the restarts leave it. Above :data:`SPREAD_WARN_MM`, or half a T1w voxel when that is more
(a 2 mm T1w does not resolve a millimetre: measured restart spreads at the right answer reach 0.8 mm on the 2 mm
head template with 10 mm slices, 0.3 mm at 1 mm), it is flagged ``registration_unstable``
(docs/qc.md gives the measured hit and false-alarm rates, from ``atlasgs-bids bench --registration``).

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
#: Restarts of the refinement for ``spread_mm``: rotation (deg) and translation (mm) of each perturbation.
RESTART_DEG = 1.5
RESTART_MM = 1.5
#: ``spread_mm`` above this (mm), or above :data:`SPREAD_WARN_VOXELS` T1w voxels if more: ``registration_unstable``.
SPREAD_WARN_MM = 0.6
SPREAD_WARN_VOXELS = 0.5
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
    zooms = nib.affines.voxel_sizes(t1w.affine)
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


def restart_spread(t1w: nib.Nifti1Image, brain_mask: nib.Nifti1Image, target_ref: nib.Nifti1Image,
                   target2t1w: np.ndarray, acquisition=None, *, n_restarts: int = 2) -> dict:
    """Stability of a rigid map under the slice-aware refinement, restarted from perturbed copies of it.

    Parameters
    ----------
    t1w, brain_mask, target_ref, target2t1w
        As in :func:`registration_qc`.
    acquisition : Acquisition, optional
        The target's slice profile (default from its header).
    n_restarts : int
        Perturbations, each a rotation of :data:`RESTART_DEG` about a fixed axis (alternating sign) about the brain
        centre and a translation of :data:`RESTART_MM` along another; deterministic.

    Returns
    -------
    dict: ``spread_mm`` (largest brain-surface displacement, mm, between ``target2t1w`` and a restarted refinement),
    ``spread_deg`` (largest rotation between them), ``warn_threshold_mm`` (:data:`SPREAD_WARN_MM` or
    :data:`SPREAD_WARN_VOXELS` T1w voxels, the larger), ``flag`` (spread above it), ``seconds``.
    """
    from atlasgs_bids.imaging.refine import (RefineOptions, brain_centre, max_displacement_mm, refine_rigid,
                                             rigid_update, surface_points)
    from atlasgs_bids.imaging.transforms import rotation_angle_deg

    t0 = time.perf_counter()
    mask = np.asarray(brain_mask.dataobj).reshape(t1w.shape[:3]) > 0
    centre, surf = brain_centre(mask, t1w.affine), surface_points(mask, t1w.affine)
    m = np.asarray(target2t1w, dtype=np.float64)
    axes = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]) / np.sqrt(2.0)
    spread_mm, spread_deg = 0.0, 0.0
    for i in range(n_restarts):
        sign = 1.0 if i % 2 == 0 else -1.0
        params = np.concatenate([sign * np.radians(RESTART_DEG) * axes[i % 3], -sign * RESTART_MM * axes[(i + 1) % 3]])
        start = rigid_update(params, centre) @ m
        # one fine level: a restart is a small perturbation, and this checks where the finest misfit's bottom is
        res = refine_rigid(t1w, brain_mask, target_ref, start, acquisition, RefineOptions(levels_mm=(1.0, 0.0)))
        spread_mm = max(spread_mm, max_displacement_mm(res.target2t1w, m, surf))
        spread_deg = max(spread_deg, rotation_angle_deg(res.target2t1w[:3, :3].T @ m[:3, :3]))
    warn = max(SPREAD_WARN_MM, SPREAD_WARN_VOXELS * float(nib.affines.voxel_sizes(t1w.affine).max()))
    return {"spread_mm": float(spread_mm), "spread_deg": float(spread_deg), "warn_threshold_mm": warn,
            "flag": bool(spread_mm > warn), "seconds": time.perf_counter() - t0}

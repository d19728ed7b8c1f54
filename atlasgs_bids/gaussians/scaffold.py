"""Stage 1: the subject's scaffold of 3D Gaussians on the brain-masked T1w.

The app's geometry is the lattice (docs/adr/0002-scaffold-geometry.md): one Gaussian per voxel of the dilated brain
mask, nothing optimised (:func:`lattice_scaffold`). Its geometry (means, rotations, scales) is what every target
reuses; its amplitudes reproduce the normalised T1w. The fitted, adaptive geometry (Adam, densify and prune) is
research code: :mod:`atlasgs_bids.research.adaptive_scaffold`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from nibabel.affines import apply_affine, voxel_sizes

from atlasgs_bids.gaussians.field import quat_scale_to_covar
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA
from atlasgs_bids.imaging.grid import Grid
from atlasgs_bids.imaging.intensity import fit_intensity_scale
from atlasgs_bids.presets import check_quality

#: ``progress(step, total_steps, loss)`` of an iterative scaffold fit.
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class ScaffoldOptions:
    """Stage-1 settings of the app.

    geometry : "lattice", the one geometry of the app (the fitted "adaptive" one is research code,
        :func:`atlasgs_bids.research.adaptive_scaffold.fit_adaptive_scaffold`)
    dilate : voxels by which the brain mask is grown before one Gaussian is placed per voxel (1: the fit also sees
        the zero just outside, so the field stops at the brain's edge)
    """

    geometry: str = "lattice"
    dilate: int = 1

    @classmethod
    def preset(cls, quality: str) -> "ScaffoldOptions":
        """The options of quality ``quality``: the same for every quality, since the lattice has nothing to
        optimise (the presets change stage 2 only, :mod:`atlasgs_bids.presets`)."""
        check_quality(quality)
        return cls()


@dataclass
class Scaffold:
    """A fitted Gaussian scaffold in T1w world coordinates (mm, RAS).

    means : [N, 3] float32, T1w world mm RAS
    quats : [N, 4] float32, wxyz (normalised when used)
    log_scales : [N, 3] float32, log mm
    amplitudes : [N, 1] float32, normalised T1w units (T1w / its 99th percentile in the mask)
    t1_values : [N] float32, normalised T1w intensity at each mean (for the appearance regulariser)
    mask : (I, J, K) bool, the brain mask on the T1w grid (``meta['t1w_affine']``) the scaffold covers
    meta : dict of provenance: T1w affine and shape, intensity scale, options, fit statistics, version
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    amplitudes: torch.Tensor
    t1_values: torch.Tensor
    mask: np.ndarray
    meta: dict = field(default_factory=dict)
    #: Quantities that depend on the geometry alone (lattice layout, neighbours, overlap normaliser), computed once
    #: and shared by every target of the participant; never saved, and fresh in every copy (``replace``).
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], object]):
        """``compute()`` once per scaffold object and ``key``."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def t1w_affine(self) -> np.ndarray:
        """(4, 4) voxel -> T1w world mm RAS of the grid the scaffold was fitted on."""
        return np.asarray(self.meta["t1w_affine"], dtype=np.float64)

    @property
    def t1w_grid(self) -> Grid:
        """The T1w voxel grid the scaffold was built on (T1w world mm RAS)."""
        return Grid(self.t1w_affine, tuple(self.mask.shape))

    @property
    def n_gaussians(self) -> int:
        return int(self.means.shape[0])

    def covs(self) -> torch.Tensor:
        """[N, 3, 3] covariances, mm^2."""
        return quat_scale_to_covar(self.quats, self.log_scales)

    def to(self, device: str | torch.device) -> "Scaffold":
        return replace(
            self,
            means=self.means.to(device),
            quats=self.quats.to(device),
            log_scales=self.log_scales.to(device),
            amplitudes=self.amplitudes.to(device),
            t1_values=self.t1_values.to(device),
        )


def check_t1w_inputs(t1w: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> None:
    """A ``ValueError`` naming the problem unless ``t1w`` is a finite 3D image in ``mask`` (same shape, at least 64
    voxels) and ``affine`` a finite, non-singular (4, 4) matrix."""
    if t1w.ndim != 3:
        raise ValueError(f"the T1w must be a 3D image, got an array of shape {t1w.shape}")
    if mask.shape != t1w.shape:
        raise ValueError(f"the brain mask's shape {mask.shape} differs from the T1w's {t1w.shape}")
    if min(t1w.shape) < 2:
        raise ValueError(f"the T1w has a single slice along some axis (shape {t1w.shape})")
    if not np.all(np.isfinite(t1w[mask])):
        raise ValueError("the T1w has NaN or infinite voxels inside the brain mask")
    if mask.sum() < 64:
        raise ValueError(f"the brain mask is empty or tiny ({int(mask.sum())} voxels)")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-8:
        raise ValueError("the T1w affine must be a finite, non-singular (4, 4) matrix")


def fit_scaffold(t1w: np.ndarray, affine: np.ndarray, mask: np.ndarray, options: ScaffoldOptions | None = None, *,
                 seed: int = 0) -> Scaffold:
    """Stage 1 of the app: the scaffold of geometry ``options.geometry`` on a brain-masked T1w.

    Parameters
    ----------
    t1w : (I, J, K) float, the T1w in scanner units
    affine : (4, 4) voxel index -> T1w world mm RAS
    mask : (I, J, K) bool, brain mask
    options : :class:`ScaffoldOptions` (the lattice when omitted)
    seed : kept for callers of a fitted geometry; the lattice is deterministic and does not use it

    Returns
    -------
    :class:`Scaffold` on the CPU.
    """
    opts = options or ScaffoldOptions()
    if opts.geometry != "lattice":
        hint = (" (the fitted adaptive scaffold is research code: "
                "atlasgs_bids.research.adaptive_scaffold.fit_adaptive_scaffold)" if opts.geometry == "adaptive" else "")
        raise ValueError(f"unknown scaffold geometry {opts.geometry!r}: use 'lattice'{hint}")
    return lattice_scaffold(t1w, affine, mask, dilate=opts.dilate)


def lattice_scaffold(t1w: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, dilate: int = 1) -> Scaffold:
    """The limit scaffold: one isotropic Gaussian per T1w voxel of the (dilated) mask, nothing fitted.

    Each Gaussian sits at its voxel centre with the voxel's own PSF width (sigma = zoom / 2.3548 per axis) and
    amplitude equal to the normalised T1w there. Stage 2 on this geometry is the voxel-basis solve, generalised to
    any target orientation and slice profile by the same closed-form forward model; it costs more unknowns than an
    adaptive scaffold but needs no stage-1 optimisation (see docs/adr/0002-scaffold-geometry.md).
    """
    from scipy.ndimage import binary_dilation

    t1w = np.asarray(t1w)
    mask = np.asarray(mask).astype(bool)
    check_t1w_inputs(t1w, affine, mask)
    affine = np.asarray(affine, dtype=np.float64)
    t0 = time.perf_counter()
    scale = fit_intensity_scale(t1w, mask)
    t1n = np.where(mask, scale.apply(t1w), 0.0).astype(np.float32)
    cover = binary_dilation(mask, iterations=dilate) if dilate > 0 else mask
    ijk = np.argwhere(cover)
    n = len(ijk)
    zooms = voxel_sizes(affine)
    # Axis-aligned in voxel space: the rotation is the affine's own (nearest orthogonal matrix).
    u, _, vt = np.linalg.svd(affine[:3, :3] / zooms)
    rot = u @ vt
    quat = _rotation_to_quat(rot)
    values = t1n[tuple(ijk.T)]
    meta = {
        "t1w_affine": affine.tolist(),
        "t1w_shape": list(mask.shape),
        "intensity_scale": {"offset": scale.offset, "scale": scale.scale},
        "geometry": "lattice",
        "seconds": time.perf_counter() - t0,
    }
    return Scaffold(
        means=torch.as_tensor(apply_affine(affine, ijk), dtype=torch.float32),
        quats=torch.as_tensor(np.tile(quat, (n, 1)), dtype=torch.float32),
        log_scales=torch.as_tensor(np.tile(np.log(zooms * FWHM_TO_SIGMA), (n, 1)), dtype=torch.float32),
        amplitudes=torch.as_tensor(values[:, None], dtype=torch.float32),
        t1_values=torch.as_tensor(values, dtype=torch.float32),
        mask=mask,
        meta=meta,
    )


def _rotation_to_quat(rot: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion of a proper rotation matrix (3, 3); an improper one (det < 0) is made proper first."""
    if np.linalg.det(rot) < 0:
        rot = rot * np.array([1.0, 1.0, -1.0])  # flip one axis: a Gaussian is symmetric, the covariance is unchanged
    w = np.sqrt(max(0.0, 1.0 + np.trace(rot))) / 2.0
    if w > 1e-6:
        return np.array([w, (rot[2, 1] - rot[1, 2]) / (4 * w), (rot[0, 2] - rot[2, 0]) / (4 * w), (rot[1, 0] - rot[0, 1]) / (4 * w)])
    # 180-degree rotations: take the largest diagonal element.
    i = int(np.argmax(np.diag(rot)))
    j, k = (i + 1) % 3, (i + 2) % 3
    x = np.sqrt(max(0.0, 1.0 + rot[i, i] - rot[j, j] - rot[k, k])) / 2.0
    q = np.zeros(4)
    q[0] = (rot[k, j] - rot[j, k]) / (4 * x)
    q[1 + i] = x
    q[1 + j] = (rot[j, i] + rot[i, j]) / (4 * x)
    q[1 + k] = (rot[k, i] + rot[i, k]) / (4 * x)
    return q

"""The acquisition model of a target image: how each voxel measured the object.

A voxel of a target measures the object through a point-spread function (PSF). Here the PSF is Gaussian along
each voxel axis, with FWHM equal to the voxel spacing in plane and to the slice thickness through plane (the JSON
``SliceThickness`` when known, else the slice spacing). FWHM is stored in *voxel units* of the target so that the
PSF can be carried into any world frame by the voxel-to-world affine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # sigma = FWHM / 2.3548


@dataclass(frozen=True)
class Acquisition:
    """Geometry and PSF of a target image.

    Attributes
    ----------
    affine : (4, 4) float64
        Voxel index (i, j, k) -> the target's own world frame, mm RAS (its NIfTI sform/qform).
    shape : (3,) int
        Spatial shape (I, J, K) of the target.
    fwhm_vox : (3,) float
        PSF FWHM along each voxel axis in voxel units: 1.0 is one voxel spacing. Through plane this is
        ``slice_thickness / slice_spacing`` (1.0 for contiguous slices, > 1 for overlapping, < 1 for gapped).
    slice_axis : int
        The voxel axis across slices (the coarsest one).
    profile : {"gaussian", "box"}
        Through-plane slice profile. "box" is a K-point quadrature of Gaussian sub-slices whose sum is a box of
        width ``fwhm_vox[slice_axis]``; in-plane axes stay Gaussian.
    box_points : int
        K, the number of sub-slices for the box profile.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    fwhm_vox: tuple[float, float, float]
    slice_axis: int
    profile: str = "gaussian"
    box_points: int = 5
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise ValueError(f"Acquisition.affine must be a finite (4, 4) matrix, got {aff.shape}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-8:
            raise ValueError("Acquisition.affine is singular (zero voxel size along some axis)")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Acquisition.shape must be 3 positive ints, got {self.shape}")
        if len(self.fwhm_vox) != 3 or min(self.fwhm_vox) <= 0:
            raise ValueError(f"Acquisition.fwhm_vox must be 3 positive numbers, got {self.fwhm_vox}")
        if self.profile not in ("gaussian", "box"):
            raise ValueError(f"Acquisition.profile must be 'gaussian' or 'box', got {self.profile!r}")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "fwhm_vox", tuple(float(f) for f in self.fwhm_vox))

    @property
    def zooms(self) -> np.ndarray:
        """(3,) voxel spacing in mm: the column norms of the affine's 3x3 part."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @classmethod
    def from_geometry(
        cls,
        affine: np.ndarray,
        shape: tuple[int, ...],
        *,
        slice_thickness: float | None = None,
        profile: str = "gaussian",
        box_points: int = 5,
    ) -> "Acquisition":
        """Build the model from an image's affine and shape, and ``SliceThickness`` (mm) when known.

        The slice axis is the voxel axis with the largest spacing. In plane, FWHM = one voxel.
        """
        affine = np.asarray(affine, dtype=np.float64)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        slice_axis = int(np.argmax(zooms))
        fwhm = [1.0, 1.0, 1.0]
        if slice_thickness is not None:
            if not np.isfinite(slice_thickness) or slice_thickness <= 0:
                raise ValueError(f"SliceThickness must be a positive number of mm, got {slice_thickness}")
            fwhm[slice_axis] = float(slice_thickness) / float(zooms[slice_axis])
        return cls(
            affine=affine,
            shape=tuple(int(s) for s in shape[:3]),
            fwhm_vox=tuple(fwhm),
            slice_axis=slice_axis,
            profile=profile,
            box_points=box_points,
        )

    def sub_slices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The through-plane profile as a sum of Gaussian sub-slices.

        Returns
        -------
        offsets_vox : (K,) float
            Sub-slice centre offsets along ``slice_axis`` in voxel units (0 for the Gaussian profile).
        weights : (K,) float
            Quadrature weights summing to 1.
        fwhm_vox : (3,) float
            FWHM of each sub-slice's Gaussian PSF in voxel units (in-plane unchanged).
        """
        fwhm = np.array(self.fwhm_vox, dtype=np.float64)
        if self.profile == "gaussian":
            return np.zeros(1), np.ones(1), fwhm
        k = int(self.box_points)
        width = fwhm[self.slice_axis]
        # K equal sub-slices tiling the box; each one is a Gaussian as wide as its share (FWHM = width / K).
        offsets = (np.arange(k) + 0.5) / k * width - width / 2.0
        sub = fwhm.copy()
        sub[self.slice_axis] = width / k
        return offsets, np.full(k, 1.0 / k), sub

"""The acquisition model of a target image: how each voxel measured the object.

A voxel of a target measures the object through a point-spread function (PSF). Here the PSF is Gaussian along
each voxel axis, with FWHM equal to the voxel spacing in plane and to the slice thickness through plane (the JSON
``SliceThickness`` when known, else the slice spacing). FWHM is stored in *voxel units* of the target so that the
PSF can be carried into any world frame by the voxel-to-world affine.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from nibabel.affines import voxel_sizes

from atlasgs_bids.imaging.grid import Grid

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
    edge_fwhm_vox : float
        Box profile only: FWHM (voxel units along ``slice_axis``) of a Gaussian convolved with the box, i.e. soft
        slice edges (a real 2D multi-slice excitation; the AtlasGS simulation's box of blocks after a blur). 0 is a
        hard box. Exact in the quadrature: each sub-slice's Gaussian variance grows by this Gaussian's.
    meta : dict
        Free-form provenance (not compared): the simulator's parameters; ``profile_from_data`` when the profile
        was chosen from the target's own held-out slices (:mod:`atlasgs_bids.qc.tuning`).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    fwhm_vox: tuple[float, float, float]
    slice_axis: int
    profile: str = "gaussian"
    box_points: int = 5
    edge_fwhm_vox: float = 0.0
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
        if not np.isfinite(self.edge_fwhm_vox) or self.edge_fwhm_vox < 0:
            raise ValueError(f"Acquisition.edge_fwhm_vox must be >= 0, got {self.edge_fwhm_vox}")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "fwhm_vox", tuple(float(f) for f in self.fwhm_vox))
        object.__setattr__(self, "edge_fwhm_vox", float(self.edge_fwhm_vox))

    @property
    def grid(self) -> Grid:
        """The target's voxel grid in its own world frame."""
        return Grid(self.affine, self.shape)

    @property
    def zooms(self) -> np.ndarray:
        """(3,) voxel spacing in mm."""
        return self.grid.zooms

    @property
    def thickness_mm(self) -> float:
        """Through-plane width of the slice profile in mm: the Gaussian's FWHM or the box's width (before soft
        edges)."""
        return float(self.fwhm_vox[self.slice_axis] * self.zooms[self.slice_axis])

    def with_profile(self, profile: str, *, width: float = 1.0, edge: float = 0.0) -> "Acquisition":
        """The same geometry with another through-plane profile, relative to this one's width ``t``.

        ``width``: the new width (Gaussian FWHM or box width) is ``width * t``; ``edge``: the box's soft-edge FWHM
        is ``edge * t`` (box only). In-plane PSF, grid and ``box_points`` are unchanged.

        >>> acq = Acquisition(np.diag([1.0, 1.0, 3.0, 1.0]), (4, 4, 4), (1.0, 1.0, 1.2), slice_axis=2)
        >>> box = acq.with_profile("box", edge=0.25)
        >>> box.profile, box.fwhm_vox[2], round(box.edge_fwhm_vox, 3), round(box.thickness_mm, 3)
        ('box', 1.2, 0.3, 3.6)
        """
        if width <= 0 or edge < 0:
            raise ValueError(f"with_profile needs width > 0 and edge >= 0, got width={width}, edge={edge}")
        if profile == "gaussian" and edge > 0:
            raise ValueError("a soft edge (edge > 0) applies to the box profile only")
        fwhm = list(self.fwhm_vox)
        t = fwhm[self.slice_axis]
        fwhm[self.slice_axis] = width * t
        return replace(self, fwhm_vox=tuple(fwhm), profile=profile, edge_fwhm_vox=edge * t, meta=dict(self.meta))

    def with_profile_of(self, other: "Acquisition") -> "Acquisition":
        """This grid with ``other``'s through-plane profile (kind, width and soft edge carried in mm, so that
        ``other`` may have another slice spacing, e.g. a fit on every second slice predicting them all).

        >>> fit = Acquisition(np.diag([1.0, 1.0, 6.0, 1.0]), (4, 4, 2), (1.0, 1.0, 0.5), slice_axis=2, profile="box")
        >>> full = Acquisition(np.diag([1.0, 1.0, 3.0, 1.0]), (4, 4, 4), (1.0, 1.0, 1.0), slice_axis=2)
        >>> out = full.with_profile_of(fit); out.profile, out.fwhm_vox[2], out.thickness_mm
        ('box', 1.0, 3.0)
        """
        if other.slice_axis != self.slice_axis:
            raise ValueError(f"slice axes differ ({other.slice_axis} vs {self.slice_axis}): cannot carry the profile")
        to_vox = float(other.zooms[other.slice_axis]) / float(self.zooms[self.slice_axis])
        fwhm = list(self.fwhm_vox)
        fwhm[self.slice_axis] = other.fwhm_vox[other.slice_axis] * to_vox
        chosen = {k: v for k, v in other.meta.items() if k.startswith("profile")}  # provenance of the profile only
        return replace(self, fwhm_vox=tuple(fwhm), profile=other.profile, box_points=other.box_points,
                       edge_fwhm_vox=other.edge_fwhm_vox * to_vox, meta={**self.meta, **chosen})

    def profile_record(self) -> dict:
        """JSON-safe description of the through-plane profile (sidecars and diagnostics): profile, thickness (mm),
        soft-edge FWHM (mm, box only) and whether it was chosen from the data (``meta["profile_from_data"]``)."""
        zoom = float(self.zooms[self.slice_axis])
        return {"profile": self.profile, "slice_thickness_mm": self.thickness_mm,
                "edge_fwhm_mm": self.edge_fwhm_vox * zoom if self.profile == "box" else None,
                "profile_from_data": bool(self.meta.get("profile_from_data", False))}

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
        zooms = voxel_sizes(affine)
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
        # K equal sub-slices tiling the box; each one is a Gaussian as wide as its share (FWHM = width / K),
        # widened by the soft edge (Gaussian convolved with Gaussian: the FWHMs add in quadrature).
        offsets = (np.arange(k) + 0.5) / k * width - width / 2.0
        sub = fwhm.copy()
        sub[self.slice_axis] = float(np.hypot(width / k, self.edge_fwhm_vox))
        return offsets, np.full(k, 1.0 / k), sub


# --------------------------------------------------------------------------------------------------------------
# Simulation of a thick-slice acquisition from an isotropic image (benchmarks and tests)
# --------------------------------------------------------------------------------------------------------------

DEGRADATIONS = ("gaussian", "atlasgs")


def simulate_thick_slices(
    data: np.ndarray,
    affine: np.ndarray,
    factor: int,
    *,
    axis: int = 2,
    degradation: str = "gaussian",
) -> tuple[np.ndarray, np.ndarray, Acquisition]:
    """Simulate a thick-slice acquisition of an isotropic image along one voxel axis.

    Two degradations (``s`` is the original voxel index along ``axis``, ``n`` the thick slice index):

    ``"gaussian"``
        Slice profile = Gaussian with FWHM = ``factor`` original voxels (sigma = factor / 2.3548),
        applied with ``scipy.ndimage.gaussian_filter1d(..., mode="constant")`` (zero outside the image),
        then every ``factor``-th slice is kept starting at ``factor // 2``: thick slice ``n`` is centred on
        original slice ``s = factor // 2 + factor * n``, an original voxel centre.
    ``"atlasgs"``
        As in the AtlasGS paper: Gaussian blur with sigma = 1 original voxel along ``axis``
        (``mode="constant"``), then average pooling of blocks of ``factor`` consecutive slices (the incomplete
        tail block is dropped): thick slice ``n`` averages slices ``factor * n ... factor * n + factor - 1``
        and is centred at their mean, ``s = factor * n + (factor - 1) / 2`` (between two original voxels
        when ``factor`` is even).

    The returned affine maps a thick voxel index to the world position of the centre of what that voxel
    measured: ``thick_affine = affine @ M`` with ``M`` scaling ``axis`` by ``factor`` and shifting it by the
    first centre above. In-plane axes are untouched.

    Parameters
    ----------
    data : array, shape (I, J, K) or (I, J, K, V)
        Isotropic image (any real dtype); a 4D series is degraded volume by volume, identically.
    affine : (4, 4) array
        Voxel index -> world mm RAS of ``data``.
    factor : int
        Slice spacing of the result in original voxels (>= 1).
    axis : int, optional
        Voxel axis across slices, 0, 1 or 2 (default 2).
    degradation : {"gaussian", "atlasgs"}
        See above.

    Returns
    -------
    thick : array, shape (I, J, N, [V]) with ``axis`` shortened to N slices
        float64 when ``data`` is float64, else float32.
    thick_affine : (4, 4) float64
        Thick voxel index -> the same world mm RAS frame as ``affine``.
    acquisition : Acquisition
        The model of the simulated image: ``affine=thick_affine``, ``fwhm_vox=(1, 1, 1)`` (in plane the
        original voxel, through plane thickness == spacing, the spacing being in the affine), ``slice_axis=axis``,
        ``profile="gaussian"`` for "gaussian" and ``"box"`` for "atlasgs". ``meta`` records the parameters.

    Raises
    ------
    ValueError
        On a bad ``factor``, ``axis``, ``degradation``, data dimensionality or affine, or when fewer than one
        thick slice would remain.

    Examples
    --------
    >>> vol = np.zeros((4, 4, 9)); vol[1, 2, 4] = 1.0
    >>> thick, aff, acq = simulate_thick_slices(vol, np.eye(4), 3)
    >>> thick.shape, float(aff[2, 2]), float(aff[2, 3]), int(np.argmax(thick[1, 2]))
    ((4, 4, 3), 3.0, 1.0, 1)
    """
    from scipy.ndimage import gaussian_filter1d

    if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) or not 0 <= axis <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial voxel axis), got {axis!r}")
    axis = int(axis)
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {degradation!r}")
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be 3D (I, J, K) or 4D (I, J, K, V), got shape {data.shape}")
    if data.dtype.kind not in "biuf":
        raise ValueError(f"data must be real-valued, got dtype {data.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite (4, 4) matrix, got shape {affine.shape}")
    out_dtype = np.float64 if data.dtype == np.float64 else np.float32
    n_in = data.shape[axis]
    work = data.astype(np.float64, copy=False)

    if degradation == "gaussian":
        first = factor // 2
        keep = np.arange(first, n_in, factor)
        if keep.size == 0:
            raise ValueError(f"factor {factor} leaves no slice from {n_in} slices along axis {axis}")
        blurred = gaussian_filter1d(work, sigma=factor * FWHM_TO_SIGMA, axis=axis, mode="constant")
        thick = np.take(blurred, keep, axis=axis)
        first_centre = float(first)
        profile = "gaussian"
        sigma_vox = factor * FWHM_TO_SIGMA
    else:
        n_out = n_in // factor
        if n_out == 0:
            raise ValueError(f"factor {factor} leaves no complete block of slices from {n_in} along axis {axis}")
        blurred = gaussian_filter1d(work, sigma=1.0, axis=axis, mode="constant")
        blurred = np.take(blurred, np.arange(n_out * factor), axis=axis)
        blocks = blurred.shape[:axis] + (n_out, factor) + blurred.shape[axis + 1:]
        thick = blurred.reshape(blocks).mean(axis=axis + 1)
        first_centre = (factor - 1) / 2.0
        profile = "box"
        sigma_vox = 1.0

    index_map = np.eye(4)
    index_map[axis, axis] = float(factor)
    index_map[axis, 3] = first_centre
    thick_affine = affine @ index_map
    acquisition = Acquisition(
        affine=thick_affine,
        shape=tuple(int(s) for s in thick.shape[:3]),
        fwhm_vox=(1.0, 1.0, 1.0),
        slice_axis=axis,
        profile=profile,
        meta={
            "simulated": True,
            "degradation": degradation,
            "factor": factor,
            "blur_sigma_source_vox": sigma_vox,
            "first_slice_centre_source_vox": first_centre,
        },
    )
    return np.ascontiguousarray(thick, dtype=out_dtype), thick_affine, acquisition

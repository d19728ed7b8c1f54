"""Rigid registration of a target's 3D reference volume to the subject's T1w (antspyx / antsRegistration).

Frames
------
Every matrix here acts on **world mm RAS** points (nibabel's frame). ``target2t1w`` maps a point given in the
target image's world (its own NIfTI affine) to the same anatomical point in the T1w's world: it is what the
forward model needs to place the target's voxels among the T1w Gaussians. ITK/ANTs files (LPS, fixed -> moving)
are produced through :mod:`atlasgs_bids.imaging.transforms`.

Method
------
``antsRegistration`` with the T1w as the fixed image and the target as the moving one: initial translation from
the centres of mass, one ``Rigid[0.1]`` stage, Mattes mutual information (32 bins, regular sampling of 25% of the
fixed-mask voxels, fixed random seed), winsorised intensities (0.5%-99.5%), no histogram matching, four levels
with shrink factors 8x4x2x1 of the (isotropic) fixed grid and smoothing sigmas in mm. The metric is computed on the
fixed grid, so a thick-slice moving image (e.g. 0.9x0.9x5 mm) is only ever interpolated, never shrunk, and the
coarse levels are smoothed to at least half the slice thickness. The fixed brain mask (dilated by a few mm so the
brain's outer edge counts) restricts the metric, which makes a not-skull-stripped target safe.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from atlasgs_bids.errors import InputError, ProcessingError
from atlasgs_bids.imaging.refine import dilate_mm
from atlasgs_bids.imaging.transforms import ras_to_itk, read_itk_affine, write_itk_affine

__all__ = ["RigidResult", "Alignment", "register_rigid", "align_to_t1w", "apply_rigid", "to_ants"]

_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class RigidResult:
    """Result of :func:`register_rigid`.

    Attributes
    ----------
    target2t1w : array, shape (4, 4)
        Maps a point in the target (moving) world mm RAS to the T1w (fixed) world mm RAS.
    t1w2target : array, shape (4, 4)
        Inverse of ``target2t1w`` (T1w world RAS -> target world RAS): the map an ITK file that resamples the
        target onto the T1w holds (BIDS ``from-<target>_to-T1w_mode-image_xfm``); see :meth:`write_itk`.
    metric : float
        Mattes mutual information (nats, 32 bins) between the T1w and the registered target resampled onto the
        T1w grid, inside the fixed mask as used by the registration (the whole image when no mask was given).
        Positive, higher is better; it is ``-1 x`` the value ANTs reports (ANTs minimises the negative).
        Comparable across runs of the same image pair only.
    seconds : float
        Wall-clock time of the whole call.
    metric_name : str
        ``"mattes_mi"``.
    parameters : dict
        The ``antsRegistration`` settings used (for sidecars and the methods text).
    """

    target2t1w: np.ndarray
    t1w2target: np.ndarray
    metric: float
    seconds: float
    metric_name: str = "mattes_mi"
    parameters: dict = field(default_factory=dict)

    @property
    def itk_matrix(self) -> np.ndarray:
        """(4, 4) LPS matrix of the ITK file that resamples the target onto the T1w (T1w LPS -> target LPS)."""
        return ras_to_itk(self.t1w2target)

    def write_itk(self, path: str | os.PathLike) -> Path:
        """Write the ITK text transform resampling the target onto the T1w (``antsApplyTransforms -i target
        -r t1w -t path``), i.e. BIDS ``from-<target>_to-T1w_mode-image_xfm.txt``; atomic."""
        return write_itk_affine(path, self.t1w2target)


def _image_name(img: nib.spatialimages.SpatialImage, default: str) -> str:
    return str(img.get_filename() or default)


def _volume(img: nib.spatialimages.SpatialImage, role: str) -> np.ndarray:
    """3D float32 data of ``img``; raises InputError naming the image when it is not usable for registration."""
    name = _image_name(img, f"{role} image")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{name}: registration needs a 3D {role} volume, got shape {img.shape} "
                         "(reduce a 4D series to a reference volume first)")
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name}: {role} image has non-finite values")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{name}: {role} image is constant")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise InputError(f"{name}: {role} image has a degenerate affine")
    return data


def _deshear(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest affine ANTs can represent (orthonormal direction x spacing) and the world map between the two.

    Returns
    -------
    (affine_ants, s) : arrays, shape (4, 4)
        ``affine_ants`` has the same voxel sizes (column norms) and origin, with the direction replaced by the
        nearest orthonormal matrix (polar factor, same handedness). ``s = affine_ants @ inv(affine)`` maps a point
        of the true world to where ANTs believes it is; identity for scanner affines without shear.
    """
    m = affine[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    u, _, vt = np.linalg.svd(m / zooms)
    out = affine.copy()
    out[:3, :3] = (u @ vt) * zooms
    return out, out @ np.linalg.inv(affine)


def to_ants(img: nib.spatialimages.SpatialImage, data: np.ndarray | None = None):
    """Convert a 3D nibabel image to an ANTs image with the same physical geometry.

    Parameters
    ----------
    img : nibabel image, shape (I, J, K)
        Affine maps voxel index -> world mm RAS.
    data : array, shape (I, J, K), optional
        Voxel values to use instead of ``img``'s (float32).

    Returns
    -------
    (ants_img, s)
        ``ants_img`` has LPS origin ``F @ t`` and direction ``F @ R`` (``F = diag(-1, -1, 1)``, ``affine =
        [R diag(zooms) | t]``), so voxel ``(i, j, k)`` sits at the same physical point in both. ``s`` (4, 4) maps
        true world RAS -> the world ANTs sees (identity unless the affine had shear, which ANTs cannot store).
    """
    import ants

    if data is None:
        data = _volume(img, "input")
    affine_ants, s = _deshear(np.asarray(img.affine, dtype=np.float64))
    zooms = nib.affines.voxel_sizes(affine_ants)
    direction = _LPS[:, None] * (affine_ants[:3, :3] / zooms)
    origin = _LPS * affine_ants[:3, 3]
    out = ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=[float(v) for v in origin],
        spacing=[float(v) for v in zooms],
        direction=direction,
    )
    return out, s


@contextlib.contextmanager
def _itk_threads(threads: int | None):
    """Set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for the duration of the block (restored afterwards)."""
    key = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
    old = os.environ.get(key)
    if threads is not None:
        os.environ[key] = str(int(threads))
    try:
        yield
    finally:
        if threads is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def register_rigid(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    *,
    fixed_mask: nib.Nifti1Image | None = None,
    seed: int = 0,
    threads: int | None = None,
    mask_dilate_mm: float = 4.0,
    sampling: float = 0.25,
    iterations: tuple[int, ...] = (1000, 500, 250, 50),
    shrink_factors: tuple[int, ...] = (8, 4, 2, 1),
    mask_max_shrink: int = 2,
) -> RigidResult:
    """Rigidly register a target (moving) volume to the T1w (fixed) with mutual information.

    Parameters
    ----------
    fixed : nibabel image, shape (I, J, K)
        The T1w (head or brain), affine voxel -> T1w world mm RAS.
    moving : nibabel image, shape (I', J', K')
        The target's 3D reference volume (T2w, FLAIR, PDw, mean b0, ...), affine voxel -> target world mm RAS.
        May be thick-slice and not skull-stripped.
    fixed_mask : nibabel image, shape (I, J, K), optional
        Brain mask on the fixed grid (non-zero = brain). It is dilated by ``mask_dilate_mm`` and restricts the
        metric to the brain and its edge. Strongly recommended when the target is not skull-stripped.
    seed : int
        ANTs random seed (jitter of the regular metric sampling). Repeated runs still differ slightly, because
        ITK's multi-threaded Mattes MI accumulates in a varying order: measured run-to-run spread on MNI152
        2 mm, about 0.03 mm with 2 threads and 0.002 mm with 1 thread.
    threads : int, optional
        ITK thread count, set as ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` while the call runs. ITK reads that
        variable once per process, at its first multi-threaded filter, so only the first ITK call of a process
        is guaranteed to honour it: set it (or the app's ``--omp-nthreads``) before any registration.
    mask_dilate_mm : float
        Dilation of ``fixed_mask`` before use, in mm (0 keeps it as is).
    sampling : float
        Fraction of (masked) fixed voxels sampled by the metric at each level, in (0, 1].
    mask_max_shrink : int
        The mask restricts the metric only at levels with a shrink factor at most this (the coarser levels run
        unmasked, as a first stage); 0 never masks, a value >= the largest shrink masks every level.
    iterations, shrink_factors : tuple of int
        Per level, coarse to fine. Smoothing sigmas (mm) are ``0.5 x shrink x fixed voxel size`` at coarse
        levels, at least half the moving's thickest voxel size (slice thickness) on all but the finest
        level, and 0 at shrink 1.

    Returns
    -------
    RigidResult
        ``target2t1w`` (target world RAS -> T1w world RAS), its inverse, the similarity after registration and the
        time taken.

    Raises
    ------
    InputError
        Unusable images (not 3D, constant, non-finite) or a mask not on the fixed grid.
    ProcessingError
        antsRegistration failed.
    """
    import ants
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    t0 = time.perf_counter()
    if len(iterations) != len(shrink_factors):
        raise ValueError("iterations and shrink_factors need one entry per level")
    if not 0.0 < sampling <= 1.0:
        raise ValueError(f"sampling must lie in (0, 1], got {sampling}")
    fixed_data = _volume(fixed, "fixed (T1w)")
    moving_data = _volume(moving, "moving (target)")
    fixed_ants, s_fixed = to_ants(fixed, fixed_data)
    moving_ants, s_moving = to_ants(moving, moving_data)

    mask_ants = None
    if fixed_mask is not None:
        mname = _image_name(fixed_mask, "fixed mask")
        if tuple(fixed_mask.shape[:3]) != tuple(fixed_data.shape) or not np.allclose(
            fixed_mask.affine, fixed.affine, atol=1e-3
        ):
            raise InputError(f"{mname}: the brain mask is not on the T1w grid "
                             f"(shape {fixed_mask.shape} vs {fixed_data.shape}, or a different affine)")
        mask = np.asarray(fixed_mask.dataobj).reshape(fixed_data.shape) > 0
        if not mask.any():
            raise InputError(f"{mname}: the brain mask is empty")
        mask = dilate_mm(mask, nib.affines.voxel_sizes(fixed.affine), mask_dilate_mm)
        mask_ants, _ = to_ants(fixed, mask.astype(np.float32))

    fixed_vox = float(np.min(nib.affines.voxel_sizes(fixed.affine)))
    moving_thick = float(np.max(nib.affines.voxel_sizes(moving.affine)))
    sigmas = []
    for f in shrink_factors:
        if f <= 1:
            sigmas.append(0.0)
        else:
            sigmas.append(round(max(0.5 * f * fixed_vox, 0.5 * moving_thick), 2))
    params = {
        "transform": "Rigid[0.1]",
        "metric": f"MI (Mattes, 32 bins, Regular sampling {sampling})",
        "initial": "centre of mass",
        "iterations": list(iterations),
        "shrink_factors": list(shrink_factors),
        "smoothing_sigmas_mm": sigmas,
        "mask": fixed_mask is not None,
        "mask_max_shrink": mask_max_shrink if fixed_mask is not None else None,
        "mask_dilate_mm": mask_dilate_mm if fixed_mask is not None else None,
        "seed": seed,
    }

    f_ptr, m_ptr = get_pointer_string(fixed_ants), get_pointer_string(moving_ants)
    with tempfile.TemporaryDirectory(prefix="atlasgs_reg_") as tmp, _itk_threads(threads):
        prefix = os.path.join(tmp, "xfm_")
        args = [
            "--dimensionality", "3",
            "--float", "1",
            "--collapse-output-transforms", "1",
            "--output", prefix,
            "--interpolation", "Linear",
            "--winsorize-image-intensities", "[0.005,0.995]",
            "--use-histogram-matching", "0",
            "--initial-moving-transform", f"[{f_ptr},{m_ptr},1]",
            # ANTs reads --random-seed 0 as "seed from the clock" (runs then differ, even land in other optima)
            "--random-seed", str(int(seed) + 1),
            "--verbose", "0",
        ]
        levels = list(zip(iterations, shrink_factors, sigmas))
        if mask_ants is None:
            stages = [(levels, "[NA,NA]")]
        else:
            coarse = [lv for lv in levels if lv[1] > mask_max_shrink]
            fine = [lv for lv in levels if lv[1] <= mask_max_shrink]
            mask_opt = f"[{get_pointer_string(mask_ants)},NA]"
            stages = [(lv, opt) for lv, opt in ((coarse, "[NA,NA]"), (fine, mask_opt)) if lv]
        for stage_levels, mask_opt in stages:
            its, shrinks, sigs = zip(*stage_levels)
            args += [
                "--transform", "Rigid[0.1]",
                "--metric", f"MI[{f_ptr},{m_ptr},1,32,Regular,{sampling}]",
                "--convergence", "[" + "x".join(str(int(i)) for i in its) + ",1e-6,10]",
                "--shrink-factors", "x".join(str(int(f)) for f in shrinks),
                "--smoothing-sigmas", "x".join(f"{v:g}" for v in sigs) + "mm",
                "--masks", mask_opt,
            ]
        rc = get_lib_fn("antsRegistration")(process_arguments(args))
        mat = prefix + "0GenericAffine.mat"
        if rc != 0 or not os.path.isfile(mat):
            raise ProcessingError(
                f"antsRegistration failed (exit {rc}) registering {_image_name(moving, 'target')} "
                f"to {_image_name(fixed, 'T1w')}"
            )
        # the file maps fixed (ANTs world) -> moving (ANTs world); undo any deshearing of either header
        t1w2target = np.linalg.inv(s_moving) @ read_itk_affine(mat) @ s_fixed
        warped = ants.apply_transforms(fixed=fixed_ants, moving=moving_ants, transformlist=[mat],
                                       interpolator="linear")
        value = ants.image_similarity(fixed_ants, warped, metric_type="MattesMutualInformation",
                                      fixed_mask=mask_ants)
        # the same metric at the centre-of-mass start: a registration that did not beat its start has failed
        shift = np.asarray(ants.get_center_of_mass(moving_ants)) - np.asarray(ants.get_center_of_mass(fixed_ants))
        start = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                           translation=tuple(float(v) for v in shift))
        start_img = ants.apply_ants_transform_to_image(start, moving_ants, fixed_ants, interpolation="linear")
        value0 = ants.image_similarity(fixed_ants, start_img, metric_type="MattesMutualInformation",
                                       fixed_mask=mask_ants)
    params["metric_initial"] = -float(value0)
    target2t1w = np.linalg.inv(t1w2target)
    return RigidResult(
        target2t1w=target2t1w,
        t1w2target=t1w2target,
        metric=-float(value),
        seconds=time.perf_counter() - t0,
        parameters=params,
    )


@dataclass(frozen=True, eq=False)
class Alignment:
    """Result of :func:`align_to_t1w`: antspyx's answer and its refinement through the acquisition model.

    Attributes
    ----------
    target2t1w : array, shape (4, 4)
        The map to use: target world mm RAS -> T1w world mm RAS (the refined one when the refinement lowered the
        misfit, else antspyx's).
    ants : RigidResult
        antspyx's registration.
    refinement : RefineResult or None
        :func:`atlasgs_bids.imaging.refine.refine_rigid` from ``ants.target2t1w`` (None when not run).
    refined : bool
        Whether ``target2t1w`` is the refined map.
    seconds : float
        Wall-clock time of both steps.
    """

    target2t1w: np.ndarray
    ants: RigidResult
    refinement: object | None
    refined: bool
    seconds: float

    @property
    def t1w2target(self) -> np.ndarray:
        return np.linalg.inv(self.target2t1w)

    def write_itk(self, path: str | os.PathLike) -> Path:
        """The ITK text transform resampling the target onto the T1w (BIDS ``from-<target>_to-T1w_mode-image``)."""
        return write_itk_affine(path, self.t1w2target)

    def to_dict(self) -> dict:
        """JSON-ready record: the final map, antspyx's map and metric, and the refinement (misfit before/after)."""
        return {
            "target2t1w": np.asarray(self.target2t1w, dtype=float).tolist(),
            "metric": float(self.ants.metric), "metric_name": self.ants.metric_name,
            "metric_initial": self.ants.parameters.get("metric_initial"),
            "ants_target2t1w": np.asarray(self.ants.target2t1w, dtype=float).tolist(),
            "ants_seconds": float(self.ants.seconds),
            "parameters": dict(self.ants.parameters),
            "refined": bool(self.refined),
            "refinement": None if self.refinement is None else self.refinement.to_dict(),
            "seconds": float(self.seconds),
        }


def align_to_t1w(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    *,
    fixed_mask: nib.Nifti1Image | None,
    acquisition=None,
    seed: int = 0,
    threads: int | None = None,
    refine: bool = True,
) -> Alignment:
    """antspyx rigid registration (:func:`register_rigid`), then sub-voxel refinement through the target's
    acquisition model (:func:`atlasgs_bids.imaging.refine.refine_rigid`).

    Parameters
    ----------
    fixed, moving, fixed_mask, seed, threads
        As in :func:`register_rigid`. The refinement needs ``fixed_mask`` (it chooses the target voxels that count);
        without one it is skipped.
    acquisition : Acquisition, optional
        The target's slice profile and PSF (``SliceThickness``); default from the moving header.
    refine : bool
        Run the refinement. Its answer is kept only when it lowered the model misfit.

    Returns
    -------
    Alignment
    """
    from atlasgs_bids.imaging.refine import refine_rigid

    t0 = time.perf_counter()
    ants_result = register_rigid(fixed, moving, fixed_mask=fixed_mask, seed=seed, threads=threads)
    refinement, refined, final = None, False, ants_result.target2t1w
    if refine and fixed_mask is not None:
        refinement = refine_rigid(fixed, fixed_mask, moving, ants_result.target2t1w, acquisition)
        if refinement.misfit_after < refinement.misfit_before:
            refined, final = True, refinement.target2t1w
    return Alignment(target2t1w=final, ants=ants_result, refinement=refinement, refined=refined,
                     seconds=time.perf_counter() - t0)


_ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}


def apply_rigid(
    moving_img: nib.Nifti1Image,
    fixed_img: nib.Nifti1Image,
    target2t1w: np.ndarray,
    interpolation: str = "linear",
) -> nib.Nifti1Image:
    """Resample a target image onto the T1w grid through a rigid (or any affine) map. For QC and Dice only.

    Parameters
    ----------
    moving_img : nibabel image, shape (I', J', K') or (I', J', K', V)
        Target image, affine voxel -> target world mm RAS.
    fixed_img : nibabel image, shape (I, J, K, ...)
        Defines the output grid (T1w), affine voxel -> T1w world mm RAS.
    target2t1w : array, shape (4, 4)
        Target world RAS -> T1w world RAS (``RigidResult.target2t1w``).
    interpolation : {"nearest", "linear", "cubic"}
        Spline order 0, 1 or 3; outside the target's field of view the output is 0.

    Returns
    -------
    nibabel Nifti1Image, shape (I, J, K) or (I, J, K, V)
        float32 (``nearest`` keeps the input dtype), on the fixed affine.
    """
    if interpolation not in _ORDERS:
        raise ValueError(f"interpolation must be one of {sorted(_ORDERS)}, got {interpolation!r}")
    order = _ORDERS[interpolation]
    target2t1w = np.asarray(target2t1w, dtype=np.float64)
    # output voxel -> T1w world -> target world -> target voxel
    vox2vox = np.linalg.inv(moving_img.affine) @ np.linalg.inv(target2t1w) @ fixed_img.affine
    data = np.asanyarray(moving_img.dataobj)
    if order > 0:
        data = data.astype(np.float32)
    vols = data[..., None] if data.ndim == 3 else data
    out_shape = tuple(fixed_img.shape[:3])
    out = np.stack(
        [
            ndimage.affine_transform(vols[..., v], vox2vox[:3, :3], offset=vox2vox[:3, 3], output_shape=out_shape,
                                     order=order, mode="constant", cval=0.0)
            for v in range(vols.shape[-1])
        ],
        axis=-1,
    )
    out = out[..., 0] if data.ndim == 3 else out
    img = nib.Nifti1Image(out, fixed_img.affine)
    img.set_sform(fixed_img.affine, code=1)
    img.set_qform(fixed_img.affine, code=1)
    return img

"""A small synthetic BIDS dataset with known ground truth, built offline from nilearn's bundled MNI152 template.

nilearn ships the MNI ICBM152 2009 (nonlinear symmetric, skull-stripped) T1, GM and WM maps at 1 mm inside its
wheel, so nothing is downloaded. From them :func:`build_sample_dataset` writes::

    out_dir/bids/                      a valid raw BIDS dataset, one participant
        dataset_description.json  README  participants.tsv  participants.json
        sub-01/anat/sub-01_T1w.nii.gz      the template T1 on an isotropic grid (default 1.6 mm), int16
        sub-01/anat/sub-01_T2w.nii.gz      synthetic T2, thick axial slices, moved by a known rigid transform
        sub-01/anat/sub-01_T2w.json        with ``SliceThickness``
    out_dir/truth/                     ground truth, outside the BIDS dataset
        sub-01_space-T1w_T2w.nii.gz        the synthetic T2 object on the T1w grid (noise-free, no slice blur)
        sub-01_space-T1w_desc-brain_mask.nii.gz
        target2t1w_ras.txt                 (4, 4) target world mm RAS -> T1w world mm RAS
        truth.json                         every parameter used

Frames. The *object* lives in the T1w world frame (mm RAS, the MNI frame of the template). The T2w header places its
voxels in its own world frame, the "target world"; the point y (mm RAS) of the target world is the point
``x = target2t1w @ y`` of the T1w world. So the T2w voxel (i, j, k) sees the object around
``target2t1w @ affine_t2w @ (i, j, k, 1)``: a registration of the T2w to the T1w should return ``target2t1w``.

Signal model (units: arbitrary scanner units, CSF about 1000):
    T2(x) = 1000 * (0.35 WM(x) + 0.6 GM(x) + 1.0 CSF(x)) * bias(x),  CSF = clip(mask - GM - WM, 0, 1)
    bias(x) = exp(g . (x - c) / 100 mm), |g| = 0.08, direction from ``seed``; c = the brain's centroid.
Each grid (T1w or T2w) samples the 1 mm object through a Gaussian PSF whose FWHM is the voxel spacing in plane
and the slice thickness through plane (the 1 mm of the template counts as its own PSF). The T2w then gets Rician
noise (sigma = 15) from ``np.random.default_rng(seed)``.

Resolution. The template ships at 1 mm with a 1.88 L brain mask (T1 > 0.2): 1.88 M brain voxels at 1 mm,
0.96 M at 1.25 mm, 558 k at 1.5 mm, 460 k at 1.6 mm, 383 k at 1.7 mm. The default, 1.6 mm (the T1 resampled with
scipy), keeps the demo near 400 k brain voxels; pass ``downsample_mm=1.0`` for the native grid.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from atlasgs_bids.errors import InputError
from atlasgs_bids.version import __version__

DEMO_T1W_MM = 1.6
"""Default isotropic T1w voxel size (mm) of the sample, used when ``downsample_mm`` is None."""
ROTATION_AXIS = (1.0, 2.0, 3.0)
"""Axis (T1w world, unnormalised) of the rotation of ``target2t1w``."""
ROTATION_DEG = 6.0
"""Angle (degrees) of the rotation of ``target2t1w``, about the world origin (MNI origin, near the centre)."""
TRANSLATION_MM = (10.0 / 3.0, -5.0 / 3.0, 10.0 / 3.0)
"""Translation (mm, T1w world) of ``target2t1w``; its length is 5 mm."""
T2_WEIGHTS = {"wm": 0.35, "gm": 0.6, "csf": 1.0}
T2_SCALE = 1000.0
BIAS_GRADIENT = 0.08
"""Size of the log-bias gradient per 100 mm (about +-8 % over a brain)."""
NOISE_SIGMA = 15.0
"""Rician noise sigma in T2w units (WM about 350, CSF about 1000)."""
T1_SCALE = 1000.0
"""The template T1 (0..1) is written as int16 counts 0..1000."""
MARGIN_MM = 6.0
"""Margin (mm) around the brain's bounding box for the T1w field of view."""
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
SUBJECT = "01"
CORONAL_MOTION = ((3.0, -1.0, 1.0), 4.0, (-2.0, 3.0, 1.0))
"""Axis, angle (degrees) and translation (mm) of the optional coronal stack's ``target2t1w``."""
CORONAL_GAIN = 1.25
"""The optional coronal stack's intensity scale relative to the axial one (another receiver gain)."""


@dataclass(frozen=True)
class SampleInfo:
    """Where :func:`build_sample_dataset` wrote things, and the true transform.

    Attributes
    ----------
    bids_dir : Path
        The BIDS dataset (``out_dir/bids``).
    t1w, t2w : Path
        ``sub-01_T1w.nii.gz`` and ``sub-01_T2w.nii.gz`` inside it.
    truth_t2w : Path
        The noise-free T2 object (bias included) on the T1w grid, float32.
    truth_mask : Path
        The brain mask on the T1w grid, uint8 0/1.
    target2t1w : (4, 4) float64
        Maps target (T2w) world mm RAS -> T1w world mm RAS; also in ``truth/target2t1w_ras.txt``.
    slice_thickness : float
        T2w slice thickness and spacing, mm.
    seconds : float
        Build time.
    t2w_coronal : Path or None
        ``sub-01_acq-cor_T2w.nii.gz``, the optional second (coronal) stack, else None.
    """

    bids_dir: Path
    t1w: Path
    t2w: Path
    truth_t2w: Path
    truth_mask: Path
    target2t1w: np.ndarray = field(compare=False)
    slice_thickness: float = 0.0
    seconds: float = field(default=0.0, compare=False)
    t2w_coronal: Path | None = None


def rigid_matrix(axis: tuple[float, float, float], angle_deg: float, translation_mm: tuple[float, ...]) -> np.ndarray:
    """A (4, 4) rigid transform: rotation of ``angle_deg`` about ``axis`` through the origin, then a translation (mm).

    >>> m = rigid_matrix((0, 0, 1), 90.0, (1, 0, 0))
    >>> np.round(m @ [1, 0, 0, 1], 6).tolist()
    [1.0, 1.0, 0.0, 1.0]
    """
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)  # Rodrigues
    out[:3, 3] = translation_mm
    return out


def sample_through_psf(
    data: np.ndarray,
    affine: np.ndarray,
    grid_affine: np.ndarray,
    shape: tuple[int, int, int],
    fwhm_mm: tuple[float, float, float],
    *,
    source_fwhm_mm: float = 1.0,
) -> np.ndarray:
    """Measure an object through a Gaussian PSF on an arbitrary (rotated, anisotropic) voxel grid.

    Parameters
    ----------
    data : (I, J, K) float
        The object, on an isotropic grid.
    affine : (4, 4)
        ``data`` voxel index -> world mm RAS (the object's frame).
    grid_affine : (4, 4)
        Output voxel index -> the same world frame (compose a rigid motion in here). Its axes must be orthogonal.
    shape : (I', J', K')
        Output shape.
    fwhm_mm : (3,)
        PSF FWHM along each output voxel axis, mm.
    source_fwhm_mm : float
        The PSF already in ``data`` (its voxel size); only the remainder is added.

    Returns
    -------
    (I', J', K') float32

    Notes
    -----
    The object is resampled (linear) onto a fine grid with the output's axes and the source's spacing, blurred there
    by a separable Gaussian (the PSF is axis-aligned in that frame), then sampled (linear) at the output centres.
    """
    affine = np.asarray(affine, dtype=np.float64)
    grid_affine = np.asarray(grid_affine, dtype=np.float64)
    step = float(nib.affines.voxel_sizes(affine).min())
    zooms = nib.affines.voxel_sizes(grid_affine)
    sigma_mm = np.sqrt(np.maximum(np.asarray(fwhm_mm, float) ** 2 - source_fwhm_mm**2, 0.0)) * FWHM_TO_SIGMA
    pad = np.ceil(3 * sigma_mm / step).astype(int) + 2  # fine voxels of margin for the blur
    # Fine grid: the output's axis directions, `step` mm spacing, starting `pad` voxels before output voxel 0.
    fine = np.eye(4)
    fine[:3, :3] = grid_affine[:3, :3] / zooms * step
    fine[:3, 3] = grid_affine[:3, 3] - fine[:3, :3] @ pad
    fine_shape = tuple(int(n) for n in np.ceil((np.asarray(shape) - 1) * zooms / step) + 2 * pad + 1)
    fine2src = np.linalg.inv(affine) @ fine
    vol = ndi.affine_transform(
        np.asarray(data, dtype=np.float32), fine2src[:3, :3], fine2src[:3, 3], output_shape=fine_shape, order=1
    )
    vol = ndi.gaussian_filter(vol, sigma_mm / step, mode="constant", truncate=3.0)
    out2fine = np.linalg.inv(fine) @ grid_affine
    return ndi.affine_transform(vol, out2fine[:3, :3], out2fine[:3, 3], output_shape=tuple(shape), order=1)


def _load_templates() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The 1 mm MNI152 2009 maps bundled with nilearn (no download): t1 (0..1), gm, wm, mask; and their affine."""
    from nilearn import datasets  # local: nilearn is slow to import and only the demo needs it

    t1 = datasets.load_mni152_template(resolution=1)
    maps = {
        "t1": t1.get_fdata(dtype=np.float32),
        "gm": datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
        # T1 > 0.2; holes filled so that no enclosed CSF is lost
        "mask": ndi.binary_fill_holes(np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0),
    }
    return maps, np.asarray(t1.affine, dtype=np.float64)


def _box_grid(lo: np.ndarray, hi: np.ndarray, zooms: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned RAS grid with voxel sizes ``zooms`` (mm) whose voxel centres cover the box [lo, hi] (mm)."""
    shape = tuple(int(n) for n in np.ceil((hi - lo) / zooms) + 1)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = lo
    return affine, shape


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type, *, slice_axis: int | None = None) -> None:
    """Write a scanner-like NIfTI-1: sform = qform = ``affine`` (code 1, scanner), mm/s units."""
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if slice_axis is not None:
        img.header.set_dim_info(slice=slice_axis)
    img.header["descrip"] = b"atlasgs-bids sample (MNI152 2009)"
    nib.save(img, str(path))


def _nilearn_version() -> str:
    from importlib.metadata import version

    return version("nilearn")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_bids_text(bids: Path, *, t1_mm: float, thickness: float, factor: int) -> None:
    _write_json(
        bids / "dataset_description.json",
        {
            "Name": "atlasgs-bids sample: MNI152 2009 T1w with a synthetic thick-slice T2w",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": (
                "Derived from the MNI ICBM152 2009 nonlinear symmetric template as bundled with nilearn "
                "(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
                "Institute, McGill University; free use with this notice, see README and "
                "https://nilearn.github.io/stable/modules/generated/nilearn.datasets.load_mni152_template.html)"
            ),
            "Authors": ["atlasgs-bids developers"],
            "GeneratedBy": [
                {"Name": "atlasgs-bids", "Version": __version__,
                 "Description": "atlasgs_bids.data.sample.build_sample_dataset (synthetic sample)"}
            ],
            "SourceDatasets": [
                {"URL": "https://nilearn.github.io/stable/modules/generated/nilearn.datasets.load_mni152_template.html",
                 "Version": f"nilearn {_nilearn_version()}"}
            ],
            "HowToAcknowledge": "Cite Fonov et al. 2011 (NeuroImage 54:313) and Fonov et al. 2009 for MNI152 2009.",
        },
    )
    (bids / "README").write_text(
        "atlasgs-bids sample dataset\n===========================\n\n"
        "Synthetic, for demos and tests; not a real acquisition. One participant (sub-01):\n\n"
        f"- sub-01_T1w: the skull-stripped MNI ICBM152 2009c T1 template (nilearn's copy), {t1_mm:g} mm isotropic.\n"
        "- sub-01_T2w: a T2-like contrast made from the template's tissue maps (CSF bright, GM medium, WM dark),\n"
        f"  with a mild smooth bias and Rician noise, moved by a 6 degree / 5 mm rigid transform and acquired as\n"
        f"  thick axial slices ({thickness:g} mm = {factor} x {t1_mm:g} mm, Gaussian slice profile).\n\n"
        "The T1w is already skull-stripped. Ground truth (the T2 on the T1w grid, the transform, the brain mask) is\n"
        "written next to this dataset, in ../truth, not inside it.\n\n"
        "MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal\n"
        "Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this software and\n"
        "its documentation for any purpose and without fee is hereby granted, provided that the above copyright\n"
        "notice appear in all copies. The authors and McGill University make no representations about the\n"
        "suitability of this software for any purpose. It is provided \"as is\" without express or implied warranty.\n"
        "References: Fonov et al., NeuroImage 54(1):313-327, 2011; Fonov et al., NeuroImage 47:S102, 2009.\n"
    )
    (bids / "participants.tsv").write_text(f"participant_id\tspecies\nsub-{SUBJECT}\thomo sapiens\n")
    _write_json(
        bids / "participants.json",
        {"species": {"Description": "binomial species name (the template averages 152 adults)"}},
    )


def build_sample_dataset(
    out_dir: Path, *, factor: int = 4, seed: int = 0, downsample_mm: float | None = None, coronal: bool = False
) -> SampleInfo:
    """Write the sample BIDS dataset (``out_dir/bids``) and its ground truth (``out_dir/truth``).

    Parameters
    ----------
    out_dir : Path
        Created if missing; files already there with the same names are overwritten.
    factor : int
        T2w slice spacing and thickness as a multiple of the T1w voxel size (>= 1).
    seed : int
        Seeds the bias direction and the noise. Same seed, byte-identical data arrays.
    downsample_mm : float or None
        Isotropic T1w voxel size, mm (>= 1, the template's own). None: :data:`DEMO_T1W_MM`.
    coronal : bool
        Also write a coronal stack of the same T2 object, ``sub-01_acq-cor_T2w.nii.gz`` (slices across voxel axis
        1, same thickness, its own head motion :data:`CORONAL_MOTION` and receiver gain :data:`CORONAL_GAIN`), for
        ``--fuse-stacks``. The axial stack is unchanged (its noise is drawn first).

    Returns
    -------
    SampleInfo
    """
    start = time.perf_counter()
    t1_mm = DEMO_T1W_MM if downsample_mm is None else float(downsample_mm)
    if not np.isfinite(t1_mm) or t1_mm < 1.0:
        raise InputError(f"downsample_mm must be >= 1.0 mm (the template ships at 1 mm), got {downsample_mm}")
    if int(factor) != factor or factor < 1:
        raise InputError(f"factor must be a positive integer, got {factor}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another output folder for the sample")
    factor = int(factor)
    rng = np.random.default_rng(seed)
    maps, src_affine = _load_templates()
    mask = maps["mask"]

    # The 1 mm T2 object (T1w world), with its smooth bias field.
    csf = np.clip(mask - maps["gm"] - maps["wm"], 0.0, 1.0)
    obj = T2_SCALE * (T2_WEIGHTS["wm"] * maps["wm"] + T2_WEIGHTS["gm"] * maps["gm"] + T2_WEIGHTS["csf"] * csf)
    ijk = np.argwhere(mask)
    world = nib.affines.apply_affine(src_affine, ijk)
    centre = world.mean(axis=0)
    direction = rng.normal(size=3)
    gradient = BIAS_GRADIENT * direction / np.linalg.norm(direction)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in obj.shape], indexing="ij")
    log_bias = sum(
        gradient[a] * (src_affine[a, a] * grids[a] + src_affine[a, 3] - centre[a]) / 100.0 for a in range(3)
    )
    obj = (obj * np.exp(log_bias)).astype(np.float32)
    del grids, log_bias

    # T1w grid: axis-aligned, t1_mm isotropic, the brain's bounding box plus a margin.
    t1_affine, t1_shape = _box_grid(world.min(0) - MARGIN_MM, world.max(0) + MARGIN_MM, np.full(3, t1_mm))
    t1_fwhm = (t1_mm,) * 3
    t1 = sample_through_psf(maps["t1"], src_affine, t1_affine, t1_shape, t1_fwhm)
    truth = sample_through_psf(obj, src_affine, t1_affine, t1_shape, t1_fwhm)
    truth_mask = sample_through_psf(mask.astype(np.float32), src_affine, t1_affine, t1_shape, t1_fwhm) > 0.5

    # T2w grid: axis-aligned in the target world, covering the T1w field of view moved into it.
    target2t1w = rigid_matrix(ROTATION_AXIS, ROTATION_DEG, TRANSLATION_MM)
    corners = np.array([[i, j, k] for i in (0, t1_shape[0] - 1) for j in (0, t1_shape[1] - 1)
                        for k in (0, t1_shape[2] - 1)], dtype=np.float64)
    in_target = nib.affines.apply_affine(np.linalg.inv(target2t1w) @ t1_affine, corners)
    thickness = factor * t1_mm
    t2_zooms = np.array([t1_mm, t1_mm, thickness])
    t2_affine, t2_shape = _box_grid(in_target.min(0), in_target.max(0), t2_zooms)
    clean = sample_through_psf(obj, src_affine, target2t1w @ t2_affine, t2_shape, tuple(t2_zooms))
    noise = rng.normal(scale=NOISE_SIGMA, size=(2, *t2_shape))
    t2 = np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude

    bids, truth_dir = out_dir / "bids", out_dir / "truth"
    anat = bids / f"sub-{SUBJECT}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    _write_bids_text(bids, t1_mm=t1_mm, thickness=thickness, factor=factor)
    t1_path, t2_path = anat / f"sub-{SUBJECT}_T1w.nii.gz", anat / f"sub-{SUBJECT}_T2w.nii.gz"
    _save(np.rint(np.clip(t1, 0, None) * T1_SCALE), t1_affine, t1_path, np.int16)
    _save(np.rint(np.clip(t2, 0, 32767)), t2_affine, t2_path, np.int16, slice_axis=2)
    _write_json(
        anat / f"sub-{SUBJECT}_T2w.json",
        {"SliceThickness": thickness, "SpacingBetweenSlices": thickness, "SliceEncodingDirection": "k"},
    )
    coronal_path = None
    if coronal:
        cor2t1w = rigid_matrix(*CORONAL_MOTION)
        in_cor = nib.affines.apply_affine(np.linalg.inv(cor2t1w) @ t1_affine, corners)
        cor_zooms = np.array([t1_mm, thickness, t1_mm])
        cor_affine, cor_shape = _box_grid(in_cor.min(0), in_cor.max(0), cor_zooms)
        clean = sample_through_psf(obj, src_affine, cor2t1w @ cor_affine, cor_shape, tuple(cor_zooms))
        noise = rng.normal(scale=NOISE_SIGMA, size=(2, *cor_shape))
        cor = CORONAL_GAIN * np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)
        coronal_path = anat / f"sub-{SUBJECT}_acq-cor_T2w.nii.gz"
        _save(np.rint(np.clip(cor, 0, 32767)), cor_affine, coronal_path, np.int16, slice_axis=1)
        _write_json(anat / f"sub-{SUBJECT}_acq-cor_T2w.json",
                    {"SliceThickness": thickness, "SpacingBetweenSlices": thickness, "SliceEncodingDirection": "j"})
        np.savetxt(truth_dir / "coronal2t1w_ras.txt", cor2t1w, fmt="%.12f",
                   header="coronal T2w world mm RAS -> T1w world mm RAS; its data are CORONAL_GAIN x the axial's")
    truth_path = truth_dir / f"sub-{SUBJECT}_space-T1w_T2w.nii.gz"
    mask_path = truth_dir / f"sub-{SUBJECT}_space-T1w_desc-brain_mask.nii.gz"
    _save(truth, t1_affine, truth_path, np.float32)
    _save(truth_mask, t1_affine, mask_path, np.uint8)
    np.savetxt(truth_dir / "target2t1w_ras.txt", target2t1w, fmt="%.12f",
               header="target (T2w) world mm RAS -> T1w world mm RAS; x_t1w = M @ [y_target, 1]")
    seconds = time.perf_counter() - start
    _write_json(
        truth_dir / "truth.json",
        {
            "seed": seed, "factor": factor, "t1w_voxel_mm": t1_mm, "slice_thickness_mm": thickness,
            "target2t1w": target2t1w.tolist(), "rotation_axis": list(ROTATION_AXIS), "rotation_deg": ROTATION_DEG,
            "translation_mm": list(TRANSLATION_MM), "t2_weights": T2_WEIGHTS, "t2_scale": T2_SCALE,
            "bias": {"log_gradient_per_100mm": gradient.tolist(), "centre_mm": centre.tolist()},
            "noise": {"kind": "rician", "sigma": NOISE_SIGMA}, "t1w_shape": list(t1_shape),
            "t2w_shape": list(t2_shape), "brain_voxels": int(truth_mask.sum()),
            "truth_note": "truth T2 = the object (bias included, no noise) through the T1w voxel PSF",
        },
    )
    return SampleInfo(
        bids_dir=bids, t1w=t1_path, t2w=t2_path, truth_t2w=truth_path, truth_mask=mask_path,
        target2t1w=target2t1w, slice_thickness=thickness, seconds=seconds, t2w_coronal=coronal_path,
    )

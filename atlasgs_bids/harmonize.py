"""Stage 2 on images: the one library entry point that the Nipype interface, the benchmark and the docs use.

``harmonize(scaffold, target, target2t1w, reference, brain_mask)`` fits a target's appearance on the frozen scaffold
through its own acquisition model (the target is never resampled), renders it on the reference (T1w) grid inside
the brain mask and the target's field of view, and returns the image, the data-consistency residual on the
target's grid and the diagnostics. Frames: ``target2t1w`` maps the target's world (mm RAS, its NIfTI affine) to the
T1w world; the reference's affine maps its voxels to the T1w world.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import nibabel as nib
import numpy as np

from atlasgs_bids.gaussians.appearance import Appearance, AppearanceOptions, Stack, fit_stacks
from atlasgs_bids.gaussians.render import render
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.gaussians.uncertainty import N_SAMPLES, SMOOTH_MM
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.grid import Grid
from atlasgs_bids.imaging.nifti import on_grid_of


@dataclass(frozen=True)
class HarmonizeOptions:
    """quality : stage-2 preset (:data:`atlasgs_bids.presets.QUALITIES`); ``appearance`` overrides it when given
    device : torch device ("cpu" or "cuda", already resolved)
    slice_thickness : the target's SliceThickness in mm (None: the slice spacing)
    uncertainty : also compute the calibrated posterior SD map (``Harmonized.sd``; ADR 0008)
    """

    quality: str = "default"
    device: str = "cpu"
    slice_thickness: float | None = None
    appearance: AppearanceOptions | None = None
    uncertainty: bool = True

    def appearance_options(self) -> AppearanceOptions:
        return self.appearance if self.appearance is not None else AppearanceOptions.preset(self.quality)


@dataclass
class Harmonized:
    """image : the target on the reference grid (float32, the reference's header codes; 3D or 4D)
    residual : measured minus the forward prediction, first volume, on the target's grid (0 outside the fit)
    residuals : with several stacks, every stack's residual (``residual`` is the first's)
    appearance : the fitted :class:`~atlasgs_bids.gaussians.appearance.Appearance`
    diagnostics : JSON-ready figures (appearance diagnostics, acquisition, relative residual, timings; with the SD
        map ``uncertainty`` (calibration, seconds) and ``sd_median``)
    sd : the posterior SD of ``image`` (first volume), same grid and units, 0 outside the rendered voxels; None when
        ``HarmonizeOptions.uncertainty`` is False
    """

    image: nib.Nifti1Image
    residual: nib.Nifti1Image
    appearance: Appearance
    diagnostics: dict = field(default_factory=dict)
    sd: nib.Nifti1Image | None = None
    residuals: list[nib.Nifti1Image] = field(default_factory=list)


def harmonize(scaffold: Scaffold, target: nib.spatialimages.SpatialImage, target2t1w: np.ndarray,
              reference: nib.spatialimages.SpatialImage, brain_mask: np.ndarray,
              options: HarmonizeOptions | None = None, *, acquisition: Acquisition | None = None) -> Harmonized:
    """Stage 2 on one target, rendered on the reference grid.

    Parameters
    ----------
    scaffold : stage-1 result on the reference's grid (T1w world mm RAS)
    target : the target image (3D or 4D), its own grid and units
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS (the inverse of the ITK transform that resamples
        the target onto the T1w; :func:`atlasgs_bids.imaging.transforms.read_target2t1w`)
    reference : the T1w: output grid and header
    brain_mask : (I, J, K) bool on the reference grid; voxels outside it (or outside the target's field of view,
        where no measurement constrains the field) are 0
    options : :class:`HarmonizeOptions`
    acquisition : the target's acquisition model, when known better than its header; by default built from the
        header and ``options.slice_thickness`` (Gaussian profile). With a tuning preset the fit may replace its
        slice profile by one chosen from the target's held-out slices; ``diagnostics["acquisition"]`` records the
        profile used and the header's
    """
    return harmonize_stacks(scaffold, [target], [target2t1w], reference, brain_mask, options,
                            acquisitions=None if acquisition is None else [acquisition])


def harmonize_stacks(scaffold: Scaffold, targets: Sequence[nib.spatialimages.SpatialImage],
                     target2t1w: Sequence[np.ndarray], reference: nib.spatialimages.SpatialImage,
                     brain_mask: np.ndarray, options: HarmonizeOptions | None = None, *,
                     acquisitions: Sequence[Acquisition | None] | None = None,
                     slice_thickness: Sequence[float | None] | None = None) -> Harmonized:
    """Stage 2 on one or several stacks of one contrast, fused in one solve
    (:func:`~atlasgs_bids.gaussians.appearance.fit_stacks`), rendered on the reference grid.

    ``targets[0]`` is the reference stack: the output is in its units, and it alone chooses the hyperparameters.
    ``target2t1w[s]`` maps stack s's world to the T1w world (mm RAS); ``acquisitions[s]`` replaces the header model
    of stack s when given; ``slice_thickness[s]`` is its SliceThickness in mm (default ``options.slice_thickness``
    for every stack). The image covers the union of the stacks' fields of view; ``residual`` is the reference
    stack's, ``residuals`` every stack's (each on its own grid and in its own units).
    """
    opts = options or HarmonizeOptions()
    n = len(targets)
    if n == 0 or len(target2t1w) != n:
        raise ValueError(f"harmonize_stacks needs one transform per stack, got {n} stacks and "
                         f"{len(target2t1w)} transforms")
    acquisitions = list(acquisitions) if acquisitions is not None else [None] * n
    thickness = list(slice_thickness) if slice_thickness is not None else [opts.slice_thickness] * n
    datas, acqs, stacks = [], [], []
    for img, xfm, acq, thick in zip(targets, target2t1w, acquisitions, thickness):
        data = np.asarray(img.get_fdata(dtype=np.float32))
        acq = acq or Acquisition.from_geometry(img.affine, data.shape[:3], slice_thickness=thick)
        datas.append(data)
        acqs.append(acq)
        stacks.append(Stack(data, acq, np.asarray(xfm, dtype=np.float64)))
    appearance = fit_stacks(scaffold, stacks, opts.appearance_options(), device=opts.device,
                            posterior=opts.uncertainty)
    out_grid = Grid.of(reference)
    mask = np.asarray(brain_mask, dtype=bool)
    in_fov = mask & appearance.field_of_view(out_grid)
    t0 = time.perf_counter()
    out = render(appearance, out_grid.affine, out_grid.shape, device=opts.device, mask=mask)
    render_s = time.perf_counter() - t0

    diag = dict(appearance.diagnostics)
    history = [float(v) for v in diag.pop("history", None) or []]
    if history:
        diag["final_relative_residual"] = history[-1]
    diag["history"] = history
    residuals = []
    for i, (img, data) in enumerate(zip(targets, datas)):
        residual, rel = residual_map(appearance.for_stack(i), data)
        res_img = nib.Nifti1Image(residual, img.affine)
        res_img.header.set_xyzt_units("mm", "sec")
        residuals.append(res_img)
        if i == 0:
            diag["relative_residual"] = rel
    diag["brain_fraction_in_target_fov"] = float(in_fov.sum() / max(int(mask.sum()), 1))
    records = [_acquisition_record(appearance.for_stack(i).acquisition or acq, acq, thick)
               for i, (acq, thick) in enumerate(zip(acqs, thickness))]
    diag["acquisition"] = records[0]
    if n > 1:
        for rec, acq_rec in zip(diag["stacks"], records):
            rec["acquisition"] = acq_rec
    diag["render_seconds"] = render_s
    sd_img = None
    if opts.uncertainty:
        # calibrated on the reference stack, through the slice profile its fit used (maybe chosen from the data)
        sd, diag["uncertainty"] = sd_map(appearance, datas[0], appearance.acquisition or acqs[0],
                                         np.asarray(target2t1w[0], dtype=np.float64), out_grid, in_fov,
                                         device=opts.device)
        diag["sd_median"] = diag["uncertainty"]["sd_median"]
        sd_img = on_grid_of(sd, reference)
    return Harmonized(image=on_grid_of(np.asarray(out, dtype=np.float32), reference), residual=residuals[0],
                      appearance=appearance, diagnostics=diag, residuals=residuals, sd=sd_img)


def sd_map(appearance: Appearance, data: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray, grid: Grid,
           mask: np.ndarray, *, device: str = "cpu") -> tuple[np.ndarray, dict]:
    """The calibrated posterior SD of a fit on ``grid`` inside ``mask``, and its JSON-ready record.

    Calibrated on the target's own held-out slices (:func:`~atlasgs_bids.qc.calibration.calibrate_sd`), rendered by
    :func:`~atlasgs_bids.gaussians.uncertainty.render_sd`. Returns float32 (I, J, K) in the target's units (0
    outside ``mask``) and ``{"method", "calibration", "sd_median", "seconds", "fit_seconds", "relative_cost"}``:
    ``sd_median`` over ``mask`` (target units), ``seconds`` the map's whole cost (posterior read-out, calibration
    fit, render), ``relative_cost`` that over the fit's ``seconds``.
    """
    from atlasgs_bids.gaussians.uncertainty import noise_reference, render_sd
    from atlasgs_bids.qc.calibration import calibrate_sd

    t0 = time.perf_counter()
    sigma = noise_reference(appearance)
    used = AppearanceOptions(**appearance.diagnostics["options"])
    cal = calibrate_sd(appearance.scaffold, data, acquisition, target2t1w, used, noise_sigma=sigma, device=device)
    sd = render_sd(appearance, grid.affine, grid.shape, mask=mask, calibration=cal.scale, device=device)
    seconds = time.perf_counter() - t0 + float(appearance.diagnostics.get("posterior_seconds") or 0.0)
    fit_s = float(appearance.diagnostics["seconds"])
    record = {"method": SD_METHOD, "calibration": cal.to_json(),
              "sd_median": float(np.median(sd[mask])) if mask.any() else None,
              "seconds": seconds, "fit_seconds": fit_s, "relative_cost": seconds / fit_s if fit_s > 0 else None}
    return sd, record


#: How the SD map is made, for its sidecar.
SD_METHOD = (f"posterior SD of the stage-2 linear model (its penalty read as a Gaussian prior): the target's noise "
             f"SD x the root mean square of {N_SAMPLES} posterior draws (perturb-and-solve, one multi-column "
             "conjugate-gradient solve with the fit's preconditioner) read out through each output voxel's PSF and "
             f"smoothed {SMOOTH_MM:g} mm; the amplitude bounds ignored; scaled by one factor k fitted so that 95 % "
             "of the residuals on the target's own held-out slices lie within 1.96 SD (noise included there, not in "
             "the map) (ADR 0008)")


def _acquisition_record(used: Acquisition, header: Acquisition, slice_thickness: float | None) -> dict:
    """JSON record of the slice profile a stack was fitted through (``used``: maybe chosen from the data) beside
    its header's."""
    axis = int(used.slice_axis)
    return {"slice_axis": axis, "slice_spacing_mm": float(used.zooms[axis]), **used.profile_record(),
            "header_profile": header.profile, "header_slice_thickness_mm": header.thickness_mm,
            "slice_thickness_source": "SliceThickness" if slice_thickness is not None
            else "slice spacing (no SliceThickness in the sidecar)"}


def residual_map(appearance: Appearance, data: np.ndarray) -> tuple[np.ndarray, float]:
    """The data-consistency residual of a stage-2 fit on the target's grid, from what the fit kept.

    Parameters
    ----------
    appearance : fitted on ``data`` (its ``fitted_ijk`` and ``fitted_residual``: measured minus the forward
        prediction ``A c``, target units)
    data : (I, J, K) or (I, J, K, V) the target, its own grid and units

    Returns
    -------
    residual : float32 (I, J, K), first volume, target units, 0 outside the fitted voxels
    relative_residual : ``||y - A c||_2 / ||y||_2`` over every fitted voxel and volume (0 when y is all 0)
    """
    vol = np.asarray(data, dtype=np.float32).reshape(*np.shape(data)[:3], -1)
    ijk, diff = appearance.fitted_ijk, appearance.fitted_residual
    y = vol[tuple(ijk.T)]
    out = np.zeros(vol.shape[:3], dtype=np.float32)
    out[tuple(ijk.T)] = diff[:, 0]
    norm = float(np.linalg.norm(y))
    return out, (float(np.linalg.norm(diff)) / norm if norm > 0 else 0.0)

"""Fitting interfaces: the subject's Gaussian scaffold (stage 1) and a target's appearance + render (stage 2)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


def _threads(n: int) -> None:
    import torch

    if n and n > 0:
        torch.set_num_threads(int(n))


def fit_scaffold_file(t1w_file: str | os.PathLike, mask_file: str | os.PathLike, out_file: str | os.PathLike) -> dict:
    """Build the lattice scaffold of the RAS+ T1w inside the mask (one Gaussian per voxel, nothing fitted: no quality,
    seed or device to choose); save it (``.npz`` + ``.json``); return ``n_gaussians`` and ``seconds``."""
    from atlasgs_bids.gaussians.io import save_scaffold
    from atlasgs_bids.gaussians.scaffold import lattice_scaffold

    t0 = time.perf_counter()
    t1w = nib.load(str(t1w_file))
    mask = np.asarray(nib.load(str(mask_file)).dataobj) > 0
    scaffold = lattice_scaffold(t1w.get_fdata(dtype=np.float32), t1w.affine, mask)
    save_scaffold(scaffold, out_file)
    return {"n_gaussians": int(scaffold.n_gaussians), "seconds": time.perf_counter() - t0}


def harmonize_file(scaffold_file: str | os.PathLike, target_file: str | os.PathLike,
                   xfm_file: str | os.PathLike, t1w_file: str | os.PathLike, mask_file: str | os.PathLike,
                   out_file: str | os.PathLike, *, slice_thickness: float | None = None, quality: str = "default",
                   device: str = "cpu", threads: int = 1, residual_file: str | os.PathLike | None = None) -> dict:
    """Stage 2 on one target, then render it on the T1w grid.

    The target is used on its own grid (never resampled before fitting); ``xfm_file`` is the ITK transform that
    resamples the target onto the T1w, i.e. it holds T1w -> target (RAS after :func:`read_itk_affine`), so
    ``target2t1w`` is its inverse. Writes ``out_file`` (float32, T1w grid, 3D or 4D) and returns the appearance
    diagnostics (JSON-safe) plus ``render_seconds``, the CG convergence ``history`` (relative residual per
    iteration) and ``relative_residual`` (data consistency: ``||y - A c|| / ||y||`` over the fitted voxels and
    volumes, target units). With ``residual_file``, also writes the residual ``y - A c`` of the first volume on the
    target's grid (float32, 0 outside the fitted voxels; :func:`residual_map`).
    """
    from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance
    from atlasgs_bids.gaussians.io import load_scaffold
    from atlasgs_bids.gaussians.render import render
    from atlasgs_bids.imaging.acquisition import Acquisition
    from atlasgs_bids.imaging.nifti import load_nifti, on_grid_of, save_nifti
    from atlasgs_bids.imaging.transforms import read_itk_affine

    _threads(threads)
    scaffold = load_scaffold(scaffold_file)
    target = load_nifti(target_file)
    data = target.get_fdata(dtype=np.float32)
    target2t1w = np.linalg.inv(read_itk_affine(xfm_file))
    acq = Acquisition.from_geometry(target.affine, data.shape[:3], slice_thickness=slice_thickness)
    t1w = nib.load(str(t1w_file))
    mask = np.asarray(nib.load(str(mask_file)).dataobj) > 0
    appearance = fit_appearance(scaffold, data, acq, target2t1w, AppearanceOptions.preset(quality), device=device)
    # Render only where the target measured something: brain-mask voxels inside the target's field of view (a
    # target slab that does not cover the whole brain must not be extrapolated from the T1w alone).
    fov = field_of_view_mask(t1w.affine, t1w.shape[:3], target.affine, data.shape[:3], target2t1w)
    render_mask = mask & fov
    t0 = time.perf_counter()
    out = render(appearance, t1w.affine, t1w.shape[:3], device=device, mask=render_mask)
    render_s = time.perf_counter() - t0
    save_nifti(on_grid_of(np.asarray(out, dtype=np.float32), t1w), out_file)  # the T1w's header codes, mm
    raw = dict(appearance.diagnostics)
    diag = json_safe({k: v for k, v in raw.items() if k != "history"})
    history = list(raw.get("history") or [])
    if history:
        diag["final_relative_residual"] = float(history[-1])
    diag["history"] = [float(v) for v in history]
    t0 = time.perf_counter()
    resid, rel = residual_map(appearance, data)
    diag["relative_residual"] = rel
    diag["residual_seconds"] = time.perf_counter() - t0
    if residual_file is not None:
        res_img = nib.Nifti1Image(resid, target.affine)
        res_img.header.set_xyzt_units("mm", "sec")
        save_nifti(res_img, residual_file)
    diag["brain_fraction_in_target_fov"] = float(render_mask.sum() / max(int(mask.sum()), 1))
    zooms = np.sqrt((target.affine[:3, :3] ** 2).sum(axis=0))
    diag["acquisition"] = {"slice_axis": int(acq.slice_axis),
                           "slice_spacing_mm": float(zooms[acq.slice_axis]),
                           "slice_thickness_mm": float(acq.fwhm_vox[acq.slice_axis] * zooms[acq.slice_axis]),
                           "slice_thickness_source": "SliceThickness" if slice_thickness is not None
                           else "slice spacing (no SliceThickness in the sidecar)",
                           "profile": acq.profile}
    diag["render_seconds"] = render_s
    return diag


def residual_map(appearance, data: np.ndarray) -> tuple[np.ndarray, float]:
    """The data-consistency residual of a stage-2 fit on the target's grid, from what the fit kept.

    Parameters
    ----------
    appearance : :class:`~atlasgs_bids.gaussians.appearance.Appearance` fitted on ``data`` (its ``fitted_ijk`` and
        ``fitted_residual``: measured minus the forward prediction ``A c``, target units)
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


def field_of_view_mask(t1w_affine: np.ndarray, t1w_shape: tuple[int, int, int], target_affine: np.ndarray,
                       target_shape: tuple[int, int, int], target2t1w: np.ndarray, *,
                       margin_vox: float = 1.0) -> np.ndarray:
    """T1w voxels whose centre lies inside the target's field of view (the rule of the core's ``render``).

    Parameters
    ----------
    t1w_affine : (4, 4) T1w voxel index -> T1w world mm RAS
    t1w_shape : (I, J, K) of the T1w grid
    target_affine : (4, 4) target voxel index -> target world mm RAS
    target_shape : (I', J', K') of the target
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS
    margin_vox : target voxels of margin beyond the first/last voxel centre (1: a thick slice's PSF still weighs
        tissue up to about one slice beyond its centre), as in :func:`atlasgs_bids.gaussians.render.render`

    Returns
    -------
    (I, J, K) bool: True where the T1w voxel centre maps to target voxel coordinates within
    ``[-margin_vox, n - 1 + margin_vox]`` on every axis.

    >>> eye = np.eye(4)
    >>> m = field_of_view_mask(eye, (4, 4, 4), np.diag([1.0, 1.0, 2.0, 1.0]), (4, 4, 1), eye)
    >>> int(m.sum()), bool(m[:, :, 2].all()), bool(m[:, :, 3].any())  # one 2 mm slice, margin 1: z in [-2, 2]
    (48, True, False)
    """
    t1w2tvox = np.linalg.inv(np.asarray(target_affine, float)) @ np.linalg.inv(np.asarray(target2t1w, float)) \
        @ np.asarray(t1w_affine, float)
    out = np.ones(tuple(int(s) for s in t1w_shape), dtype=bool)
    ii, jj, kk = (np.arange(int(n), dtype=np.float64) for n in t1w_shape)
    for axis in range(3):  # target coordinate `axis` is affine in (i, j, k): test it on the broadcast grid
        row = t1w2tvox[axis]
        coord = (row[0] * ii[:, None, None] + row[1] * jj[None, :, None] + row[2] * kk[None, None, :] + row[3])
        out &= (coord >= -margin_vox) & (coord <= target_shape[axis] - 1 + margin_vox)
    return out


def json_safe(obj):
    """``obj`` with numpy values as Python ones and non-finite floats as None (strict JSON: no NaN/Infinity)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


class _ScaffoldInputSpec(BaseInterfaceInputSpec):
    # the lattice depends on these two files alone: --quality, --seed or --device never invalidate a cached scaffold
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the T1w grid")


class _ScaffoldOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="scaffold .npz (a .json beside it)")
    out_json = File(exists=True, desc="the scaffold's JSON metadata")
    n_gaussians = traits.Int(desc="number of Gaussians")
    seconds = traits.Float(desc="wall-clock seconds")


class FitScaffold(SimpleInterface):
    """Stage 1: the subject's lattice scaffold on the T1w (:func:`fit_scaffold_file`)."""

    input_spec = _ScaffoldInputSpec
    output_spec = _ScaffoldOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "scaffold.npz"
        info = fit_scaffold_file(self.inputs.t1w_file, self.inputs.mask_file, out)
        self._results.update(out_file=str(out), out_json=str(out.with_suffix(".json")),
                             n_gaussians=info["n_gaussians"], seconds=info["seconds"])
        return runtime


class _HarmonizeInputSpec(BaseInterfaceInputSpec):
    scaffold_file = File(exists=True, mandatory=True, desc="scaffold .npz")
    target_file = File(exists=True, mandatory=True, desc="target NIfTI on its own grid")
    xfm_file = File(exists=True, mandatory=True, desc="ITK transform resampling the target onto the T1w")
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w (output grid)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the T1w grid")
    slice_thickness = traits.Either(None, traits.Float, usedefault=True, desc="SliceThickness, mm (sidecar)")
    quality = traits.Enum("fast", "default", "best", usedefault=True, desc="AppearanceOptions preset")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="torch device")
    threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads; not hashed")


class _HarmonizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonised target on the T1w grid, float32")
    out_report = File(exists=True, desc="JSON: appearance diagnostics, CG history, relative_residual")
    residual = File(exists=True, desc="measured - forward prediction, target grid, first volume, float32")


class Harmonize(SimpleInterface):
    """Stage 2 + render on the T1w grid (:func:`harmonize_file`)."""

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "harmonized.nii.gz"
        diag = harmonize_file(self.inputs.scaffold_file, self.inputs.target_file, self.inputs.xfm_file,
                              self.inputs.t1w_file, self.inputs.mask_file, out,
                              slice_thickness=self.inputs.slice_thickness, quality=self.inputs.quality,
                              device=self.inputs.device, threads=self.inputs.threads,
                              residual_file=Path(runtime.cwd) / "residual.nii.gz")
        report = Path(runtime.cwd) / "appearance.json"
        report.write_text(json.dumps(diag, indent=2))
        self._results.update(out_file=str(out), out_report=str(report),
                             residual=str(Path(runtime.cwd) / "residual.nii.gz"))
        return runtime

"""Fitting interfaces: the subject's Gaussian scaffold (stage 1) and a target's appearance + render (stage 2)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from atlasgs_bids.interfaces.progress import Progress


def _threads(n: int) -> None:
    import torch

    if n and n > 0:
        torch.set_num_threads(int(n))


def fit_scaffold_file(t1w_file: str | os.PathLike, mask_file: str | os.PathLike, out_file: str | os.PathLike, *,
                      quality: str = "default", seed: int = 0, device: str = "cpu", threads: int = 1) -> dict:
    """Fit the scaffold to the RAS+ T1w inside the mask; save it (``.npz`` + ``.json``); return fit statistics."""
    from atlasgs_bids.gaussians.io import save_scaffold
    from atlasgs_bids.gaussians.scaffold import ScaffoldOptions, fit_scaffold

    _threads(threads)
    t0 = time.perf_counter()
    t1w = nib.load(str(t1w_file))
    mask = np.asarray(nib.load(str(mask_file)).dataobj) > 0
    scaffold = fit_scaffold(t1w.get_fdata(dtype=np.float32), t1w.affine, mask, ScaffoldOptions.preset(quality),
                            seed=seed, device=device, progress=Progress("scaffold"))
    save_scaffold(scaffold, out_file)
    return {"n_gaussians": int(scaffold.n_gaussians), "seconds": time.perf_counter() - t0, "quality": quality,
            "seed": seed, "device": device}


def harmonize_file(scaffold_file: str | os.PathLike, target_file: str | os.PathLike,
                   xfm_file: str | os.PathLike, t1w_file: str | os.PathLike, mask_file: str | os.PathLike,
                   out_file: str | os.PathLike, *, slice_thickness: float | None = None, quality: str = "default",
                   device: str = "cpu", threads: int = 1) -> dict:
    """Stage 2 on one target, then render it on the T1w grid.

    The target is used on its own grid (never resampled before fitting); ``xfm_file`` is the ITK transform that
    resamples the target onto the T1w, i.e. it holds T1w -> target (RAS after :func:`read_itk_affine`), so
    ``target2t1w`` is its inverse. Writes ``out_file`` (float32, T1w grid, 3D or 4D) and returns the appearance
    diagnostics (JSON-safe) plus ``render_seconds``.
    """
    from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance
    from atlasgs_bids.gaussians.io import load_scaffold
    from atlasgs_bids.gaussians.render import render
    from atlasgs_bids.imaging.acquisition import Acquisition
    from atlasgs_bids.imaging.nifti import load_nifti, save_nifti
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
    t0 = time.perf_counter()
    out = render(appearance, t1w.affine, t1w.shape[:3], device=device, mask=mask)
    render_s = time.perf_counter() - t0
    save_nifti(nib.Nifti1Image(np.asarray(out, dtype=np.float32), t1w.affine), out_file)
    diag = _json_safe({k: v for k, v in dict(appearance.diagnostics).items() if k != "history"})
    diag["render_seconds"] = render_s
    return diag


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


class _ScaffoldInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the T1w grid")
    quality = traits.Enum("fast", "default", "best", usedefault=True, desc="ScaffoldOptions preset")
    seed = traits.Int(0, usedefault=True, desc="initialisation seed")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="torch device")
    threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _ScaffoldOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="scaffold .npz (a .json beside it)")
    out_json = File(exists=True, desc="the scaffold's JSON metadata")
    n_gaussians = traits.Int(desc="number of Gaussians")
    seconds = traits.Float(desc="wall-clock seconds")


class FitScaffold(SimpleInterface):
    """Stage 1: fit the subject's Gaussian scaffold to the T1w (:func:`fit_scaffold_file`)."""

    input_spec = _ScaffoldInputSpec
    output_spec = _ScaffoldOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "scaffold.npz"
        info = fit_scaffold_file(self.inputs.t1w_file, self.inputs.mask_file, out, quality=self.inputs.quality,
                                 seed=self.inputs.seed, device=self.inputs.device, threads=self.inputs.threads)
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
    threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _HarmonizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonised target on the T1w grid, float32")
    out_report = File(exists=True, desc="JSON: appearance diagnostics")


class Harmonize(SimpleInterface):
    """Stage 2 + render on the T1w grid (:func:`harmonize_file`)."""

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "harmonized.nii.gz"
        diag = harmonize_file(self.inputs.scaffold_file, self.inputs.target_file, self.inputs.xfm_file,
                              self.inputs.t1w_file, self.inputs.mask_file, out,
                              slice_thickness=self.inputs.slice_thickness, quality=self.inputs.quality,
                              device=self.inputs.device, threads=self.inputs.threads)
        report = Path(runtime.cwd) / "appearance.json"
        report.write_text(json.dumps(diag, indent=2))
        self._results.update(out_file=str(out), out_report=str(report))
        return runtime

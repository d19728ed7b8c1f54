"""Fitting interfaces: the subject's Gaussian scaffold (stage 1) and a target's appearance + render (stage 2).

Each interface is file I/O around one library call (as niworkflows does)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, OutputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)

from atlasgs_bids.presets import QUALITIES


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
    target_file = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="target NIfTI on its own grid; several: stacks fused in one fit, the first "
                                        "the reference (output units, hyperparameters)")
    xfm_file = InputMultiObject(File(exists=True), mandatory=True,
                                desc="ITK transform resampling each target onto the T1w (one per target)")
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w (output grid)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the T1w grid")
    slice_thickness = traits.List(traits.Either(None, traits.Float), value=[None], usedefault=True,
                                  desc="SliceThickness (mm) of each target (None: the slice spacing); one value "
                                       "applies to every target")
    quality = traits.Enum(*QUALITIES, usedefault=True, desc="stage-2 preset (atlasgs_bids.presets)")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="torch device")
    threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads; not hashed")
    uncertainty = traits.Bool(True, usedefault=True, desc="also write the calibrated posterior SD map")


class _HarmonizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonised target on the T1w grid, float32")
    out_report = File(exists=True, desc="JSON: appearance diagnostics, CG history, relative_residual")
    residual = File(exists=True, desc="measured - forward prediction, first target's grid, first volume, float32")
    residuals = OutputMultiObject(File(exists=True), desc="every target's residual, in target_file order")
    sd_file = File(desc="posterior SD of out_file (first volume), T1w grid, same units; with uncertainty only")


class Harmonize(SimpleInterface):
    """Stage 2 + render on the T1w grid: file I/O around :func:`atlasgs_bids.harmonize.harmonize_stacks` (one
    target, or several stacks of one contrast fused)."""

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec

    def _run_interface(self, runtime):
        from atlasgs_bids.gaussians.io import load_scaffold
        from atlasgs_bids.harmonize import HarmonizeOptions, harmonize_stacks
        from atlasgs_bids.imaging.nifti import load_nifti, save_nifti
        from atlasgs_bids.imaging.transforms import read_target2t1w

        _threads(self.inputs.threads)
        cwd = Path(runtime.cwd)
        targets, xfms = list(self.inputs.target_file), list(self.inputs.xfm_file)
        thickness = list(self.inputs.slice_thickness)
        if len(thickness) == 1:
            thickness = thickness * len(targets)
        if len(xfms) != len(targets) or len(thickness) != len(targets):
            raise ValueError(f"Harmonize: {len(targets)} targets, {len(xfms)} transforms and {len(thickness)} slice "
                             "thicknesses; give one of each per target")
        t1w = nib.load(str(self.inputs.t1w_file))
        mask = np.asarray(nib.load(str(self.inputs.mask_file)).dataobj) > 0
        result = harmonize_stacks(load_scaffold(self.inputs.scaffold_file), [load_nifti(t) for t in targets],
                                  [read_target2t1w(x) for x in xfms], t1w, mask,
                                  HarmonizeOptions(quality=self.inputs.quality, device=self.inputs.device,
                                                   uncertainty=self.inputs.uncertainty),
                                  slice_thickness=thickness)
        save_nifti(result.image, cwd / "harmonized.nii.gz")
        if result.sd is not None:
            save_nifti(result.sd, cwd / "sd.nii.gz")
            self._results["sd_file"] = str(cwd / "sd.nii.gz")
        residuals = []
        for i, res in enumerate(result.residuals):
            residuals.append(cwd / ("residual.nii.gz" if i == 0 else f"residual_stack{i + 1}.nii.gz"))
            save_nifti(res, residuals[-1])
        (cwd / "appearance.json").write_text(json.dumps(json_safe(result.diagnostics), indent=2))
        self._results.update(out_file=str(cwd / "harmonized.nii.gz"), out_report=str(cwd / "appearance.json"),
                             residual=str(residuals[0]), residuals=[str(r) for r in residuals])
        return runtime

"""Per-target interfaces: the 3D reference volume and the rigid registration to the T1w."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


def make_reference(in_file: str | os.PathLike, out_file: str | os.PathLike, *, modality: str,
                   bval_file: str | os.PathLike | None = None,
                   aslcontext_file: str | os.PathLike | None = None) -> Path:
    """Write the target's 3D reference (itself; mean b0 for dwi; mean control or M0 for asl) on its own grid
    (:func:`atlasgs_bids.imaging.reference.reference_array`)."""
    from atlasgs_bids.imaging.nifti import load_nifti, save_nifti
    from atlasgs_bids.imaging.reference import reference_array

    img = load_nifti(in_file)
    ref = reference_array(img.get_fdata(dtype=np.float32), modality=modality, bval_file=bval_file, aslcontext_file=aslcontext_file,
                          source=in_file)
    return save_nifti(nib.Nifti1Image(ref, img.affine), out_file)


def register_to_t1w(t1w_file: str | os.PathLike, ref_file: str | os.PathLike, out_xfm: str | os.PathLike, *,
                    mask_file: str | os.PathLike | None = None, slice_thickness: float | None = None,
                    seed: int = 0, threads: int | None = None) -> dict:
    """Rigidly register the target reference to the T1w: antspyx (mutual information), then sub-voxel refinement
    through the target's slice profile (:func:`atlasgs_bids.imaging.registration.align_to_t1w`).

    Writes the ITK transform that resamples the target onto the T1w (BIDS ``from-<target>_to-T1w_mode-image``)
    and returns :meth:`Alignment.to_dict` (``target2t1w``: target world mm RAS -> T1w world mm RAS, the antspyx
    map and metric, the refinement's misfit before/after) plus ``slice_thickness``.
    """
    from atlasgs_bids.imaging.acquisition import Acquisition
    from atlasgs_bids.imaging.registration import align_to_t1w

    mask = nib.load(str(mask_file)) if mask_file else None
    ref = nib.load(str(ref_file))
    acq = Acquisition.from_geometry(ref.affine, ref.shape[:3], slice_thickness=slice_thickness)
    result = align_to_t1w(nib.load(str(t1w_file)), ref, fixed_mask=mask, acquisition=acq, seed=seed,
                          threads=threads)
    result.write_itk(out_xfm)
    return {**result.to_dict(), "slice_thickness": slice_thickness}


class _ReferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="target NIfTI (3D or 4D) on its own grid")
    modality = traits.Str(mandatory=True, desc="BIDS suffix of the target")
    bval_file = File(exists=True, desc="dwi .bval")
    aslcontext_file = File(exists=True, desc="asl _aslcontext.tsv")


class _ReferenceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="3D reference volume, target grid")


class ReferenceVolume(SimpleInterface):
    """3D reference of a target (:func:`make_reference`)."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "target_ref.nii.gz"
        self._results["out_file"] = str(make_reference(
            self.inputs.in_file, out, modality=self.inputs.modality,
            bval_file=self.inputs.bval_file or None, aslcontext_file=self.inputs.aslcontext_file or None))
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w (fixed)")
    ref_file = File(exists=True, mandatory=True, desc="target reference (moving)")
    mask_file = File(exists=True, desc="T1w brain mask (restricts the metric)")
    slice_thickness = traits.Either(None, traits.Float, usedefault=True, desc="SliceThickness, mm (sidecar)")
    seed = traits.Int(0, usedefault=True, desc="ANTs random seed")
    threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads; not hashed")


class _RegisterOutputSpec(TraitedSpec):
    out_xfm = File(exists=True, desc="ITK text transform, from-target to-T1w mode-image")
    out_report = File(exists=True, desc="JSON: target2t1w (RAS), antspyx metric, refinement, seconds, parameters")
    metric = traits.Float(desc="mutual information after registration (higher is better)")


class RigidRegistration(SimpleInterface):
    """Rigid registration of a target reference to the T1w, antspyx then refinement (:func:`register_to_t1w`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        t0 = time.perf_counter()
        xfm = Path(runtime.cwd) / "target2t1w_xfm.txt"
        info = register_to_t1w(self.inputs.t1w_file, self.inputs.ref_file, xfm,
                               mask_file=self.inputs.mask_file or None,
                               slice_thickness=self.inputs.slice_thickness, seed=self.inputs.seed,
                               threads=self.inputs.threads)
        info["seconds"] = time.perf_counter() - t0
        report = Path(runtime.cwd) / "registration.json"
        report.write_text(json.dumps(info, indent=2))
        self._results.update(out_xfm=str(xfm), out_report=str(report), metric=info["metric"])
        return runtime

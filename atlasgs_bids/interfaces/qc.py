"""QC interfaces: registration QC (fails a meaningless registration), held-out-slice self-validation, the QC JSON.

The QC JSON's schema is agreed with the report pages (``docs``/issue 4): target, modality, version, device,
parameters, registration, self_validation, fit, flags.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from atlasgs_bids.errors import ProcessingError
from atlasgs_bids.interfaces.fitting import json_safe
from atlasgs_bids.presets import QUALITIES


def registration_qc_file(t1w_file: str | os.PathLike, mask_file: str | os.PathLike, ref_file: str | os.PathLike,
                         xfm_file: str | os.PathLike, registration_report: str | os.PathLike | None = None, *,
                         slice_thickness: float | None = None, target_name: str = "target") -> dict:
    """:func:`atlasgs_bids.qc.registration.registration_qc` and :func:`~atlasgs_bids.qc.registration.restart_spread`
    on files; adds ``mattes_mi``, the antspyx metric at its start, and the refinement record from the registration
    report. Raises :class:`ProcessingError` naming ``target_name`` when the registration failed (edge NCC below the
    fail threshold, or antspyx's metric no better than at its centre-of-mass start while the refinement could not
    lower the model misfit either)."""
    from atlasgs_bids.imaging.acquisition import Acquisition
    from atlasgs_bids.imaging.transforms import read_target2t1w
    from atlasgs_bids.qc.registration import registration_qc, restart_spread

    reg = json.loads(Path(registration_report).read_text()) if registration_report else {}
    mi, mi0 = reg.get("metric"), reg.get("metric_initial")
    if mi is not None and mi0 is not None and mi <= mi0 and not reg.get("refined"):
        raise ProcessingError(
            f"{target_name}: registration to the T1w failed: antspyx ended with a mutual information ({mi:.4f}) no "
            f"better than at its centre-of-mass start ({mi0:.4f}), and the slice-aware refinement did not lower "
            "the misfit either; check the target's orientation/header, or its field of view")
    target2t1w = read_target2t1w(xfm_file)
    t1w, mask, ref = nib.load(str(t1w_file)), nib.load(str(mask_file)), nib.load(str(ref_file))
    out = registration_qc(t1w, mask, ref, target2t1w)
    acq = Acquisition.from_geometry(ref.affine, ref.shape[:3], slice_thickness=slice_thickness)
    # the restarts cost two refinements: not spent on a registration that has already failed
    out["stability"] = restart_spread(t1w, mask, ref, target2t1w, acq) if not out["failed"] else None
    out["mattes_mi"] = mi
    out["mattes_mi_initial"] = mi0
    out["refinement"] = reg.get("refinement")
    out["refined"] = reg.get("refined")
    out["registration_seconds"] = reg.get("seconds")
    if out["failed"]:
        raise ProcessingError(
            f"{target_name}: registration to the T1w failed: edge NCC {out['ncc']:.3f} inside the T1w brain mask "
            f"is below the fail threshold {out['fail_threshold_ncc']:.2f} (mask Dice {out['mask_dice']}); "
            "check the target's orientation/header, or its field of view")
    return out


def self_validation_file(scaffold_file: str | os.PathLike, target_file: str | os.PathLike,
                         xfm_file: str | os.PathLike, *, slice_thickness: float | None = None,
                         quality: str = "default", seed: int = 0, device: str = "cpu") -> dict | None:
    """:func:`atlasgs_bids.qc.selfval.self_validate` on files; its JSON block, or None when not computable."""
    from atlasgs_bids.gaussians.appearance import AppearanceOptions
    from atlasgs_bids.gaussians.io import load_scaffold
    from atlasgs_bids.imaging.acquisition import Acquisition
    from atlasgs_bids.imaging.nifti import load_nifti
    from atlasgs_bids.imaging.transforms import read_target2t1w
    from atlasgs_bids.qc.selfval import self_validate

    target = load_nifti(target_file)
    data = np.asanyarray(target.dataobj)
    data = np.asarray(data[..., 0] if data.ndim == 4 else data, dtype=np.float32)
    acq = Acquisition.from_geometry(target.affine, data.shape[:3], slice_thickness=slice_thickness)
    result = self_validate(load_scaffold(scaffold_file), data, acq, read_target2t1w(xfm_file),
                           AppearanceOptions.preset(quality), seed=seed, device=device)
    return None if result is None else result.to_json()


def qc_document(*, target: str, modality: str, version: str, device: str, parameters: dict, registration: dict,
                self_validation: dict | None, appearance: dict) -> dict:
    """The per-target QC JSON (schema agreed with the report pages); ``flags`` lists what needs a look.

    Flags: ``registration_poor`` (edge NCC below the warn threshold), ``registration_unstable`` (restarts of the
    slice-aware refinement from perturbed copies of the transform end more than the threshold away from it),
    ``selfval_not_better_than_cubic`` (held-out
    PSNR gain <= 0 dB), ``selfval_not_computed`` (brain slab too thin to hold a slice out).
    """
    reg = {k: registration.get(k) for k in ("ncc", "mask_dice", "mattes_mi", "fail_threshold_ncc",
                                            "warn_threshold_ncc", "flag")}
    reg["seconds"] = registration.get("registration_seconds")  # antsRegistration itself
    reg["qc_seconds"] = registration.get("seconds")  # this check
    reg["intensity_ncc"] = registration.get("intensity_ncc")
    reg["mattes_mi_initial"] = registration.get("mattes_mi_initial")
    reg["refined"] = registration.get("refined")
    reg["refinement"] = registration.get("refinement")
    reg["stability"] = registration.get("stability")
    reg["ncc_definition"] = "NCC of gradient-magnitude (edge) maps, T1w brain mask in the target's field of view"
    fit = {"relative_residual": appearance.get("relative_residual"), "iterations": appearance.get("iterations"),
           "history": [float(v) for v in appearance.get("history") or []], "seconds": appearance.get("seconds"),
           "render_seconds": appearance.get("render_seconds"), "n_gaussians": appearance.get("n_gaussians"),
           "preconditioner": appearance.get("coarse")}
    flags = []
    if reg.get("flag"):
        flags.append("registration_poor")
    if (reg.get("stability") or {}).get("flag"):
        flags.append("registration_unstable")
    if self_validation is None:
        flags.append("selfval_not_computed")
    elif self_validation.get("flag"):
        flags.append("selfval_not_better_than_cubic")
    return {"target": target, "modality": modality, "version": version, "device": device,
            "parameters": dict(parameters), "registration": reg, "self_validation": self_validation, "fit": fit,
            "flags": flags}


class _RegQCInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w")
    mask_file = File(exists=True, mandatory=True, desc="T1w brain mask")
    ref_file = File(exists=True, mandatory=True, desc="target 3D reference on its own grid")
    xfm_file = File(exists=True, mandatory=True, desc="ITK transform resampling the target onto the T1w")
    registration_report = File(exists=True, desc="RigidRegistration JSON (Mattes MI, refinement, seconds)")
    slice_thickness = traits.Either(None, traits.Float, usedefault=True, desc="SliceThickness, mm (sidecar)")
    target_file = traits.Str("target", usedefault=True, desc="the target's path (named in errors)")


class _RegQCOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="JSON: registration QC")
    out_xfm = File(exists=True, desc="the transform, passed on once the QC accepted it")


class RegistrationQC(SimpleInterface):
    """Registration QC (:func:`registration_qc_file`); raises ProcessingError on a failed registration."""

    input_spec = _RegQCInputSpec
    output_spec = _RegQCOutputSpec

    def _run_interface(self, runtime):
        info = registration_qc_file(self.inputs.t1w_file, self.inputs.mask_file, self.inputs.ref_file,
                                    self.inputs.xfm_file, self.inputs.registration_report or None,
                                    slice_thickness=self.inputs.slice_thickness,
                                    target_name=Path(self.inputs.target_file).name)
        out = Path(runtime.cwd) / "registration_qc.json"
        out.write_text(json.dumps(json_safe(info), indent=2, allow_nan=False))
        self._results.update(out_report=str(out), out_xfm=self.inputs.xfm_file)
        return runtime


class _SelfValInputSpec(BaseInterfaceInputSpec):
    scaffold_file = File(exists=True, mandatory=True, desc="scaffold .npz")
    target_file = File(exists=True, mandatory=True, desc="target NIfTI on its own grid")
    xfm_file = File(exists=True, mandatory=True, desc="ITK transform resampling the target onto the T1w")
    slice_thickness = traits.Either(None, traits.Float, usedefault=True, desc="SliceThickness, mm")
    quality = traits.Enum(*QUALITIES, usedefault=True, desc="AppearanceOptions preset")
    seed = traits.Int(0, usedefault=True, desc="chooses the held-out slices")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="torch device")
    threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads; not hashed")


class _SelfValOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="JSON: the self_validation block (null when not computable)")


class SelfValidation(SimpleInterface):
    """Held-out-slice self-validation of stage 2 (:func:`self_validation_file`)."""

    input_spec = _SelfValInputSpec
    output_spec = _SelfValOutputSpec

    def _run_interface(self, runtime):
        import torch

        if self.inputs.threads > 0:
            torch.set_num_threads(int(self.inputs.threads))
        info = self_validation_file(self.inputs.scaffold_file, self.inputs.target_file, self.inputs.xfm_file,
                                    slice_thickness=self.inputs.slice_thickness, quality=self.inputs.quality,
                                    seed=self.inputs.seed, device=self.inputs.device)
        out = Path(runtime.cwd) / "self_validation.json"
        out.write_text(json.dumps(json_safe(info), indent=2, allow_nan=False))
        self._results["out_report"] = str(out)
        return runtime


class _TargetQCInputSpec(BaseInterfaceInputSpec):
    target_file = traits.Str(mandatory=True, desc="the target's path")
    modality = traits.Str(mandatory=True, desc="target suffix")
    version = traits.Str(mandatory=True, desc="atlasgs-bids version")
    device = traits.Str("cpu", usedefault=True, desc="torch device used")
    parameters = traits.Dict(usedefault=True, desc="quality, seed, slice thickness, ...")
    registration_report = File(exists=True, mandatory=True, desc="RegistrationQC JSON")
    selfval_report = File(exists=True, mandatory=True, desc="SelfValidation JSON")
    appearance_report = File(exists=True, mandatory=True, desc="Harmonize JSON")


class _TargetQCOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="qc.json")


class TargetQC(SimpleInterface):
    """Assemble the target's QC JSON (:func:`qc_document`)."""

    input_spec = _TargetQCInputSpec
    output_spec = _TargetQCOutputSpec

    def _run_interface(self, runtime):
        doc = qc_document(target=Path(self.inputs.target_file).name, modality=self.inputs.modality,
                          version=self.inputs.version, device=self.inputs.device,
                          parameters=self.inputs.parameters,
                          registration=json.loads(Path(self.inputs.registration_report).read_text()),
                          self_validation=json.loads(Path(self.inputs.selfval_report).read_text()),
                          appearance=json.loads(Path(self.inputs.appearance_report).read_text()))
        out = Path(runtime.cwd) / "qc.json"
        out.write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False))
        self._results["out_file"] = str(out)
        return runtime

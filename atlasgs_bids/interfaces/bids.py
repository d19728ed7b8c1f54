"""Derivatives interfaces: the target sidecar and the sink that stages outputs under their BIDS names."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface, TraitedSpec,
                                    traits)

from atlasgs_bids.bids.derivatives import atomic_copy, atomic_write_json

#: Source metadata that describes the source's voxel grid, slice geometry or phase-encoding geometry: untrue of an
#: image rendered on the T1w grid (e.g. ``SpacingBetweenSlices: 6.4`` on a 1.6 mm isotropic output), so never
#: inherited. Kept, unchanged, under ``Parameters.source_geometry`` (what the source was, not what the output is).
DROPPED_META = (
    # slices and the voxel grid
    "SliceThickness", "SpacingBetweenSlices", "SliceTiming", "SliceEncodingDirection", "NumberOfSlices",
    "PixelSpacing", "AcquisitionVoxelSize", "AcquisitionMatrix", "AcquisitionMatrixPE", "ReconMatrixPE",
    "BaseResolution", "PercentPhaseFOV", "PercentSampling", "PhaseEncodingSteps",
    "PhaseEncodingStepsNoPartialFourier", "FieldOfView", "MatrixCoilMode",
    # orientation and position of the source's slices
    "ImageOrientationPatientDICOM", "ImageOrientationText", "ImagePositionPatient", "SliceLocation",
    "InPlanePhaseEncodingDirectionDICOM", "PatientPosition",
    # phase-encoding geometry (distortion correction needs the source's grid)
    "PhaseEncodingDirection", "TotalReadoutTime", "EffectiveEchoSpacing", "DerivedVendorReportedEchoSpacing",
    "EstimatedEffectiveEchoSpacing", "EstimatedTotalReadoutTime", "PixelBandwidth", "BandwidthPerPixelPhaseEncode",
)
#: Sidecar keys atlasgs-bids writes itself; a source key of the same name is replaced, not inherited.
OWN_KEYS = ("Sources", "SpatialReference", "Description", "Method", "Parameters", "Version", "Metrics", "Runtime",
            "Device", "SkullStripped", "QCFlags")
METHOD = ("AtlasGS: a 3D Gaussian scaffold built on the subject's T1w, one Gaussian per voxel (stage 1); "
          "per-Gaussian target intensities fitted through the target's slice profile and rigid transform (stage 2); rendered on the T1w grid")


def inherit_metadata(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a source sidecar into what a derivative on the T1w grid may inherit and what it may not.

    Inherited: what describes the subject, the scanner and the contrast (``EchoTime``, ``RepetitionTime``,
    ``FlipAngle``, ``MagneticFieldStrength``, ``Manufacturer``, ...). Not inherited: :data:`DROPPED_META` (the
    source's slices, voxel grid, orientation and phase-encoding geometry, untrue of the output) and the keys the app
    writes itself (:data:`OWN_KEYS`).

    Returns
    -------
    (inherited, source_geometry)
        ``source_geometry`` holds the dropped :data:`DROPPED_META` values, for ``Parameters.source_geometry``.

    >>> inherit_metadata({"EchoTime": 0.1, "SpacingBetweenSlices": 6.4, "Sources": ["x"]})
    ({'EchoTime': 0.1}, {'SpacingBetweenSlices': 6.4})
    """
    inherited = {k: v for k, v in meta.items() if k not in DROPPED_META and k not in OWN_KEYS}
    geometry = {k: meta[k] for k in DROPPED_META if k in meta}
    return inherited, geometry


def target_sidecar(*, meta: dict[str, Any], sources: list[str], spatial_reference: str, modality: str,
                   parameters: dict[str, Any], registration: dict[str, Any], appearance: dict[str, Any],
                   device: str, version: str, qc: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON sidecar of a harmonised target.

    Keys: the source's metadata that stays true of the output (:func:`inherit_metadata`), ``Sources`` (BIDS URIs), ``SpatialReference``,
    ``Method``, ``Parameters`` (with the slice profile used), ``Version``, ``Metrics`` (registration mutual
    information, stage-2 diagnostics: CG iterations, residuals, sizes, brain fraction in the target's field of view),
    ``Runtime`` (seconds per stage and ``total_seconds``), ``Device``. With ``qc`` (the QC JSON of
    :func:`atlasgs_bids.interfaces.qc.qc_document`), ``Metrics`` gains ``registration_ncc``,
    ``registration_mask_dice``, ``heldout_{psnr,ncc,mae}``, ``heldout_cubic_{psnr,ncc,mae}``, ``heldout_gain_db``,
    ``relative_residual`` (None where not computed), ``Runtime`` the QC steps' seconds (counted in
    ``total_seconds``), and the sidecar a top-level ``QCFlags`` list.
    """
    out, source_geometry = inherit_metadata(meta)
    scalars = {k: v for k, v in appearance.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "seconds" not in k}
    params = dict(parameters)
    if isinstance(appearance.get("options"), dict):
        params["appearance_options"] = appearance["options"]
    if isinstance(registration.get("parameters"), dict):
        params["registration"] = registration["parameters"]
    if isinstance(registration.get("refinement"), dict):  # initial and refined transforms, misfit before/after
        params["registration_refinement"] = {**registration["refinement"], "accepted": registration.get("refined")}
    if isinstance(appearance.get("acquisition"), dict):  # the slice profile actually used (thickness in mm)
        params["acquisition"] = appearance["acquisition"]
    if isinstance(appearance.get("stacks"), list):  # fused stacks: each one's scale, noise weight and residual
        params["stacks"] = appearance["stacks"]
    if source_geometry:
        params["source_geometry"] = source_geometry
    runtime = {"registration_seconds": registration.get("seconds"),
               **{(k if k == "render_seconds" else f"appearance_{k}"): v
                  for k, v in appearance.items() if "seconds" in k and isinstance(v, (int, float))}}
    # total of the stages (appearance_seconds_build is a part of appearance_seconds, not added again)
    runtime["total_seconds"] = sum(v for k, v in runtime.items()
                                   if k in ("registration_seconds", "appearance_seconds", "render_seconds")
                                   and isinstance(v, (int, float)))
    out.update({
        "Sources": list(sources),
        "SpatialReference": spatial_reference,
        "Description": f"{modality} brought to the T1w grid by atlasgs-bids",
        "Method": METHOD,
        "Parameters": params,
        "Version": version,
        "Metrics": {"registration_" + str(registration.get("metric_name", "metric")): registration.get("metric"),
                    **scalars},
        "Runtime": runtime,
        "Device": device,
        "SkullStripped": True,  # rendered inside the T1w brain mask
    })
    if qc is not None:
        reg = qc.get("registration") or {}
        sv = qc.get("self_validation") or {}
        ours, cub = sv.get("atlasgs") or {}, sv.get("cubic") or {}
        out["Metrics"].update({
            "registration_ncc": reg.get("ncc"), "registration_mask_dice": reg.get("mask_dice"),
            "registration_misfit_before": (reg.get("refinement") or {}).get("misfit_before"),
            "registration_misfit_after": (reg.get("refinement") or {}).get("misfit_after"),
            "registration_refinement_mm": (reg.get("refinement") or {}).get("moved_mm"),
            "registration_spread_mm": (reg.get("stability") or {}).get("spread_mm"),
            **{f"heldout_{k}": ours.get(k) for k in ("psnr", "ncc", "mae")},
            **{f"heldout_cubic_{k}": cub.get(k) for k in ("psnr", "ncc", "mae")},
            "heldout_gain_db": sv.get("gain_psnr_db"),
            "relative_residual": (qc.get("fit") or {}).get("relative_residual"),
        })
        qc_seconds = {"qc_registration_seconds": reg.get("qc_seconds"), "qc_selfval_seconds": sv.get("seconds")}
        out["Runtime"].update(qc_seconds)
        out["Runtime"]["total_seconds"] += sum(v for v in qc_seconds.values() if isinstance(v, (int, float)))
        out["QCFlags"] = list(qc.get("flags") or [])
    return out


class _OutputSidecarInputSpec(BaseInterfaceInputSpec):
    """What every sidecar of a target's outputs (the harmonised image, its SD map) is built from."""

    meta = traits.Dict(usedefault=True, desc="source sidecar metadata")
    sources = traits.List(traits.Str, mandatory=True, desc="BIDS URIs of the inputs")
    spatial_reference = traits.Str(mandatory=True, desc="BIDS URI of the output grid (the preprocessed T1w)")
    modality = traits.Str(mandatory=True, desc="target suffix")
    appearance_report = File(exists=True, mandatory=True, desc="Harmonize JSON")
    version = traits.Str(mandatory=True, desc="atlasgs-bids version")


class _SidecarInputSpec(_OutputSidecarInputSpec):
    parameters = traits.Dict(usedefault=True, desc="method parameters (quality, seed, ...)")
    registration_report = File(exists=True, mandatory=True, desc="RigidRegistration JSON")
    qc_file = File(exists=True, desc="TargetQC JSON (metrics and flags)")
    device = traits.Str("cpu", usedefault=True, desc="torch device used")


class _SidecarOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="sidecar JSON")
    metrics = traits.Dict(desc="the sidecar's Metrics")


class TargetSidecar(SimpleInterface):
    """Build the harmonised target's sidecar (:func:`target_sidecar`)."""

    input_spec = _SidecarInputSpec
    output_spec = _SidecarOutputSpec

    def _run_interface(self, runtime):
        sidecar = target_sidecar(
            meta=self.inputs.meta, sources=self.inputs.sources, spatial_reference=self.inputs.spatial_reference,
            modality=self.inputs.modality, parameters=self.inputs.parameters,
            registration=json.loads(Path(self.inputs.registration_report).read_text()),
            appearance=json.loads(Path(self.inputs.appearance_report).read_text()),
            device=self.inputs.device, version=self.inputs.version,
            qc=json.loads(Path(self.inputs.qc_file).read_text()) if self.inputs.qc_file else None)
        out = Path(runtime.cwd) / "sidecar.json"
        atomic_write_json(out, sidecar)
        self._results.update(out_file=str(out), metrics=sidecar["Metrics"])
        return runtime


def sd_sidecar(*, meta: dict[str, Any], sources: list[str], spatial_reference: str, modality: str,
               uncertainty: dict[str, Any], version: str) -> dict[str, Any]:
    """The JSON sidecar of a harmonised target's SD map (``desc-atlasgsSD``).

    ``uncertainty`` is the ``uncertainty`` record of :func:`atlasgs_bids.harmonize.sd_map` (method, calibration,
    ``sd_median``, seconds). Keys: ``Description``, ``Units`` (the source's, when its sidecar states them),
    ``Sources`` (BIDS URIs: the harmonised output first), ``SpatialReference``, ``Method``, ``Calibration`` (scale
    and held-out figures), ``Metrics`` (``sd_median``, target units), ``Runtime``, ``Version``, ``SkullStripped``.
    """
    cal = dict(uncertainty.get("calibration") or {})
    out = {
        "Description": (f"per-voxel uncertainty of the {modality} brought to the T1w grid by atlasgs-bids: the "
                        "posterior standard deviation of its stage-2 fit, calibrated on the target's own held-out "
                        "slices, in the same units as the output (first volume of a series)"),
        "Units": meta.get("Units", f"the units of the {modality} output (the source image's intensities)"),
        "Sources": list(sources),
        "SpatialReference": spatial_reference,
        "Method": uncertainty.get("method"),
        "Calibration": cal,
        "Metrics": {"sd_median": uncertainty.get("sd_median"), "calibration_scale": cal.get("scale"),
                    "heldout_coverage": cal.get("coverage"), "heldout_spearman": cal.get("spearman")},
        "Runtime": {"seconds": uncertainty.get("seconds"), "fit_seconds": uncertainty.get("fit_seconds"),
                    "relative_cost": uncertainty.get("relative_cost")},
        "Version": version,
        "SkullStripped": True,  # rendered inside the T1w brain mask, like the output (a key BIDS requires here)
    }
    return out


class _SDSidecarInputSpec(_OutputSidecarInputSpec):
    """``sources``: the harmonised output, then its inputs; ``appearance_report``: its 'uncertainty' record."""


class _SDSidecarOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="sidecar JSON of the SD map")


class SDSidecar(SimpleInterface):
    """Build the SD map's sidecar (:func:`sd_sidecar`)."""

    input_spec = _SDSidecarInputSpec
    output_spec = _SDSidecarOutputSpec

    def _run_interface(self, runtime):
        report = json.loads(Path(self.inputs.appearance_report).read_text())
        sidecar = sd_sidecar(meta=self.inputs.meta, sources=self.inputs.sources,
                             spatial_reference=self.inputs.spatial_reference, modality=self.inputs.modality,
                             uncertainty=report.get("uncertainty") or {}, version=self.inputs.version)
        out = Path(runtime.cwd) / "sd.json"
        atomic_write_json(out, sidecar)
        self._results["out_file"] = str(out)
        return runtime


def stage_files(in_files: list[str], rel_paths: list[str], stage_dir: str | os.PathLike,
                json_files: dict[str, dict] | None = None) -> list[str]:
    """Copy each ``in_files[i]`` to ``stage_dir/rel_paths[i]`` and write each ``json_files`` entry (relative path
    -> content), all atomically; returns the staged paths."""
    if len(in_files) != len(rel_paths):
        raise ValueError(f"{len(in_files)} files for {len(rel_paths)} names")
    out = [str(atomic_copy(src, Path(stage_dir) / rel)) for src, rel in zip(in_files, rel_paths)]
    for rel, content in (json_files or {}).items():
        out.append(str(atomic_write_json(Path(stage_dir) / rel, content)))
    return out


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="files to stage")
    rel_paths = traits.List(traits.Str, mandatory=True, desc="their BIDS-Derivatives paths, same order")
    stage_dir = traits.Str(mandatory=True, desc="the participant's staging folder")
    json_files = traits.Dict(usedefault=True, desc="small sidecars to write: relative path -> JSON content")


class _SinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="staged files")


class DerivativesSink(SimpleInterface):
    """Stage outputs under their derivative names (:func:`stage_files`); committed when the participant succeeds."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        self._results["out_files"] = stage_files(list(self.inputs.in_files), list(self.inputs.rel_paths),
                                                 self.inputs.stage_dir, self.inputs.json_files)
        return runtime

"""The participant report interface: figures, QC records and ``sub-X.html`` staged with the other derivatives."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

LOGGER = logging.getLogger("nipype.interface")


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="subject label without 'sub-'")
    session = traits.Str("", usedefault=True, desc="session label without 'ses-' ('' when none)")
    stage_dir = traits.Str(mandatory=True, desc="the participant's staging folder (committed on success)")
    output_dir = traits.Str(mandatory=True, desc="the output dataset (earlier sessions' records are read from it)")
    version = traits.Str("", usedefault=True, desc="atlasgs-bids version")
    methods = traits.Str("", usedefault=True, desc="methods text (the workflows' __desc__) of this session")
    t1w_preproc = File(exists=True, mandatory=True, desc="RAS+ T1w, the output grid")
    brain_mask = File(exists=True, desc="brain mask on the T1w grid")
    target_files = traits.List(traits.Str, mandatory=True, desc="raw targets, one per target workflow")
    modalities = traits.List(traits.Str, mandatory=True, desc="their BIDS suffixes, same order")
    target_refs = InputMultiObject(File(exists=True), mandatory=True, desc="3D reference volumes, same order")
    xfms = InputMultiObject(File(exists=True), mandatory=True, desc="from-<suffix>_to-T1w ITK transforms")
    harmonized = InputMultiObject(File(exists=True), mandatory=True, desc="harmonised targets on the T1w grid")
    sidecars = InputMultiObject(File(exists=True), mandatory=True, desc="their JSON sidecars, same order")
    qc_jsons = InputMultiObject(File(exists=True), desc="QC records (qc_json of each target workflow)")
    residuals = InputMultiObject(File(exists=True), desc="residual maps on the target grids")
    sd_maps = InputMultiObject(File(exists=True), desc="SD maps (desc-atlasgsSD) of the targets in sd_targets")
    sd_targets = traits.List(traits.Str, usedefault=True, desc="raw targets that have an SD map, sd_maps' order")


class _SubjectReportOutputSpec(TraitedSpec):
    out_report = File(desc="the staged sub-X.html")
    out_figures = traits.List(traits.Str, desc="staged figures")


class SubjectReport(SimpleInterface):
    """Draw each target's figures (:func:`atlasgs_bids.reports.subject.report_target`), keep its QC record and
    residual under ``sub-X/qc/``, and write ``sub-X.html`` covering this session and any earlier one already in
    the output dataset, all inside the staging folder."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        from atlasgs_bids.atomic import atomic_write_bytes
        from atlasgs_bids.bids.derivatives import atomic_write_json
        from atlasgs_bids.reports.subject import (methods_path, qc_path, report_target, target_stem,
                                                  write_subject_html)

        inp = self.inputs
        n = len(inp.target_files)
        qcs = list(inp.qc_jsons) if isdefined(inp.qc_jsons) else [None] * n
        residuals = list(inp.residuals) if isdefined(inp.residuals) else [None] * n
        lists = (inp.modalities, inp.target_refs, inp.xfms, inp.harmonized, qcs, residuals, inp.sidecars)
        if any(len(x) != n for x in lists):
            raise ValueError(f"SubjectReport: {n} targets but lists of lengths {[len(x) for x in lists]}")
        sd_maps = dict(zip(inp.sd_targets, inp.sd_maps)) if isdefined(inp.sd_maps) else {}
        figures: list[str] = []
        sidecars = {}
        for target, modality, ref, xfm, harmonized, qc_file, residual, sidecar in zip(inp.target_files, *lists):
            sidecars[target_stem(target)] = json.loads(Path(sidecar).read_text())
            qc = json.loads(Path(qc_file).read_text()) if qc_file else None
            try:
                drawn = report_target(inp.stage_dir, target_file=target, modality=modality,
                                      t1w_file=inp.t1w_preproc,
                                      mask_file=inp.brain_mask if isdefined(inp.brain_mask) else None,
                                      harmonized_file=harmonized, xfm_file=xfm, qc=qc, residual_file=residual,
                                      target_ref_file=ref, sd_file=sd_maps.get(target))
            except Exception:  # a figure that cannot be drawn must not cost the participant its derivatives
                LOGGER.exception("%s: report figures failed; the page shows this target without them", target)
                if qc is not None:
                    atomic_write_json(Path(inp.stage_dir) / qc_path(target_stem(target)), qc)
                continue
            figures.extend(str(Path(inp.stage_dir) / p) for p in drawn.values())
        if inp.methods:
            atomic_write_bytes(Path(inp.stage_dir) / methods_path(inp.subject, inp.session or None),
                               inp.methods.encode())
        page = write_subject_html(inp.stage_dir, inp.subject, read_roots=[inp.stage_dir, inp.output_dir],
                                  sidecars=sidecars, version=inp.version)
        self._results.update(out_report=str(page), out_figures=figures)
        return runtime

"""Participant workflow: T1w reorient -> brain mask -> Gaussian scaffold -> one target workflow per target."""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from atlasgs_bids.bids import derivatives as bd
from atlasgs_bids.bids.layout import SubjectInputs, TargetInput, fusion_groups
from atlasgs_bids.config import Config
from atlasgs_bids.device import resolve_device
from atlasgs_bids.interfaces.anat import BrainMask, Reorient
from atlasgs_bids.interfaces.bids import DerivativesSink
from atlasgs_bids.interfaces.fitting import FitScaffold
from atlasgs_bids.workflows.target import init_target_wf, writes_sd_map


def mask_method(subject_inputs: SubjectInputs, config: Config) -> str:
    """``skull_stripped`` (``--skull-stripped``) > ``precomputed`` (a mask found in ``--derivatives``) > ``deepbet``."""
    if config.execution.skull_stripped:
        return "skull_stripped"
    if subject_inputs.t1w_mask is not None:
        return "precomputed"
    return "deepbet"


def init_participant_wf(*, subject_inputs: SubjectInputs, config: Config, stage_dir: str | Path | None = None,
                        name: str | None = None) -> pe.Workflow:
    """Harmonise every target of one subject/session onto its T1w grid.

    Workflow Graph
        .. workflow::

            import tempfile
            from pathlib import Path
            from atlasgs_bids.bids.layout import collect_inputs
            from atlasgs_bids.config import Config
            from atlasgs_bids.data.sample import build_sample_dataset
            from atlasgs_bids.workflows.participant import init_participant_wf
            bids = build_sample_dataset(Path(tempfile.mkdtemp())).bids_dir
            config = Config.build(bids_dir=bids, output_dir="/tmp/out", analysis_level="participant", device="cpu")
            wf = init_participant_wf(subject_inputs=collect_inputs(bids)[0], config=config)

    Parameters
    ----------
    subject_inputs : SubjectInputs
        The T1w, its targets, and a precomputed mask if one was found.
    config : Config
        The run's settings (quality, seed, device, threads, ``--skull-stripped``).
    stage_dir : path, optional
        The participant's staging folder; when given, sinks stage every output under its BIDS-Derivatives name
        (moved into the output dataset by the caller once the workflow succeeded).
    name : str, optional
        Default ``sub_<id>[_ses_<id>]_wf``.

    Inputs
    ------
    t1w_file : the raw T1w (set at build time)
    t1w_mask : precomputed brain mask (optional)

    Outputs
    -------
    t1w_preproc : RAS+ T1w, the reference grid
    brain_mask : uint8 mask on that grid
    scaffold : the scaffold ``.npz``
    report : the staged ``sub-X.html`` (only with ``stage_dir``)

    See Also
    --------
    atlasgs_bids.workflows.target.init_target_wf
    """
    si = subject_inputs
    default = f"sub_{si.subject}" + (f"_ses_{si.session}" if si.session else "") + "_wf"
    wf = pe.Workflow(name=name or default.replace("-", "_"))
    method = mask_method(si, config)
    device = resolve_device(config.resources.device)
    threads = config.resources.omp_nthreads
    mask_text = {"skull_stripped": "taken as the non-zero voxels of the (already skull-stripped) T1w",
                 "precomputed": f"taken from {si.t1w_mask.name if si.t1w_mask else ''}",
                 "deepbet": "computed with deepbet"}[method]
    wf.__desc__ = (
        f"The T1w ({si.t1w.name}) was reoriented to RAS+; its brain mask was {mask_text}. A 3D Gaussian scaffold "
        "was built on the T1w grid, one Gaussian per voxel of the brain mask grown by one voxel (centred on the "
        "voxel, its width the voxel's, its amplitude the normalised T1w there; nothing fitted), and reused for "
        f"every target ({', '.join(t.path.name for t in si.targets)})."
    )

    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_file", "t1w_mask"]), name="inputnode")
    inputnode.inputs.t1w_file = str(si.t1w)
    if si.t1w_mask is not None:
        inputnode.inputs.t1w_mask = str(si.t1w_mask)
    outputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "brain_mask", "scaffold", "report"]),
                         name="outputnode")
    reorient = pe.Node(Reorient(), name="t1w_reorient")
    brain_mask = pe.Node(BrainMask(method=method, device=device), name="brain_mask", n_procs=threads)
    scaffold = pe.Node(FitScaffold(), name="fit_scaffold")
    wf.connect([
        (inputnode, reorient, [("t1w_file", "in_file")]),
        (reorient, brain_mask, [("out_file", "in_file")]),
        (reorient, scaffold, [("out_file", "t1w_file")]),
        (brain_mask, scaffold, [("out_file", "mask_file")]),
        (reorient, outputnode, [("out_file", "t1w_preproc")]),
        (brain_mask, outputnode, [("out_file", "brain_mask")]),
        (scaffold, outputnode, [("out_file", "scaffold")]),
    ])
    if method == "precomputed":
        wf.connect(inputnode, "t1w_mask", brain_mask, "mask_file")

    if stage_dir is not None:
        merge = pe.Node(niu.Merge(4), name="merge_anat")
        sink = pe.Node(DerivativesSink(stage_dir=str(stage_dir), rel_paths=[
            p.as_posix() for p in (bd.t1w_preproc_output(si.t1w), bd.brain_mask_output(si.t1w),
                                   bd.scaffold_output(si.t1w), bd.scaffold_output(si.t1w, ".json"))],
            json_files={bd.t1w_preproc_output(si.t1w).as_posix().replace(".nii.gz", ".json"): {
                "SkullStripped": bool(config.execution.skull_stripped),
                "Sources": [bd.bids_uri(si.t1w, config.execution.bids_dir)],
                "Description": "The T1w reoriented to RAS+ (data unchanged): the grid of every output"},
                bd.brain_mask_output(si.t1w).as_posix().replace(".nii.gz", ".json"): {
                "Type": "Brain",
                "Description": f"Brain mask of the T1w, {mask_text}",
                "Sources": [f"bids::{bd.t1w_preproc_output(si.t1w).as_posix()}"],
                "SpatialReference": f"bids::{bd.t1w_preproc_output(si.t1w).as_posix()}"}}),
            name="ds_anat")
        wf.connect([
            (reorient, merge, [("out_file", "in1")]),
            (brain_mask, merge, [("out_file", "in2")]),
            (scaffold, merge, [("out_file", "in3"), ("out_json", "in4")]),
            (merge, sink, [("out", "in_files")]),
        ])

    target_wfs = []
    for group in target_groups(si, config):
        twf = init_target_wf(target=group if len(group) > 1 else group[0], config=config, t1w_file=si.t1w,
                             stage_dir=stage_dir)
        wf.connect([
            (reorient, twf, [("out_file", "inputnode.t1w_preproc")]),
            (brain_mask, twf, [("out_file", "inputnode.brain_mask")]),
            (scaffold, twf, [("out_file", "inputnode.scaffold")]),
        ])
        target_wfs.append(twf)
    if stage_dir is not None and target_wfs:
        _connect_report(wf, si, config, target_wfs, reorient, brain_mask, outputnode, str(stage_dir))
    return wf


def target_groups(si: SubjectInputs, config: Config) -> list[list[TargetInput]]:
    """The target workflows to build: one stack each, or with ``--fuse-stacks`` the groups of
    :func:`~atlasgs_bids.bids.layout.fusion_groups`; the report lists the stacks in this order."""
    if config.fit.fuse_stacks:
        return fusion_groups(si.targets)
    return [[t] for t in si.targets]


def _connect_report(wf: pe.Workflow, si: SubjectInputs, config: Config, target_wfs: list[pe.Workflow],
                    reorient: pe.Node, brain_mask: pe.Node, outputnode: pe.Node, stage_dir: str) -> None:
    """The ``subject_report`` node: every target workflow's outputs (one entry per stack, in
    :func:`target_groups` order) -> figures, QC records and ``sub-X.html``, staged in ``stage_dir`` (committed with
    the other derivatives on success)."""
    from atlasgs_bids.interfaces.reports import SubjectReport
    from atlasgs_bids.version import __version__

    stacks = [t for group in target_groups(si, config) for t in group]
    report = pe.Node(SubjectReport(
        subject=si.subject, session=si.session or "", stage_dir=stage_dir, output_dir=str(config.execution.output_dir),
        version=__version__, methods=methods_text(wf), target_files=[str(t.path) for t in stacks],
        modalities=[t.modality for t in stacks]), name="subject_report")
    wf.connect([(reorient, report, [("out_file", "t1w_preproc")]), (brain_mask, report, [("out_file", "brain_mask")]),
                (report, outputnode, [("out_report", "report")])])
    fields = {"target_ref": "target_refs", "target2t1w_xfm": "xfms", "harmonized": "harmonized",
              "sidecar": "sidecars", "qc_json": "qc_jsons", "residual": "residuals"}
    for out_field, in_field in fields.items():
        # a fused group contributes a list (one item per stack): flattened in order
        merge = pe.Node(niu.Merge(len(target_wfs), ravel_inputs=True), name=f"merge_report_{in_field}")
        for i, twf in enumerate(target_wfs, start=1):
            wf.connect(twf, f"outputnode.{out_field}", merge, f"in{i}")
        wf.connect(merge, "out", report, in_field)
    # SD maps come from some targets only (not from series, not with --no-uncertainty): named, not positional
    # (a fused group's map is the reference stack's entry's)
    with_sd = [(group[0], twf) for group, twf in zip(target_groups(si, config), target_wfs)
               if writes_sd_map(group[0], config)]
    if with_sd:
        report.inputs.sd_targets = [str(t.path) for t, _ in with_sd]
        merge = pe.Node(niu.Merge(len(with_sd)), name="merge_report_sd_maps")
        for i, (_, twf) in enumerate(with_sd, start=1):
            wf.connect(twf, "outputnode.sd_map", merge, f"in{i}")
        wf.connect(merge, "out", report, "sd_maps")


def methods_text(wf: pe.Workflow) -> str:
    """The ``__desc__`` paragraphs of ``wf`` and its sub-workflows, parent first then in graph order."""
    paragraphs = [getattr(wf, "__desc__", "")]
    for node in wf._graph.nodes():  # noqa: SLF001 - nipype exposes no public iterator over sub-workflows
        if isinstance(node, pe.Workflow):
            paragraphs.append(methods_text(node))
    return "\n\n".join(p for p in paragraphs if p)

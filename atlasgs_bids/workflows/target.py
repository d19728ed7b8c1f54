"""Per-target workflow: reference volume -> rigid registration -> appearance fit + render -> sidecar -> sink."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from atlasgs_bids.bids import derivatives as bd
from atlasgs_bids.bids.layout import TargetInput
from atlasgs_bids.config import Config
from atlasgs_bids.device import resolve_device
from atlasgs_bids.interfaces.bids import DerivativesSink, SDSidecar, TargetSidecar
from atlasgs_bids.interfaces.dwi import RotateBvecs
from atlasgs_bids.interfaces.fitting import Harmonize
from atlasgs_bids.interfaces.qc import RegistrationQC, SelfValidation, TargetQC
from atlasgs_bids.interfaces.registration import ReferenceVolume, RigidRegistration
from atlasgs_bids.presets import appearance_overrides
from atlasgs_bids.version import __version__


def target_wf_name(target_file: str | Path) -> str:
    """A Nipype-safe workflow name from the target's file name.

    >>> target_wf_name("/b/sub-01/anat/sub-01_acq-tse_run-2_T2w.nii.gz")
    'acq_tse_run_2_T2w_wf'
    """
    ents, suffix, _ = bd.parse_name(target_file)
    parts = [f"{k}_{v}" for k, v in ents.items() if k not in ("sub", "ses")]
    return re.sub(r"[^0-9A-Za-z_]", "_", "_".join([*parts, suffix])) + "_wf"


def writes_sd_map(target: TargetInput, config: Config) -> bool:
    """Whether the target's workflow writes the ``desc-atlasgsSD`` map: unless ``--no-uncertainty``, for 3D targets.

    Series (dwi, asl) get none: each volume would need its own noise estimate and calibration, and a 3D file named
    like a series (``_dwi``, ``_asl``) without its bval/aslcontext is not valid BIDS.
    """
    return bool(config.fit.uncertainty) and target.modality not in ("dwi", "asl")


def init_target_wf(*, target: TargetInput | Sequence[TargetInput], config: Config, t1w_file: str | Path | None = None,
                   stage_dir: str | Path | None = None, name: str | None = None) -> pe.Workflow:
    """Harmonise one thick-slice target, or several stacks of one contrast fused, onto its subject's T1w grid.

    Workflow Graph
        .. workflow::

            import tempfile
            from pathlib import Path
            from atlasgs_bids.bids.layout import collect_inputs
            from atlasgs_bids.config import Config
            from atlasgs_bids.data.sample import build_sample_dataset
            from atlasgs_bids.workflows.target import init_target_wf
            bids = build_sample_dataset(Path(tempfile.mkdtemp())).bids_dir
            config = Config.build(bids_dir=bids, output_dir="/tmp/out", analysis_level="participant", device="cpu")
            wf = init_target_wf(target=collect_inputs(bids)[0].targets[0], config=config)

    Parameters
    ----------
    target : TargetInput, or a sequence of them (``--fuse-stacks``, :func:`atlasgs_bids.bids.layout.fusion_groups`)
        The target image, its modality and sidecar metadata (``SliceThickness``, mm), bval/bvec, aslcontext. With
        several stacks, each is registered and QC'd alone, then all are fitted in one solve; the first is the
        reference (output units, hyperparameters, held-out self-validation), and the output is named by
        :func:`~atlasgs_bids.bids.derivatives.fused_target_output`.
    config : Config
        Uses ``fit.quality``, ``fit.seed``, ``fit.uncertainty``, ``resources.device``/``omp_nthreads``,
        ``execution.bids_dir``.
    t1w_file : path, optional
        The raw T1w the outputs refer to (``Sources``, ``SpatialReference``); default: unknown (``None``).
    stage_dir : path, optional
        The participant's staging folder; when given a sink stages the outputs under their BIDS names.
    name : str, optional
        Default :func:`target_wf_name`.

    Inputs
    ------
    target_file, target_meta, bval_file, aslcontext_file
        Set from ``target`` at build time.
    t1w_preproc, brain_mask, scaffold
        From the participant workflow: RAS+ T1w, its brain mask, the scaffold ``.npz``.

    Outputs
    -------
    target_ref : 3D reference volume on the target's grid
    target2t1w_xfm : ITK transform resampling the target onto the T1w (``from-<suffix>_to-T1w_mode-image``)
    harmonized : the target on the T1w grid
    sidecar : its JSON sidecar
    metrics : the sidecar's ``Metrics`` dict
    qc_json : the target's QC JSON (registration QC, held-out-slice self-validation, fit; work dir)
    residual : measured - forward prediction on the target's grid (first volume; work dir)
    sd_map : the calibrated posterior SD of ``harmonized`` (``desc-atlasgsSD``; unset with ``--no-uncertainty`` and
        for 4D series)

    With several stacks, ``target_ref``, ``target2t1w_xfm`` and ``residual`` are lists (one per stack) and
    ``harmonized``, ``sidecar`` and ``qc_json`` are repeated once per stack, so that the report shows each stack.

    See Also
    --------
    atlasgs_bids.workflows.participant.init_participant_wf
    """
    stacks = [target] if isinstance(target, TargetInput) else list(target)
    if not stacks:
        raise ValueError("init_target_wf needs a target")
    target = stacks[0]
    fused = len(stacks) > 1
    if fused and target.modality in ("dwi", "asl"):
        raise ValueError(f"{target.path}: {target.modality} series are not fused (per-volume metadata)")
    quality, seed = config.fit.quality, config.fit.seed
    uncertainty = writes_sd_map(target, config)
    profile_note = (", unless the target's own held-out slices clearly favoured a box, a soft-edged box or a "
                    "narrower Gaussian" if appearance_overrides(quality).get("tune") else "")
    device = resolve_device(config.resources.device)
    threads = config.resources.omp_nthreads
    wf = pe.Workflow(name=name or target_wf_name(target.path))
    thickness = target.meta.get("SliceThickness")
    thicknesses = [t.meta.get("SliceThickness") for t in stacks]
    fusion_text = (
        f"The {len(stacks)} stacks ({', '.join(t.path.name for t in stacks)}) were each registered as below and "
        f"fitted jointly: one appearance through every stack's own slice profile and transform, each stack's "
        f"intensity scale relative to the first ({target.path.name}, whose units the output keeps) a free unknown "
        "of the same least-squares problem, each stack weighted by its estimated noise variance. "
        if fused else "")
    wf.__desc__ = (
        fusion_text +
        f"The {target.modality} image was reduced to a 3D reference volume "
        f"({'mean b=0' if target.modality == 'dwi' else 'mean control/M0' if target.modality == 'asl' else 'itself'}) "
        "and registered rigidly to the T1w with antspyx (Mattes mutual information, centre-of-mass initialisation, "
        f"whole field of view at the coarse levels and brain-masked metric at the fine ones, seed {seed}); the "
        "transform was then refined to sub-voxel precision by matching the T1w, pushed through the target's slice "
        "profile and a fitted T1w-to-target intensity map, to the target's own voxels (Gauss-Newton). "
        f"Per-Gaussian {target.modality} intensities were then fitted on the "
        f"target's own grid through its slice profile (slice thickness "
        f"{f'{thickness} mm' if thickness is not None else 'taken from the voxel size'}; a Gaussian of that FWHM"
        f"{profile_note}) and the rigid transform "
        f"(quality preset '{quality}', device {device}), and rendered on the T1w grid. "
        "Quality control: the registration was checked by the correlation of the T1w's and the registered "
        "reference's edge maps inside the brain mask and by restarting the refinement from perturbed transforms, "
        "and the fit by holding out every 4th slice of a mid-brain "
        "slab, refitting on the rest and predicting the held-out slices through the forward model, scored against "
        "the measured slices beside cubic interpolation along the slice axis."
        + (f" The held-out self-validation used the reference stack ({target.path.name}) alone." if fused else "")
        + (" A per-voxel uncertainty map was computed as the posterior standard deviation of the linear stage-2 "
           "model (perturb-and-solve posterior draws read out through each T1w voxel), scaled by one factor "
           "chosen so that 95 % of the residuals on the target's own held-out slices lay within 1.96 standard "
           "deviations." if uncertainty else "")
    )

    inputnode = pe.Node(niu.IdentityInterface(fields=[
        # the target and what travels with it
        "target_file", "target_meta", "bval_file", "bvec_file", "aslcontext_file",
        # from the participant workflow
        "t1w_preproc", "brain_mask", "scaffold"]), name="inputnode")
    inputnode.inputs.target_file = str(target.path)
    inputnode.inputs.target_meta = dict(target.meta)
    if target.bval:
        inputnode.inputs.bval_file = str(target.bval)
        inputnode.inputs.bvec_file = str(target.bvec)
    if target.aslcontext:
        inputnode.inputs.aslcontext_file = str(target.aslcontext)
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "target_ref", "target2t1w_xfm", "harmonized", "sidecar", "metrics", "qc_json", "residual", "sd_map"]),
        name="outputnode")

    # One registration (+ its QC) per stack; a failed registration of any stack stops the group.
    references, registers, reg_qcs = [], [], []
    for i, stack in enumerate(stacks):
        tag = "" if i == 0 else f"_stack{i + 1}"
        stack_thick = float(thicknesses[i]) if thicknesses[i] is not None else None
        reference = pe.Node(ReferenceVolume(modality=stack.modality), name=f"reference{tag}")
        # One ITK thread: multi-threaded Mattes MI differs run to run (~0.03 mm here), one thread is
        # bit-reproducible and costs seconds next to stage 2.
        register = pe.Node(RigidRegistration(seed=seed, threads=1, slice_thickness=stack_thick),
                           name=f"register{tag}")
        reg_qc = pe.Node(RegistrationQC(target_file=str(stack.path), slice_thickness=stack_thick),
                         name=f"registration_qc{tag}")
        if i == 0:
            wf.connect(inputnode, "target_file", reference, "in_file")
            wf.connect([(inputnode, reference, [("bval_file", "bval_file"), ("aslcontext_file", "aslcontext_file")])])
        else:
            reference.inputs.in_file = str(stack.path)
        wf.connect([
            (inputnode, register, [("t1w_preproc", "t1w_file"), ("brain_mask", "mask_file")]),
            (reference, register, [("out_file", "ref_file")]),
            (inputnode, reg_qc, [("t1w_preproc", "t1w_file"), ("brain_mask", "mask_file")]),
            (reference, reg_qc, [("out_file", "ref_file")]),
            (register, reg_qc, [("out_xfm", "xfm_file"), ("out_report", "registration_report")]),
        ])
        references.append(reference)
        registers.append(register)
        reg_qcs.append(reg_qc)
    reference, register, reg_qc = references[0], registers[0], reg_qcs[0]

    harmonize = pe.Node(Harmonize(quality=quality, device=device, threads=threads, uncertainty=uncertainty,
                                  target_file=[str(t.path) for t in stacks],
                                  slice_thickness=[float(t) if t is not None else None for t in thicknesses]),
                        name="harmonize", n_procs=threads)
    selfval = pe.Node(SelfValidation(quality=quality, seed=seed, device=device, threads=threads,
                                     slice_thickness=float(thickness) if thickness is not None else None),
                      name="self_validation", n_procs=threads)
    qc = pe.Node(TargetQC(target_file=str(target.path), modality=target.modality, version=__version__, device=device,
                          parameters={"quality": quality, "seed": seed, "SliceThickness": thickness,
                                      **({"fused_stacks": [t.path.name for t in stacks],
                                          "fused_output": bd.fused_target_output([t.path for t in stacks]).name}
                                         if fused else {})}),
                 name="qc")
    root = config.execution.bids_dir
    sources = [bd.bids_uri(t.path, root) for t in stacks] + ([bd.bids_uri(t1w_file, root)] if t1w_file else [])
    spatial_ref = f"bids::{bd.t1w_preproc_output(t1w_file).as_posix()}" if t1w_file else "T1w"
    sidecar = pe.Node(TargetSidecar(
        sources=sources, spatial_reference=spatial_ref, modality=target.modality, device=device,
        version=__version__, parameters={"quality": quality, "seed": seed, "SliceThickness": thickness,
                                         "modality": target.modality,
                                         **({"FusedStacks": [t.path.name for t in stacks],
                                             "SliceThicknessPerStack": thicknesses} if fused else {})}),
        name="sidecar")

    # the fit waits for the registration QC: a failed registration (of any stack) stops the target here
    if fused:  # every stack's accepted transform, in stack order, to the joint fit
        xfms = pe.Node(niu.Merge(len(stacks)), name="merge_xfms")
        for i, rq in enumerate(reg_qcs, start=1):
            wf.connect(rq, "out_xfm", xfms, f"in{i}")
        wf.connect(xfms, "out", harmonize, "xfm_file")
    else:
        wf.connect(reg_qc, "out_xfm", harmonize, "xfm_file")
    wf.connect([
        (inputnode, harmonize, [("scaffold", "scaffold_file"), ("t1w_preproc", "t1w_file"),
                                ("brain_mask", "mask_file")]),
        (inputnode, selfval, [("scaffold", "scaffold_file"), ("target_file", "target_file")]),
        (reg_qc, selfval, [("out_xfm", "xfm_file")]),
        (reg_qc, qc, [("out_report", "registration_report")]),
        (selfval, qc, [("out_report", "selfval_report")]),
        (harmonize, qc, [("out_report", "appearance_report")]),
        (qc, sidecar, [("out_file", "qc_file")]),
        (inputnode, sidecar, [("target_meta", "meta")]),
        (register, sidecar, [("out_report", "registration_report")]),
        (harmonize, sidecar, [("out_report", "appearance_report")]),
        (sidecar, outputnode, [("metrics", "metrics")]),
    ])
    if not fused:
        wf.connect([
            (qc, outputnode, [("out_file", "qc_json")]),
            (harmonize, outputnode, [("residual", "residual"), ("out_file", "harmonized")]),
            (reference, outputnode, [("out_file", "target_ref")]),
            (register, outputnode, [("out_xfm", "target2t1w_xfm")]),
            (sidecar, outputnode, [("out_file", "sidecar")]),
        ])
    else:  # one report entry per stack: its reference, transform and residual beside the shared output
        n = len(stacks)
        refs = pe.Node(niu.Merge(n), name="merge_refs")
        raw_xfms = pe.Node(niu.Merge(n), name="merge_raw_xfms")
        for i in range(n):
            wf.connect(references[i], "out_file", refs, f"in{i + 1}")
            wf.connect(registers[i], "out_xfm", raw_xfms, f"in{i + 1}")
        repeat = pe.Node(niu.Function(input_names=["harmonized", "sidecar", "qc_json", "n"],
                                      output_names=["harmonized", "sidecar", "qc_json"], function=_repeat),
                         name="repeat_outputs")
        repeat.inputs.n = n
        wf.connect([
            (refs, outputnode, [("out", "target_ref")]),
            (raw_xfms, outputnode, [("out", "target2t1w_xfm")]),
            (harmonize, outputnode, [("residuals", "residual")]),
            (harmonize, repeat, [("out_file", "harmonized")]),
            (sidecar, repeat, [("out_file", "sidecar")]),
            (qc, repeat, [("out_file", "qc_json")]),
            (repeat, outputnode, [("harmonized", "harmonized"), ("sidecar", "sidecar"), ("qc_json", "qc_json")]),
        ])

    if uncertainty:
        sd_sidecar = pe.Node(SDSidecar(
            sources=[f"bids::{bd.fused_target_output([t.path for t in stacks]).as_posix()}", *sources],
            spatial_reference=spatial_ref,
            modality=target.modality, version=__version__), name="sd_sidecar")
        wf.connect([
            (inputnode, sd_sidecar, [("target_meta", "meta")]),
            (harmonize, sd_sidecar, [("out_report", "appearance_report")]),
            (harmonize, outputnode, [("sd_file", "sd_map")]),
        ])

    if target.modality == "dwi":
        rotate = pe.Node(RotateBvecs(), name="rotate_bvecs")
        wf.connect([
            (inputnode, rotate, [("bvec_file", "bvec_file"), ("target_file", "target_file"),
                                 ("t1w_preproc", "t1w_file")]),
            (register, rotate, [("out_xfm", "xfm_file")]),
        ])

    if stage_dir is not None:
        outputs = [t.path for t in stacks]
        rel = [bd.fused_target_output(outputs), bd.fused_target_output(outputs, extension=".json"),
               *[bd.xfm_output(t.path) for t in stacks]]
        if uncertainty:
            rel += [bd.sd_output(outputs), bd.sd_output(outputs, extension=".json")]
        n_in = len(rel)
        if target.modality == "dwi":
            rel += [bd.target_output(target.path, extension=".bval"), bd.target_output(target.path, extension=".bvec")]
            n_in += 2
        if target.modality == "asl":
            rel += [bd.target_output(target.path, suffix="aslcontext", extension=".tsv")]
            n_in += 1
        merge = pe.Node(niu.Merge(n_in), name="merge_outputs")
        sink = pe.Node(DerivativesSink(rel_paths=[p.as_posix() for p in rel], stage_dir=str(stage_dir)),
                       name="ds_target")
        wf.connect([
            (harmonize, merge, [("out_file", "in1")]),
            (sidecar, merge, [("out_file", "in2")]),
            (merge, sink, [("out", "in_files")]),
        ])
        for i, reg in enumerate(registers, start=3):
            wf.connect(reg, "out_xfm", merge, f"in{i}")
        if uncertainty:
            n_sd = 3 + len(registers)
            wf.connect([(harmonize, merge, [("sd_file", f"in{n_sd}")]),
                        (sd_sidecar, merge, [("out_file", f"in{n_sd + 1}")])])
        if target.modality == "dwi":
            wf.connect([(inputnode, merge, [("bval_file", f"in{n_in - 1}")]),
                        (rotate, merge, [("out_file", f"in{n_in}")])])
        if target.modality == "asl":
            wf.connect([(inputnode, merge, [("aslcontext_file", f"in{n_in}")])])
    return wf


def _repeat(harmonized, sidecar, qc_json, n):
    """The group's shared outputs once per stack (a Nipype Function node: imports nothing from outside)."""
    return [harmonized] * n, [sidecar] * n, [qc_json] * n

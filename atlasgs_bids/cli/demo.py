"""``atlasgs-bids demo OUT``: build the sample dataset, run both levels on it, score the result against the truth."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from atlasgs_bids.cli.codes import EXIT_OK
from atlasgs_bids.cli.logs import setup_logging, stage
from atlasgs_bids.cli.parser import build_demo_parser

if TYPE_CHECKING:
    from atlasgs_bids.data.sample import SampleInfo

#: The demo's summary reports the error within this distance (mm) of the brain mask's border separately.
EDGE_MM = 5.0


def demo_main(argv: Sequence[str], app: Callable[[Sequence[str]], int]) -> int:
    """Run the demo; ``app`` is the ``atlasgs-bids`` entry point (``argv -> exit code``) run on the sample."""
    opts = build_demo_parser().parse_args(argv)
    setup_logging(opts.verbose)
    from atlasgs_bids.data.sample import build_sample_dataset

    out = opts.out_dir.expanduser().absolute()
    t0 = time.perf_counter()
    with stage("demo: sample dataset"):
        info = build_sample_dataset(out, coronal=opts.fuse_stacks)
    deriv = out / "derivatives"
    # the sample T1w is the skull-stripped MNI template: its mask is T1w > 0 (deepbet is not needed)
    common = ["--quality", opts.quality, "--nprocs", str(opts.nprocs), "--device", opts.device, "--skull-stripped",
              "-w", str(out / "work")] + ["-v"] * opts.verbose + ["--fuse-stacks"] * opts.fuse_stacks
    rc = app([str(info.bids_dir), str(deriv), "participant", *common])
    if rc != EXIT_OK:
        return rc
    rc = app([str(info.bids_dir), str(deriv), "group"])
    if rc != EXIT_OK:
        return rc
    print(demo_summary(info, deriv))
    print(f"  total time:   {time.perf_counter() - t0:.0f} s")
    return EXIT_OK


def demo_summary(info: SampleInfo, deriv: Path) -> str:
    """Output paths and PSNR / MAE against the truth, ours beside cubic interpolation of the input T2w."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from atlasgs_bids.bids import derivatives as bd
    from atlasgs_bids.imaging import metrics
    from atlasgs_bids.imaging.transforms import read_itk_affine, rotation_angle_deg

    # with the coronal stack fused, the output drops the entity the stacks differ by: the axial stack's name
    stacks = [info.t2w, info.t2w_coronal] if info.t2w_coronal else [info.t2w]
    ours_path = deriv / bd.fused_target_output(stacks)
    xfm_path = deriv / bd.xfm_output(info.t2w)
    truth_img = nib.load(str(info.truth_t2w))
    truth = truth_img.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(str(info.truth_mask)).dataobj) > 0
    ours_img = nib.load(str(ours_path))
    if ours_img.shape[:3] != truth.shape or not np.allclose(ours_img.affine, truth_img.affine, atol=1e-3):
        raise RuntimeError(f"{ours_path}: not on the truth's grid; cannot score")
    ours = ours_img.get_fdata(dtype=np.float32)
    t2w_img = nib.load(str(info.t2w))
    # cubic: resample the thick-slice input onto the truth grid with the SAME estimated registration
    t1w2target = read_itk_affine(xfm_path)
    vox2vox = np.linalg.inv(t2w_img.affine) @ t1w2target @ truth_img.affine
    cubic = ndimage.affine_transform(t2w_img.get_fdata(dtype=np.float32), vox2vox[:3, :3], vox2vox[:3, 3],
                                     output_shape=truth.shape, order=3, mode="nearest")
    # registration error against the known transform: angle of R_true^T R_est, and the displacement of the brain's
    # centre (mm) between the true and the estimated T1w -> target maps
    true_t1w2target = np.linalg.inv(info.target2t1w)
    centre = truth_img.affine @ np.r_[ndimage.center_of_mass(mask), 1.0]
    angle = rotation_angle_deg(true_t1w2target[:3, :3].T @ t1w2target[:3, :3])
    shift = float(np.linalg.norm((t1w2target @ centre - true_t1w2target @ centre)[:3]))
    lines = ["", "atlasgs-bids demo", f"  input BIDS:   {info.bids_dir}", f"  derivatives:  {deriv}",
             f"  harmonized:   {ours_path}", f"  transform:    {xfm_path}",
             f"  QC report:    {deriv / 'sub-01.html'}",
             f"  group QC:     {deriv / 'group_qc.tsv'} and {deriv / 'group_qc.html'}",
             f"  registration: {angle:.2f} deg, {shift:.2f} mm at the brain centre from the true transform",
             ""]
    rows = (("atlasgs" + (" (axial + coronal fused)" if info.t2w_coronal else ""), ours),
            ("cubic" + (" (axial)" if info.t2w_coronal else ""), cubic))
    width = max(10, *(len(name) for name, _ in rows))
    # the brain-mask edge (a thick slice there also sees tissue outside the brain): MAE within EDGE_MM of it
    edge = mask & (ndimage.distance_transform_edt(mask, sampling=nib.affines.voxel_sizes(truth_img.affine)) <= EDGE_MM)
    lines.append(f"  {'method':<{width}} {'PSNR (dB)':>10} {'MAE':>10} {'edge MAE':>10}   (vs ground truth, in the "
                 f"brain mask; edge: within {EDGE_MM:g} mm of its border)")
    for name, pred in rows:
        lines.append(f"  {name:<{width}} {metrics.psnr(pred, truth, mask):>10.2f} "
                     f"{metrics.mae(pred, truth, mask):>10.3f} {metrics.mae(pred, truth, edge):>10.3f}")
    sd_path = deriv / bd.sd_output(stacks)
    if sd_path.is_file():  # the calibrated posterior SD map (absent with --no-uncertainty)
        sd = nib.load(str(sd_path)).get_fdata(dtype=np.float32)
        seen = mask & (sd > 0)
        covered = float(np.mean(np.abs(ours - truth)[seen] <= 1.96 * sd[seen])) if seen.any() else float("nan")
        lines += ["", f"  SD map:       {sd_path}",
                  f"                median {float(np.median(sd[seen])):.2f}; {100 * covered:.1f} % of the brain voxels "
                  "within 1.96 SD of the truth (calibrated: about 95 %)"]
    return "\n".join(lines)


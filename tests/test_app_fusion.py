"""``--fuse-stacks`` end to end: the tiny sample with a second, coronal T2w stack (its own head motion and a receiver
gain of 1.25), run through the real CLI; compared with the shared reference run of the axial stack alone.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.bids.layout import collect_inputs
from atlasgs_bids.config import Config
from atlasgs_bids.data.sample import CORONAL_GAIN, build_sample_dataset
from atlasgs_bids.imaging import metrics
from atlasgs_bids.workflows.participant import init_participant_wf, target_groups
from conftest import BASE_FLAGS, TINY_T1W_MM, run_cli

FUSED = "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w"


@pytest.fixture(scope="module")
def two_stacks(tmp_path_factory):
    """The tiny sample (same seed and sizes as ``tiny_sample``: the same axial stack) plus its coronal stack."""
    return build_sample_dataset(tmp_path_factory.mktemp("fusion") / "sample", factor=3, downsample_mm=TINY_T1W_MM,
                                coronal=True)


@pytest.fixture(scope="module")
def fused_run(two_stacks, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "out"
    proc = run_cli(two_stacks.bids_dir, out, "participant", "--skip-bids-validation", "--fuse-stacks", *BASE_FLAGS,
                   "-w", out.parent / "work")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def test_axial_stack_is_the_reference_samples(two_stacks, tiny_sample):
    a = nib.load(str(two_stacks.t2w))
    b = nib.load(str(tiny_sample.t2w))
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_without_the_flag_each_stack_is_its_own_target(two_stacks, tmp_path):
    si = collect_inputs(two_stacks.bids_dir)[0]
    plain = Config.build(bids_dir=two_stacks.bids_dir, output_dir=tmp_path, analysis_level="participant")
    fused = plain.replace("fit", fuse_stacks=True)
    assert sorted([t.path.name for t in g] for g in target_groups(si, plain)) == [["sub-01_T2w.nii.gz"],
                                                                                ["sub-01_acq-cor_T2w.nii.gz"]]
    assert [[t.path.name for t in g] for g in target_groups(si, fused)] == [["sub-01_T2w.nii.gz",
                                                                           "sub-01_acq-cor_T2w.nii.gz"]]
    names = {n.fullname for n in init_participant_wf(subject_inputs=si, config=fused)._get_all_nodes()}
    assert {"T2w_wf.register", "T2w_wf.register_stack2", "T2w_wf.registration_qc_stack2",
            "T2w_wf.harmonize"} <= names
    assert not any(n.startswith("acq_cor_T2w_wf") for n in names)


@pytest.mark.slow
def test_fused_output_names_sources_and_scales(fused_run, two_stacks):
    anat = sorted(p.name for p in (fused_run / "sub-01" / "anat").iterdir())
    assert [n for n in anat if "desc-atlasgs_T2w" in n] == ["sub-01_space-T1w_desc-atlasgs_T2w.json",
                                                            "sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"]
    assert {"sub-01_from-T2w_to-T1w_mode-image_xfm.txt", "sub-01_acq-cor_from-T2w_to-T1w_mode-image_xfm.txt"} <= set(anat)
    # one SD map for the fused output, named like it (ADR 0008)
    assert [n for n in anat if "desc-atlasgsSD" in n] == ["sub-01_space-T1w_desc-atlasgsSD_T2w.json",
                                                          "sub-01_space-T1w_desc-atlasgsSD_T2w.nii.gz"]
    side = json.loads((fused_run / f"{FUSED}.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz", "bids:raw:sub-01/anat/sub-01_acq-cor_T2w.nii.gz",
                               "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    stacks = side["Parameters"]["stacks"]
    assert [s["acquisition"]["slice_axis"] for s in stacks] == [2, 1]
    assert stacks[0]["scale_vs_reference"] == 1.0
    assert stacks[1]["scale_vs_reference"] == pytest.approx(CORONAL_GAIN, rel=0.02)  # measured 1.2518
    # the report shows each stack's registration and residual
    page = (fused_run / "sub-01.html").read_text()
    for stem in ("sub-01_T2w", "sub-01_acq-cor_T2w"):
        assert (fused_run / "sub-01" / "figures" / f"{stem}_edges.png").is_file()
        assert (fused_run / "sub-01" / "figures" / f"{stem}_residual.png").is_file()
        assert f"{stem}_edges.png" in page


@pytest.mark.slow
def test_fused_output_beats_the_axial_stack_alone(fused_run, tiny_run, two_stacks):
    truth = nib.load(str(two_stacks.truth_t2w)).get_fdata()
    mask = nib.load(str(two_stacks.truth_mask)).get_fdata() > 0
    fused = nib.load(str(fused_run / f"{FUSED}.nii.gz")).get_fdata()
    alone = nib.load(str(tiny_run.out / f"{FUSED}.nii.gz")).get_fdata()
    p_fused, p_alone = metrics.psnr(fused, truth, mask), metrics.psnr(alone, truth, mask)
    # measured: fused 29.61 dB, the axial stack alone (the shared reference run) 27.52 dB
    assert p_fused > p_alone + 1.0, (p_fused, p_alone)


@pytest.mark.slow
def test_reports_only_redraws_the_fused_run(fused_run, two_stacks):
    before = (fused_run / "sub-01.html").read_text()
    out = run_cli(two_stacks.bids_dir, fused_run, "participant", "--skip-bids-validation", "--reports-only",
                  *BASE_FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    after = (fused_run / "sub-01.html").read_text()
    assert "sub-01_acq-cor_T2w_edges.png" in after and "sub-01_T2w_edges.png" in after
    assert len(after) > 0.9 * len(before)


@pytest.mark.slow
def test_demo_summary_scores_the_fused_output(fused_run, two_stacks):
    from atlasgs_bids.cli.demo import demo_summary
    from atlasgs_bids.cli.parser import build_demo_parser

    assert build_demo_parser().parse_args(["out", "--fuse-stacks"]).fuse_stacks
    text = demo_summary(two_stacks, fused_run)
    assert "atlasgs (axial + coronal fused)" in text and f"{FUSED}.nii.gz" in text

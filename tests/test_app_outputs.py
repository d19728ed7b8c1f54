"""What one participant run of the tiny sample writes, checked for truth (issue 16): every NIfTI on the T1w grid
carries the T1w's qform/sform codes and mm units; the harmonised target's sidecar claims none of the source's slice
or grid geometry; the pybids index is reused through ``--bids-database-dir``; the group level runs from the
derivatives alone; with -v the stage-2 iterations are logged and a heartbeat names what is still running.

One run serves the module: the session's reference run (conftest ``tiny_run``: ``sub-01`` of a two-subject copy, so
that ``sub-02`` is expected but missing).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BASE_FLAGS, copy_bids, run_cli
from test_bad_inputs import assert_short_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_run) -> dict[str, Path]:
    """The session's reference run (conftest ``tiny_run``: sub-01 of a two-subject copy, ``-v``, heartbeat every 3 s,
    ``--bids-database-dir``)."""
    assert f"pybids index of {tiny_run.bids} saved in {tiny_run.db}" in tiny_run.stderr
    return {"bids": tiny_run.bids, "out": tiny_run.out, "db": tiny_run.db, "stderr": tiny_run.stderr}


def test_no_silent_step_and_solver_iterations_at_verbose(run):
    """With -v the stage-2 solve's CG iterations are logged; the heartbeat (every 3 s here, 30 s on a terminal)
    names what is still running, so no step is silent for longer."""
    err = run["stderr"]
    assert "T2w_wf.harmonize: stage 2 solved in " in err and "relative residual by iteration 1: " in err
    assert "still running: sub-01 " in err


def test_nifti_headers_match_the_t1w_grid(run):
    anat = run["out"] / "sub-01" / "anat"
    t1w = nib.load(str(anat / "sub-01_desc-preproc_T1w.nii.gz")).header
    codes = (int(t1w["qform_code"]), int(t1w["sform_code"]))
    assert t1w.get_xyzt_units()[0] == "mm" and codes[1] > 0
    images = sorted(anat.glob("*.nii.gz"))
    assert len(images) == 4  # preproc T1w, brain mask, harmonised T2w and its SD map
    for path in images:
        hdr = nib.load(str(path)).header
        assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == codes, path.name
        assert hdr.get_xyzt_units()[0] == "mm", path.name


def test_sidecar_claims_no_source_geometry(run, tiny_sample):
    source = json.loads((run["bids"] / "sub-01" / "anat" / "sub-01_T2w.json").read_text())
    assert source["SpacingBetweenSlices"] == source["SliceThickness"] == 7.5  # the sample's 7.5 mm slices
    sidecar = json.loads((run["out"] / "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.json").read_text())
    for key in ("SliceThickness", "SpacingBetweenSlices", "SliceEncodingDirection"):
        assert key not in sidecar
        assert sidecar["Parameters"]["source_geometry"][key] == source[key]
    img = nib.load(str(run["out"] / "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"))
    assert max(img.header.get_zooms()[:3]) == pytest.approx(2.5)  # what the image is: the T1w's 2.5 mm grid
    assert sidecar["Parameters"]["acquisition"]["slice_thickness_mm"] == 7.5  # what the fit used


def test_output_passes_the_validator_without_unit_warnings(run):
    from atlasgs_bids.bids.validate import find_validator, run_validator
    from atlasgs_bids.errors import InputError

    try:
        find_validator()
    except InputError as exc:
        pytest.skip(str(exc))
    report = run_validator(run["out"])
    assert report.errors == {}, report.summary()
    assert "NIFTI_UNIT" not in report.warnings, report.warnings["NIFTI_UNIT"]


def test_sd_map_beside_the_output(run):
    """The default run writes the harmonised T2w's SD map (issue 15): the output's grid and units, a sidecar
    saying what it is and how it was calibrated, a figure in the report and the brain-median in the main sidecar."""
    anat = run["out"] / "sub-01" / "anat"
    out = nib.load(str(anat / "sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"))
    sd = nib.load(str(anat / "sub-01_space-T1w_desc-atlasgsSD_T2w.nii.gz"))
    assert sd.shape == out.shape and (sd.affine == out.affine).all()
    data = sd.get_fdata()
    inside = out.get_fdata() != 0
    assert (data[~inside] == 0).all() and (data[inside] > 0).mean() > 0.99
    side = json.loads((anat / "sub-01_space-T1w_desc-atlasgsSD_T2w.json").read_text())
    assert side["Sources"][0] == "bids::sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"
    assert "posterior" in side["Method"] and "held-out" in side["Method"]
    cal = side["Calibration"]
    assert cal["scale"] > 0 and (cal["calibrated"] or cal["reason"])
    main = json.loads((anat / "sub-01_space-T1w_desc-atlasgs_T2w.json").read_text())
    assert main["Metrics"]["sd_median"] == pytest.approx(side["Metrics"]["sd_median"])
    assert main["Metrics"]["sd_median"] == pytest.approx(float(np.median(data[inside])), rel=0.05)
    assert (run["out"] / "sub-01/figures/sub-01_T2w_uncertainty.png").is_file()
    assert "sub-01_T2w_uncertainty.png" in (run["out"] / "sub-01.html").read_text()


def test_bids_database_is_reused(run, tmp_path):
    """A subject added after the index was saved is not seen through the index (nothing re-listed), and is seen
    without it; an index of another dataset is refused."""
    bids = run["bids"]
    shutil.copytree(bids / "sub-02", bids / "sub-03")
    try:
        proc = run_cli(bids, tmp_path / "o", "participant", "--participant-label", "03", "--skip-bids-validation",
                       *BASE_FLAGS, "--bids-database-dir", run["db"])
        assert proc.returncode == 2
        assert f"pybids index read from {run['db']}" in proc.stderr
        assert_short_message(proc.stderr, "no subject(s) sub-03", "sub-01, sub-02")
    finally:
        shutil.rmtree(bids / "sub-03")
    other = copy_bids(bids, tmp_path / "other")
    proc = run_cli(other, tmp_path / "o2", "participant", "--skip-bids-validation", *BASE_FLAGS,
                   "--bids-database-dir", run["db"])
    assert proc.returncode == 2
    assert_short_message(proc.stderr, str(run["db"]), f"indexes {bids}", "its own folder")


def test_group_level_from_the_derivatives_alone(run, tmp_path):
    """The raw dataset gone (moved away): the group table still lists sub-01 (ok) and sub-02 (missing: in the raw
    dataset, never run), from the derivatives' sidecars and logs/participants.tsv."""
    out = shutil.copytree(run["out"], tmp_path / "derivatives")
    gone = tmp_path / "raw-not-here"
    proc = run_cli(gone, out, "group")
    assert proc.returncode == 0, proc.stderr
    assert "reads the derivatives alone" in proc.stderr
    with open(out / "group_qc.tsv", newline="") as fh:
        rows = [(r["participant_id"], r["status"]) for r in csv.DictReader(fh, delimiter="\t")]
    assert rows == [("sub-01", "ok"), ("sub-02", "missing")]
    assert (out / "group_qc.html").is_file()
    # the participant level still needs the raw dataset
    proc = run_cli(gone, tmp_path / "o", "participant", *BASE_FLAGS)
    assert proc.returncode == 2 and "path does not exist" in proc.stderr


def test_sidecar_and_transform_record_the_registration_refinement(run, tiny_sample):
    """Issue 11: the sidecar keeps antspyx's and the refined transform, the misfit before/after and the restart
    spread; the transform written is the refined one and lies within half a T1w voxel of the sample's truth."""
    import numpy as np

    from atlasgs_bids.imaging.refine import max_displacement_mm, surface_points
    from atlasgs_bids.imaging.transforms import read_itk_affine

    anat = run["out"] / "sub-01" / "anat"
    sidecar = json.loads((anat / "sub-01_space-T1w_desc-atlasgs_T2w.json").read_text())
    ref = sidecar["Parameters"]["registration_refinement"]
    assert ref["accepted"] is True and ref["misfit_after"] < ref["misfit_before"]
    metrics = sidecar["Metrics"]
    assert metrics["registration_misfit_after"] == pytest.approx(ref["misfit_after"])
    assert 0.0 <= metrics["registration_spread_mm"] < 1.25
    written = np.linalg.inv(read_itk_affine(next(anat.glob("*_from-T2w_to-T1w_mode-image_xfm.txt"))))
    assert np.allclose(written, np.asarray(ref["refined_target2t1w"]), atol=1e-4)
    mask = nib.load(str(tiny_sample.truth_mask))
    surf = surface_points(np.asarray(mask.dataobj) > 0, mask.affine)
    truth = np.asarray(tiny_sample.target2t1w)
    refined = max_displacement_mm(written, truth, surf)
    assert refined < 1.25  # half a 2.5 mm T1w voxel
    assert refined <= max_displacement_mm(np.asarray(ref["initial_target2t1w"]), truth, surf) + 0.1

"""Derivative names, atomic writes, dataset_description written once, staging, and the group QC table."""
from __future__ import annotations

import doctest
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasgs_bids.bids import derivatives as bd
from atlasgs_bids.errors import InputError
from atlasgs_bids.interfaces.bids import target_sidecar
from atlasgs_bids.processes import alive
from atlasgs_bids.workflows.group import write_group_qc

NAMES = [  # (helper, source, kwargs, expected relative path)
    (bd.target_output, "/b/sub-01/anat/sub-01_T2w.nii.gz", {}, "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"),
    (bd.target_output, "/b/sub-01/ses-2/anat/sub-01_ses-2_acq-ax_run-3_FLAIR.nii.gz", {"extension": ".json"},
     "sub-01/ses-2/anat/sub-01_ses-2_acq-ax_run-3_space-T1w_desc-atlasgs_FLAIR.json"),
    (bd.target_output, "/b/sub-01/dwi/sub-01_acq-b1000_dir-AP_dwi.nii.gz", {"extension": ".bval"},
     "sub-01/dwi/sub-01_acq-b1000_dir-AP_space-T1w_desc-atlasgs_dwi.bval"),
    (bd.target_output, "/b/sub-01/perf/sub-01_asl.nii.gz", {},
     "sub-01/perf/sub-01_space-T1w_desc-atlasgs_asl.nii.gz"),
    (bd.xfm_output, "/b/sub-01/anat/sub-01_PDw.nii.gz", {}, "sub-01/anat/sub-01_from-PDw_to-T1w_mode-image_xfm.txt"),
    (bd.xfm_output, "/b/sub-01/dwi/sub-01_dwi.nii.gz", {}, "sub-01/dwi/sub-01_from-dwi_to-T1w_mode-image_xfm.txt"),
    (bd.t1w_preproc_output, "/b/sub-01/ses-1/anat/sub-01_ses-1_acq-mp_run-2_T1w.nii.gz", {},
     "sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz"),
    (bd.brain_mask_output, "/b/sub-01/anat/sub-01_T1w.nii", {}, "sub-01/anat/sub-01_desc-brain_mask.nii.gz"),
    (bd.scaffold_output, "/b/sub-01/anat/sub-01_T1w.nii.gz", {"extension": ".json"},
     "sub-01/anat/sub-01_desc-atlasgs_gaussians.json"),
]


def test_doctests():
    result = doctest.testmod(bd)
    assert result.attempted >= 10 and result.failed == 0


def test_exact_names():
    for helper, src, kwargs, expected in NAMES:
        assert helper(src, **kwargs).as_posix() == expected, (helper.__name__, src)


def test_bad_names_raise():
    with pytest.raises(InputError, match="no sub- entity"):
        bd.parse_name("/x/T1w.nii.gz")
    with pytest.raises(InputError, match="not key-value"):
        bd.parse_name("/x/sub-01_junk_T1w.nii.gz")
    with pytest.raises(ValueError, match="unknown BIDS entities"):
        bd.build_name({"sub": "01", "colour": "red"}, "T1w", ".nii.gz")


def test_bids_uri_and_atomic_write(tmp_path):
    assert bd.bids_uri(tmp_path / "sub-01/anat/x.nii.gz", tmp_path) == "bids:raw:sub-01/anat/x.nii.gz"
    p = bd.atomic_write_json(tmp_path / "a" / "x.json", {"b": 1})
    assert json.loads(p.read_text()) == {"b": 1}
    with pytest.raises(ValueError):
        bd.atomic_write_json(tmp_path / "a" / "y.json", {"nan": float("nan")})
    assert sorted(os.listdir(tmp_path / "a")) == ["x.json"]  # no temp file left behind by the failure


def _race(args):
    out, barrier_path = args
    while not Path(barrier_path).exists():  # start as close together as possible
        pass
    return bd.write_dataset_description(out, "/data/bids", "9.9", environ={})


def test_dataset_description_written_once_under_race(tmp_path):
    out = tmp_path / "deriv"
    go = tmp_path / "go"
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        result = pool.map_async(_race, [(out, go)] * 8)
        go.touch()
        wins = result.get(timeout=60)
    assert sum(wins) == 1
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0] == {
        "Name": "atlasgs-bids", "Version": "9.9", "CodeURL": "https://github.com/atlasgs/atlasgs-bids"}
    assert sorted(os.listdir(out)) == ["dataset_description.json"]
    # a second call never rewrites it
    before = (out / "dataset_description.json").stat().st_mtime_ns
    assert bd.write_dataset_description(out, "/other", "1.0") is False
    assert (out / "dataset_description.json").stat().st_mtime_ns == before


def test_dataset_description_container():
    desc = bd.dataset_description("/d", "1.0", {"ATLASGS_CONTAINER_TYPE": "docker", "ATLASGS_CONTAINER_TAG": "a:1"})
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "a:1"}
    assert desc["DatasetLinks"]["raw"] == "file:///d"


def test_staging_commit_and_discard(tmp_path):
    out = tmp_path / "out"
    st = bd.new_staging_dir(out, "sub-01")
    bd.atomic_write_bytes(st / "sub-01/anat/a.txt", b"a")
    bd.atomic_write_bytes(st / "sub-01/anat/b.txt", b"b")
    moved = bd.commit_staging(st, out)
    assert sorted(p.relative_to(out).as_posix() for p in moved) == ["sub-01/anat/a.txt", "sub-01/anat/b.txt"]
    assert not st.exists()
    # a second session of the same subject merges into the existing sub-01 folder
    st2 = bd.new_staging_dir(out, "sub-01_ses-2")
    bd.atomic_write_bytes(st2 / "sub-01/ses-2/anat/c.txt", b"c")
    bd.commit_staging(st2, out)
    assert (out / "sub-01/ses-2/anat/c.txt").read_bytes() == b"c" and (out / "sub-01/anat/a.txt").exists()
    st3 = bd.new_staging_dir(out, "sub-02")
    bd.atomic_write_bytes(st3 / "sub-02/anat/d.txt", b"d")
    bd.discard_staging(st3)
    assert sorted(p.name for p in out.iterdir()) == ["sub-01"]


def test_group_qc_rows(tmp_path):
    out = tmp_path / "out"
    sc = {"Sources": ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"], "Metrics": {"registration_mattes_mi": 0.5,
          "residual_rms": 0.1}, "Runtime": {"registration_seconds": 2.0, "appearance_seconds": 3.0}, "Device": "cpu"}
    bd.atomic_write_json(out / "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.json", sc)
    bd.atomic_write_json(out / "sub-01/anat/sub-01_desc-atlasgs_gaussians.json", {"n": 1})  # not a target
    bd.atomic_write_json(out / "logs/sub-02_status.json", {"status": "failed", "error": "RuntimeError: x"})
    path = write_group_qc(out, ["01", "02", "03"])
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    header, rows = lines[0], [dict(zip(lines[0], r)) for r in lines[1:]]
    assert header[:5] == ["participant_id", "session_id", "target", "modality", "status"]
    assert [(r["participant_id"], r["status"]) for r in rows] == [("sub-01", "ok"), ("sub-02", "failed"),
                                                                  ("sub-03", "missing")]
    assert rows[0]["target"] == "sub-01/anat/sub-01_T2w.nii.gz" and rows[0]["runtime_seconds"] == "5.0"
    assert rows[0]["residual_rms"] == "0.1" and rows[2]["residual_rms"] == "n/a"


def test_output_names_pass_bids_validator(tmp_path):
    """A derivatives tree with every output kind, named by these helpers, has no bids-validator-deno error.

    What the validator (3.0) checks on a derivative dataset: dataset_description (DatasetType, GeneratedBy), file
    names against the schema's entities/suffixes/datatypes, required sidecar keys (SkullStripped for space-T1w
    anatomical derivatives), JSON validity. Files the schema does not know yet (xfm, scaffold, QC table, logs) are
    listed in .bidsignore, as fMRIPrep does.
    """
    import nibabel as nib
    import numpy as np

    from atlasgs_bids.bids.validate import run_validator

    out = tmp_path / "deriv"
    bd.write_dataset_description(out, tmp_path / "raw", "0.1.0", environ={})
    bd.write_bidsignore(out)
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    t1w = "/raw/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    targets = ["/raw/sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-1_T2w.nii.gz",
               "/raw/sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz", "/raw/sub-01/ses-1/anat/sub-01_ses-1_PDw.nii.gz"]
    for rel in [bd.t1w_preproc_output(t1w), bd.brain_mask_output(t1w)] + [bd.target_output(t) for t in targets]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(out / rel))
    bd.atomic_write_json(out / bd.t1w_preproc_output(t1w).with_suffix("").with_suffix(".json"),
                         {"SkullStripped": False})
    for t in targets:  # the sidecar the app writes
        sidecar = target_sidecar(meta={"EchoTime": 0.1, "SliceThickness": 4.0}, sources=[bd.bids_uri(t, "/raw")],
                                 spatial_reference=f"bids::{bd.t1w_preproc_output(t1w).as_posix()}",
                                 modality="T2w", parameters={"quality": "fast"},
                                 registration={"metric": 0.5, "metric_name": "mattes_mi", "seconds": 1.0},
                                 appearance={"seconds": 2.0, "residual_rms": 0.1}, device="cpu", version="0.1.0")
        assert "SliceThickness" not in sidecar and sidecar["EchoTime"] == 0.1
        bd.atomic_write_json(out / bd.target_output(t, extension=".json"), sidecar)
    for t in targets:
        bd.atomic_write_bytes(out / bd.xfm_output(t), b"#Insight Transform File V1.0\n")
    bd.atomic_write_bytes(out / bd.scaffold_output(t1w), b"npz")
    bd.atomic_write_json(out / bd.scaffold_output(t1w, ".json"), {})
    bd.atomic_write_bytes(out / "group_qc.tsv", b"participant_id\tstatus\nsub-01\tok\n")
    report = run_validator(out)
    assert report.errors == {}, report.summary()


def test_target_sidecar_runtime_total_and_acquisition():
    sidecar = target_sidecar(
        meta={}, sources=["bids:raw:sub-01/anat/sub-01_PDw.nii.gz"], spatial_reference="bids::x", modality="PDw",
        parameters={"quality": "fast"}, registration={"metric": 0.4, "metric_name": "mattes_mi", "seconds": 10.0},
        appearance={"seconds": 30.0, "seconds_build": 20.0, "render_seconds": 5.0, "iterations": 80,
                    "final_relative_residual": 1e-4, "acquisition": {"slice_axis": 2, "slice_thickness_mm": 2.4}},
        device="cpu", version="0.1.0")
    assert sidecar["Runtime"] == {"registration_seconds": 10.0, "appearance_seconds": 30.0,
                                  "appearance_seconds_build": 20.0, "render_seconds": 5.0, "total_seconds": 45.0}
    assert sidecar["Parameters"]["acquisition"] == {"slice_axis": 2, "slice_thickness_mm": 2.4}
    assert sidecar["Metrics"] == {"registration_mattes_mi": 0.4, "iterations": 80, "final_relative_residual": 1e-4}


def test_new_staging_dir_removes_only_stale_staging_of_this_label(tmp_path):
    """A killed run's staging folder (this host, dead pid) is removed by the next run of the same participant;
    live processes', other hosts' and other participants' are left alone (array jobs share output_dir)."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = bd._host()
    stale = tmp_path / f".staging-sub-01-{host}_{dead}_abc"
    live = tmp_path / f".staging-sub-01-{host}_{os.getpid()}_def"
    other_host = tmp_path / f".staging-sub-01-elsewhere_{dead}_ghi"
    other_label = tmp_path / f".staging-sub-02-{host}_{dead}_jkl"
    for d in (stale, live, other_host, other_label):
        (d / "sub-x" / "anat").mkdir(parents=True)
    assert bd.stale_staging_dirs(tmp_path, "sub-01") == [stale]
    new = bd.new_staging_dir(tmp_path, "sub-01")
    assert not stale.exists() and live.exists() and other_host.exists() and other_label.exists()
    assert new.name.startswith(f".staging-sub-01-{host}_{os.getpid()}_")


def test_sidecar_inherits_only_what_stays_true():
    """A derivative on the T1w grid inherits the contrast's physics and the scanner, never the source's slices, voxel
    grid, orientation or phase-encoding geometry (kept apart under Parameters.source_geometry)."""
    source = {"EchoTime": 0.09, "RepetitionTime": 6.0, "FlipAngle": 150, "MagneticFieldStrength": 3,
              "Manufacturer": "Siemens", "SliceThickness": 6.4, "SpacingBetweenSlices": 6.4,
              "SliceEncodingDirection": "k", "AcquisitionMatrixPE": 256, "ReconMatrixPE": 256, "PercentPhaseFOV": 75,
              "ImageOrientationPatientDICOM": [1, 0, 0, 0, 1, 0], "PhaseEncodingDirection": "j-",
              "TotalReadoutTime": 0.05, "PixelBandwidth": 200, "Sources": ["bids:raw:elsewhere"], "Metrics": {"x": 1}}
    sidecar = target_sidecar(meta=source, sources=["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"],
                             spatial_reference="bids::x", modality="T2w", parameters={},
                             registration={"metric": 0.4, "metric_name": "mattes_mi", "seconds": 1.0},
                             appearance={"seconds": 2.0}, device="cpu", version="0.1.0")
    physics = ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer")
    assert {k: sidecar[k] for k in physics} == {k: source[k] for k in physics}
    geometry = set(source) - set(physics) - {"Sources", "Metrics"}
    assert not geometry & set(sidecar), sorted(geometry & set(sidecar))
    assert sidecar["Parameters"]["source_geometry"] == {k: source[k] for k in geometry}
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"]  # the app's own keys win
    assert sidecar["Metrics"]["registration_mattes_mi"] == 0.4 and "x" not in sidecar["Metrics"]


def test_alive_tells_a_running_process_from_a_zombie_and_a_reaped_one():
    """One liveness check (``processes.alive``) for the staging clean-up and the worker shutdown: a zombie (exited,
    not reaped) runs nothing more, so its staging folder is stale."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert alive(os.getpid()) and alive(proc.pid)
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    while alive(proc.pid) and time.monotonic() < deadline:  # killed, not yet reaped: a zombie
        time.sleep(0.01)
    assert not alive(proc.pid) and Path(f"/proc/{proc.pid}").exists()
    proc.wait()
    assert not alive(proc.pid)

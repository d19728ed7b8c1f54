"""Concurrent runs (issue 6): three participant processes of one dataset started at once into one output_dir (an
array job). ``dataset_description.json`` is written once and valid, every participant is complete, nothing is
clobbered: each participant's outputs equal those of the others (the three subjects are copies of one), and the
run-level files (README, .bidsignore, logs) are intact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import copy_bids
from test_bad_inputs import BASE_FLAGS, hidden_or_temp, tree_digest

pytestmark = pytest.mark.slow

LABELS = ("01", "02", "03")


def test_three_participants_at_once_into_one_output_dir(tiny_sample, tmp_path):
    bids = copy_bids(tiny_sample.bids_dir, tmp_path / "bids", participants=LABELS)
    before = tree_digest(bids)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "atlasgs_bids.cli", str(bids), str(out), "participant",
                               "--participant-label", label, "--skip-bids-validation", *BASE_FLAGS,
                               "-w", str(tmp_path / f"work-{label}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for label in LABELS]
    results = [(p, *p.communicate(timeout=400)) for p in procs]
    for proc, _, err in results:
        assert proc.returncode == 0, err

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "atlasgs-bids"
    assert hidden_or_temp(out) == []  # no staging folder, no temp file of a losing writer
    trees = {}
    for label in LABELS:
        sub = out / f"sub-{label}"
        files = sorted(p.relative_to(sub).as_posix().replace(f"sub-{label}", "sub-X") for p in sub.rglob("*")
                       if p.is_file())
        trees[label] = files
        status = json.loads((out / "logs" / f"sub-{label}_status.json").read_text())
        assert status["status"] == "ok"
        assert all((out / rel).is_file() for rel in status["outputs"])  # every output it reported is there
        assert {f"sub-{label}/" + f.replace("sub-X", f"sub-{label}") for f in files} <= set(status["outputs"])
        assert (out / "logs" / f"sub-{label}_methods.txt").stat().st_size > 0
        target = nib.load(str(sub / "anat" / f"sub-{label}_space-T1w_desc-atlasgs_T2w.nii.gz"))
        assert np.isfinite(np.asanyarray(target.dataobj)).all()
    assert trees["01"] == trees["02"] == trees["03"] and len(trees["01"]) >= 9
    # same input bytes, same seed: the three participants' results are identical, so none was overwritten by
    # another's half (names differ only by the label)
    ref = np.asanyarray(nib.load(str(out / "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz")).dataobj)
    for label in LABELS[1:]:
        other = nib.load(str(out / f"sub-{label}/anat/sub-{label}_space-T1w_desc-atlasgs_T2w.nii.gz"))
        assert np.array_equal(np.asanyarray(other.dataobj), ref)
    assert len(list((out / "logs").glob("config-*.toml"))) == len(LABELS)
    assert (out / ".bidsignore").read_text().splitlines()[0] == "logs/"
    assert tree_digest(bids) == before

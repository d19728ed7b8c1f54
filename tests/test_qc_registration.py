"""Registration QC: the tiny sample registers fine; a target whose header was rotated/shifted away fails loudly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.qc.registration import FAIL_NCC, WARN_NCC, dice, registration_qc

from conftest import copy_bids


def _rotated_shifted(img: nib.Nifti1Image, deg: float = 90.0, shift_mm: float = 80.0) -> nib.Nifti1Image:
    th = np.deg2rad(deg)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    rot[0, 3] = shift_mm
    return nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine, img.header)


def test_dice():
    a = np.zeros(10, bool)
    a[:4] = True
    b = np.zeros(10, bool)
    b[2:6] = True
    assert dice(a, b) == pytest.approx(0.5) and dice(a, a) == 1.0 and dice(~a & a, ~a & a) == 0.0


def test_tiny_sample_true_transform_passes_and_misplaced_fails(tiny_sample):
    t1w, mask = nib.load(str(tiny_sample.t1w)), nib.load(str(tiny_sample.truth_mask))
    t1w = nib.as_closest_canonical(t1w)
    t2w = nib.load(str(tiny_sample.t2w))
    good = registration_qc(t1w, mask, t2w, tiny_sample.target2t1w)
    assert good["ncc"] > WARN_NCC + 0.2 and not good["flag"] and not good["failed"]
    assert good["mask_dice"] is not None and good["mask_dice"] > 0.9
    off = np.array(tiny_sample.target2t1w, dtype=float)
    off[0, 3] += 12.0  # a 12 mm error: below the fail threshold
    bad = registration_qc(t1w, mask, t2w, off)
    assert bad["ncc"] < FAIL_NCC and bad["failed"] and bad["flag"]


@pytest.mark.slow
def test_cli_fails_on_target_registration_failure(tiny_sample, tmp_path):
    """A T2w whose header is rotated 90 deg and shifted 80 mm: exit 1, named target + 'registration', no sub-01."""
    bids = copy_bids(tiny_sample.bids_dir, tmp_path / "bids")
    t2w = bids / "sub-01/anat/sub-01_T2w.nii.gz"
    nib.save(_rotated_shifted(nib.load(str(t2w))), str(t2w))
    out = tmp_path / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "atlasgs-bids"), str(bids), str(out), "participant",
                           "--quality", "fast", "--skull-stripped", "--work-dir", str(tmp_path / "work"),
                           "--skip-bids-validation"],
                          capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "sub-01_T2w.nii.gz" in text and "registration" in text.lower(), text[-3000:]
    assert not (out / "sub-01").exists()

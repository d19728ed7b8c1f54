"""The demo's sample dataset: offline, valid BIDS, the stated geometry, a correct known transform, deterministic."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from atlasgs_bids.data import SampleInfo, build_sample_dataset
from atlasgs_bids.data.sample import DEMO_T1W_MM, ROTATION_DEG, rigid_matrix, sample_through_psf
from atlasgs_bids.errors import InputError

FACTOR = 4


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[SampleInfo, Path]:
    """One build with NILEARN_DATA pointing at an empty folder: anything nilearn fetched would land there."""
    nilearn_data = tmp_path_factory.mktemp("nilearn_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NILEARN_DATA", str(nilearn_data))
        info = build_sample_dataset(tmp_path_factory.mktemp("sample"), factor=FACTOR, seed=0)
    return info, nilearn_data


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_builds_offline_fast_with_the_expected_files(sample):
    info, nilearn_data = sample
    assert info.seconds < 20.0, f"build took {info.seconds:.1f} s"
    assert list(nilearn_data.iterdir()) == [], "nilearn downloaded something"
    bids = info.bids_dir
    for rel in ("dataset_description.json", "README", "participants.tsv",
                "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_T2w.json"):
        assert (bids / rel).is_file(), rel
    for path in (info.truth_t2w, info.truth_mask, info.bids_dir.parent / "truth" / "target2t1w_ras.txt"):
        assert path.is_file() and info.bids_dir not in path.parents, path  # truth stays out of the BIDS dataset
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0" and "ICBM152" in desc["License"]


def test_geometry_thick_slices_and_sidecar(sample):
    info, _ = sample
    t1, t2 = nib.load(info.t1w), nib.load(info.t2w)
    np.testing.assert_allclose(t1.header.get_zooms(), (DEMO_T1W_MM,) * 3, rtol=1e-6)
    np.testing.assert_allclose(t2.header.get_zooms(), (DEMO_T1W_MM, DEMO_T1W_MM, FACTOR * DEMO_T1W_MM), rtol=1e-6)
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S") and nib.aff2axcodes(t2.affine) == ("R", "A", "S")
    assert int(t2.header["sform_code"]) == 1 and t2.get_data_dtype() == np.int16
    sidecar = json.loads(info.t2w.with_name("sub-01_T2w.json").read_text())
    assert sidecar["SliceThickness"] == pytest.approx(FACTOR * DEMO_T1W_MM) == info.slice_thickness
    for path in (info.t1w, info.t2w, info.truth_t2w):
        data = nib.load(path).get_fdata()
        assert np.all(np.isfinite(data)) and data.max() > 100, path
    truth, mask = nib.load(info.truth_t2w), nib.load(info.truth_mask)
    assert truth.shape == mask.shape == t1.shape and np.allclose(truth.affine, t1.affine)
    assert 300_000 < int(_array(info.truth_mask).sum()) < 600_000  # about 460 k at 1.6 mm


def test_t2_contrast_is_inverted_against_t1(sample):
    """T2-like: WM (bright on T1) is dark, CSF (dark on T1) is bright, inside the brain."""
    info, _ = sample
    mask = _array(info.truth_mask) > 0
    t1, truth = nib.load(info.t1w).get_fdata()[mask], nib.load(info.truth_t2w).get_fdata()[mask]
    assert _ncc(t1, truth) < -0.5


def test_stored_transform_is_the_stated_rigid_motion(sample):
    info, _ = sample
    stored = np.loadtxt(info.bids_dir.parent / "truth" / "target2t1w_ras.txt")
    np.testing.assert_allclose(stored, info.target2t1w, atol=1e-9)
    rot = stored[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    assert np.degrees(np.arccos((np.trace(rot) - 1) / 2)) == pytest.approx(ROTATION_DEG)
    assert np.linalg.norm(stored[:3, 3]) == pytest.approx(5.0)


def test_rigid_matrix_known_answer():
    m = rigid_matrix((0, 0, 1), 90.0, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)  # x -> y, then translate


def test_simulator_maps_a_landmark_through_target2t1w(sample):
    """A blob at a known T1w world point lands, in the thick-slice target, where inv(target2t1w) puts it."""
    info, _ = sample
    x0 = np.array([20.0, -30.0, 15.0])  # T1w world mm RAS
    obj_affine = np.eye(4)
    obj_affine[:3, 3] = x0 - 40.0
    grid = np.stack(np.meshgrid(*[np.arange(81.0)] * 3, indexing="ij"), axis=-1) - 40.0
    blob = np.exp(-0.5 * (grid**2).sum(-1) / 2.0**2)  # sigma 2 mm, centred on x0
    zooms = np.array([DEMO_T1W_MM, DEMO_T1W_MM, FACTOR * DEMO_T1W_MM])
    t2_affine = np.diag([*zooms, 1.0])
    t2_affine[:3, 3] = x0 - 30.0
    shape = tuple(int(n) for n in np.ceil(60.0 / zooms) + 1)
    out = sample_through_psf(blob, obj_affine, info.target2t1w @ t2_affine, shape, tuple(zooms))
    y0 = nib.affines.apply_affine(t2_affine, ndi.center_of_mass(out))  # target world mm
    assert np.linalg.norm(nib.affines.apply_affine(info.target2t1w, y0) - x0) < 0.5
    assert np.linalg.norm(y0 - x0) > 3.0  # the motion is large enough for this check to mean something


def test_t2w_matches_the_truth_only_through_target2t1w(sample):
    """Sampling the truth (T1w grid) at each T2w voxel centre moved by target2t1w matches the T2w data."""
    info, _ = sample
    t2, truth = nib.load(info.t2w), nib.load(info.truth_t2w)
    t2_data, truth_data = t2.get_fdata(), truth.get_fdata()

    def pulled(target2t1w: np.ndarray) -> np.ndarray:
        vox = np.linalg.inv(truth.affine) @ target2t1w @ t2.affine  # T2w voxel -> truth voxel
        return ndi.affine_transform(truth_data, vox[:3, :3], vox[:3, 3], output_shape=t2.shape, order=1)

    right, wrong = pulled(info.target2t1w), pulled(np.eye(4))
    sel = right > 100  # inside the brain
    ncc_right, ncc_wrong = _ncc(right[sel], t2_data[sel]), _ncc(wrong[sel], t2_data[sel])
    assert ncc_right > 0.85 and ncc_right > ncc_wrong + 0.05, (ncc_right, ncc_wrong)


def test_deterministic_for_a_seed(sample, tmp_path):
    info, _ = sample
    again = build_sample_dataset(tmp_path / "again", factor=FACTOR, seed=0)
    for a, b in ((info.t1w, again.t1w), (info.t2w, again.t2w), (info.truth_t2w, again.truth_t2w),
                 (info.truth_mask, again.truth_mask)):
        assert _array(a).tobytes() == _array(b).tobytes(), a.name
    other = build_sample_dataset(tmp_path / "other", factor=FACTOR, seed=1)
    assert _array(other.t1w).tobytes() == _array(info.t1w).tobytes()  # the seed moves only bias and noise
    assert _array(other.t2w).tobytes() != _array(info.t2w).tobytes()


@pytest.mark.parametrize("kwargs", [{"factor": 0}, {"factor": 2.5}, {"downsample_mm": 0.5}])
def test_bad_arguments_raise_input_error(tmp_path, kwargs):
    with pytest.raises(InputError):
        build_sample_dataset(tmp_path, **kwargs)


def _validator() -> str | None:
    return shutil.which("bids-validator-deno") or next(
        (str(p) for p in [Path(sys.executable).parent / "bids-validator-deno"] if p.is_file()), None
    )


def test_bids_validator_reports_no_errors(sample):
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno not installed")
    info, _ = sample
    run = subprocess.run([exe, "--format", "json", str(info.bids_dir)], capture_output=True, text=True, timeout=120)
    issues = json.loads(run.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert errors == [], errors
    assert run.returncode == 0, run.stderr

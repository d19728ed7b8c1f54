"""Input discovery (pybids) on the real BIDS datasets and on small synthetic BIDS trees."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.bids.layout import (choose_t1w, collect_inputs, is_coarser, load_bids_filters, voxel_sizes)
from atlasgs_bids.errors import InputError


def write_nifti(path: Path, zooms=(1.0, 1.0, 1.0), shape=(12, 12, 10), nvol: int | None = None) -> Path:
    """A small non-zero NIfTI with the given voxel sizes (mm), RAS+ diagonal affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.uniform(1, 100, shape + ((nvol,) if nvol else ())).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def make_bids(root: Path, files: dict[str, tuple], sidecars: dict[str, dict] | None = None) -> Path:
    """A BIDS tree: ``files`` maps relative NIfTI paths to voxel sizes (or (zooms, nvol)); text files as str."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    for rel, spec in files.items():
        if isinstance(spec, str):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(spec)
        elif isinstance(spec[0], tuple):
            write_nifti(root / rel, spec[0], nvol=spec[1])
        else:
            write_nifti(root / rel, spec)
    for rel, meta in (sidecars or {}).items():
        (root / rel).write_text(json.dumps(meta))
    return root


ISO, THICK = (1.0, 1.0, 1.0), (1.0, 1.0, 4.0)


def test_chris_finds_t1w_and_pdw(shared_data):
    (si,) = collect_inputs(shared_data / "bids-chris")
    assert (si.subject, si.session) == ("chris", None)
    assert si.t1w.name == "sub-chris_T1w.nii.gz"
    assert [(t.path.name, t.modality) for t in si.targets] == [("sub-chris_PDw.nii.gz", "PDw")]
    assert si.targets[0].zooms[2] == pytest.approx(2.4, abs=0.01)


def test_fetal_stacks_no_t1w_names_subject(shared_data):
    with pytest.raises(InputError, match=r"no T1w image for sub-01"):
        collect_inputs(shared_data / "bids-fetal-stacks")


def test_tcia_not_bids(shared_data):
    with pytest.raises(InputError, match="not a BIDS dataset"):
        collect_inputs(shared_data / "tcia-glioma-thick")


def test_tcia_bidsified_thick_t1w_refused(shared_data, tmp_path):
    """Arranged as BIDS (symlinks), the glioma case has only a 5.5 mm T1w: refused, naming the file."""
    src = shared_data / "tcia-glioma-thick"
    root = make_bids(tmp_path / "bids", {})
    anat = root / "sub-fg6692" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-fg6692_T1w.nii.gz").symlink_to(src / "TCGA-FG-6692_t1.nii.gz")
    (anat / "sub-fg6692_T2w.nii.gz").symlink_to(src / "TCGA-FG-6692_t2.nii.gz")
    with pytest.raises(InputError, match=r"sub-fg6692_T1w\.nii\.gz: the T1w is not 3D"):
        collect_inputs(root)


def test_t1w_choice_finest_then_highest_run(tmp_path, caplog):
    root = make_bids(tmp_path / "b", {
        "sub-01/anat/sub-01_run-1_T1w.nii.gz": (0.8, 0.8, 0.8),
        "sub-01/anat/sub-01_run-2_T1w.nii.gz": (1.0, 1.0, 1.0),
        "sub-01/anat/sub-01_run-3_T1w.nii.gz": (0.8, 0.8, 0.8),
        "sub-01/anat/sub-01_T2w.nii.gz": THICK,
    })
    with caplog.at_level(logging.INFO, logger="atlasgs"):
        (si,) = collect_inputs(root)
    assert si.t1w.name == "sub-01_run-3_T1w.nii.gz"
    assert "3 T1w images; using sub-01_run-3_T1w.nii.gz" in caplog.text


def test_choose_t1w_table(tmp_path):
    cases = [  # (zooms, run) per candidate, expected index
        ([((1, 1, 1), 1), ((0.9, 0.9, 0.9), 1)], 1),
        ([((1, 1, 1), 1), ((1, 1, 1), 2)], 1),
        ([((0.5, 1, 1), None), ((0.7, 0.7, 0.7), 5)], 1),  # 0.5 mm^3 vs 0.343 mm^3: volume, not min axis
    ]
    for k, (cands, expected) in enumerate(cases):
        paths = [(write_nifti(tmp_path / f"c{k}_{i}.nii.gz", z), {"run": r} if r else {})
                 for i, (z, r) in enumerate(cands)]
        assert choose_t1w(paths) == paths[expected][0], cands


def test_sessions_runs_acq_and_not_coarser(tmp_path, caplog):
    root = make_bids(tmp_path / "b", {
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz": ISO,
        "sub-01/ses-a/anat/sub-01_ses-a_acq-tse_run-1_T2w.nii.gz": THICK,
        "sub-01/ses-a/anat/sub-01_ses-a_acq-tse_run-2_T2w.nii.gz": THICK,
        "sub-01/ses-a/anat/sub-01_ses-a_FLAIR.nii.gz": (1.02, 1.02, 1.02),  # not coarser: skipped
        "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz": ISO,
        "sub-01/ses-b/anat/sub-01_ses-b_PDw.nii.gz": (0.9, 0.9, 3.0),
    })
    with caplog.at_level(logging.WARNING, logger="atlasgs"):
        found = collect_inputs(root)
    assert [(s.session, [t.path.name for t in s.targets]) for s in found] == [
        ("a", ["sub-01_ses-a_acq-tse_run-1_T2w.nii.gz", "sub-01_ses-a_acq-tse_run-2_T2w.nii.gz"]),
        ("b", ["sub-01_ses-b_PDw.nii.gz"]),
    ]
    assert "sub-01_ses-a_FLAIR.nii.gz: skipped" in caplog.text
    assert [s.session for s in collect_inputs(root, session_label=["ses-b"])] == ["b"]
    assert collect_inputs(root, modalities=["FLAIR", "PDw"])[0].label == "sub-01_ses-b"


def test_is_coarser_rule():
    assert is_coarser((1, 1, 1.06), (1, 1, 1))
    assert not is_coarser((1, 1, 1.05), (1, 1, 1))
    assert not is_coarser((0.5, 0.5, 0.5), (1, 1, 1))


def test_nothing_coarser_is_input_error(tmp_path):
    root = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T1w.nii.gz": ISO,
                                      "sub-01/anat/sub-01_T2w.nii.gz": ISO})
    with pytest.raises(InputError, match="nothing to process"):
        collect_inputs(root)


def test_dwi_needs_bval_bvec(tmp_path):
    files = {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/dwi/sub-01_dwi.nii.gz": ((2.0, 2.0, 4.0), 3)}
    root = make_bids(tmp_path / "b", files)
    with pytest.raises(InputError, match=r"sub-01_dwi\.nii\.gz: a dwi series needs its \.bval and \.bvec"):
        collect_inputs(root)
    (root / "sub-01/dwi/sub-01_dwi.bval").write_text("0 1000 1000\n")
    (root / "sub-01/dwi/sub-01_dwi.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    (si,) = collect_inputs(root)
    (t,) = si.targets
    assert (t.modality, t.bval.name, t.bvec.name) == ("dwi", "sub-01_dwi.bval", "sub-01_dwi.bvec")


def test_asl_needs_aslcontext(tmp_path):
    files = {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/perf/sub-01_asl.nii.gz": ((3.0, 3.0, 5.0), 2)}
    root = make_bids(tmp_path / "b", files, {"sub-01/perf/sub-01_asl.json": {"RepetitionTimePreparation": 4.0}})
    with pytest.raises(InputError, match=r"sub-01_aslcontext\.tsv"):
        collect_inputs(root)
    (root / "sub-01/perf/sub-01_aslcontext.tsv").write_text("volume_type\ncontrol\nlabel\n")
    (t,) = collect_inputs(root)[0].targets
    assert t.aslcontext.name == "sub-01_aslcontext.tsv" and t.meta["RepetitionTimePreparation"] == 4.0


def test_participant_label_unknown_and_prefix(tmp_path):
    root = make_bids(tmp_path / "b", {
        "sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/anat/sub-01_T2w.nii.gz": THICK,
        "sub-02/anat/sub-02_T1w.nii.gz": ISO, "sub-02/anat/sub-02_T2w.nii.gz": THICK})
    assert [s.subject for s in collect_inputs(root, participant_label=["sub-02"])] == ["02"]
    with pytest.raises(InputError, match="no subject.*sub-03"):
        collect_inputs(root, participant_label=["03"])


def test_bids_filter_file(tmp_path):
    root = make_bids(tmp_path / "b", {
        "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz": (1.0, 1.0, 1.0),
        "sub-01/anat/sub-01_acq-fast_T1w.nii.gz": (0.8, 0.8, 0.8),
        "sub-01/anat/sub-01_run-1_T2w.nii.gz": THICK, "sub-01/anat/sub-01_run-2_T2w.nii.gz": THICK})
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage"}, "t2w": {"run": 2}}))
    (si,) = collect_inputs(root, bids_filters=load_bids_filters(filt))
    assert si.t1w.name == "sub-01_acq-mprage_T1w.nii.gz"
    assert [t.path.name for t in si.targets] == ["sub-01_run-2_T2w.nii.gz"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"t1": {}}')
    with pytest.raises(InputError, match=r"bad\.json: unknown query keys \['t1'\]"):
        load_bids_filters(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_bids_filters(bad)


def test_precomputed_mask_found_in_derivatives(tmp_path):
    root = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/anat/sub-01_T2w.nii.gz": THICK})
    deriv = tmp_path / "masks"
    write_nifti(deriv / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    (si,) = collect_inputs(root, derivatives=[deriv])
    assert si.t1w_mask == deriv / "sub-01/anat/sub-01_desc-brain_mask.nii.gz"


def test_voxel_sizes_oblique(tmp_path):
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, 2.0, 3.0])
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), aff), str(tmp_path / "x.nii.gz"))
    assert voxel_sizes(tmp_path / "x.nii.gz") == pytest.approx((0.5, 2.0, 3.0))


def test_sidecar_inheritance_applies_only_matching_entities(tmp_path):
    """A run-2 sidecar (even a broken one) is not read for run 1; the subject- and dataset-level ones are."""
    from atlasgs_bids.bids.layout import _sidecar_candidates

    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_run-1_T2w.json", "sub-01_run-2_T2w.json", "sub-01_T2w.json", "sub-01_run-1_T1w.json"):
        (anat / name).write_text("{}")
    (tmp_path / "T2w.json").write_text("{}")
    (tmp_path / "acq-tse_T2w.json").write_text("{}")
    found = [p.relative_to(tmp_path).as_posix() for p in _sidecar_candidates(anat / "sub-01_run-1_T2w.nii.gz",
                                                                              tmp_path)]
    assert found == ["sub-01/anat/sub-01_T2w.json", "sub-01/anat/sub-01_run-1_T2w.json", "T2w.json"]

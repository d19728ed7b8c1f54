"""Workflow graphs built (not run) across options; the work-dir cache measured on a real two-node graph."""
from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from atlasgs_bids.bids.layout import collect_inputs
from atlasgs_bids.config import Config
from atlasgs_bids.interfaces.anat import BrainMask, Reorient
from atlasgs_bids.workflows.participant import init_participant_wf, methods_text

from test_layout import ISO, THICK, make_bids, write_nifti

FILES = {
    "sub-01/anat/sub-01_T1w.nii.gz": ISO,
    "sub-01/anat/sub-01_T2w.nii.gz": THICK,
    "sub-01/anat/sub-01_acq-ax_FLAIR.nii.gz": (1.0, 1.0, 5.0),
    "sub-01/dwi/sub-01_dwi.nii.gz": ((2.0, 2.0, 4.0), 3),
    "sub-01/dwi/sub-01_dwi.bval": "0 1000 1000\n",
    "sub-01/dwi/sub-01_dwi.bvec": "0 1 0\n0 0 1\n0 0 0\n",
    "sub-01/perf/sub-01_asl.nii.gz": ((3.0, 3.0, 5.0), 2),
    "sub-01/perf/sub-01_aslcontext.tsv": "volume_type\ncontrol\nlabel\n",
}


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    return make_bids(tmp_path_factory.mktemp("wf") / "bids", FILES,
                     {"sub-01/anat/sub-01_T2w.json": {"SliceThickness": 4.0, "EchoTime": 0.1}})


def _config(root: Path, **kw) -> Config:
    return Config.build(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant",
                        device="cpu", **kw)



def test_lattice_scaffold_node_hash_ignores_quality_seed_and_device(bids_root, tmp_path):
    """The lattice depends on the T1w and its mask alone: another --quality, --seed or --device must reuse the
    scaffold cached in the work dir (the node's hash, the key nipype caches it under, stays the same)."""
    (si,) = collect_inputs(bids_root, modalities=("T2w",))
    hashes = set()
    for quality, seed in (("fast", 0), ("best", 5)):
        wf = init_participant_wf(subject_inputs=si, config=_config(bids_root, quality=quality, seed=seed),
                                 stage_dir=tmp_path / "stage")
        node = wf.get_node("fit_scaffold")
        node.inputs.t1w_file = str(si.t1w)
        node.inputs.mask_file = str(si.t1w)  # any existing file: the hash covers the inputs, not their meaning
        hashes.add(node.inputs.get_hashval()[1])
    assert len(hashes) == 1

@pytest.mark.parametrize("modalities", [("T2w",), ("dwi",), ("asl",), ("T2w", "FLAIR", "dwi", "asl")])
@pytest.mark.parametrize("skull_stripped", [False, True])
@pytest.mark.parametrize("quality", ["fast", "best"])
def test_participant_graph(bids_root, tmp_path, modalities, skull_stripped, quality):
    cfg = _config(bids_root, modalities=modalities, skull_stripped=skull_stripped, quality=quality)
    (si,) = collect_inputs(bids_root, modalities=modalities)
    wf = init_participant_wf(subject_inputs=si, config=cfg, stage_dir=tmp_path / "stage")
    assert wf.name == "sub_01_wf"
    names = set(wf.list_node_names())
    expected_targets = {"T2w": "T2w_wf", "FLAIR": "acq_ax_FLAIR_wf", "dwi": "dwi_wf", "asl": "asl_wf"}
    target_wfs = {n.split(".")[0] for n in names if "." in n}
    assert target_wfs == {expected_targets[m] for m in modalities}
    for t in target_wfs:
        assert {f"{t}.{n}" for n in ("inputnode", "reference", "register", "harmonize", "sidecar", "ds_target",
                                     "outputnode", "registration_qc", "self_validation", "qc")} <= names
        twf = wf.get_node(t)
        assert {"qc_json", "residual"} <= set(twf.get_node("outputnode").inputs.copyable_trait_names())
        assert twf.get_node("self_validation").inputs.quality == quality
        edges = {(u.name, v.name) for u, v in twf._graph.edges()}  # noqa: SLF001
        # the fit waits for the registration QC; the sidecar carries the QC metrics
        assert {("registration_qc", "harmonize"), ("qc", "sidecar"), ("self_validation", "qc")} <= edges
    assert ("dwi_wf.rotate_bvecs" in names) == ("dwi" in modalities)
    assert wf.get_node("brain_mask").inputs.method == ("skull_stripped" if skull_stripped else "deepbet")
    assert wf.get_node("ds_anat").inputs.rel_paths == [
        "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz", "sub-01/anat/sub-01_desc-brain_mask.nii.gz",
        "sub-01/anat/sub-01_desc-atlasgs_gaussians.npz", "sub-01/anat/sub-01_desc-atlasgs_gaussians.json"]
    text = methods_text(wf)
    assert f"quality preset '{quality}'" in text and ("skull-stripped" in text) == skull_stripped
    assert "scaffold was built on the T1w grid, one Gaussian per voxel" in text and "scaffold was fitted" not in text
    wf._create_flat_graph()  # noqa: SLF001 - nipype's own check that every connection resolves
    assert len(wf._graph.nodes()) >= 6


def test_target_sinks_exact_names(bids_root, tmp_path):
    (si,) = collect_inputs(bids_root)
    wf = init_participant_wf(subject_inputs=si, config=_config(bids_root), stage_dir=tmp_path)
    assert wf.get_node("dwi_wf.ds_target").inputs.rel_paths == [
        "sub-01/dwi/sub-01_space-T1w_desc-atlasgs_dwi.nii.gz", "sub-01/dwi/sub-01_space-T1w_desc-atlasgs_dwi.json",
        "sub-01/dwi/sub-01_from-dwi_to-T1w_mode-image_xfm.txt", "sub-01/dwi/sub-01_space-T1w_desc-atlasgs_dwi.bval",
        "sub-01/dwi/sub-01_space-T1w_desc-atlasgs_dwi.bvec"]
    assert wf.get_node("asl_wf.ds_target").inputs.rel_paths[-1] == \
        "sub-01/perf/sub-01_space-T1w_desc-atlasgs_aslcontext.tsv"
    t2w = wf.get_node("T2w_wf")
    assert t2w.get_node("harmonize").inputs.slice_thickness == [4.0]  # one per stack
    side = t2w.get_node("sidecar").inputs
    assert side.sources == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz", "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert side.spatial_reference == "bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    assert t2w.get_node("inputnode").inputs.target_meta == {"SliceThickness": 4.0, "EchoTime": 0.1}


@pytest.mark.parametrize("uncertainty", [True, False])
def test_sd_map_sinks_follow_no_uncertainty(bids_root, tmp_path, uncertainty):
    """The SD map (desc-atlasgsSD + sidecar) is staged for 3D targets unless --no-uncertainty, never for series;
    the report receives exactly the targets that have one."""
    (si,) = collect_inputs(bids_root)
    wf = init_participant_wf(subject_inputs=si, config=_config(bids_root, uncertainty=uncertainty), stage_dir=tmp_path)
    t2w = wf.get_node("T2w_wf")
    rel = t2w.get_node("ds_target").inputs.rel_paths
    sd = [f"sub-01/anat/sub-01_space-T1w_desc-atlasgsSD_T2w{ext}" for ext in (".nii.gz", ".json")]
    assert (rel[3:] == sd) if uncertainty else not any("atlasgsSD" in p for p in rel)
    assert t2w.get_node("harmonize").inputs.uncertainty == uncertainty
    assert ("sd_sidecar" in t2w.list_node_names()) == uncertainty
    for series in ("dwi_wf", "asl_wf"):
        assert not any("atlasgsSD" in p for p in wf.get_node(f"{series}.ds_target").inputs.rel_paths)
        assert not wf.get_node(f"{series}.harmonize").inputs.uncertainty
    with_sd = [str(t.path) for t in si.targets if t.modality not in ("dwi", "asl")] if uncertainty else []
    assert wf.get_node("subject_report").inputs.sd_targets == with_sd
    if uncertainty:
        side = t2w.get_node("sd_sidecar").inputs
        assert side.sources[0] == "bids::sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz"
        assert "uncertainty map" in methods_text(wf)
    wf._create_flat_graph()  # noqa: SLF001 - every connection resolves


def test_no_stage_dir_no_sinks(bids_root):
    (si,) = collect_inputs(bids_root, modalities=["T2w"])
    names = init_participant_wf(subject_inputs=si, config=_config(bids_root)).list_node_names()
    assert not [n for n in names if "ds_" in n]


def test_precomputed_mask_graph(bids_root, tmp_path):
    deriv = tmp_path / "masks"
    write_nifti(deriv / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    (si,) = collect_inputs(bids_root, modalities=["T2w"], derivatives=[deriv])
    wf = init_participant_wf(subject_inputs=si, config=_config(bids_root))
    assert wf.get_node("brain_mask").inputs.method == "precomputed"
    assert wf.get_node("inputnode").inputs.t1w_mask == str(deriv / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}  # noqa: SLF001
    assert ("inputnode", "brain_mask") in edges


def test_work_dir_reuse_skips_finished_nodes(tmp_path):
    """Run T1w reorient -> mask (--skull-stripped) twice in the same work dir: the second run re-executes nothing."""
    t1w = write_nifti(tmp_path / "t1w.nii.gz", (1.0, 1.0, 1.0), shape=(64, 64, 64))

    def build():
        wf = pe.Workflow(name="cache_wf", base_dir=str(tmp_path / "work"))
        wf.config["execution"]["poll_sleep_duration"] = 0.1
        inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_file"]), name="inputnode")
        inputnode.inputs.t1w_file = str(t1w)
        reorient = pe.Node(Reorient(), name="t1w_reorient")
        mask = pe.Node(BrainMask(method="skull_stripped"), name="brain_mask")
        wf.connect([(inputnode, reorient, [("t1w_file", "in_file")]), (reorient, mask, [("out_file", "in_file")])])
        return wf

    t0 = time.perf_counter()
    build().run(plugin="MultiProc", plugin_args={"n_procs": 1})
    first = time.perf_counter() - t0
    out = tmp_path / "work/cache_wf/brain_mask/brain_mask.nii.gz"
    stamp = out.stat().st_mtime_ns
    mask = np.asarray(nib.load(str(out)).dataobj)
    assert mask.dtype == np.uint8 and mask.all()
    t0 = time.perf_counter()
    build().run(plugin="MultiProc", plugin_args={"n_procs": 1})
    second = time.perf_counter() - t0
    assert out.stat().st_mtime_ns == stamp  # not recomputed
    print(f"work-dir reuse: first run {first:.2f} s, second run {second:.2f} s")
    # changing an input invalidates the cache downstream of it only
    write_nifti(t1w, (1.0, 1.0, 1.0), shape=(32, 32, 32))
    build().run(plugin="MultiProc", plugin_args={"n_procs": 1})
    assert nib.load(str(out)).shape == (32, 32, 32)


def test_rotate_bvec_file_known_rotation(tmp_path):
    """Target rotated 90 degrees about z relative to the T1w: a source x gradient becomes -y in the output's FSL
    frame (both images RAS+ diagonal, so FSL flips x on both sides). The xfm file holds T1w -> target, as
    RigidResult.write_itk writes it; getting that direction wrong would give +y."""
    from atlasgs_bids.imaging.transforms import write_itk_affine
    from atlasgs_bids.interfaces.dwi import rotate_bvec_file

    rz = np.eye(4)
    rz[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    rz[:3, 3] = [5.0, -3.0, 10.0]  # translations must not act on directions
    xfm = write_itk_affine(tmp_path / "xfm.txt", np.linalg.inv(rz))
    dwi = write_nifti(tmp_path / "dwi.nii.gz", (2.0, 2.0, 4.0), nvol=3)
    t1w = write_nifti(tmp_path / "t1w.nii.gz", (1.0, 1.0, 1.0))
    bvec = tmp_path / "in.bvec"
    bvec.write_text("0 1 0\n0 0 1\n0 0 0\n")  # b0, x, y
    out = np.loadtxt(rotate_bvec_file(bvec, dwi, xfm, t1w, tmp_path / "out.bvec"))
    expected = np.array([[0, 0, 1], [0, -1, 0], [0, 0, 0]], float)  # columns: b0 stays 0, x -> -y, y -> x
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_reference_volume_dwi_and_asl(tmp_path):
    """Mean b0 of a 4D dwi and mean control of an asl series, written on the target grid."""
    from atlasgs_bids.imaging.reference import read_aslcontext
    from atlasgs_bids.interfaces.registration import make_reference

    data = np.stack([np.full((6, 6, 4), v, np.float32) for v in (10.0, 2.0, 30.0)], axis=-1)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "dwi.nii.gz"))
    (tmp_path / "dwi.bval").write_text("0 1000 5\n")
    ref = nib.load(str(make_reference(tmp_path / "dwi.nii.gz", tmp_path / "ref.nii.gz", modality="dwi",
                                      bval_file=tmp_path / "dwi.bval")))
    assert ref.shape == (6, 6, 4) and np.allclose(ref.affine, aff) and np.allclose(ref.get_fdata(), 20.0)
    (tmp_path / "asl.tsv").write_text("volume_type\ncontrol\nlabel\ncontrol\n")
    assert read_aslcontext(tmp_path / "asl.tsv") == ["control", "label", "control"]
    ref = nib.load(str(make_reference(tmp_path / "dwi.nii.gz", tmp_path / "ref2.nii.gz", modality="asl",
                                      aslcontext_file=tmp_path / "asl.tsv")))
    assert np.allclose(ref.get_fdata(), 20.0)


def test_precomputed_mask_must_be_on_t1w_grid(tmp_path):
    from atlasgs_bids.errors import InputError
    from atlasgs_bids.interfaces.anat import make_brain_mask

    t1w = write_nifti(tmp_path / "t1w.nii.gz", (1.0, 1.0, 1.0))
    # the same grid stored LAS (x flipped): reoriented to RAS+ it matches
    data = np.zeros((12, 12, 10), np.uint8)
    data[:3] = 1
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = 11.0
    nib.save(nib.Nifti1Image(data, las), str(tmp_path / "mask_las.nii.gz"))
    out = make_brain_mask(t1w, tmp_path / "m.nii.gz", method="precomputed", mask_file=tmp_path / "mask_las.nii.gz")
    got = np.asarray(nib.load(str(out)).dataobj)
    assert got.dtype == np.uint8 and got[9:].all() and not got[:9].any()
    write_nifti(tmp_path / "other.nii.gz", (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match=r"other\.nii\.gz: this brain mask is not on the T1w's grid"):
        make_brain_mask(t1w, tmp_path / "m2.nii.gz", method="precomputed", mask_file=tmp_path / "other.nii.gz")


def test_field_of_view_mask_rigid_slab():
    """A 10-slice axial slab (3 mm) shifted 12 mm up and rotated 90 deg about z: exactly the T1w voxels whose
    centres fall inside it are kept."""
    from atlasgs_bids.imaging.grid import field_of_view_mask

    t1w_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    t1w_aff[:3, 3] = -20.0
    target_aff = np.diag([2.0, 2.0, 3.0, 1.0])
    target_aff[:3, 3] = [-20.0, -20.0, -15.0]
    rot = np.eye(4)
    rot[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    rot[2, 3] = 12.0  # target world -> T1w world: rotate, then up 12 mm
    m = field_of_view_mask(t1w_aff, (21, 21, 21), target_aff, (21, 21, 10), rot)
    z = -20.0 + 2.0 * np.arange(21)
    inside = (z >= -15.0 - 3.0 + 12.0) & (z <= -15.0 + 9 * 3.0 + 3.0 + 12.0)  # one slice of margin
    # in plane the rotated slab (21 x 21 voxels of 2 mm) covers x, y in [-22, 22] mm: the whole T1w grid
    assert np.array_equal(m.any(axis=(0, 1)), inside)
    assert m[:, :, inside].all() and not m[:, :, ~inside].any()

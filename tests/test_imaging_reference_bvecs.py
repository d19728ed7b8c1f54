"""Reference volumes of 3D/4D targets and b-vector rotation (atlasgs_bids.imaging.reference / .bvecs)."""
from __future__ import annotations

import numpy as np
import pytest

from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.bvecs import fsl_flip, rotate_bvecs, voxel_axes_to_world
from atlasgs_bids.imaging.reference import reference_volume


def _series(n_vols=6, shape=(4, 5, 3)):
    """Volume v is constant v + 1, so a mean over volumes is a known number."""
    return np.stack([np.full(shape, v + 1.0, dtype=np.float32) for v in range(n_vols)], axis=-1)


# ---------------------------------------------------------------------------------------------- reference volume


def test_3d_returned_as_is_and_single_volume_4d():
    vol = np.random.default_rng(0).uniform(size=(4, 5, 3))
    assert reference_volume(vol, modality="T2w") is vol
    np.testing.assert_array_equal(reference_volume(vol[..., None], modality="FLAIR"), vol)
    with pytest.raises(InputError, match="should be 3D but has 6 volumes"):
        reference_volume(_series(), modality="T2w")


def test_dwi_mean_of_b0():
    data = _series()
    ref = reference_volume(data, modality="dwi", bvals=[0, 1000, 5, 1000, 2000, 50])
    assert ref.shape == (4, 5, 3) and ref.dtype == np.float32
    np.testing.assert_allclose(ref, (1 + 3 + 6) / 3)  # volumes 0, 2 and 5 have b <= 50
    with pytest.raises(InputError, match="sub-01_dwi.nii.gz: no b=0 volume"):
        reference_volume(data, modality="DWI", bvals=[1000] * 6, source="sub-01_dwi.nii.gz")
    with pytest.raises(InputError, match="5 b-values for 6 volumes"):
        reference_volume(data, modality="dwi", bvals=[0] * 5)
    with pytest.raises(InputError, match="b-values"):
        reference_volume(data, modality="dwi")


def test_asl_m0_then_control():
    data = _series()
    with_m0 = ["control", "label", "control", "label", "m0scan", "m0scan"]
    np.testing.assert_allclose(reference_volume(data, modality="asl", aslcontext=with_m0), (5 + 6) / 2)
    no_m0 = ["control", "label", "Control", "label", "control", "label"]
    np.testing.assert_allclose(reference_volume(data, modality="asl", aslcontext=no_m0), (1 + 3 + 5) / 3)
    with pytest.raises(InputError, match="neither 'm0scan' nor 'control'"):
        reference_volume(data, modality="asl", aslcontext=["deltam"] * 6)
    with pytest.raises(InputError, match="lists 2 volumes but the image has 6"):
        reference_volume(data, modality="asl", aslcontext=["control", "label"])
    with pytest.raises(InputError, match="aslcontext"):
        reference_volume(data, modality="asl")
    with pytest.raises(InputError, match="3D or 4D"):
        reference_volume(np.ones((2, 2)), modality="T2w")


# ---------------------------------------------------------------------------------------------------- b-vectors

LAS = np.diag([-2.0, 2.0, 2.5, 1.0])  # det < 0: FSL keeps the first axis
RAS = np.diag([2.0, 2.0, 2.5, 1.0])  # det > 0: FSL flips the first axis


def _rot(axis: str, degrees: float, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    r = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }[axis]
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = shift
    return m


def test_conventions():
    np.testing.assert_array_equal(fsl_flip(RAS), np.diag([-1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(fsl_flip(LAS), np.eye(3))
    np.testing.assert_allclose(voxel_axes_to_world(LAS), np.diag([-1.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "world_in, world_out",
    [((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (-1, 0, 0)), ((0, 0, 1), (0, 0, 1))],
)
def test_rotation_about_z_in_las_frames(world_in, world_out):
    """90 degrees about z: world x -> y, y -> -x, z -> z. In LAS voxels world x is -i (no FSL flip)."""
    rz = _rot("z", 90.0, shift=(10.0, -4.0, 3.0))  # the translation must not matter
    to_voxel = np.diag([-1.0, 1.0, 1.0])
    b = (to_voxel @ np.array(world_in, dtype=float))[:, None]
    out = rotate_bvecs(b, LAS, rz, LAS)
    np.testing.assert_allclose(out[:, 0], to_voxel @ np.array(world_out, dtype=float), atol=1e-12)


def test_fsl_flip_applied_on_each_side():
    rz = _rot("z", 90.0)
    # RAS source: FSL's first axis is -i, i.e. world -x; rotated to world -y; LAS output: voxel (0, -1, 0)
    np.testing.assert_allclose(rotate_bvecs(np.array([[1.0], [0], [0]]), RAS, rz, LAS)[:, 0], [0, -1, 0], atol=1e-12)
    # FSL's frame is radiological whatever the storage: its x is world -x both for RAS (x = -i = -x) and LAS
    # (x = +i = -x) storage. So, with no motion, re-storing a DWI LAS <-> RAS leaves its .bvec unchanged,
    # while the plain voxel-axis components do flip.
    b = np.array([[1.0, 0.0, 0.6], [0.0, 1.0, 0.0], [0.0, 0.0, 0.8]])
    for src, dst in ((RAS, LAS), (LAS, RAS), (RAS, RAS), (LAS, LAS)):
        np.testing.assert_allclose(rotate_bvecs(b, src, np.eye(4), dst), b, atol=1e-12)
    # an image stored LPS (det > 0, flipped) vs LAS (det < 0): FSL y follows j, which flips with the storage
    lps = np.diag([-2.0, -2.0, 2.5, 1.0])
    np.testing.assert_allclose(rotate_bvecs(b, LAS, np.eye(4), lps), np.diag([-1.0, -1.0, 1.0]) @ b, atol=1e-12)


def test_oblique_output_grid_and_round_trip():
    rng = np.random.default_rng(2)
    b = rng.normal(size=(3, 30))
    b /= np.linalg.norm(b, axis=0)
    b[:, [0, 7]] = 0.0  # b=0 placeholders
    source = RAS @ _rot("x", 12.0)  # an oblique acquisition
    output = LAS @ _rot("y", -7.0, shift=(1, 2, 3))
    t = _rot("z", 33.0, shift=(4, 5, 6)) @ _rot("x", -20.0)
    out = rotate_bvecs(b, source, t, output)
    assert np.all(out[:, [0, 7]] == 0.0)
    keep = np.ones(30, bool)
    keep[[0, 7]] = False
    np.testing.assert_allclose(np.linalg.norm(out[:, keep], axis=0), 1.0, atol=1e-12)
    # angles between directions are preserved by a rotation (up to the handedness changes, which keep |dots|)
    np.testing.assert_allclose(np.abs(out[:, keep].T @ out[:, keep]), np.abs(b[:, keep].T @ b[:, keep]), atol=1e-12)
    back = rotate_bvecs(out, output, np.linalg.inv(t), source)
    np.testing.assert_allclose(back, b, atol=1e-12)
    # the world direction is what the rotation says: output voxel -> world equals t applied to source world
    w_src = voxel_axes_to_world(source) @ fsl_flip(source) @ b
    w_out = voxel_axes_to_world(output) @ fsl_flip(output) @ out
    np.testing.assert_allclose(w_out, t[:3, :3] @ w_src, atol=1e-12)


def test_renormalises_and_checks_shape():
    b = np.array([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # a non-unit vector comes back unit
    np.testing.assert_allclose(rotate_bvecs(b, LAS, np.eye(4), LAS), [[0, 1], [0, 0], [0, 0]], atol=1e-12)
    with pytest.raises(InputError, match=r"\(3, V\).*transpose"):
        rotate_bvecs(np.zeros((5, 3)), LAS, np.eye(4), LAS)
    with pytest.raises(InputError, match="NaN"):
        rotate_bvecs(np.full((3, 2), np.nan), LAS, np.eye(4), LAS)
    with pytest.raises(ValueError, match="target2t1w"):
        rotate_bvecs(np.zeros((3, 2)), LAS, np.zeros((4, 4)), LAS)

"""Validated NIfTI loading, RAS+ reorientation and atomic saving (atlasgs_bids.imaging.nifti)."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.nifti import load_nifti, save_nifti, to_canonical

AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def _write(tmp_path, data, affine=AFFINE, name="img.nii.gz", header=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine, header), str(path))
    return path


def _volume(shape=(6, 7, 5), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(1, 100, size=shape).astype(dtype)


def test_load_valid_float_and_4d_single_volume(tmp_path):
    data = _volume()
    img = load_nifti(_write(tmp_path, data))
    assert isinstance(img, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.get_data_dtype() == np.float32
    one = load_nifti(_write(tmp_path, data[..., None], name="one.nii.gz"))
    assert one.shape == (6, 7, 5, 1)


def test_load_applies_scaling_once(tmp_path):
    img = nib.Nifti1Image(np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5) + 1, AFFINE)
    img.header.set_slope_inter(2.0, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    expected = nib.load(str(path)).get_fdata()
    loaded = load_nifti(path)
    np.testing.assert_allclose(loaded.get_fdata(), expected)
    assert loaded.get_fdata().max() == pytest.approx(2.0 * 210 + 10.0)
    # saving what was loaded must not apply the scaling a second time
    out = save_nifti(loaded, tmp_path / "again.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), expected)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda d: np.where(d > 50, np.nan, d), "NaN or infinite"),
        (lambda d: np.where(d > 50, np.inf, d), "NaN or infinite"),
        (lambda d: np.zeros_like(d), "every voxel is zero"),
        (lambda d: d[..., None, None].repeat(2, axis=4), "5 dimensions"),
        (lambda d: d[:, :, 0], "2 dimensions"),
        (lambda d: d[:, :, :1], "single slice"),
        (lambda d: d[:1], "single slice"),
    ],
)
def test_load_refuses_bad_data(tmp_path, make, problem):
    path = _write(tmp_path, make(_volume()), name="bad.nii.gz")
    with pytest.raises(InputError, match=problem) as exc:
        load_nifti(path)
    assert "bad.nii.gz" in str(exc.value)


def test_load_refuses_missing_and_non_nifti(tmp_path):
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image\n" * 40)
    with pytest.raises(InputError, match="notes.nii: not a readable NIfTI"):
        load_nifti(text)
    mgh = tmp_path / "vol.mgz"
    nib.save(nib.MGHImage(_volume(), AFFINE), str(mgh))
    with pytest.raises(InputError, match="vol.mgz: not a NIfTI image"):
        load_nifti(mgh)


def test_load_refuses_truncated_gzip(tmp_path):
    path = _write(tmp_path, _volume((20, 20, 20)), name="cut.nii.gz")
    raw = path.read_bytes()
    assert len(gzip.decompress(raw)) > 20 * 20 * 20 * 4  # the intact file is fine
    load_nifti(path)
    path.write_bytes(raw[: int(len(raw) * 0.6)])  # the header survives, the data block does not
    with pytest.raises(InputError, match="cut.nii.gz: the image data could not be read"):
        load_nifti(path)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([2.0, 0.0, 3.0, 1.0]),  # a zero voxel size
        np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),  # collapsed axes
    ],
)
def test_load_refuses_singular_affine(tmp_path, affine):
    hdr = nib.Nifti1Header()  # written by hand: nibabel's image constructor cannot take such an affine
    for row, key in enumerate(("srow_x", "srow_y", "srow_z")):
        hdr[key] = affine[row]
    hdr["sform_code"] = 1  # only the sform carries the (bad) geometry; qform code stays 0
    img = nib.Nifti1Image(_volume(), None, hdr)
    path = tmp_path / "flat.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match="flat.nii.gz: .*singular"):
        load_nifti(path)


def test_qform_sform_disagreement(tmp_path):
    img = nib.Nifti1Image(_volume(), AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0  # the qform puts every voxel 2 mm further right
    img.set_sform(AFFINE, code=1)
    img.set_qform(shifted, code=1)
    path = tmp_path / "two.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match=r"two.nii.gz: the qform and the sform disagree by up to 2 mm.*use the sform"):
        load_nifti(path)
    # a disagreement far below the tolerance (float rounding in scanner headers) is accepted, the sform used
    tiny = AFFINE.copy()
    tiny[1, 3] += 1e-5
    img.set_qform(tiny, code=1)
    nib.save(img, str(path))
    np.testing.assert_allclose(load_nifti(path).affine, AFFINE)


def test_to_canonical_reorients_lps_and_keeps_world_positions(tmp_path):
    # LPS: i runs to the left, j to the back; k up.
    lps = np.array([[-1.5, 0, 0, 30], [0, -2.0, 0, 40], [0, 0, 2.5, -7], [0, 0, 0, 1]])
    data = _volume((5, 6, 4))
    img = load_nifti(_write(tmp_path, data, affine=lps, name="lps.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    can = to_canonical(img)
    assert nib.aff2axcodes(can.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(can.affine)[:3], [1.5, 2.0, 2.5])
    out = np.asanyarray(can.dataobj)
    np.testing.assert_array_equal(out, data[::-1, ::-1, :])
    # every voxel value sits at the same world position before and after
    for ijk in [(0, 0, 0), (4, 5, 3), (1, 2, 3)]:
        world = nib.affines.apply_affine(lps, ijk)
        new_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(can.affine), world)).astype(int)
        assert out[tuple(new_ijk)] == data[ijk]
    assert to_canonical(can) is can  # already RAS+: the same object back


def test_save_nifti_atomic_and_dtypes(tmp_path):
    data = _volume().astype(np.float64)
    img = nib.Nifti1Image(data, AFFINE)
    target = tmp_path / "sub" / "out.nii.gz"
    assert save_nifti(img, target) == target
    back = nib.load(str(target))
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.get_fdata(), data, rtol=1e-6)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.header["sform_code"] > 0 and back.header["qform_code"] > 0
    assert os.listdir(target.parent) == ["out.nii.gz"]  # no temporary file left behind
    assert (os.stat(target).st_mode & 0o777) != 0o600  # not mkstemp's private mode

    # replacing an existing file; integer types kept, int64 -> int32
    save_nifti(nib.Nifti1Image((data > 50).astype(np.uint8), AFFINE), target)
    assert nib.load(str(target)).get_data_dtype() == np.uint8
    ints = nib.Nifti1Image(np.arange(6 * 7 * 5, dtype=np.int64).reshape(6, 7, 5), AFFINE, dtype=np.int64)
    save_nifti(ints, tmp_path / "ints.nii")
    back = nib.load(str(tmp_path / "ints.nii"))
    assert back.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.arange(210).reshape(6, 7, 5))
    with pytest.raises(ValueError, match="suffix"):
        save_nifti(img, tmp_path / "out.img")
    assert sorted(os.listdir(tmp_path / "sub")) == ["out.nii.gz"]


def test_load_real_big_endian_int16(shared_data):
    path = shared_data / "small" / "anatomical.nii"
    assert nib.load(str(path)).get_data_dtype().byteorder == ">"
    img = load_nifti(path)
    data = np.asanyarray(img.dataobj)
    assert img.shape == (33, 41, 25)
    assert data.dtype == np.int16 and data.dtype.isnative  # native order, usable by torch
    assert (int(data.min()), int(data.max())) == (-610, 30393)
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-2.0, 2.0, 2.0]))
    can = to_canonical(img)
    assert nib.aff2axcodes(can.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(can.dataobj), data[::-1])

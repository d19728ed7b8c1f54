"""Property tests (issue 6): over NIfTI headers, shapes, dtypes, affines, scaling and damaged bytes, the loader
(:func:`load_nifti`) and the discovery (:func:`collect_inputs`) either succeed or raise the app's
:class:`InputError`, never anything else; what the loader returns is finite and 3D/4D."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasgs_bids.bids.layout import collect_inputs
from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.nifti import load_nifti

DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64, np.complex64)
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30, 1e-30])


@st.composite
def nifti_images(draw) -> nib.Nifti1Image:
    """Images with any rank 1-6, small axes (1-5), any dtype, data from random to all-zero or special values, an
    affine that may be singular, sheared or non-finite, qform/sform that may disagree, and on-disk scaling."""
    ndim = draw(st.integers(1, 6))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "zeros", "constant", "special"]))
    if kind == "zeros":
        data = np.zeros(shape, dtype)
    elif kind == "constant":
        data = np.full(shape, 7, dtype)
    else:
        data = (rng.normal(0, 100, shape)).astype(dtype) if dtype.kind != "u" else \
            rng.integers(0, 200, shape).astype(dtype)
        if kind == "special" and dtype.kind in "fc" and data.size:
            flat = data.reshape(-1)
            flat[rng.integers(0, flat.size)] = draw(SPECIAL)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(draw(st.lists(st.sampled_from([-2.0, 0.0, 0.5, 1.0, 2.5, 7.5]), min_size=3,
                                           max_size=3)))
    if draw(st.booleans()):
        affine[:3, :3] += rng.normal(0, 0.3, (3, 3))  # oblique / sheared
    affine[:3, 3] = draw(st.lists(st.sampled_from([0.0, -90.0, 1e6, np.nan]), min_size=3, max_size=3))
    # the geometry goes straight into the header: any matrix, even singular or NaN
    img = nib.Nifti1Image(data, None, dtype=dtype)
    img.header.set_sform(affine, code=1)
    if draw(st.booleans()):
        q = np.eye(4)
        q[:3, 3] = draw(st.sampled_from([(0, 0, 0), (5, 0, 0)]))
        img.header.set_qform(q, code=draw(st.sampled_from([0, 1, 2])))
    img.header["sform_code"] = draw(st.sampled_from([0, 1, 2, 4]))
    slope = draw(st.sampled_from([None, 1.0, 2.0, 0.0, np.nan, np.inf, -1.0]))
    if slope is not None and dtype.kind in "iu":
        img.header["scl_slope"], img.header["scl_inter"] = slope, draw(st.sampled_from([0.0, 10.0, np.nan]))
    return img


@st.composite
def damage(draw):
    """None, or (how, fraction): truncate the file, or overwrite bytes in its header or its data."""
    how = draw(st.sampled_from([None, None, "truncate", "header", "data"]))
    return None if how is None else (how, draw(st.floats(0.0, 1.0)))


def _write(img: nib.Nifti1Image, path: Path, harm) -> None:
    nib.save(img, str(path))
    if harm is None:
        return
    how, frac = harm
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        raw = raw[: int(len(raw) * frac)]
    else:
        lo, hi = (0, min(len(raw), 60)) if how == "header" else (min(len(raw) - 1, 60), len(raw))
        pos = lo + int((hi - lo - 1) * frac)
        raw[pos: pos + 8] = b"\xff\x00\x7f\x80\x01\xfe\x10\x99"[: len(raw) - pos]
    path.write_bytes(bytes(raw))


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])


@SETTINGS
@given(img=nifti_images(), harm=damage(), ext=st.sampled_from([".nii", ".nii.gz"]))
def test_load_nifti_succeeds_or_raises_input_error(img, harm, ext):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"img{ext}"
        _write(img, path, harm)
        try:
            out = load_nifti(path)
        except InputError as exc:
            assert str(path) in str(exc)
            return
        data = np.asanyarray(out.dataobj)
        assert data.ndim in (3, 4) and min(data.shape[:3]) >= 2
        assert np.all(np.isfinite(data)) and np.any(data)
        assert np.all(np.isfinite(out.affine)) and abs(np.linalg.det(out.affine[:3, :3])) > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t1w=nifti_images(), t2w=nifti_images(), harm=damage(),
       sidecar=st.sampled_from(['{"SliceThickness": 5}', "{", "[]", '{"SliceThickness": -1}', None]))
def test_discovery_succeeds_or_raises_input_error(t1w, t2w, harm, sidecar):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        anat = root / "sub-01" / "anat"
        anat.mkdir(parents=True)
        (root / "dataset_description.json").write_text(json.dumps({"Name": "p", "BIDSVersion": "1.9.0"}))
        _write(t1w, anat / "sub-01_T1w.nii.gz", None)
        _write(t2w, anat / "sub-01_T2w.nii.gz", harm)
        if sidecar is not None:
            (anat / "sub-01_T2w.json").write_text(sidecar)
        try:
            found = collect_inputs(root)
        except InputError:
            return
        assert [s.label for s in found] == ["sub-01"] and found[0].targets


@pytest.mark.parametrize("n", [0, 347, 352])
def test_header_sized_files(tmp_path, n):
    """Files cut inside or right after the 348-byte header."""
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:n])
    with pytest.raises(InputError, match="x.nii"):
        load_nifti(path)

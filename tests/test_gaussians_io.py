"""Saving and loading a scaffold (``gaussians/io.py``): ``.npz`` arrays plus a versioned ``.json`` sidecar."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atlasgs_bids.gaussians.io import FORMAT_VERSION, load_scaffold, save_scaffold
from atlasgs_bids.gaussians.scaffold import Scaffold

_ARRAYS = ("means", "quats", "log_scales", "amplitudes", "t1_values")


def _scaffold(n: int = 57, shape=(7, 9, 5)) -> Scaffold:
    """A small scaffold with float32 arrays, an irregular mask (size not a multiple of 8) and nested meta."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=shape) > 0.6
    affine = np.diag([1.0, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 4.5, 2.25]
    meta = {
        "t1w_affine": affine.tolist(),
        "t1w_shape": list(shape),
        "intensity_scale": {"offset": 0.0, "scale": 812.5},
        "options": {"geometry": "adaptive", "steps": 20, "spacing_mm": 3.0},
        "seed": 3,
        "seconds": 1.25,
        "loss_history": [0.5, 0.25],
    }
    return Scaffold(
        means=torch.randn(n, 3, generator=g) * 20,
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.randn(n, 3, generator=g) * 0.3,
        amplitudes=torch.randn(n, 1, generator=g),
        t1_values=torch.rand(n, generator=g),
        mask=mask,
        meta=meta,
    )


def test_round_trip_preserves_arrays_mask_and_meta(tmp_path: Path) -> None:
    sc = _scaffold()
    npz, sidecar = save_scaffold(sc, tmp_path / "sub-01_scaffold.npz")
    assert npz == tmp_path / "sub-01_scaffold.npz" and npz.is_file()
    assert sidecar == tmp_path / "sub-01_scaffold.json" and sidecar.is_file()

    back = load_scaffold(npz)
    for name in _ARRAYS:
        # Stored as float32, which they already are: bit-exact.
        assert torch.equal(getattr(back, name), getattr(sc, name)), name
        assert getattr(back, name).dtype == torch.float32
    assert back.mask.dtype == bool and back.mask.shape == sc.mask.shape
    assert np.array_equal(back.mask, sc.mask)
    want_meta = {k: v for k, v in sc.meta.items() if k != "loss_history"}  # dropped on purpose: long
    assert back.meta == want_meta
    assert back.n_gaussians == sc.n_gaussians
    np.testing.assert_array_equal(back.t1w_affine, sc.t1w_affine)
    torch.testing.assert_close(back.covs(), sc.covs())


def test_sidecar_records_the_format_version(tmp_path: Path) -> None:
    sc = _scaffold()
    _, sidecar = save_scaffold(sc, tmp_path / "s.npz")
    doc = json.loads(sidecar.read_text())
    assert doc["FormatVersion"] == FORMAT_VERSION
    assert doc["NGaussians"] == sc.n_gaussians
    assert "SoftwareVersion" in doc
    assert doc["Meta"]["intensity_scale"] == {"offset": 0.0, "scale": 812.5}


def test_save_overwrites_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_scaffold(_scaffold(n=10), tmp_path / "s.npz")
    save_scaffold(_scaffold(n=20), tmp_path / "s.npz")
    assert load_scaffold(tmp_path / "s.npz").n_gaussians == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.npz"]


def test_wrong_suffix_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"scaffold\.nii"):
        save_scaffold(_scaffold(), tmp_path / "scaffold.nii")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"scaffold\.nii"):
        load_scaffold(tmp_path / "scaffold.nii")


def test_missing_sidecar_is_refused_naming_the_file(tmp_path: Path) -> None:
    npz, sidecar = save_scaffold(_scaffold(), tmp_path / "s.npz")
    sidecar.unlink()
    with pytest.raises(ValueError, match=r"s\.npz"):
        load_scaffold(npz)


def test_garbage_npz_is_refused_naming_the_file(tmp_path: Path) -> None:
    npz, _ = save_scaffold(_scaffold(), tmp_path / "s.npz")
    npz.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(ValueError, match=r"s\.npz"):
        load_scaffold(npz)


def test_truncated_npz_is_refused_naming_the_file(tmp_path: Path) -> None:
    npz, _ = save_scaffold(_scaffold(n=2000), tmp_path / "s.npz")
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])  # e.g. a copy interrupted half way
    try:
        load_scaffold(npz)
    except ValueError as exc:
        assert "s.npz" in str(exc)
    else:
        pytest.fail("a truncated scaffold loaded without error")


def test_corrupted_sidecar_is_refused_naming_the_file(tmp_path: Path) -> None:
    npz, sidecar = save_scaffold(_scaffold(), tmp_path / "s.npz")
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match=r"s\.npz"):
        load_scaffold(npz)


def test_npz_missing_an_array_is_refused(tmp_path: Path) -> None:
    npz, _ = save_scaffold(_scaffold(), tmp_path / "s.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files if k != "quats"}
    np.savez_compressed(npz, **arrays)
    with pytest.raises(ValueError, match=r"s\.npz"):
        load_scaffold(npz)


def test_arrays_of_different_lengths_are_refused(tmp_path: Path) -> None:
    npz, _ = save_scaffold(_scaffold(), tmp_path / "s.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["t1_values"] = arrays["t1_values"][:-1]
    np.savez_compressed(npz, **arrays)
    with pytest.raises(ValueError, match=r"s\.npz.*number of Gaussians"):
        load_scaffold(npz)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None])
def test_other_format_versions_are_refused(tmp_path: Path, version) -> None:
    npz, sidecar = save_scaffold(_scaffold(), tmp_path / "s.npz")
    doc = json.loads(sidecar.read_text())
    if version is None:
        del doc["FormatVersion"]
    else:
        doc["FormatVersion"] = version
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"s\.npz.*format"):
        load_scaffold(npz)

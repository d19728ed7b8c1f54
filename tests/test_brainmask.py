"""deepbet brain extraction on a real adult T1w (bids-chris), offline on the CPU."""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.brainmask import brain_mask


@pytest.fixture(scope="module")
def chris_t1w(shared_data) -> nib.Nifti1Image:
    return nib.load(shared_data / "bids-chris" / "sub-chris" / "anat" / "sub-chris_T1w.nii.gz")


@pytest.fixture(scope="module")
def chris_mask(chris_t1w) -> tuple[nib.Nifti1Image, float]:
    t0 = time.perf_counter()
    mask = brain_mask(chris_t1w)
    return mask, time.perf_counter() - t0


def test_rejects_4d_and_bad_options():
    img4d = nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="3D"):
        brain_mask(img4d)
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="threshold"):
        brain_mask(img, threshold=1.5)
    with pytest.raises(ValueError, match="device"):
        brain_mask(img, device="tpu")


@pytest.mark.slow  # ~6-11 s each on 2 shared cores, real deep-learning inference
def test_chris_mask_plausible(chris_t1w, chris_mask):
    mask, seconds = chris_mask
    print(f"deepbet on bids-chris T1w {chris_t1w.shape}: {seconds:.1f} s")  # measured ~6 s on 2 CPU cores
    data = np.asarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8
    assert data.shape == chris_t1w.shape
    assert set(np.unique(data)) == {0, 1}
    np.testing.assert_allclose(mask.affine, chris_t1w.affine)
    volume_cm3 = data.sum() * np.prod(chris_t1w.header.get_zooms()[:3]) / 1000.0
    assert 1000.0 <= volume_cm3 <= 1800.0, volume_cm3  # adult brain incl. CSF (measured 1546 cm^3)
    # brain tissue is brighter on average than the rest of the field of view (air, skull, scalp)
    t1 = chris_t1w.get_fdata(dtype=np.float32)
    assert t1[data > 0].mean() > 2.0 * t1[data == 0].mean()
    # the mask is one compact blob away from the image borders
    idx = np.argwhere(data > 0)
    assert idx.min(axis=0).min() > 0 and np.all(idx.max(axis=0) < np.array(data.shape) - 1)


@pytest.mark.slow
def test_chris_mask_follows_reorientation(chris_t1w, chris_mask):
    """Flipping the voxel order (RAS -> LAS, same world) gives the same mask in the same world."""
    mask, _ = chris_mask
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = chris_t1w.shape[0] - 1
    las = nib.Nifti1Image(np.asarray(chris_t1w.dataobj)[::-1], chris_t1w.affine @ flip)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    mask_las = np.asarray(brain_mask(las).dataobj)[::-1]
    ref = np.asarray(mask.dataobj)
    dice = 2 * np.sum((ref > 0) & (mask_las > 0)) / (ref.sum() + mask_las.sum())
    assert dice > 0.99, dice

"""Masked image metrics with known answers (atlasgs_bids.imaging.metrics)."""
from __future__ import annotations

import numpy as np
import pytest

from atlasgs_bids.imaging import metrics


def _phantom(shape=(24, 26, 22), seed=0):
    """A smooth-ish random reference, a ball mask, and garbage outside the mask."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(10, 110, size=shape)
    idx = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    mask = ((idx - centre[:, None, None, None]) ** 2).sum(axis=0) <= (min(shape) / 2 - 3) ** 2
    ref[~mask] = 5000.0  # far outside the mask's range: must not enter R
    return ref, mask


def test_psnr_and_mae_known_offset():
    ref, mask = _phantom()
    r = ref[mask].max() - ref[mask].min()
    pred = ref + 2.5
    pred[~mask] = -1e4  # errors outside the mask do not count
    assert metrics.data_range(ref, mask) == pytest.approx(r)
    assert metrics.psnr(pred, ref, mask) == pytest.approx(20 * np.log10(r / 2.5), abs=1e-10)
    assert metrics.mae(pred, ref, mask) == pytest.approx(2.5, abs=1e-12)
    alt = ref + np.where(np.indices(ref.shape).sum(axis=0) % 2, 2.5, -2.5)
    assert metrics.mae(alt, ref, mask) == pytest.approx(2.5, abs=1e-12)
    assert metrics.psnr(ref, ref, mask) == float("inf")
    assert isinstance(metrics.psnr(pred, ref, mask), float)


def test_psnr_known_noise_level():
    ref, mask = _phantom(shape=(48, 48, 48))
    r = ref[mask].max() - ref[mask].min()
    sigma = 4.0
    pred = ref + np.random.default_rng(7).normal(0, sigma, size=ref.shape)
    # ~4e4 voxels: the sample MSE is within about 1 % of sigma^2, i.e. 0.05 dB
    assert metrics.psnr(pred, ref, mask) == pytest.approx(20 * np.log10(r / sigma), abs=0.1)


def test_psnr_4d_with_3d_mask():
    ref, mask = _phantom()
    series = np.stack([ref, ref], axis=-1)
    pred = series + np.array([1.0, 3.0])
    mse = (1.0 + 9.0) / 2
    r = ref[mask].max() - ref[mask].min()
    assert metrics.psnr(pred, series, mask) == pytest.approx(10 * np.log10(r**2 / mse), abs=1e-10)
    assert metrics.mae(pred, series, mask) == pytest.approx(2.0)


def test_ssim_identical_is_one_and_degrades_with_noise():
    ref, mask = _phantom()
    assert metrics.ssim3d(ref, ref, mask) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    low = metrics.ssim3d(ref + rng.normal(0, 5, ref.shape), ref, mask)
    high = metrics.ssim3d(ref + rng.normal(0, 20, ref.shape), ref, mask)
    assert 1.0 > low > high > 0.0
    # contrast inverted about the mid-range (same mean level, mirrored structure): SSIM goes negative.
    # (Not with the 5000 background: voxels outside the mask but inside its box enter the windows, and that
    # shared edge dominates the local statistics there.)
    plain = np.random.default_rng(6).uniform(10, 110, size=ref.shape)
    mirrored = 120.0 - plain
    assert metrics.ssim3d(mirrored, plain, mask) < -0.9


def test_ssim_only_sees_the_bounding_box():
    ref, mask = _phantom()
    pred = ref + np.random.default_rng(4).normal(0, 5, ref.shape)
    box_mask = np.zeros_like(mask)
    box_mask[5:15, 6:18, 4:12] = True
    base = metrics.ssim3d(pred, ref, box_mask)
    changed = pred.copy()
    changed[15:, :, :] = 0.0  # right next to the box, but outside it
    changed[:5, :, :] = 1e6
    assert metrics.ssim3d(changed, ref, box_mask) == pytest.approx(base, abs=1e-12)
    changed[10, 10, 8] += 50.0  # inside the box: it matters
    assert metrics.ssim3d(changed, ref, box_mask) < base


def test_ssim_map_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(5)
    ref = rng.uniform(0, 1, size=(20, 21, 19))
    pred = ref + rng.normal(0, 0.1, size=ref.shape)
    r = float(ref.max() - ref.min())
    _, expected = skimage_metrics.structural_similarity(
        pred, ref, data_range=r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
    )
    np.testing.assert_allclose(metrics.ssim_map(pred, ref, r), expected, rtol=1e-10, atol=1e-12)
    # whole-volume mask: ssim3d is the plain mean of that map
    assert metrics.ssim3d(pred, ref, np.ones(ref.shape, bool)) == pytest.approx(float(expected.mean()), abs=1e-12)


def test_ncc_known_values():
    ref, mask = _phantom()
    assert metrics.ncc(ref, 3.0 * ref + 5.0, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ncc(ref, -ref, mask) == pytest.approx(-1.0, abs=1e-12)
    other = np.random.default_rng(9).uniform(0, 1, ref.shape)
    assert abs(metrics.ncc(ref, other, mask)) < 0.05  # independent: |r| ~ 1/sqrt(n) ~ 0.01
    assert metrics.ncc(ref, np.ones_like(ref), mask) == 0.0


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.mae, metrics.ssim3d, metrics.ncc])
def test_errors(fn):
    ref, mask = _phantom()
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(ref[:-1], ref, mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(ref, ref, mask[:-1])
    with pytest.raises(ValueError, match="empty"):
        fn(ref, ref, np.zeros_like(mask))


def test_constant_reference_refused():
    flat = np.full((8, 8, 8), 3.0)
    for fn in (metrics.psnr, metrics.ssim3d):
        with pytest.raises(ValueError, match="constant"):
            fn(flat + 1, flat, None)

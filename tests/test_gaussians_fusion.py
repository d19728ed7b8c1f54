"""Multi-stack fusion (:func:`atlasgs_bids.gaussians.appearance.fit_stacks`) on a small phantom with known truth.

The phantom: 28^3 voxels at 1 mm, a sphere with an inner core, two blobs and a slab, smoothed (partial volume),
T1-like and T2-like contrasts with the tissue order inverted. Two thick-slice stacks of the T2-like image: x5 along
k (axial) and x5 along j (coronal), seeded Gaussian noise (SD 8, 1 % of the brightest tissue), the coronal one
1.4 x brighter. Each PSNR threshold states the value
measured here and the margin left.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasgs_bids.gaussians.appearance import AppearanceOptions, Stack, fit_appearance, fit_stacks, predict
from atlasgs_bids.gaussians.linear import fit_coefficients
from atlasgs_bids.gaussians.render import render
from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.gaussians.scaffold import lattice_scaffold
from atlasgs_bids.imaging.acquisition import simulate_thick_slices
from atlasgs_bids.imaging.metrics import psnr
from conftest import tissue_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHAPE = (28, 28, 28)
OPTS = AppearanceOptions(lam=0.01, tol=1e-5, max_iter=600)


@pytest.fixture(scope="module")
def phantom():
    """T1-like, T2-like, brain mask, affine (voxel -> world mm RAS)."""
    ijk = np.indices(SHAPE).astype(float) - (np.array(SHAPE)[:, None, None, None] - 1) / 2
    r = np.sqrt((ijk**2).sum(0))
    label = np.zeros(SHAPE, int)
    label[r < 12] = 1
    label[r < 7.5] = 2
    for centre, radius in (((4.0, -3.0, 2.0), 2.5), ((-5.0, 4.0, -4.0), 2.0)):
        label[np.sqrt(((ijk - np.array(centre)[:, None, None, None]) ** 2).sum(0)) < radius] = 3
    label[(np.abs(ijk[2] - 5.0) < 1.0) & (r < 12)] = 3  # a thin sheet across the axial slices
    t1, t2 = tissue_images(label)
    affine = np.eye(4)
    affine[:3, 3] = [-14.0, -13.0, -12.0]
    return t1, t2, r < 12.5, affine


@pytest.fixture(scope="module")
def scaffold(phantom):
    t1, _, mask, affine = phantom
    return lattice_scaffold(t1, affine, mask)


def _stack(t2, affine, axis, *, scale=1.0, seed=0, sigma=8.0):
    thick, _, acq = simulate_thick_slices(t2, affine, 5, axis=axis)
    rng = np.random.default_rng(seed)
    noisy = (scale * (thick + rng.normal(scale=sigma, size=thick.shape))).astype(np.float32)
    return Stack(np.clip(noisy, 0.0, None), acq, np.eye(4))


@pytest.fixture(scope="module")
def stacks(phantom):
    _, t2, _, affine = phantom
    return _stack(t2, affine, 2, seed=1), _stack(t2, affine, 1, seed=2, scale=1.4)


def _score(app, phantom):
    _, t2, mask, affine = phantom
    return psnr(render(app, affine, SHAPE, within_target=False), t2, mask)


def test_two_stacks_fuse_better_than_either_alone(scaffold, stacks, phantom):
    axial, coronal = stacks
    single = [_score(fit_stacks(scaffold, [st], OPTS), phantom) for st in (axial, Stack(
        coronal.data / 1.4, coronal.acquisition, coronal.target2t1w))]
    fused = _score(fit_stacks(scaffold, [axial, coronal], OPTS), phantom)
    # measured: single 29.6 / 31.7 dB, fused 33.6 dB (27.4 / 27.0 and 31.5 with the 6-neighbour graph before ADR
    # 0011); issue 15's goal on the benchmark is + 1.5 dB
    assert fused > max(single) + 1.5, (single, fused)


def test_stack_with_another_intensity_scale_is_corrected(scaffold, stacks, phantom):
    axial, coronal = stacks
    app = fit_stacks(scaffold, [axial, coronal], OPTS)
    rec = app.diagnostics["stacks"]
    assert rec[0]["scale_vs_reference"] == 1.0
    assert rec[1]["scale_vs_reference"] == pytest.approx(1.4, rel=0.01)  # measured 1.4014
    # the output is in the reference stack's units: its mean in the brain matches the truth's within 2 %
    _, t2, mask, affine = phantom
    out = render(app, affine, SHAPE, within_target=False)
    assert out[mask].mean() == pytest.approx(t2[mask].mean(), rel=0.02)
    # each stack's view predicts that stack in its own units (the coronal one 1.4 x brighter)
    for i, st in enumerate((axial, coronal)):
        view = app.for_stack(i)
        pred = predict(view, st.acquisition, view.fitted_ijk)[:, 0]
        measured = st.data[tuple(view.fitted_ijk.T)]
        assert np.median(pred / np.maximum(measured, 1.0)) == pytest.approx(1.0, abs=0.05)
        np.testing.assert_allclose(measured - pred, view.fitted_residual[:, 0], atol=1e-2 * measured.max())


def test_ignoring_the_scale_costs_what_the_map_recovers(scaffold, stacks, phantom):
    """Fused without the intensity map (both stacks forced to the reference's scale) is worse than fused with it."""
    axial, coronal = stacks
    with_map = _score(fit_stacks(scaffold, [axial, coronal], OPTS), phantom)
    # the coronal stack's values presented as they are but with the scale of a reference-unit stack: the map
    # must find gain 1.4 again, so the fused figure matches within 0.3 dB
    pre_scaled = Stack(coronal.data / 1.4, coronal.acquisition, coronal.target2t1w)
    same_units = _score(fit_stacks(scaffold, [axial, pre_scaled], OPTS), phantom)
    assert abs(with_map - same_units) < 0.3, (with_map, same_units)


def test_one_stack_is_the_single_target_fit(scaffold, stacks):
    axial, _ = stacks
    a = fit_appearance(scaffold, axial.data, axial.acquisition, axial.target2t1w, OPTS)
    b = fit_stacks(scaffold, [axial], OPTS)
    torch.testing.assert_close(a.coeffs, b.coeffs)
    assert "stacks" not in a.diagnostics and len(a.stacks) == 1


def test_field_of_view_is_the_union_of_the_stacks(scaffold, phantom):
    """A stack that sees only the upper half and one that sees only the lower half render the whole brain."""
    _, t2, mask, affine = phantom
    thick, thick_aff, acq = simulate_thick_slices(t2, affine, 5, axis=2)
    half = thick.shape[2] // 2
    from atlasgs_bids.imaging.acquisition import Acquisition

    def part(sl, first):
        aff = thick_aff.copy()
        aff[:3, 3] = thick_aff[:3, 3] + first * thick_aff[:3, 2]
        sub = Acquisition(affine=aff, shape=thick[:, :, sl].shape, fwhm_vox=acq.fwhm_vox, slice_axis=2,
                          profile=acq.profile)
        return Stack(np.ascontiguousarray(thick[:, :, sl]), sub, np.eye(4))

    app = fit_stacks(scaffold, [part(slice(0, half), 0), part(slice(half, None), half)], OPTS)
    out = render(app, affine, SHAPE)
    assert np.count_nonzero(out[mask] == 0) < 0.02 * mask.sum()
    one = render(fit_stacks(scaffold, [part(slice(0, half), 0)], OPTS), affine, SHAPE)
    assert np.count_nonzero(one[mask] == 0) > 0.2 * mask.sum()


def test_stacks_must_agree_on_volumes(scaffold, stacks):
    axial, coronal = stacks
    series = Stack(np.stack([axial.data, axial.data], axis=-1), axial.acquisition, axial.target2t1w)
    with pytest.raises(ValueError, match="numbers of volumes"):
        fit_stacks(scaffold, [series, coronal], OPTS)
    with pytest.raises(ValueError, match="at least one stack"):
        fit_stacks(scaffold, [], OPTS)


def test_free_gain_is_recovered_exactly_from_consistent_blocks():
    """Variable projection: block 2 measured 1.7 x too bright (and block 3 at 0.6 x, a second volume at 2.5 x); with
    its gain free the solve returns 1 / 1.7 (etc.) and the coefficients of the unscaled problem."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = 40
    blocks = [sp.random(60, n, density=0.2, random_state=s, format="csr", dtype=np.float32) + sp.eye(60, n, k=s,
              format="csr", dtype=np.float32) for s in range(3)]
    a = SparseMatrix.from_scipy(sp.vstack(blocks).tocsr(), torch.device("cpu"))
    c_true = torch.as_tensor(rng.uniform(0.5, 2.0, size=(n, 2)), dtype=torch.float32)
    y = a.matmul(c_true)
    y[60:120] *= torch.tensor([1.7, 2.5])
    y[120:] *= 0.6
    basis = torch.ones(n, 1)
    c, info = fit_coefficients(a, y, basis, ridge=1e-6, max_iter=500, tol=1e-7, free_gain=[(60, 120), (120, 180)])
    np.testing.assert_allclose(np.array(info["gains"]), [[1 / 1.7, 1 / 2.5], [1 / 0.6, 1 / 0.6]], rtol=1e-3)
    torch.testing.assert_close(c, c_true, rtol=1e-3, atol=1e-3)
    # without free gains the same data give a compromise, not the truth
    c_fixed, info_fixed = fit_coefficients(a, y, basis, ridge=1e-6, max_iter=500, tol=1e-7)
    assert info_fixed["gains"] == []
    assert float((c_fixed - c_true).abs().max()) > 0.05


def test_sd_shrinks_with_more_stacks(scaffold, stacks, phantom):
    """The posterior SD (per unit noise, no calibration) of the fused fit is below the one-stack fit's: a second
    stack measures what the first blurs across its slices."""
    from atlasgs_bids.gaussians.uncertainty import render_sd

    axial, coronal = stacks
    _, _, mask, affine = phantom
    one = render_sd(fit_stacks(scaffold, [axial], OPTS, posterior=True), affine, SHAPE, mask=mask)
    two = render_sd(fit_stacks(scaffold, [axial, coronal], OPTS, posterior=True), affine, SHAPE, mask=mask)
    # measured: median SD 50.4 (axial alone) vs 29.7 (fused), uncalibrated, in the axial stack's units
    assert np.median(two[mask]) < 0.85 * np.median(one[mask]), (np.median(one[mask]), np.median(two[mask]))

"""The posterior SD map of stage 2 (issue 15, ADR 0008): draws, read-out, calibration, the map on a phantom.

Phantoms are small and torch runs on one thread, so this module takes seconds (the calibrated phantom ~20 s).
"""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance
from atlasgs_bids.gaussians.linear import fit_coefficients
from atlasgs_bids.gaussians.scaffold import lattice_scaffold
from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.gaussians.uncertainty import laplacian_factor, posterior_samples, render_sd
from atlasgs_bids.harmonize import HarmonizeOptions, harmonize
from atlasgs_bids.imaging.acquisition import simulate_thick_slices
from atlasgs_bids.qc.calibration import Z95, coverage, fit_scale
from conftest import tissue_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _phantom(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1-like, T2-like (I, J, K) images of an ellipsoid with a shell, a core and a dark blob; mask; 1 mm affine."""
    centre = (np.array(shape) - 1) / 2.0
    ijk = (np.indices(shape).astype(float) - centre[:, None, None, None]) / (centre[:, None, None, None] - 1.5)
    r = np.sqrt((ijk**2).sum(0))
    blob = np.sqrt(((ijk - np.array([0.25, -0.2, 0.1])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, int)
    label[r < 0.95] = 1
    label[r < 0.6] = 2
    label[blob < 0.22] = 3
    t1, t2 = tissue_images(label)
    affine = np.eye(4)
    affine[:3, 3] = -centre
    return t1.astype(np.float32), t2.astype(np.float32), r < 1.0, affine


def test_laplacian_factor_reproduces_the_laplacian():
    rng = np.random.default_rng(0)
    w = sp.random(12, 12, density=0.4, random_state=1)
    w = sp.triu(w + w.T, k=1)
    w = (w + w.T).tocsr()
    lap = sp.diags(np.asarray(w.sum(1)).ravel()) - w
    g = laplacian_factor(SparseMatrix.from_scipy(sp.csr_matrix(lap), torch.device("cpu"), symmetric=True))
    x = rng.normal(size=12)
    # float32 storage of L: agreement to its rounding
    np.testing.assert_allclose((g.T @ g).toarray(), lap.toarray(), atol=1e-5)
    assert g.shape[0] == sp.triu(w, k=1).nnz and np.isclose(np.sum((g @ x) ** 2), x @ lap @ x, rtol=1e-5)


def test_draws_have_the_posterior_covariance():
    """Known answer: the draws' variance of every amplitude matches diag(B H^-1 B^T), H = B^T A^T A B + lam L."""
    rng = np.random.default_rng(0)
    n, m, lam = 20, 14, 0.5  # fewer measurements than unknowns: the prior matters
    a = sp.random(m, n, density=0.3, random_state=2, format="csr") + sp.eye(m, n, format="csr")
    path = sp.diags([-np.ones(n - 1), -np.ones(n - 1)], [-1, 1], shape=(n, n))
    lap = (sp.diags(-np.asarray(path.sum(1)).ravel()) + path).tocsr()
    b = rng.uniform(0.5, 1.5, size=n)
    dev = torch.device("cpu")
    a_mat = SparseMatrix.from_scipy(a.astype(np.float32), dev)
    lap_mat = SparseMatrix.from_scipy(lap.astype(np.float32), dev, symmetric=True)
    basis = torch.as_tensor(b[:, None], dtype=torch.float32)
    _, info = fit_coefficients(a_mat, torch.zeros(m, 1), basis, laplacian=lap_mat, lams=[lam], tol=1e-8)
    draws = posterior_samples(a_mat, basis, lap_mat, [lam], info["preconditioner"], n_samples=4000, tol=1e-6,
                              max_iter=200)
    bd = np.diag(b)
    h = bd @ (a.T @ a).toarray() @ bd + lam * lap.toarray()
    exact = np.diag(bd @ np.linalg.inv(h) @ bd)
    est = draws.amplitudes.double().pow(2).mean(1).numpy()
    # 4000 draws: the relative SD of a variance estimate is sqrt(2 / 4000) = 2.2 %; 4 sigma
    np.testing.assert_allclose(est, exact, rtol=0.09)


def test_fit_scale_reaches_the_target_coverage():
    rng = np.random.default_rng(1)
    q = rng.uniform(0.5, 2.0, size=20000)
    sigma, k_true = 2.0, 3.0
    r = rng.normal(size=q.size) * sigma * np.sqrt(1.0 + k_true**2 * q)
    k = fit_scale(r, q, sigma)
    assert abs(k - k_true) < 0.15  # 20 000 voxels: the 95th percentile is known to ~1 %
    assert abs(coverage(r, sigma * np.sqrt(1.0 + k**2 * q)) - 0.95) < 0.002
    assert fit_scale(np.zeros(10), np.ones(10), 1.0) == 0.0  # noise alone covers everything: no posterior term


def test_sd_is_larger_in_a_gap_between_slices():
    """Slices 0.3 spacing thick with gaps between them: the SD peaks halfway between slices, where no data are."""
    t1, t2, mask, affine = _phantom((20, 20, 32))
    thick, _, acq = simulate_thick_slices(t2, affine, 4)
    acq = dataclasses.replace(acq, fwhm_vox=(1.0, 1.0, 0.3))
    scaffold = lattice_scaffold(t1, affine, mask)
    app = fit_appearance(scaffold, thick, acq, np.eye(4), AppearanceOptions(), posterior=True)
    sd = render_sd(app, affine, mask.shape, mask=mask, smooth=False)
    centres = 2 + 4 * np.arange(1, 7)  # thick slice n is centred on original slice 2 + 4 n (inner ones)
    on = np.mean([np.median(sd[..., z][mask[..., z]]) for z in centres])
    gap = np.mean([np.median(sd[..., z][mask[..., z]]) for z in centres[:-1] + 2])
    assert gap > 1.5 * on, (gap, on)


@pytest.fixture(scope="module")
def calibrated_phantom():
    """A noisy x3 phantom (known Gaussian noise, SD 5 % of the T2w's bright tissue) through harmonize()."""
    t1, t2, mask, affine = _phantom((36, 36, 84))
    thick, thick_aff, acq = simulate_thick_slices(t2, affine, 3)
    rng = np.random.default_rng(0)
    noisy = thick + rng.normal(0.0, 40.0, thick.shape).astype(np.float32)
    scaffold = lattice_scaffold(t1, affine, mask)
    result = harmonize(scaffold, nib.Nifti1Image(noisy, thick_aff), np.eye(4), nib.Nifti1Image(t1, affine), mask,
                       HarmonizeOptions(quality="fast"), acquisition=acq)
    return result, t2, mask


def test_sd_map_is_calibrated_on_a_known_truth(calibrated_phantom):
    result, t2, mask = calibrated_phantom
    sd = np.asarray(result.sd.dataobj)
    pred = np.asarray(result.image.dataobj)
    cal = result.diagnostics["uncertainty"]["calibration"]
    assert cal["n_heldout"] > 100
    # Since ADR 0011 the held-out residuals of this phantom lie within the noise alone (the prediction error is below
    # the noise SD): they cannot set the scale, so the posterior's own (k = 1) is kept and said. A zero map, what
    # the quantile gives there, would claim an exact output.
    assert not cal["calibrated"] and cal["scale"] == 1.0 and "noise alone" in cal["reason"]
    inside = mask & (sd > 0)
    assert inside.sum() > 0.9 * mask.sum()
    share = np.mean(np.abs(pred - t2)[inside] <= Z95 * sd[inside])
    # never fitted on this truth; the posterior's own scale errs on the safe side: measured 0.997 (0.985 before
    # ADR 0011, with k fitted on 328 held-out voxels; the goal on the benchmark is [0.90, 0.98])
    assert 0.95 <= share < 1.0, share
    assert result.diagnostics["sd_median"] == pytest.approx(float(np.median(sd[mask & (sd > 0)])), rel=0.05)


def test_no_uncertainty_skips_the_map():
    t1, t2, mask, affine = _phantom((16, 16, 24))
    thick, thick_aff, acq = simulate_thick_slices(t2, affine, 4)
    result = harmonize(lattice_scaffold(t1, affine, mask), nib.Nifti1Image(thick, thick_aff), np.eye(4),
                       nib.Nifti1Image(t1, affine), mask, HarmonizeOptions(quality="fast", uncertainty=False),
                       acquisition=acq)
    assert result.sd is None and "uncertainty" not in result.diagnostics and result.appearance.posterior is None

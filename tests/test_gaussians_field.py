"""The additive Gaussian field and its closed-form measurement through a Gaussian PSF (``gaussians/field.py``).

Everything numerical runs in float64 so that the tolerances below measure the method, not float32 rounding.
Frames: all positions are "world mm" (the module is frame-agnostic as long as points, means, covariances and the
PSF share one frame).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasgs_bids.gaussians.field import (
    CUTOFF,
    _measure_dense,
    measure,
    measure_pairs,
    blur,
    quat_scale_to_covar,
)
from atlasgs_bids.gaussians.forward import psf_covariance
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA

F64 = torch.float64


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (3, 3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_spd(rng: np.random.Generator, sigmas) -> torch.Tensor:
    """A rotated covariance (3, 3) mm^2 with standard deviations ``sigmas`` along its axes."""
    rot = _random_rotation(rng)
    return torch.as_tensor(rot @ np.diag(np.asarray(sigmas, float) ** 2) @ rot.T, dtype=F64)


def _random_gaussians(rng: np.random.Generator, n: int, box_mm: float = 20.0, channels: int = 3):
    """Random anisotropic Gaussians: means [n, 3], quats [n, 4], log_scales [n, 3], amplitudes [n, channels]."""
    means = torch.as_tensor(rng.uniform(0.0, box_mm, size=(n, 3)), dtype=F64)
    quats = torch.as_tensor(rng.normal(size=(n, 4)), dtype=F64)
    log_scales = torch.as_tensor(np.log(rng.uniform(0.5, 2.5, size=(n, 3))), dtype=F64)
    amps = torch.as_tensor(rng.normal(size=(n, channels)), dtype=F64)
    return means, quats, log_scales, amps


# ------------------------------------------------------------------------------------------------------------------
# Hashed, chunked evaluation vs the dense twin
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_psf", [False, True])
@pytest.mark.parametrize("max_pairs", [37, 1000, None])
def test_hashed_measure_equals_dense_twin(with_psf: bool, max_pairs: int | None) -> None:
    rng = np.random.default_rng(1)
    means, quats, log_scales, amps = _random_gaussians(rng, 60)
    covs = quat_scale_to_covar(quats, log_scales)
    points = torch.as_tensor(rng.uniform(-3.0, 23.0, size=(400, 3)), dtype=F64)
    psf = _random_spd(rng, (0.4, 0.7, 2.1)) if with_psf else None
    kwargs = {} if max_pairs is None else {"max_pairs": max_pairs}

    got = measure(points, means, covs, amps, psf_cov=psf, **kwargs)
    want = _measure_dense(points, means, covs, amps, psf_cov=psf)

    assert got.shape == (400, 3)
    # Same 3-sigma cut, same pairs; only the summation order and the 3x3 inverse (adjugate vs LU) differ: float64
    # rounding, measured ~1e-15; 1e-10 leaves room without hiding a missed pair (a pair is worth >= 1e-2 * gain).
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 0.5  # the points do see the Gaussians


def test_small_max_pairs_really_chunks() -> None:
    rng = np.random.default_rng(2)
    means, quats, log_scales, amps = _random_gaussians(rng, 30)
    covs = quat_scale_to_covar(quats, log_scales)
    points = torch.as_tensor(rng.uniform(0.0, 20.0, size=(200, 3)), dtype=F64)
    chunks = list(measure_pairs(points, means, blur(covs), max_pairs=50))
    assert len(chunks) > 10
    # Every point appears in exactly one chunk: the starts are increasing and cover [0, M).
    starts = [c[0] for c in chunks]
    assert starts[0] == 0 and starts == sorted(set(starts))


def test_one_channel_amplitudes_1d_and_2d_agree() -> None:
    rng = np.random.default_rng(3)
    means, quats, log_scales, amps = _random_gaussians(rng, 20, channels=1)
    covs = quat_scale_to_covar(quats, log_scales)
    points = torch.as_tensor(rng.uniform(0.0, 20.0, size=(50, 3)), dtype=F64)
    torch.testing.assert_close(measure(points, means, covs, amps[:, 0]), measure(points, means, covs, amps))


# ------------------------------------------------------------------------------------------------------------------
# The cut-off
# ------------------------------------------------------------------------------------------------------------------


def test_cut_error_of_isolated_gaussians_is_bounded_by_the_edge_value() -> None:
    """Each Gaussian is dropped where exp(-1/2 m) < exp(-9/2): the error is <= 1.1 % of that Gaussian's peak."""
    rng = np.random.default_rng(4)
    # 27 Gaussians 12 mm apart with sigma <= 1.5 mm (blurred <= 1.6 mm): no two reach the same point above 1e-6.
    centres = np.stack(np.meshgrid(*(np.arange(3) * 12.0,) * 3, indexing="ij"), -1).reshape(-1, 3)
    means = torch.as_tensor(centres, dtype=F64)
    quats = torch.as_tensor(rng.normal(size=(27, 4)), dtype=F64)
    log_scales = torch.as_tensor(np.log(rng.uniform(0.6, 1.5, size=(27, 3))), dtype=F64)
    amps = torch.as_tensor(rng.uniform(0.5, 2.0, size=(27, 1)), dtype=F64)
    covs = quat_scale_to_covar(quats, log_scales)
    psf = _random_spd(rng, (0.4, 0.4, 0.6))
    points = torch.as_tensor(rng.uniform(-5.0, 29.0, size=(20000, 3)), dtype=F64)
    cut = measure(points, means, covs, amps, psf_cov=psf)
    full = _measure_dense(points, means, covs, amps, psf_cov=psf, cutoff=None)
    peak = (amps[:, 0] * blur(covs, psf).gain).max()
    err = (full - cut).abs().max() / peak
    # exp(-4.5) = 1.11 %: the largest value a dropped pair can have, relative to its own peak.
    assert err <= math.exp(-0.5 * CUTOFF**2) + 1e-12
    assert err > 1e-3  # the random points do probe the edge, so the bound is tested, not vacuous


def _unit_lattice(n: int = 13):
    """The default "lattice" geometry on a 1 mm grid: one isotropic Gaussian per voxel, sigma = 1 mm / 2.3548."""
    ijk = np.indices((n,) * 3).reshape(3, -1).T.astype(float)
    means = torch.as_tensor(ijk, dtype=F64)
    log_scales = torch.full((len(ijk), 3), math.log(FWHM_TO_SIGMA), dtype=F64)
    quats = torch.zeros(len(ijk), 4, dtype=F64)
    quats[:, 0] = 1.0
    return means, quat_scale_to_covar(quats, log_scales), torch.ones(len(ijk), 1, dtype=F64)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "field.py CUTOFF = 3: in 3D a Gaussian keeps only 97.1 % of its mass inside Mahalanobis 3, so on the dense "
        "lattice scaffold (one Gaussian per 1 mm voxel) the cut drops 1.1-4.6 % of the field measured through a 1 mm "
        "PSF, varying with the position between lattice points (a 3.5 % ripple); CUTOFF = 4 brings it to <= 0.18 %"
    ),
)
def test_cut_error_on_the_dense_lattice_is_below_two_percent() -> None:
    means, covs, amps = _unit_lattice()
    psf = torch.as_tensor(psf_covariance(np.eye(4), (1.0, 1.0, 1.0)), dtype=F64)
    # Interior points on and between lattice nodes (6 mm from every edge of the 13 mm lattice).
    points = torch.as_tensor(np.indices((3, 3, 3)).reshape(3, -1).T * 0.5 + 5.5, dtype=F64)
    cut = measure(points, means, covs, amps, psf_cov=psf)
    full = _measure_dense(points, means, covs, amps, psf_cov=psf, cutoff=None)
    # The brief's bound: the cut may cost at most 2 % of the field (here the field is ~1.2 everywhere).
    assert float(((full - cut) / full).abs().max()) < 0.02


# ------------------------------------------------------------------------------------------------------------------
# Closed form against numerical integration and known answers
# ------------------------------------------------------------------------------------------------------------------


def test_closed_form_psf_measurement_matches_numerical_integration() -> None:
    """y(c) = integral f(x) N(x; c, P) dx, summed on a 0.2 mm grid, against the Gaussian-product closed form."""
    rng = np.random.default_rng(5)
    means = torch.as_tensor([[0.0, 0.0, 0.0], [1.5, -1.0, 0.5], [-1.0, 1.0, -2.0]], dtype=F64)
    covs = torch.stack([_random_spd(rng, s) for s in [(1.0, 1.5, 2.2), (0.8, 0.9, 1.4), (1.2, 0.7, 1.0)]])
    amps = torch.as_tensor([[1.0], [-0.6], [2.0]], dtype=F64)
    psf = _random_spd(rng, (0.5, 0.7, 1.8))
    centres = torch.as_tensor([[0.0, 0.0, 0.0], [1.0, 0.5, -0.5], [-2.0, 1.5, 1.0], [2.5, -2.0, 2.0]], dtype=F64)
    # cutoff=8: exp(-32) ~ 1e-14, i.e. the uncut closed form.
    closed = measure(centres, means, covs, amps, psf_cov=psf, cutoff=8.0)[:, 0].numpy()

    h = 0.2
    axis = np.arange(-13.0, 13.0 + h / 2, h)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    field = np.zeros(len(grid))
    for mu, cov, a in zip(means.numpy(), covs.numpy(), amps[:, 0].numpy()):
        d = grid - mu
        field += a * np.exp(-0.5 * np.einsum("mi,ij,mj->m", d, np.linalg.inv(cov), d))
    p = psf.numpy()
    p_inv, norm = np.linalg.inv(p), 1.0 / ((2 * np.pi) ** 1.5 * np.sqrt(np.linalg.det(p)))
    numeric = []
    for c in centres.numpy():
        d = grid - c
        kernel = norm * np.exp(-0.5 * np.einsum("mi,ij,mj->m", d, p_inv, d))
        numeric.append((field * kernel).sum() * h**3)
    numeric = np.array(numeric)
    # Midpoint rule on Gaussians with sigma >= 0.45 mm at h = 0.2 mm: error ~ exp(-2 pi^2 sigma^2 / h^2) < 1e-40,
    # and the 13 mm box holds > 5 sigma of every term: measured ~1e-12. The brief's bound is 1e-4.
    assert np.max(np.abs(closed - numeric) / np.abs(numeric)) < 1e-4


@pytest.mark.parametrize("sigma_g, sigma_p", [(1.0, 0.5), (0.8, 2.0), (2.0, 2.0)])
def test_isotropic_peak_attenuation(sigma_g: float, sigma_p: float) -> None:
    """Known answer: an isotropic Gaussian through an isotropic PSF peaks at (sg^2 / (sg^2 + sp^2))^1.5."""
    mean = torch.tensor([[3.0, -2.0, 7.0]], dtype=F64)
    cov = torch.eye(3, dtype=F64)[None] * sigma_g**2
    psf = torch.eye(3, dtype=F64) * sigma_p**2
    got = measure(mean, mean, cov, torch.tensor([[2.5]], dtype=F64), psf_cov=psf)
    want = 2.5 * (sigma_g**2 / (sigma_g**2 + sigma_p**2)) ** 1.5
    # Exact formula, one term: float64 rounding only.
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_gaussian_integrates_to_its_normaliser() -> None:
    """Sum of samples on a fine grid: integral a exp(-1/2 x^T S^-1 x) dx = a (2 pi)^1.5 sqrt(det S)."""
    rng = np.random.default_rng(6)
    cov = _random_spd(rng, (0.9, 1.3, 2.0))
    mean = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64)
    h = 0.25
    axis = torch.arange(-12.0, 12.0 + h / 2, h, dtype=F64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    samples = measure(grid, mean, cov[None], torch.tensor([[1.7]], dtype=F64), cutoff=8.0)
    want = 1.7 * (2 * math.pi) ** 1.5 * math.sqrt(float(torch.linalg.det(cov)))
    # Midpoint rule on a Gaussian with sigma >= 0.9 mm at h = 0.25 mm: spectrally accurate; 12 mm > 6 sigma.
    assert float(samples.sum()) * h**3 == pytest.approx(want, rel=1e-8)


# ------------------------------------------------------------------------------------------------------------------
# Covariances from rotations and scales
# ------------------------------------------------------------------------------------------------------------------


def test_quat_scale_to_covar_is_spd_and_has_the_scales_as_eigenvalues() -> None:
    rng = np.random.default_rng(7)
    _, quats, log_scales, _ = _random_gaussians(rng, 100)
    covs = quat_scale_to_covar(quats, log_scales)
    torch.testing.assert_close(covs, covs.transpose(1, 2), rtol=0, atol=1e-12)
    eig = torch.linalg.eigvalsh(covs)
    assert bool((eig > 0).all())
    # R S^2 R^T with R orthonormal: the eigenvalues are exactly exp(2 log_scales); float64 rounding.
    torch.testing.assert_close(eig, torch.sort(torch.exp(2 * log_scales), dim=1).values, rtol=1e-10, atol=0)


def test_quat_scale_to_covar_ignores_quaternion_sign_and_norm() -> None:
    rng = np.random.default_rng(8)
    _, quats, log_scales, _ = _random_gaussians(rng, 50)
    covs = quat_scale_to_covar(quats, log_scales)
    torch.testing.assert_close(quat_scale_to_covar(-quats, log_scales), covs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(quat_scale_to_covar(3.7 * quats, log_scales), covs, rtol=1e-12, atol=1e-12)


def test_identity_quaternion_gives_a_diagonal_covariance() -> None:
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64)
    ls = torch.log(torch.tensor([[0.5, 1.0, 2.0]], dtype=F64))
    torch.testing.assert_close(quat_scale_to_covar(q, ls)[0], torch.diag(torch.tensor([0.25, 1.0, 4.0], dtype=F64)))


# ------------------------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_psf", [False, True])
def test_measure_gradients_match_finite_differences(with_psf: bool) -> None:
    rng = np.random.default_rng(9)
    means, quats, log_scales, amps = _random_gaussians(rng, 4, box_mm=3.0, channels=2)
    points = torch.as_tensor(rng.uniform(0.0, 3.0, size=(6, 3)), dtype=F64)
    psf = _random_spd(rng, (0.4, 0.5, 1.0)) if with_psf else None

    def fn(means, log_scales, quats, amps):
        return measure(points, means, quat_scale_to_covar(quats, log_scales), amps, psf_cov=psf)

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, log_scales, quats, amps))
    assert fn(*inputs).abs().min() > 1e-3  # every point sees the Gaussians, so the gradients are not trivially 0
    # gradcheck's own defaults for float64 (eps 1e-6, atol 1e-5, rtol 1e-3): central differences of a smooth
    # function; no pair sits within 1e-6 of the cut here (fixed seed), so the cut's jump is not crossed.
    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=25, deadline=None)


@_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(-10, 10), beta=st.floats(-10, 10))
def test_measure_is_linear_in_amplitudes(seed: int, alpha: float, beta: float) -> None:
    rng = np.random.default_rng(seed)
    means, quats, log_scales, a1 = _random_gaussians(rng, 15, box_mm=10.0, channels=2)
    a2 = torch.as_tensor(rng.normal(size=a1.shape), dtype=F64)
    covs = quat_scale_to_covar(quats, log_scales)
    points = torch.as_tensor(rng.uniform(0.0, 10.0, size=(40, 3)), dtype=F64)
    psf = _random_spd(rng, (0.5, 0.5, 1.5))
    lhs = measure(points, means, covs, alpha * a1 + beta * a2, psf_cov=psf)
    rhs = alpha * measure(points, means, covs, a1, psf_cov=psf) + beta * measure(points, means, covs, a2, psf_cov=psf)
    # Same pairs, same weights: float64 rounding of sums of ~15 terms of size <= 10 * |a|.
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


@_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shift=st.tuples(*(st.floats(-300, 300),) * 3))
def test_measure_is_translation_invariant(seed: int, shift: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(seed)
    means, quats, log_scales, amps = _random_gaussians(rng, 15, box_mm=10.0)
    covs = quat_scale_to_covar(quats, log_scales)
    points = torch.as_tensor(rng.uniform(-2.0, 12.0, size=(40, 3)), dtype=F64)
    psf = _random_spd(rng, (0.5, 0.5, 1.5))
    t = torch.as_tensor(shift, dtype=F64)
    moved = measure(points + t, means + t, covs, amps, psf_cov=psf)
    # The hash grid moves with the Gaussians; the differences d = x - mu change by ~300 mm * 1e-16 only.
    torch.testing.assert_close(moved, measure(points, means, covs, amps, psf_cov=psf), rtol=1e-9, atol=1e-10)

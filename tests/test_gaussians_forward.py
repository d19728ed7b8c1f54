"""The forward model of a target (``gaussians/forward.py``): PSF covariance, voxel positions, measurement matrix.

Frames: ``acquisition.affine`` maps target voxels to the target's world (mm RAS); ``target2t1w`` maps that world to
the T1w world, where the Gaussians live. The measurement matrix is float32 (values computed in the Gaussians'
dtype, here float64, then cast), so matrix comparisons use float32 tolerances.
"""
from __future__ import annotations

import numpy as np
from nibabel.affines import apply_affine
import pytest
import torch
from scipy.special import erf

from atlasgs_bids.gaussians.field import _measure_dense, quat_scale_to_covar
from atlasgs_bids.gaussians.forward import (
    measurement_matrix,
    psf_covariance,
    target_vox2t1w,
)
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition

F64 = torch.float64


def _apply(a_mat, x: torch.Tensor) -> torch.Tensor:
    """``A x`` for the measurement operator, a :class:`SparseMatrix` (or a torch sparse tensor in older cores)."""
    return a_mat @ x if isinstance(a_mat, torch.Tensor) else a_mat.matmul(x)


def _dense(a_mat) -> torch.Tensor:
    """The operator as a dense [M, N] float64 tensor (A times the identity)."""
    return _apply(a_mat, torch.eye(a_mat.shape[1], dtype=torch.float32)).double()


def _rotation(angles_deg) -> np.ndarray:
    """Proper rotation (3, 3) from x, y, z Euler angles in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _rigid(angles_deg, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(angles_deg)
    m[:3, 3] = translation
    return m


def _gaussians(seed: int = 0, n: int = 150):
    """Random anisotropic Gaussians filling the box [-8, 8]^3 mm (T1w world), with one amplitude channel."""
    rng = np.random.default_rng(seed)
    means = torch.as_tensor(rng.uniform(-8.0, 8.0, size=(n, 3)), dtype=F64)
    quats = torch.as_tensor(rng.normal(size=(n, 4)), dtype=F64)
    log_scales = torch.as_tensor(np.log(rng.uniform(0.5, 2.0, size=(n, 3))), dtype=F64)
    amps = torch.as_tensor(rng.normal(size=(n, 1)), dtype=F64)
    return means, quat_scale_to_covar(quats, log_scales), amps


def _target(profile: str = "gaussian") -> Acquisition:
    """A thick-slice target, 1 x 1 x 3 mm, oblique in its own world, centred on the Gaussians."""
    aff = _rigid((10.0, -5.0, 20.0), (0.0, 0.0, 0.0)) @ np.diag([1.0, 1.0, 3.0, 1.0])
    aff[:3, 3] -= aff[:3, :3] @ np.array([6.0, 6.0, 2.0])  # voxel (6, 6, 2) at the origin
    return Acquisition.from_geometry(aff, (12, 12, 5), profile=profile)


def test_psf_covariance_of_a_diagonal_affine() -> None:
    aff = np.diag([0.9, -1.1, 4.0, 1.0])
    fwhm = (1.0, 1.0, 1.25)
    want = np.diag((np.array([0.9, 1.1, 4.0]) * np.array(fwhm) * FWHM_TO_SIGMA) ** 2)
    # Exact: A diag(sigma^2) A^T with a diagonal A; float64 rounding.
    np.testing.assert_allclose(psf_covariance(aff, fwhm), want, rtol=1e-14, atol=0)
    assert FWHM_TO_SIGMA == pytest.approx(1 / 2.3548, rel=1e-4)


def test_psf_covariance_rotates_with_the_affine() -> None:
    r = _rigid((30.0, 0.0, 45.0), (5.0, 6.0, 7.0))
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    np.testing.assert_allclose(
        psf_covariance(r @ aff, (1, 1, 1)), r[:3, :3] @ psf_covariance(aff, (1, 1, 1)) @ r[:3, :3].T, atol=1e-14
    )


def test_voxel_centres_and_target_vox2t1w() -> None:
    acq = _target()
    t2t = _rigid((0.0, 0.0, 90.0), (1.0, 2.0, 3.0))
    ijk = np.array([[0, 0, 0], [3, 4, 2], [11, 11, 4]])
    vox2t1w = target_vox2t1w(acq, t2t)
    np.testing.assert_allclose(vox2t1w, t2t @ acq.affine)
    homog = np.c_[ijk, np.ones(3)] @ vox2t1w.T
    np.testing.assert_allclose(apply_affine(vox2t1w, ijk), homog[:, :3], atol=1e-12)


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_measurement_matrix_equals_the_dense_twin(profile: str) -> None:
    means, covs, _ = _gaussians()
    acq = _target(profile)
    vox2t1w = target_vox2t1w(acq, np.eye(4))
    ijk = np.indices(acq.shape).reshape(3, -1).T
    a_mat = measurement_matrix(means, covs, vox2t1w, ijk, acq, max_pairs=5000)
    assert tuple(a_mat.shape) == (len(ijk), len(means))

    offsets, weights, fwhm = acq.sub_slices()
    psf = torch.as_tensor(psf_covariance(vox2t1w, fwhm), dtype=F64)
    base = apply_affine(vox2t1w, ijk)
    axis_dir = vox2t1w[:3, acq.slice_axis]
    eye = torch.eye(len(means), dtype=F64)  # unit amplitudes one at a time: the dense matrix column by column
    dense = sum(
        w * _measure_dense(torch.as_tensor(base + off * axis_dir), means, covs, eye, psf_cov=psf)
        for off, w in zip(offsets, weights)
    )
    # Same cut and weights; the matrix is cast to float32: 1e-6 relative on entries <= 1.
    torch.testing.assert_close(_dense(a_mat), dense, rtol=1e-6, atol=1e-7)
    assert dense.abs().sum() > 10.0


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_rigid_rotation_of_the_target_frame_leaves_measurements_unchanged(profile: str) -> None:
    """Moving the Gaussians by T and the target by T (T @ target2t1w) is the same experiment seen from elsewhere."""
    means, covs, amps = _gaussians(1)
    acq = _target(profile)
    t2t = _rigid((3.0, 4.0, -2.0), (0.5, -1.0, 0.2))
    ijk = np.indices(acq.shape).reshape(3, -1).T
    y0 = _apply(measurement_matrix(means, covs, target_vox2t1w(acq, t2t), ijk, acq), amps.float())

    moves = _rigid((37.0, -64.0, 121.0), (40.0, -25.0, 13.0))
    rot = torch.as_tensor(moves[:3, :3])
    means_moved = means @ rot.T + torch.as_tensor(moves[:3, 3])
    covs_moved = rot @ covs @ rot.T
    a1 = measurement_matrix(means_moved, covs_moved, target_vox2t1w(acq, moves @ t2t), ijk, acq)
    y1 = _apply(a1, amps.float())

    assert y0.abs().max() > 0.1
    # Values computed in float64 (pair selection included), stored as float32 and summed in float32: ~1e-6.
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


def test_box_sub_slices_tile_the_slice() -> None:
    acq = Acquisition(
        np.diag([1.0, 1.0, 4.0, 1.0]), (4, 4, 4), (1.0, 1.0, 1.5), slice_axis=2, profile="box", box_points=5
    )
    offsets, weights, fwhm = acq.sub_slices()
    assert weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.allclose(offsets, -offsets[::-1])  # symmetric about the voxel centre
    # Equal sub-slices of width 1.5 / 5 voxels whose centres tile [-0.75, 0.75].
    np.testing.assert_allclose(np.diff(offsets), 1.5 / 5)
    assert offsets.max() + fwhm[2] / 2 == pytest.approx(0.75)
    assert fwhm[:2].tolist() == [1.0, 1.0]

    g_offsets, g_weights, g_fwhm = Acquisition(np.eye(4), (4, 4, 4), (1.0, 1.0, 1.0), slice_axis=2).sub_slices()
    assert g_offsets.tolist() == [0.0] and g_weights.tolist() == [1.0] and g_fwhm.tolist() == [1.0, 1.0, 1.0]


def test_box_profile_measures_a_wide_constant_field_as_its_value() -> None:
    acq = _target("box")
    vox2t1w = target_vox2t1w(acq, np.eye(4))
    # One Gaussian with sigma = 10 m: constant to 1e-6 over the target (|x| <= 20 mm), and through the PSF its gain
    # sqrt(det S / det(S + P)) = 1 - O(P / S) = 1 - 1e-8.
    means = torch.zeros(1, 3, dtype=F64)
    covs = torch.eye(3, dtype=F64)[None] * 1.0e8
    ijk = np.indices(acq.shape).reshape(3, -1).T
    y = _apply(measurement_matrix(means, covs, vox2t1w, ijk, acq), torch.tensor([[3.0]]))
    torch.testing.assert_close(y, torch.full_like(y, 3.0), rtol=1e-5, atol=0)


def _box_vs_exact(so: float, k: int) -> float:
    """Max error, relative to the peak, of the K-sub-slice box against the exact box for a Gaussian of sigma so.

    Voxel 1 x 1 x 3 mm, box slice profile of width 3 mm, in-plane Gaussian PSF of FWHM 1 mm; the object is an
    isotropic Gaussian moved along the slice axis. Exact: in-plane gain * (1/w) integral_box exp(-(z-mu)^2/2so^2).
    """
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    acq = Acquisition(aff, (1, 1, 1), (1.0, 1.0, 1.0), slice_axis=2, profile="box", box_points=k)
    zs = np.linspace(-4.0, 4.0, 17)
    means = torch.as_tensor([[0.0, 0.0, z] for z in zs], dtype=F64)
    covs = torch.eye(3, dtype=F64)[None].repeat(len(zs), 1, 1) * so**2
    got = _dense(measurement_matrix(means, covs, aff, np.zeros((1, 3), int), acq, cutoff=8.0))[0].numpy()
    sp, w = FWHM_TO_SIGMA, 3.0
    root2s = np.sqrt(2) * so
    through = np.sqrt(np.pi / 2) * so * (erf((w / 2 - zs) / root2s) - erf((-w / 2 - zs) / root2s)) / w
    exact = so**2 / (so**2 + sp**2) * through
    return float(np.max(np.abs(got - exact)) / exact.max())


def test_box_profile_approximates_a_true_box() -> None:
    # Measured: 0.78 % (sigma 1 mm) and 0.36 % (sigma 2 mm) at K = 5, and the error falls with K (2.1 %, 0.78 %,
    # 0.24 % for K = 3, 5, 9 at sigma 1 mm). Bound 1 % at K = 5.
    assert _box_vs_exact(1.0, 5) < 0.01
    assert _box_vs_exact(2.0, 5) < 0.01
    assert _box_vs_exact(1.0, 9) < _box_vs_exact(1.0, 5) < _box_vs_exact(1.0, 3)


def test_measurement_matrix_outside_the_gaussians_is_empty() -> None:
    means, covs, _ = _gaussians(2, n=10)
    acq = _target()
    far = target_vox2t1w(acq, _rigid((0, 0, 0), (500.0, 0.0, 0.0)))
    a_mat = measurement_matrix(means, covs, far, np.indices(acq.shape).reshape(3, -1).T, acq)
    assert a_mat.shape == (int(np.prod(acq.shape)), 10)
    assert float(_dense(a_mat).abs().sum()) == 0.0

"""The lattice scaffold's direct evaluation (``gaussians/lattice.py``) against the pairwise reference twin.

On a lattice scaffold every Gaussian is the same kernel on a T1w voxel centre; the lattice path must give the
pairwise evaluator's values (same cut-off, same gain) for any target orientation, slice profile, subset of the
Gaussians and any point, including points outside the T1w grid.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasgs_bids.gaussians import lattice
from atlasgs_bids.gaussians.field import measure
from atlasgs_bids.gaussians.forward import (
    measurement_matrix,
    psf_covariance,
    scaffold_measure,
    scaffold_operator,
    target_vox2t1w,
)
from atlasgs_bids.gaussians.scaffold import lattice_scaffold
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.qc.selfval import subset_scaffold

T1W_AFFINE = np.array([[0.9, 0.1, 0.0, -5.0], [-0.1, 0.9, 0.05, 3.0], [0.0, -0.05, 1.1, 2.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def scaffold():
    rng = np.random.default_rng(0)
    t1 = rng.random((18, 20, 16)).astype(np.float32)
    mask = np.zeros(t1.shape, bool)
    mask[4:14, 5:15, 4:12] = True
    return lattice_scaffold(t1, T1W_AFFINE, mask)


def _target(profile: str, angles: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[Acquisition, np.ndarray]:
    ax, ay, az = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag([1.1, 1.0, 3.3])
    aff[:3, 3] = [-3.0, -2.0, -4.5]
    return Acquisition(aff, (12, 14, 5), (1.0, 1.0, 1.3), 2, profile=profile), aff


def _dense(a_mat) -> np.ndarray:
    return a_mat.matmul(torch.eye(a_mat.shape[1])).double().numpy()


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_lattice_operator_equals_the_pairwise_operator(scaffold, profile) -> None:
    acq, _ = _target(profile, (8.0, -5.0, 20.0))
    t2t = np.eye(4)
    t2t[:3, 3] = [0.3, -0.2, 0.4]
    vox2t1w = target_vox2t1w(acq, t2t)
    ijk = np.indices(acq.shape).reshape(3, -1).T
    ref = measurement_matrix(scaffold.means, scaffold.covs(), vox2t1w, ijk, acq)
    fast = scaffold_operator(scaffold, vox2t1w, ijk, acq)
    assert lattice.as_lattice(scaffold) is not None
    assert fast.shape == ref.shape and fast.nnz == ref.nnz
    np.testing.assert_allclose(_dense(fast), _dense(ref), rtol=0, atol=2e-6)


def test_lattice_subset_and_points_outside_the_grid(scaffold) -> None:
    sub = subset_scaffold(scaffold, np.arange(0, scaffold.n_gaussians, 3))
    assert lattice.as_lattice(sub) is not None
    rng = np.random.default_rng(1)
    lo, hi = sub.means.numpy().min(0) - 6.0, sub.means.numpy().max(0) + 6.0
    pts = rng.uniform(lo, hi, size=(400, 3))
    pts[:5] += 200.0  # far outside: measure nothing
    psf = psf_covariance(T1W_AFFINE, (1.0, 1.0, 2.0))
    amps = torch.as_tensor(rng.normal(size=(sub.n_gaussians, 2)), dtype=torch.float32)
    got = scaffold_measure(sub, pts, psf, amps)
    ref = measure(torch.as_tensor(pts, dtype=torch.float32), sub.means, sub.covs(), amps,
                  psf_cov=torch.as_tensor(psf, dtype=torch.float32))
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert float(got[:5].abs().max()) == 0.0


@settings(max_examples=15, deadline=None)
@given(st.floats(-30, 30), st.floats(-30, 30), st.floats(0.5, 4.0))
def test_lattice_offsets_cover_every_kernel_entry(angle, tilt, thick) -> None:
    """Whatever the PSF's orientation and width, no node within the cut-off is missed (property)."""
    acq, aff = _target("gaussian", (tilt, 0.0, angle))
    psf = psf_covariance(aff, (1.0, 1.0, thick))
    lat = lattice.Lattice(grid=None, index=torch.zeros(1), cov=np.diag([0.2, 0.3, 0.25]))  # type: ignore[arg-type]
    a = np.diag([1.0, 1.2, 0.9])
    kern = lattice.Kernel(precision=a.T @ np.linalg.inv(lat.cov + psf) @ a, gain=1.0, shift=np.zeros(3), weight=1.0)
    offs = {tuple(o) for o in lattice.offsets([kern], radius=0.5)}
    rng = np.random.default_rng(0)
    for f in rng.uniform(-0.5, 0.5, size=(200, 3)):
        r = np.ceil(3.0 * np.sqrt(np.diag(np.linalg.inv(kern.precision)))).astype(int) + 1
        grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in r], indexing="ij"), -1).reshape(-1, 3)
        d = grid + f
        inside = np.einsum("bi,ij,bj->b", d, kern.precision, d) < 9.0
        assert {tuple(o) for o in grid[inside]} <= offs


def test_a_moved_lattice_is_not_a_lattice(scaffold) -> None:
    from dataclasses import replace

    moved = replace(scaffold, means=scaffold.means + torch.tensor([0.3, 0.0, 0.0]))
    assert lattice.as_lattice(moved) is None
    assert lattice.as_lattice(replace(scaffold, meta={**scaffold.meta, "geometry": "adaptive"})) is None


def test_lattice_neighbours_are_the_nearest_like_a_kd_tree(scaffold) -> None:
    from scipy.spatial import cKDTree

    lat = lattice.as_lattice(scaffold)
    dist, nbr = lattice.neighbours(lat, 6)
    means = scaffold.means.numpy().astype(np.float64)
    ref_d, ref_n = cKDTree(means).query(means, k=7)
    # Same distances everywhere (the k nearest are unique up to ties); same neighbours wherever the 6th and 7th
    # nearest are not tied.
    np.testing.assert_allclose(np.sort(dist, 1), ref_d[:, 1:], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(means[nbr] - means[:, None, :], axis=-1), dist, atol=1e-5)
    ref_d8, ref_n8 = cKDTree(means).query(means, k=8)
    untied = ref_d8[:, 6] < ref_d8[:, 7] - 1e-6
    assert untied.sum() > 0.5 * len(means)
    np.testing.assert_array_equal(np.sort(nbr[untied], 1), np.sort(ref_n8[untied, 1:7], 1))

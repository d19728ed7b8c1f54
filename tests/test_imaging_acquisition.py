"""Thick-slice simulation (atlasgs_bids.imaging.acquisition.simulate_thick_slices)."""
from __future__ import annotations

import numpy as np
import pytest

from atlasgs_bids.imaging.acquisition import Acquisition, simulate_thick_slices


def _oblique_affine() -> np.ndarray:
    """1 mm isotropic voxels, rotated 20 degrees about x and 10 about z, shifted: nothing axis-aligned."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx
    aff[:3, 3] = [-12.5, 30.0, 7.25]
    return aff


AFF = _oblique_affine()


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, dtype=np.float64) + affine[:3, 3]


@pytest.mark.parametrize("degradation", ["gaussian", "atlasgs"])
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shape_affine_and_acquisition(degradation, factor, axis):
    shape = [6, 7, 8]
    shape[axis] = 23
    data = np.ones(shape, dtype=np.float32)
    thick, thick_aff, acq = simulate_thick_slices(data, AFF, factor, axis=axis, degradation=degradation)
    if degradation == "gaussian":
        first = factor // 2
        n_out = len(range(first, 23, factor))
    else:
        first = (factor - 1) / 2
        n_out = 23 // factor
    expected_shape = list(shape)
    expected_shape[axis] = n_out
    assert thick.shape == tuple(expected_shape) and thick.dtype == np.float32
    # columns: in-plane unchanged, through-plane stretched by the factor; origin at the first thick centre
    for ax in range(3):
        np.testing.assert_allclose(thick_aff[:3, ax], AFF[:3, ax] * (factor if ax == axis else 1), atol=1e-12)
    origin = np.zeros(3)
    origin[axis] = first
    np.testing.assert_allclose(thick_aff[:3, 3], _world(AFF, origin), atol=1e-12)
    assert isinstance(acq, Acquisition)
    np.testing.assert_allclose(acq.affine, thick_aff)
    assert acq.shape == tuple(expected_shape)
    assert acq.fwhm_vox == (1.0, 1.0, 1.0)
    assert acq.slice_axis == axis
    assert acq.profile == ("gaussian" if degradation == "gaussian" else "box")
    np.testing.assert_allclose(acq.zooms[axis], factor)


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("offset", [0.0, 0.3, 0.5, 0.8])
def test_gaussian_point_phantom_world_position_and_sigma(factor, axis, offset):
    """A point anywhere along the slice axis: the log of a sampled Gaussian is a parabola, so three thick
    samples locate it exactly (sub-voxel) and give the profile's sigma; both must match the truth."""
    n = 12 * factor
    shape = [5, 6, 7]
    shape[axis] = n
    data = np.zeros(shape)
    first = factor // 2
    # the point's slice index: between thick centres, offset * factor past centre number 5
    z0 = int(round(first + factor * (5 + offset)))
    ij = [2, 3, 4]
    point = list(ij)
    point[axis] = z0
    data[tuple(point)] = 1.0
    thick, thick_aff, _ = simulate_thick_slices(data, AFF, factor, axis=axis, degradation="gaussian")
    profile = np.moveaxis(thick, axis, 0)[(slice(None),) + tuple(p for a, p in enumerate(point) if a != axis)]
    peak = int(np.argmax(profile))
    lm, l0, lp = np.log(profile[peak - 1 : peak + 2])
    curvature = lm - 2 * l0 + lp  # = -1 / sigma_thick^2
    n_star = peak + 0.5 * (lm - lp) / curvature
    sigma_thick = np.sqrt(-1.0 / curvature)
    # sigma = FWHM / 2.3548 with FWHM = factor original voxels = one thick voxel
    np.testing.assert_allclose(sigma_thick * factor, factor / (2 * np.sqrt(2 * np.log(2))), rtol=1e-9)
    thick_point = np.array(point, dtype=np.float64)
    thick_point[axis] = n_star
    np.testing.assert_allclose(_world(thick_aff, thick_point), _world(AFF, point), atol=1e-9)


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("axis", [1, 2])
def test_atlasgs_point_phantom_centred_on_its_block(factor, axis):
    """A point-like phantom centred on block b0 (one voxel for odd factors, two for even ones) gives a thick
    profile symmetric about b0, and the thick voxel b0 sits at the phantom's world centre."""
    b0 = 4
    n = 10 * factor + factor - 1  # an incomplete tail block, dropped
    shape = [5, 6, 7]
    shape[axis] = n
    data = np.zeros(shape)
    centre = b0 * factor + (factor - 1) / 2
    ij = [1, 2, 3]
    points = []
    for z in ([int(centre)] if factor % 2 else [int(centre - 0.5), int(centre + 0.5)]):
        p = list(ij)
        p[axis] = z
        data[tuple(p)] = 1.0
        points.append(p)
    thick, thick_aff, acq = simulate_thick_slices(data, AFF, factor, axis=axis, degradation="atlasgs")
    assert thick.shape[axis] == 10 and acq.profile == "box"
    profile = np.moveaxis(thick, axis, 0)[(slice(None),) + tuple(p for a, p in enumerate(ij) if a != axis)]
    assert int(np.argmax(profile)) == b0
    for m in (1, 2):
        np.testing.assert_allclose(profile[b0 - m], profile[b0 + m], rtol=1e-12, atol=1e-15)
    assert profile[b0 - 1] < profile[b0]  # the symmetry is not that of an empty profile
    # the block average of the (sigma = 1) blurred phantom: total mass 1 per point spread over factor slices
    np.testing.assert_allclose(profile.sum(), len(points) / factor, rtol=1e-6)
    thick_centre = np.array(ij, dtype=np.float64)
    thick_centre[axis] = b0
    phantom_world = np.mean([_world(AFF, p) for p in points], axis=0)
    np.testing.assert_allclose(_world(thick_aff, thick_centre), phantom_world, atol=1e-9)


@pytest.mark.parametrize("degradation", ["gaussian", "atlasgs"])
def test_constant_interior_preserved_and_4d_equals_3d(degradation):
    rng = np.random.default_rng(1)
    series = rng.uniform(0, 1, size=(5, 6, 30, 3))
    thick4, aff4, _ = simulate_thick_slices(series, AFF, 3, degradation=degradation)
    assert thick4.dtype == np.float64
    for v in range(3):
        thick3, aff3, _ = simulate_thick_slices(series[..., v], AFF, 3, degradation=degradation)
        np.testing.assert_allclose(thick4[..., v], thick3, rtol=1e-12)
        np.testing.assert_allclose(aff4, aff3)
    const = np.full((4, 4, 30), 7.0, dtype=np.int16)
    thick, _, _ = simulate_thick_slices(const, np.eye(4), 3, degradation=degradation)
    assert thick.dtype == np.float32
    np.testing.assert_allclose(thick[..., 2:-2], 7.0, rtol=1e-5)  # the slice profile integrates to 1
    assert thick[0, 0, 0] < 7.0  # zero outside the image (mode='constant') darkens the first slice


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 0}, "factor"),
        ({"factor": 2.0}, "factor"),
        ({"factor": True}, "factor"),
        ({"factor": 2, "axis": 3}, "axis"),
        ({"factor": 2, "axis": -1}, "axis"),
        ({"factor": 2, "degradation": "box"}, "degradation"),
        ({"factor": 40}, "no"),
        ({"factor": 40, "degradation": "atlasgs"}, "no complete block"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_thick_slices(np.ones((4, 4, 12)), np.eye(4), **kwargs)


def test_bad_data_and_affine():
    with pytest.raises(ValueError, match="3D"):
        simulate_thick_slices(np.ones((4, 12)), np.eye(4), 2)
    with pytest.raises(ValueError, match="3D"):
        simulate_thick_slices(np.ones((4, 4, 12, 2, 2)), np.eye(4), 2)
    with pytest.raises(ValueError, match="affine"):
        simulate_thick_slices(np.ones((4, 4, 12)), np.eye(3), 2)

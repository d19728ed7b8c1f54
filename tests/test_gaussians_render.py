"""Rendering outside the target's field of view: no measurement constrains the field there, so it stays empty."""
from __future__ import annotations

import numpy as np

from atlasgs_bids.gaussians.appearance import fit_appearance
from atlasgs_bids.gaussians.render import render
from atlasgs_bids.gaussians.scaffold import lattice_scaffold
from atlasgs_bids.imaging.acquisition import Acquisition


def test_render_leaves_voxels_beyond_the_target_slab_empty() -> None:
    shape = (12, 12, 20)
    affine = np.eye(4)
    t1 = np.zeros(shape, np.float32)
    t1[2:10, 2:10, 2:18] = 100.0
    mask = t1 > 0
    scaffold = lattice_scaffold(t1, affine, mask)
    # The target covers z = 0..7 only (8 contiguous 1 mm slices of the same object).
    target = t1[:, :, :8] * 2.0
    acq = Acquisition.from_geometry(affine, target.shape)
    app = fit_appearance(scaffold, target, acq, np.eye(4))
    inside = render(app, affine, shape)
    everywhere = render(app, affine, shape, within_target=False)
    # One slice of margin beyond the last slice centre (z = 7): z <= 8 may be rendered, z >= 9 must be empty.
    assert np.all(inside[:, :, 9:] == 0)
    assert np.any(everywhere[:, :, 9:] != 0)
    np.testing.assert_array_equal(inside[:, :, :9], everywhere[:, :, :9])
    # Inside the slab the object comes back at the target's level (200), within 10 %.
    assert abs(float(np.median(inside[3:9, 3:9, 3:7])) - 200.0) < 20.0


def test_render_keeps_the_intensity_cap_of_the_fit() -> None:
    """The bound on each Gaussian's intensity holds for the rendered field too: a Gaussian at the mask's edge has
    fewer neighbours than the overlap normaliser assumes and would render above it (ADR 0011)."""
    import dataclasses

    shape = (12, 12, 12)
    affine = np.eye(4)
    t1 = np.zeros(shape, np.float32)
    t1[2:10, 2:10, 2:10] = 100.0
    t1[5:7, 5:7, 5:7] = 300.0  # a bright core, where the cap below binds
    mask = t1 > 0
    app = fit_appearance(lattice_scaffold(t1, affine, mask), t1, Acquisition.from_geometry(affine, shape), np.eye(4))
    assert app.intensity_cap is not None and app.intensity_cap[0] > 0
    free = render(dataclasses.replace(app, intensity_cap=None), affine, shape)
    cap = np.array([0.5 * float(free[mask].max())])
    capped = render(dataclasses.replace(app, intensity_cap=cap), affine, shape)
    assert float(capped[mask].max()) <= cap[0] * (1 + 1e-6)
    below = free < cap[0]
    np.testing.assert_array_equal(capped[below], free[below])  # nothing else changes
    assert np.sum(free[mask] > cap[0]) > 0

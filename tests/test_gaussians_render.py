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

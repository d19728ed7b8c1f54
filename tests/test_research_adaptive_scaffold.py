"""The adaptive (fitted) scaffold, research code kept apart from the app (``atlasgs_bids.research``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from atlasgs_bids.research.adaptive_scaffold import AdaptiveScaffoldOptions, fit_adaptive_scaffold

from test_gaussians_fit import _phantom

TINY = AdaptiveScaffoldOptions(spacing_mm=3.0, steps=20, patch=8, patches_per_step=2, densify_every=10,
                               densify_until=20, init_iterations=50)
_TENSORS = ("means", "quats", "log_scales", "amplitudes", "t1_values")


@pytest.fixture(scope="module")
def phantom():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise reproducibility is checked on one thread
    yield _phantom()
    torch.set_num_threads(before)


def test_same_seed_is_identical_and_another_seed_differs(phantom) -> None:
    t1, _, mask, affine = phantom
    a = fit_adaptive_scaffold(t1, affine, mask, TINY, seed=7)
    b = fit_adaptive_scaffold(t1, affine, mask, TINY, seed=7)
    c = fit_adaptive_scaffold(t1, affine, mask, TINY, seed=8)
    assert a.meta["seed"] == 7 and a.meta["geometry"] == "adaptive" and a.meta["options"]["steps"] == 20
    for name in _TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["loss_history"] == b.meta["loss_history"]
    assert a.n_gaussians != c.n_gaussians or not torch.equal(a.means, c.means)


def test_nan_in_the_t1w_mask_is_refused(phantom) -> None:
    t1, _, mask, affine = phantom
    bad = t1.copy()
    bad[12, 12, 12] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_adaptive_scaffold(bad, affine, mask, TINY)


def test_patch_smaller_than_the_ssim_window_is_refused(phantom) -> None:
    t1, _, mask, affine = phantom
    with pytest.raises(ValueError, match="patch"):
        fit_adaptive_scaffold(t1, affine, mask, dataclasses.replace(TINY, patch=6, steps=1))


def test_presets_grow_the_adam_budget_and_refuse_unknown_names() -> None:
    steps = [AdaptiveScaffoldOptions.preset(q).steps for q in ("fast", "default", "best")]
    assert steps == sorted(steps) and len(set(steps)) == 3
    with pytest.raises(ValueError, match="unknown quality 'ultra'"):
        AdaptiveScaffoldOptions.preset("ultra")

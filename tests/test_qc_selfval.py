"""Held-out-slice self-validation: slice choice, cubic baseline, a phantom with a known answer, and the sign test
against ground truth on the MNI152 simulation."""
from __future__ import annotations

import numpy as np
import pytest

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance, fit_voxels, predict
from atlasgs_bids.gaussians.scaffold import ScaffoldOptions, fit_scaffold
from atlasgs_bids.imaging import metrics
from atlasgs_bids.imaging.acquisition import simulate_thick_slices
from atlasgs_bids.qc.selfval import choose_heldout_slices, cubic_along_slices, self_validate


def test_choose_heldout_slices_rules():
    counts = np.r_[np.zeros(3), np.full(30, 50), np.zeros(3)]
    a = choose_heldout_slices(counts, seed=0)
    assert a == choose_heldout_slices(counts, seed=0)  # deterministic
    assert len(a) == 3 and np.all(np.diff(a) == 4)
    assert min(a) > 3 and max(a) < 32  # never the first or last brain slice
    assert {tuple(choose_heldout_slices(counts, seed=s)) for s in range(8)} != {tuple(a)}  # the seed matters
    assert choose_heldout_slices(np.r_[0, 5, 5, 0], seed=0) == []  # too thin: nothing to hold out
    with pytest.raises(ValueError):
        choose_heldout_slices(counts, every=1)


def test_cubic_along_slices_exact_on_cubic():
    k = np.arange(20, dtype=float)
    vol = np.broadcast_to(2.0 + 0.5 * k - 0.03 * k**2 + 0.001 * k**3, (3, 4, 20)).copy()
    held = np.array([5, 9, 13])
    kept = np.setdiff1d(np.arange(20), held)
    np.testing.assert_allclose(cubic_along_slices(vol, 2, kept, held), vol[:, :, held], atol=1e-9)


def _phantom():
    """A 2 mm T1w phantom (ellipsoid brain, a bright inner ellipsoid) and a lattice scaffold on it."""
    shape = (24, 24, 40)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ii, jj, kk = np.indices(shape, dtype=float)
    r = ((ii - 11.5) / 10) ** 2 + ((jj - 11.5) / 10) ** 2 + ((kk - 19.5) / 17) ** 2
    mask = r <= 1.0
    t1 = np.where(mask, 100.0 + 80.0 * (r < 0.4), 0.0).astype(np.float32)
    return t1, aff, mask, fit_scaffold(t1, aff, mask, ScaffoldOptions.preset("fast"), seed=0)


def test_phantom_known_answers():
    """Cubic-in-slice target: cubic is exact on the held-out slices (so AtlasGS cannot beat it: flagged);
    T1w-proportional target: the forward model reproduces it (held-out NCC ~ 1, better than cubic)."""
    t1, aff, mask, sc = _phantom()
    opts = AppearanceOptions.preset("fast")
    k = np.arange(t1.shape[2], dtype=float)
    smooth = np.broadcast_to(50.0 + 2.0 * k + 0.05 * k**2, t1.shape).astype(np.float32)  # whole field of view
    for target, cubic_exact in ((smooth, True), (2.0 * t1 + 10.0 * mask, False)):
        thick, thick_aff, acq = simulate_thick_slices(target, aff, 3)
        res = self_validate(sc, thick, acq, np.eye(4), opts, seed=1)
        assert res is not None and res.n_scored > 50 and len(res.heldout_slices) >= 2
        if cubic_exact:
            # a quadratic blurred by a Gaussian slice profile is a quadratic: cubic is exact (up to float32 and
            # the zero-padded volume ends)
            assert res.cubic.ncc > 0.9999 and res.cubic.mae < 0.5 and res.flag and res.gain_psnr_db < 0
        else:
            assert res.atlasgs.ncc > 0.98 and res.gain_psnr_db > 0 and not res.flag


def test_predict_reproduces_fit_voxels():
    """predict() on the fitted voxels is the forward model of the fit: small data-consistency residual."""
    t1, aff, mask, sc = _phantom()
    thick, _, acq = simulate_thick_slices(2.0 * t1 + 10.0 * mask, aff, 3)
    app = fit_appearance(sc, thick, acq, np.eye(4), AppearanceOptions.preset("fast"))
    ijk = fit_voxels(sc, acq, np.eye(4), AppearanceOptions.preset("fast"))
    assert len(ijk) == app.diagnostics["n_measurements"]
    y = thick[tuple(ijk.T)]
    p = predict(app, acq, ijk)[:, 0]
    assert np.linalg.norm(y - p) / np.linalg.norm(y) < 0.05


@pytest.mark.slow
def test_mni152_heldout_gain_agrees_in_sign_with_true_gain(shared_data):
    """x5 thick slices of the MNI152 T2w (48x48 in-plane crop): held-out gain over cubic vs true gain (T1w grid)."""
    from scipy.interpolate import CubicSpline

    from atlasgs_bids.bench.cases import load_subject, make_case
    from atlasgs_bids.gaussians.render import render

    sub = load_subject(shared_data / "mni152-hcp", crop=48)
    case = make_case(sub, 5, "gaussian")
    sc = fit_scaffold(sub.t1w, sub.affine, sub.mask, ScaffoldOptions.preset("fast"), seed=0)
    opts = AppearanceOptions.preset("fast")
    app = fit_appearance(sc, case.thick, case.acquisition, np.eye(4), opts)
    ours = render(app, sub.affine, sub.shape, mask=sub.mask)
    to_thick = np.linalg.inv(case.thick_affine) @ sub.affine
    z = np.arange(sub.shape[2]) * to_thick[2, 2] + to_thick[2, 3]
    cubic = CubicSpline(np.arange(case.thick.shape[2]), case.thick, axis=2)(z)
    inside = (z >= 0) & (z <= case.thick.shape[2] - 1)
    m = sub.mask & inside[None, None, :]
    true_gain = metrics.psnr(ours, sub.t2w, m) - metrics.psnr(cubic, sub.t2w, m)
    res = self_validate(sc, case.thick, case.acquisition, np.eye(4), opts, seed=0)
    print(f"true gain {true_gain:.2f} dB, held-out gain {res.gain_psnr_db:.2f} dB, held-out fit "
          f"{res.fit_seconds:.1f} s vs main fit {app.diagnostics['seconds']:.1f} s")
    assert np.sign(res.gain_psnr_db) == np.sign(true_gain) != 0


@pytest.mark.slow
def test_tiny_sample_run_writes_qc(tiny_sample, tiny_run):
    """Whole participant run on the tiny sample (the session's shared reference run, conftest ``tiny_run``): QC JSON
    (agreed schema), residual map, sidecar metrics and flags."""
    import json

    import nibabel as nib

    out, work = tiny_run.out, tiny_run.work
    (qc_file,) = work.rglob("T2w_wf/qc/qc.json")
    qc = json.loads(qc_file.read_text())
    assert qc["target"] == "sub-01_T2w.nii.gz" and qc["modality"] == "T2w" and qc["device"] == "cpu"
    assert not qc["registration"]["flag"] and qc["registration"]["ncc"] > qc["registration"]["warn_threshold_ncc"]
    sv = qc["self_validation"]
    assert sv["slice_axis"] == 2 and len(sv["heldout_slices"]) == 3 and sv["n_fit_slices"] > 0
    # truth on this sample: AtlasGS beats cubic (the harmonised output), so the held-out score must say so too
    assert sv["gain_psnr_db"] > 0 and not sv["flag"] and qc["flags"] == []
    assert 0 < qc["fit"]["relative_residual"] < 0.1 and len(qc["fit"]["history"]) == qc["fit"]["iterations"]
    assert qc["fit"]["preconditioner"]["block"] == 8 and qc["fit"]["preconditioner"]["n_coarse"] > 0
    (res_file,) = work.rglob("T2w_wf/harmonize/residual.nii.gz")
    res, t2w = nib.load(str(res_file)), nib.load(str(tiny_sample.t2w))
    assert res.shape == t2w.shape and np.allclose(res.affine, t2w.affine) and res.get_data_dtype() == np.float32
    assert np.count_nonzero(np.asarray(res.dataobj)) > 1000
    (side,) = out.rglob("sub-01*_space-T1w_desc-atlasgs_T2w.json")
    meta = json.loads(side.read_text())
    for key in ("registration_ncc", "registration_mask_dice", "heldout_psnr", "heldout_ncc", "heldout_mae",
                "heldout_cubic_psnr", "heldout_cubic_ncc", "heldout_cubic_mae", "heldout_gain_db",
                "relative_residual"):
        assert isinstance(meta["Metrics"][key], float), key
    assert meta["QCFlags"] == []

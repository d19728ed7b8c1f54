"""Slice-aware rigid refinement (imaging/refine.py): the maths on synthetic volumes, the recovery of small offsets,
and the registration path on a real head template with an oblique header and a moved thick-slice target."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition
from atlasgs_bids.imaging.refine import (RefineOptions, _Problem, _profile_quadrature, brain_centre,
                                         max_displacement_mm, refine_rigid, rigid_update, surface_points)
from atlasgs_bids.imaging.transforms import rotation_angle_deg


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3), st.lists(st.floats(-20, 20), min_size=3, max_size=3))
def test_rigid_update_is_a_rotation_by_the_vector_norm(omega, t):
    centre = np.array([3.0, -7.0, 11.0])
    m = rigid_update(np.array([*omega, *t]), centre)
    r = m[:3, :3]
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-10) and np.linalg.det(r) > 0
    assert rotation_angle_deg(r) == pytest.approx(np.degrees(np.linalg.norm(omega)), abs=1e-6)
    # the centre moves by the translation only
    assert np.allclose(m[:3, :3] @ centre + m[:3, 3], centre + np.array(t), atol=1e-9)


def test_max_displacement_of_a_translation():
    pts = np.random.default_rng(0).normal(size=(50, 3)) * 40
    a, b = np.eye(4), np.eye(4)
    b[:3, 3] = [0.3, 0.4, 0.0]
    assert max_displacement_mm(a, b, pts) == pytest.approx(0.5)


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_profile_quadrature_has_the_slice_profiles_variance(profile):
    acq = Acquisition(affine=np.diag([1.0, 1.0, 5.0, 1.0]), shape=(8, 8, 8), fwhm_vox=(1.0, 1.0, 1.0),
                      slice_axis=2, profile=profile)
    offs, w = _profile_quadrature(acq, 1.0, 0.0)
    assert w.sum() == pytest.approx(1.0) and np.sum(w * offs) == pytest.approx(0.0, abs=1e-12)
    # total through-plane variance = quadrature + T1w voxel PSF (+ in-plane blur, 0 here)
    sub_var = 0.0
    if profile == "box":
        sub_var = max((5.0 / acq.box_points * FWHM_TO_SIGMA) ** 2 - FWHM_TO_SIGMA ** 2, 0.0)
        total = np.sum(w * offs ** 2) + FWHM_TO_SIGMA ** 2 - sub_var
        box_var = 5.0 ** 2 / 12.0 * (1 - 1 / acq.box_points ** 2)  # K sub-slice centres tiling the box
        assert np.sum(w * offs ** 2) - sub_var == pytest.approx(box_var, rel=1e-6)
    else:
        total = np.sum(w * offs ** 2) + FWHM_TO_SIGMA ** 2
        assert total == pytest.approx((5.0 * FWHM_TO_SIGMA) ** 2, rel=1e-6)


def _phantom(seed: int = 0, shape=(40, 44, 36)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
    vol = (vol - vol.min()) / np.ptp(vol)
    return vol.astype(np.float32)


def _thick_target(t1: np.ndarray, affine: np.ndarray, truth: np.ndarray, factor: int = 4):
    """A thick-slice 'target' of a T1w phantom: a nonlinear intensity map, measured along axis 2 through the truth."""
    from atlasgs_bids.data.sample import sample_through_psf

    obj = (1.0 - t1) ** 2 * 100.0 + 10.0
    zooms = np.array([1.0, 1.0, float(factor)])
    t_aff = np.diag([*zooms, 1.0])
    t_aff[:3, 3] = [2.0, 2.0, 1.0]
    shape = (36, 40, 34 // factor)
    y = sample_through_psf(obj, affine, truth @ t_aff, shape, tuple(zooms))
    return nib.Nifti1Image(y.astype(np.float32), t_aff), Acquisition.from_geometry(t_aff, shape)


def test_jacobian_matches_finite_differences():
    t1 = _phantom()
    affine = np.eye(4)
    mask = np.zeros(t1.shape, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    target, acq = _thick_target(t1, affine, np.eye(4))
    opts = RefineOptions(levels_mm=(0.0,), max_voxels=2000, bias_order=1)
    prob = _Problem(t1, affine, mask, np.asarray(target.dataobj), acq, np.eye(4), opts)
    prob.set_level(0.0)
    centre = brain_centre(mask, affine)
    m0 = rigid_update(np.array([0.01, -0.02, 0.015, 0.3, -0.2, 0.1]), centre)
    pts, s, i0, beta, r = prob.evaluate(m0)
    jac = prob.jacobian(pts, i0, beta, centre)

    def predict(params):
        design, _ = prob.features(prob._sample(prob.vol, prob.points(rigid_update(params, centre) @ m0)))
        return design @ beta  # the intensity map held fixed, as in the Jacobian

    eps = np.array([1e-4] * 3 + [1e-3] * 3)
    fd = np.stack([(predict(np.eye(6)[k] * eps[k]) - predict(-np.eye(6)[k] * eps[k])) / (2 * eps[k])
                   for k in range(6)], axis=1)
    # compare on voxels away from knots of the piecewise-linear map (where the derivative jumps)
    scale = np.abs(fd).max(axis=0)
    err = np.abs(jac - fd) / scale
    assert np.median(err) < 0.02, np.median(err, axis=0)


def test_refinement_recovers_a_small_offset_on_a_phantom():
    t1 = _phantom(1)
    affine = np.eye(4)
    mask = np.zeros(t1.shape, bool)
    mask[5:-5, 5:-5, 4:-4] = True
    truth = np.eye(4)
    target, acq = _thick_target(t1, affine, truth)
    centre = brain_centre(mask, affine)
    start = rigid_update(np.array([np.radians(0.5), 0.0, 0.0, 0.0, 0.0, 0.5]), centre) @ truth
    surf = surface_points(mask, affine)
    before = max_displacement_mm(start, truth, surf)
    res = refine_rigid(nib.Nifti1Image(t1, affine), nib.Nifti1Image(mask.astype(np.uint8), affine), target,
                       start, acq, RefineOptions(levels_mm=(1.0, 0.0)))
    after = max_displacement_mm(res.target2t1w, truth, surf)
    assert before > 0.5
    assert after < 0.15, (before, after)
    assert res.misfit_after < res.misfit_before
    assert res.moved_mm == pytest.approx(max_displacement_mm(res.target2t1w, start, surf))


# ---------------------------------------------------------------------------------------- real head template
def _head_case(root: Path, degrees: float, oblique: float = 7.0):
    """MNI152 2 mm head (skull on), T1w header oblique by ``oblique`` deg about x; the T2w moved ``degrees`` and
    3 mm and cut into 2x2x10 mm slices (noise-free). Returns images, acquisition, truth and the surface points."""
    from atlasgs_bids.data.sample import rigid_matrix, sample_through_psf

    t1i = nib.load(str(root / "MNI152_T1_2mm.nii.gz"))
    t2 = nib.load(str(root / "MNI152_T2_2mm.nii.gz")).get_fdata(dtype=np.float32)
    mi = nib.load(str(root / "MNI152_T1_1mm_brain_mask.nii.gz"))
    vox = np.linalg.inv(mi.affine) @ t1i.affine
    mask = ndimage.affine_transform(np.asarray(mi.dataobj, np.float32), vox[:3, :3], vox[:3, 3],
                                    output_shape=t1i.shape, order=1) > 0.5
    affine = rigid_matrix((1, 0, 0), oblique, (0, 0, 0)) @ t1i.affine
    c = brain_centre(mask, affine)
    shift = np.eye(4)
    shift[:3, 3] = c
    truth = shift @ rigid_matrix((0.3, 1.0, 0.2), degrees, (0, 0, 0)) @ np.linalg.inv(shift)
    truth[:3, 3] += [3.0, -2.0, 1.0]
    zooms = np.array([2.0, 2.0, 10.0])
    ijk = np.argwhere(mask)
    box = nib.affines.apply_affine(np.linalg.inv(truth) @ affine, np.array(
        [[i, j, k] for i in (ijk[:, 0].min(), ijk[:, 0].max()) for j in (ijk[:, 1].min(), ijk[:, 1].max())
         for k in (ijk[:, 2].min(), ijk[:, 2].max())], float))
    lo, hi = box.min(0) - 20, box.max(0) + 20
    shape = tuple(int(np.ceil((h - l) / z)) + 1 for l, h, z in zip(lo, hi, zooms))
    t_aff = np.diag([*zooms, 1.0])
    t_aff[:3, 3] = lo
    y = sample_through_psf(t2, affine, truth @ t_aff, shape, tuple(zooms), source_fwhm_mm=2.0)
    return (nib.Nifti1Image(t1i.get_fdata(dtype=np.float32), affine),
            nib.Nifti1Image(mask.astype(np.uint8), affine), nib.Nifti1Image(y.astype(np.float32), t_aff),
            Acquisition.from_geometry(t_aff, shape), truth, surface_points(mask, affine))


def test_masked_path_recovers_the_rotation_of_an_oblique_moved_head(shared_data):
    """The failure of issue 11 in small form: oblique T1w header, thick target moved a few degrees, masked path."""
    pytest.importorskip("ants")
    from atlasgs_bids.imaging.registration import align_to_t1w

    fixed, mask, target, acq, truth, surf = _head_case(shared_data / "mni152-hcp", 6.0)
    al = align_to_t1w(fixed, target, fixed_mask=mask, acquisition=acq, threads=1)
    est_rot = rotation_angle_deg(al.target2t1w[:3, :3])
    assert est_rot == pytest.approx(6.0, abs=0.5)  # not a pure translation
    assert rotation_angle_deg(al.target2t1w[:3, :3].T @ truth[:3, :3]) < 0.5
    assert al.refined and al.refinement.misfit_after < al.refinement.misfit_before
    # the refinement does not leave antspyx's answer worse
    assert max_displacement_mm(al.target2t1w, truth, surf) <= max_displacement_mm(al.ants.target2t1w, truth, surf)
    assert max_displacement_mm(al.target2t1w, truth, surf) < 1.5
    assert al.ants.parameters["metric_initial"] < al.ants.metric


def test_qc_spread_flags_a_misregistration_and_not_a_correct_one(shared_data):
    """The restart spread is small at the answer the app keeps (the refinement's optimum) and large when that
    answer is moved by 2 mm and 1 deg. (On this 2 mm head the optimum itself sits ~0.7 mm from the synthetic truth:
    the T2w template is not a function of the T1w; docs/qc.md.)"""
    from atlasgs_bids.qc.registration import restart_spread

    fixed, mask, target, acq, truth, surf = _head_case(shared_data / "mni152-hcp", 4.0)
    c = brain_centre(np.asarray(mask.dataobj) > 0, mask.affine)
    answer = refine_rigid(fixed, mask, target, truth, acq).target2t1w
    good = restart_spread(fixed, mask, target, answer, acq)
    off = rigid_update(np.array([0.0, 0.0, np.radians(1.0), 2.0, 0.0, 0.0]), c) @ answer
    bad = restart_spread(fixed, mask, target, off, acq)
    assert not good["flag"], good
    assert good["warn_threshold_mm"] == pytest.approx(1.0)  # half a 2 mm T1w voxel
    assert bad["flag"] and bad["spread_mm"] > good["warn_threshold_mm"], bad

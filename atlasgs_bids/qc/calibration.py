"""Calibrate the posterior SD map on the target's own held-out slices (issue 15; ADR 0008).

The posterior read-out of :mod:`atlasgs_bids.gaussians.uncertainty` is a local approximation (it ignores the
correlations the Laplacian builds and the regularisation bias), so its scale is not trusted. One scalar ``k`` is
fitted where the answer is known without ground truth: slices of the target itself.

1. The slab of the stage-2 tuning (:func:`~atlasgs_bids.qc.tuning.tuning_slab`, outside every QC self-validation
   slab, in an in-plane box of :data:`~atlasgs_bids.qc.tuning.BOX_MM`) is fitted without its held-out slices, with
   the options the full fit used, keeping the posterior.
2. Each scored held-out voxel v (:func:`~atlasgs_bids.qc.selfval.scored_heldout`) gives a residual
   ``r_v = measured - predicted`` (target units) and the read-out variance ``q_v`` of its measurement (its own
   slice profile). Under the model, ``r_v ~ N(0, sigma^2 (1 + k^2 q_v))``: the measurement's own noise plus the
   prediction's posterior variance, ``sigma`` the target's noise SD.
3. ``k`` makes 95 % of the held-out voxels fall within 1.96 SD: voxel v is covered iff
   ``k^2 >= t_v = ((r_v / (1.96 sigma))^2 - 1) / q_v``, so ``k^2`` is the 95th percentile of ``t`` (closed form;
   a quantile, not a variance match, so a few outliers do not inflate it).

The rendered SD is then ``k sigma sqrt(q)`` (:func:`~atlasgs_bids.gaussians.uncertainty.render_sd`): the error of
the estimate itself, without the measurement noise. A held-out slice lies two spacings from its kept neighbours,
so the held-out fit's own posterior is the one read there (larger than the full fit's), and ``k`` carries over.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance, fit_voxels, predict
from atlasgs_bids.gaussians.forward import target_vox2t1w
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.gaussians.uncertainty import voxel_variance
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.qc import selfval, tuning

#: Coverage the calibration aims at: the share of held-out voxels within 1.96 SD.
COVERAGE = 0.95
#: Two-sided normal quantile of :data:`COVERAGE`.
Z95 = 1.959964


@dataclass(frozen=True)
class SDCalibration:
    """The scale of a posterior SD map, from held-out slices.

    scale : k, the factor applied to ``sigma sqrt(q)`` (1.0 when no calibration ran)
    calibrated : False when no held-out slab exists (a thin target); ``reason`` then says why
    noise_sigma : sigma, the target's noise SD (target units)
    n_heldout : held-out voxels used; heldout_slices, fit_slices : where (slice indices, inclusive slab)
    coverage_uncalibrated, coverage : share of held-out voxels within 1.96 SD at k = 1 and at k
    spearman : Spearman correlation of the predicted SD with |residual| on the held-out voxels
    seconds : wall-clock seconds (the held-out fit included)
    """

    scale: float
    calibrated: bool
    noise_sigma: float
    n_heldout: int = 0
    heldout_slices: list[int] | None = None
    fit_slices: list[int] | None = None
    coverage_uncalibrated: float | None = None
    coverage: float | None = None
    spearman: float | None = None
    seconds: float = 0.0
    reason: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def coverage(residual: np.ndarray, sd: np.ndarray) -> float:
    """Share of ``|residual| <= 1.96 sd`` (arrays of one shape, same units)."""
    return float(np.mean(np.abs(residual) <= Z95 * sd)) if len(residual) else float("nan")


def fit_scale(residual: np.ndarray, q: np.ndarray, sigma: float, *, target: float = COVERAGE) -> float:
    """The smallest ``k >= 0`` with ``|r| <= 1.96 sigma sqrt(1 + k^2 q)`` for a share ``target`` of the voxels.

    ``residual`` [H] target units, ``q`` [H] read-out variances per unit noise variance, ``sigma`` the noise SD.
    Returns 0.0 when the noise alone already covers that share: the held-out voxels then cannot tell the
    prediction's error from the noise (:func:`calibrate_sd` keeps the posterior's own scale, 1, then).
    """
    t = ((np.asarray(residual) / (Z95 * sigma)) ** 2 - 1.0) / np.maximum(np.asarray(q), 1e-30)
    return float(np.sqrt(max(np.quantile(t, target), 0.0)))


def calibrate_sd(scaffold: Scaffold, data: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray,
                 options: AppearanceOptions, *, noise_sigma: float,
                 device: str | torch.device = "cpu") -> SDCalibration:
    """Fit the SD map's scale ``k`` on the target's own held-out slices (module docstring).

    Parameters
    ----------
    scaffold : stage-1 result (T1w world mm RAS)
    data : (I, J, K) or (I, J, K, V) the target, own units and grid (a series is calibrated on its first volume)
    acquisition, target2t1w : the target's acquisition model and target world -> T1w world (mm RAS)
    options : the stage-2 options the full fit used (after tuning; tuning is not repeated)
    noise_sigma : the target's noise SD (target units; the full fit's ``noise_sigma``), the scale of the posterior
    """
    t0 = time.perf_counter()
    opts = replace(options, tune=False, noise_lam=False)  # lambda as the full fit used it
    vol = np.asarray(data, dtype=np.float32)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    axis = int(acquisition.slice_axis)
    eligible = fit_voxels(scaffold, acquisition, target2t1w, opts)
    slab = tuning.heldout_slab(eligible, vol.shape, acquisition) if len(eligible) >= 100 else None
    if slab is None:
        return SDCalibration(scale=1.0, calibrated=False, noise_sigma=noise_sigma,
                             seconds=time.perf_counter() - t0,
                             reason="no slab of brain slices outside the QC self-validation slabs: uncalibrated")
    held, (first, last), region = slab
    eligible = eligible[region[tuple(eligible.T)]]
    vox2t1w = target_vox2t1w(acquisition, target2t1w)
    sub = selfval.heldout_scaffold(scaffold, vox2t1w, axis, (first, last), region)
    fit_mask = selfval.heldout_fit_mask(vol.shape, axis, held, (first, last), region)
    app = fit_appearance(sub, vol, acquisition, target2t1w, opts, mask=fit_mask, device=device, posterior=True)
    heldout, inner = selfval.scored_heldout(eligible, vol.shape, acquisition, held)
    heldout = heldout[inner]
    residual = vol[tuple(heldout.T)] - predict(app, acquisition, heldout, device=device)[:, 0]
    q = voxel_variance(sub, app.posterior, vox2t1w, heldout, acquisition, device=device)
    k = fit_scale(residual, q, noise_sigma)
    reason = None
    if k <= 0.0:  # a zero map would claim an exact output; the model's own posterior is the honest statement
        k, reason = 1.0, ("the held-out residuals lie within the noise alone, so they cannot set the scale: the "
                          "posterior's own scale (1) is kept")

    def sd_meas(scale: float) -> np.ndarray:  # SD of a held-out residual: noise plus the prediction's posterior
        return noise_sigma * np.sqrt(1.0 + scale**2 * q)

    rho = spearmanr(np.sqrt(q), np.abs(residual)).statistic if len(q) > 2 else float("nan")
    return SDCalibration(scale=k, calibrated=reason is None, noise_sigma=noise_sigma, n_heldout=int(len(heldout)),
                         heldout_slices=[int(s) for s in held], fit_slices=[int(first), int(last)],
                         coverage_uncalibrated=coverage(residual, sd_meas(1.0)),
                         coverage=coverage(residual, sd_meas(k)), spearman=float(rho),
                         seconds=time.perf_counter() - t0, reason=reason)

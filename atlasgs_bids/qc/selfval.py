"""Self-validation of stage 2 without ground truth: hold out slices, fit the rest, predict the held-out ones.

The target's own thick slices are the only measurements we have, so we hide some of them: every ``every``-th slice
(along the target's slice axis) in a slab in the middle of the brain, never the first or last slice that sees the
brain. Stage 2 is fitted on the other slices of that slab (:func:`~atlasgs_bids.gaussians.appearance.fit_appearance`
with ``mask=``), and the held-out voxels are predicted through the forward model
(:func:`~atlasgs_bids.gaussians.appearance.predict`: the same slice profile the real slices were measured through).
The same voxels are also predicted by cubic interpolation along the slice axis from the kept slices (target voxel
space, :class:`scipy.interpolate.CubicSpline`), and both are scored against the measured held-out voxels (PSNR with
the measured range in those voxels, NCC, MAE in the target's units; :mod:`atlasgs_bids.imaging.metrics`).

Scored voxels are the held-out voxels the full fit would use (the brain-mask rule of
:func:`~atlasgs_bids.gaussians.appearance.fit_voxels`) that lie at least one slice thickness (mm, in plane) inside
the edge of that region on their slice. Nearer the edge, a thick slice also measures tissue outside the brain mask,
which the scaffold does not model and the output never renders; in a held-out slice nothing constrains that part
of the fit, and its errors there are the regulariser's (measured on the tiny sample, 2.5 mm Gaussians and 7.5 mm
slices: within 5 mm of the edge AtlasGS's held-out RMSE was 180-470 vs 87-109 for cubic, deeper inside 38 vs 74).
The scores over every eligible held-out voxel are kept too (``all_voxels``). A held-out slice lies between two kept
ones, so the prediction is an interpolation over two slice spacings: harder than the real task (one spacing), the
same for both methods.

Cost: the fit sees only a slab of slices (``max_heldout`` held-out slices, ``every - 1`` kept slices between
them and ``margin`` kept slices on each side) and only the Gaussians that slab can see (their means within
:data:`GAUSSIAN_MARGIN` slices of it), so it costs a fraction of the main fit. Measured at ``--quality fast`` on 2
shared CPU cores (held-out fit vs main fit): tiny sample T2w 8.7 s vs 14.5 s; MNI152 x5, 48x48 crop, 7.8 s vs
19.2 s; bids-chris PDw 60 s vs 318 s (75 s for the whole self-validation).

Agreement with the truth (MNI152 x5 crop, tests/test_qc_selfval.py): held-out gain +8.2 dB vs true gain +6.3 dB
over cubic; tiny sample +4.8 dB vs +2.7 dB. Limitation: the held-out score is blind to a registration error (the
fit is self-consistent in the target's space): on the MNI152 crop a 2 mm / 4 mm shift of the transform makes the
true gain -4.9 / -8.9 dB while the held-out gain stays +6.2 / +4.5 dB. Registration QC must catch those.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance, fit_voxels, predict
from atlasgs_bids.gaussians.forward import target_vox2t1w
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.imaging import metrics
from atlasgs_bids.imaging.acquisition import Acquisition

#: Default: hold out every 4th slice (a held-out slice always has kept slices on both sides).
EVERY = 4
#: Default number of held-out slices (bounds the cost; 4 slices of a whole brain are thousands of voxels).
MAX_HELDOUT = 3
#: Kept slices fitted beyond the outermost held-out slice on each side.
MARGIN = 2
#: Gaussians kept up to this many slice spacings beyond the fitted slab (a thick slice's PSF reaches about one).
GAUSSIAN_MARGIN = 1.5


@dataclass(frozen=True)
class HeldOutScores:
    """PSNR (dB, range of the measured held-out voxels), NCC (Pearson r) and MAE (target units)."""

    psnr: float
    ncc: float
    mae: float


@dataclass(frozen=True)
class HeldOutRun:
    """One held-out fit and its scores (:func:`heldout_fit`); the fields are described in :class:`SelfValidation`."""

    n_fit_slices: int
    n_scored: int
    edge_mm: float
    all_voxels: dict
    atlasgs: HeldOutScores
    cubic: HeldOutScores
    gain_psnr_db: float
    fit_seconds: float
    n_gaussians: int


@dataclass(frozen=True)
class SelfValidation(HeldOutRun):
    """Result of :func:`self_validate`.

    slice_axis : the target's voxel axis across slices
    heldout_slices : slice indices (along ``slice_axis``) that were held out
    fit_slices : (first, last) slice index of the slab the held-out fit saw (inclusive)
    n_fit_slices : kept slices in that slab (fitted)
    n_scored : held-out voxels scored (at least ``edge_mm`` inside the eligible region)
    edge_mm : the in-plane distance from the eligible region's edge below which voxels are not scored
    all_voxels : ``{"atlasgs": HeldOutScores, "cubic": HeldOutScores, "n": int}`` over every eligible held-out voxel
    atlasgs, cubic : scores of the forward-model prediction and of cubic interpolation on the same voxels
    gain_psnr_db : ``atlasgs.psnr - cubic.psnr``
    flag : True when AtlasGS is not better than cubic (gain <= 0 dB)
    seconds : wall-clock seconds of the whole call; fit_seconds : of the held-out fit alone
    n_gaussians : Gaussians in the held-out fit (the scaffold's, restricted to the slab)
    tuning : the hyperparameter choice the fit used when the options ask for tuning
        (:func:`atlasgs_bids.qc.tuning.tune_appearance`'s record), else None
    """

    slice_axis: int
    heldout_slices: list[int]
    fit_slices: tuple[int, int]
    flag: bool
    seconds: float
    tuning: dict | None = None

    def to_json(self) -> dict:
        """JSON-safe dict (the ``self_validation`` block of the QC JSON)."""
        out = asdict(self)
        out["fit_slices"] = list(self.fit_slices)
        return out


def choose_heldout_slices(brain_voxels_per_slice: np.ndarray, *, seed: int = 0, every: int = EVERY,
                          max_heldout: int = MAX_HELDOUT, phase: int | None = None) -> list[int]:
    """Held-out slice indices: every ``every``-th slice inside the brain-covered slab, near its middle.

    Parameters
    ----------
    brain_voxels_per_slice : (K,) int, fitted (brain) voxels of each slice along the slice axis
    seed : picks the phase of the ``every``-cycle (deterministic: the same seed gives the same slices)
    every : spacing of the held-out slices, >= 2 (so each has a kept neighbour on both sides)
    max_heldout : at most this many, a run centred on the middle of the brain slab
    phase : the phase itself (0 .. every - 1), overriding ``seed``

    Returns
    -------
    Sorted slice indices, never the first or last brain slice; empty when the slab is too thin (< 3 slices).

    >>> choose_heldout_slices(np.array([0, 5, 9, 9, 9, 9, 9, 9, 9, 9, 5, 0]), seed=0)
    [5, 9]
    """
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    counts = np.asarray(brain_voxels_per_slice)
    brain = np.flatnonzero(counts > 0)
    if brain.size < 3:
        return []
    lo, hi = int(brain[0]), int(brain[-1])
    if phase is None:
        phase = int(np.random.default_rng(seed).integers(every))
    cand = [s for s in range(lo + 1, hi) if (s - lo - 1) % every == phase and counts[s] > 0]
    if not cand:
        cand = [s for s in range(lo + 1, hi) if counts[s] > 0][:1]
    if len(cand) > max_heldout:
        mid = (lo + hi) / 2.0
        start = int(np.argmin([abs(np.mean(cand[i:i + max_heldout]) - mid)
                               for i in range(len(cand) - max_heldout + 1)]))
        cand = cand[start:start + max_heldout]
    return [int(s) for s in cand]


def cubic_along_slices(vol: np.ndarray, slice_axis: int, kept: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Cubic-spline interpolation of ``vol`` along ``slice_axis`` from the slices ``kept`` to the slices ``at``.

    Parameters
    ----------
    vol : (I, J, K) target in its own voxel space
    slice_axis : 0, 1 or 2
    kept : increasing slice indices used as knots (not-a-knot cubic spline; >= 2 slices)
    at : slice indices to evaluate (inside ``[kept[0], kept[-1]]`` in practice)

    Returns
    -------
    float64 array, ``vol``'s shape with ``slice_axis`` replaced by ``len(at)``.
    """
    from scipy.interpolate import CubicSpline

    kept = np.asarray(kept)
    vals = np.take(np.asarray(vol, dtype=np.float64), kept, axis=slice_axis)
    if len(kept) < 4:  # too few knots for a cubic: linear
        return np.apply_along_axis(lambda v: np.interp(at, kept, v), slice_axis, vals)
    return CubicSpline(kept, vals, axis=slice_axis)(np.asarray(at, dtype=np.float64))


def slab_scaffold(scaffold: Scaffold, vox2t1w: np.ndarray, slice_axis: int, first: float, last: float) -> Scaffold:
    """The scaffold restricted to Gaussians whose mean lies between target slices ``first`` and ``last``.

    ``vox2t1w`` (4, 4) maps target voxel index -> T1w world mm RAS; slice positions are continuous target voxel
    coordinates along ``slice_axis``. The brain mask and metadata are kept whole.
    """
    to_vox = np.linalg.inv(np.asarray(vox2t1w, dtype=np.float64))
    means = scaffold.means.detach().cpu().numpy().astype(np.float64)
    s = means @ to_vox[slice_axis, :3] + to_vox[slice_axis, 3]
    return subset_scaffold(scaffold, np.flatnonzero((s >= first) & (s <= last)))


def subset_scaffold(scaffold: Scaffold, keep: np.ndarray) -> Scaffold:
    """The scaffold restricted to the Gaussians ``keep`` (int indices); mask and metadata kept whole."""
    keep = torch.as_tensor(np.asarray(keep, dtype=np.int64))
    return replace(scaffold, means=scaffold.means[keep], quats=scaffold.quats[keep],
                   log_scales=scaffold.log_scales[keep], amplitudes=scaffold.amplitudes[keep],
                   t1_values=scaffold.t1_values[keep])


def edge_distance_mm(eligible: np.ndarray, shape: tuple[int, int, int], acquisition: Acquisition,
                     ijk: np.ndarray) -> np.ndarray:
    """In-plane distance (mm) of each voxel ``ijk`` [M, 3] to the nearest non-eligible voxel of its slice.

    ``eligible`` [E, 3] are the target voxels of the brain-mask rule; distances use the in-plane voxel sizes of
    ``acquisition`` (Euclidean distance transform of each slice of the eligible mask).
    """
    from scipy.ndimage import distance_transform_edt

    axis = int(acquisition.slice_axis)
    inplane = [a for a in range(3) if a != axis]
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(eligible.T)] = True
    out = np.zeros(len(ijk))
    for s in np.unique(ijk[:, axis]):
        sl = [slice(None)] * 3
        sl[axis] = int(s)
        dist = distance_transform_edt(mask[tuple(sl)], sampling=acquisition.zooms[inplane])
        rows = ijk[:, axis] == s
        out[rows] = dist[ijk[rows][:, inplane[0]], ijk[rows][:, inplane[1]]]
    return out


def score(pred: np.ndarray, measured: np.ndarray) -> HeldOutScores:
    """PSNR (dB, data range of ``measured``), NCC and MAE of ``pred`` against ``measured`` ([M] voxel values)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    measured = np.asarray(measured, dtype=np.float64).ravel()
    return HeldOutScores(psnr=metrics.psnr(pred, measured, None), ncc=metrics.ncc(pred, measured, None),
                         mae=metrics.mae(pred, measured, None))


def self_validate(scaffold: Scaffold, data: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray,
                  options: AppearanceOptions | None = None, *, seed: int = 0, every: int = EVERY,
                  max_heldout: int = MAX_HELDOUT, margin: int = MARGIN,
                  device: str | torch.device = "cpu") -> SelfValidation | None:
    """Held-out-slice validation of stage 2 on one target (see the module docstring).

    Parameters
    ----------
    scaffold : the subject's stage-1 scaffold (T1w world mm RAS)
    data : (I, J, K) or (I, J, K, V) target in its own units and grid; a series is validated on its first volume
    acquisition : the target's acquisition model (``slice_axis``, slice profile)
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS (the registration)
    options : stage-2 options of the main fit (same preset, so the score describes the fit actually used)
    seed : chooses the held-out slices (:func:`choose_heldout_slices`)
    every, max_heldout, margin : held-out spacing and count, kept slices beyond them (see the module docstring)
    device : torch device of the fit

    Returns
    -------
    :class:`SelfValidation`, or None when the brain slab is too thin to hold out a slice (< 3 slices).
    """
    t0 = time.perf_counter()
    opts = options or AppearanceOptions.preset("default")
    vol = np.asarray(data, dtype=np.float32)
    if vol.ndim == 4:
        vol = vol[..., 0]
    axis = int(acquisition.slice_axis)
    eligible = fit_voxels(scaffold, acquisition, target2t1w, opts)
    counts = np.bincount(eligible[:, axis], minlength=vol.shape[axis]) if len(eligible) else np.zeros(vol.shape[axis])
    held = choose_heldout_slices(counts, seed=seed, every=every, max_heldout=max_heldout)
    if not held:
        return None
    n = vol.shape[axis]
    first, last = max(held[0] - margin, 0), min(held[-1] + margin, n - 1)
    tuning = None
    if opts.tune:  # the main fit's choice (deterministic), made on slices outside every QC slab: nested
        from atlasgs_bids.qc.tuning import tune_appearance

        opts, acquisition, tuning = tune_appearance(scaffold, vol, acquisition, target2t1w, opts, qc_every=every,
                                                    qc_max_heldout=max_heldout, qc_margin=margin, device=device)
    run = heldout_fit(scaffold, vol, acquisition, target2t1w, opts, held, (first, last), eligible=eligible,
                      device=device)
    return SelfValidation(**{f.name: getattr(run, f.name) for f in fields(run)}, slice_axis=axis, heldout_slices=held, fit_slices=(first, last),
                          flag=bool(run.gain_psnr_db <= 0.0), seconds=time.perf_counter() - t0, tuning=tuning)


def heldout_fit(scaffold: Scaffold, vol: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray,
                options: AppearanceOptions, held: list[int], slab: tuple[int, int], *,
                eligible: np.ndarray | None = None, region: np.ndarray | None = None,
                edge_mm: float | None = None, device: str | torch.device = "cpu") -> HeldOutRun:
    """Fit the kept slices of ``slab`` (inclusive slice range), predict ``held`` and score both predictions.

    Parameters
    ----------
    scaffold, acquisition, target2t1w, options : as for :func:`self_validate`
    vol : (I, J, K) the target (first volume), its own units and grid
    held : held-out slice indices (along the slice axis), inside ``slab`` and not at its ends
    slab : (first, last) slices of the fit
    eligible : [E, 3] voxels of the brain-mask rule (:func:`fit_voxels`), computed when None
    region : (I, J, K) bool, optional: restrict fitted and scored voxels (and the Gaussians, to those within
        :data:`GAUSSIAN_MARGIN` target voxels of it in plane) to this region, e.g. an in-plane box to bound the
        cost; the edge rule then measures distances to the region's edge too
    edge_mm : held-out voxels nearer the eligible region's edge (in plane) are not scored; default the slice
        thickness of ``acquisition``. Fits compared with each other (the tuning's slice profiles) pass one value,
        so that they are scored on the same voxels
    """
    axis = int(acquisition.slice_axis)
    if eligible is None:
        eligible = fit_voxels(scaffold, acquisition, target2t1w, options)
    if region is not None:
        eligible = eligible[np.asarray(region, dtype=bool)[tuple(eligible.T)]]
    first, last = slab
    is_held = np.zeros(vol.shape[axis], dtype=bool)
    is_held[held] = True
    fit_mask = heldout_fit_mask(vol.shape[:3], axis, held, slab, region)
    vox2t1w = target_vox2t1w(acquisition, target2t1w)
    sub = heldout_scaffold(scaffold, vox2t1w, axis, slab, region)

    t1 = time.perf_counter()
    appearance = fit_appearance(sub, vol, acquisition, target2t1w, options, mask=fit_mask, device=device)
    fit_s = time.perf_counter() - t1

    edge_mm = acquisition.thickness_mm if edge_mm is None else float(edge_mm)
    heldout, inner = scored_heldout(eligible, vol.shape[:3], acquisition, held, edge_mm=edge_mm)
    measured = vol[tuple(heldout.T)]
    ours = predict(appearance, None, heldout, device=device)[:, 0]  # through the profile of the fit
    cub_slices = cubic_along_slices(vol, axis, np.flatnonzero(~is_held), np.asarray(held))
    pos = {s: i for i, s in enumerate(held)}
    idx = heldout.copy()
    idx[:, axis] = [pos[int(s)] for s in heldout[:, axis]]
    cubic = cub_slices[tuple(idx.T)]

    a, c = score(ours[inner], measured[inner]), score(cubic[inner], measured[inner])
    everything = {"atlasgs": asdict(score(ours, measured)), "cubic": asdict(score(cubic, measured)),
                  "n": int(len(heldout))}
    return HeldOutRun(n_fit_slices=int(last - first + 1 - len(held)), n_scored=int(inner.sum()), edge_mm=edge_mm,
                      all_voxels=everything, atlasgs=a, cubic=c, gain_psnr_db=float(a.psnr - c.psnr),
                      fit_seconds=fit_s, n_gaussians=sub.n_gaussians)


def scored_heldout(eligible: np.ndarray, shape: tuple[int, int, int], acquisition: Acquisition,
                   held: list[int], *, edge_mm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out voxels [H, 3] (the ``eligible`` ones on slices ``held``) and which are scored [H] bool: those at
    least ``edge_mm`` (default the slice thickness of ``acquisition``) inside the eligible region's edge, in plane
    (every one when fewer than 16 are)."""
    axis = int(acquisition.slice_axis)
    is_held = np.zeros(shape[axis], dtype=bool)
    is_held[list(held)] = True
    heldout = eligible[is_held[eligible[:, axis]]]
    edge_mm = acquisition.thickness_mm if edge_mm is None else float(edge_mm)
    inner = edge_distance_mm(eligible, shape, acquisition, heldout) >= edge_mm
    if inner.sum() < 16:  # a thin brain section: score every held-out voxel rather than none
        inner[:] = True
    return heldout, inner


def heldout_fit_mask(shape: tuple[int, int, int], axis: int, held: list[int], slab: tuple[int, int],
                     region: np.ndarray | None = None) -> np.ndarray:
    """(I, J, K) bool: the kept slices of ``slab`` (first, last; inclusive), minus ``held``, within ``region``."""
    kept = np.zeros(shape[axis], dtype=bool)
    kept[slab[0]:slab[1] + 1] = True
    kept[list(held)] = False
    view = [1, 1, 1]
    view[axis] = shape[axis]
    mask = np.broadcast_to(kept.reshape(view), shape)
    return mask & np.asarray(region, dtype=bool) if region is not None else mask


def heldout_scaffold(scaffold: Scaffold, vox2t1w: np.ndarray, axis: int, slab: tuple[int, int],
                     region: np.ndarray | None = None) -> Scaffold:
    """The Gaussians a held-out fit on ``slab`` (and ``region``) can see, one object per slab and region.

    One subset object per slab and region (``Scaffold.cached``), so that fits on the same slab (the tuning's
    candidates, the SD calibration) share its geometry-only quantities (lattice layout, neighbours, overlap
    normaliser).
    """
    first, last = slab

    def subset() -> Scaffold:
        part = slab_scaffold(scaffold, vox2t1w, axis, first - GAUSSIAN_MARGIN, last + GAUSSIAN_MARGIN)
        return part if region is None else _region_scaffold(part, vox2t1w, region, axis)

    key = hashlib.sha1(np.asarray(vox2t1w, dtype=np.float64).tobytes() + np.array([axis, first, last]).tobytes()
                       + (np.packbits(np.asarray(region, dtype=bool)).tobytes() if region is not None else b"")).hexdigest()
    return scaffold.cached(f"slab:{key}", subset)


def _region_scaffold(scaffold: Scaffold, vox2t1w: np.ndarray, region: np.ndarray, axis: int) -> Scaffold:
    """Gaussians whose mean, in target voxel coordinates, lies within :data:`GAUSSIAN_MARGIN` voxels (in plane)
    of the in-plane bounding box of ``region`` (I, J, K) bool."""
    inplane = [a for a in range(3) if a != axis]
    nz = np.argwhere(region)
    lo, hi = nz.min(0) - GAUSSIAN_MARGIN, nz.max(0) + GAUSSIAN_MARGIN
    to_vox = np.linalg.inv(np.asarray(vox2t1w, dtype=np.float64))
    means = scaffold.means.detach().cpu().numpy().astype(np.float64)
    t = means @ to_vox[:3, :3].T + to_vox[:3, 3]
    keep = np.all((t[:, inplane] >= lo[inplane]) & (t[:, inplane] <= hi[inplane]), axis=1)
    return subset_scaffold(scaffold, np.flatnonzero(keep))

"""Stage-2 hyperparameters chosen from the target's own held-out slices, nested away from the QC slices.

Why: lambda = 0.003 with no weight floor was tuned on the noiseless MNI152 template; on a real scan (noise in the
target and in the T1w, vessels, sulci) the same values let isolated Gaussians run away between slices (issue 12).
What fits one target is measured on that target:

1. Noise. The target's noise SD is estimated from its own slices (:func:`~atlasgs_bids.imaging.noise.noise_sigma_inplane`,
   inside the fitted voxels, normalised like the fit). It sets the centre of the lambda grid:
   ``lam_c`` = :func:`~atlasgs_bids.gaussians.appearance.noise_set_lambda` (``max(options.lam, 100 sigma_n^2)``).
2. Held-out slices. A slab of ``TUNE_HELDOUT`` held-out slices (one when a target of few thick slices leaves no
   room for more), every ``TUNE_EVERY``-th, with kept slices around them, in an in-plane box of ``box_mm``
   (bounds the cost), chosen OUTSIDE every slab the QC self-validation
   (:func:`~atlasgs_bids.qc.selfval.self_validate`, any seed) can use: the slices that choose cannot be the
   slices that score. Candidates are fitted on the kept slices and scored on the held-out ones (PSNR, through the
   target's slice profile, :func:`~atlasgs_bids.qc.selfval.heldout_fit`).
3. Search. Coordinate search: the through-plane slice profile over :data:`PROFILE_CANDIDATES` at ``lam_c`` and
   the preset's floor (the header's Gaussian of FWHM = SliceThickness first: the incumbent), then the Laplacian
   weight floor over :data:`FLOOR_GRID` at ``lam_c``, then lambda over ``lam_c x`` :data:`LAM_FACTORS` at the
   chosen floor; the incumbent's fit is shared, so 3 + ``len(profiles)`` fits. A candidate replaces the default
   (the header's profile, the preset's floor, 0, and ``lam_c``) only when its held-out PSNR is higher by more than
   :data:`MIN_GAIN_DB` (a few held-out slices are a noisy score, and one that favours smoothing: a held-out slice is
   two spacings from its kept neighbours, the real task one). The profile is chosen first because a wrong
   profile is a model error that lambda would otherwise be tuned to hide (docs/adr/0009).

When no such slab exists (a thin target, or one whose brain lies within the QC slabs) the noise-set ``lam_c`` and
the preset's floor are used, and the record says why (``chosen`` is None).
"""
from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_voxels, noise_set_lambda
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.intensity import fit_intensity_scale
from atlasgs_bids.imaging.noise import noise_sigma_inplane
from atlasgs_bids.qc import selfval


@dataclass(frozen=True)
class ProfileCandidate:
    """A through-plane slice profile, relative to the header's width ``t`` (:meth:`Acquisition.with_profile`).

    name : label in the records; profile : "gaussian" or "box"; width : Gaussian FWHM or box width, in units of
    ``t``; edge : the box's soft-edge FWHM (a Gaussian convolved with it), in units of ``t``
    """

    name: str
    profile: str
    width: float = 1.0
    edge: float = 0.0

    def apply(self, acquisition: Acquisition) -> Acquisition:
        """``acquisition``'s grid with this profile, marked as chosen from the data."""
        acq = acquisition.with_profile(self.profile, width=self.width, edge=self.edge)
        return replace(acq, meta={**acq.meta, "profile_from_data": True, "profile_candidate": self.name})


#: Slice profiles tried besides the header's (which is the incumbent, as given). A hard box of width t (an ideal
#: 2D multi-slice excitation); a box with soft edges of FWHM t/2 (real excitations; the AtlasGS simulation's block
#: mean after a blur has soft edges of FWHM 0.78 t at x3, 0.47 t at x5); a narrower Gaussian. Wider Gaussians
#: (1.25 t, 1.5 t) lost on the MNI152 truth and on bids-chris's removed slices (docs/bench/profile.md).
PROFILE_CANDIDATES = (ProfileCandidate("box", "box"), ProfileCandidate("box-soft", "box", edge=0.5),
                      ProfileCandidate("gaussian-0.8", "gaussian", width=0.8))

#: Floors of the T1w-similarity factor of the Laplacian weights tried.
FLOOR_GRID = (0.0, 0.01)
#: Multiples of lam_c tried (at the best floor); 1 is tried with the floors.
LAM_FACTORS = (1.0 / 3.0, 3.0)
#: Held-out slices of the tuning slab, their spacing, and kept slices beyond the outermost ones.
TUNE_HELDOUT, TUNE_EVERY, TUNE_MARGIN = 2, 2, 1
#: A candidate replaces the default (the preset's floor, lambda lam_c) only when its held-out PSNR is this much
#: higher (dB).
MIN_GAIN_DB = 0.1
#: In-plane side (mm) of the tuning box.
BOX_MM = 80.0


def qc_slices(counts: np.ndarray, *, every: int = selfval.EVERY, max_heldout: int = selfval.MAX_HELDOUT,
              margin: int = selfval.MARGIN) -> np.ndarray:
    """(K,) bool: slices inside any slab :func:`~atlasgs_bids.qc.selfval.self_validate` may fit (every phase)."""
    n = len(counts)
    out = np.zeros(n, dtype=bool)
    for phase in range(every):
        held = selfval.choose_heldout_slices(counts, every=every, max_heldout=max_heldout, phase=phase)
        if held:
            out[max(held[0] - margin, 0):min(held[-1] + margin, n - 1) + 1] = True
    return out


def tuning_slab(counts: np.ndarray, excluded: np.ndarray, *, n_heldout: int = TUNE_HELDOUT,
                every: int = TUNE_EVERY, margin: int = TUNE_MARGIN) -> tuple[list[int], tuple[int, int]] | None:
    """Held-out slices and (first, last) slab for tuning: all slab slices see brain, none is ``excluded``.

    Among the admissible positions the slab with the most brain voxels is taken (ties: the lowest index).

    >>> tuning_slab(np.array([0, 5, 9, 9, 9, 9, 9, 9, 0, 0]), np.zeros(10, dtype=bool))
    ([3, 5], (2, 6))
    """
    counts = np.asarray(counts)
    length = (n_heldout - 1) * every + 1 + 2 * margin
    best, best_sum = None, -1
    for first in range(0, len(counts) - length + 1):
        sl = slice(first, first + length)
        if np.any(counts[sl] <= 0) or np.any(excluded[sl]):
            continue
        total = int(counts[sl].sum())
        if total > best_sum:
            best, best_sum = first, total
    if best is None:
        return None
    held = [best + margin + i * every for i in range(n_heldout)]
    return held, (best, best + length - 1)


def heldout_slab(eligible: np.ndarray, shape: tuple[int, ...], acquisition: Acquisition, *, box_mm: float = BOX_MM,
                 qc_every: int = selfval.EVERY, qc_max_heldout: int = selfval.MAX_HELDOUT,
                 qc_margin: int = selfval.MARGIN) -> tuple[list[int], tuple[int, int], np.ndarray] | None:
    """The held-out slab of a target outside every QC slab (:func:`tuning_slab`): its held-out slices, its (first,
    last) slices and its in-plane region (:func:`inplane_box`, (I, J, K) bool); None when there is none. When no
    slab of :data:`TUNE_HELDOUT` held-out slices fits, one of a single held-out slice is taken.
    ``eligible`` [E, 3]: the target voxels of the brain-mask rule (:func:`fit_voxels`)."""
    axis = int(acquisition.slice_axis)
    counts = np.bincount(eligible[:, axis], minlength=shape[axis])
    excluded = qc_slices(counts, every=qc_every, max_heldout=qc_max_heldout, margin=qc_margin)
    # A target of few thick slices (x7: 22 brain slices) may leave no 5-slice slab beside the QC's: one held-out
    # slice between two kept ones still scores the candidates (ADR 0011), better than no choice at all.
    slab = tuning_slab(counts, excluded) or tuning_slab(counts, excluded, n_heldout=1)
    if slab is None:
        return None
    held, (first, last) = slab
    return held, (first, last), inplane_box(eligible, shape, axis, acquisition.zooms, first, last, box_mm)


def tune_appearance(scaffold: Scaffold, data: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray,
                    options: AppearanceOptions, *, box_mm: float = BOX_MM, qc_every: int = selfval.EVERY,
                    qc_max_heldout: int = selfval.MAX_HELDOUT, qc_margin: int = selfval.MARGIN,
                    profiles: tuple[ProfileCandidate, ...] = PROFILE_CANDIDATES,
                    device: str | torch.device = "cpu") -> tuple[AppearanceOptions, Acquisition, dict]:
    """Choose the slice profile, ``lam`` and ``w_floor`` for one target from its own held-out slices (see the
    module docstring).

    Parameters
    ----------
    scaffold : stage-1 result (T1w world mm RAS)
    data : (I, J, K) or (I, J, K, V) the target, own units and grid (a series is tuned on its first volume)
    acquisition, target2t1w : the target's acquisition model from its header (the incumbent profile) and target
        world -> T1w world (mm RAS)
    options : the preset; its other fields are kept
    box_mm : in-plane side of the tuning region (mm)
    qc_every, qc_max_heldout, qc_margin : the QC self-validation's settings, whose slabs are excluded
    profiles : slice profiles tried against the header's; () keeps the header's without a fit

    Returns
    -------
    (options with the chosen ``lam`` and ``w_floor`` and ``tune=False``; the acquisition to fit through: the
    header's, or its grid with the chosen profile (``meta["profile_from_data"]``); a JSON-safe record: noise
    estimate, ``lam_centre``, slab, every candidate's held-out PSNR/NCC (``profile_psnr``: per profile), the choice,
    seconds; ``chosen`` is None when no held-out search ran, and then ``lam`` is ``lam_centre`` and the profile the
    header's)
    """
    t0 = time.perf_counter()
    base = replace(options, tune=False, noise_lam=False)  # the candidates' lambdas are used as they are
    vol = np.asarray(data, dtype=np.float32)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    axis = int(acquisition.slice_axis)
    eligible = fit_voxels(scaffold, acquisition, target2t1w, base)
    record: dict = {"method": "held-out slices outside the QC slabs; coordinate search over w_floor then lam",
                    "chosen": None}
    if len(eligible) < 100:
        record["reason"] = "too few target voxels in the brain mask"
        return base, acquisition, record
    fitted = np.zeros(vol.shape, dtype=bool)
    fitted[tuple(eligible.T)] = True
    scale = fit_intensity_scale(vol[fitted]).scale
    sigma = noise_sigma_inplane(vol, fitted, axis)
    sigma_n = sigma / scale
    lam_c = noise_set_lambda(options.lam, sigma_n)
    record.update(noise_sigma=sigma, noise_sigma_normalised=sigma_n, lam_centre=lam_c)

    slab = heldout_slab(eligible, vol.shape, acquisition, box_mm=box_mm, qc_every=qc_every,
                        qc_max_heldout=qc_max_heldout, qc_margin=qc_margin)
    if slab is None:
        record["reason"] = "no slab of brain slices outside the QC self-validation slabs"
        return replace(base, lam=lam_c), acquisition, record
    held, (first, last), region = slab
    record.update(heldout_slices=held, fit_slices=[first, last], box_mm=box_mm)

    tried: list[dict] = []

    def trial(lam: float, w_floor: float, acq: Acquisition, profile: str) -> float:
        opts = replace(base, lam=lam, w_floor=w_floor)
        run = selfval.heldout_fit(scaffold, vol, acq, target2t1w, opts, held, (first, last),
                                  eligible=eligible, region=region, edge_mm=acquisition.thickness_mm,
                                  device=device)
        tried.append({"lam": lam, "w_floor": w_floor, "profile": profile, "psnr": run.atlasgs.psnr,
                      "ncc": run.atlasgs.ncc, "cubic_psnr": run.cubic.psnr, "n_scored": run.n_scored,
                      "seconds": run.fit_seconds})
        return run.atlasgs.psnr

    # 1. the slice profile, at the centre lambda and the preset's floor; "header" is the incumbent
    shapes = {"header": acquisition, **{c.name: c.apply(acquisition) for c in profiles}}
    by_profile = {name: trial(lam_c, base.w_floor, acq, name) for name, acq in shapes.items()}
    p_best = _clear_winner(by_profile, "header")
    acq_best = shapes[p_best]
    # 2. the floor (the preset's was scored with the chosen profile), 3. lambda at that floor
    floors = {base.w_floor: by_profile[p_best]}
    floors.update({f: trial(lam_c, f, acq_best, p_best) for f in sorted(set(FLOOR_GRID) - {base.w_floor})})
    w_best = _clear_winner(floors, base.w_floor)
    lams = {lam_c: floors[w_best]}
    lams.update({lam_c * k: trial(lam_c * k, w_best, acq_best, p_best) for k in LAM_FACTORS})
    lam_best = _clear_winner(lams, lam_c)
    record.update(tried=tried, profiles={c.name: asdict(c) for c in profiles}, profile_psnr=by_profile,
                  chosen={"lam": lam_best, "w_floor": w_best, "profile_candidate": p_best,
                          **acq_best.profile_record()},
                  seconds=time.perf_counter() - t0)
    return replace(base, lam=lam_best, w_floor=w_best), acq_best, record


def _clear_winner(scores: dict[Hashable, float], incumbent: Hashable) -> Hashable:
    """The best-scoring key if it beats ``incumbent``'s score by more than :data:`MIN_GAIN_DB`, else ``incumbent``.

    Held-out PSNR on a few slices is a noisy proxy (measured on the noiseless MNI152 x5 crop: floors 0 / 0.01 / 0.03
    scored 29.10 / 29.17 / 29.23 dB on the tuning slices while a floor of 0.01 / 0.03 cost 0.2 / 0.6-1.8 dB against
    the truth; on bids-chris the floor 0.01 won by 0.44 dB on the tuning slices and gained 0.5-1 dB on removed
    slices), so a setting other than the default must win clearly.
    """
    best = max(scores, key=scores.get)
    return best if scores[best] > scores[incumbent] + MIN_GAIN_DB else incumbent


def inplane_box(eligible: np.ndarray, shape: tuple[int, ...], axis: int, zooms: np.ndarray, first: int, last: int,
                 box_mm: float) -> np.ndarray:
    """(I, J, K) bool: an in-plane box of ``box_mm`` centred on the brain voxels of slices first..last."""
    inplane = [a for a in range(3) if a != axis]
    on = eligible[(eligible[:, axis] >= first) & (eligible[:, axis] <= last)]
    centre = np.round(on[:, inplane].mean(0)).astype(int)
    region = np.zeros(shape[:3], dtype=bool)
    sl = [slice(None)] * 3
    for a, c in zip(inplane, centre):
        half = int(round(box_mm / 2.0 / float(zooms[a])))
        sl[a] = slice(max(c - half, 0), c + half + 1)
    region[tuple(sl)] = True
    return region


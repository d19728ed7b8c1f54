"""Does the held-out score choose the slice profile that is best against the truth? (docs/bench/profile.md)

For each MNI152 case (a central in-plane column, full z) the target gets the app's header model (Gaussian,
FWHM = slice spacing); :func:`atlasgs_bids.qc.tuning.tune_appearance` scores every profile candidate on its
held-out slices, and a full fit through each candidate (lambda and floor as tuned) is scored against the 1 mm
truth. ``header_alone`` is the header's profile with lambda and floor tuned as before this choice existed
(``profiles=()``: the split between the header model and the profile choice), and ``tuning_seconds_before`` its
tuning time. ``--crop 0`` runs the full volume. ``hardbox`` is an extra degradation, not in the benchmark: the
mean of blocks of ``factor`` slices without blur (an ideal box of width = spacing).

Usage::

    OMP_NUM_THREADS=1 python scripts/profile_choice.py --crop 64 --factors 3 5 --degradations atlasgs gaussian \
        hardbox --snr none 30 --out profile_choice.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import nibabel as nib
import numpy as np

from atlasgs_bids.bench import cases
from atlasgs_bids.gaussians.appearance import AppearanceOptions
from atlasgs_bids.gaussians.scaffold import lattice_scaffold
from atlasgs_bids.harmonize import HarmonizeOptions, harmonize
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.qc import tuning


def hard_box_case(sub: cases.Subject, factor: int) -> cases.Case:
    """Block means of ``factor`` slices along axis 2 (T2w and T1w), centred on the blocks' middles."""
    n = sub.shape[2] // factor
    index_map = np.diag([1.0, 1.0, float(factor), 1.0])
    index_map[2, 3] = (factor - 1) / 2.0
    aff = sub.affine @ index_map

    def blocks(v: np.ndarray) -> np.ndarray:
        return v[:, :, :n * factor].reshape(*v.shape[:2], n, factor).mean(-1).astype(np.float32)

    acq = Acquisition(aff, (*sub.shape[:2], n), (1.0, 1.0, 1.0), slice_axis=2, profile="box")
    return cases.Case(factor=factor, degradation="hardbox", thick=blocks(sub.t2w), thick_t1w=blocks(sub.t1w),
                      thick_affine=aff, acquisition=acq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/mni152-hcp")
    ap.add_argument("--crop", type=int, default=64, help="in-plane column side (voxels); 0: the full volume")
    ap.add_argument("--factors", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--degradations", nargs="+", default=["atlasgs", "gaussian", "hardbox"])
    ap.add_argument("--snr", nargs="+", default=["none"], help="'none' or SNR values (Rician, as the bench)")
    ap.add_argument("--out", default="profile_choice.json")
    args = ap.parse_args()
    sub = cases.load_subject(args.data, crop=args.crop or None)
    sc = lattice_scaffold(sub.t1w, sub.affine, sub.mask)
    ref = nib.Nifti1Image(sub.t1w, sub.affine)
    rows = []
    for factor in args.factors:
        for deg in args.degradations:
            clean = hard_box_case(sub, factor) if deg == "hardbox" else cases.make_case(sub, factor, deg)
            for snr in args.snr:
                case = clean if snr == "none" else cases.add_rician_noise(clean, float(snr), seed=0)
                header = Acquisition.from_geometry(case.thick_affine, case.thick.shape)
                t0 = time.perf_counter()
                opts, _, rec = tuning.tune_appearance(sc, case.thick, header, np.eye(4),
                                                      AppearanceOptions.preset("default"))
                seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                opts_alone, _, _ = tuning.tune_appearance(sc, case.thick, header, np.eye(4),
                                                          AppearanceOptions.preset("default"), profiles=())
                seconds_before = time.perf_counter() - t0
                shapes = {"header": (header, opts), "header_alone": (header, opts_alone),
                          **{c.name: (c.apply(header), opts) for c in tuning.PROFILE_CANDIDATES},
                          "simulation": (case.acquisition, opts)}
                truth = {}
                for name, (acq, fit_opts) in shapes.items():
                    out = harmonize(sc, nib.Nifti1Image(case.thick, case.thick_affine), np.eye(4), ref, sub.mask,
                                    HarmonizeOptions(appearance=replace(fit_opts, tune=False)), acquisition=acq)
                    truth[name] = round(cases.psnr(np.asarray(out.image.dataobj), sub.t2w, sub.mask), 3)
                n_profiles = 1 + len(tuning.PROFILE_CANDIDATES)
                rows.append({"factor": factor, "case": case.label,
                             "heldout_psnr": {k: round(v, 3) for k, v in rec["profile_psnr"].items()},
                             "truth_psnr": truth, "chosen": rec["chosen"], "tuning_seconds": round(seconds, 1),
                             "tuning_seconds_before": round(seconds_before, 1), "lam_alone": opts_alone.lam,
                             "fit_seconds_profiles": round(sum(t["seconds"] for t in rec["tried"][1:n_profiles]), 1),
                             "fit_seconds_all": round(sum(t["seconds"] for t in rec["tried"]), 1)})
                print(json.dumps(rows[-1]), flush=True)
                with open(args.out, "w") as fh:
                    json.dump({"crop": args.crop, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

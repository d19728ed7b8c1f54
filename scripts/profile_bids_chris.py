"""bids-chris: which slice profile do the PDw's own slices favour? (docs/bench/profile.md)

Reads a finished participant run (``OUT`` = its output folder: scaffold, brain mask, PDw -> T1w transform) and

1. scores wider Gaussians (1.25 t, 1.5 t) against the header's on the app's tuning slab
   (:func:`atlasgs_bids.qc.tuning.tune_appearance` with those candidates);
2. checks every profile on the removed-slice experiment (:mod:`atlasgs_bids.bench.removed_slices`: every second
   slice of another slab removed, fitted on the rest, the removed slices predicted), lambda and floor fixed to the
   run's tuned values.

Usage: ``OMP_NUM_THREADS=1 python scripts/profile_bids_chris.py /work/shared/data/bids-chris OUT LAM FLOOR``
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np

from atlasgs_bids.bench.removed_slices import CHRIS_PDW, RealPair, make_removed_slice_case, run_removed_slice_case
from atlasgs_bids.gaussians.appearance import AppearanceOptions
from atlasgs_bids.gaussians.io import load_scaffold
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.transforms import read_target2t1w
from atlasgs_bids.qc.tuning import PROFILE_CANDIDATES, ProfileCandidate, tune_appearance

WIDER = (ProfileCandidate("gaussian-1.25", "gaussian", width=1.25), ProfileCandidate("gaussian-1.5", "gaussian",
                                                                                        width=1.5))


def main(bids: str, out: str, lam: float, floor: float) -> None:
    anat = f"{out}/sub-chris/anat/sub-chris_"
    pd = nib.load(f"{bids}/{CHRIS_PDW}")
    data = pd.get_fdata(dtype=np.float32)
    target2t1w = read_target2t1w(anat + "from-PDw_to-T1w_mode-image_xfm.txt")
    header = Acquisition.from_geometry(pd.affine, data.shape)
    _, _, rec = tune_appearance(load_scaffold(anat + "desc-atlasgs_gaussians.npz"), data, header, target2t1w,
                                AppearanceOptions.preset("default"), profiles=WIDER)
    print("tuning slab, held-out PSNR:", json.dumps(rec["profile_psnr"]), flush=True)
    t1 = nib.load(anat + "desc-preproc_T1w.nii.gz")
    pair = RealPair(t1w=t1.get_fdata(dtype=np.float32), t1w_affine=np.asarray(t1.affine, np.float64),
                    mask=np.asarray(nib.load(anat + "desc-brain_mask.nii.gz").dataobj) > 0, target=data,
                    target_affine=np.asarray(pd.affine, np.float64), target2t1w=target2t1w)
    case = make_removed_slice_case(pair)
    opts = replace(AppearanceOptions.preset("default"), tune=False, noise_lam=False, lam=lam, w_floor=floor)
    for cand in (None, *PROFILE_CANDIDATES, *WIDER):
        c = case if cand is None else replace(case, kept_acquisition=cand.apply(case.kept_acquisition))
        r = run_removed_slice_case(c, opts, render_output=False)
        print("removed slices:", "header" if cand is None else cand.name,
              json.dumps({"psnr": r["atlasgs"]["psnr"], "cubic_psnr": r["cubic"]["psnr"], "n": r["n_scored"]}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))

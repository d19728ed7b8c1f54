"""Removed-slice experiment on a real pair: drop every second target slice, predict it, score against the truth.

Real data have no isotropic truth, but a thick-slice target has its own slices: keep the even slices of a slab
(slice spacing doubled, slice thickness unchanged: gapped slices), fit stage 2 on them, and predict the removed
odd slices through the target's own slice profile (:func:`~atlasgs_bids.gaussians.appearance.predict`). Cubic
interpolation along the slice axis of the kept slices (:func:`~atlasgs_bids.qc.selfval.cubic_along_slices`) is the
baseline on the same voxels. This is the experiment of issue 12 on bids-chris (PDw 0.86 x 0.86 x 2.4 mm), made
cheap: the scaffold is a lattice on an in-plane crop of the T1w (``crop_vox`` T1w voxels square) and the slab is
``n_kept`` kept slices, so one fit takes a minute on one CPU thread instead of the whole brain's six.

Frames: the T1w is the reference (voxel index -> T1w world mm RAS by its affine); the target's voxels go to its
world by its affine and to the T1w world by ``target2t1w`` (from :func:`atlasgs_bids.imaging.registration.register_rigid`).
Scored voxels: removed-slice voxels of the brain-mask rule (:func:`~atlasgs_bids.gaussians.appearance.fit_voxels`)
whose centre lies at least ``inset_mm`` inside the crop in plane (the crop's faces are artificial edges).

Also reported, on the fit over the kept slices rendered on the T1w crop (the output a user would get): the number
of rendered brain voxels below zero, the minimum and maximum, and the target's own 99.9th percentile over the
fitted voxels (issue 12's bound: maximum <= 1.1 x that percentile).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from nibabel.affines import voxel_sizes

from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance, fit_voxels, predict
from atlasgs_bids.gaussians.render import render
from atlasgs_bids.gaussians.scaffold import Scaffold, lattice_scaffold
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.presets import QUALITIES
from atlasgs_bids.qc.selfval import cubic_along_slices, score

#: bids-chris files, relative to the dataset root.
CHRIS_T1W = "sub-chris/anat/sub-chris_T1w.nii.gz"
CHRIS_PDW = "sub-chris/anat/sub-chris_PDw.nii.gz"


@dataclass(frozen=True)
class RealPair:
    """A T1w (reference) and a thick-slice target of the same subject, with the mask and the registration.

    t1w : float32 (I, J, K), scanner units; t1w_affine : (4, 4) voxel -> T1w world mm RAS
    mask : bool (I, J, K), brain mask on the T1w grid
    target : float32 (I', J', K'), scanner units; target_affine : (4, 4) voxel -> target world mm RAS
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS
    """

    t1w: np.ndarray
    t1w_affine: np.ndarray
    mask: np.ndarray
    target: np.ndarray
    target_affine: np.ndarray
    target2t1w: np.ndarray


def load_bids_chris(root: str | Path, cache_dir: str | Path) -> RealPair:
    """bids-chris T1w and PDw, the T1w brain mask (deepbet) and the PDw -> T1w rigid registration (antspyx).

    The mask and the transform are computed once (about 20 s on one thread) and cached in ``cache_dir``
    (``chris_mask.npy``, ``chris_target2t1w.txt``); delete them to recompute.
    """
    import nibabel as nib

    root, cache = Path(root), Path(cache_dir)
    t1_img = nib.load(str(root / CHRIS_T1W))
    pd_img = nib.load(str(root / CHRIS_PDW))
    cache.mkdir(parents=True, exist_ok=True)
    mask_file, xfm_file = cache / "chris_mask.npy", cache / "chris_target2t1w.txt"
    if mask_file.is_file() and xfm_file.is_file():
        mask = np.load(mask_file)
        target2t1w = np.loadtxt(xfm_file)
    else:
        from atlasgs_bids.imaging.brainmask import brain_mask
        from atlasgs_bids.imaging.registration import register_rigid

        mask_img = brain_mask(t1_img)
        mask = np.asarray(mask_img.dataobj) > 0
        target2t1w = register_rigid(t1_img, pd_img, fixed_mask=mask_img, threads=1).target2t1w
        np.save(mask_file, mask)
        np.savetxt(xfm_file, target2t1w)
    return RealPair(t1w=t1_img.get_fdata(dtype=np.float32), t1w_affine=np.asarray(t1_img.affine, np.float64),
                    mask=mask, target=pd_img.get_fdata(dtype=np.float32),
                    target_affine=np.asarray(pd_img.affine, np.float64), target2t1w=np.asarray(target2t1w))


@dataclass(frozen=True)
class RemovedSliceCase:
    """One removed-slice experiment (see the module docstring).

    scaffold : lattice on the T1w crop (T1w world mm RAS)
    crop_affine, crop_mask : the crop's voxel -> T1w world mm RAS and its brain mask (the render grid)
    kept, kept_acquisition : the kept slices as their own image (slice spacing doubled, thickness unchanged)
    full_acquisition : the target's own acquisition (predicts the removed slices)
    removed_ijk : [M, 3] scored voxels of the removed slices, full target indices
    kept_slices, removed_slices : slice indices along the slice axis (full target)
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS
    target : the full target (its removed slices are the truth)
    """

    scaffold: Scaffold
    crop_affine: np.ndarray
    crop_mask: np.ndarray
    kept: np.ndarray
    kept_acquisition: Acquisition
    full_acquisition: Acquisition
    removed_ijk: np.ndarray
    kept_slices: np.ndarray
    removed_slices: np.ndarray
    target2t1w: np.ndarray
    target: np.ndarray


def make_removed_slice_case(pair: RealPair, *, first_slice: int = 26, n_kept: int = 5,
                            crop_centre_vox: tuple[int, int] = (64, 120), crop_vox: int = 56,
                            inset_mm: float = 3.0) -> RemovedSliceCase:
    """Build the experiment: kept target slices ``first_slice, first_slice + 2, ...`` (``n_kept`` of them).

    Parameters
    ----------
    pair : the real pair (:func:`load_bids_chris`)
    first_slice : first kept slice (target slice axis index); the removed ones lie between kept ones
    n_kept : kept slices (>= 3); ``n_kept - 1`` removed slices are scored
    crop_centre_vox, crop_vox : in-plane centre (T1w voxel axes 0, 1) and side of the square T1w crop (voxels);
        along T1w axis 2 the crop covers the slab plus one target slice spacing on each side
    inset_mm : scored voxels lie at least this far inside the crop in plane
    """
    if n_kept < 3:
        raise ValueError(f"n_kept must be >= 3, got {n_kept}")
    full = Acquisition.from_geometry(pair.target_affine, pair.target.shape)
    axis = full.slice_axis
    kept_slices = np.arange(first_slice, first_slice + 2 * n_kept - 1, 2)
    removed = kept_slices[:-1] + 1
    if kept_slices[-1] >= pair.target.shape[axis]:
        raise ValueError(f"slab {first_slice}..{kept_slices[-1]} beyond the target's {pair.target.shape[axis]} slices")

    # T1w crop: in plane a square, along axis 2 the slab's extent (+ one slice spacing) in T1w voxels.
    vox2t1w = pair.target2t1w @ pair.target_affine
    corners = np.array([[i, j, k, 1.0] for i in (0, pair.target.shape[0] - 1) for j in (0, pair.target.shape[1] - 1)
                        for k in (kept_slices[0] - 1, kept_slices[-1] + 1)])
    t1_k = (np.linalg.inv(pair.t1w_affine) @ vox2t1w @ corners.T)[2]
    lo = np.array([crop_centre_vox[0] - crop_vox // 2, crop_centre_vox[1] - crop_vox // 2, int(np.floor(t1_k.min()))])
    hi = np.array([lo[0] + crop_vox, lo[1] + crop_vox, int(np.ceil(t1_k.max())) + 1])
    lo, hi = np.maximum(lo, 0), np.minimum(hi, pair.t1w.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    crop_affine = pair.t1w_affine @ shift
    crop_mask = pair.mask[box]
    scaffold = lattice_scaffold(pair.t1w[box], crop_affine, crop_mask)

    kept = np.ascontiguousarray(np.take(pair.target, kept_slices, axis=axis))
    step = np.eye(4)
    step[axis, axis] = 2.0
    step[axis, 3] = first_slice
    fwhm = list(full.fwhm_vox)
    fwhm[axis] = full.fwhm_vox[axis] / 2.0  # same thickness, twice the spacing
    kept_acq = Acquisition(affine=full.affine @ step, shape=kept.shape, fwhm_vox=tuple(fwhm), slice_axis=axis,
                           profile=full.profile)

    # Scored voxels: removed slices, brain-mask rule, inset from the crop's faces in plane.
    eligible = fit_voxels(scaffold, full, pair.target2t1w)
    ijk = eligible[np.isin(eligible[:, axis], removed)]
    t1_ijk = (np.linalg.inv(crop_affine) @ vox2t1w @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    inset = inset_mm / float(voxel_sizes(pair.t1w_affine)[0])
    inside = np.all((t1_ijk[:, :2] >= inset) & (t1_ijk[:, :2] <= np.array(crop_mask.shape[:2]) - 1 - inset), axis=1)
    return RemovedSliceCase(scaffold=scaffold, crop_affine=crop_affine, crop_mask=crop_mask, kept=kept,
                            kept_acquisition=kept_acq, full_acquisition=full, removed_ijk=ijk[inside],
                            kept_slices=kept_slices, removed_slices=removed, target2t1w=pair.target2t1w,
                            target=pair.target)


def run_removed_slice_case(case: RemovedSliceCase, options: AppearanceOptions | None = None, *,
                           render_output: bool = True) -> dict:
    """Fit on the kept slices, score the removed ones against cubic; report the output's range.

    Returns a JSON-safe dict: ``atlasgs`` and ``cubic`` scores (PSNR dB with the measured range, NCC, MAE in
    target units) on the removed voxels, ``gain_psnr_db``, ``n_scored``, the fit's ``seconds`` and
    ``diagnostics`` (noise estimate, chosen values), and with ``render_output`` the rendered crop's ``n_negative``
    (brain voxels < 0), ``min``, ``max`` and the target's ``p999`` over the fitted voxels.
    """
    opts = options or AppearanceOptions.preset("default")
    t0 = time.perf_counter()
    app = fit_appearance(case.scaffold, case.kept, case.kept_acquisition, case.target2t1w, opts)
    fit_s = time.perf_counter() - t0
    axis = case.full_acquisition.slice_axis
    ijk = case.removed_ijk
    measured = case.target[tuple(ijk.T)]
    # The fit's geometry is the kept image's; the removed slices are indexed in the full target's grid.
    full_geometry = replace(app, target_vox2t1w=case.target2t1w @ case.full_acquisition.affine)
    ours = predict(full_geometry, case.full_acquisition, ijk)[:, 0]
    cub = cubic_along_slices(case.target, axis, case.kept_slices, case.removed_slices)
    pos = {int(s): i for i, s in enumerate(case.removed_slices)}
    idx = ijk.copy()
    idx[:, axis] = [pos[int(s)] for s in ijk[:, axis]]
    cubic = cub[tuple(idx.T)]
    a, c = score(ours, measured), score(cubic, measured)
    diag = {k: v for k, v in app.diagnostics.items() if k != "history"}
    out = {"atlasgs": asdict(a), "cubic": asdict(c), "gain_psnr_db": a.psnr - c.psnr,
           "gain_ncc": a.ncc - c.ncc, "n_scored": int(len(ijk)), "seconds": fit_s, "diagnostics": diag}
    if render_output:
        vol = render(app, case.crop_affine, case.crop_mask.shape, mask=case.crop_mask)
        inside = vol[case.crop_mask & (vol != 0)]
        fitted = case.kept[tuple(app.fitted_ijk.T)]
        out.update(n_negative=int((inside < 0).sum()), min=float(inside.min()), max=float(inside.max()),
                   p999=float(np.percentile(fitted, 99.9)), n_rendered=int(inside.size))
    return out


def coronal_band_figure(pair: RealPair, path: str | Path, options: dict[str, AppearanceOptions], *,
                        y_centre: int = 128, half_width: int = 10) -> dict:
    """A through-plane (coronal) view of stage 2 on the whole target, one panel per set of options, side by side,
    after a panel of cubic interpolation of the target (what the thick slices themselves show).

    The scaffold is a lattice on a coronal band of the T1w (voxel axis 1 in ``y_centre +- half_width``, the whole
    brain in the other two axes), so one fit costs about a minute instead of the whole brain's six; the panel is the
    band's middle coronal plane rendered on the T1w grid (thick slices of the PDw run across it). Grey scale from
    the target's 5th to its 99.9th percentile (fitted voxels); values outside are saturated, and the title gives
    the panel's range. Returns {name: {"min", "max", "n_negative", "p999", "lam", "w_floor"}} over the band's
    rendered brain voxels (lam and w_floor as used, i.e. after tuning).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = y_centre - half_width, y_centre + half_width + 1
    shift = np.eye(4)
    shift[1, 3] = lo
    band_affine = pair.t1w_affine @ shift
    band_mask = pair.mask[:, lo:hi]
    scaffold = lattice_scaffold(pair.t1w[:, lo:hi], band_affine, band_mask)
    acq = Acquisition.from_geometry(pair.target_affine, pair.target.shape)
    panels, stats = [], {}
    for name, opts in options.items():
        app = fit_appearance(scaffold, pair.target, acq, pair.target2t1w, opts)
        vol = render(app, band_affine, band_mask.shape, mask=band_mask)
        inside = vol[band_mask & (vol != 0)]
        p5, p999 = np.percentile(pair.target[tuple(app.fitted_ijk.T)], [5.0, 99.9])
        used = app.diagnostics["options"]
        stats[name] = {"min": float(inside.min()), "max": float(inside.max()), "n_negative": int((inside < 0).sum()),
                       "p999": float(p999), "lam": used["lam"], "w_floor": used["w_floor"]}
        panels.append((name, vol[:, half_width], (float(p5), float(p999))))
    from atlasgs_bids.bench.baselines import interpolate_cubic

    cubic = interpolate_cubic(pair.target, pair.target2t1w @ pair.target_affine, band_affine, band_mask.shape)
    panels.insert(0, ("cubic interpolation of the PDw", np.where(band_mask, cubic, 0.0)[:, half_width],
                      panels[0][2]))
    stats["cubic"] = {"min": float(cubic[band_mask].min()), "max": float(cubic[band_mask].max())}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (name, img, (lo_v, hi_v)) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo_v, vmax=hi_v, interpolation="nearest")
        key = "cubic" if name.startswith("cubic") else name
        ax.set_title(f"{name}\nrange {stats[key]['min']:.0f} to {stats[key]['max']:.0f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)
    return stats


def _parse_option(value: str, current: object) -> object:
    """``--set`` value as the type of the option's current value ("none" -> None; booleans: 1/0, true/false)."""
    if value.lower() == "none":
        return None
    if isinstance(current, bool):
        if value.lower() not in ("1", "0", "true", "false"):
            raise SystemExit(f"boolean option value must be 1, 0, true or false, got {value!r}")
        return value.lower() in ("1", "true")
    if isinstance(current, (int, float, str)):
        return type(current)(value)
    return float(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m atlasgs_bids.bench.removed_slices --data ../shared/data/bids-chris --cache /tmp/chris``."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="bids-chris dataset root")
    p.add_argument("--cache", required=True, help="folder for the cached mask and registration")
    p.add_argument("--quality", default="default", choices=QUALITIES)
    p.add_argument("--first-slice", type=int, default=26)
    p.add_argument("--n-kept", type=int, default=5)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="AppearanceOptions fields to override (e.g. lam=0.01 h=0.1)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    opts = AppearanceOptions.preset(args.quality)
    if args.set:
        import dataclasses

        names = {f.name for f in dataclasses.fields(AppearanceOptions)}
        over = {}
        for item in args.set:
            name, value = item.split("=", 1)
            if name not in names:
                raise SystemExit(f"unknown AppearanceOptions field {name!r}")
            over[name] = _parse_option(value, getattr(opts, name))
        opts = dataclasses.replace(opts, **over)
    case = make_removed_slice_case(load_bids_chris(args.data, args.cache), first_slice=args.first_slice,
                                   n_kept=args.n_kept, crop_vox=args.crop)
    print(json.dumps(run_removed_slice_case(case, opts), indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

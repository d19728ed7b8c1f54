"""Registration suite: seeded known-truth cases of moved, thick-slice targets, scored against the true transform.

Each case takes an isotropic T1w/T2w pair: from ``mni152-hcp`` (the 1 mm skull-stripped templates, or the 2 mm head
templates, which keep skull and neck), or the demo sample's object at 2 mm (nilearn's MNI152 2009 T1w and a T2w
mixed from its tissue maps, so exactly aligned), gives the T1w an oblique header (the data array unchanged, the world
rotated) and stores it RAS or LAS, moves the T2w rigidly (rotation about the brain centre, then a translation) and
measures it through thick slices along one voxel axis (Gaussian slice profile, thickness = spacing, Rician noise),
so the true target -> T1w map is known. The app's alignment (:func:`atlasgs_bids.imaging.registration.align_to_t1w`:
antspyx, then the slice-aware refinement) and its QC (edge NCC, restart spread) run on each case. Scores: rotation
error (deg), the largest displacement over the brain surface (mm), the QC verdict against the truth (missed = off by
more than 1 deg or 1 mm); and on the cases marked for it, the PSNR of the stage-2 output (``fast`` preset) with the
estimated transform beside the same data fitted with the true one.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from atlasgs_bids.data.sample import rigid_matrix, sample_through_psf
from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging import metrics
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.refine import brain_centre, max_displacement_mm, rigid_update, surface_points
from atlasgs_bids.imaging.transforms import rotation_angle_deg

LOG = logging.getLogger("atlasgs_bids.bench")

#: A case is a miss when its transform is off by more than this (the QC should flag it).
MISS_DEG, MISS_MM = 1.0, 1.0
#: The deliberate miss injected into every case to measure the QC's hit rate: the app's transform turned by
#: 1 deg about the brain centre and shifted by 1 mm (both along a seeded random axis).
INJECT_DEG, INJECT_MM = 1.0, 1.0


@dataclass(frozen=True)
class RegCase:
    """One known-truth registration case (all angles in degrees, distances in mm)."""

    name: str
    source: str  # "mni1mm-brain" (skull-stripped), "mni2mm-head" or "sample2mm" (the demo sample's object)
    rotation_deg: float
    rotation_axis: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    oblique_deg: float
    oblique_axis: tuple[float, float, float]
    storage: str  # "RAS" or "LAS"
    factor: int
    slice_axis: int
    psnr: bool


def _unit(rng: np.random.Generator) -> tuple[float, float, float]:
    v = rng.normal(size=3)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def make_cases(n: int = 20, seed: int = 0) -> list[RegCase]:
    """``n`` seeded cases. Case 0 is the headline (1 mm, x5 axial, 5 deg / 4 mm, straight RAS header); the rest draw
    rotations 0-15 deg, translations 0-10 mm, oblique headers 0-20 deg, RAS or LAS, x3/x5/x7 along each axis, and
    alternate the 1 mm skull-stripped MNI pair with the 2 mm MNI head pair and the demo sample's object at 2 mm.
    PSNR is computed on case 0 and on the 2 mm cases."""
    rng = np.random.default_rng(seed)
    out = [RegCase("c00-headline", "mni1mm-brain", 5.0, (0.6, 0.8, 0.0), (4.0, 0.0, 0.0), 0.0, (1.0, 0.0, 0.0),
                   "RAS", 5, 2, True)]
    for i in range(1, n):
        source = "mni1mm-brain" if i % 2 else ("mni2mm-head", "sample2mm")[(i // 2) % 2]
        t = np.asarray(_unit(rng)) * rng.uniform(0, 10)
        out.append(RegCase(
            name=f"c{i:02d}", source=source, rotation_deg=float(rng.uniform(0, 15)), rotation_axis=_unit(rng),
            translation_mm=tuple(float(x) for x in t), oblique_deg=float(rng.uniform(0, 20)),
            oblique_axis=_unit(rng), storage=("RAS", "LAS")[int(rng.integers(2))],
            factor=int(rng.choice([3, 5, 7])), slice_axis=int((i // 2) % 3), psnr=source != "mni1mm-brain"))
    return out


@dataclass
class _Source:
    t1: np.ndarray
    t2: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    skull_stripped: bool


def load_source(data_dir: Path, source: str) -> _Source:
    """The T1w/T2w pair and brain mask of ``source`` from the ``mni152-hcp`` folder (one voxel grid)."""
    def load(name: str) -> nib.Nifti1Image:
        path = data_dir / name
        if not path.is_file():
            raise InputError(f"registration benchmark: data file not found: {path}")
        return nib.load(str(path))

    if source == "sample2mm":
        return _sample_source()
    mask_img = load("MNI152_T1_1mm_brain_mask.nii.gz")
    if source == "mni1mm-brain":
        t1, t2 = load("MNI152_T1_1mm_brain.nii.gz"), load("MNI152_T2_1mm_brain.nii.gz")
        mask = np.asarray(mask_img.dataobj) > 0.5
        return _Source(t1.get_fdata(dtype=np.float32), t2.get_fdata(dtype=np.float32), mask, t1.affine, True)
    t1, t2 = load("MNI152_T1_2mm.nii.gz"), load("MNI152_T2_2mm.nii.gz")
    vox = np.linalg.inv(mask_img.affine) @ t1.affine  # 2 mm voxel -> 1 mm mask voxel
    mask = ndimage.affine_transform(np.asarray(mask_img.dataobj, dtype=np.float32), vox[:3, :3], vox[:3, 3],
                                    output_shape=t1.shape, order=1) > 0.5
    return _Source(t1.get_fdata(dtype=np.float32), t2.get_fdata(dtype=np.float32), mask, t1.affine, False)


def _sample_source(t1_mm: float = 2.0) -> _Source:
    """The demo sample's object at ``t1_mm``: nilearn's MNI152 2009 T1 and a T2w mixed from its tissue maps (with
    the demo's bias field), exactly aligned by construction (their own T2w pair agrees only to ~0.4 mm)."""
    from atlasgs_bids.data import sample

    maps, affine = sample._load_templates()
    csf = np.clip(maps["mask"] - maps["gm"] - maps["wm"], 0.0, 1.0)
    w = sample.T2_WEIGHTS
    obj = sample.T2_SCALE * (w["wm"] * maps["wm"] + w["gm"] * maps["gm"] + w["csf"] * csf)
    ijk = np.argwhere(maps["mask"])
    world = nib.affines.apply_affine(affine, ijk)
    grid, shape = sample._box_grid(world.min(0) - 8.0, world.max(0) + 8.0, np.full(3, t1_mm))
    fw = (t1_mm,) * 3
    t1 = sample_through_psf(maps["t1"], affine, grid, shape, fw) * sample.T1_SCALE
    t2 = sample_through_psf(obj.astype(np.float32), affine, grid, shape, fw)
    mask = sample_through_psf(maps["mask"].astype(np.float32), affine, grid, shape, fw) > 0.5
    return _Source(t1.astype(np.float32), t2.astype(np.float32), mask, grid, False)


@dataclass
class CaseData:
    """The images of one case: what the app sees, and the truth."""

    t1w: nib.Nifti1Image
    mask: nib.Nifti1Image
    target: nib.Nifti1Image
    acquisition: Acquisition
    truth: np.ndarray  # target world mm RAS -> T1w world mm RAS
    t2_truth: np.ndarray  # the T2w on the T1w grid (as stored), for PSNR


def build_case(case: RegCase, src: _Source, *, seed: int = 0, noise: float = 0.02) -> CaseData:
    """Images of ``case``: oblique/LAS T1w and mask, the moved thick-slice T2w (Rician noise of ``noise`` x the
    T2w's 99th percentile in the brain), the true map and the T2w truth on the T1w grid."""
    affine = rigid_matrix(case.oblique_axis, case.oblique_deg, (0.0, 0.0, 0.0)) @ src.affine
    t1, t2, mask = src.t1, src.t2, src.mask
    if case.storage == "LAS":  # same world, first voxel axis stored the other way round
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, t1.shape[0] - 1
        affine = affine @ flip
        t1, t2, mask = t1[::-1].copy(), t2[::-1].copy(), mask[::-1].copy()
    truth = head_motion(mask, affine, case.rotation_axis, case.rotation_deg, case.translation_mm)
    sigma = noise * float(np.percentile(t2[mask], 99))
    target, acq = simulate_moved_stack(t2, affine, mask, truth, case.factor, case.slice_axis, sigma=sigma,
                                       rng=np.random.default_rng(seed))
    return CaseData(t1w=nib.Nifti1Image(t1, affine), mask=nib.Nifti1Image(mask.astype(np.uint8), affine),
                    target=target, acquisition=acq, truth=truth, t2_truth=t2)


def head_motion(mask: np.ndarray, affine: np.ndarray, rotation_axis: tuple[float, float, float],
                rotation_deg: float, translation_mm: tuple[float, float, float]) -> np.ndarray:
    """(4, 4) rigid map, world mm RAS -> world mm RAS: a rotation about the brain's centre (``mask`` on the grid of
    ``affine``), then a translation."""
    shift = np.eye(4)
    shift[:3, 3] = brain_centre(mask, affine)
    truth = shift @ rigid_matrix(rotation_axis, rotation_deg, (0.0, 0.0, 0.0)) @ np.linalg.inv(shift)
    truth[:3, 3] += translation_mm
    return truth


def simulate_moved_stack(t2: np.ndarray, affine: np.ndarray, mask: np.ndarray, truth: np.ndarray, factor: int,
                         slice_axis: int, *, sigma: float, rng: np.random.Generator,
                         scale: float = 1.0) -> tuple[nib.Nifti1Image, Acquisition]:
    """A thick-slice stack of ``t2`` (isotropic, voxel -> world ``affine``) taken from a head moved by ``truth``.

    The stack's grid is axis-aligned in its own world, ``factor`` x the source voxel along ``slice_axis``, and
    covers the brain (``mask``) moved into that world plus 10 mm; ``truth`` maps its world to the source's (mm RAS).
    Gaussian slice profile, thickness = spacing; Rician noise of SD ``sigma`` (source units) from ``rng``; the
    result is multiplied by ``scale`` (another receiver gain). Returns the image and its acquisition model.
    """
    vox = float(nib.affines.voxel_sizes(affine).min())
    zooms = np.full(3, vox)
    zooms[slice_axis] = vox * factor
    ijk = np.argwhere(mask)
    box = nib.affines.apply_affine(np.linalg.inv(truth) @ affine,
                                   np.array([[i, j, k] for i in (ijk[:, 0].min(), ijk[:, 0].max())
                                             for j in (ijk[:, 1].min(), ijk[:, 1].max())
                                             for k in (ijk[:, 2].min(), ijk[:, 2].max())], dtype=float))
    lo, hi = box.min(0) - 10.0, box.max(0) + 10.0
    shape = tuple(int(np.ceil((h - l) / z)) + 1 for l, h, z in zip(lo, hi, zooms))
    t_aff = np.diag([*zooms, 1.0])
    t_aff[:3, 3] = lo
    clean = sample_through_psf(t2, affine, truth @ t_aff, shape, tuple(zooms), source_fwhm_mm=vox)
    noisy = np.sqrt((clean + rng.normal(scale=sigma, size=clean.shape)) ** 2
                    + rng.normal(scale=sigma, size=clean.shape) ** 2)
    return nib.Nifti1Image((scale * noisy).astype(np.float32), t_aff), Acquisition.from_geometry(t_aff, shape)


def _stage2_psnrs(data: CaseData, transforms: list[np.ndarray]) -> list[float]:
    """PSNR (dB, brain mask) of the stage-2 output (lattice scaffold built once, ``fast`` preset) against the T2w
    truth, for each map target -> T1w in ``transforms``."""
    from atlasgs_bids.gaussians.appearance import AppearanceOptions, fit_appearance
    from atlasgs_bids.gaussians.render import render
    from atlasgs_bids.gaussians.scaffold import lattice_scaffold

    t1 = np.asarray(data.t1w.dataobj, dtype=np.float32)
    mask = np.asarray(data.mask.dataobj) > 0
    scaffold = lattice_scaffold(t1, data.t1w.affine, mask)
    out = []
    for target2t1w in transforms:
        app = fit_appearance(scaffold, np.asarray(data.target.dataobj), data.acquisition, target2t1w,
                             AppearanceOptions.preset("fast"))
        pred = render(app, data.t1w.affine, t1.shape, mask=mask)
        out.append(float(metrics.psnr(pred, data.t2_truth, mask)))
    return out


def score_case(case: RegCase, data: CaseData, *, psnr: bool) -> dict:
    """Align one case as the app does and score it against the truth."""
    from atlasgs_bids.imaging.registration import align_to_t1w
    from atlasgs_bids.qc.registration import registration_qc, restart_spread

    t0 = time.perf_counter()
    al = align_to_t1w(data.t1w, data.target, fixed_mask=data.mask, acquisition=data.acquisition, threads=1)
    t_align = time.perf_counter() - t0
    mask = np.asarray(data.mask.dataobj) > 0
    surf = surface_points(mask, data.t1w.affine)

    def errors(m: np.ndarray) -> tuple[float, float]:
        return (rotation_angle_deg(m[:3, :3].T @ data.truth[:3, :3]), max_displacement_mm(m, data.truth, surf))

    rot_err, disp = errors(al.target2t1w)
    ants_rot, ants_disp = errors(al.ants.target2t1w)
    t1 = time.perf_counter()
    qc = registration_qc(data.t1w, data.mask, data.target, al.target2t1w)
    stab = restart_spread(data.t1w, data.mask, data.target, al.target2t1w, data.acquisition)
    t_qc = time.perf_counter() - t1
    # a deliberate miss of about 1 deg / 1 mm on top of the app's answer: the QC should flag it
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    axis_r, axis_t = (np.asarray(_unit(rng)) for _ in range(2))
    centre = brain_centre(mask, data.t1w.affine)
    injected = rigid_update(np.concatenate([np.radians(INJECT_DEG) * axis_r, INJECT_MM * axis_t]), centre) \
        @ al.target2t1w
    inj_rot, inj_disp = errors(injected)
    stab_inj = restart_spread(data.t1w, data.mask, data.target, injected, data.acquisition)
    missed = rot_err > MISS_DEG or disp > MISS_MM
    flagged = bool(qc["flag"] or qc["failed"] or stab["flag"])
    row = {**asdict(case), "rotation_error_deg": rot_err, "surface_displacement_mm": disp,
           "ants_rotation_error_deg": ants_rot, "ants_surface_displacement_mm": ants_disp,
           "refined": al.refined, "refinement": None if al.refinement is None else al.refinement.to_dict(),
           "mattes_mi": al.ants.metric, "mattes_mi_initial": al.ants.parameters.get("metric_initial"),
           "edge_ncc": qc["ncc"], "spread_mm": stab["spread_mm"], "spread_threshold_mm": stab["warn_threshold_mm"],
           "qc_flagged": flagged, "missed": missed,
           "injected_rotation_error_deg": inj_rot, "injected_surface_displacement_mm": inj_disp,
           "injected_spread_mm": stab_inj["spread_mm"], "injected_flagged": bool(stab_inj["flag"]),
           "align_seconds": t_align, "refine_seconds": None if al.refinement is None else al.refinement.seconds,
           "qc_seconds": t_qc}
    if psnr:
        t2 = time.perf_counter()
        row["psnr_estimated"], row["psnr_true_transform"] = _stage2_psnrs(data, [al.target2t1w, data.truth])
        row["psnr_delta_db"] = row["psnr_estimated"] - row["psnr_true_transform"]
        row["psnr_seconds"] = time.perf_counter() - t2
    return row


def summarise(rows: list[dict]) -> dict:
    """Suite figures: shares within the goals, QC hits and false alarms."""
    n = len(rows)
    ok = [r for r in rows if r["rotation_error_deg"] <= 0.25 and r["surface_displacement_mm"] <= 0.3]
    missed = [r for r in rows if r["missed"]]
    fine = [r for r in rows if not r["missed"]]
    ratio = [r["refine_seconds"] / r["psnr_seconds"] * 2 for r in rows
             if r.get("psnr_seconds") and r.get("refine_seconds")]
    return {
        "cases": n,
        "within_0.25deg_0.3mm": len(ok), "share_within": len(ok) / n if n else None,
        "above_1mm": sum(r["surface_displacement_mm"] > 1.0 for r in rows),
        "median_surface_displacement_mm": float(np.median([r["surface_displacement_mm"] for r in rows])) if n else None,
        "max_surface_displacement_mm": max((r["surface_displacement_mm"] for r in rows), default=None),
        "ants_median_surface_displacement_mm":
            float(np.median([r["ants_surface_displacement_mm"] for r in rows])) if n else None,
        "missed": len(missed), "missed_flagged": sum(r["qc_flagged"] for r in missed),
        "false_alarms": sum(r["qc_flagged"] for r in fine), "not_missed": len(fine),
        "refine_over_stage2_fast": float(np.median(ratio)) if ratio else None,
        "injected": sum("injected_flagged" in r for r in rows),
        "injected_flagged": sum(bool(r.get("injected_flagged")) for r in rows),
    }


def _f(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def write_markdown(path: Path, report: dict, command: str) -> None:
    s = report["summary"]
    lines = [
        "# Registration suite", "",
        f"Command: `{command}`  ",
        f"Machine: {report['machine'].get('cpu', 'n/a')}, {report['machine'].get('cores', 'n/a')} cores. "
        "Known-truth cases from mni152-hcp (see atlasgs_bids/bench/registration.py).", "",
        f"- within 0.25 deg and 0.3 mm: {s['within_0.25deg_0.3mm']}/{s['cases']}; above 1 mm: {s['above_1mm']}; "
        f"median / max surface displacement {_f(s['median_surface_displacement_mm'])} / "
        f"{_f(s['max_surface_displacement_mm'])} mm (antspyx alone: median "
        f"{_f(s['ants_median_surface_displacement_mm'])} mm)",
        f"- misses (> {MISS_DEG:g} deg or {MISS_MM:g} mm): {s['missed']}, flagged {s['missed_flagged']}; "
        f"false alarms {s['false_alarms']}/{s['not_missed']}; deliberate misses ({INJECT_DEG:g} deg + {INJECT_MM:g} mm "
        f"on top of each answer) flagged: {s['injected_flagged']}/{s['injected']}", "",
        "| case | source | rot deg | shift mm | oblique deg | storage | x | axis | rot err deg | surf mm | "
        "antspyx surf mm | spread mm | edge NCC | QC | injected miss: surf mm, spread mm, QC | "
        "PSNR est / true (dB) | align s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        psnr = (f"{_f(r.get('psnr_estimated'))} / {_f(r.get('psnr_true_transform'))}"
                if r.get("psnr_estimated") is not None else "")
        lines.append(
            f"| {r['name']} | {r['source']} | {_f(r['rotation_deg'], '.1f')} | "
            f"{_f(float(np.linalg.norm(r['translation_mm'])), '.1f')} | {_f(r['oblique_deg'], '.1f')} | "
            f"{r['storage']} | {r['factor']} | {r['slice_axis']} | {_f(r['rotation_error_deg'], '.3f')} | "
            f"{_f(r['surface_displacement_mm'])} | {_f(r['ants_surface_displacement_mm'])} | "
            f"{_f(r['spread_mm'])} | {_f(r['edge_ncc'])} | {'flag' if r['qc_flagged'] else 'ok'} | "
            f"{_f(r.get('injected_surface_displacement_mm'))}, {_f(r.get('injected_spread_mm'))}, "
            f"{'flag' if r.get('injected_flagged') else 'ok'} | {psnr} | "
            f"{_f(r['align_seconds'], '.0f')} |")
    path.write_text("\n".join(lines) + "\n")


def run_suite(data_dir: Path, out: Path, *, n_cases: int = 20, seed: int = 0, psnr: bool = True,
              machine: dict | None = None, command: str = "atlasgs-bids bench --registration") -> dict:
    """Build and score the suite; writes ``out/registration.json`` (after every case) and ``out/registration.md``."""
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, _Source] = {}
    report = {"machine": machine or {}, "cases": [], "summary": {}}
    todo = make_cases(n_cases, seed)
    todo = todo[1:] + todo[:1]  # the headline case (two 1 mm stage-2 fits) last
    for i, case in enumerate(todo, start=1):
        LOG.info("registration case %d/%d: %s (%s, %.1f deg, %.1f mm, oblique %.1f deg, %s, x%d axis %d)", i,
                 len(todo), case.name, case.source, case.rotation_deg, float(np.linalg.norm(case.translation_mm)),
                 case.oblique_deg, case.storage, case.factor, case.slice_axis)
        if case.source not in sources:
            sources[case.source] = load_source(Path(data_dir), case.source)
        data = build_case(case, sources[case.source], seed=seed + i)
        row = score_case(case, data, psnr=psnr and case.psnr)
        LOG.info("  rotation error %.3f deg, surface %.2f mm (antspyx %.2f mm), spread %.2f mm, QC %s, %.0f s",
                 row["rotation_error_deg"], row["surface_displacement_mm"], row["ants_surface_displacement_mm"],
                 row["spread_mm"], "flag" if row["qc_flagged"] else "ok", row["align_seconds"] + row["qc_seconds"])
        report["cases"].append(row)
        report["summary"] = summarise(report["cases"])
        tmp = out / "registration.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=float))
        tmp.replace(out / "registration.json")
    write_markdown(out / "registration.md", report, command)
    return report

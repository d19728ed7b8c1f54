"""Fusion benchmark: several thick-slice stacks of one contrast, each from a moved head, fused in one solve.

Known truth from ``mni152-hcp`` (1 mm T1w/T2w brains): the T2w is measured as an axial, a coronal and a sagittal
stack (x ``factor`` along voxel axis 2, 1 and 0), each from the head moved by its own rigid motion, with its own
intensity scale (another receiver gain) and seeded Rician noise (SNR = white-matter mean / noise SD, white matter
the T1w's top 20 % in the brain). Every stack is registered to the T1w as the app does
(:func:`atlasgs_bids.imaging.registration.align_to_t1w`) and scored against its true transform. Rows, scored on the
T1w grid inside the brain mask against the T2w truth:

- ``cubic``: each stack resampled with its estimated transform (cubic B-spline);
- ``guided-filter``: each stack's guided filter, tuned on held-out slices of its input, on the same stack taken
  WITHOUT the head motion (aligned to the T1w grid, same noise level): no registration error, so an upper bound
  for the baseline;
- ``atlasgs``: each stack alone (:func:`atlasgs_bids.harmonize.harmonize_stacks` with one stack);
- ``atlasgs-fused``: the first two stacks, then all of them, in one solve (the first stack is the reference: the
  output is in its units).

The goals of issue 15: fused >= best single atlasgs stack + 1.5 dB and >= the best single-stack guided filter
+ 3 dB. Intensities are compared in the reference stack's units (the other stacks' scales are the model's job).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasgs_bids.bench import baselines, cases
from atlasgs_bids.bench import voxel_basis as vb
from atlasgs_bids.bench.registration import head_motion, simulate_moved_stack
from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.refine import max_displacement_mm, surface_points
from atlasgs_bids.imaging.transforms import rotation_angle_deg

LOG = logging.getLogger("atlasgs_bids.bench")


@dataclass(frozen=True)
class StackSpec:
    """One stack of the fusion case: slice axis, head motion (deg about an axis through the brain centre, then mm)
    and intensity scale relative to the truth."""

    name: str
    slice_axis: int
    rotation_deg: float
    rotation_axis: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    scale: float


STACKS = (
    StackSpec("axial", 2, 4.0, (0.6, 0.8, 0.0), (2.0, -1.0, 1.0), 1.0),
    StackSpec("coronal", 1, 3.0, (1.0, 0.0, 0.3), (-1.5, 2.0, 0.0), 1.3),
    StackSpec("sagittal", 0, 5.0, (0.0, 0.5, 1.0), (1.0, 1.0, -2.0), 0.8),
)


def _white_matter_mean(subject: cases.Subject) -> float:
    inside = subject.t1w[subject.mask]
    wm = subject.mask & (subject.t1w >= np.percentile(inside, 80.0))
    return float(subject.t2w[wm].mean())


def _row(method: str, stacks: list[str], scores: dict, seconds: float, params: dict | None = None) -> dict:
    return {"method": method, "stacks": stacks, **{k: round(float(v), 4) for k, v in scores.items()},
            "seconds": round(float(seconds), 2), "params": params or {}}


def check_settings(n_stacks: int, snr: float) -> None:
    """An :class:`InputError` naming the option unless ``n_stacks`` is 2..3 and ``snr`` is positive."""
    if not 2 <= n_stacks <= len(STACKS):
        raise InputError(f"--stacks must be between 2 and {len(STACKS)}, got {n_stacks}")
    if not np.isfinite(snr) or snr <= 0:
        raise InputError(f"the fusion SNR must be positive, got {snr}")


def run_fusion(data_dir: Path, out: Path, *, factor: int = 5, snr: float = 30.0, quality: str = "default",
               device: str = "cpu", seed: int = 0, crop: int | None = None, n_stacks: int = 3,
               machine: dict | None = None, command: str = "atlasgs-bids bench --fusion") -> dict:
    """Build the fusion case, run every row, write ``out/fusion.json`` (after every row) and ``out/fusion.md``."""
    from atlasgs_bids.gaussians.scaffold import lattice_scaffold
    from atlasgs_bids.harmonize import HarmonizeOptions, harmonize_stacks
    from atlasgs_bids.imaging.registration import align_to_t1w

    check_settings(n_stacks, snr)
    out.mkdir(parents=True, exist_ok=True)
    subject = cases.load_subject(data_dir, crop=crop)
    specs = STACKS[:n_stacks]
    t1w_img = nib.Nifti1Image(subject.t1w, subject.affine)
    mask_img = nib.Nifti1Image(subject.mask.astype(np.uint8), subject.affine)
    sigma = _white_matter_mean(subject) / snr
    surf = surface_points(subject.mask, subject.affine)
    report: dict = {"machine": machine or {}, "factor": factor, "snr": snr, "quality": quality, "crop": crop,
                    "stacks": [], "rows": []}

    def save() -> None:
        tmp = out / "fusion.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=float))
        tmp.replace(out / "fusion.json")

    def score(pred: np.ndarray) -> dict:
        return cases.score(pred, subject.t2w, subject.mask)

    targets, estimated = [], []
    for i, spec in enumerate(specs):
        truth = head_motion(subject.mask, subject.affine, spec.rotation_axis, spec.rotation_deg, spec.translation_mm)
        target, acq = simulate_moved_stack(subject.t2w, subject.affine, subject.mask, truth, factor, spec.slice_axis,
                                           sigma=sigma, rng=np.random.default_rng(seed + 101 * (i + 1)),
                                           scale=spec.scale)
        LOG.info("fusion: registering the %s stack (%.1f deg, %.1f mm) ...", spec.name, spec.rotation_deg,
                 float(np.linalg.norm(spec.translation_mm)))
        t0 = time.perf_counter()
        al = align_to_t1w(t1w_img, target, fixed_mask=mask_img, acquisition=acq, threads=1)
        seconds = time.perf_counter() - t0
        est = al.target2t1w
        report["stacks"].append({**asdict(spec), "shape": list(acq.shape), "noise_sigma": sigma * spec.scale,
                                 "rotation_error_deg": rotation_angle_deg(est[:3, :3].T @ truth[:3, :3]),
                                 "surface_displacement_mm": max_displacement_mm(est, truth, surf),
                                 "align_seconds": seconds})
        targets.append(target)
        estimated.append(est)
        save()

        # cubic: the stack resampled with its estimated transform, back in the reference's units
        t0 = time.perf_counter()
        data = np.asarray(target.dataobj, dtype=np.float32) / spec.scale
        pred = baselines.interpolate_cubic(data, est @ target.affine, subject.affine, subject.shape)
        report["rows"].append(_row("cubic", [spec.name], score(pred), time.perf_counter() - t0))
        # guided filter on the same stack without the motion (no registration error: the baseline's best case)
        t0 = time.perf_counter()
        case = cases.add_rician_noise(cases.make_case(subject, factor, "gaussian", axis=spec.slice_axis), snr,
                                      seed=seed + 101 * (i + 1))
        op = vb.slice_operator(subject.shape[spec.slice_axis], factor, "gaussian", axis=spec.slice_axis)
        pred, tuning = baselines.tune_guided_filter_heldout(case.thick, case.thick_t1w, subject.t1w,
                                                            case.thick_affine, subject.affine, op.apply, subject.mask)
        report["rows"].append(_row("guided-filter", [spec.name], score(pred), time.perf_counter() - t0,
                                   {"radius": tuning.radius, "radius_slices": tuning.radius_slices,
                                    "eps": tuning.eps, "aligned_input": True}))
        save()

    LOG.info("fusion: building the scaffold ...")
    scaffold = lattice_scaffold(subject.t1w, subject.affine, subject.mask)
    options = HarmonizeOptions(quality=quality, device=device, uncertainty=False)  # the fits alone (no SD map)
    runs = [[i] for i in range(len(specs))] + [list(range(k)) for k in range(2, len(specs) + 1)]
    for idx in runs:
        names = [specs[i].name for i in idx]
        LOG.info("fusion: atlasgs on %s ...", " + ".join(names))
        t0 = time.perf_counter()
        res = harmonize_stacks(scaffold, [targets[i] for i in idx], [estimated[i] for i in idx], t1w_img,
                               subject.mask, options)
        seconds = time.perf_counter() - t0
        pred = np.asarray(res.image.dataobj, dtype=np.float32) / specs[idx[0]].scale
        diag = res.diagnostics
        params = {"iterations": diag.get("iterations"), "lam": (diag.get("options") or {}).get("lam"),
                  "n_measurements": diag.get("n_measurements")}
        if len(idx) > 1:
            params["scale_vs_reference"] = [round(r["scale_vs_reference"], 4) for r in diag["stacks"]]
            params["true_scale_vs_reference"] = [round(specs[i].scale / specs[idx[0]].scale, 4) for i in idx]
            params["weights"] = [round(r["weight"], 3) for r in diag["stacks"]]
        report["rows"].append(_row("atlasgs" if len(idx) == 1 else "atlasgs-fused", names, score(pred), seconds,
                                   params))
        LOG.info("fusion: %s PSNR %.2f dB in %.0f s", " + ".join(names), report["rows"][-1]["psnr"], seconds)
        save()
    report["goals"] = goals(report["rows"])
    save()
    write_markdown(out / "fusion.md", report, command)
    return report


def goals(rows: list[dict]) -> dict:
    """The issue's fusion goals from the rows: the fused (all stacks) PSNR against the best single atlasgs stack
    (+1.5 dB) and the best single-stack guided filter (+3 dB)."""
    fused = [r for r in rows if r["method"] == "atlasgs-fused"]
    if not fused:
        return {}
    best_fused = max(fused, key=lambda r: len(r["stacks"]))
    single = max(r["psnr"] for r in rows if r["method"] == "atlasgs")
    gf = max(r["psnr"] for r in rows if r["method"] == "guided-filter")
    return {"fused_psnr": best_fused["psnr"], "best_single_atlasgs_psnr": single, "best_guided_filter_psnr": gf,
            "gain_vs_single_db": best_fused["psnr"] - single, "gain_vs_guided_filter_db": best_fused["psnr"] - gf,
            "met_single": best_fused["psnr"] >= single + 1.5, "met_guided_filter": best_fused["psnr"] >= gf + 3.0}


def write_markdown(path: Path, report: dict, command: str) -> None:
    m = report.get("machine") or {}
    lines = ["# atlasgs-bids fusion benchmark", "",
             f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; command: `{command}`",
             f"- truth: MNI152 T2w 1 mm{' (central ' + str(report['crop']) + ' column)' if report.get('crop') else ''}"
             f"; stacks x{report['factor']}, Rician noise SNR {report['snr']:g} (white matter / SD), quality "
             f"{report['quality']}; PSNR/SSIM inside the brain mask, in the reference (first) stack's units.",
             "- guided filter: on the same stack WITHOUT the head motion (aligned, same noise): its best case.", "",
             "## Stacks and their registration", "",
             "| stack | slice axis | motion deg / mm | scale | rotation error deg | surface error mm | align s |",
             "|---|---|---|---|---|---|---|"]
    for st in report["stacks"]:
        lines.append(f"| {st['name']} | {st['slice_axis']} | {st['rotation_deg']:.1f} / "
                     f"{float(np.linalg.norm(st['translation_mm'])):.1f} | {st['scale']:g} | "
                     f"{st['rotation_error_deg']:.3f} | {st['surface_displacement_mm']:.2f} | "
                     f"{st['align_seconds']:.0f} |")
    lines += ["", "## Reconstructions", "", "| method | stacks | PSNR dB | SSIM | MAE | seconds | parameters |",
              "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['method']} | {' + '.join(r['stacks'])} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['mae']:.2f} | {r['seconds']:.1f} | {params} |")
    g = report.get("goals") or {}
    if g:
        lines += ["", "## Goals", "",
                  f"- fused ({g['fused_psnr']:.2f} dB) vs the best single atlasgs stack ({g['best_single_atlasgs_psnr']:.2f}"
                  f" dB): {g['gain_vs_single_db']:+.2f} dB (goal +1.5: {'met' if g['met_single'] else '**missed**'})",
                  f"- fused vs the best single-stack guided filter ({g['best_guided_filter_psnr']:.2f} dB): "
                  f"{g['gain_vs_guided_filter_db']:+.2f} dB (goal +3: "
                  f"{'met' if g['met_guided_filter'] else '**missed**'})"]
    path.write_text("\n".join(lines) + "\n")

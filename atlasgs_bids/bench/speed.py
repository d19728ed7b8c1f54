"""``atlasgs-bids bench --speed``: what one target costs, beside its voxel-basis twin, and what a 4D series costs.

Options: ``[--factors 5] [--degradations gaussian] [--volumes 30] [--quality default] [--crop N]``.

One simulated thick-slice case of the MNI152 pair (x5 Gaussian profile by default, the case of issue 14):

- ``atlasgs``: the app's stage-2 entry point (:func:`atlasgs_bids.harmonize.harmonize`: self-tuning, fit, render),
  its seconds, peak RSS (the process, sampled every 10 ms) and PSNR against the truth;
- ``voxel-basis``: the twin solve in the same run, for the ratio of seconds;
- ``atlasgs-series``: a ``--volumes``-volume 4D series of the same case (volume v mixes the T2w with the T1w,
  ``(1 - w) T2w + w 0.8 T1w``, w from 0 to 1: a contrast that changes across the series), one solve with one
  right-hand side per volume; the ratio of its seconds to the 3D target's.

Outputs in ``--out``: ``speed.json`` (written after each step) and ``speed.md``. The scaffold is built once,
outside the timings (as in the app, where stage 1 is its own node).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from atlasgs_bids.bench import cases
from atlasgs_bids.bench.run import (DEFAULT_H, DEFAULT_LAMBDA, PeakMemory, harmonize_case, load_core, machine_info,
                                    voxel_basis_case)

LOG = logging.getLogger("atlasgs_bids.bench")


def _row(name: str, seconds: float, mem: PeakMemory, **extra) -> dict:
    return {"method": name, "seconds": round(seconds, 2), "peak_rss_mb": round(mem.peak_rss_mb),
            "rss_start_mb": round(mem.start_rss_mb), "peak_gpu_mb": mem.peak_gpu_mb, **extra}


def run_speed(data: Path, out: Path, *, factor: int = 5, degradation: str = "gaussian", quality: str = "default",
              device: str = "cpu", volumes: int = 30, crop: int | None = None) -> dict:
    """Measure the three rows (see the module docstring); returns the report written to ``out/speed.json``."""
    from atlasgs_bids.gaussians.scaffold import lattice_scaffold

    out.mkdir(parents=True, exist_ok=True)
    subject = cases.load_subject(data, crop=crop)
    case = cases.make_case(subject, factor, degradation)
    report = {"machine": machine_info(), "device": device, "quality": quality, "factor": factor,
              "degradation": degradation, "crop": crop, "rows": []}

    def save() -> None:
        (out / "speed.json").write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    scaffold = lattice_scaffold(subject.t1w, subject.affine, subject.mask)
    report["scaffold_seconds"] = round(time.perf_counter() - t0, 2)
    report["n_gaussians"] = scaffold.n_gaussians

    core = load_core()
    LOG.info("speed: atlasgs x%d %s ...", factor, degradation)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        res = harmonize_case(core, scaffold, case, subject, quality, device, uncertainty=False)  # the fit alone
        seconds = time.perf_counter() - t0
    d = res.diagnostics
    single = _row("atlasgs", seconds, mem, psnr=round(cases.psnr(np.asarray(res.image.dataobj), subject.t2w,
                                                                  subject.mask), 3),
                  fit_seconds=round(d["seconds"], 2), render_seconds=round(d["render_seconds"], 2),
                  tuning_seconds=round((d.get("tuning") or {}).get("seconds") or 0.0, 2),
                  iterations=d["iterations"], bound_iterations=d["bounds"]["iterations"], coarse=d.get("coarse"),
                  nnz=d["nnz"], lam=d["options"]["lam"], w_floor=d["options"]["w_floor"])
    report["rows"].append(single)
    save()

    LOG.info("speed: voxel-basis twin ...")
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        twin = voxel_basis_case(case, subject, lam=DEFAULT_LAMBDA, h=DEFAULT_H, device=device)
        seconds = time.perf_counter() - t0
    report["rows"].append(_row("voxel-basis", seconds, mem, iterations=twin.iterations,
                               psnr=round(cases.psnr(twin.data, subject.t2w, subject.mask), 3)))
    save()

    if volumes > 1:
        LOG.info("speed: a %d-volume series ...", volumes)
        weights = np.linspace(0.0, 1.0, volumes)
        series = np.stack([(1 - w) * case.thick + w * 0.8 * case.thick_t1w for w in weights], axis=-1)
        series = series.astype(np.float32)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            res4 = harmonize_case(core, scaffold, case, subject, quality, device, thick=series, uncertainty=False)
            seconds = time.perf_counter() - t0
        d4 = res4.diagnostics
        report["rows"].append(_row("atlasgs-series", seconds, mem, volumes=volumes, iterations=d4["iterations"],
                                   bound_iterations=d4["bounds"]["iterations"],
                                   ratio_to_3d=round(seconds / max(single["seconds"], 1e-9), 2)))
        save()
    write_markdown(out / "speed.md", report)
    return report


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = ["# atlasgs-bids speed", "",
             f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gb', '?')} GB, "
             f"torch {m.get('torch', '?')}; device: {report['device']}",
             f"- case: x{report['factor']} {report['degradation']}, quality {report['quality']}, "
             f"{report['n_gaussians']} Gaussians (scaffold built in {report['scaffold_seconds']} s, not counted)",
             "", "| method | seconds | peak RSS MB (start) | PSNR dB | details |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        details = {k: v for k, v in r.items() if k not in ("method", "seconds", "peak_rss_mb", "rss_start_mb",
                                                            "peak_gpu_mb", "psnr")}
        lines.append(f"| {r['method']} | {r['seconds']} | {r['peak_rss_mb']} ({r['rss_start_mb']}) | "
                     f"{r.get('psnr', '-')} | {json.dumps(details)} |")
    path.write_text("\n".join(lines) + "\n")

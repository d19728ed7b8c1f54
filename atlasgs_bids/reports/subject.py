"""The per-participant report: ``<output_dir>/sub-X.html`` with its figures under ``sub-X/figures/``.

What the report is drawn from is kept with the derivatives, under ``sub-X/qc/`` (ignored by BIDS, see
``bids.derivatives.BIDSIGNORE``): per target ``<stem>_qc.json`` (the run's QC record, schema in ``docs/qc.md``) and
``<stem>_residual.nii.gz`` (measured - fitted, target grid), and per session ``<label>_methods.txt``. With the
derivatives themselves (preprocessed T1w, brain mask, harmonised target, transform, sidecar) and the raw target,
that is everything ``--reports-only`` needs to redraw every figure and page without fitting anything.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np

from atlasgs_bids.atomic import atomic_write_bytes
from atlasgs_bids.bids import derivatives as bd
from atlasgs_bids.bids.layout import fusion_groups
from atlasgs_bids.reports import figures as fg

LOGGER = logging.getLogger("atlasgs")
FIGURE_KINDS = ("edges", "mosaic", "uncertainty", "residual", "convergence")
_FIGURE_EXT = {"edges": ".png", "mosaic": ".png", "uncertainty": ".png", "residual": ".png", "convergence": ".svg"}
FLAG_TEXT = {
    "registration_poor": "Registration poor: NCC with the T1w below the warning threshold. Check the edge overlay.",
    "selfval_not_better_than_cubic": "Held-out slices: atlasgs is not better than cubic interpolation.",
    "selfval_not_computed": "Self-validation not computed (too few slices through the brain to hold one out).",
}


# ------------------------------------------------------------------------------------------------------ file names
def target_stem(target_file: str | os.PathLike) -> str:
    """The raw target's file name without extension (``sub-01_ses-1_acq-tse_T2w``)."""
    ents, suffix, _ = bd.parse_name(target_file)
    return bd.build_name(ents, suffix, "")


def subject_dir(subject: str) -> Path:
    return Path(f"sub-{subject}")


def figure_path(stem: str, kind: str) -> Path:
    """``sub-X/figures/<stem>_<kind>.png|svg``, relative to the output dataset."""
    ents, _, _ = bd.parse_name(stem + ".x")
    return subject_dir(ents["sub"]) / "figures" / f"{stem}_{kind}{_FIGURE_EXT[kind]}"


def qc_path(stem: str, what: str = "qc.json") -> Path:
    """``sub-X/qc/<stem>_<what>`` (``qc.json`` or ``residual.nii.gz``), relative to the output dataset."""
    ents, _, _ = bd.parse_name(stem + ".x")
    return subject_dir(ents["sub"]) / "qc" / f"{stem}_{what}"


def methods_path(subject: str, session: str | None) -> Path:
    label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return subject_dir(subject) / "qc" / f"{label}_methods.txt"


# --------------------------------------------------------------------------------------------------------- figures
def _first_volume(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    return np.asarray(data, dtype=np.float32)


def _resample(data: np.ndarray, affine: np.ndarray, grid: nib.spatialimages.SpatialImage, target2t1w: np.ndarray,
              order: int) -> np.ndarray:
    from atlasgs_bids.imaging.registration import apply_rigid

    interp = {0: "nearest", 1: "linear", 3: "cubic"}[order]
    return np.asarray(apply_rigid(nib.Nifti1Image(data, affine), grid, target2t1w, interp).dataobj)


def slice_axis_on_grid(target_affine: np.ndarray, target2t1w: np.ndarray, grid_affine: np.ndarray,
                       slice_axis: int) -> int:
    """The voxel axis of the output grid closest to the target's slice axis.

    Parameters
    ----------
    target_affine : (4, 4) target voxel -> target world mm RAS
    target2t1w : (4, 4) target world -> T1w world mm RAS
    grid_affine : (4, 4) output voxel -> T1w world mm RAS
    slice_axis : the target's slice voxel axis (0, 1 or 2)

    >>> slice_axis_on_grid(np.eye(4), np.eye(4), np.diag([1, 1, 1, 1.0]), 2)
    2
    """
    direction = (np.asarray(target2t1w)[:3, :3] @ np.asarray(target_affine)[:3, :3])[:, slice_axis]
    in_grid = np.linalg.solve(np.asarray(grid_affine)[:3, :3], direction)
    return int(np.argmax(np.abs(in_grid)))


def default_slice_axis(zooms: Sequence[float]) -> int:
    """The target's thickest voxel axis (its slice axis when the QC record does not say)."""
    return int(np.argmax(np.asarray(zooms[:3], dtype=float)))


def draw_target_figures(*, t1w_img: nib.spatialimages.SpatialImage, mask_img: nib.spatialimages.SpatialImage | None,
                        target_img: nib.spatialimages.SpatialImage, target_ref: np.ndarray,
                        harmonized_img: nib.spatialimages.SpatialImage, target2t1w: np.ndarray,
                        residual_img: nib.spatialimages.SpatialImage | None, qc: dict[str, Any] | None,
                        sd_img: nib.spatialimages.SpatialImage | None = None) -> dict[str, bytes | str]:
    """Every figure of one target (``FIGURE_KINDS`` -> PNG bytes or SVG text; a kind without data is left out).

    Parameters
    ----------
    t1w_img, mask_img : the preprocessed T1w (RAS+) and its brain mask: the output grid
    target_img : the raw target (3D, or 4D: its first volume is shown), affine voxel -> target world mm RAS
    target_ref : array, shape of the target's first three axes: the registration reference (itself, mean b0, ...)
    harmonized_img : the harmonised target on the T1w grid (first volume shown when 4D)
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS (inverse of the map in the ``_xfm.txt``)
    residual_img : measured - fitted on the target grid, or None
    qc : the QC record (``self_validation.slice_axis``, ``fit.history``), or None
    sd_img : the output's per-voxel SD (``desc-atlasgsSD``, T1w grid), or None
    """
    t1w = np.asarray(t1w_img.dataobj, dtype=np.float32)
    t1w = t1w[..., 0] if t1w.ndim == 4 else t1w
    mask = np.asarray(mask_img.dataobj) > 0 if mask_img is not None else None
    zooms = tuple(float(z) for z in t1w_img.header.get_zooms()[:3])
    qc = qc or {}
    sv = qc.get("self_validation") or {}
    slice_axis = sv.get("slice_axis")
    if not isinstance(slice_axis, int):
        slice_axis = default_slice_axis(target_img.header.get_zooms())
    out: dict[str, bytes | str] = {}
    moving = _resample(np.asarray(target_ref, dtype=np.float32), target_img.affine, t1w_img, target2t1w, 1)
    out["edges"] = fg.edges_overlay_png(moving, t1w, zooms, mask)
    cubic = _resample(_first_volume(target_img), target_img.affine, t1w_img, target2t1w, 3)
    harmonized = _first_volume(harmonized_img)
    grid_axis = slice_axis_on_grid(target_img.affine, target2t1w, t1w_img.affine, slice_axis)
    cut_axis = 1 if grid_axis != 1 else 0  # coronal cuts (sagittal for a coronal acquisition) contain the slice axis
    out["mosaic"] = fg.compare_mosaic_png({"cubic (input)": cubic, "atlasgs": harmonized}, cut_axis, zooms, mask)
    if sd_img is not None:
        out["uncertainty"] = fg.sd_mosaic_png(harmonized, _first_volume(sd_img), cut_axis, zooms, mask)
    if residual_img is not None:
        res = _first_volume(residual_img)
        out["residual"] = fg.residual_mosaic_png(res, slice_axis, residual_img.header.get_zooms()[:3])
    history = (qc.get("fit") or {}).get("history")
    if history:
        out["convergence"] = fg.convergence_svg(history, ylabel="CG relative residual")
    return out


def save_figures(root: str | os.PathLike, stem: str, figures: dict[str, bytes | str]) -> dict[str, str]:
    """Write ``figures`` under ``root`` at :func:`figure_path`; returns kind -> path relative to ``root``."""
    out = {}
    for kind, content in figures.items():
        rel = figure_path(stem, kind)
        atomic_write_bytes(Path(root) / rel, content if isinstance(content, bytes) else content.encode())
        out[kind] = rel.as_posix()
    return out


# ----------------------------------------------------------------------------------------------------- report data
@dataclass
class TargetEntry:
    """What the report shows for one target (paths relative to the output dataset)."""

    stem: str
    session: str | None
    modality: str
    qc: dict[str, Any] = field(default_factory=dict)
    sidecar: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)


def load_entries(roots: Sequence[str | os.PathLike], subject: str) -> list[TargetEntry]:
    """The targets of ``subject`` found under ``roots`` (first root wins for a stem found twice).

    Each ``sub-X/qc/<stem>_qc.json`` is one target; its sidecar is the harmonised target's JSON and its figures the
    existing files at :func:`figure_path`, both looked up in every root.
    """
    roots = [Path(r) for r in roots]
    found: dict[str, TargetEntry] = {}
    for root in roots:
        stems = {f.name[: -len("_qc.json")] for f in (root / subject_dir(subject) / "qc").glob("*_qc.json")}
        stems |= {f.name[: -len("_edges.png")] for f in (root / subject_dir(subject) / "figures").glob("*_edges.png")}
        for stem in sorted(stems):
            if stem in found:
                continue
            ents, suffix, _ = bd.parse_name(stem + ".x")
            qc_file = root / qc_path(stem)
            qc: dict[str, Any] = {}
            try:
                if qc_file.is_file():
                    qc = json.loads(qc_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                LOGGER.warning("%s: unreadable QC record (%s)", qc_file, exc)
            entry = TargetEntry(stem=stem, session=ents.get("ses"), modality=suffix, qc=qc)
            # a fused stack's sidecar is its group's output's (qc.json names it)
            fused = (qc.get("parameters") or {}).get("fused_output")
            sidecar_rel = bd.target_output(stem + ".nii.gz", extension=".json")
            if fused:
                sidecar_rel = sidecar_rel.with_name(fused.replace(".nii.gz", ".json"))
            for r in roots:
                if (r / sidecar_rel).is_file():
                    entry.sidecar = json.loads((r / sidecar_rel).read_text())
                    break
            for kind in FIGURE_KINDS:
                if any((r / figure_path(stem, kind)).is_file() for r in roots):
                    entry.figures[kind] = figure_path(stem, kind).as_posix()
            found[stem] = entry
    return sorted(found.values(), key=lambda e: (e.session or "", e.stem))


def load_methods(roots: Sequence[str | os.PathLike], subject: str) -> dict[str | None, str]:
    """Session (None when none) -> methods text, from ``sub-X/qc/*_methods.txt`` (first root wins)."""
    out: dict[str | None, str] = {}
    for root in roots:
        for f in sorted((Path(root) / subject_dir(subject) / "qc").glob("*_methods.txt")):
            ents, _, _ = bd.parse_name(f.name)
            out.setdefault(ents.get("ses"), f.read_text())
    return out


# ------------------------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1400px;margin:0 auto;padding:16px 24px 40px;background:#fff}
h1{font-size:1.6em;margin:.3em 0}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.4em 0 .4em;font-size:1.15em}h4{margin:1em 0 .3em;font-size:1em;color:#444}
table{border-collapse:collapse;margin:.4em 0;font-size:.92em}
td,th{border:1px solid #d0d7de;padding:3px 9px;text-align:right}th{background:#f0f3f6}
td:first-child,th:first-child{text-align:left}
.flag{background:#ffebe9;border:2px solid #d1242f;color:#82071e;padding:8px 12px;border-radius:6px;margin:.5em 0;
font-weight:600}.ok{background:#dafbe1;border:1px solid #2da44e;color:#116329;padding:6px 12px;border-radius:6px;
margin:.5em 0}.better{color:#116329;font-weight:600}.worse{color:#d1242f;font-weight:600}
.bad{background:#ffebe9;color:#82071e;font-weight:600}
figure{margin:.6em 0 1.2em}figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{font-size:.88em;color:#57606a;margin-top:3px;max-width:1000px}
.grid{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}.grid>div{max-width:420px}
.params{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}.params td:last-child{font-family:monospace}
.muted{color:#57606a;font-size:.9em}
nav a{margin-right:10px}pre{white-space:pre-wrap;background:#f6f8fa;padding:8px;font-size:.85em}
.methods{background:#f6f8fa;padding:10px 14px;border-left:4px solid #8c959f;font-size:.93em}
"""

CAPTIONS = {
    "edges": "Registration: the target's reference volume resampled onto the T1w grid with the estimated rigid "
             "transform (grey), T1w edges on top (red). The red outlines should follow the grey boundaries.",
    "mosaic": "Through-plane cuts (planes containing the target's slice axis), same grey window for both rows: "
              "top, the input thick-slice target resampled by cubic interpolation; bottom, the atlasgs output.",
    "uncertainty": "Per-voxel uncertainty, same cuts: top, the atlasgs output; bottom, its posterior standard "
                   "deviation (desc-atlasgsSD, output units), calibrated on the target's own held-out slices. Bright "
                   "where the data constrain the output least (between slices, at edges the T1w does not share).",
    "residual": "Data-consistency residual of the full fit (measured minus fitted forward prediction) on the "
                "target's own acquired slices; blue/red symmetric around zero, white = perfectly explained.",
    "convergence": "Stage-2 solver convergence: relative residual of the conjugate-gradient solve (normal equations) "
                   "per iteration. The data misfit is the 'relative residual' of the Runtime table, not this curve.",
}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "n/a" if x is None else str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "n/a" if not np.isfinite(x) else f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return _e(x)


def _scores_table(sv: dict[str, Any]) -> str:
    ours, cubic = sv.get("atlasgs") or {}, sv.get("cubic") or {}
    rows = []
    for key, label, higher in (("psnr", "PSNR (dB)", True), ("ncc", "NCC", True), ("mae", "MAE", False)):
        a, c = ours.get(key), cubic.get(key)
        cls = ""
        if isinstance(a, (int, float)) and isinstance(c, (int, float)):
            cls = "better" if (a > c) == higher and a != c else "worse"
        rows.append(f"<tr><td>{label}</td><td class='{cls}'>{_num(a)}</td><td>{_num(c)}</td></tr>")
    held = sv.get("heldout_slices") or []
    return ("<table><tr><th>held-out slices</th><th>atlasgs</th><th>cubic</th></tr>" + "".join(rows) + "</table>"
            f"<p class='muted'>PSNR gain over cubic: <b>{_num(sv.get('gain_psnr_db'), 2)} dB</b>; "
            f"{len(held)} slices held out ({_e(', '.join(str(h) for h in held[:20]))}"
            f"{' ...' if len(held) > 20 else ''})"
            f" along voxel axis {_e(sv.get('slice_axis', 'n/a'))}, fitted on {_e(sv.get('n_fit_slices', 'n/a'))}; "
            f"{_num(sv.get('seconds'), 1)} s.</p>")


def _registration_table(reg: dict[str, Any]) -> str:
    ncc, fail, warn = reg.get("ncc"), reg.get("fail_threshold_ncc"), reg.get("warn_threshold_ncc")
    ref, stab = reg.get("refinement") or {}, reg.get("stability") or {}
    cls = "bad" if isinstance(ncc, (int, float)) and isinstance(warn, (int, float)) and ncc < warn else ""
    return ("<table><tr><th>registration</th><th>value</th></tr>"
            f"<tr><td title='{_e(reg.get('ncc_definition', ''))}'>NCC with the T1w</td>"
            f"<td class='{cls}'>{_num(ncc)}</td></tr>"
            + (f"<tr><td>intensity NCC</td><td>{_num(reg['intensity_ncc'])}</td></tr>"
               if reg.get("intensity_ncc") is not None else "") +
            f"<tr><td>brain-mask Dice</td><td>{_num(reg.get('mask_dice'))}</td></tr>"
            f"<tr><td>Mattes mutual information (at its start)</td><td>{_num(reg.get('mattes_mi'))} "
            f"({_num(reg.get('mattes_mi_initial'))})</td></tr>"
            + (f"<tr><td>slice-aware refinement: moved (mm), misfit before &rarr; after</td>"
               f"<td>{_num(ref.get('moved_mm'), 2)}, {_num(ref.get('misfit_before'))} &rarr; "
               f"{_num(ref.get('misfit_after'))}{'' if reg.get('refined') else ' (not kept)'}</td></tr>"
               if ref else "")
            + (f"<tr><td>restart spread (mm; flagged above {_num(stab.get('warn_threshold_mm'), 1)})</td>"
               f"<td class='{'bad' if stab.get('flag') else ''}'>{_num(stab.get('spread_mm'), 2)}</td></tr>"
               if stab else "") +
            f"<tr><td>NCC warn / fail below</td><td>{_num(warn, 2)} / {_num(fail, 2)}</td></tr>"
            f"<tr><td>seconds</td><td>{_num(reg.get('seconds'), 1)}</td></tr></table>"
            + (f"<p class='muted'>NCC: {_e(reg['ncc_definition'])}.</p>" if reg.get("ncc_definition") else ""))


#: Where the report's terms are explained: the project's docs/ folder, named as text (the page makes no network
#: reference, so that it opens the same on an air-gapped cluster).
DOCS_URL = "github.com/atlasgs/atlasgs-bids/blob/main/docs/"


def doc_ref(page: str, anchor: str = "") -> str:
    """``docs/<page>`` in monospace with its full address as a tooltip (text, not a link: no network reference)."""
    return f"<code title='{_e(DOCS_URL + page + ('#' + anchor if anchor else ''))}'>docs/{_e(page)}</code>"
#: Human labels of the sidecar's ``Runtime`` keys, in the order shown.
RUNTIME_LABELS: dict[str, str] = {
    "registration_seconds": "rigid registration (ANTs)",
    "qc_registration_seconds": "registration QC",
    "appearance_seconds": "stage-2 appearance fit",
    "appearance_seconds_build": "of which: building the forward model",
    "appearance_residual_seconds": "residual map",
    "render_seconds": "render on the T1w grid",
    "qc_selfval_seconds": "held-out-slice self-validation",
    "total_seconds": "total",
}
#: Sections of the sidecar's ``Parameters`` shown as tables: key -> heading.
PARAMETER_SECTIONS: dict[str, str] = {
    "acquisition": "Acquisition model (the target's slice profile as fitted)",
    "appearance_options": "Stage-2 appearance fit",
    "registration": "Rigid registration",
    "source_geometry": "Source geometry (the input's, not the output's)",
}
_PARAM_LABELS = {"quality": "quality preset", "seed": "random seed", "SliceThickness": "slice thickness from the "
                 "sidecar (mm)", "modality": "modality", "slice_axis": "slice axis (voxel axis of the target)",
                 "slice_spacing_mm": "slice spacing (mm)", "slice_thickness_mm": "slice thickness used (mm)",
                 "slice_thickness_source": "thickness taken from", "profile": "slice profile",
                 "edge_fwhm_mm": "soft edge of the box profile, FWHM (mm)",
                 "profile_from_data": "profile chosen on held-out slices",
                 "header_profile": "slice profile from the header",
                 "header_slice_thickness_mm": "slice thickness from the header (mm)"}


def _label(key: str) -> str:
    """A readable label: a known one, else the key with spaces (``max_iter`` -> ``max iter``)."""
    return _PARAM_LABELS.get(key) or RUNTIME_LABELS.get(key) or re.sub(r"(?<=[a-z])(?=[A-Z])", " ",
                                                                        key.replace("_", " "))


def _value(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return _e(", ".join(str(v) for v in x))
    if isinstance(x, dict):
        return _e(json.dumps(x, default=str))
    return _num(x, 4) if isinstance(x, (float, np.floating)) else _e(x)


def parameters_html(params: dict[str, Any]) -> str:
    """Every run parameter of a target as labelled tables: the run's own (quality, seed, ...), then one table per
    :data:`PARAMETER_SECTIONS` entry present; anything else under its own key."""
    top = {k: v for k, v in params.items() if not isinstance(v, dict)}
    tables = []
    if top:
        tables.append("<div><h4>Run</h4><table>" + "".join(
            f"<tr><td>{_e(_label(k))}</td><td>{_value(v)}</td></tr>" for k, v in top.items()) + "</table></div>")
    sections = [k for k in PARAMETER_SECTIONS if isinstance(params.get(k), dict)]
    sections += [k for k, v in params.items() if isinstance(v, dict) and k not in PARAMETER_SECTIONS]
    for key in sections:
        rows = "".join(f"<tr><td>{_e(_label(k))}</td><td>{_value(v)}</td></tr>" for k, v in params[key].items())
        tables.append(f"<div><h4>{_e(PARAMETER_SECTIONS.get(key, _label(key)))}</h4><table>{rows}</table></div>")
    return "<div class='params'>" + "".join(tables) + "</div>"


def _runtime_table(entry: TargetEntry) -> str:
    rt = entry.sidecar.get("Runtime") or {}
    fit = entry.qc.get("fit") or {}
    order = [k for k in RUNTIME_LABELS if k in rt] + [k for k in rt if k not in RUNTIME_LABELS]
    rows = [f"<tr><td>{_e(_label(k).removesuffix(' seconds'))}</td><td>{_num(rt[k], 1)}</td></tr>" for k in order
            if isinstance(rt[k], (int, float))]
    extra = [("Gaussians", fit.get("n_gaussians")), ("solver iterations", fit.get("iterations")),
             ("relative residual", fit.get("relative_residual"))]
    rows += [f"<tr><td>{k}</td><td>{_num(v, 4)}</td></tr>" for k, v in extra if v is not None]
    device = entry.qc.get("device") or entry.sidecar.get("Device", "n/a")
    version = entry.qc.get("version") or entry.sidecar.get("Version", "n/a")
    rows += [f"<tr><td>device</td><td>{_e(device)}</td></tr>", f"<tr><td>version</td><td>{_e(version)}</td></tr>"]
    return "<table><tr><th>run</th><th>seconds / value</th></tr>" + "".join(rows) + "</table>"


def flags_html(flags: Sequence[str]) -> str:
    """A loud red box per flag, or a quiet green line when there is none."""
    if not flags:
        return "<div class='ok'>No QC flags.</div>"
    return "".join(f"<div class='flag'>&#9888; {_e(f)}: {_e(FLAG_TEXT.get(f, 'see docs/qc.md'))}</div>"
                   for f in flags)


def _entry_flags(entry: TargetEntry) -> list[str]:
    flags = entry.qc.get("flags")
    if flags is None:
        flags = entry.sidecar.get("QCFlags") or []
    return list(flags)


def _target_section(entry: TargetEntry) -> str:
    parts = [f"<section id='{_e(entry.stem)}'><h3>{_e(entry.stem)} <span class='muted'>({_e(entry.modality)})</span>"
             "</h3>", flags_html(_entry_flags(entry))]
    if not entry.qc:
        parts.append("<div class='flag'>No QC record for this target (run without self-validation?).</div>")
    tables = []
    if entry.qc.get("self_validation"):
        tables.append("<div><h4>Self-validation on held-out slices</h4>" + _scores_table(entry.qc["self_validation"])
                      + "</div>")
    if entry.qc.get("registration"):
        tables.append("<div><h4>Registration</h4>" + _registration_table(entry.qc["registration"]) + "</div>")
    tables.append("<div><h4>Runtime</h4>" + _runtime_table(entry) + "</div>")
    parts.append("<div class='grid'>" + "".join(tables) + "</div>")
    for kind in FIGURE_KINDS:
        if kind in entry.figures:
            parts.append(f"<figure><img src='{_e(entry.figures[kind])}' alt='{_e(kind)} of {_e(entry.stem)}'>"
                         f"<figcaption>{_e(CAPTIONS[kind])}</figcaption></figure>")
    # the sidecar's Parameters are the full set (acquisition, appearance, registration); the QC record's are a few
    params = {**(entry.qc.get("parameters") or {}), **(entry.sidecar.get("Parameters") or {})}
    parts.append(f"<h4>Parameters <span class='muted'>(the sidecar's keys: {doc_ref('usage.md', 'outputs')})"
                 "</span></h4>" + parameters_html(params) + "</section>")
    return "".join(parts)


def render_subject_html(subject: str, entries: Sequence[TargetEntry], methods: dict[str | None, str] | None = None,
                        *, version: str = "") -> str:
    """The whole ``sub-X.html`` (self-contained apart from the figures it links relative to the output root)."""
    methods = methods or {}
    sessions = sorted({e.session for e in entries} | set(methods), key=lambda s: s or "")
    summary = ["<table><tr><th>session</th><th>target</th><th>held-out gain (dB)</th><th>registration NCC</th>"
               "<th>flags</th></tr>"]
    for e in entries:
        flags = _entry_flags(e)
        summary.append(
            f"<tr><td>{_e(e.session or 'n/a')}</td><td><a href='#{_e(e.stem)}'>{_e(e.stem)}</a></td>"
            f"<td>{_num((e.qc.get('self_validation') or {}).get('gain_psnr_db'), 2)}</td>"
            f"<td>{_num((e.qc.get('registration') or {}).get('ncc'))}</td>"
            f"<td class='{'bad' if flags else ''}'>{_e(', '.join(flags) or 'none')}</td></tr>")
    summary.append("</table>")
    body = [f"<h1>atlasgs-bids report: sub-{_e(subject)}</h1>",
            f"<p class='muted'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{' by atlasgs-bids ' + _e(version) if version else ''}. What each figure and number means: "
            f"{doc_ref('qc.md')}; the outputs and their sidecars: {doc_ref('usage.md', 'outputs')}; errors and what "
            f"to do: {doc_ref('troubleshooting.md')} (in the atlasgs-bids repository, {_e(DOCS_URL)}).</p>",
            "<h2>Summary</h2>", "".join(summary) if entries else "<div class='flag'>No harmonised target found.</div>"]
    for ses in sessions:
        if len(sessions) > 1 or ses:
            body.append(f"<h2>Session {_e(ses)}</h2>" if ses else "<h2>No session</h2>")
        else:
            body.append("<h2>Targets</h2>")
        body.extend(_target_section(e) for e in entries if e.session == ses)
        if methods.get(ses):
            body.append("<h4>Methods</h4><div class='methods'>"
                        + "".join(f"<p>{_e(p)}</p>" for p in methods[ses].split("\n\n") if p.strip()) + "</div>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sub-{_e(subject)}: atlasgs-bids report</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")


def write_subject_html(root: str | os.PathLike, subject: str, *, read_roots: Sequence[str | os.PathLike] = (),
                       sidecars: dict[str, dict[str, Any]] | None = None, version: str = "") -> Path:
    """Write ``<root>/sub-X.html`` from the QC records, sidecars and figures found in ``read_roots`` (default
    ``[root]``); figure links are relative to ``root``, the folder the page ends up beside. ``sidecars`` (stem ->
    content) win over the sidecar files (in a run, the report is drawn before the sidecars are staged)."""
    roots = list(read_roots) or [root]
    entries = load_entries(roots, subject)
    for entry in entries:
        if sidecars and entry.stem in sidecars:
            entry.sidecar = sidecars[entry.stem]
    text = render_subject_html(subject, entries, load_methods(roots, subject), version=version)
    return atomic_write_bytes(Path(root) / f"sub-{subject}.html", text.encode())


# ------------------------------------------------------------------------------------------------- one target, all
def report_target(root: str | os.PathLike, *, target_file: str | os.PathLike, modality: str,
                  t1w_file: str | os.PathLike, mask_file: str | os.PathLike | None, harmonized_file: str | os.PathLike,
                  xfm_file: str | os.PathLike, qc: dict[str, Any] | None = None,
                  residual_file: str | os.PathLike | None = None, target_ref_file: str | os.PathLike | None = None,
                  bval_file: str | os.PathLike | None = None, aslcontext_file: str | os.PathLike | None = None,
                  sd_file: str | os.PathLike | None = None, keep_qc: bool = True) -> dict[str, str]:
    """Draw and save every figure of one target under ``root``; with ``keep_qc`` also save its QC record and
    residual under ``sub-X/qc/`` (the inputs of ``--reports-only``). Returns kind -> figure path under ``root``.

    ``xfm_file`` is the ``from-<suffix>_to-T1w_mode-image`` ITK transform (holding T1w RAS -> target RAS; the
    figures use its inverse, :func:`atlasgs_bids.imaging.transforms.read_target2t1w`).
    """
    from atlasgs_bids.imaging.reference import reference_array
    from atlasgs_bids.imaging.transforms import read_target2t1w

    stem = target_stem(target_file)
    target_img = nib.load(str(target_file))
    ref = (np.asarray(nib.load(str(target_ref_file)).dataobj, dtype=np.float32) if target_ref_file
           else reference_array(target_img.get_fdata(dtype=np.float32), modality=modality, bval_file=bval_file, aslcontext_file=aslcontext_file,
                                source=target_file))
    residual_img = nib.load(str(residual_file)) if residual_file else None
    figures = draw_target_figures(
        t1w_img=nib.load(str(t1w_file)), mask_img=nib.load(str(mask_file)) if mask_file else None,
        target_img=target_img, target_ref=ref, harmonized_img=nib.load(str(harmonized_file)),
        target2t1w=read_target2t1w(xfm_file), residual_img=residual_img, qc=qc,
        sd_img=nib.load(str(sd_file)) if sd_file else None)
    if keep_qc:
        if qc is not None:
            bd.atomic_write_json(Path(root) / qc_path(stem), qc)
        if residual_file and Path(residual_file).resolve() != (Path(root) / qc_path(stem, "residual.nii.gz")).resolve():
            bd.atomic_copy(residual_file, Path(root) / qc_path(stem, "residual.nii.gz"))
    return save_figures(root, stem, figures)


def regenerate_reports(output_dir: str | os.PathLike, subject_inputs: Iterable[Any], *,
                       version: str = "") -> list[Path]:
    """``--reports-only``: redraw every figure and write every ``sub-X.html`` from the derivatives and the saved QC
    records (nothing is fitted). ``subject_inputs`` are :class:`~atlasgs_bids.bids.layout.SubjectInputs` (the raw
    targets are re-read for the input mosaics). Targets without derivatives are skipped with a warning."""
    out = Path(output_dir)
    pages: dict[str, Path] = {}
    for si in subject_inputs:
        t1w = out / bd.t1w_preproc_output(si.t1w)
        mask = out / bd.brain_mask_output(si.t1w)
        groups = {t.path: g for g in fusion_groups(si.targets) for t in g}
        for target in si.targets:
            harmonized, xfm = out / bd.target_output(target.path), out / bd.xfm_output(target.path)
            if not harmonized.is_file() and len(groups[target.path]) > 1:  # a run with --fuse-stacks
                harmonized = out / bd.fused_target_output([t.path for t in groups[target.path]])
            if not (t1w.is_file() and harmonized.is_file() and xfm.is_file()):
                LOGGER.warning("%s: no derivatives in %s; not in the report", target.path.name, out)
                continue
            stem = target_stem(target.path)
            qc_file, residual = out / qc_path(stem), out / qc_path(stem, "residual.nii.gz")
            qc = json.loads(qc_file.read_text()) if qc_file.is_file() else None
            sd = out / bd.sd_output(target.path)
            report_target(out, target_file=target.path, modality=target.modality, t1w_file=t1w,
                          mask_file=mask if mask.is_file() else None, harmonized_file=harmonized, xfm_file=xfm, qc=qc,
                          residual_file=residual if residual.is_file() else None, bval_file=target.bval,
                          aslcontext_file=target.aslcontext, sd_file=sd if sd.is_file() else None, keep_qc=False)
        if load_entries([out], si.subject):
            pages[si.subject] = write_subject_html(out, si.subject, version=version)
        else:
            LOGGER.warning("sub-%s: nothing to report in %s (run the participant level first)", si.subject, out)
    return list(pages.values())

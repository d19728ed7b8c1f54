"""QC reports: figures from arrays, the subject and group pages (self-contained, every image present), robust
outliers, missing/failed participants, headless Chromium, and the app end to end (participant, group,
``--reports-only``) on the tiny sample."""
from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.reports import figures as fg
from atlasgs_bids.reports import group as rg
from atlasgs_bids.reports import subject as rs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- fixtures
def _ball(shape=(40, 44, 36), radius=14.0) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, dtype=float) - 1) / 2
    r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    inner = r < radius * 0.55
    return np.where(r < radius, np.where(inner, 2.0, 1.0), 0.0).astype(np.float32)


def hand_made_qc(target: str = "sub-01_T2w.nii.gz", *, flags=("selfval_not_better_than_cubic",)) -> dict:
    """A QC record following the qc-core contract (docs/qc.md)."""
    return {
        "target": target, "modality": "T2w", "version": "0.1.0", "device": "cpu",
        "parameters": {"quality": "fast", "seed": 0, "SliceThickness": 6.0},
        "registration": {"ncc": 0.91, "mask_dice": 0.95, "mattes_mi": -0.6, "fail_threshold_ncc": 0.2,
                         "warn_threshold_ncc": 0.5, "flag": False, "seconds": 1.5},
        "self_validation": {"slice_axis": 2, "heldout_slices": [2, 5], "n_fit_slices": 10,
                            "atlasgs": {"psnr": 30.1, "ncc": 0.95, "mae": 0.02},
                            "cubic": {"psnr": 31.0, "ncc": 0.96, "mae": 0.018},
                            "gain_psnr_db": -0.9, "flag": True, "seconds": 3.0},
        "fit": {"relative_residual": 0.08, "iterations": 12, "history": [1.0, 0.4, 0.2, 0.12, 0.09, 0.08],
                "seconds": 4.0, "render_seconds": 1.0, "n_gaussians": 5000},
        "flags": list(flags),
    }


@pytest.fixture()
def synthetic_subject(tmp_path):
    """A T1w ball (1 mm), a thick-slice target of it (3 mm along k), identity transform, residual, QC record,
    sidecar: the inputs of one target's report, laid out as a run leaves them."""
    from atlasgs_bids.bids import derivatives as bd
    from atlasgs_bids.imaging.transforms import write_itk_affine

    raw, out = tmp_path / "raw", tmp_path / "out"
    t1w_data = _ball()
    t1w = nib.Nifti1Image(t1w_data, np.eye(4))
    target_file = raw / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
    target_file.parent.mkdir(parents=True)
    thick = t1w_data.reshape(40, 44, 12, 3).mean(-1)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    aff[2, 3] = 1.0
    nib.save(nib.Nifti1Image(2.5 - thick, aff), target_file)
    paths = {"t1w": out / bd.t1w_preproc_output(raw / "sub-01/anat/sub-01_T1w.nii.gz"),
             "mask": out / bd.brain_mask_output(raw / "sub-01/anat/sub-01_T1w.nii.gz"),
             "harmonized": out / bd.target_output(target_file), "xfm": out / bd.xfm_output(target_file),
             "sidecar": out / bd.target_output(target_file, extension=".json"), "residual": tmp_path / "res.nii.gz",
             "qc": tmp_path / "qc.json", "target": target_file, "sd": out / bd.sd_output(target_file)}
    paths["t1w"].parent.mkdir(parents=True)
    nib.save(t1w, paths["t1w"])
    nib.save(nib.Nifti1Image((t1w_data > 0).astype(np.uint8), np.eye(4)), paths["mask"])
    nib.save(nib.Nifti1Image(np.where(t1w_data > 0, 2.5 - t1w_data, 0).astype(np.float32), np.eye(4)),
             paths["harmonized"])
    nib.save(nib.Nifti1Image(np.where(t1w_data > 0, 0.1, 0).astype(np.float32), np.eye(4)), paths["sd"])
    write_itk_affine(paths["xfm"], np.eye(4))
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image((rng.normal(0, 0.05, thick.shape) * (thick > 0)).astype(np.float32), aff),
             paths["residual"])
    paths["qc"].write_text(json.dumps(hand_made_qc()))
    paths["sidecar"].write_text(json.dumps({"Runtime": {"registration_seconds": 1.5, "total_seconds": 9.0},
                                            "Device": "cpu", "Version": "0.1.0",
                                            "QCFlags": ["selfval_not_better_than_cubic"],
                                            "Metrics": {"heldout_gain_db": -0.9}}))
    return out, paths


def _srcs(page: Path) -> list[str]:
    return re.findall(r"<img[^>]*\bsrc=['\"]([^'\"]+)['\"]", page.read_text())


def assert_self_contained(page: Path) -> None:
    """No network reference anywhere; every <img src> is a relative file that exists beside the page."""
    text = page.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text), "network reference in the page"
    assert "<script src" not in text and "<link" not in text
    for src in _srcs(page):
        assert not src.startswith(("/", "http")), src
        assert (page.parent / src).is_file(), f"{page.name}: missing image {src}"


# ------------------------------------------------------------------------------------------------------ figures
def test_figures_from_arrays():
    t1w = _ball()
    mask = t1w > 0
    png = fg.edges_overlay_png(t1w, t1w, (1.0, 1.0, 1.0), mask)
    assert png.startswith(PNG_MAGIC)
    mos = fg.compare_mosaic_png({"cubic": t1w * 0.9, "atlasgs": t1w}, 1, (1.0, 1.0, 1.0), mask, n=5)
    assert mos.startswith(PNG_MAGIC)
    sd = fg.sd_mosaic_png(t1w, np.where(mask, 5.0, 0.0).astype(np.float32), 1, (1.0, 1.0, 1.0), mask)
    assert sd.startswith(PNG_MAGIC)
    res = fg.residual_mosaic_png(np.where(mask, 0.1, 0.0).astype(np.float32), 2, (1.0, 1.0, 3.0))
    assert res.startswith(PNG_MAGIC)
    svg = fg.convergence_svg([1.0, 0.3, 0.1])
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    # edges sit on the ball's boundaries (outer sphere and inner core), not inside the uniform shell
    edges = fg.edge_map(t1w[:, :, 18].T, mask[:, :, 18].T)
    assert edges.any()
    dist = np.sqrt(((np.indices(edges.shape) - ((np.array(edges.shape)[:, None, None] - 1) / 2)) ** 2).sum(0))
    radii = dist[edges]
    assert np.all((np.abs(radii - 14.0) < 2.5) | (np.abs(radii - 14.0 * 0.55) < 2.5))


def test_mosaic_indices_cover_the_mask():
    mask = np.zeros((20, 30, 10), bool)
    mask[5:15, 10:20, 2:8] = True
    idx = fg.mosaic_indices(mask, mask.shape, 1, 4)
    assert min(idx) >= 10 and max(idx) <= 19 and len(idx) == 4
    assert fg.window(np.arange(101.0), low=0, high=100) == (0.0, 100.0)


def test_slice_axis_on_grid_follows_the_rotation():
    rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # target k -> world -y
    assert rs.slice_axis_on_grid(np.eye(4), rot, np.eye(4), 2) == 1
    assert rs.slice_axis_on_grid(np.eye(4), np.eye(4), np.eye(4), 2) == 2


# --------------------------------------------------------------------------------------------------- subject page
def test_subject_report_from_hand_made_qc(synthetic_subject):
    out, p = synthetic_subject
    qc = json.loads(p["qc"].read_text())
    drawn = rs.report_target(out, target_file=p["target"], modality="T2w", t1w_file=p["t1w"], mask_file=p["mask"],
                             harmonized_file=p["harmonized"], xfm_file=p["xfm"], qc=qc, residual_file=p["residual"],
                             sd_file=p["sd"])
    assert set(drawn) == set(rs.FIGURE_KINDS)
    assert (out / "sub-01/qc/sub-01_T2w_qc.json").is_file()
    assert (out / "sub-01/qc/sub-01_T2w_residual.nii.gz").is_file()
    page = rs.write_subject_html(out, "01", version="0.1.0")
    assert page == out / "sub-01.html"
    assert_self_contained(page)
    assert sorted(_srcs(page)) == sorted(drawn.values())
    text = page.read_text()
    # the flag is shown loudly, the held-out scores of both methods and the registration NCC are there
    assert "class='flag'" in text and "selfval_not_better_than_cubic" in text
    assert "30.100" in text and "31.000" in text and "0.910" in text
    assert "<td>total</td>" in text and "cpu" in text


def test_subject_report_without_flags_is_quiet(synthetic_subject):
    out, p = synthetic_subject
    qc = hand_made_qc(flags=())
    rs.report_target(out, target_file=p["target"], modality="T2w", t1w_file=p["t1w"], mask_file=p["mask"],
                     harmonized_file=p["harmonized"], xfm_file=p["xfm"], qc=qc, residual_file=None)
    p["sidecar"].write_text(json.dumps({"Runtime": {}, "QCFlags": []}))
    text = rs.write_subject_html(out, "01").read_text()
    assert "No QC flags" in text and "class='flag'" not in text
    assert "_residual.png" not in text  # no residual given: no residual figure, no broken link


# ------------------------------------------------------------------------------------------------------ group
def test_robust_band_flags_known_outliers():
    from scipy.stats import norm

    values = list(30.0 + 0.5 * norm.ppf(np.linspace(0.02, 0.98, 40)))  # normal quantiles, |z| <= 2.05
    values[3], values[17] = 20.0, 41.0
    values.append(None)
    mask, band = rg.robust_band(values)
    assert np.flatnonzero(mask).tolist() == [3, 17]
    assert band[0] < 29 and band[1] > 31
    assert not rg.robust_band([1.0, 2.0, 30.0])[0].any()  # too few rows: nothing flagged
    assert rg.robust_band([1.0] * 6 + [5.0])[0].tolist() == [False] * 6 + [True]  # MAD 0: the 1 % floor
    assert not rg.robust_band([0.950, 0.9502, 0.9503, 0.9501, 0.949])[0].any()  # agree to 1 %: no outlier
    assert not rg.robust_band([0.0] * 6)[0].any()  # no spread at all: nothing flagged


def _write_sidecar(out: Path, sub: str, psnr: float, flags=()) -> None:
    f = out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-T1w_desc-atlasgs_T2w.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"Sources": [f"bids:raw:sub-{sub}/anat/sub-{sub}_T2w.nii.gz"],
                             "Runtime": {"total_seconds": 10.0}, "Device": "cpu", "QCFlags": list(flags),
                             "Metrics": {"heldout_psnr": psnr, "registration_ncc": 0.9 + 0.001 * int(sub)}}))


def test_group_table_and_page(tmp_path):
    from atlasgs_bids.workflows.group import write_group_qc

    out = tmp_path / "out"
    psnr = {f"{i:02d}": 30.0 + 0.1 * (i % 5) for i in range(1, 9)}
    psnr["05"] = 18.0  # the known outlier
    for sub, v in psnr.items():
        _write_sidecar(out, sub, v, flags=("registration_poor",) if sub == "07" else ())
    (out / "sub-01.html").write_text("<html></html>")
    (out / "logs").mkdir()
    (out / "logs" / "sub-09_status.json").write_text(json.dumps({"status": "failed", "error": "ProcessingError: x"}))
    tsv = write_group_qc(out, [*psnr, "09", "10"])
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    by = {r["participant_id"]: r for r in rows}
    assert by["sub-05"]["outlier_heldout_psnr"] == "True" and by["sub-05"]["outliers"] == "heldout_psnr"
    assert {r["participant_id"] for r in rows if r.get("outlier_heldout_psnr") == "True"} == {"sub-05"}
    assert by["sub-07"]["qc_flags"] == "registration_poor"
    assert by["sub-09"]["status"] == "failed" and by["sub-10"]["status"] == "missing"
    page = out / "group_qc.html"
    text = page.read_text()
    assert_self_contained(page)
    assert "<svg" in text and "href='sub-01.html'" in text and "href='sub-02.html'" not in text
    failed_block = text.split("Failed or missing participants")[1].split("Distributions")[0]
    assert "sub-09" in failed_block and "sub-10" in failed_block and "ProcessingError: x" in failed_block


def test_group_page_with_nothing_but_failures(tmp_path):
    from atlasgs_bids.workflows.group import write_group_qc

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "sub-01_status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    write_group_qc(out, ["01", "02"])
    text = (out / "group_qc.html").read_text()
    assert "1 failed" in text and "1 missing" in text


# ------------------------------------------------------------------------------------------------------ chromium
PROBE = ("<script>window.__errs=[];window.addEventListener('error',function(e){window.__errs.push(String(e.message"
         "||(e.target&&e.target.src)))},true);window.addEventListener('load',function(){var bad=[];"
         "for(const im of document.images){if(!(im.complete&&im.naturalWidth>0))bad.push(im.getAttribute('src'))}"
         "var d=document.createElement('pre');d.textContent='PROBE '+JSON.stringify({n:document.images.length,"
         "bad:bad,errs:window.__errs});document.body.appendChild(d)});</script>")


def chromium_probe(page: Path) -> dict:
    """Load ``page`` in headless Chromium (with a probe script injected into a copy beside it) and return
    ``{"n": images, "bad": [srcs not loaded], "errs": [script errors]}``."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    try:
        proc = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                               "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
                               probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r"PROBE (\{.*?\})</pre>", proc.stdout)
    assert found, f"chromium gave no probe result: {proc.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"'))


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")


@needs_chromium
def test_pages_load_in_chromium(synthetic_subject):
    out, p = synthetic_subject
    rs.report_target(out, target_file=p["target"], modality="T2w", t1w_file=p["t1w"], mask_file=p["mask"],
                     harmonized_file=p["harmonized"], xfm_file=p["xfm"], qc=hand_made_qc(),
                     residual_file=p["residual"])
    page = rs.write_subject_html(out, "01")
    from atlasgs_bids.workflows.group import write_group_qc

    write_group_qc(out, ["01"])
    result = chromium_probe(page)
    assert result["n"] == 4 and result["bad"] == [] and result["errs"] == []
    result = chromium_probe(out / "group_qc.html")
    assert result["bad"] == [] and result["errs"] == []
    # the probe does see a broken image
    (out / "sub-01/figures/sub-01_T2w_mosaic.png").unlink()
    assert chromium_probe(page)["bad"] == ["sub-01/figures/sub-01_T2w_mosaic.png"]


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_app_reports_end_to_end(tiny_run, tmp_path):
    """participant (the session's reference run, copied: report staged and committed), group (table + page), then
    --reports-only redraws the figures."""
    import shutil

    from atlasgs_bids.bids.validate import validate_dataset
    from atlasgs_bids.cli import main

    bids = tiny_run.bids  # sub-02 is in the dataset but was never run: the group level lists it as missing
    out = shutil.copytree(tiny_run.out, tmp_path / "out", symlinks=True)
    common = ["--quality", "fast", "--skull-stripped", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    page = out / "sub-01.html"
    assert_self_contained(page)
    srcs = _srcs(page)
    assert {Path(s).name for s in srcs} >= {"sub-01_T2w_edges.png", "sub-01_T2w_mosaic.png"}
    text = page.read_text()
    assert "Methods" in text and "Gaussian scaffold" in text
    if "qc_json" in (Path(__file__).parents[1] / "atlasgs_bids/workflows/target.py").read_text():
        assert {Path(s).name for s in srcs} >= {"sub-01_T2w_residual.png", "sub-01_T2w_convergence.svg"}
        assert (out / "sub-01/qc/sub-01_T2w_qc.json").is_file()
        assert "Self-validation on held-out slices" in text
    assert not list(out.glob(".staging-*"))
    assert main([str(bids), str(out), "group"]) == 0
    rows = list(csv.DictReader((out / "group_qc.tsv").open(), delimiter="\t"))
    assert [r["status"] for r in rows] == ["ok", "missing"]
    assert_self_contained(out / "group_qc.html")
    assert "href='sub-01.html'" in (out / "group_qc.html").read_text()
    figures = sorted((out / "sub-01/figures").iterdir())
    before = {f: f.stat().st_mtime_ns for f in figures}
    for f in figures:
        f.unlink()
    page.unlink()
    assert main([str(bids), str(out), "participant", "--participant-label", "01", "--reports-only", *common]) == 0
    assert sorted((out / "sub-01/figures").iterdir()) == figures and page.is_file()
    assert_self_contained(page)
    assert all(f.stat().st_mtime_ns != before[f] for f in figures)
    validate_dataset(out)  # figures/, qc/ and the pages are .bidsignored: 0 errors


def test_subject_page_covers_staged_and_committed_sessions(tmp_path):
    """A session's run stages its records; the page it writes also covers sessions committed earlier (the staged
    record wins for a target found in both)."""
    stage, out = tmp_path / "stage", tmp_path / "out"
    for root, ses, gain in ((out, "1", 1.5), (out, "2", -3.0), (stage, "2", 2.25)):
        f = root / rs.qc_path(f"sub-01_ses-{ses}_T2w")
        f.parent.mkdir(parents=True, exist_ok=True)
        qc = hand_made_qc(f"sub-01_ses-{ses}_T2w.nii.gz", flags=())
        qc["self_validation"]["gain_psnr_db"] = gain
        f.write_text(json.dumps(qc))
    (stage / rs.methods_path("01", "2")).write_text("Session two methods.")
    text = rs.write_subject_html(stage, "01", read_roots=[stage, out]).read_text()
    assert "Session 1" in text and "Session 2" in text and "Session two methods." in text
    assert "2.25" in text and "1.50" in text and "-3.00" not in text


def test_participant_wf_wires_the_report(tiny_sample, tmp_path):
    """With a staging folder the participant workflow has one ``subject_report`` node fed by every target
    workflow (QC record and residual included); without one (``--reports-only`` methods text) it has none."""
    from atlasgs_bids.bids.layout import collect_inputs
    from atlasgs_bids.config import Config
    from atlasgs_bids.workflows.participant import init_participant_wf

    si = collect_inputs(tiny_sample.bids_dir)[0]
    config = Config.build(bids_dir=tiny_sample.bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                          device="cpu")
    wf = init_participant_wf(subject_inputs=si, config=config, stage_dir=tmp_path / "stage")
    report = wf.get_node("subject_report")
    assert report is not None and report.inputs.target_files == [str(t.path) for t in si.targets]
    assert "Gaussian scaffold" in report.inputs.methods
    sources = {(u.name, v) for u, _, data in wf._graph.in_edges(report, data=True)  # noqa: SLF001
               for _, v in data["connect"]}
    assert {v for _, v in sources} >= {"t1w_preproc", "brain_mask", "target_refs", "xfms", "harmonized", "sidecars",
                                       "qc_jsons", "residuals"}
    assert init_participant_wf(subject_inputs=si, config=config).get_node("subject_report") is None


def test_subject_report_shows_every_parameter_with_labels(synthetic_subject):
    """The full Parameters of the sidecar (acquisition, appearance, registration, source geometry) as labelled
    tables, runtime keys as words, the docs named; the mosaic is large (>= 1000 px wide) with orientation letters."""
    from atlasgs_bids.bids import derivatives as bd

    out, p = synthetic_subject
    sidecar = {"Parameters": {"quality": "fast", "seed": 0, "modality": "T2w",
                              "acquisition": {"slice_axis": 2, "slice_thickness_mm": 3.0, "profile": "gaussian"},
                              "appearance_options": {"lam": 0.05, "max_iter": 300},
                              "registration": {"metric": "mattes", "shrink_factors": [4, 2, 1]},
                              "source_geometry": {"SpacingBetweenSlices": 3.0}},
               "Runtime": {"registration_seconds": 2.0, "appearance_seconds": 5.0, "appearance_seconds_build": 3.0,
                           "render_seconds": 1.0, "total_seconds": 8.0}, "Device": "cpu"}
    bd.atomic_write_json(p["sidecar"], sidecar)
    drawn = rs.report_target(out, target_file=p["target"], modality="T2w", t1w_file=p["t1w"], mask_file=p["mask"],
                             harmonized_file=p["harmonized"], xfm_file=p["xfm"], qc=hand_made_qc(),
                             residual_file=p["residual"])
    text = rs.write_subject_html(out, "01").read_text()
    for heading in rs.PARAMETER_SECTIONS.values():
        assert html.escape(heading, quote=True) in text, heading
    for label in ("slice thickness used (mm)", "max iter", "shrink factors", "4, 2, 1", "Spacing Between Slices",
                  "rigid registration (ANTs)", "of which: building the forward model", "render on the T1w grid"):
        assert label in text, label
    assert "registration_seconds" not in text and "<pre>" not in text
    assert "docs/qc.md" in text and "docs/usage.md" in text
    from PIL import Image

    with Image.open(out / drawn["mosaic"]) as im:
        assert im.width >= 1000, im.size


def _cohort_rows(n: int) -> list[dict]:
    """``n`` participants, one T2w each: a few failed and missing, two flagged, normal-looking metrics."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pid = f"sub-{i:05d}"
        status = "failed" if i % 997 == 3 else "missing" if i % 1499 == 7 else "ok"
        row = {"participant_id": pid, "session_id": "n/a", "target": f"{pid}/anat/{pid}_T2w.nii.gz",
               "modality": "T2w", "status": status}
        if status == "ok":
            row.update(registration_ncc=rng.normal(0.8, 0.03), heldout_psnr=rng.normal(30, 1.5),
                       heldout_gain_db=rng.normal(4, 1), runtime_seconds=rng.normal(300, 40),
                       qc_flags="registration_low_ncc" if i in (11, 4242) else "n/a")
        else:
            row["error"] = "InputError: truncated"
        rows.append(row)
    return rows


def test_group_page_scales_to_ten_thousand_participants():
    """10,000 participants: written in seconds, a few MB, histograms instead of 10,000-point plots, and the table
    starts with the failed, then the missing, then the flagged targets."""
    import time as _time

    from atlasgs_bids.reports.group import add_outlier_columns, render_group_html

    rows = _cohort_rows(10_000)
    t0 = _time.perf_counter()
    bands = add_outlier_columns(rows)
    text = render_group_html(rows, bands)
    assert _time.perf_counter() - t0 < 20
    assert len(text) < 12e6
    assert text.count("<svg") >= 4 and "outliers)" in text  # histogram titles: "metric (n=..., k outliers)"
    assert "docs/qc.md" in text and "docs/troubleshooting.md" in text
    table = text[text.index("id='targets'"):]
    order = re.findall(r"<tr data-flagged='(\d)'[^>]*><td>(sub-\d+)</td><td>[^<]*</td><td[^>]*>[^<]*</td>"
                       r"<td[^>]*>(\w+)</td>", table)
    assert len(order) == 10_000
    statuses = [s for _, _, s in order]
    n_failed, n_missing = statuses.count("failed"), statuses.count("missing")
    assert statuses[:n_failed] == ["failed"] * n_failed and statuses[n_failed:n_failed + n_missing] == \
        ["missing"] * n_missing
    flags = [flag for flag, _, _ in order]
    n_flagged = flags.count("1")
    assert flags == ["1"] * n_flagged + ["0"] * (10_000 - n_flagged)  # flagged (incl. failed, missing) first
    assert {"sub-00011", "sub-04242"} <= {p for _, p, _ in order[n_failed + n_missing:n_flagged]}
    assert n_flagged - n_failed - n_missing < 200  # flags and outliers only, not the whole table


GROUP_PROBE = ("<script>window.addEventListener('load',function(){setTimeout(function(){"
               "var vis=function(){return Array.prototype.filter.call(document.querySelectorAll('#targets tbody tr'),"
               "function(r){return r.style.display!=='none'}).map(function(r){return r.cells[0].textContent})};"
               "var res={shown:document.getElementById('shown').textContent,filtered:vis()};"
               "document.getElementById('filter').value='';document.getElementById('only-flagged').checked=false;"
               "document.getElementById('filter').dispatchEvent(new Event('input'));"
               "var th=Array.prototype.filter.call(document.querySelectorAll('#targets th'),"
               "function(t){return t.textContent==='held-out PSNR'})[0];th.click();"
               "res.lowest=vis().slice(0,1);th.click();res.highest=vis().slice(0,1);"
               "var d=document.createElement('pre');d.textContent='PROBE '+JSON.stringify(res);"
               "document.body.appendChild(d)},0)});</script>")


@needs_chromium
def test_group_page_filters_and_sorts_in_chromium(tmp_path):
    """In headless Chromium: ``#filter=...`` keeps the matching row only; a click on a column sorts by it."""
    from atlasgs_bids.reports.group import add_outlier_columns, render_group_html

    rows = _cohort_rows(500)
    text = render_group_html(rows, add_outlier_columns(rows))
    page = tmp_path / "group_qc.html"
    page.write_text(text.replace("<head>", "<head>" + GROUP_PROBE, 1))
    proc = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri() + "#filter=sub-00042"],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"PROBE (\{.*?\})</pre>", proc.stdout)
    assert found, proc.stderr[-2000:]
    res = json.loads(html.unescape(found.group(1)))
    assert res["filtered"] == ["sub-00042"] and res["shown"] == "1 of 500 rows shown"
    psnr = {r["participant_id"]: r["heldout_psnr"] for r in rows if r["status"] == "ok"}
    assert res["lowest"] == [min(psnr, key=psnr.get)] and res["highest"] == [max(psnr, key=psnr.get)]

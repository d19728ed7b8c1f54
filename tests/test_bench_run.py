"""The benchmark driver: options, outputs (bench.json, bench.md, PNGs) on a tiny crop of the MNI152 pair."""
from __future__ import annotations

import argparse
import json

import matplotlib
import numpy as np
import pytest

from atlasgs_bids.bench import cases, run

KEYS = {"factor", "degradation", "method", "quality", "psnr", "ssim", "mae", "seconds", "peak_rss_mb", "peak_gpu_mb"}


def test_add_arguments_defaults():
    args = run.add_arguments(argparse.ArgumentParser()).parse_args(["--data", "d", "--out", "o"])
    assert args.factors == [3, 5, 7]
    assert args.degradations == ["gaussian", "atlasgs"]
    assert args.methods == list(run.METHODS)
    assert (args.quality, args.device, args.crop, args.seed) == ("default", "auto", None, 0)
    with pytest.raises(SystemExit):
        run.add_arguments(argparse.ArgumentParser()).parse_args(["--data", "d", "--out", "o", "--methods", "magic"])


def test_missing_data_is_input_error(tmp_path):
    assert run.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2


def test_peak_memory_sees_an_allocation():
    with run.PeakMemory("cpu") as mem:
        block = np.ones(50 * 2**20 // 8)  # 50 MB
        block[::512] += 1  # touch the pages
    assert mem.peak_gpu_mb is None
    assert mem.peak_rss_mb >= block.nbytes / 2**20


def test_bench_crop24_writes_outputs(shared_data, tmp_path):
    out = tmp_path / "bench"
    code = run.main(["--data", str(shared_data / "mni152-hcp"), "--factors", "3", "--crop", "24", "--device", "cpu",
                     "--methods", "linear", "cubic", "guided-filter", "guided-filter-oracle", "voxel-basis",
                     "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report) == {"machine", "device", "cases"}
    assert {"cpu", "cores", "memory_gb", "python", "torch", "os"} <= set(report["machine"])
    assert report["device"] == "cpu"
    rows = report["cases"]
    assert [(r["degradation"], r["method"]) for r in rows] == [
        (d, m) for d in ("gaussian", "atlasgs")
        for m in ("linear", "cubic", "guided-filter", "guided-filter-oracle", "voxel-basis")]
    for r in rows:
        assert KEYS <= set(r)
        assert r["factor"] == 3 and r["quality"] == "default" and r["peak_gpu_mb"] is None
        assert r["seconds"] >= 0 and r["peak_rss_mb"] > 0 and 0 < r["ssim"] <= 1 and r["mae"] > 0
    psnr = {(r["degradation"], r["method"]): r["psnr"] for r in rows}
    for d in ("gaussian", "atlasgs"):  # measured on this crop: 26.0 < 27.4 < 30.8 < 34.5 dB
        assert psnr[d, "linear"] < psnr[d, "cubic"] < psnr[d, "guided-filter"] < psnr[d, "voxel-basis"]
    for d in ("gaussian", "atlasgs"):  # the held-out choice is one of the oracle's grid points: never above it
        assert psnr[d, "guided-filter"] <= psnr[d, "guided-filter-oracle"] + 1e-3
    gf = next(r for r in rows if r["method"] == "guided-filter-oracle")
    assert gf["params"]["oracle_tuned"] and {"radius", "radius_slices", "eps"} <= set(gf["params"])
    fair = next(r for r in rows if r["method"] == "guided-filter")
    assert fair["params"]["oracle_tuned"] is False and len(fair["params"]["grid"]) == 18
    assert fair["params"]["tuning_seconds"] > 0 and fair["seconds"] >= fair["params"]["tuning_seconds"]
    md = (out / "bench.md").read_text()
    assert "| factor | degradation | method |" in md and "gain vs cubic" in md and md.count("voxel-basis") >= 3
    for d in ("gaussian", "atlasgs"):
        png = matplotlib.image.imread(str(out / f"bench_x3_{d}.png"))
        assert png.ndim == 3 and png.shape[0] > 100 and png.std() > 0


def test_crop_keeps_world_positions(shared_data):
    full = cases.load_subject(shared_data / "mni152-hcp")
    crop = cases.load_subject(shared_data / "mni152-hcp", crop=24)
    assert crop.shape == (24, 24, full.shape[2])
    i0, j0 = (full.shape[0] - 24) // 2, (full.shape[1] - 24) // 2
    np.testing.assert_array_equal(crop.t2w, full.t2w[i0:i0 + 24, j0:j0 + 24])
    np.testing.assert_allclose(crop.affine @ [0, 0, 5, 1], full.affine @ [i0, j0, 5, 1])


@pytest.mark.slow
def test_core_methods_run_when_core_present(shared_data):
    # Integration with the real core on a small crop (lattice scaffolds for both core methods).
    core = run.load_core()
    subject = cases.load_subject(shared_data / "mni152-hcp", crop=16)
    sl = (slice(None), slice(None), slice(60, 100))  # 40 slices through the brain
    subject = cases.Subject(t1w=subject.t1w[sl].copy(), t2w=subject.t2w[sl].copy(), mask=subject.mask[sl].copy(),
                            affine=subject.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 60], [0, 0, 0, 1.]]))
    scaffold = run._fit_scaffold(subject.t1w, subject, quality="fast", seed=0, device="cpu")  # the lattice
    case = cases.make_case(subject, 3, "gaussian")
    rows, preds = run.run_case(case, subject, ["cubic", "atlasgs", "atlasgs-noguide"], quality="fast",
                               device="cpu", lam=run.DEFAULT_LAMBDA, h=run.DEFAULT_H, core=core, scaffold=scaffold)
    assert [r["method"] for r in rows] == ["cubic", "atlasgs", "atlasgs-noguide"]
    for r in rows:
        assert np.isfinite(r["psnr"]) and r["psnr"] > 10 and r["seconds"] >= 0
    assert rows[1]["params"]["n_gaussians"] == scaffold.n_gaussians
    assert "scaffold_seconds" in rows[2]["params"]
    assert all(p.shape == subject.shape and np.isfinite(p).all() for p in preds.values())


def test_bench_noise_adds_seeded_rician_cases_beside_the_noiseless_one(shared_data, tmp_path):
    out = tmp_path / "bench"
    argv = ["--data", str(shared_data / "mni152-hcp"), "--factors", "3", "--crop", "24", "--device", "cpu",
            "--degradations", "gaussian", "--methods", "cubic", "--noise", "15", "30", "--out", str(out)]
    assert run.main(argv) == 0
    rows = json.loads((out / "bench.json").read_text())["cases"]
    assert [r["degradation"] for r in rows] == ["gaussian", "gaussian+snr15", "gaussian+snr30"]
    psnr = [r["psnr"] for r in rows]
    assert psnr[0] > psnr[2] > psnr[1]  # more noise, lower PSNR
    assert (out / "bench_x3_gaussian+snr15.png").is_file()
    md = (out / "bench.md").read_text()
    assert md.count("gaussian+snr15") == 1 and "+0.00" in md  # cubic's gain over itself, per noise level


def test_rician_noise_level_and_seed() -> None:
    rng = np.random.default_rng(0)
    t1 = np.full((8, 8, 20), 100.0, dtype=np.float32)
    t1[:4] = 50.0  # "grey matter"; the top 20 % of the guide is the "white matter" half
    t2 = np.where(t1 > 60, 400.0, 700.0).astype(np.float32) + rng.normal(0, 1e-3, t1.shape).astype(np.float32)
    case = cases.make_case(cases.Subject(t1w=t1, t2w=t2, mask=np.ones(t1.shape, bool), affine=np.eye(4)), 2,
                           "gaussian")
    noisy = cases.add_rician_noise(case, 20.0, seed=3)
    assert noisy.label == "gaussian+snr20" and noisy.degradation == "gaussian" and case.snr is None
    wm = case.thick_t1w >= 99.0
    # Interior WM (400, SNR 20): noise SD 20; Rician at SNR 20 is Gaussian to within 0.1 %.
    inner = wm.copy()
    inner[3:5] = False
    assert abs(np.std(noisy.thick[inner] - case.thick[inner]) / 20.0 - 1.0) < 0.15
    assert np.array_equal(noisy.thick, cases.add_rician_noise(case, 20.0, seed=3).thick)
    assert not np.array_equal(noisy.thick, cases.add_rician_noise(case, 20.0, seed=4).thick)


@pytest.mark.parametrize("snr", [15.0, 30.0])
def test_rician_noise_has_the_requested_snr_on_white_matter(snr) -> None:
    # A large white-matter block (top 20 % of the guide): measured SNR = WM mean of the clean thick slices / SD of
    # the added noise there, within 10 % of the request; the seed reproduces the data exactly.
    t1 = np.full((40, 40, 60), 50.0, dtype=np.float32)
    t1[:, :12] = 100.0  # 30 % of the voxels; percentile 80 of the guide is 100, so WM = exactly this block
    t2 = np.where(t1 > 60, 400.0, 700.0).astype(np.float32)
    case = cases.make_case(cases.Subject(t1w=t1, t2w=t2, mask=np.ones(t1.shape, bool), affine=np.eye(4)), 3,
                           "gaussian")
    noisy = cases.add_rician_noise(case, snr, seed=7)
    wm = case.thick_t1w >= 99.0
    wm[:, 10:] = False  # away from the WM/GM edge (in plane), where the thick slices are uniform
    measured = float(np.mean(case.thick[wm])) / float(np.std(noisy.thick[wm] - case.thick[wm]))
    assert abs(measured / snr - 1.0) < 0.10, measured
    assert np.array_equal(noisy.thick, cases.add_rician_noise(case, snr, seed=7).thick)
    assert noisy.label == f"gaussian+snr{snr:g}"


def test_goal_table_marks_each_row_against_the_fair_guided_filter():
    def row(d, m, psnr, ssim):
        return {"factor": 5, "degradation": d, "method": m, "psnr": psnr, "ssim": ssim}

    rows = [row("gaussian", "guided-filter", 30.0, 0.90), row("gaussian", "guided-filter-oracle", 30.5, 0.91),
            row("gaussian", "atlasgs", 32.0, 0.92),  # +2.00 dB, SSIM above: met (vs oracle: +1.5, not met)
            row("gaussian+snr15", "guided-filter", 28.0, 0.85), row("gaussian+snr15", "atlasgs", 31.0, 0.84),
            row("gaussian+snr30", "guided-filter", 29.0, 0.88), row("gaussian+snr30", "atlasgs", 30.0, 0.90)]
    lines = run.goal_table(rows)
    body = [ln for ln in lines if ln.startswith("| 5 |")]
    assert [ln.split(" | ")[2] for ln in body] == ["none", "30", "15"]  # noiseless first, then more noise
    assert "| +2.000 | +0.0200 | yes | +1.500 | +0.0100 | **no** |" in body[0]
    assert "| **no** | - | - | - |" in body[1] and "| **no** |" in body[2]  # +1 dB; SSIM below
    assert lines[-1] == "Goal vs the fair guided filter met in 1 of 3 rows."
    assert run.goal_table([row("gaussian", "cubic", 20.0, 0.8)]) == []

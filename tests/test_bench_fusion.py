"""``bench --fusion`` (``bench/fusion.py``) on a crop of the MNI152 pair: stacks registered, every row, the goals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from atlasgs_bids.bench.fusion import STACKS, goals, run_fusion
from atlasgs_bids.errors import InputError


@pytest.mark.slow
def test_fusion_bench_registers_fits_and_fuses(tmp_path, shared_data) -> None:
    report = run_fusion(shared_data / "mni152-hcp", tmp_path, crop=48, n_stacks=2, quality="fast")
    assert [s["name"] for s in report["stacks"]] == ["axial", "coronal"]
    # each moved stack registered as the app does: well under a voxel (measured 0.2-0.4 mm on the crop)
    assert all(s["surface_displacement_mm"] < 1.0 for s in report["stacks"])
    rows = {(r["method"], tuple(r["stacks"])): r for r in report["rows"]}
    assert set(rows) == {(m, (s,)) for m in ("cubic", "guided-filter", "atlasgs") for s in ("axial", "coronal")} | {
        ("atlasgs-fused", ("axial", "coronal"))}
    fused = rows[("atlasgs-fused", ("axial", "coronal"))]
    # the coronal stack is 1.3 x brighter: the solve finds it
    assert fused["params"]["scale_vs_reference"][1] == pytest.approx(STACKS[1].scale, rel=0.03)
    assert all(np.isfinite(r["psnr"]) and r["psnr"] > 15.0 for r in report["rows"])
    assert report["goals"] == goals(report["rows"])
    assert json.loads((tmp_path / "fusion.json").read_text())["rows"] == report["rows"]
    assert "atlasgs-fused" in (tmp_path / "fusion.md").read_text()


def test_goals_compare_the_largest_fusion_with_the_best_single_rows() -> None:
    rows = [{"method": "atlasgs", "stacks": ["a"], "psnr": 30.0}, {"method": "atlasgs", "stacks": ["b"], "psnr": 31.0},
            {"method": "guided-filter", "stacks": ["a"], "psnr": 29.0},
            {"method": "atlasgs-fused", "stacks": ["a", "b"], "psnr": 32.0},
            {"method": "atlasgs-fused", "stacks": ["a", "b", "c"], "psnr": 32.6}]
    g = goals(rows)
    assert g["gain_vs_single_db"] == pytest.approx(1.6) and g["met_single"]
    assert g["gain_vs_guided_filter_db"] == pytest.approx(3.6) and g["met_guided_filter"]
    assert goals(rows[:3]) == {}


def test_fusion_bench_refuses_bad_settings(tmp_path, shared_data) -> None:
    with pytest.raises(InputError, match="--stacks"):
        run_fusion(shared_data / "mni152-hcp", tmp_path, n_stacks=4)
    with pytest.raises(InputError, match="SNR"):
        run_fusion(shared_data / "mni152-hcp", tmp_path, snr=0.0)
    assert not any(tmp_path.iterdir())

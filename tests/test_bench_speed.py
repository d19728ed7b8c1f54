"""``bench --speed`` (``bench/speed.py``) on a small crop of the MNI152 pair: every row, its figures, both files."""
from __future__ import annotations

import json
import math

import pytest

from atlasgs_bids.bench.speed import run_speed


def test_speed_bench_reports_the_target_its_twin_and_a_series(tmp_path, shared_data) -> None:
    data = shared_data / "mni152-hcp"
    report = run_speed(data, tmp_path, crop=24, volumes=3, quality="fast")
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"atlasgs", "voxel-basis", "atlasgs-series"}
    assert math.isfinite(rows["atlasgs"]["psnr"]) and rows["atlasgs"]["psnr"] > 20.0
    assert rows["atlasgs"]["seconds"] > 0 and rows["atlasgs"]["peak_rss_mb"] >= rows["atlasgs"]["rss_start_mb"]
    assert rows["atlasgs-series"]["volumes"] == 3
    assert rows["atlasgs-series"]["ratio_to_3d"] == pytest.approx(
        rows["atlasgs-series"]["seconds"] / rows["atlasgs"]["seconds"], rel=0.05)
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == report["rows"]
    assert "atlasgs-series" in (tmp_path / "speed.md").read_text()

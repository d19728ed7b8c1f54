"""The app's path imports no benchmark or research code (issue 13): they may change, or need what the app lacks."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

_SCRIPT = """
import importlib, json, pkgutil, sys
import atlasgs_bids
app = []
for top in pkgutil.iter_modules(atlasgs_bids.__path__, "atlasgs_bids."):  # walk_packages would import bench/research
    if top.name in ("atlasgs_bids.bench", "atlasgs_bids.research"):
        continue
    app.append(top.name)
    if top.ispkg:
        app += [m.name for m in pkgutil.walk_packages(importlib.import_module(top.name).__path__, top.name + ".")
                if not m.name.endswith("__main__")]
for name in app:
    importlib.import_module(name)
print(json.dumps({"imported": app, "leaked": sorted(m for m in sys.modules
                  if m.startswith(("atlasgs_bids.bench", "atlasgs_bids.research")))}))
"""


def test_app_modules_import_no_bench_or_research():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    # the packages a BIDS App run goes through are all among the modules imported
    for package in ("cli", "workflows", "interfaces", "reports", "qc", "bids", "imaging", "gaussians"):
        assert any(name.startswith(f"atlasgs_bids.{package}.") for name in report["imported"]), package
    assert report["leaked"] == []

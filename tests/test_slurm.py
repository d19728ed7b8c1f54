"""The SLURM array run of docs/hpc.md, end to end on a real scheduler (issue 16): a single-node cluster on localhost
(:mod:`slurm_cluster`), the files under ``scripts/slurm/`` as they are shipped, four participants (copies of the tiny
sample), one of them broken. The array runs, the group step follows with ``afterany``, the broken participant fails
with exit code 2 and a ``failed`` row; it is fixed, ``rerun_indices.sh`` finds it and only it is resubmitted. The
outputs equal those of a direct run, and ``group_qc.tsv`` lists all four as ``ok``. ``submit.sh`` indexes the
dataset once (``BIDS_DATABASE_DIR``) and every task reads that index.

Skips (with the reason) where SLURM or munge is not installed or the tests do not run as root; ``.ci/run`` installs
both, so CI runs it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, copy_bids
from slurm_cluster import LocalSlurm, why_unavailable
from test_bad_inputs import BASE_FLAGS, T2W, run_cli
from test_interrupted_runs import outputs_differ

SCRIPTS = REPO / "scripts" / "slurm"
LABELS = ("01", "02", "03", "04")
BROKEN = "04"
#: sbatch options of the test (the scripts ask for 4 CPUs and 16 GB): one CPU per task, enough memory for --mem-gb
#: to pass the tiny sample's estimate (1.8 GB)
SBATCH = ("--cpus-per-task=1", "--mem=3G")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _app_command() -> str:
    """The console script next to this Python (the venv's ``atlasgs-bids``), else the module."""
    script = Path(sys.executable).parent / "atlasgs-bids"
    return str(script) if script.is_file() else f"{sys.executable} -m atlasgs_bids.cli"


def _group_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "group_qc.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _submit(slurm: LocalSlurm, env: dict[str, str], logs: Path, *indices: str) -> tuple[str, str]:
    out = slurm.run(str(SCRIPTS / "submit.sh"), *indices, "--", *SBATCH, f"--output={logs}/%x_%j.out", env=env)
    array, group = out.split()
    return array, group


def _job_logs(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(logs.glob("*.out")))


def _newest_source() -> float:
    """The latest modification time of the package's Python files (the jobs and the direct run import them)."""
    return max(p.stat().st_mtime for p in (REPO / "atlasgs_bids").rglob("*.py"))


@pytest.mark.slow
def test_array_group_and_resubmission_on_slurm(slurm, tiny_sample, tmp_path):
    sources_at_start = _newest_source()
    bids = copy_bids(tiny_sample.bids_dir, tmp_path / "bids", participants=LABELS)
    # 0. the reference: a direct run of two participants (same flags and threads as the array's tasks)
    direct = tmp_path / "direct"
    proc = run_cli(bids, direct, "participant", "--participant-label", "01", BROKEN, "--skip-bids-validation",
                   *BASE_FLAGS, "--nprocs", "1", "--omp-nthreads", "1", "-w", tmp_path / "work-direct")
    assert proc.returncode == 0, proc.stderr
    broken = bids / T2W.replace("sub-01", f"sub-{BROKEN}")
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) * 6 // 10])  # a truncated .nii.gz: an input error, exit code 2
    out, logs = tmp_path / "derivatives", tmp_path / "slurm-logs"
    logs.mkdir()
    env = {"BIDS_DIR": str(bids), "OUT_DIR": str(out), "ATLASGS_CMD": _app_command(),
           "ATLASGS_ARGS": " ".join(BASE_FLAGS), "SCRATCH": str(tmp_path / "scratch"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "BIDS_DATABASE_DIR": str(tmp_path / "pybids-db")}
    (tmp_path / "scratch").mkdir()

    # 1. the whole array, then the group step after it whatever the tasks' outcome
    array, group = _submit(slurm, env, logs)
    assert (tmp_path / "pybids-db" / "layout_index.sqlite").is_file()  # indexed once by submit.sh, before the array
    slurm.wait_idle(timeout=900)
    states = {**slurm.job_states(array), **slurm.job_states(group)}
    assert states == {**{f"{array}_{i}": "COMPLETED 0:0" for i in (1, 2, 3)}, f"{array}_4": "FAILED 2:0",
                      group: "COMPLETED 0:0"}, f"{states}\n{_job_logs(logs)}"
    status = json.loads((out / "logs" / f"sub-{BROKEN}_status.json").read_text())
    assert status["status"] == "failed" and status["input_error"] is True
    assert "truncated or corrupt" in status["error"] and broken.name in status["error"]
    assert not (out / f"sub-{BROKEN}").exists()
    rows = {r["participant_id"]: r["status"] for r in _group_rows(out)}
    assert rows == {"sub-01": "ok", "sub-02": "ok", "sub-03": "ok", f"sub-{BROKEN}": "failed"}
    assert list(tmp_path.joinpath("scratch").iterdir()) == []  # every task removed its work dir
    assert "pybids index read from" in _job_logs(logs)  # the tasks read the index, none re-listed the dataset

    # 2. fix the data, find what to rerun (docs/hpc.md, section 5), resubmit only that, and the group step again
    broken.write_bytes(good)
    rerun = slurm.run(str(SCRIPTS / "rerun_indices.sh"), env=env).strip()
    assert rerun == "4"
    array2, group2 = _submit(slurm, env, logs, rerun)
    slurm.wait_idle(timeout=600)
    states = {**slurm.job_states(array2), **slurm.job_states(group2)}
    assert states == {f"{array2}_4": "COMPLETED 0:0", group2: "COMPLETED 0:0"}, f"{states}\n{_job_logs(logs)}"
    rows = _group_rows(out)
    assert sorted(r["participant_id"] for r in rows) == [f"sub-{label}" for label in LABELS]
    assert {r["status"] for r in rows} == {"ok"}
    assert slurm.run(str(SCRIPTS / "rerun_indices.sh"), env=env).strip() == ""
    # a resubmitted task of a participant that is done exits at once
    _submit(slurm, env, logs, "1")
    slurm.wait_idle(timeout=300)
    assert "sub-01: already done" in _job_logs(logs)

    # 3. the outputs equal the direct run's
    differ = {label: outputs_differ(out / f"sub-{label}", direct / f"sub-{label}") for label in ("01", BROKEN)}
    if any(differ.values()) and _newest_source() > sources_at_start:
        pytest.skip(f"the package's sources were edited while this test ran, so the direct run and the jobs ran "
                    f"different code; outputs not compared ({differ})")
    assert differ == {"01": [], BROKEN: []}
    ref = np.asanyarray(nib.load(str(direct / "sub-01/anat/sub-01_space-T1w_desc-atlasgs_T2w.nii.gz")).dataobj)
    for label in ("02", "03"):
        img = nib.load(str(out / f"sub-{label}/anat/sub-{label}_space-T1w_desc-atlasgs_T2w.nii.gz"))
        assert np.array_equal(np.asanyarray(img.dataobj), ref)


def test_docs_describe_the_scripts():
    """docs/hpc.md names every file of scripts/slurm/ and every variable they read; each script parses (bash -n)."""
    doc = (REPO / "docs" / "hpc.md").read_text()
    scripts = sorted(SCRIPTS.iterdir())
    assert {p.name for p in scripts} == {"atlasgs_array.sbatch", "atlasgs_group.sbatch", "submit.sh",
                                         "rerun_indices.sh"}
    for path in scripts:
        assert f"`{path.name}`" in doc, path.name
        assert os.access(path, os.X_OK), path.name
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path.name
        text = path.read_text()
        variables = set(re.findall(r"\$\{([A-Z][A-Z_]+)", text)) - {"SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_JOB_ID",
                                                                     "SLURM_MEM_PER_NODE", "SLURM_CPUS_PER_TASK",
                                                                     "SLURM_RESTART_COUNT", "TMPDIR", "BASH_SOURCE"}
        for var in variables:
            assert f"`{var}`" in doc, f"{path.name} reads {var}, which docs/hpc.md does not describe"

"""The SLURM array run of docs/hpc.md, end to end on a real scheduler (issue 16): a single-node cluster on localhost
(:mod:`slurm_cluster`), the files under ``scripts/slurm/`` as they are shipped, three participants (copies of the tiny
sample), one of them broken. The array runs, the group step follows with ``afterany``, the broken participant fails
with exit code 2 and a ``failed`` row; it is fixed, ``rerun_indices.sh`` finds it and only it is resubmitted. Every
participant's outputs equal those of a direct run (the session's reference run, conftest ``tiny_run``: same flags,
one thread), and ``group_qc.tsv`` lists all three as ``ok``. ``submit.sh`` indexes the
dataset once (``BIDS_DATABASE_DIR``) and every task reads that index.

Skips (with the reason) where SLURM or munge is not installed or the tests do not run as root; ``.ci/run`` installs
both, so CI runs it.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from conftest import BASE_FLAGS, REPO, copy_bids, newest_source, outputs_differ
from slurm_cluster import LocalSlurm, why_unavailable
from test_bad_inputs import T2W

SCRIPTS = REPO / "scripts" / "slurm"
LABELS = ("01", "02", "03")
BROKEN = "03"
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


@pytest.mark.slow
def test_array_group_and_resubmission_on_slurm(slurm, tiny_sample, tiny_run, tmp_path):
    bids = copy_bids(tiny_sample.bids_dir, tmp_path / "bids", participants=LABELS)
    # the direct run to compare with is tiny_run: same flags and threads as the array's tasks (--nprocs 1,
    # --omp-nthreads 1 from --cpus-per-task=1)
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
    assert states == {**{f"{array}_{i}": "COMPLETED 0:0" for i in (1, 2)}, f"{array}_3": "FAILED 2:0",
                      group: "COMPLETED 0:0"}, f"{states}\n{_job_logs(logs)}"
    status = json.loads((out / "logs" / f"sub-{BROKEN}_status.json").read_text())
    assert status["status"] == "failed" and status["input_error"] is True
    assert "truncated or corrupt" in status["error"] and broken.name in status["error"]
    assert not (out / f"sub-{BROKEN}").exists()
    rows = {r["participant_id"]: r["status"] for r in _group_rows(out)}
    assert rows == {"sub-01": "ok", "sub-02": "ok", f"sub-{BROKEN}": "failed"}
    assert list(tmp_path.joinpath("scratch").iterdir()) == []  # every task removed its work dir
    assert "pybids index read from" in _job_logs(logs)  # the tasks read the index, none re-listed the dataset

    # 2. fix the data, find what to rerun (docs/hpc.md, section 5), resubmit only that, and the group step again
    broken.write_bytes(good)
    rerun = slurm.run(str(SCRIPTS / "rerun_indices.sh"), env=env).strip()
    assert rerun == "3"
    array2, group2 = _submit(slurm, env, logs, rerun)
    slurm.wait_idle(timeout=600)
    states = {**slurm.job_states(array2), **slurm.job_states(group2)}
    assert states == {f"{array2}_3": "COMPLETED 0:0", group2: "COMPLETED 0:0"}, f"{states}\n{_job_logs(logs)}"
    rows = _group_rows(out)
    assert sorted(r["participant_id"] for r in rows) == [f"sub-{label}" for label in LABELS]
    assert {r["status"] for r in rows} == {"ok"}
    assert slurm.run(str(SCRIPTS / "rerun_indices.sh"), env=env).strip() == ""
    # a resubmitted task of a participant that is done exits at once
    _submit(slurm, env, logs, "1")
    slurm.wait_idle(timeout=300)
    assert "sub-01: already done" in _job_logs(logs)

    # 3. every participant's outputs equal the direct run's (its sub-01; the others are copies under another label)
    differ = {label: outputs_differ(tiny_run.out / "sub-01", out / f"sub-{label}", relabel=(f"sub-{label}", "sub-01"))
              for label in LABELS}
    if any(differ.values()) and newest_source() > tiny_run.sources_mtime:
        pytest.skip(f"the package's sources were edited after the direct run, so it and the jobs ran different code; "
                    f"outputs not compared ({differ})")
    assert differ == {label: [] for label in LABELS}

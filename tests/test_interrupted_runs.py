"""Interrupted runs (issue 6): a participant run killed with SIGKILL at seeded random points is rerun to completion
and equals an uninterrupted run; while any run goes, a poller checks that nothing partial is ever visible under
output_dir (only complete files under final names, the participant's folder appears whole). SIGTERM and SIGINT stop
a run cleanly: a one-line message, exit 143 / 130, nothing partial, no worker process left.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.processes import alive, descendants
from conftest import copy_bids
from test_bad_inputs import BASE_FLAGS, hidden_or_temp, run_cli, tree_digest

pytestmark = pytest.mark.slow

#: Seed of the kill times; 4 points, one in each quarter of a ~20 s run.
KILL_SEED = 6
KILL_WINDOWS = ((1.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.0))


# ------------------------------------------------------------------------------------------------------- helpers
def _complete(path: Path) -> str | None:
    """None when ``path`` is a complete file of its kind, else why not."""
    try:
        if path.name.endswith(".nii.gz"):
            raw = gzip.decompress(path.read_bytes())  # CRC and length are checked at the end of the stream
            hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]))
            need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
            return None if len(raw) >= need else f"{len(raw)} of {need} bytes"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                return None if bad is None else f"bad member {bad}"
        elif path.stat().st_size == 0:
            return "empty"
    except FileNotFoundError:
        return None  # replaced between listing and reading (an atomic rename): not partial
    except Exception as exc:  # noqa: BLE001 - any failure to read is a partial file
        return f"{type(exc).__name__}: {exc}"
    return None


class Poller(threading.Thread):
    """Checks ``out`` every 50 ms: every visible file complete; ``sub-01`` appears with all ``expected`` files."""

    def __init__(self, out: Path, expected: set[str]) -> None:
        super().__init__(daemon=True)
        self.out, self.expected, self.problems, self.polls = out, expected, [], 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.check()
            time.sleep(0.05)
        self.check()

    def check(self) -> None:
        self.polls += 1
        if not self.out.exists():
            return
        visible = [p for p in self.out.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(self.out).parts)]
        for p in visible:
            why = _complete(p)
            if why:
                self.problems.append(f"{p.relative_to(self.out)}: {why}")
        sub = {p.relative_to(self.out).as_posix() for p in visible if p.relative_to(self.out).parts[0] == "sub-01"}
        if sub and sub != self.expected:
            self.problems.append(f"sub-01 visible with {len(sub)} of {len(self.expected)} files")

    def stop(self) -> list[str]:
        self.halt.set()
        self.join()
        return self.problems


def _cmd(bids: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "atlasgs_bids.cli", str(bids), str(out), "participant", "--skip-bids-validation",
            *BASE_FLAGS, "-w", str(work)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _strip_runtime(obj):
    """JSON without run-time fields (keys with 'seconds', 'Runtime')."""
    if isinstance(obj, dict):
        return {k: _strip_runtime(v) for k, v in obj.items() if "seconds" not in k.lower() and k != "Runtime"}
    if isinstance(obj, list):
        return [_strip_runtime(v) for v in obj]
    return obj


#: Report figures: compared by name only (matplotlib writes dates and random ids into SVG; they are not data).
FIGURES = (".svg", ".png", ".html")


def outputs_differ(a: Path, b: Path) -> list[str]:
    """Differences between two participant trees: the same file names; NIfTI data arrays and affines, .npz arrays,
    JSON without run-time fields, other files byte for byte (figures by name only)."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in one: {sorted(fa ^ fb)}"] if fa != fb else []
    for rel in sorted(r for r in fa & fb if not r.endswith(FIGURES)):
        pa, pb = a / rel, b / rel
        if rel.endswith(".nii.gz"):
            ia, ib = nib.load(str(pa)), nib.load(str(pb))
            same = (np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj))
                    and np.array_equal(ia.affine, ib.affine))
        elif rel.endswith(".npz"):
            with np.load(pa) as za, np.load(pb) as zb:
                same = sorted(za.files) == sorted(zb.files) and all(np.array_equal(za[k], zb[k]) for k in za.files)
        elif rel.endswith(".json"):
            same = _strip_runtime(json.loads(pa.read_text())) == _strip_runtime(json.loads(pb.read_text()))
        else:
            same = pa.read_bytes() == pb.read_bytes()
        if not same:
            diffs.append(rel)
    return diffs


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bids(tiny_sample, tmp_path_factory) -> Path:
    return copy_bids(tiny_sample.bids_dir, tmp_path_factory.mktemp("interrupted") / "bids")


@pytest.fixture(scope="module")
def reference(bids, tmp_path_factory) -> Path:
    """One uninterrupted run (its output_dir), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli(bids, root / "out", "participant", "--skip-bids-validation", *BASE_FLAGS, "-w", root / "work")
    assert proc.returncode == 0, proc.stderr
    return root / "out"


def _expected(reference: Path) -> set[str]:
    return {p.relative_to(reference).as_posix() for p in (reference / "sub-01").rglob("*") if p.is_file()}


def _run_polled(cmd: list[str], out: Path, expected: set[str], *, kill_at: float | None = None,
                sig: int = signal.SIGKILL) -> tuple[subprocess.Popen, list[str], list[int], str]:
    """Start ``cmd``; poll ``out`` while it runs; at ``kill_at`` s send ``sig`` (SIGKILL: to the whole process tree,
    as a scheduler killing the job does; else to the main process only, as ``kill`` / ``scancel --signal`` do)."""
    poller = Poller(out, expected)
    poller.start()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        if kill_at is not None:
            try:
                proc.wait(timeout=kill_at)
            except subprocess.TimeoutExpired:
                tree = descendants(proc.pid)
                if sig == signal.SIGKILL:
                    for pid in [proc.pid, *tree]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                else:
                    proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, poller.stop(), tree, err


def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(bids, reference, tmp_path):
    expected = _expected(reference)
    before = tree_digest(bids)
    rng = np.random.default_rng(KILL_SEED)
    survived = 0
    for i, (lo, hi) in enumerate(KILL_WINDOWS):
        at = float(rng.uniform(lo, hi))
        out, work = tmp_path / f"out{i}", tmp_path / f"work{i}"
        proc, problems, tree, _ = _run_polled(_cmd(bids, out, work), out, expected, kill_at=at)
        assert problems == [], f"kill at {at:.1f} s: {problems}"
        assert proc.returncode in (0, -signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in tree)
        # rerun with the same output and work dirs: it completes, and equals the uninterrupted run
        proc, problems, _, err = _run_polled(_cmd(bids, out, work), out, expected)
        assert proc.returncode == 0, err
        assert problems == [], f"rerun after a kill at {at:.1f} s: {problems}"
        assert outputs_differ(reference / "sub-01", out / "sub-01") == [], f"kill at {at:.1f} s"
        assert hidden_or_temp(out) == []  # the killed run's staging folder was removed by the rerun
        survived += 1
    assert survived == len(KILL_WINDOWS)
    assert tree_digest(bids) == before


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_sigint_stop_cleanly(bids, reference, tmp_path, sig, code, name):
    """Signalled during stage 2 (~13 s in): one line saying so, the conventional exit code, no staging folder, no
    temp file, no sub-01, and every worker process gone."""
    out = tmp_path / "out"
    proc, problems, tree, err = _run_polled(_cmd(bids, out, tmp_path / "work"), out, _expected(reference),
                                            kill_at=13.0, sig=sig)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal (machine faster than expected)")
    assert proc.returncode == code, err
    assert problems == []
    assert f"interrupted by {name}" in err and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "ERROR" in line] == [
        line for line in err.splitlines() if f"interrupted by {name}" in line]
    assert not (out / "sub-01").exists() and hidden_or_temp(out) == []
    deadline = time.monotonic() + 5  # the resource tracker exits on its own once the main process is gone
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tree and not any(alive(p) for p in tree), "worker processes left running"

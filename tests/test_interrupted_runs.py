"""Interrupted runs (issue 6): a participant run killed with SIGKILL at seeded random points is rerun to completion
and equals an uninterrupted run; while any run goes, a poller checks that nothing partial is ever visible under
output_dir (only complete files under final names, the participant's folder appears whole). SIGTERM and SIGINT stop
a run cleanly: a one-line message, exit 143 / 130, nothing partial, no worker process left.

The uninterrupted run is the session's reference run (conftest ``tiny_run``); the kill-and-rerun sequences are
independent of each other and run ``PARALLEL_RUNS`` at a time.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids.processes import alive, descendants
from conftest import BASE_FLAGS, PARALLEL_RUNS, cli_argv, cli_env, copy_bids, outputs_differ
from test_bad_inputs import hidden_or_temp, tree_digest

pytestmark = pytest.mark.slow

#: Seed of the kill times; 4 points, one in each quarter of the reference run's wall time (the first from 1 s on).
KILL_SEED = 6
KILL_WINDOWS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


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
    return cli_argv(bids, out, "participant", "--skip-bids-validation", *BASE_FLAGS, "-w", work)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bids(tiny_sample, tmp_path_factory) -> Path:
    return copy_bids(tiny_sample.bids_dir, tmp_path_factory.mktemp("interrupted") / "bids")


@pytest.fixture(scope="module")
def reference(tiny_run) -> Path:
    """The uninterrupted run to compare with (its output_dir): the session's reference run, same flags and threads
    as :func:`_cmd` (its ``-v``, saved index and second subject leave ``sub-01``'s outputs as they are)."""
    return tiny_run.out


def _expected(reference: Path) -> set[str]:
    return {p.relative_to(reference).as_posix() for p in (reference / "sub-01").rglob("*") if p.is_file()}


def _run_polled(cmd: list[str], out: Path, expected: set[str], *, kill_at: float | None = None,
                kill_after: Path | None = None, sig: int = signal.SIGKILL,
                ) -> tuple[subprocess.Popen, list[str], list[int], str]:
    """Start ``cmd``; poll ``out`` while it runs; at ``kill_at`` s (or 1 s after the path ``kill_after`` appears: a
    node's folder in the work dir, created when that node starts) send ``sig`` (SIGKILL: to the whole process tree,
    as a scheduler killing the job does; else to the main process only, as ``kill`` / ``scancel --signal`` do)."""
    poller = Poller(out, expected)
    poller.start()
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        if kill_after is not None:
            while proc.poll() is None and not kill_after.exists():
                time.sleep(0.1)
            kill_at = 1.0
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
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, poller.stop(), tree, err


def _kill_then_rerun(bids: Path, reference: Path, root: Path, at: float) -> None:
    """Kill a run (its whole process tree) ``at`` s in, check nothing partial showed and no process is left, rerun it
    with the same output and work dirs: it completes, nothing partial shows, and it equals the uninterrupted run."""
    expected = _expected(reference)
    out, work = root / "out", root / "work"
    proc, problems, tree, _ = _run_polled(_cmd(bids, out, work), out, expected, kill_at=at)
    assert problems == [], f"kill at {at:.1f} s: {problems}"
    assert proc.returncode in (0, -signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in tree)
    proc, problems, _, err = _run_polled(_cmd(bids, out, work), out, expected)
    assert proc.returncode == 0, err
    assert problems == [], f"rerun after a kill at {at:.1f} s: {problems}"
    assert outputs_differ(reference / "sub-01", out / "sub-01") == [], f"kill at {at:.1f} s"
    assert hidden_or_temp(out) == []  # the killed run's staging folder was removed by the rerun


def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(bids, reference, tiny_run, tmp_path):
    """Kill times: one seeded point in each quarter of the reference run's wall time (at least 1 s in)."""
    before = tree_digest(bids)
    rng = np.random.default_rng(KILL_SEED)
    times = [max(1.0, float(rng.uniform(lo, hi)) * tiny_run.seconds) for lo, hi in KILL_WINDOWS]
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        futures = [pool.submit(_kill_then_rerun, bids, reference, tmp_path / f"run{i}", at)
                   for i, at in enumerate(times)]
        for f in futures:
            f.result()  # re-raises the sequence's failed assertion
    assert tree_digest(bids) == before


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_sigint_stop_cleanly(bids, reference, tmp_path, sig, code, name):
    """Signalled while a worker process computes (1 s into the registration node, found through its folder in the
    work dir): one line saying so, the conventional exit code, no staging folder, no temp file, no sub-01, and every
    worker process gone."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc, problems, tree, err = _run_polled(_cmd(bids, out, work), out, _expected(reference),
                                            kill_after=work / "sub_01_wf" / "T2w_wf" / "register", sig=sig)
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

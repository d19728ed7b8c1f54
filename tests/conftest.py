"""Shared fixtures. Real MRI lives outside the project (``ATLASGS_TEST_DATA``, default ``../shared/data``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def test_data_root() -> Path:
    """Where the real MRI for tests is: ``$ATLASGS_TEST_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("ATLASGS_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


test_data_root.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = test_data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real test data not found at {root} (set ATLASGS_TEST_DATA)")
    return root


TINY_T1W_MM = 2.5
"""T1w voxel size (mm) of the tiny sample. A whole participant run at --quality fast took 115 s on the 2-core machine
at load ~5 (other jobs running): registration 29 s and its QC (restarted refinements) 45 s, stage 2 8 s."""


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory):
    """The demo sample at 2.5 mm with 7.5 mm T2w slices (factor 3); read-only, shared by the session.

    Returns the :class:`atlasgs_bids.data.sample.SampleInfo` (``.bids_dir``, ``.truth_t2w``, ...). Tests that
    modify files must copy ``.bids_dir`` first (see :func:`copy_bids`).
    """
    from atlasgs_bids.data.sample import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("tiny") / "sample", factor=3, downsample_mm=TINY_T1W_MM)


def copy_bids(src: Path, dst: Path, participants: tuple[str, ...] = ("01",)) -> Path:
    """Copy a one-participant BIDS folder to ``dst``, cloning ``sub-01`` as each label in ``participants``."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sub-*"))
    for label in participants:
        for f in sorted((src / "sub-01").rglob("*")):
            if f.is_file():
                out = dst / f"sub-{label}" / f.relative_to(src / "sub-01").parent / f.name.replace("sub-01", f"sub-{label}")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    tsv = "participant_id\tspecies\n" + "".join(f"sub-{p}\thomo sapiens\n" for p in participants)
    (dst / "participants.tsv").write_text(tsv)
    return dst


copy_bids.__test__ = False


# ------------------------------------------------------------------------------------------- the real CLI, shared
#: Flags of every CLI run of the tiny sample: its T1w is the skull-stripped template (no deepbet), CPU, fast preset.
BASE_FLAGS = ("--skull-stripped", "--quality", "fast", "--device", "cpu")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: one OpenMP thread, no Python warnings, plus ``extra``."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def cli_argv(*args: str | os.PathLike) -> list[str]:
    """``python -m atlasgs_bids.cli ARGS`` (the console script's code path)."""
    return [sys.executable, "-m", "atlasgs_bids.cli", *map(str, args)]


def run_cli(*args: str | os.PathLike, timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI (:func:`cli_argv`) to the end with one OpenMP thread (:func:`cli_env`)."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**(env or {})), check=False)


cli_env.__test__ = cli_argv.__test__ = run_cli.__test__ = False

#: How many one-thread CLI runs a test starts at once when it needs several independent ones: the CPUs this process
#: may use (at least 1, at most 4; 2 on the 2-core CI machine).
PARALLEL_RUNS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1))


def newest_source() -> float:
    """The latest modification time of the package's Python files (every CLI run imports them)."""
    return max(p.stat().st_mtime for p in (REPO / "atlasgs_bids").rglob("*.py"))


@dataclass(frozen=True)
class TinyRun:
    """One finished participant run of the tiny sample (:func:`tiny_run`)."""

    bids: Path
    """The raw dataset: ``sub-01`` and ``sub-02``, two copies of the sample's one participant."""
    out: Path
    work: Path
    db: Path
    """The pybids index written by the run (``--bids-database-dir``)."""
    stderr: str
    seconds: float
    """Wall time of the whole CLI process."""
    sources_mtime: float
    """:func:`newest_source` just before the run: a later edit of the package means later runs ran other code."""


#: The arguments of the reference run after ``BIDS OUT participant`` (``-w`` and ``--bids-database-dir`` added).
TINY_RUN_ARGS = ("--participant-label", "01", "--skip-bids-validation", *BASE_FLAGS)


@pytest.fixture(scope="session")
def tiny_run(tiny_sample, tmp_path_factory) -> TinyRun:
    """THE reference participant run of the tiny sample, made once per session: the real CLI in a subprocess
    (:func:`run_cli`, one OpenMP thread), ``sub-01`` of a two-subject copy (``sub-02`` is in the dataset but never
    run), :data:`BASE_FLAGS`, ``--bids-database-dir``, ``-v`` with a heartbeat every 3 s.

    Tests that inspect a finished run read it; tests that need an uninterrupted run to compare theirs with (killed
    and rerun, SLURM array) compare with its ``sub-01``. Those outputs do not depend on ``-v``, the saved index or
    the second subject (equal, by :func:`outputs_differ`, to those of a plain one-subject run). Read-only: a test
    that changes the dataset or the outputs works on a copy (or undoes its change, as ``test_app_outputs`` does).
    """
    root = tmp_path_factory.mktemp("tiny_run")
    bids = copy_bids(tiny_sample.bids_dir, root / "bids", participants=("01", "02"))
    out, work, db = root / "out", root / "work", root / "pybids-db"
    sources = newest_source()
    t0 = time.perf_counter()
    proc = run_cli(bids, out, "participant", *TINY_RUN_ARGS, "--bids-database-dir", db, "-w", work, "-v",
                   env={"ATLASGS_HEARTBEAT_SECONDS": "3"})
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-5000:]
    return TinyRun(bids=bids, out=out, work=work, db=db, stderr=proc.stderr, seconds=seconds, sources_mtime=sources)


# ------------------------------------------------------------------------------------------- comparing two runs
def _strip_runtime(obj):
    """JSON without run-time fields (keys with 'seconds', 'Runtime')."""
    if isinstance(obj, dict):
        return {k: _strip_runtime(v) for k, v in obj.items() if "seconds" not in k.lower() and k != "Runtime"}
    if isinstance(obj, list):
        return [_strip_runtime(v) for v in obj]
    return obj


#: Report figures: compared by name only (matplotlib writes dates and random ids into SVG; they are not data).
FIGURES = (".svg", ".png", ".html")


def outputs_differ(a: Path, b: Path, relabel: tuple[str, str] | None = None) -> list[str]:
    """Differences between two participant trees: the same file names; NIfTI data arrays and affines, .npz arrays,
    JSON without run-time fields, other files byte for byte (figures by name only).

    ``relabel=("sub-04", "sub-01")`` compares a participant ``b`` whose inputs are a copy of ``a``'s under another
    label: ``sub-04`` in ``b``'s file names and in its JSON and text files reads as ``sub-01``.
    """
    old, new = relabel if relabel else ("", "")

    def rename(text: str) -> str:
        return text.replace(old, new) if relabel else text

    fa = {p.relative_to(a).as_posix(): p for p in a.rglob("*") if p.is_file()}
    fb = {rename(p.relative_to(b).as_posix()): p for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in one: {sorted(set(fa) ^ set(fb))}"] if set(fa) != set(fb) else []
    for rel in sorted(r for r in set(fa) & set(fb) if not r.endswith(FIGURES)):
        pa, pb = fa[rel], fb[rel]
        if rel.endswith(".nii.gz"):
            import nibabel as nib
            import numpy as np

            ia, ib = nib.load(str(pa)), nib.load(str(pb))
            same = (np.array_equal(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj))
                    and np.array_equal(ia.affine, ib.affine))
        elif rel.endswith(".npz"):
            import numpy as np

            with np.load(pa) as za, np.load(pb) as zb:
                same = sorted(za.files) == sorted(zb.files) and all(np.array_equal(za[k], zb[k]) for k in za.files)
        elif rel.endswith(".json"):
            same = _strip_runtime(json.loads(pa.read_text())) == _strip_runtime(json.loads(rename(pb.read_text())))
        elif relabel:
            same = pa.read_bytes() == pb.read_bytes().replace(old.encode(), new.encode())
        else:
            same = pa.read_bytes() == pb.read_bytes()
        if not same:
            diffs.append(rel)
    return diffs


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module's tests, restored afterwards (``pytestmark =
    pytest.mark.usefixtures("torch_one_thread")``): on a shared 2-core machine with other work running, two OpenMP
    threads made the same solves 10-30x slower and their timing erratic; the results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tissue_images(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1-like and T2-like images (float64, partial volume: smoothed by a Gaussian of 0.6 voxel) of a label volume:
    0 background, 1 GM-like, 2 WM-like, 3 CSF-like; the tissue order is inverted between the two (T1: WM > GM > CSF,
    T2: CSF > GM > WM), as in brain MRI."""
    from scipy.ndimage import gaussian_filter

    t1 = gaussian_filter(np.array([0.0, 0.6, 1.0, 0.25])[label], 0.6) * 1000.0
    t2 = gaussian_filter(np.array([0.0, 0.7, 0.4, 1.0])[label], 0.6) * 800.0
    return t1, t2

"""Shared fixtures. Real MRI lives outside the project (``ATLASGS_TEST_DATA``, default ``../shared/data``)."""
from __future__ import annotations

import os
from pathlib import Path

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
"""T1w voxel size (mm) of the tiny sample: a whole participant run takes ~20 s on 2 cores at --quality fast."""


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

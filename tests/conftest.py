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

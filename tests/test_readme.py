"""README facts (issue 16): what an install costs, how long the tests take, where the real test data come from and
that their tests skip without them, and a demo run's output ignored by git."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO


def test_readme_states_install_test_time_and_data():
    text = (REPO / "README.md").read_text()
    assert re.search(r"install takes about [\d.]+ min and the venv is\s+[\d.]+ GB", text)
    assert "test suite takes" in text and "-m \"not slow\"" in text
    assert "$ATLASGS_TEST_DATA" in text and "../shared/data" in text
    conftest = (REPO / "tests" / "conftest.py").read_text()
    skip = "real test data not found at"
    assert skip in text and skip in conftest  # the README quotes the skip reason the tests give
    assert "<!-- test-command -->" in text


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_demo_output_is_ignored_by_git():
    for path in ("demo-out/derivatives/sub-01.html", "demo-out/bids/participants.tsv"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True)
        assert proc.returncode == 0, f"{path} is not ignored"

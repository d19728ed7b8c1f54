"""Dataset validation with the ``bids-validator-deno`` executable (PyPI package ``bids-validator-deno``).

The validator runs offline (its schema ships in the package). Its JSON report is parsed; errors are summarised in
the log (one line per error code, with up to three example files) and raise :class:`InputError`; warnings are
counted only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlasgs_bids.errors import InputError

LOGGER = logging.getLogger("atlasgs")
EXECUTABLE = "bids-validator-deno"


@dataclass(frozen=True)
class ValidationReport:
    """Issues of one validator run, grouped by code."""

    errors: dict[str, list[str]] = field(default_factory=dict)
    """Error code -> locations (paths relative to the dataset root)."""
    warnings: dict[str, list[str]] = field(default_factory=dict)
    """Warning code -> locations."""

    def summary(self, max_examples: int = 3) -> list[str]:
        """One line per error code: ``CODE (n): first locations``."""
        lines = []
        for code, locs in sorted(self.errors.items()):
            shown = ", ".join(locs[:max_examples]) + (", ..." if len(locs) > max_examples else "")
            lines.append(f"{code} ({len(locs)}): {shown}")
        return lines


def find_validator() -> str:
    """Path of the validator: next to this Python (the venv's ``bin``) first, then ``PATH``."""
    here = Path(sys.executable).parent / EXECUTABLE
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(EXECUTABLE)
    if not found:
        raise InputError(f"{EXECUTABLE} not found; install it (pip install bids-validator-deno) or pass "
                         "--skip-bids-validation")
    return found


def parse_report(data: dict[str, Any]) -> ValidationReport:
    """Group the issues of the validator's ``--format json`` output by severity and code."""
    errors: dict[str, list[str]] = defaultdict(list)
    warnings: dict[str, list[str]] = defaultdict(list)
    for issue in data.get("issues", {}).get("issues", []):
        where = issue.get("location") or ", ".join(issue.get("affects", [])) or "(dataset)"
        sink = errors if issue.get("severity") == "error" else warnings
        sink[issue.get("code", "UNKNOWN")].append(where)
    return ValidationReport(errors=dict(errors), warnings=dict(warnings))


def run_validator(bids_dir: str | os.PathLike, *, extra_args: tuple[str, ...] = (),
                  timeout: float = 600) -> ValidationReport:
    """Run the validator on ``bids_dir`` and parse its JSON report (does not raise on dataset errors)."""
    cmd = [find_validator(), "--format", "json", *extra_args, str(bids_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise InputError(f"{bids_dir}: {EXECUTABLE} gave no JSON report (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[:500]}; pass --skip-bids-validation to go on without it") from None
    return parse_report(data)


def validate_dataset(bids_dir: str | os.PathLike) -> ValidationReport:
    """Validate the input dataset; log a summary; raise :class:`InputError` if it has errors."""
    report = run_validator(bids_dir)
    n_warn = sum(len(v) for v in report.warnings.values())
    if report.errors:
        for line in report.summary():
            LOGGER.error("bids-validator: %s", line)
        raise InputError(f"{bids_dir}: not a valid BIDS dataset ({sum(len(v) for v in report.errors.values())} "
                         f"errors: {', '.join(sorted(report.errors))}); fix them (run {EXECUTABLE} {bids_dir}) or "
                         "pass --skip-bids-validation")
    LOGGER.info("bids-validator: no errors (%d warnings)", n_warn)
    return report

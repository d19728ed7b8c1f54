"""Group level: a QC table (and its HTML page) from the derivatives' sidecars (no image is read).

``group_qc.tsv`` has one row per participant x session x harmonised target (``status`` ``ok``), plus one row per
participant that has no output (``missing``) or whose run failed (``failed``, from ``logs/<label>_status.json``).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from atlasgs_bids.bids.derivatives import atomic_write_bytes, parse_name

BASE_COLUMNS = ("participant_id", "session_id", "target", "modality", "status", "runtime_seconds", "device",
                "sidecar")


def _status_files(output_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted((output_dir / "logs").glob("sub-*_status.json")):
        try:
            out[f.name[: -len("_status.json")]] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def collect_rows(output_dir: str | os.PathLike, participants: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of the QC table from ``*_desc-atlasgs_*.json`` sidecars (scaffold JSON excluded).

    Parameters
    ----------
    participants : labels without ``sub-`` expected in the output (e.g. the raw dataset's subjects); those with no
        sidecar get a ``missing`` (or ``failed``) row.
    """
    output_dir = Path(output_dir)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for sidecar in sorted(output_dir.glob("sub-*/**/*_space-T1w_desc-atlasgs_*.json")):
        ents, suffix, _ = parse_name(sidecar)
        meta = json.loads(sidecar.read_text())
        runtime = meta.get("Runtime", {})
        row: dict[str, Any] = {
            "participant_id": f"sub-{ents['sub']}", "session_id": f"ses-{ents['ses']}" if "ses" in ents else "n/a",
            "target": next((s.split(":", 2)[-1] for s in meta.get("Sources", [])), sidecar.name),
            "modality": suffix, "status": "ok",
            "runtime_seconds": round(runtime["total_seconds"] if isinstance(runtime.get("total_seconds"), (int, float))
                                     else sum(v for v in runtime.values() if isinstance(v, (int, float))), 3),
            "device": meta.get("Device", "n/a"), "sidecar": sidecar.relative_to(output_dir).as_posix(),
        }
        for key, value in (meta.get("Metrics") or {}).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                row[key] = value
        flags = meta.get("QCFlags")
        row["qc_flags"] = ";".join(str(f) for f in flags) if flags else "n/a"
        rows.append(row)
        seen.add(ents["sub"])
    statuses = _status_files(output_dir)
    for label, status in statuses.items():
        if status.get("status") == "failed":
            ents, _, _ = parse_name(f"{label}_x")
            rows.append({"participant_id": f"sub-{ents['sub']}",
                         "session_id": f"ses-{ents['ses']}" if "ses" in ents else "n/a", "target": "n/a",
                         "modality": "n/a", "status": "failed", "error": status.get("error", "")})
            seen.add(ents["sub"])
    for sub in sorted(set(participants) - seen):
        rows.append({"participant_id": f"sub-{sub}", "session_id": "n/a", "target": "n/a", "modality": "n/a",
                     "status": "missing"})
    return rows


def write_group_qc(output_dir: str | os.PathLike, participants: Iterable[str] = (), *, html: bool = True) -> Path:
    """Write ``<output_dir>/group_qc.tsv`` (atomic) and, with ``html``, ``group_qc.html`` beside it.

    Metric columns are the union of the sidecars' ``Metrics``; then ``qc_flags`` (the sidecar's ``QCFlags``,
    ``;``-joined), ``outlier_<metric>`` and ``outliers`` (robust, per modality: :mod:`atlasgs_bids.reports.group`).
    """
    from atlasgs_bids.reports.group import add_outlier_columns, write_group_html
    from atlasgs_bids.version import __version__

    rows = collect_rows(output_dir, participants)
    bands = add_outlier_columns(rows)
    if html:
        write_group_html(output_dir, rows, bands, version=__version__)
    extra = sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*BASE_COLUMNS, *extra], delimiter="\t", restval="n/a",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("n/a" if v is None else v) for k, v in r.items()})
    return atomic_write_bytes(Path(output_dir) / "group_qc.tsv", buf.getvalue().encode())


def expected_participants(bids_dir: str | os.PathLike, participant_label: Iterable[str] = (), *,
                          output_dir: str | os.PathLike | None = None) -> list[str]:
    """Subjects the group level expects: ``participant_label``; else the ``sub-*`` folders of the raw dataset when
    it is there; else (the derivatives alone) the subjects the participant level recorded in ``output_dir``
    (:data:`atlasgs_bids.bids.derivatives.SUBJECTS_FILE`)."""
    from atlasgs_bids.bids.derivatives import recorded_subjects

    labels = [p[4:] if p.startswith("sub-") else p for p in participant_label]
    if labels:
        return sorted(labels)
    if Path(bids_dir).is_dir():
        return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())
    return recorded_subjects(output_dir) if output_dir is not None else []

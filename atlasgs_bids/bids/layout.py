"""Input discovery with pybids: one T1w and its thick-slice targets per subject/session.

Rules (also in ``docs/usage.md``):

* **One T1w per subject/session**: the finest voxel volume (product of the voxel sizes, mm^3), then the highest
  ``run`` number, then the name; the choice is logged. A T1w whose largest voxel size is more than
  :data:`MAX_T1W_ANISOTROPY` times its smallest is refused (the scaffold needs a 3D T1w).
* **Targets** are files with suffix ``T2w``, ``FLAIR``, ``PDw``, ``T2starw`` (``anat``), ``dwi`` (needs ``.bval`` and
  ``.bvec``) or ``asl`` (``perf``, needs ``_aslcontext.tsv``).
* **Not-coarser rule**: a target whose every voxel size is <= the T1w's largest voxel size x
  :data:`COARSER_TOLERANCE` has nothing to gain and is skipped with a warning.

pybids indexes the dataset with ``validate=False``; validation is separate (:mod:`atlasgs_bids.bids.validate`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np

from atlasgs_bids.errors import InputError

LOGGER = logging.getLogger("atlasgs")

COARSER_TOLERANCE = 1.05
MAX_T1W_ANISOTROPY = 2.0

#: Default pybids queries per filter key, as fMRIPrep's ``--bids-filter-file`` keys.
DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    "t1w": {"datatype": "anat", "suffix": "T1w"},
    "t2w": {"datatype": "anat", "suffix": "T2w"},
    "flair": {"datatype": "anat", "suffix": "FLAIR"},
    "pdw": {"datatype": "anat", "suffix": "PDw"},
    "t2starw": {"datatype": "anat", "suffix": "T2starw"},
    "dwi": {"datatype": "dwi", "suffix": "dwi"},
    "asl": {"datatype": "perf", "suffix": "asl"},
}
_NIFTI = [".nii", ".nii.gz"]


@dataclass(frozen=True)
class TargetInput:
    """One thick-slice target image and what travels with it."""

    path: Path
    """The target NIfTI (3D, or 4D for dwi/asl)."""
    modality: str
    """BIDS suffix: T2w, FLAIR, PDw, T2starw, dwi or asl."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Sidecar metadata (inherited JSON, e.g. ``SliceThickness`` in mm)."""
    bval: Path | None = None
    bvec: Path | None = None
    aslcontext: Path | None = None
    zooms: tuple[float, ...] = ()
    """Voxel sizes in mm (first three axes)."""


@dataclass(frozen=True)
class SubjectInputs:
    """Inputs of one participant workflow (one subject, one session or none)."""

    subject: str
    session: str | None
    t1w: Path
    targets: list[TargetInput] = field(default_factory=list, hash=False)
    t1w_mask: Path | None = None
    """A precomputed brain mask found in ``--derivatives``, if any."""

    @property
    def label(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def strip_prefix(label: str, prefix: str) -> str:
    """``'sub-01' -> '01'`` (also accepts the bare label).

    >>> strip_prefix("sub-01", "sub-"), strip_prefix("01", "sub-")
    ('01', '01')
    """
    return label[len(prefix):] if label.startswith(prefix) else label


def load_bids_filters(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read an fMRIPrep-style filter file: ``{"t1w": {"acquisition": "mprage"}, "t2w": {"run": 1}}``.

    Keys must be among :data:`DEFAULT_QUERIES`; values are pybids entity filters (``null`` = entity absent,
    ``"*"`` = any value). Raises :class:`InputError` naming the file otherwise.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: --bids-filter-file does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: --bids-filter-file is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path}: --bids-filter-file must be a JSON object of objects, e.g. "
                         '{"t1w": {"acquisition": "mprage"}}')
    unknown = set(data) - set(DEFAULT_QUERIES)
    if unknown:
        raise InputError(f"{path}: unknown query keys {sorted(unknown)} in --bids-filter-file; "
                         f"use {sorted(DEFAULT_QUERIES)}")
    return data


def _pybids_filters(filters: dict[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    out: dict[str, Any] = {}
    for key, value in filters.items():
        if value is None:
            out[key] = Query.NONE
        elif value == "*":
            out[key] = Query.ANY
        else:
            out[key] = value
    return out


def voxel_sizes(path: str | os.PathLike) -> tuple[float, float, float]:
    """Voxel sizes (mm) of the first three axes: column norms of the affine's 3x3 part (header only)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: cannot read this NIfTI ({exc}); re-export it") from None
    zooms = nib.affines.voxel_sizes(np.asarray(img.affine))
    return tuple(float(z) for z in zooms)  # type: ignore[return-value]


def choose_t1w(candidates: Iterable[tuple[Path, dict[str, Any]]]) -> Path:
    """The T1w to use: finest voxel volume, then highest ``run``, then name.

    Parameters
    ----------
    candidates : iterable of (path, entities)
        Entities as pybids returns them (``run`` an int when present).
    """
    scored = []
    for path, ents in candidates:
        zooms = voxel_sizes(path)
        volume = round(float(np.prod(zooms)), 6)
        run = int(ents.get("run") or 0)
        scored.append((volume, -run, str(path), Path(path)))
    if not scored:
        raise ValueError("no T1w candidates")
    scored.sort()
    return scored[0][3]


def is_coarser(target_zooms: Iterable[float], t1w_zooms: Iterable[float],
               tolerance: float = COARSER_TOLERANCE) -> bool:
    """Whether a target has a voxel axis coarser than the T1w's largest voxel size x ``tolerance``.

    >>> is_coarser((0.86, 0.86, 2.4), (0.88, 0.88, 0.88))
    True
    >>> is_coarser((0.9, 0.9, 0.9), (0.88, 0.88, 0.88))
    False
    """
    limit = max(t1w_zooms) * tolerance
    return any(z > limit for z in target_zooms)


def open_layout(bids_dir: str | os.PathLike, database_dir: str | os.PathLike | None = None):
    """A pybids ``BIDSLayout`` (``validate=False``) after checking this is a BIDS dataset at all.

    With ``database_dir`` (``--bids-database-dir``), the index is read from there when it exists (no file of the
    dataset is listed again: hours saved on tens of thousands of subjects), and otherwise built once and saved
    there. It is built in a private folder beside it and renamed into place, so array tasks starting together never
    see a half-written index (one wins, the others read the winner's). An index of another dataset is refused.
    Delete the folder to re-index after the dataset changed.
    """
    from bids import BIDSLayout

    root = Path(bids_dir)
    if not root.is_dir():
        raise InputError(f"{root}: the BIDS directory does not exist")
    if not (root / "dataset_description.json").is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json); convert the images to BIDS "
                         "first (e.g. dcm2bids or BIDScoin) so that each subject has sub-<label>/anat/..._T1w.nii.gz")
    if database_dir is not None:
        return _layout_from_database(root, Path(database_dir))
    try:
        return BIDSLayout(str(root), validate=False, derivatives=False)
    except Exception as exc:
        raise _index_error(root, exc) from None


def _index_error(root: Path, exc: Exception) -> InputError:
    bad = _first_invalid_json(root)
    return InputError(bad if bad is not None else f"{root}: pybids cannot index this dataset ({exc})")


DATABASE_FILE = "layout_index.sqlite"
"""The file pybids keeps its index in, inside ``--bids-database-dir``."""


def _layout_from_database(root: Path, database_dir: Path):
    """:func:`open_layout` with a saved index (see there)."""
    import shutil
    import tempfile

    from bids import BIDSLayout

    database_dir = database_dir.absolute()
    if not (database_dir / DATABASE_FILE).is_file():
        if database_dir.exists() and (not database_dir.is_dir() or any(database_dir.iterdir())):
            raise InputError(f"--bids-database-dir <{database_dir}> exists but holds no pybids index "
                             f"({DATABASE_FILE}); give an empty or new folder")
        database_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{database_dir.name}.", dir=database_dir.parent))
        try:
            BIDSLayout(str(root), validate=False, derivatives=False, database_path=str(tmp))
            with contextlib.suppress(OSError):
                database_dir.rmdir()  # an empty folder given by the user; a lost race leaves the winner's index
            with contextlib.suppress(OSError):
                os.rename(tmp, database_dir)
        except Exception as exc:
            raise _index_error(root, exc) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        LOGGER.info("pybids index of %s saved in %s", root, database_dir)
    else:
        LOGGER.info("pybids index read from %s", database_dir)
    try:
        layout = BIDSLayout(str(root), validate=False, derivatives=False, database_path=str(database_dir))
    except Exception as exc:
        raise InputError(f"--bids-database-dir <{database_dir}>: cannot read the pybids index there ({exc}); "
                         "delete the folder to re-index") from None
    indexed = Path(layout.root).resolve()
    if indexed != root.resolve():
        raise InputError(f"--bids-database-dir <{database_dir}> indexes {indexed}, not {root.resolve()}; give "
                         "each dataset its own folder")
    return layout


def _first_invalid_json(root: Path) -> str | None:
    """``"<file>: ... not valid JSON (...)"`` for the first JSON file of the dataset that does not parse (hidden
    folders, ``derivatives/``, ``sourcedata/`` and ``code/`` skipped), else ``None``."""
    skip = {"derivatives", "sourcedata", "code"}
    for js in sorted(root.rglob("*.json")):
        rel = js.relative_to(root).parts
        if rel[0] in skip or any(part.startswith(".") for part in rel):
            continue
        try:
            json.loads(js.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return (f"{js}: this JSON sidecar is not valid JSON ({exc}); fix it, e.g. check it with "
                    f"'python -m json.tool {js}'")
    return None


def _get(layout, subject: str, session: str | None, query: dict[str, Any], has_sessions: bool) -> list:
    from bids.layout import Query

    q = dict(query)
    q.setdefault("extension", _NIFTI)
    q["subject"] = subject
    if has_sessions:
        q["session"] = session if session is not None else Query.NONE
    return layout.get(return_type="object", **_pybids_filters(q))


def _find_mask(derivatives: Iterable[Path], subject: str, session: str | None) -> Path | None:
    for root in derivatives:
        folder = Path(root) / f"sub-{subject}"
        if session:
            folder /= f"ses-{session}"
        folder /= "anat"
        hits = sorted(folder.glob(f"sub-{subject}{'_ses-' + session if session else ''}*desc-brain_mask.nii*"))
        hits = [h for h in hits if "space-" not in h.name or "space-T1w" in h.name]
        if hits:
            return hits[0]
    return None


def collect_inputs(bids_dir: str | os.PathLike, *, participant_label: Iterable[str] = (),
                   session_label: Iterable[str] = (), modalities: Iterable[str] = tuple(
                       q["suffix"] for k, q in DEFAULT_QUERIES.items() if k != "t1w"),
                   bids_filters: dict[str, dict[str, Any]] | None = None,
                   derivatives: Iterable[str | os.PathLike] = (), layout=None) -> list[SubjectInputs]:
    """Discover what to process; every input problem raises :class:`InputError` before any work starts.

    Returns
    -------
    list of SubjectInputs
        One per subject x session with a T1w and at least one target coarser than it. Subjects whose targets are
        all skipped (none coarser) are left out with a warning; if that leaves nothing, InputError.
    """
    layout = layout or open_layout(bids_dir)
    root = Path(layout.root)
    filters = {k: dict(DEFAULT_QUERIES[k], **(bids_filters or {}).get(k, {})) for k in DEFAULT_QUERIES}
    all_subjects = sorted(layout.get_subjects())
    if not all_subjects:
        raise InputError(f"{root}: no sub-* folders with images found; is this the dataset root?")
    wanted = [strip_prefix(s, "sub-") for s in participant_label] or all_subjects
    missing = sorted(set(wanted) - set(all_subjects))
    if missing:
        raise InputError(f"{root}: no subject(s) {', '.join('sub-' + m for m in missing)} in the dataset "
                         f"(it has {', '.join('sub-' + s for s in all_subjects)}); check --participant-label")
    sessions_wanted = [strip_prefix(s, "ses-") for s in session_label]
    modalities = [m for m in DEFAULT_QUERIES if m != "t1w" and DEFAULT_QUERIES[m]["suffix"] in set(modalities)]

    found: list[SubjectInputs] = []
    no_t1w: list[str] = []
    for subject in wanted:
        sessions: list[str | None] = sorted(layout.get_sessions(subject=subject)) or [None]
        has_sessions = sessions != [None]
        if sessions_wanted:
            sessions = [s for s in sessions if s in sessions_wanted]
            if not sessions:
                LOGGER.warning("sub-%s: none of the sessions %s; skipped", subject, sessions_wanted)
                continue
        for session in sessions:
            label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            t1ws = _get(layout, subject, session, filters["t1w"], has_sessions)
            if not t1ws:
                no_t1w.append(label)
                continue
            t1w = choose_t1w((Path(f.path), f.get_entities()) for f in t1ws)
            t1w_zooms = voxel_sizes(t1w)
            if len(t1ws) > 1:
                LOGGER.info("%s: %d T1w images; using %s (finest voxels, then highest run)", label, len(t1ws),
                            t1w.name)
            if max(t1w_zooms) > MAX_T1W_ANISOTROPY * min(t1w_zooms):
                raise InputError(
                    f"{t1w}: the T1w is not 3D (voxels {'x'.join(f'{z:.2g}' for z in t1w_zooms)} mm, anisotropy > "
                    f"{MAX_T1W_ANISOTROPY:g}); the scaffold needs an isotropic T1w. Exclude this subject with "
                    "--participant-label or pick another T1w with --bids-filter-file")
            targets: list[TargetInput] = []
            for key in modalities:
                for f in _get(layout, subject, session, filters[key], has_sessions):
                    target = _target_input(layout, Path(f.path), DEFAULT_QUERIES[key]["suffix"])
                    if not is_coarser(target.zooms, t1w_zooms):
                        LOGGER.warning(
                            "%s: skipped, its voxels (%s mm) are no coarser than the T1w's (%s mm): nothing to "
                            "harmonise (not-coarser rule, see docs/usage.md)", target.path.name,
                            "x".join(f"{z:.3g}" for z in target.zooms), "x".join(f"{z:.3g}" for z in t1w_zooms))
                        continue
                    targets.append(target)
            if not targets:
                LOGGER.warning("%s: no target coarser than its T1w among %s; nothing to do for it", label,
                               ", ".join(DEFAULT_QUERIES[m]["suffix"] for m in modalities))
                continue
            found.append(SubjectInputs(subject=subject, session=session, t1w=t1w, targets=targets,
                                       t1w_mask=_find_mask([Path(d) for d in derivatives], subject, session)))
    if no_t1w:
        raise InputError(f"{root}: no T1w image for {', '.join(no_t1w)} (expected "
                         f"{no_t1w[0].replace('_', '/')}/anat/{no_t1w[0]}_T1w.nii.gz); the method needs a 3D T1w "
                         "of the same subject. Add one, or leave the subject out with --participant-label")
    if not found:
        raise InputError(f"{root}: nothing to process: no target ({', '.join(DEFAULT_QUERIES[m]['suffix'] for m in modalities)}) "
                         "coarser than its T1w; see --modalities and the not-coarser rule in docs/usage.md")
    return found


#: Entities by which stacks of one contrast may differ and still be fused (``--fuse-stacks``).
FUSABLE_ENTITIES = ("run", "acq")
#: Suffixes that may be fused: 3D anatomical contrasts (a dwi or asl series carries per-volume metadata).
FUSABLE_SUFFIXES = ("T2w", "FLAIR", "PDw", "T2starw")


def fusion_groups(targets: Sequence[TargetInput]) -> list[list[TargetInput]]:
    """The targets grouped for ``--fuse-stacks``: stacks of one suffix (:data:`FUSABLE_SUFFIXES`) whose names
    differ only by :data:`FUSABLE_ENTITIES` form one group; every other target is a group of its own.

    In a group the first stack is the reference (the output is in its units and it chooses the hyperparameters):
    the finest voxel volume, then the name. Groups keep the order of their first member in ``targets``.

    >>> t = [TargetInput(Path(f"sub-1_{e}T2w.nii.gz"), "T2w", zooms=z) for e, z in
    ...      (("acq-cor_", (1, 4, 1)), ("acq-ax_", (1, 1, 4)), ("acq-ax_run-2_", (1, 1, 3)), ("", (1, 1, 5)))]
    >>> [[x.path.name for x in g] for g in fusion_groups(t)]
    [['sub-1_acq-ax_run-2_T2w.nii.gz', 'sub-1_acq-ax_T2w.nii.gz', 'sub-1_acq-cor_T2w.nii.gz', 'sub-1_T2w.nii.gz']]
    """
    groups: dict[tuple, list[TargetInput]] = {}
    for i, target in enumerate(targets):
        ents, suffix = _name_entities(target.path.name)
        if target.modality in FUSABLE_SUFFIXES:
            key = (suffix, tuple(sorted((k, v) for k, v in ents.items() if k not in FUSABLE_ENTITIES)))
        else:
            key = ("single", i)
        groups.setdefault(key, []).append(target)
    return [sorted(g, key=lambda t: (round(float(np.prod(t.zooms or (1.0,))), 6), t.path.name))
            for g in groups.values()]


def _sidecar_candidates(path: Path, root: Path) -> list[Path]:
    """JSON files that BIDS inheritance applies to ``path``: in its folder and each parent up to ``root``, with the
    same suffix and entities that are a subset of the image's (``sub-01_T2w.json`` applies to
    ``sub-01_run-1_T2w.nii.gz``, ``sub-01_run-2_T2w.json`` does not)."""
    ents, suffix = _name_entities(path.name)
    out: list[Path] = []
    folder = path.parent
    while True:
        for js in sorted(folder.glob(f"*{suffix}.json")):
            js_ents, js_suffix = _name_entities(js.name)
            if js_suffix == suffix and js_ents.items() <= ents.items():
                out.append(js)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return out


def _name_entities(name: str) -> tuple[dict[str, str], str]:
    """``("sub-01_run-1_T2w.nii.gz")`` -> ``({"sub": "01", "run": "1"}, "T2w")``; parts without ``-`` are ignored."""
    parts = name.split(".", 1)[0].split("_")
    return dict(p.split("-", 1) for p in parts[:-1] if "-" in p), parts[-1]


def read_metadata(layout, path: Path) -> dict[str, Any]:
    """Sidecar metadata of ``path`` (inherited JSON merged by pybids), checked: every sidecar parses as a JSON
    object and ``SliceThickness`` / ``SpacingBetweenSlices``, when present, are positive numbers (mm).

    Raises :class:`InputError` naming the sidecar that is wrong."""
    root = Path(layout.root)
    for js in _sidecar_candidates(path, root):
        try:
            data = json.loads(js.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{js}: this JSON sidecar (of {path.name}) is not valid JSON ({exc}); fix it, e.g. "
                             f"check it with 'python -m json.tool {js}'") from None
        if not isinstance(data, dict):
            raise InputError(f"{js}: this JSON sidecar (of {path.name}) must hold a JSON object {{...}}, "
                             f"not a {type(data).__name__}")
    try:
        meta = dict(layout.get_metadata(str(path)))
    except Exception as exc:  # pybids parses the same files; anything else it trips on is the user's data too
        raise InputError(f"{path}: its JSON sidecar metadata cannot be read ({type(exc).__name__}: {exc})") from None
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        value = meta.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0
        if not ok:
            where = ", ".join(str(js) for js in _sidecar_candidates(path, root)) or str(path)
            raise InputError(f"{where}: {key} of {path.name} is {value!r}; it must be a positive number of mm "
                             "(or be left out: the slice spacing is then used)")
    return meta


def _check_dwi_gradients(path: Path, bval: Path, bvec: Path) -> None:
    """The .bval / .bvec of a dwi series parse as numbers and list one value (one 3-vector) per volume."""
    try:
        n_vols = int(nib.load(str(path)).shape[3]) if len(nib.load(str(path)).shape) == 4 else 1
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI ({exc}); re-export it") from None
    try:
        b = np.atleast_1d(np.loadtxt(bval, dtype=float, ndmin=1)).ravel()
    except Exception as exc:
        raise InputError(f"{bval}: not a list of numbers ({exc}); fix the .bval file") from None
    try:
        v = np.loadtxt(bvec, dtype=float, ndmin=2)
    except Exception as exc:
        raise InputError(f"{bvec}: not a 3-row table of numbers ({exc}); fix the .bvec file") from None
    if b.size != n_vols:
        raise InputError(f"{bval}: {b.size} b-values but {path.name} has {n_vols} volumes; the .bval must list one "
                         "value per volume")
    if v.shape != (3, n_vols):
        raise InputError(f"{bvec}: shape {v.shape[0]}x{v.shape[1]} but {path.name} has {n_vols} volumes; the .bvec "
                         f"must have 3 rows of {n_vols} values")


def _target_input(layout, path: Path, modality: str) -> TargetInput:
    meta = read_metadata(layout, path)
    zooms = voxel_sizes(path)
    bval = bvec = aslcontext = None
    if modality == "dwi":
        try:
            bval, bvec = Path(layout.get_bval(str(path))), Path(layout.get_bvec(str(path)))
        except Exception:
            bval = bvec = None
        if not (bval and bval.is_file() and bvec and bvec.is_file()):
            raise InputError(f"{path}: a dwi series needs its .bval and .bvec files (same name, or inherited); "
                             "add them or leave dwi out with --modalities")
        _check_dwi_gradients(path, bval, bvec)
    if modality == "asl":
        ents, _, ext = _split(path)
        aslcontext = path.with_name(path.name[: -len(f"_asl{ext}")] + "_aslcontext.tsv")
        if not aslcontext.is_file():
            raise InputError(f"{path}: an asl series needs its {aslcontext.name}; add it or leave asl out "
                             "with --modalities")
    return TargetInput(path=path, modality=modality, meta=meta, bval=bval, bvec=bvec, aslcontext=aslcontext,
                       zooms=zooms)


def _split(path: Path) -> tuple[str, str, str]:
    name = path.name
    stem, dot, ext = name.partition(".")
    return stem, dot, dot + ext

"""BIDS-Derivatives names, sidecars and atomic writes.

Names are built from the entities of the source file plus overrides (``space``, ``desc``, ``from``/``to``/``mode``),
never by string concatenation of the source name. Every write goes to a temp file in the destination folder and is
renamed into place (:func:`atomic_write_bytes`). A participant's outputs are staged in a temp folder inside the
output dataset and moved into place only once the participant succeeded (:func:`commit_staging`).

>>> src = "/bids/sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-2_T2w.nii.gz"
>>> str(target_output(src))
'sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-2_space-T1w_desc-atlasgs_T2w.nii.gz'
>>> str(target_output(src, extension=".json"))
'sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-2_space-T1w_desc-atlasgs_T2w.json'
>>> str(sd_output(src))
'sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-2_space-T1w_desc-atlasgsSD_T2w.nii.gz'
>>> str(xfm_output(src))
'sub-01/ses-1/anat/sub-01_ses-1_acq-tse_run-2_from-T2w_to-T1w_mode-image_xfm.txt'
>>> str(target_output("/bids/sub-01/dwi/sub-01_dir-AP_dwi.nii.gz", extension=".bvec"))
'sub-01/dwi/sub-01_dir-AP_space-T1w_desc-atlasgs_dwi.bvec'
>>> str(target_output("/bids/sub-01/perf/sub-01_asl.nii.gz", suffix="aslcontext", extension=".tsv"))
'sub-01/perf/sub-01_space-T1w_desc-atlasgs_aslcontext.tsv'
>>> t1w = "/bids/sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz"
>>> str(t1w_preproc_output(t1w)), str(brain_mask_output(t1w))
('sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz', 'sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz')
>>> str(scaffold_output("/bids/sub-01/anat/sub-01_T1w.nii.gz"))
'sub-01/anat/sub-01_desc-atlasgs_gaussians.npz'
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from atlasgs_bids.atomic import atomic_path, atomic_write_bytes  # noqa: F401 (re-exported)
from atlasgs_bids.errors import InputError
from atlasgs_bids.processes import alive

#: Entity keys in BIDS order (the schema's order, with derivative entities and the xfm entities at the end).
ENTITY_ORDER: tuple[str, ...] = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir", "run",
    "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording", "chunk", "seg",
    "res", "den", "label", "desc", "from", "to", "mode",
)
#: Datatype folder of each target suffix.
DATATYPE: dict[str, str] = {"T1w": "anat", "T2w": "anat", "FLAIR": "anat", "PDw": "anat", "T2starw": "anat",
                            "dwi": "dwi", "asl": "perf"}
PIPELINE_NAME = "atlasgs-bids"


def parse_name(path: str | os.PathLike) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into ``(entities, suffix, extension)``.

    >>> parse_name("/x/sub-01_ses-a_run-3_T2w.nii.gz")
    ({'sub': '01', 'ses': 'a', 'run': '3'}, 'T2w', '.nii.gz')
    """
    name = Path(path).name
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not value:
            raise InputError(f"{path}: not a BIDS file name (entity {part!r} is not key-value)")
        entities[key] = value
    if "sub" not in entities:
        raise InputError(f"{path}: not a BIDS file name (no sub- entity)")
    return entities, parts[-1], (dot + ext) if dot else ""


def build_name(entities: dict[str, str], suffix: str, extension: str) -> str:
    """A BIDS file name from entities (ordered by :data:`ENTITY_ORDER`), a suffix and an extension.

    >>> build_name({"desc": "brain", "sub": "01"}, "mask", ".nii.gz")
    'sub-01_desc-brain_mask.nii.gz'
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    chain = [f"{k}-{entities[k]}" for k in ENTITY_ORDER if entities.get(k) not in (None, "")]
    return "_".join([*chain, suffix]) + extension


def derivative_path(source_file: str | os.PathLike, *, suffix: str | None = None, extension: str | None = None,
                    datatype: str | None = None, dismiss: Iterable[str] = (), **overrides: str | None) -> Path:
    """Relative path of a derivative of ``source_file``: its entities, minus ``dismiss``, plus ``overrides``.

    ``from``/``to`` are given as ``from_``/``to`` (``from`` is a Python keyword). An override of ``None`` removes
    the entity. The folder is ``sub-X[/ses-Y]/<datatype>`` (datatype from the suffix of the source by default).
    """
    entities, src_suffix, src_ext = parse_name(source_file)
    for key in dismiss:
        entities.pop(key, None)
    for key, value in overrides.items():
        key = key.rstrip("_")
        if value is None:
            entities.pop(key, None)
        else:
            entities[key] = value
    folder = Path(f"sub-{entities['sub']}")
    if entities.get("ses"):
        folder /= f"ses-{entities['ses']}"
    folder /= datatype or DATATYPE.get(src_suffix, "anat")
    return folder / build_name(entities, suffix or src_suffix, src_ext if extension is None else extension)


_T1W_DISMISS = ("acq", "ce", "rec", "run", "echo", "part", "inv", "mt", "flip", "task", "dir")


def t1w_preproc_output(t1w_file: str | os.PathLike) -> Path:
    """``sub-X[_ses-Y]_desc-preproc_T1w.nii.gz``: the reoriented T1w, the reference grid of every output."""
    return derivative_path(t1w_file, dismiss=_T1W_DISMISS, desc="preproc", extension=".nii.gz", datatype="anat")


def brain_mask_output(t1w_file: str | os.PathLike) -> Path:
    """``sub-X[_ses-Y]_desc-brain_mask.nii.gz`` on the T1w grid."""
    return derivative_path(t1w_file, dismiss=_T1W_DISMISS, desc="brain", suffix="mask", extension=".nii.gz",
                           datatype="anat")


def scaffold_output(t1w_file: str | os.PathLike, extension: str = ".npz") -> Path:
    """``sub-X[_ses-Y]_desc-atlasgs_gaussians.npz`` (and ``.json``): the fitted Gaussian scaffold."""
    return derivative_path(t1w_file, dismiss=_T1W_DISMISS, desc="atlasgs", suffix="gaussians", extension=extension,
                           datatype="anat")


def target_output(target_file: str | os.PathLike, *, suffix: str | None = None,
                  extension: str | None = None, **overrides: str | None) -> Path:
    """``<source entities>_space-T1w_desc-atlasgs_<suffix><ext>``: the harmonised target (or its sidecars);
    ``overrides`` as for :func:`derivative_path` (``None`` drops an entity)."""
    return derivative_path(target_file, space="T1w", desc="atlasgs", suffix=suffix, extension=extension, **overrides)


def fused_target_output(stack_files: Sequence[str | os.PathLike], **kwargs) -> Path:
    """The derivative of stacks fused into one output (``--fuse-stacks``): :func:`target_output` of the first
    (reference) stack without the entities in which the stacks' names differ; ``kwargs`` as for it.

    >>> str(fused_target_output([f"/b/sub-1/anat/sub-1_acq-{a}_run-1_T2w.nii.gz" for a in ("ax", "cor")]))
    'sub-1/anat/sub-1_run-1_space-T1w_desc-atlasgs_T2w.nii.gz'
    """
    return target_output(stack_files[0], **kwargs, **{k: None for k in _differing_entities(stack_files)})


def _differing_entities(stack_files: Sequence[str | os.PathLike]) -> set[str]:
    """The entities in which the names of ``stack_files`` differ (dropped from a fused output's name)."""
    names = [parse_name(f)[0] for f in stack_files]
    return {k for ents in names for k in ents if any(other.get(k) != ents.get(k) for other in names)}


def sd_output(target_file: str | os.PathLike | Sequence[str | os.PathLike], *, extension: str = ".nii.gz") -> Path:
    """``<source entities>_space-T1w_desc-atlasgsSD_<suffix><ext>``: the per-voxel posterior SD of the harmonised
    target (same grid and units), or its sidecar; of fused stacks (a list) named like their fused output.

    >>> str(sd_output([f"/b/sub-1/anat/sub-1_acq-{a}_run-1_T2w.nii.gz" for a in ("ax", "cor")]))
    'sub-1/anat/sub-1_run-1_space-T1w_desc-atlasgsSD_T2w.nii.gz'
    """
    files = [target_file] if isinstance(target_file, (str, os.PathLike)) else list(target_file)
    return derivative_path(files[0], space="T1w", desc="atlasgsSD", extension=extension,
                           **{k: None for k in _differing_entities(files)})


def xfm_output(target_file: str | os.PathLike) -> Path:
    """``<source entities>_from-<suffix>_to-T1w_mode-image_xfm.txt``: the ITK rigid transform (target -> T1w)."""
    _, src_suffix, _ = parse_name(target_file)
    return derivative_path(target_file, from_=src_suffix, to="T1w", mode="image", suffix="xfm", extension=".txt")


def bids_uri(path: str | os.PathLike, root: str | os.PathLike, dataset: str = "raw") -> str:
    """The BIDS URI of ``path`` inside the dataset at ``root`` (``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``).

    >>> bids_uri("/d/sub-01/anat/sub-01_T1w.nii.gz", "/d")
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    return f"bids:{dataset}:{rel.as_posix()}"


# ----------------------------------------------------------------------------------------------------------- writes
def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON (NaN/inf refused: they are not JSON)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temp file in ``dst``'s folder and :func:`os.replace`."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def container_info(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """``GeneratedBy.Container`` from the environment, when known.

    ``ATLASGS_CONTAINER_TYPE``/``ATLASGS_CONTAINER_TAG`` (set in the image) win; Apptainer/Singularity are detected
    by their own variables. Returns ``None`` outside a container.

    >>> container_info({"ATLASGS_CONTAINER_TYPE": "docker", "ATLASGS_CONTAINER_TAG": "atlasgs/atlasgs-bids:0.1"})
    {'Type': 'docker', 'Tag': 'atlasgs/atlasgs-bids:0.1'}
    >>> container_info({}) is None
    True
    """
    env = os.environ if environ is None else environ
    if env.get("ATLASGS_CONTAINER_TYPE"):
        info = {"Type": env["ATLASGS_CONTAINER_TYPE"]}
        if env.get("ATLASGS_CONTAINER_TAG"):
            info["Tag"] = env["ATLASGS_CONTAINER_TAG"]
        return info
    for var, kind in (("APPTAINER_NAME", "apptainer"), ("SINGULARITY_NAME", "singularity")):
        if env.get(var):
            return {"Type": kind, "Tag": env[var]}
    return None


def dataset_description(bids_dir: str | os.PathLike, version: str,
                        environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of the derivatives' ``dataset_description.json``."""
    generated: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": version,
                                 "CodeURL": "https://github.com/atlasgs/atlasgs-bids"}
    container = container_info(environ)
    if container:
        generated["Container"] = container
    return {
        "Name": "atlasgs-bids derivatives: thick-slice contrasts brought to the T1w grid",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "DatasetLinks": {"raw": Path(os.path.abspath(bids_dir)).as_uri()},
    }


def write_dataset_description(output_dir: str | os.PathLike, bids_dir: str | os.PathLike, version: str,
                              environ: dict[str, str] | None = None) -> bool:
    """Write ``dataset_description.json`` once: temp file, then :func:`os.link` which fails if it exists.

    Several participant processes starting together (array jobs) race safely: exactly one wins, the others leave
    the winner's file untouched. Returns ``True`` when this call wrote it.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / "dataset_description.json"
    if final.exists():
        return False
    content = (json.dumps(dataset_description(bids_dir, version, environ), indent=2) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=".dataset_description.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


README_TEXT = """# atlasgs-bids derivatives

Thick-slice contrasts (T2w, FLAIR, PDw, T2starw, dwi, asl) of each subject brought to the grid of the same
subject's 3D T1w by atlasgs-bids (a Gaussian scaffold built on the T1w, per-target intensities fitted through the
target's slice profile and a rigid registration). Per subject: `desc-preproc_T1w` (the output grid),
`desc-brain_mask`, `desc-atlasgs_gaussians` (the scaffold), `space-T1w_desc-atlasgs_<suffix>` (each target, with a
JSON sidecar: sources, method, parameters, metrics, runtime), `space-T1w_desc-atlasgsSD_<suffix>` (its per-voxel
uncertainty: the posterior SD calibrated on held-out slices, same units; unless `--no-uncertainty`) and
`from-<suffix>_to-T1w_mode-image_xfm.txt` (ITK).
`logs/` holds the run settings, per-participant status and methods text; `group_qc.tsv` the group QC table.
"""


def write_readme(output_dir: str | os.PathLike) -> Path:
    """Write the derivatives dataset's ``README.md`` (:data:`README_TEXT`) atomically unless one exists."""
    path = Path(output_dir) / "README.md"
    if path.exists():
        return path
    return atomic_write_bytes(path, README_TEXT.encode())


#: Outputs the BIDS schema does not know yet (bids-validator-deno 3.0 reports them NOT_INCLUDED), as fMRIPrep does.
BIDSIGNORE = ("logs/", "figures/", "sub-*/figures", "sub-*/qc", "*.html", "group_qc.tsv", "*_xfm.txt",
              "*_gaussians.npz", "*_gaussians.json")


def write_bidsignore(output_dir: str | os.PathLike) -> Path:
    """Write ``.bidsignore`` (:data:`BIDSIGNORE`, one pattern a line) atomically; same content every time."""
    return atomic_write_bytes(Path(output_dir) / ".bidsignore", ("\n".join(BIDSIGNORE) + "\n").encode())


SUBJECTS_FILE = "logs/participants.tsv"
"""The raw dataset's subjects as the participant level saw them: what the group level expects without the raw data."""


def recorded_subjects(output_dir: str | os.PathLike) -> list[str]:
    """Labels (without ``sub-``) in ``output_dir``/:data:`SUBJECTS_FILE`; empty when it is absent."""
    path = Path(output_dir) / SUBJECTS_FILE
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return []
    return sorted({line.split("\t", 1)[0].removeprefix("sub-") for line in lines if line.strip()})


def record_subjects(output_dir: str | os.PathLike, subjects: Iterable[str]) -> Path:
    """Add ``subjects`` (labels without ``sub-``) to :data:`SUBJECTS_FILE` (the union with what is there, written
    atomically; rewritten only when it grows, so array tasks of one dataset leave it alone after the first).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> _ = record_subjects(d, ["02", "01"]); _ = record_subjects(d, ["03"]); recorded_subjects(d)
    ['01', '02', '03']
    """
    path = Path(output_dir) / SUBJECTS_FILE
    known = set(recorded_subjects(output_dir))
    wanted = known | {s.removeprefix("sub-") for s in subjects}
    if wanted != known or not path.is_file():
        text = "participant_id\n" + "".join(f"sub-{s}\n" for s in sorted(wanted))
        atomic_write_bytes(path, text.encode())
    return path


# ---------------------------------------------------------------------------------------------------------- staging
def _host() -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in os.uname().nodename) or "host"


def stale_staging_dirs(output_dir: str | os.PathLike, label: str) -> list[Path]:
    """Staging folders of ``label`` left by a run on this host whose process is gone (killed: SIGKILL, power,
    out of memory). Folders of other hosts or of live processes are never listed (array jobs share output_dir)."""
    out, host, found = Path(output_dir), _host(), []
    for d in out.glob(f".staging-{label}-*"):
        parts = d.name[len(f".staging-{label}-"):].split("_")
        if len(parts) >= 3 and parts[0] == host and parts[1].isdigit() and not alive(int(parts[1])):
            found.append(d)
    return sorted(found)


def new_staging_dir(output_dir: str | os.PathLike, label: str) -> Path:
    """A fresh hidden staging folder ``.staging-<label>-<host>_<pid>_<random>`` inside ``output_dir`` (same file
    system, so moves are renames); stale ones of the same label left by killed runs on this host are removed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in stale_staging_dirs(out, label):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{label}-{_host()}_{os.getpid()}_", dir=out))


def commit_staging(staging: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
    """Move every file of ``staging`` to the same relative place under ``output_dir``; remove ``staging``.

    A top folder (``sub-X``) absent from the output is moved in one :func:`os.rename`; otherwise files are moved
    one by one with :func:`os.replace` (each atomic). Returns the final paths.
    """
    staging, out = Path(staging), Path(output_dir)
    moved: list[Path] = []
    for top in sorted(staging.iterdir()):
        dest = out / top.name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        if top.is_dir() and not dest.exists():
            try:
                os.rename(top, dest)
                moved.extend(dest / p.relative_to(top) for p in files)
                continue
            except OSError:
                pass  # raced with another process creating dest: fall back to per-file moves
        for f in files:
            target = out / f.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            moved.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def discard_staging(staging: str | os.PathLike) -> None:
    """Remove a staging folder and everything in it (the participant failed)."""
    shutil.rmtree(staging, ignore_errors=True)

"""Run settings: one frozen :class:`Config`, built once by the CLI and passed explicitly.

Unlike fMRIPrep's module-global ``config``, nothing here is global: one participant runs per process, the core is
a library, and tests build a ``Config`` with a plain call. The config is written to TOML (by hand: the values are
strings, numbers, booleans and lists of strings) and a copy is kept in ``<output_dir>/logs/``; :func:`Config.from_toml`
reads it back with :mod:`tomllib`.

>>> cfg = Config.build(bids_dir="/data/bids", output_dir="/data/out", analysis_level="participant")
>>> cfg.fit.quality, cfg.resources.nprocs, cfg.execution.modalities[:2]
('default', 1, ('T2w', 'FLAIR'))
>>> Config.from_toml(cfg.to_toml()) == cfg
True
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from atlasgs_bids.device import DEVICES
from atlasgs_bids.presets import check_quality

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: Target modalities (BIDS suffixes) the app knows, in the order it processes them.
MODALITIES: tuple[str, ...] = ("T2w", "FLAIR", "PDw", "T2starw", "dwi", "asl")


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the data are and what to process."""

    bids_dir: Path
    """Root of the input BIDS dataset (read only; never written)."""
    output_dir: Path
    """Root of the output BIDS-Derivatives dataset."""
    analysis_level: str
    """``participant`` or ``group`` (BIDS-Apps)."""
    work_dir: Path | None = None
    """Nipype working directory (reused across runs: finished nodes are skipped); ``None``: a temporary one."""
    participant_label: tuple[str, ...] = ()
    """Subjects to process, without ``sub-``; empty: all."""
    session_label: tuple[str, ...] = ()
    """Sessions to process, without ``ses-``; empty: all."""
    modalities: tuple[str, ...] = MODALITIES
    """Target suffixes to harmonise (subset of :data:`MODALITIES`)."""
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """fMRIPrep-style entity filters per query key (``t1w``, ``t2w``, ``flair``, ``pdw``, ``t2starw``, ``dwi``, ``asl``)."""
    skip_bids_validation: bool = False
    """Do not run ``bids-validator-deno`` on the input."""
    reports_only: bool = False
    """Only (re)build reports from existing derivatives."""
    skull_stripped: bool = False
    """The T1w is already brain-extracted: the brain mask is ``T1w > 0``."""
    derivatives: tuple[Path, ...] = ()
    """Derivatives datasets searched for a precomputed T1w brain mask (``desc-brain_mask``)."""
    bids_database_dir: Path | None = None
    """Where pybids' index of ``bids_dir`` is read from, or built and saved once (``--bids-database-dir``)."""

    @property
    def log_dir(self) -> Path:
        """``<output_dir>/logs``: the TOML copy of this config and per-participant status files."""
        return self.output_dir / "logs"


@dataclass(frozen=True)
class ResourcesConfig:
    """Compute resources."""

    nprocs: int = 1
    """Nipype MultiProc processes within one participant."""
    omp_nthreads: int = 1
    """Threads per process for torch / ANTs / BLAS."""
    mem_gb: float | None = None
    """Memory the MultiProc scheduler may plan for, in GB; ``None``: nipype's default (90% of the machine)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cuda`` or ``cpu`` (:data:`atlasgs_bids.device.DEVICES`)."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")


@dataclass(frozen=True)
class FitConfig:
    """Gaussian scaffold / appearance fitting."""

    quality: str = "default"
    """Quality preset (:data:`atlasgs_bids.presets.QUALITIES`): stage-2 solver budget and lambda tuning."""
    seed: int = 0
    """Seed of the registration sampling (the default lattice scaffold is not random)."""
    uncertainty: bool = True
    """Write each target's calibrated posterior SD map (``desc-atlasgsSD``; ADR 0008); ``--no-uncertainty`` skips it."""
    fuse_stacks: bool = False
    """Fit the stacks of one suffix that differ only by ``run`` or ``acq`` jointly, into one output
    (:func:`atlasgs_bids.bids.layout.fusion_groups`); off: one output per stack."""

    def __post_init__(self) -> None:
        check_quality(self.quality)


@dataclass(frozen=True)
class Config:
    """All settings of one run; sections :class:`ExecutionConfig`, :class:`ResourcesConfig`, :class:`FitConfig`."""

    execution: ExecutionConfig
    resources: ResourcesConfig = ResourcesConfig()
    fit: FitConfig = FitConfig()

    @classmethod
    def build(cls, **kwargs: Any) -> "Config":
        """A Config from flat keyword arguments (field names of any section); paths as ``str`` or ``Path``."""
        sections = {"execution": ExecutionConfig, "resources": ResourcesConfig, "fit": FitConfig}
        values: dict[str, dict[str, Any]] = {k: {} for k in sections}
        for key, value in kwargs.items():
            for sec, klass in sections.items():
                if key in {f.name for f in fields(klass)}:
                    values[sec][key] = value
                    break
            else:
                raise TypeError(f"unknown config field {key!r}")
        return cls(**{sec: sections[sec](**_coerce(sections[sec], values[sec])) for sec in sections})

    def replace(self, section: str, **changes: Any) -> "Config":
        """A copy with some fields of one section changed."""
        return replace(self, **{section: replace(getattr(self, section), **changes)})

    def to_toml(self) -> str:
        """The config as TOML text (``None`` values are left out; ``bids_filters`` is stored as a JSON string)."""
        lines: list[str] = []
        for sec in ("execution", "resources", "fit"):
            obj = getattr(self, sec)
            lines.append(f"[{sec}]")
            for f in fields(obj):
                value = getattr(obj, f.name)
                if value is None:
                    continue
                if f.name == "bids_filters":
                    lines.append(f"bids_filters = {_toml_str(json.dumps(value, sort_keys=True))}")
                    continue
                lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_toml(cls, text: str) -> "Config":
        """Read :meth:`to_toml` output back."""
        data = tomllib.loads(text)
        flat: dict[str, Any] = {}
        for sec in ("execution", "resources", "fit"):
            flat.update(data.get(sec, {}))
        if "bids_filters" in flat:
            flat["bids_filters"] = json.loads(flat["bids_filters"])
        return cls.build(**flat)

    def save(self, path: Path | str) -> Path:
        """Write :meth:`to_toml` to ``path`` atomically (temp file + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_toml())
        os.replace(tmp, path)
        return path


def _coerce(klass: type, values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for f in fields(klass):
        if f.name not in out or out[f.name] is None:
            continue
        v = out[f.name]
        if f.name in ("bids_dir", "output_dir", "work_dir", "bids_database_dir"):
            out[f.name] = Path(v)
        elif f.name == "derivatives":
            out[f.name] = tuple(Path(p) for p in v)
        elif f.name in ("participant_label", "session_label", "modalities"):
            out[f.name] = tuple(str(x) for x in v)
    return out


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return _toml_str(str(value))
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


# ------------------------------------------------------------------------------------------------- memory model
#: Memory model of a participant run (CPU, stage 2 is the peak), refitted after the lattice evaluator and the
#: two-level solve (ADR 0007) on two measurements: the demo (T1w 1.6 mm, 500,945 brain voxels, ``--quality fast
#: --nprocs 1``, OMP_NUM_THREADS=1) peaked at 1.89 GB for the whole process tree (was 3.16 GB), and one x5 target on
#: the 1 mm MNI152 brain (2.15 M Gaussians, default preset: tuning, fit, render) raised a process's RSS by 3.3 GB
#: (``bench --speed``). GB = 1e9 bytes.
MEM_BASE_GB = 1.2
"""Main process, forkserver and one worker with torch, nibabel and ANTs loaded."""
MEM_WORKER_GB = 0.5
"""Each further worker process fitting a target in parallel (``--nprocs`` > 1)."""
MEM_PER_BRAIN_VOXEL_B = 2.2e3
"""Stage 2 (appearance fit, SD map, render) per brain voxel of the T1w grid: Gaussians, their 26 neighbours and
Laplacian (ADR 0011), the measurement operator (about 18 non-zeros per Gaussian, kept with its transpose), CG
vectors, posterior draws. Measured with the 26-neighbour graph: one x5 target on the 1 mm MNI152 brain (2.15 M
Gaussians, default preset) raised a process's RSS by 3.38 GB without the SD map and 4.60 GB with it (1.6e3 before
ADR 0011, without the SD map)."""
MEM_PER_EXTRA_STACK_B = 820.0
"""Per brain voxel, each stack fused beyond the first (``--fuse-stacks``): its measurement operator and the joint
one. Measured: fusing three x5 stacks of the 1 mm MNI152 brain (2.08 M brain voxels, ``--quality fast``) raised a
process's RSS by 5.95 GB, one stack alone by 2.54 GB."""
MEM_PER_TARGET_VOXEL_B = 12.0
"""Per target voxel (all volumes of a 4D series): the data as float32 and two working copies."""
BRAIN_VOLUME_ML = 2200.0
"""Prior brain-mask volume (mL) used before the mask exists: the template's generous mask is 2.05-2.16 L."""


def estimate_peak_memory_gb(t1w_voxels: int, t1w_voxel_mm3: float, target_voxels: tuple[int, ...] = (),
                            nprocs: int = 1, stacks: tuple[int, ...] = ()) -> float:
    """Estimated peak memory (GB, 1e9 bytes) of one participant on CPU, from image headers only.

    ``brain = min(t1w_voxels, BRAIN_VOLUME_ML * 1000 / t1w_voxel_mm3)`` brain voxels are assumed (the mask is not
    known before the run); ``k = min(nprocs, len(target_voxels))`` targets are fitted at once::

        peak = MEM_BASE_GB + (k - 1) * MEM_WORKER_GB + k * max_fits((MEM_PER_BRAIN_VOXEL_B
                   + (stacks - 1) * MEM_PER_EXTRA_STACK_B) * brain + MEM_PER_TARGET_VOXEL_B * target_voxels) / 1e9

    Parameters
    ----------
    t1w_voxels : int
        Voxels of the T1w grid (I * J * K).
    t1w_voxel_mm3 : float
        Volume of one T1w voxel, mm^3.
    target_voxels : tuple of int
        Voxels of each fit's targets, all volumes included (I * J * K * V; a fused group: the sum of its stacks).
    nprocs : int
        ``--nprocs``.
    stacks : tuple of int
        Stacks of each fit (``--fuse-stacks``); default one each.

    >>> round(estimate_peak_memory_gb(99 * 121 * 105, 1.6 ** 3, (115 * 132 * 30,)), 2)  # demo: measured 1.89 (k = 6)
    2.39
    >>> round(estimate_peak_memory_gb(182 * 218 * 182, 1.0, (182 * 218 * 36,)), 2)  # 1 mm, x5: 5.2 measured, 1 process
    6.06
    """
    brain = min(float(t1w_voxels), BRAIN_VOLUME_ML * 1000.0 / max(float(t1w_voxel_mm3), 1e-9))
    k = max(1, min(int(nprocs), len(target_voxels) or 1))
    stacks = tuple(stacks) or (1,) * len(target_voxels)
    per_fit = max(((MEM_PER_BRAIN_VOXEL_B + (n - 1) * MEM_PER_EXTRA_STACK_B) * brain + MEM_PER_TARGET_VOXEL_B * v
                   for v, n in zip(target_voxels, stacks)), default=MEM_PER_BRAIN_VOXEL_B * brain)
    return MEM_BASE_GB + (k - 1) * MEM_WORKER_GB + k * per_fit / 1e9

"""The BIDS-App argument parsers: ``atlasgs-bids bids_dir output_dir {participant,group}``, ``demo`` and ``index``.

Argparse only: validators call ``parser.error`` (exit code 2), :func:`parse_args` cross-checks the paths, and
:func:`build_config` turns the parsed arguments into the run's :class:`~atlasgs_bids.config.Config`.
"""
from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Sequence

from atlasgs_bids.config import MODALITIES, Config
from atlasgs_bids.device import DEVICES
from atlasgs_bids.errors import InputError
from atlasgs_bids.presets import QUALITIES
from atlasgs_bids.version import __version__


def _path_exists(parser: argparse.ArgumentParser, value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.exists():
        parser.error(f"path does not exist: <{path}>")
    return path


def _dir_exists(parser: argparse.ArgumentParser, value: str) -> Path:
    path = _path_exists(parser, value)
    if not path.is_dir():
        parser.error(f"not a directory: <{path}>")
    return path


def _positive(parser: argparse.ArgumentParser, value: str, *, kind: type = int) -> int | float:
    """``value`` as a positive ``kind`` (int or float), else a usage error naming it."""
    try:
        number = kind(value)
    except ValueError:
        parser.error(f"not {'an integer' if kind is int else 'a number'}: {value!r}")
    if not number > 0:
        parser.error(f"must be {'a positive integer' if kind is int else '> 0'}, got {number}")
    return number


def _bids_filter(parser: argparse.ArgumentParser, value: str) -> dict:
    from atlasgs_bids.bids.layout import load_bids_filters

    try:
        return load_bids_filters(value)
    except InputError as exc:
        parser.error(str(exc))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` only where the help does not already say it and the default is informative."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser (positionals, then option groups: filtering, performance, fitting, other)."""
    parser = argparse.ArgumentParser(
        prog="atlasgs-bids",
        description=(
            "atlasgs-bids: bring thick-slice brain MRI (T2w, FLAIR, PDw, T2starw, dwi, asl) to the resolution and "
            "grid of the same subject's 3D T1w. A Gaussian scaffold is built on the T1w once per subject (one "
            "Gaussian per voxel), then each target's contrast is fitted through its own slice profile and a rigid "
            "registration, and rendered on the T1w grid. Subcommands: 'atlasgs-bids demo OUT' (sample dataset, end to end) and "
            "'atlasgs-bids bench ...' (benchmarks), 'atlasgs-bids index BIDS_DIR DB_DIR' (pybids index for "
            "--bids-database-dir)."),
        formatter_class=_HelpFormatter,
    )
    pe, pd = (partial(f, parser) for f in (_path_exists, _dir_exists))
    pi, pf = partial(_positive, parser, kind=int), partial(_positive, parser, kind=float)
    parser.add_argument("bids_dir", type=Path,
                        help="root of the input BIDS dataset (read only; at group level it may be absent: the "
                             "derivatives alone are read)")
    parser.add_argument("output_dir", type=Path,
                        help="root of the output derivatives dataset (created; must not be inside bids_dir)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant': process subjects (one per process in array jobs); 'group': QC table "
                             "from the participants' derivatives")

    g = parser.add_argument_group("BIDS filtering")
    g.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+", default=[],
                   metavar="LABEL", help="subjects to process, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", dest="session_label", nargs="+", default=[],
                   metavar="LABEL", help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filters", type=_bids_filter_type(parser),
                   default=None, metavar="FILE",
                   help="JSON of pybids entity filters per query (t1w, t2w, flair, pdw, t2starw, dwi, asl), as in "
                        "fMRIPrep, e.g. {\"t1w\": {\"acquisition\": \"mprage\"}, \"t2w\": {\"run\": 1}}")
    g.add_argument("--bids-database-dir", "--bids_database_dir", dest="bids_database_dir", type=Path, default=None,
                   metavar="DIR",
                   help="pybids index of bids_dir: read from DIR when it holds one, else built once and saved there "
                        "(index a large dataset once, before an array job; delete DIR after the dataset changed)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                   action="store_true", help="do not run bids-validator-deno on the input")
    g.add_argument("--derivatives", nargs="+", type=pd, default=[], metavar="DIR",
                   help="derivatives datasets to search for a precomputed T1w brain mask "
                        "(sub-X[_ses-Y]*_desc-brain_mask.nii.gz on the T1w grid)")

    g = parser.add_argument_group("Performance")
    g.add_argument("--nprocs", "--n-cpus", "--nthreads", dest="nprocs", type=pi, default=1,
                   help="Nipype MultiProc processes within one participant")
    g.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=pi, default=None,
                   help="threads per process (torch, ANTs) (default: $OMP_NUM_THREADS when set, else the number of "
                        "CPU cores)")
    g.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=pf, default=None,
                   help="memory (GB) the scheduler may plan for (default: nipype's, 90%% of the machine)")
    g.add_argument("--device", choices=DEVICES, default="auto", help="torch device for fitting; auto = CUDA if "
                                                                     "available")

    g = parser.add_argument_group("Fitting")
    g.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES), metavar="SUFFIX",
                   help=f"target suffixes to harmonise, among {' '.join(MODALITIES)} (default: all)")
    g.add_argument("--quality", choices=QUALITIES, default="default",
                   help="speed/accuracy preset of the stage-2 fit (the lattice scaffold has no settings)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the registration")
    g.add_argument("--fuse-stacks", "--fuse_stacks", dest="fuse_stacks", action="store_true",
                   help="fit the stacks of one suffix that differ only by run or acq (e.g. an axial and a coronal "
                        "T2w) jointly, into one output named without those entities (default: one output per stack)")
    g.add_argument("--skull-stripped", "--skull_stripped", dest="skull_stripped", action="store_true",
                   help="the T1w is already brain-extracted: the mask is T1w > 0 (no deepbet)")
    g.add_argument("--no-uncertainty", "--no_uncertainty", dest="uncertainty", action="store_false",
                   help="skip the per-voxel uncertainty map (desc-atlasgsSD, the posterior SD calibrated on "
                        "held-out slices): saves about a third of each target's fit time")

    g = parser.add_argument_group("Other")
    g.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path, default=None,
                   help="Nipype working directory; reusing it skips finished steps (default: a temporary one, "
                        "removed at the end)")
    g.add_argument("--reports-only", "--reports_only", dest="reports_only", action="store_true",
                   help="fit nothing: redraw each participant's report (sub-X.html, figures) and methods text from "
                        "existing derivatives and the QC records under sub-X/qc/")
    g.add_argument("--version", action="version", version=f"atlasgs-bids {__version__}")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output; tracebacks for input errors")
    return parser


def _bids_filter_type(parser: argparse.ArgumentParser):
    return partial(_bids_filter, parser)


def _is_within(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the BIDS-App arguments (``sub-``/``ses-`` stripped; output/work dirs vs bids_dir)."""
    parser = _build_parser()
    opts = parser.parse_args(argv)
    if opts.analysis_level == "participant" or opts.bids_dir.exists():
        opts.bids_dir = _dir_exists(parser, str(opts.bids_dir))
    else:
        opts.bids_dir = opts.bids_dir.expanduser().absolute()
    if opts.bids_database_dir is not None:
        opts.bids_database_dir = opts.bids_database_dir.expanduser().absolute()
    opts.participant_label = [p[4:] if p.startswith("sub-") else p for p in opts.participant_label]
    opts.session_label = [s[4:] if s.startswith("ses-") else s for s in opts.session_label]
    opts.output_dir = opts.output_dir.expanduser().absolute()
    if _is_within(opts.output_dir, opts.bids_dir):
        parser.error(f"output_dir <{opts.output_dir}> is the BIDS dataset or inside it; the input is never written: "
                     f"use e.g. <{opts.bids_dir.parent / (opts.bids_dir.name + '-derivatives') / 'atlasgs'}>")
    if opts.work_dir is not None:
        opts.work_dir = opts.work_dir.expanduser().absolute()
        if _is_within(opts.work_dir, opts.bids_dir):
            parser.error(f"--work-dir <{opts.work_dir}> is inside the BIDS dataset; put it elsewhere, e.g. "
                         f"<{opts.bids_dir.parent / 'work'}>")
    opts.modalities = list(dict.fromkeys(opts.modalities))
    if opts.omp_nthreads is None:
        opts.omp_nthreads = default_omp_nthreads()
    return opts


def default_omp_nthreads() -> int:
    """Threads per process when ``--omp-nthreads`` is not given: ``$OMP_NUM_THREADS`` if it is a positive integer,
    else the CPU cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def build_config(opts: argparse.Namespace) -> Config:
    """The run's :class:`Config` from parsed arguments."""
    return Config.build(
        bids_dir=opts.bids_dir, output_dir=opts.output_dir, analysis_level=opts.analysis_level,
        work_dir=opts.work_dir, participant_label=opts.participant_label, session_label=opts.session_label,
        modalities=opts.modalities, bids_filters=opts.bids_filters or {},
        skip_bids_validation=opts.skip_bids_validation, reports_only=opts.reports_only,
        bids_database_dir=opts.bids_database_dir,
        skull_stripped=opts.skull_stripped, derivatives=opts.derivatives, nprocs=opts.nprocs,
        omp_nthreads=opts.omp_nthreads, mem_gb=opts.mem_gb, device=opts.device, quality=opts.quality,
        seed=opts.seed, fuse_stacks=opts.fuse_stacks, uncertainty=opts.uncertainty)



def build_demo_parser() -> argparse.ArgumentParser:
    """``atlasgs-bids demo OUT [--quality Q] [--nprocs N] [--device D] [--fuse-stacks] [-v]``."""
    parser = argparse.ArgumentParser(prog="atlasgs-bids demo", description=(
        "Build a small sample BIDS dataset (template T1w + synthetic thick-slice T2w with a known rigid offset, "
        "ground truth kept), run participant and group level on it, and compare the result with cubic "
        "interpolation against the ground truth."))
    parser.add_argument("out_dir", type=Path, help="folder for bids/, truth/, derivatives/")
    parser.add_argument("--quality", choices=QUALITIES, default="fast")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--fuse-stacks", dest="fuse_stacks", action="store_true",
                        help="add a coronal T2w stack (own head motion, 1.25 x the gain) to the sample and fuse it "
                             "with the axial one (--fuse-stacks)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def build_index_parser() -> argparse.ArgumentParser:
    """``atlasgs-bids index BIDS_DIR DB_DIR``."""
    parser = argparse.ArgumentParser(prog="atlasgs-bids index", description=(
        "Build pybids' index of a BIDS dataset once and save it, for --bids-database-dir (before an array job, so "
        "that no task lists the dataset's files again)."))
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset")
    parser.add_argument("database_dir", type=Path, help="folder for the index (created; reused when it holds one)")
    return parser

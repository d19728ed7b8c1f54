"""Command line: ``atlasgs-bids bids_dir output_dir {participant,group} [options]``, ``atlasgs-bids demo OUT``,
``atlasgs-bids bench ...``.

Exit codes: 0 success; 2 usage or input error (one log line naming the file and the fix; traceback with ``-v``);
1 processing failure (traceback logged). A failed participant leaves no partial derivatives.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from atlasgs_bids.config import MODALITIES, Config
from atlasgs_bids.device import DEVICES, resolve_device
from atlasgs_bids.errors import InputError
from atlasgs_bids.interfaces.progress import Heartbeat
from atlasgs_bids.presets import QUALITIES
from atlasgs_bids.preflight import check_images, check_memory, check_writable_dir, describe_os_error
from atlasgs_bids.processes import Terminated, kill_workers, pin_native_seeds, sigterm_as_interrupt
from atlasgs_bids.version import __version__

if TYPE_CHECKING:
    from atlasgs_bids.bids.layout import SubjectInputs

LOGGER = logging.getLogger("atlasgs")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------------------------------------------- validators
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
            "grid of the same subject's 3D T1w. A Gaussian scaffold is fitted to the T1w once per subject, then "
            "each target's contrast is fitted through its own slice profile and a rigid registration, and rendered "
            "on the T1w grid. Subcommands: 'atlasgs-bids demo OUT' (sample dataset, end to end) and "
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
                   help="speed/accuracy preset of both fitting stages")
    g.add_argument("--seed", type=int, default=0, help="random seed (scaffold initialisation, registration)")
    g.add_argument("--skull-stripped", "--skull_stripped", dest="skull_stripped", action="store_true",
                   help="the T1w is already brain-extracted: the mask is T1w > 0 (no deepbet)")

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
        seed=opts.seed)


# ---------------------------------------------------------------------------------------------------------- logging
def setup_logging(verbose: int = 0) -> None:
    """``atlasgs`` logger to stderr (INFO, DEBUG with ``-vv``); nipype's quieter unless ``-v``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    for logger in (LOGGER, logging.getLogger("atlasgs_bids")):  # the app's and the package modules' (bench) loggers
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        logger.propagate = False
    global _NIPYPE_LEVEL, _VERBOSE
    _NIPYPE_LEVEL = "INFO" if verbose else "WARNING"
    _VERBOSE = int(verbose)
    quiet_nipype()


_NIPYPE_LEVEL = "WARNING"
_VERBOSE = 0


def quiet_nipype() -> None:
    """Apply the nipype log level chosen by :func:`setup_logging` (INFO with ``-v``, else WARNING).

    Importing nipype resets its loggers to its config's INFO, so this is applied again once nipype is imported
    (and written into nipype's config, which its plugins re-read)."""
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(_NIPYPE_LEVEL)
    if "nipype" in sys.modules:
        from nipype import config as nipype_config

        for key in ("workflow_level", "interface_level", "utils_level"):
            nipype_config.set("logging", key, _NIPYPE_LEVEL)


@contextlib.contextmanager
def stage(name: str, *, heartbeat: bool = True) -> Iterator[None]:
    """Log one line when a stage ends, with its duration (or that it failed, and after how long); while it runs, a
    :class:`Heartbeat` says it is still running (``heartbeat=False`` where the caller has its own)."""
    t0 = time.perf_counter()
    beat = (Heartbeat(LOGGER, lambda: f"{name} ({time.perf_counter() - t0:.0f} s)") if heartbeat
            else contextlib.nullcontext())
    try:
        with beat:
            yield
    except BaseException:
        LOGGER.info("%s: failed after %.1f s", name, time.perf_counter() - t0)
        raise
    LOGGER.info("%s: done in %.1f s", name, time.perf_counter() - t0)


class NodeTimer:
    """Nipype ``status_callback``: one log line per finished node with its duration (runs in the main process);
    with ``verbose``, the stage-2 solve's conjugate-gradient iterations once a ``harmonize`` node has ended.
    :meth:`running` names the nodes running now, for :class:`~atlasgs_bids.interfaces.progress.Heartbeat`."""

    def __init__(self, prefix: str = "", verbose: bool = False) -> None:
        self.prefix = prefix
        self.verbose = verbose
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def running(self) -> str:
        """``"<prefix><node> (<s> s), ..."`` of the nodes started and not ended; empty when none."""
        now = time.perf_counter()
        return ", ".join(f"{self.prefix}{key.split('.', 1)[-1]} ({now - t0:.0f} s)"
                         for key, t0 in list(self.started.items()))

    def _log_solver(self, node: Any) -> None:
        """The CG iterations of a finished ``harmonize`` node, from its appearance report (``history``)."""
        import json

        report = json.loads(Path(node.result.outputs.out_report).read_text())
        history = [float(v) for v in report.get("history") or []]
        if not history:
            return
        step = max(1, len(history) // 10)
        shown = ", ".join(f"{i + 1}: {history[i]:.2e}" for i in range(0, len(history), step))
        LOGGER.info("%s%s: stage 2 solved in %d CG iterations; relative residual by iteration %s%s",
                    self.prefix, node.fullname.split(".", 1)[-1], len(history), shown,
                    f", {len(history)}: {history[-1]:.2e}" if (len(history) - 1) % step else "")

    def __call__(self, node, status: str) -> None:
        key = node.fullname
        if status == "start":
            self.started[key] = time.perf_counter()
        elif status in ("end", "exception"):
            short = key.split(".", 1)[-1]
            if key not in self.started and status == "end":  # found in --work-dir: nipype never started it
                self.seconds[key] = 0.0
                LOGGER.info("%s%s: cached (work dir)", self.prefix, short)
                return
            dt = time.perf_counter() - self.started.pop(key, time.perf_counter())
            self.seconds[key] = dt
            if status == "end":
                LOGGER.info("%s%s: done in %.1f s", self.prefix, short, dt)
                if self.verbose and key.rsplit(".", 1)[-1] == "harmonize":
                    with contextlib.suppress(Exception):  # a log line must never fail the run
                        self._log_solver(node)
            else:
                LOGGER.error("%s%s: failed after %.1f s", self.prefix, short, dt)


# ------------------------------------------------------------------------------------------------------ participant
def _nipype_worker_config(log_dir: Path) -> None:
    """Make the MultiProc workers (fresh processes from the forkserver, which import nipype anew) log at the level
    chosen by :func:`setup_logging`: write ``log_dir/nipype.cfg`` and point ``NIPYPE_CONFIG_DIR`` at it, unless the
    user set ``NIPYPE_CONFIG_DIR`` (then theirs is kept). Read by workers started after this call."""
    own = os.environ.get("ATLASGS_NIPYPE_CONFIG_DIR")
    if os.environ.get("NIPYPE_CONFIG_DIR") and os.environ.get("NIPYPE_CONFIG_DIR") != own:
        return
    from atlasgs_bids.bids.derivatives import atomic_write_bytes

    text = "[logging]\n" + "".join(f"{k} = {_NIPYPE_LEVEL}\n"
                                    for k in ("workflow_level", "interface_level", "utils_level"))
    atomic_write_bytes(Path(log_dir) / "nipype.cfg", text.encode())
    os.environ["NIPYPE_CONFIG_DIR"] = os.environ["ATLASGS_NIPYPE_CONFIG_DIR"] = str(log_dir)


def _write_status(config: Config, label: str, status: dict) -> None:
    from atlasgs_bids.bids.derivatives import atomic_write_json

    atomic_write_json(config.execution.log_dir / f"{label}_status.json", status)


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.*)$")


def root_cause(exc: BaseException) -> tuple[str, bool]:
    """The innermost ``Type: message`` of an exception (nipype wraps node errors in a RuntimeError whose text holds
    the node's traceback), and whether it is an :class:`InputError` (exit code 2 rather than 1).

    >>> root_cause(RuntimeError("Traceback ...\\n  File x\\nmod.InputError: /d/t1.nii.gz: all zero\\n"))
    ('InputError: /d/t1.nii.gz: all zero', True)
    >>> root_cause(ValueError("bad"))
    ('ValueError: bad', False)
    """
    if isinstance(exc, InputError):
        return f"InputError: {exc}", True
    lines = [m for m in (_EXC_LINE.match(line) for line in str(exc).splitlines()) if m]
    if not lines:
        return f"{type(exc).__name__}: {exc}", False
    name, message = lines[-1].group(1), lines[-1].group(2)
    short = name.rsplit(".", 1)[-1]
    return f"{short}: {message}", short == "InputError"


def _check_participant_images(config: Config, inputs: list[SubjectInputs],
                              ) -> tuple[list[SubjectInputs], list[tuple[str, bool]]]:
    """Read every participant's images up front (:func:`check_images`), before any workflow is built. A participant
    with a bad image is left out: one console line naming the file, its ``logs/<label>_status.json`` marks it
    failed (input error, the traceback kept there). Returns the participants left and ``[(label, True)]`` failures."""
    kept: list[SubjectInputs] = []
    failures: list[tuple[str, bool]] = []
    t0 = time.perf_counter()
    for i, si in enumerate(inputs):
        try:
            with Heartbeat(LOGGER, lambda: f"input image check, {si.label} ({i + 1} of {len(inputs)}, "
                                           f"{time.perf_counter() - t0:.0f} s)"):
                check_images(si)
        except InputError as exc:
            LOGGER.error("%s: input error: %s; no derivatives written for it", si.label, exc,
                         exc_info=bool(_VERBOSE))
            with contextlib.suppress(Exception):
                _write_status(config, si.label, {"status": "failed", "error": f"InputError: {exc}",
                                                 "input_error": True, "seconds": 0.0, "stage": "input check",
                                                 "traceback": traceback.format_exc()})
            failures.append((si.label, True))
            continue
        kept.append(si)
    LOGGER.info("input images checked (%d participant%s): done in %.1f s", len(inputs), "s" * (len(inputs) != 1),
                time.perf_counter() - t0)
    return kept, failures


def run_participant_level(config: Config) -> int:
    """Validate, discover (every input error raised before any output is written), then run each participant."""
    from atlasgs_bids.bids import derivatives as bd
    from atlasgs_bids.bids.layout import collect_inputs, open_layout
    from atlasgs_bids.workflows.participant import init_participant_wf, methods_text

    quiet_nipype()  # nipype was just imported: its loggers are back at INFO
    ex = config.execution
    if not ex.skip_bids_validation:
        from atlasgs_bids.bids.validate import validate_dataset

        with stage("BIDS validation"):
            validate_dataset(ex.bids_dir)
    with stage("input discovery"):
        layout = open_layout(ex.bids_dir, ex.bids_database_dir)
        inputs = collect_inputs(ex.bids_dir, participant_label=ex.participant_label, session_label=ex.session_label,
                                modalities=ex.modalities, bids_filters=ex.bids_filters, derivatives=ex.derivatives,
                                layout=layout)
        subjects = sorted(layout.get_subjects())
    for si in inputs:
        LOGGER.info("%s: T1w %s; targets %s%s", si.label, si.t1w.name, ", ".join(t.path.name for t in si.targets),
                    f"; mask {si.t1w_mask}" if si.t1w_mask else "")
    config = config.replace("resources", device=resolve_device(config.resources.device))
    LOGGER.info("device: %s", config.resources.device)
    check_memory(inputs, config)
    check_writable_dir(ex.output_dir, "output_dir")
    if ex.work_dir is not None:
        check_writable_dir(ex.work_dir, "--work-dir")

    failures: list[tuple[str, bool]] = []
    if not ex.reports_only:
        bd.record_subjects(ex.output_dir, subjects)
        inputs, failures = _check_participant_images(config, inputs)
        if not inputs:
            _log_failures(failures)
            return EXIT_USAGE

    bd.write_dataset_description(ex.output_dir, ex.bids_dir, __version__)
    bd.write_bidsignore(ex.output_dir)
    bd.write_readme(ex.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config.save(ex.log_dir / f"config-{stamp}-{os.getpid()}.toml")
    _nipype_worker_config(ex.log_dir)
    own_work = ex.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="atlasgs-work-")) if own_work else ex.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        for si in inputs:
            if ex.reports_only:
                wf = init_participant_wf(subject_inputs=si, config=config)
                bd.atomic_write_bytes(ex.log_dir / f"{si.label}_methods.txt", methods_text(wf).encode())
                from atlasgs_bids.reports.subject import regenerate_reports

                with stage(f"{si.label} report"):
                    pages = regenerate_reports(ex.output_dir, [si], version=__version__)
                LOGGER.info("%s: --reports-only: %s from the derivatives, nothing fitted", si.label,
                            ", ".join(f"{p.name} rewritten" for p in pages) or "no report")
                continue
            staging = bd.new_staging_dir(ex.output_dir, si.label)
            t0 = time.perf_counter()
            try:
                wf = init_participant_wf(subject_inputs=si, config=config, stage_dir=staging)
                wf.base_dir = str(work_dir)
                wf.config["execution"].update({"crashdump_dir": str(ex.log_dir), "crashfile_format": "txt",
                                               "stop_on_first_crash": "true", "poll_sleep_duration": 0.5})
                # nipype counts CPU slots: --nprocs processes x --omp-nthreads threads (a fitting node takes
                # omp_nthreads slots), so one process with its threads never exceeds the scheduler's budget
                slots = config.resources.nprocs * config.resources.omp_nthreads
                # forkserver: workers fork from a clean server, never from this process, whose torch/OpenMP
                # threads (started e.g. by a caller that used torch before, as a test does) would deadlock a fork
                timer = NodeTimer(f"{si.label} ", verbose=bool(_VERBOSE))
                plugin_args = {"n_procs": slots, "raise_insufficient": False, "mp_context": "forkserver",
                               "status_callback": timer}
                if config.resources.mem_gb:
                    plugin_args["memory_gb"] = config.resources.mem_gb
                with stage(f"{si.label} workflow", heartbeat=False), Heartbeat(LOGGER, timer.running):
                    wf.run(plugin="MultiProc", plugin_args=plugin_args)
                moved = bd.commit_staging(staging, ex.output_dir)
                bd.atomic_write_bytes(ex.log_dir / f"{si.label}_methods.txt", methods_text(wf).encode())
                _write_status(config, si.label, {"status": "ok", "seconds": round(time.perf_counter() - t0, 2),
                                                 "outputs": [str(p.relative_to(ex.output_dir)) for p in moved]})
                LOGGER.info("%s: %d derivatives written", si.label, len(moved))
            except Exception as exc:  # one participant failing must not leave partial outputs
                kill_workers(quiet=not _VERBOSE)
                bd.discard_staging(staging)
                headline, is_input = root_cause(exc)
                detail = str(exc) if "Traceback" in str(exc) else traceback.format_exc()
                if is_input:
                    LOGGER.error("%s: input error: %s; no derivatives written for it%s", si.label, headline,
                                 f"\n{detail}" if _VERBOSE else "")
                else:
                    disk = describe_os_error(exc)
                    LOGGER.error("%s: processing failed (%s)%s; no derivatives written for it; details in %s "
                                 "(crash files), or rerun with -v%s", si.label, headline, f": {disk}" if disk else "",
                                 ex.log_dir, f"\n{detail}" if _VERBOSE else "")
                with contextlib.suppress(Exception):  # the status is a courtesy: a full disk must not hide the error
                    _write_status(config, si.label, {"status": "failed", "error": headline, "input_error": is_input,
                                                     "seconds": round(time.perf_counter() - t0, 2),
                                                     "traceback": detail})
                failures.append((si.label, is_input))
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the workers, then leave nothing partial
                kill_workers(everything=True, quiet=not _VERBOSE)
                bd.discard_staging(staging)
                raise
    finally:
        if own_work:
            import shutil

            shutil.rmtree(work_dir, ignore_errors=True)
    if failures:
        _log_failures(failures)
        return EXIT_USAGE if all(is_input for _, is_input in failures) else EXIT_FAILURE
    return EXIT_OK


def _log_failures(failures: list[tuple[str, bool]]) -> None:
    """One summary line naming the failed participants, when there are several (one failure has its own line)."""
    if len(failures) > 1:
        LOGGER.error("failed: %s", ", ".join(label for label, _ in failures))


def run_group_level(config: Config) -> int:
    """Write ``group_qc.tsv`` and ``group_qc.html`` from the derivatives' sidecars."""
    from atlasgs_bids.workflows.group import expected_participants, write_group_qc

    ex = config.execution
    if not ex.output_dir.is_dir():
        raise InputError(f"{ex.output_dir}: no derivatives here; run the participant level first")
    if not ex.bids_dir.is_dir():
        LOGGER.info("%s is not here: the group level reads the derivatives alone (participants from %s)",
                    ex.bids_dir, ex.output_dir / "logs" / "participants.tsv")
    with stage("group QC table"):
        path = write_group_qc(ex.output_dir, expected_participants(ex.bids_dir, ex.participant_label,
                                                                   output_dir=ex.output_dir))
    LOGGER.info("group QC: %s and %s", path, path.with_suffix(".html"))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- subcommands
def _demo_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="atlasgs-bids demo", description=(
        "Build a small sample BIDS dataset (template T1w + synthetic thick-slice T2w with a known rigid offset, "
        "ground truth kept), run participant and group level on it, and compare the result with cubic "
        "interpolation against the ground truth."))
    parser.add_argument("out_dir", type=Path, help="folder for bids/, truth/, derivatives/")
    parser.add_argument("--quality", choices=QUALITIES, default="fast")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    opts = parser.parse_args(argv)
    setup_logging(opts.verbose)
    from atlasgs_bids.data.sample import build_sample_dataset

    out = opts.out_dir.expanduser().absolute()
    t0 = time.perf_counter()
    with stage("demo: sample dataset"):
        info = build_sample_dataset(out)
    deriv = out / "derivatives"
    # the sample T1w is the skull-stripped MNI template: its mask is T1w > 0 (deepbet is not needed)
    common = ["--quality", opts.quality, "--nprocs", str(opts.nprocs), "--device", opts.device, "--skull-stripped",
              "-w", str(out / "work")] + ["-v"] * opts.verbose
    rc = main([str(info.bids_dir), str(deriv), "participant", *common])
    if rc != EXIT_OK:
        return rc
    rc = main([str(info.bids_dir), str(deriv), "group"])
    if rc != EXIT_OK:
        return rc
    print(demo_summary(info, deriv))
    print(f"  total time:   {time.perf_counter() - t0:.0f} s")
    return EXIT_OK


def demo_summary(info, deriv: Path) -> str:
    """Output paths and PSNR / MAE against the truth, ours beside cubic interpolation of the input T2w."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from atlasgs_bids.bids import derivatives as bd
    from atlasgs_bids.imaging import metrics
    from atlasgs_bids.imaging.transforms import read_itk_affine, rotation_angle_deg

    ours_path = deriv / bd.target_output(info.t2w)
    xfm_path = deriv / bd.xfm_output(info.t2w)
    truth_img = nib.load(str(info.truth_t2w))
    truth = truth_img.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(str(info.truth_mask)).dataobj) > 0
    ours_img = nib.load(str(ours_path))
    if ours_img.shape[:3] != truth.shape or not np.allclose(ours_img.affine, truth_img.affine, atol=1e-3):
        raise RuntimeError(f"{ours_path}: not on the truth's grid; cannot score")
    ours = ours_img.get_fdata(dtype=np.float32)
    t2w_img = nib.load(str(info.t2w))
    # cubic: resample the thick-slice input onto the truth grid with the SAME estimated registration
    t1w2target = read_itk_affine(xfm_path)
    vox2vox = np.linalg.inv(t2w_img.affine) @ t1w2target @ truth_img.affine
    cubic = ndimage.affine_transform(t2w_img.get_fdata(dtype=np.float32), vox2vox[:3, :3], vox2vox[:3, 3],
                                     output_shape=truth.shape, order=3, mode="nearest")
    # registration error against the known transform: angle of R_true^T R_est, and the displacement of the brain's
    # centre (mm) between the true and the estimated T1w -> target maps
    true_t1w2target = np.linalg.inv(info.target2t1w)
    centre = truth_img.affine @ np.r_[ndimage.center_of_mass(mask), 1.0]
    angle = rotation_angle_deg(true_t1w2target[:3, :3].T @ t1w2target[:3, :3])
    shift = float(np.linalg.norm((t1w2target @ centre - true_t1w2target @ centre)[:3]))
    lines = ["", "atlasgs-bids demo", f"  input BIDS:   {info.bids_dir}", f"  derivatives:  {deriv}",
             f"  harmonized:   {ours_path}", f"  transform:    {xfm_path}",
             f"  QC report:    {deriv / 'sub-01.html'}",
             f"  group QC:     {deriv / 'group_qc.tsv'} and {deriv / 'group_qc.html'}",
             f"  registration: {angle:.2f} deg, {shift:.2f} mm at the brain centre from the true transform",
             "", f"  {'method':<10} {'PSNR (dB)':>10} {'MAE':>10}   (vs ground truth, in the brain mask)"]
    for name, pred in (("atlasgs", ours), ("cubic", cubic)):
        lines.append(f"  {name:<10} {metrics.psnr(pred, truth, mask):>10.2f} {metrics.mae(pred, truth, mask):>10.3f}")
    return "\n".join(lines)


def _index_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="atlasgs-bids index", description=(
        "Build pybids' index of a BIDS dataset once and save it, for --bids-database-dir (before an array job, so "
        "that no task lists the dataset's files again)."))
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset")
    parser.add_argument("database_dir", type=Path, help="folder for the index (created; reused when it holds one)")
    opts = parser.parse_args(argv)
    setup_logging(0)
    from atlasgs_bids.bids.layout import open_layout

    with stage("pybids index"):
        layout = open_layout(opts.bids_dir.expanduser().absolute(), opts.database_dir.expanduser())
    LOGGER.info("%s: %d subjects indexed in %s", layout.root, len(layout.get_subjects()), opts.database_dir)
    return EXIT_OK


def _bench_main(argv: Sequence[str]) -> int:
    from atlasgs_bids.bench import run as bench_run

    parser = argparse.ArgumentParser(prog="atlasgs-bids bench", description="Benchmarks of the method.")
    bench_run.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0) or 0)
    rc = bench_run.run(args)
    return EXIT_OK if rc is None else int(rc)


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (the console script calls ``sys.exit(main())``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    try:
        if argv and argv[0] == "demo":
            return _demo_main(argv[1:])
        if argv and argv[0] == "bench":
            return _bench_main(argv[1:])
        if argv and argv[0] == "index":
            return _index_main(argv[1:])
        opts = parse_args(argv)
        verbose = opts.verbose
        setup_logging(verbose)
        pin_native_seeds(opts.seed)
        config = build_config(opts)
        LOGGER.info("atlasgs-bids %s: %s level on %s -> %s", __version__, config.execution.analysis_level,
                    config.execution.bids_dir, config.execution.output_dir)
        with sigterm_as_interrupt():
            if config.execution.analysis_level == "participant":
                return run_participant_level(config)
            return run_group_level(config)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except InputError as exc:
        if not LOGGER.handlers:
            setup_logging(verbose)
        LOGGER.error("input error: %s", exc, exc_info=bool(verbose))
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C (SIGINT) or SIGTERM (Terminated): workers stopped, staging removed
        name, code = ("SIGTERM", 128 + 15) if isinstance(exc, Terminated) else ("SIGINT", 128 + 2)
        LOGGER.error("interrupted by %s: stopped; no partial derivatives were left (rerun to finish)", name)
        return code
    except Exception as exc:
        if not LOGGER.handlers:
            setup_logging(verbose)
        headline, _ = root_cause(exc)
        disk = describe_os_error(exc)
        LOGGER.error("processing failed: %s%s%s", headline, f"; {disk}" if disk else "",
                     "" if verbose else " (rerun with -v for the traceback)", exc_info=bool(verbose))
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

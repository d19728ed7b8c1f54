"""The participant and group levels: discovery, staging, the Nipype run of each participant, status files.

A participant's derivatives are staged and committed only when its workflow succeeded; a failure (or an
interruption) discards the staging folder, so no partial derivatives are left.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlasgs_bids.cli.codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from atlasgs_bids.cli.logs import LOGGER, LogSettings, quiet_nipype, stage
from atlasgs_bids.config import Config
from atlasgs_bids.device import resolve_device
from atlasgs_bids.errors import InputError
from atlasgs_bids.interfaces.progress import Heartbeat
from atlasgs_bids.preflight import check_images, check_memory, check_writable_dir, describe_os_error
from atlasgs_bids.processes import kill_workers
from atlasgs_bids.version import __version__

if TYPE_CHECKING:
    from atlasgs_bids.bids.layout import SubjectInputs


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
def _nipype_worker_config(log_dir: Path, log: LogSettings) -> None:
    """Make the MultiProc workers (fresh processes from the forkserver, which import nipype anew) log at
    ``log.nipype_level``: write ``log_dir/nipype.cfg`` and point ``NIPYPE_CONFIG_DIR`` at it, unless the
    user set ``NIPYPE_CONFIG_DIR`` (then theirs is kept). Read by workers started after this call."""
    own = os.environ.get("ATLASGS_NIPYPE_CONFIG_DIR")
    if os.environ.get("NIPYPE_CONFIG_DIR") and os.environ.get("NIPYPE_CONFIG_DIR") != own:
        return
    from atlasgs_bids.bids.derivatives import atomic_write_bytes

    text = "[logging]\n" + "".join(f"{k} = {log.nipype_level}\n"
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


def _check_participant_images(config: Config, inputs: list[SubjectInputs], log: LogSettings,
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
                         exc_info=log.tracebacks)
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


def run_participant_level(config: Config, log: LogSettings = LogSettings()) -> int:
    """Validate, discover (every input error raised before any output is written), then run each participant."""
    from atlasgs_bids.bids import derivatives as bd
    from atlasgs_bids.bids.layout import collect_inputs, open_layout
    from atlasgs_bids.workflows.participant import init_participant_wf, methods_text

    quiet_nipype(log)  # nipype was just imported: its loggers are back at INFO
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
        inputs, failures = _check_participant_images(config, inputs, log)
        if not inputs:
            _log_failures(failures)
            return EXIT_USAGE

    bd.write_dataset_description(ex.output_dir, ex.bids_dir, __version__)
    bd.write_bidsignore(ex.output_dir)
    bd.write_readme(ex.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config.save(ex.log_dir / f"config-{stamp}-{os.getpid()}.toml")
    _nipype_worker_config(ex.log_dir, log)
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
                timer = NodeTimer(f"{si.label} ", verbose=log.tracebacks)
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
                kill_workers(quiet=not log.tracebacks)
                bd.discard_staging(staging)
                headline, is_input = root_cause(exc)
                detail = str(exc) if "Traceback" in str(exc) else traceback.format_exc()
                if is_input:
                    LOGGER.error("%s: input error: %s; no derivatives written for it%s", si.label, headline,
                                 f"\n{detail}" if log.tracebacks else "")
                else:
                    disk = describe_os_error(exc)
                    LOGGER.error("%s: processing failed (%s)%s; no derivatives written for it; details in %s "
                                 "(crash files), or rerun with -v%s", si.label, headline, f": {disk}" if disk else "",
                                 ex.log_dir, f"\n{detail}" if log.tracebacks else "")
                with contextlib.suppress(Exception):  # the status is a courtesy: a full disk must not hide the error
                    _write_status(config, si.label, {"status": "failed", "error": headline, "input_error": is_input,
                                                     "seconds": round(time.perf_counter() - t0, 2),
                                                     "traceback": detail})
                failures.append((si.label, is_input))
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the workers, then leave nothing partial
                kill_workers(everything=True, quiet=not log.tracebacks)
                bd.discard_staging(staging)
                raise
    finally:
        if own_work:
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


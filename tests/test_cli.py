"""CLI parsing, exit codes and refusals (real pybids, real bids-validator-deno, real nipype)."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasgs_bids import cli
from atlasgs_bids.cli import logs as cli_logs
from atlasgs_bids.cli import run as cli_run
from atlasgs_bids.cli.parser import build_config, parse_args
from atlasgs_bids.config import Config
from atlasgs_bids.interfaces.progress import Progress
from atlasgs_bids.processes import pin_native_seeds

from test_layout import ISO, THICK, make_bids


def _args(bids: Path, out: Path, *extra: str) -> list[str]:
    return [str(bids), str(out), "participant", *extra]


def test_parse_defaults_and_prefix_stripping(tmp_path):
    bids = make_bids(tmp_path / "b", {})
    opts = parse_args(_args(bids, tmp_path / "o", "--participant-label", "sub-01", "02",
                                "--session_label", "ses-a", "--modalities", "PDw", "dwi", "PDw"))
    assert opts.participant_label == ["01", "02"] and opts.session_label == ["a"]
    assert opts.modalities == ["PDw", "dwi"]
    cfg = build_config(opts)
    assert cfg.execution.participant_label == ("01", "02")
    assert (cfg.fit.quality, cfg.fit.seed, cfg.resources.device, cfg.resources.nprocs) == ("default", 0, "auto", 1)
    assert cfg.fit.uncertainty  # the SD map is on by default
    opts = parse_args(_args(bids, tmp_path / "o", "--nprocs", "3", "--omp_nthreads", "2", "--mem-gb", "8",
                                "--device", "cpu", "--quality", "fast", "--seed", "7", "--skull-stripped",
                                "--skip_bids_validation", "--reports-only", "-w", str(tmp_path / "w"),
                                "--no-uncertainty"))
    cfg = build_config(opts)
    assert not cfg.fit.uncertainty and "uncertainty = false" in cfg.to_toml()
    assert (cfg.resources.nprocs, cfg.resources.omp_nthreads, cfg.resources.mem_gb) == (3, 2, 8.0)
    assert cfg.execution.skull_stripped and cfg.execution.skip_bids_validation and cfg.execution.reports_only
    assert cfg.execution.work_dir == tmp_path / "w"


@pytest.mark.parametrize("extra, message", [
    (["--quality", "ultra"], "invalid choice: 'ultra'"),
    (["--nprocs", "0"], "must be a positive integer"),
    (["--modalities", "T1w"], "invalid choice: 'T1w'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_usage_errors_exit_2(tmp_path, capsys, extra, message):
    bids = make_bids(tmp_path / "b", {})
    assert cli.main(_args(bids, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


def test_refuses_output_or_work_dir_inside_bids(tmp_path, capsys):
    bids = make_bids(tmp_path / "b", {})
    assert cli.main(_args(bids, bids)) == 2
    assert "is the BIDS dataset or inside it" in capsys.readouterr().err
    assert cli.main(_args(bids, bids / "derivatives" / "atlasgs")) == 2
    assert cli.main(_args(bids, tmp_path / "o", "--work-dir", str(bids / "work"))) == 2
    assert "--work-dir" in capsys.readouterr().err
    assert not (bids / "derivatives").exists() and not (bids / "work").exists()


def test_bad_filter_file_exit_2(tmp_path, capsys):
    bids = make_bids(tmp_path / "b", {})
    f = tmp_path / "f.json"
    f.write_text('{"T1w": {}}')
    assert cli.main(_args(bids, tmp_path / "o", "--bids-filter-file", str(f))) == 2
    assert "unknown query keys" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert cli.main(["--version"]) == 0
    assert "atlasgs-bids" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--participant-label", "--bids-filter-file", "--skull-stripped", "--derivatives", "--quality",
                   "--device", "--omp-nthreads", "--mem-gb", "--reports-only", "--work-dir"):
        assert option in text


def test_fetal_stacks_no_t1w_exit_2_nothing_written(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(shared_data / "bids-fetal-stacks", out)) == 2
    err = capsys.readouterr().err
    assert "no T1w image for sub-01" in err and "Traceback" not in err
    assert not out.exists() or not list(out.glob("sub-*"))


def test_tcia_not_bids_exit_2(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(shared_data / "tcia-glioma-thick", out)) == 2
    err = capsys.readouterr().err
    assert "MISSING_DATASET_DESCRIPTION" in err and "not a valid BIDS dataset" in err
    assert cli.main(_args(shared_data / "tcia-glioma-thick", out, "--skip-bids-validation")) == 2
    assert "not a BIDS dataset (no dataset_description.json)" in capsys.readouterr().err
    assert not out.exists()


def test_input_error_traceback_only_with_verbose(tmp_path, capsys):
    bids = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T2w.nii.gz": THICK})
    assert cli.main(_args(bids, tmp_path / "o", "--skip-bids-validation")) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(_args(bids, tmp_path / "o", "--skip-bids-validation", "-v")) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("up_front", [True, False], ids=["checked up front", "found in a node"])
def test_input_error_exit_2_leaves_no_partial_outputs(tmp_path, capsys, monkeypatch, up_front):
    """An all-zero T1w passes discovery (headers only). The up-front image check refuses it before any workflow is
    built; an input error that only shows in a node (the check bypassed here) fails the participant the same way:
    the InputError's one-line message, exit 2, no sub-* written, the participant marked failed in logs/."""
    bids = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T2w.nii.gz": THICK})
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(bids / "sub-01/anat/sub-01_T1w.nii.gz"))
    if not up_front:
        monkeypatch.setattr(cli_run, "check_images", lambda si: None)
    out = tmp_path / "out"
    rc = cli.main(_args(bids, out, "--skip-bids-validation", "--skull-stripped", "--device", "cpu",
                        "-w", str(tmp_path / "work")))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "sub-01: input error: " in err and "sub-01_T1w.nii.gz: every voxel is zero" in err
    assert ("t1w_reorient: failed after" in err) is not up_front
    written = sorted(p.name for p in out.iterdir())
    assert written == (["logs"] if up_front else [".bidsignore", "README.md", "dataset_description.json", "logs"])
    status = json.loads((out / "logs" / "sub-01_status.json").read_text())
    assert status["status"] == "failed" and status["input_error"] is True
    if not up_front:
        (toml,) = (out / "logs").glob("config-*.toml")
        assert Config.from_toml(toml.read_text()).execution.skull_stripped is True


def test_unusable_work_dir_exit_2_before_any_output(tmp_path, capsys):
    """A --work-dir that cannot be created (a file in the way) is the user's to fix: exit 2, named, nothing written."""
    bids = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/anat/sub-01_T2w.nii.gz": THICK})
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli.main(_args(bids, tmp_path / "out", "--skip-bids-validation", "--device", "cpu",
                        "-w", str(blocker / "work")))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--work-dir <{blocker / 'work'}> is not a writable folder" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("sub-*"))


@pytest.mark.parametrize("verbose", [False, True])
def test_processing_failure_exit_1_traceback_only_with_verbose(tmp_path, capsys, monkeypatch, verbose):
    """An unexpected failure outside a participant (here injected into the participant level) exits 1 with its
    one-line cause; the traceback only with -v."""
    bids = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/anat/sub-01_T2w.nii.gz": THICK})

    def boom(config, log):
        raise OSError(28, "No space left on device", str(tmp_path / "work" / "x.pklz"))

    monkeypatch.setattr(cli.entry, "run_participant_level", boom)
    rc = cli.main(_args(bids, tmp_path / "out", "--skip-bids-validation", *(["-v"] if verbose else [])))
    err = capsys.readouterr().err
    assert rc == 1
    assert "processing failed: OSError: [Errno 28] No space left on device" in err
    assert "free space, or point --work-dir at a larger file system" in err
    assert ("Traceback" in err) is verbose


def test_pin_native_seeds():
    env = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "3"}  # the user's choice wins
    pin_native_seeds(0, env)
    assert env == {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "3", "ANTS_RANDOM_SEED": "1"}
    env = {}
    pin_native_seeds(4, env)
    assert env == {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "ANTS_RANDOM_SEED": "5"}


def test_config_toml_roundtrip(tmp_path):
    cfg = Config.build(bids_dir=tmp_path / "b", output_dir=tmp_path / "o", analysis_level="group",
                       participant_label=["01"], bids_filters={"t1w": {"acquisition": None, "run": 2}},
                       derivatives=[tmp_path / "m"], mem_gb=4.5, quality="best", seed=3)
    back = Config.from_toml(cfg.save(tmp_path / "c.toml").read_text())
    assert back == cfg
    with pytest.raises(TypeError, match="unknown config field"):
        Config.build(bids_dir="/b", output_dir="/o", analysis_level="participant", colour="red")


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_tty_lines_otherwise():
    tty, batch = _TTY(), io.StringIO()
    for stream in (tty, batch):
        p = Progress("scaffold", stream=stream, every=5)
        for step in range(1, 11):
            p(step, 10, 0.25)
    assert tty.getvalue().count("\r") == 10 and "[##############################] 10/10" in tty.getvalue()
    assert batch.getvalue().splitlines() == ["scaffold: step 5/10 (50%) loss 0.25",
                                             "scaffold: step 10/10 (100%) loss 0.25"]


@pytest.fixture()
def app_log(caplog):
    """The app's log records (``caplog``), with its logger set up as the CLI does and propagating to pytest."""
    cli_logs.setup_logging(0)
    cli_logs.LOGGER.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="atlasgs"):
            yield caplog
    finally:
        cli_logs.LOGGER.propagate = False


def test_stage_logs_duration(app_log):
    with cli_logs.stage("discovery"):
        pass
    assert any(r.getMessage().startswith("discovery: done in ") for r in app_log.records)


def test_stage_is_never_silent(app_log, monkeypatch):
    """A long stage (BIDS validation, pybids indexing, ...) says it is still running (every 30 s on a terminal)."""
    import time as _time

    monkeypatch.setenv("ATLASGS_HEARTBEAT_SECONDS", "0.05")
    with cli_logs.stage("input discovery"):
        _time.sleep(0.2)
    assert any(r.getMessage().startswith("still running: input discovery (") for r in app_log.records)


def test_bench_subcommand_dispatch(capsys):
    pytest.importorskip("atlasgs_bids.bench.run", reason="bench runner not written yet")
    assert cli.main(["bench", "--help"]) == 0
    assert "atlasgs-bids bench" in capsys.readouterr().out


def test_reports_only_fits_nothing(tmp_path, capsys):
    bids = make_bids(tmp_path / "b", {"sub-01/anat/sub-01_T1w.nii.gz": ISO, "sub-01/anat/sub-01_T2w.nii.gz": THICK})
    out = tmp_path / "out"
    assert cli.main(_args(bids, out, "--skip-bids-validation", "--reports-only", "--device", "cpu",
                          "--quality", "fast")) == 0
    assert not list(out.glob("sub-*")) and not list(out.glob(".staging-*"))
    text = (out / "logs" / "sub-01_methods.txt").read_text()
    assert "quality preset 'fast'" in text and "sub-01_T2w.nii.gz" in text


def test_omp_nthreads_default_from_environment(tmp_path, monkeypatch):
    bids = make_bids(tmp_path / "b", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parse_args(_args(bids, tmp_path / "o")).omp_nthreads == 3
    assert parse_args(_args(bids, tmp_path / "o", "--omp-nthreads", "1")).omp_nthreads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert parse_args(_args(bids, tmp_path / "o")).omp_nthreads >= 1


def test_node_timer_logs_cached_nodes(caplog):
    class _Node:
        fullname = "sub_01_wf.T2w_wf.harmonize"

    timer = cli_run.NodeTimer("sub-01 ")
    with caplog.at_level(logging.INFO, logger="atlasgs"):
        cli_logs.LOGGER.propagate = True
        try:
            timer(_Node(), "end")  # never started: reused from the work dir
            timer(_Node(), "start")
            timer(_Node(), "end")
        finally:
            cli_logs.LOGGER.propagate = False
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records))  # a record may reach caplog twice
    assert lines[0] == "sub-01 T2w_wf.harmonize: cached (work dir)"
    assert lines[1].startswith("sub-01 T2w_wf.harmonize: done in ") and "-0.0" not in lines[1]


def test_bench_prints_per_case_progress_and_heartbeat(shared_data, tmp_path, capfd, monkeypatch):
    """``atlasgs-bids bench`` logs each case as it starts and each method as it ends (the bench's own logger is wired
    to the console), and a long method says it is still running (heartbeat, here every 0.05 s)."""
    import time as _time

    from atlasgs_bids.bench import baselines

    monkeypatch.setenv("ATLASGS_HEARTBEAT_SECONDS", "0.05")
    slow_cubic = baselines.interpolate_cubic

    def cubic(*args, **kwargs):
        _time.sleep(0.3)
        return slow_cubic(*args, **kwargs)

    monkeypatch.setattr(baselines, "interpolate_cubic", cubic)
    rc = cli.main(["bench", "--data", str(shared_data / "mni152-hcp"), "--factors", "3", "5", "--crop", "16",
                   "--degradations", "gaussian", "--methods", "linear", "cubic", "--device", "cpu",
                   "--out", str(tmp_path / "bench")])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "case 1/2: x3 gaussian (linear, cubic)" in err and "case 2/2: x5 gaussian" in err
    assert "x5 gaussian: cubic PSNR" in err
    assert "still running: x3 gaussian: cubic" in err


def test_heartbeat_names_running_nodes(app_log):
    """During a participant's workflow the heartbeat names the nodes still running and for how long."""
    import time as _time
    from types import SimpleNamespace

    from atlasgs_bids.interfaces.progress import Heartbeat

    timer = cli_run.NodeTimer("sub-01 ")
    timer(SimpleNamespace(fullname="wf.T2w_wf.harmonize"), "start")
    with Heartbeat(cli_logs.LOGGER, timer.running, interval=0.05):
        _time.sleep(0.2)
    assert any(r.getMessage().startswith("still running: sub-01 T2w_wf.harmonize (") for r in app_log.records)
    timer(SimpleNamespace(fullname="wf.T2w_wf.harmonize"), "end")
    assert timer.running() == ""

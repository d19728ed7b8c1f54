"""The ``atlasgs-bids`` entry point: dispatch to the BIDS-App levels or a subcommand, map errors to exit codes.

Exit codes: 0 success; 2 usage or input error (one log line naming the file and the fix; traceback with ``-v``);
1 processing failure (traceback logged). A failed participant leaves no partial derivatives.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from atlasgs_bids.cli.codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from atlasgs_bids.cli.demo import demo_main
from atlasgs_bids.cli.logs import LOGGER, setup_logging, stage
from atlasgs_bids.cli.parser import build_config, build_index_parser, parse_args
from atlasgs_bids.cli.run import root_cause, run_group_level, run_participant_level
from atlasgs_bids.errors import InputError
from atlasgs_bids.preflight import describe_os_error
from atlasgs_bids.processes import Terminated, pin_native_seeds, interrupt_signals
from atlasgs_bids.version import __version__


def _index_main(argv: Sequence[str]) -> int:
    opts = build_index_parser().parse_args(argv)
    setup_logging(0)
    from atlasgs_bids.bids.layout import open_layout

    with stage("pybids index"):
        layout = open_layout(opts.bids_dir.expanduser().absolute(), opts.database_dir.expanduser())
    LOGGER.info("%s: %d subjects indexed in %s", layout.root, len(layout.get_subjects()), opts.database_dir)
    return EXIT_OK


def _bench_main(argv: Sequence[str]) -> int:
    from atlasgs_bids.bench import run as bench_run  # the benchmarks are not on the app's path: imported on demand

    parser = argparse.ArgumentParser(prog="atlasgs-bids bench", description="Benchmarks of the method.")
    bench_run.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0) or 0)
    rc = bench_run.run(args)
    return EXIT_OK if rc is None else int(rc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (the console script calls ``sys.exit(main())``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    try:
        if argv and argv[0] == "demo":
            return demo_main(argv[1:], main)
        if argv and argv[0] == "bench":
            return _bench_main(argv[1:])
        if argv and argv[0] == "index":
            return _index_main(argv[1:])
        opts = parse_args(argv)
        verbose = opts.verbose
        log = setup_logging(verbose)
        pin_native_seeds(opts.seed)
        config = build_config(opts)
        LOGGER.info("atlasgs-bids %s: %s level on %s -> %s", __version__, config.execution.analysis_level,
                    config.execution.bids_dir, config.execution.output_dir)
        with interrupt_signals():
            if config.execution.analysis_level == "participant":
                return run_participant_level(config, log)
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

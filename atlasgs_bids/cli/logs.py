"""The app's console logging: the ``atlasgs`` logger, nipype's level, and a log line per stage with its duration.

No module state: :func:`setup_logging` configures the loggers (logging's own hierarchy holds the handlers and
levels) and returns a :class:`LogSettings` that the caller passes on to what needs the verbosity.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from atlasgs_bids.interfaces.progress import Heartbeat

LOGGER = logging.getLogger("atlasgs")


@dataclass(frozen=True)
class LogSettings:
    """How verbose the run is (``-v`` count)."""

    verbose: int = 0
    """0: INFO for the app, WARNING for nipype; 1 (``-v``): nipype at INFO, tracebacks for input errors, the
    stage-2 CG iterations; 2 (``-vv``): the app at DEBUG too."""

    @property
    def nipype_level(self) -> str:
        """Level name of nipype's ``workflow``, ``interface`` and ``utils`` loggers."""
        return "INFO" if self.verbose else "WARNING"

    @property
    def tracebacks(self) -> bool:
        """Whether error lines carry their traceback."""
        return self.verbose > 0


def setup_logging(verbose: int = 0) -> LogSettings:
    """``atlasgs`` logger to stderr (INFO, DEBUG with ``-vv``); nipype's quieter unless ``-v``."""
    settings = LogSettings(int(verbose))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    for logger in (LOGGER, logging.getLogger("atlasgs_bids")):  # the app's and the package modules' (bench) loggers
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        logger.propagate = False
    quiet_nipype(settings)
    return settings


def quiet_nipype(settings: LogSettings) -> None:
    """Apply ``settings.nipype_level`` to nipype's loggers (INFO with ``-v``, else WARNING).

    Importing nipype resets its loggers to its config's INFO, so this is applied again once nipype is imported
    (and written into nipype's config, which its plugins re-read)."""
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(settings.nipype_level)
    if "nipype" in sys.modules:
        from nipype import config as nipype_config

        for key in ("workflow_level", "interface_level", "utils_level"):
            nipype_config.set("logging", key, settings.nipype_level)


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

"""A tiny progress reporter for fitting loops: a bar on a terminal, plain lines in batch logs.

>>> import io
>>> out = io.StringIO()
>>> p = Progress("scaffold", stream=out, every=50)
>>> for step in range(1, 101):
...     p(step, 100, 0.5)
>>> print(out.getvalue().strip())
scaffold: step 50/100 (50%) loss 0.5
scaffold: step 100/100 (100%) loss 0.5
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, TextIO


class Progress:
    """Callable ``progress(step, total, loss=None)``; draws ``\\r``-updated bar when ``stream`` is a TTY.

    Parameters
    ----------
    label : str
        Shown before the bar / line.
    stream : text stream
        Defaults to ``sys.stderr``.
    every : int
        In batch mode (not a TTY), a line every ``every`` steps and at the last step.
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, every: int = 100, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, every)
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def __call__(self, step: int, total: int | None = None, loss: float | None = None, *_, **__) -> None:
        total = total or step
        frac = min(1.0, step / max(total, 1))
        tail = f" loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
        if self.tty:
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            rate = step / max(time.perf_counter() - self.t0, 1e-9)
            self.stream.write(f"\r{self.label}: [{bar}] {step}/{total}{tail} ({rate:.1f} it/s)")
            if step >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step >= total:
            self.stream.write(f"{self.label}: step {step}/{total} ({frac:.0%}){tail}\n")
            self.stream.flush()


def heartbeat_interval(stream: TextIO | None = None) -> float:
    """Seconds between :class:`Heartbeat` lines: ``$ATLASGS_HEARTBEAT_SECONDS`` when set, else 30 on a terminal
    (no step stays silent longer) and 120 in batch logs (a line every two minutes, not a flood)."""
    env = os.environ.get("ATLASGS_HEARTBEAT_SECONDS", "")
    try:
        if float(env) > 0:
            return float(env)
    except ValueError:
        pass
    stream = stream if stream is not None else sys.stderr
    return 30.0 if bool(getattr(stream, "isatty", lambda: False)()) else 120.0


class Heartbeat:
    """Context manager: a daemon thread logs ``still running: <describe()>`` every ``interval`` seconds while the
    block runs (nothing when ``describe`` returns ``None`` or an empty string), so a long step is never silent.

    >>> import logging, io
    >>> log = logging.getLogger("heartbeat-doctest"); stream = io.StringIO()
    >>> log.addHandler(logging.StreamHandler(stream)); log.setLevel(logging.INFO); log.propagate = False
    >>> with Heartbeat(log, lambda: "fitting", interval=0.05):
    ...     time.sleep(0.18)
    >>> stream.getvalue().splitlines()[0]
    'still running: fitting'
    """

    def __init__(self, logger: logging.Logger, describe: Callable[[], str | None], *,
                 interval: float | None = None) -> None:
        self.logger = logger
        self.describe = describe
        self.interval = heartbeat_interval() if interval is None else float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                text = self.describe()
            except Exception:  # a heartbeat must never break the run it reports on
                continue
            if text:
                self.logger.info("still running: %s", text)

    def __enter__(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._run, name="atlasgs-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

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

import sys
import time
from typing import TextIO


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

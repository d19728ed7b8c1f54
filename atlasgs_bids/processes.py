"""Process control for a participant run: SIGTERM handled like Ctrl-C, Nipype's worker processes stopped on
failure or interruption, and native (ANTs/ITK) seeds and threads pinned before any worker starts."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Iterator

LOGGER = logging.getLogger("atlasgs")


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler, so SIGTERM takes the same clean-up path as Ctrl-C."""

    signum = 15


def _raise_terminated(signum, frame) -> None:  # signal handler signature
    raise Terminated()


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux ``/proc``; empty elsewhere), children first."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def kill_workers(everything: bool = False, *, quiet: bool = True) -> int:
    """SIGKILL nipype's pool workers (the children of multiprocessing's forkserver), so that no worker still
    running a node writes into a staging folder after it is discarded; with ``everything``, every descendant of
    this process (the forkserver and the resource tracker too: the process is about to exit). ``quiet`` silences
    the pool's traceback for each cancelled task. Returns how many processes were signalled."""
    from multiprocessing import forkserver

    server = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    pids = descendants(server) if server else []
    if everything and server:  # the forkserver last: it would otherwise fork no more, but is not needed either
        pids.append(server)
    LOGGER.debug("stopping worker processes %s", pids)
    if pids and quiet:  # the pool then reports each cancelled task with a BrokenProcessPool traceback
        logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL + 1)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reap our direct children (others are reparented and reaped by init)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return len(pids)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped: it runs nothing more).

    ``os.kill(pid, 0)`` says whether it exists, also when another user owns it; on Linux, ``/proc/<pid>/stat``
    then tells a zombie from a live process (elsewhere, existing counts as alive).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # gone since os.kill found it, or no /proc here (not Linux: os.kill's answer)
        return not os.path.isdir("/proc")


def pin_native_seeds(seed: int, environ: dict | None = None) -> None:
    """Make ANTs reproducible in this process and the workers it starts (they inherit the environment).

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when it starts (setting it later is ignored; ITK then
    uses every core), and multi-threaded Mattes MI differs from run to run (~0.03 mm, measured on 2 cores; enough
    to change output voxels). So it is set to 1 unless the user set it (registration takes seconds next to
    stage 2), and ``ANTS_RANDOM_SEED = seed + 1`` for ANTs tools not given ``--random-seed`` (ANTs reads 0 as
    "seed from the clock"). With one ITK thread registration is bit-reproducible.
    """
    env = os.environ if environ is None else environ
    env["ANTS_RANDOM_SEED"] = str(int(seed) + 1)
    env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")



@contextlib.contextmanager
def interrupt_signals() -> Iterator[None]:
    """While the body runs (main thread only), SIGTERM raises :class:`Terminated` instead of killing the process
    outright, so a scheduler's or ``docker stop``'s SIGTERM cleans up like Ctrl-C; and SIGINT raises
    ``KeyboardInterrupt`` even when the process started with it ignored (a shell starts a background job, ``cmd &``,
    with SIGINT ignored, so ``kill -INT`` did nothing and the run went on to the end). The old handlers are
    restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)

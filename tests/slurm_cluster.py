"""A throwaway single-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd in the foreground,
each with its own key, socket, ports, state and spool folders under one temp folder, so it neither needs nor touches
a system-wide SLURM or munge. Needs root (slurmd starts job steps as the submitting user) and Debian's
``slurm-wlm`` and ``munge`` (``.ci/run`` installs them).

>>> reason = why_unavailable()
>>> reason is None or isinstance(reason, str)
True
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "sacct")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                       if p.is_file()), None)


def why_unavailable() -> str | None:
    """Why a local cluster cannot be started here (``None`` when it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs job steps as the submitting user)"
    missing = [name for name in (*DAEMONS, *CLIENTS[:5]) if _which(name) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge; .ci/run does it when "
                "it runs as root)")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mem_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)


@dataclass
class LocalSlurm:
    """One node (``NodeName=atlasgs-node``, all CPUs, 90% of the memory) in one partition, ``debug``."""

    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM's client commands (and jobs, which inherit it): ``SLURM_CONF``."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "munge", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        lines = {
            "ClusterName": "atlasgstest", "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmUser": "root", "SlurmdUser": "root",
            "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(),
            "AuthType": "auth/munge", "CredType": "cred/munge", "AuthInfo": f"socket={r / 'munge' / 'socket'}",
            "StateSaveLocation": r / "state", "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid", "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log", "SlurmdLogFile": r / "log" / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "MpiDefault": "none",
            "SchedulerType": "sched/backfill", "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory", "ReturnToService": 2, "SlurmdParameters": "config_overrides",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none", "SchedulerParameters": "sched_interval=2", "MinJobAge": 600,
            "SlurmctldTimeout": 30, "SlurmdTimeout": 30, "InactiveLimit": 0, "KillWait": 5,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName=atlasgs-node NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
                 f"RealMemory={int(_mem_mb() * 0.9)} State=UNKNOWN\n"
                 "PartitionName=debug Nodes=atlasgs-node Default=YES MaxTime=INFINITE State=UP\n")
        self.conf.write_text(text)

    def _spawn(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}.stdout", "wb")  # noqa: SIM115 (closed in stop)
        self.logs.append(log)
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "LocalSlurm":
        """Start the three daemons and wait (at most ``timeout`` s) until the node is idle; ``RuntimeError`` with
        the daemons' log tails otherwise."""
        self._write_config()
        m = self.root / "munge"
        self._spawn(_which("munged"), "--foreground", "--force", f"--key-file={m / 'munge.key'}",
                    f"--socket={m / 'socket'}", f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}")
        self._wait(lambda: (m / "socket").exists(), 15, "munged did not create its socket")
        self._spawn(_which("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._spawn(_which("slurmd"), "-D", "-f", str(self.conf), "-N", "atlasgs-node")
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout, "the node never came up")
        return self

    def node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env,
                              timeout=15, check=False)
        return proc.stdout.strip().rstrip("*~#")

    def _wait(self, ok, timeout: float, what: str) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if ok():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM: {what} within {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def run(self, *argv: str, timeout: float = 30, env: dict[str, str] | None = None) -> str:
        """A client command (``sbatch ...``) with ``env`` added to :attr:`env` (sbatch hands it to the job); its
        stdout, or ``RuntimeError`` with stderr when it fails."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, env={**self.env, **(env or {})},
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}")
        return proc.stdout

    def wait_idle(self, timeout: float) -> None:
        """Wait until no job is pending or running (every job finished, whatever its outcome)."""
        self._wait(lambda: self.run("squeue", "-h", "-o", "%i").strip() == "", timeout,
                   "jobs still queued or running")

    def job_states(self, job_id: str) -> dict[str, str]:
        """``{job id (array tasks as <id>_<i>): state}`` from ``scontrol show job`` (no accounting database)."""
        text = self.run("scontrol", "-o", "show", "job", job_id)
        states = {}
        for line in text.splitlines():
            kv = dict(part.split("=", 1) for part in line.split() if "=" in part)
            task = kv.get("ArrayTaskId")
            key = f"{kv.get('ArrayJobId', kv.get('JobId'))}_{task}" if task else kv.get("JobId", "?")
            states[key] = f"{kv.get('JobState')} {kv.get('ExitCode')}"
        return states

    def stop(self, timeout: float = 20) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL after ``timeout`` s); idempotent."""
        if self.procs and self.procs[0].poll() is None:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=15,
                           check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for log in self.logs:
            log.close()
        self.procs.clear()
        self.logs.clear()

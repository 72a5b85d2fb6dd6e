"""What a process costs, as its user pays it: CPU of every thread from start to exit, and
where it ran (cores, with `taskset`).

A client's CPU comes from os.wait4 on its own pid: user + system time of all its threads
(and of children it waited for), imports and start-up included. A server's CPU, which keeps
running across clients, is read from /proc/PID/stat before and after each client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Placement:
    """Where the server and the client run: a `taskset -c` core list each, or anywhere."""

    server: str | None  # e.g. "0"; None: unpinned
    client: str | None

    @property
    def label(self) -> str:
        if self.server is None and self.client is None:
            return "unpinned (server and client share all cores)"
        return f"server on core {self.server}, client on core {self.client}"

    @property
    def short(self) -> str:
        return "unpinned" if self.client is None else f"client core {self.client}"

    def server_cmd(self, cmd: list[str]) -> list[str]:
        return pin(self.server, cmd)

    def client_cmd(self, cmd: list[str]) -> list[str]:
        return pin(self.client, cmd)

    def client_cores(self) -> int:
        if self.client is None:
            return len(os.sched_getaffinity(0))
        return len(cores_of(self.client))


UNPINNED = Placement(None, None)


def pin(cores: str | None, cmd: list[str]) -> list[str]:
    return cmd if cores is None else ["taskset", "-c", cores, *cmd]


def cores_of(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def pinned_placement(client_cores: str | None = None) -> Placement | None:
    """Server on core 0, client on the others: None if the machine has one core (or no
    taskset), when pinning would put both on the same core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        return None
    rest = cores[1:]
    default = str(rest[0]) if len(rest) == 1 else f"{rest[0]}-{rest[-1]}"
    return Placement(str(cores[0]), client_cores or default)


def proc_cpu_s(pid: int) -> float:
    """user + system CPU of a running process, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # user + system of the process and all its threads, start to exit
    wall_s: float
    peak_rss_mb: float


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> Finished:
    """Run cmd to its end and reap it with os.wait4, which gives its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        killer = threading.Timer(timeout, proc.kill)  # the parent blocks in wait4, idle
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Finished(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_utime + usage.ru_stime,
            wall,
            usage.ru_maxrss / 1024,
        )

"""The same records through `batchlog upload` in one process and through batchlog.spark.upload
on local Spark, against the emulator in its own process; one markdown table.

    python benchmarks/spark.py [--records N] [--master local[2]] [--markdown FILE]

(`--records 100000` takes well under a minute on an idle 2-core machine; the default is
1,000,000.)

The manifest is run.py's memory scenario: N log-inputs records, 100 per run, so each run is
one merged request. The emulator (run.py's EmulatorProcess: signatures verified, counts
kept, no list of effects) answers with 0 ms latency: what is timed is the clients, not a
server's wait. Each client gets a fresh emulator, whose counts prove the run landed
exactly once: calls applied (a replay answered from a retry token is not counted) = the
requests the client reported = the runs of the manifest, every answer a 200, and the
client's report says every record succeeded.

  (a) `batchlog upload` with its default flags (run.py's batchlog_cli: the default
      concurrency, files of its own), one process.
  (b) a Python driver (this file with --driver) that starts a SparkSession on --master,
      builds Settings as README's library example does, and calls
      batchlog.spark.upload(spark.read.text(MANIFEST), settings, CHECKPOINT_DIR) with the
      default buckets; Spark's configuration is its default but the UI (off) and the driver's
      address (loopback).

What a run costs is measured from outside, for the whole process tree. This process is a
child subreaper (prctl), so every process a client starts (Spark: the JVM, its launcher,
pyspark's daemon) is reaped by a parent in the tree or by this process, and its CPU ends
up in this process's RUSAGE_CHILDREN. pyspark's daemon ignores SIGCHLD, so the kernel reaps
the Python workers it forks and no rusage holds their CPU: theirs is read from /proc every
0.2 s (each process's own CPU at its last sample, a hair low). The CPU column is the sum
of both. Peak memory is the tree's RSS summed at each 0.2 s sample, its largest sum; the
split by kind (JVM, Python driver, Python workers, the CLI) comes from the same samples.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from procs import Finished, run_measured
from run import PLATFORM, PY, WORKSPACE, EmulatorProcess, Workdir, batchlog_cli, write_manifest

PER_RUN = 100  # records per run, as run.py's memory scenario: one merged request per run
INTERVAL = 0.2  # seconds between two samples of the process tree
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36


# ---- the Spark side: this file run with --driver, in a process of its own -----------------


def driver(manifest: str, url: str, config: str, checkpoint_dir: str, master: str) -> None:
    """Start a session, upload, print one JSON line of figures (wall-clock times)."""
    started = time.time()
    from pyspark.sql import SparkSession

    import batchlog
    from batchlog.auth import load_credentials
    from batchlog.spark import upload

    spark = (
        SparkSession.builder.master(master)
        .appName("batchlog-benchmark")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    session = time.time()
    creds = load_credentials("api_key", config, None)  # README's library example
    settings = batchlog.Settings(
        target=batchlog.OciTarget(url, PLATFORM, WORKSPACE), keys=creds.keys
    )
    result = upload(spark.read.text(manifest), settings, checkpoint_dir)
    uploaded = time.time()
    dead = result.dead_letter.count()
    spark.stop()
    r = result.report
    print(
        orjson.dumps(
            {
                "started": started,
                "session": session,
                "uploaded": uploaded,
                "records": r.records,
                "succeeded": r.succeeded,
                "unsuccessful": r.unsuccessful_total,
                "requests": r.requests,
                "throttled": r.throttled,
                "dead_letter": dead,
                "buckets": len(result.tasks),
                "task_records": [t.records for t in result.tasks],
                "task_elapsed_s": [t.elapsed_s for t in result.tasks],
            }
        ).decode()
    )


# ---- the process tree: CPU, memory, reaping ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks after boot: with the pid, names the process
    cpu_s: float  # its own user + system time
    rss: int  # bytes


def processes() -> dict[int, Proc]:
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rpartition(")")[2]
        except OSError:
            continue  # gone meanwhile
        fields = rest.split()
        out[int(name)] = Proc(
            int(name),
            int(fields[1]),
            fields[0],
            int(fields[19]),
            (int(fields[11]) + int(fields[12])) / _TICK,
            int(fields[21]) * _PAGE,
        )
    return out


def descendants(procs: dict[int, Proc], skip: set[int]) -> list[Proc]:
    """Every process below this one, but those in ``skip`` (the emulator) and theirs."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [pid for pid in children.get(os.getpid(), []) if pid not in skip]
    while todo:
        pid = todo.pop()
        out.append(procs[pid])
        todo.extend(c for c in children.get(pid, []) if c not in skip)
    return out


def ignores_sigchld(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGCHLD - 1)))
    except OSError:
        pass
    return False


def kind_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "other"
    if os.path.basename(argv[0]).startswith(b"java"):
        return "JVM"
    if b"pyspark.daemon" in argv or b"pyspark.worker" in argv:
        return "Python workers"
    if b"--driver" in argv:
        return "Python driver"
    if b"batchlog" in argv:
        return "batchlog upload"
    return "other"  # spark-submit's shell wrappers


class Sampler(threading.Thread):
    """Every INTERVAL s: the RSS of the tree below this process (but ``skip``), summed, and
    by kind; each process's own CPU at its last sample."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__(daemon=True)
        self.skip = skip
        self.peak = 0  # bytes, the whole tree
        self.peak_by_kind: Counter[str] = Counter()
        # (pid, start) -> kind, CPU s, reaped by a parent that ignores SIGCHLD (no rusage)
        self.cpu: dict[tuple[int, int], tuple[str, float, bool]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(INTERVAL)

    def sample(self) -> None:
        procs = processes()
        by_kind: Counter[str] = Counter()
        for p in descendants(procs, self.skip):
            if p.state == "Z":
                continue
            key = (p.pid, p.start)
            kind, _, lost = self.cpu.get(key, ("other", 0.0, False))
            if kind == "other":  # again: bash becomes java by exec, with the same pid
                kind = kind_of(p.pid)
            if key not in self.cpu:
                lost = ignores_sigchld(p.ppid)
            self.cpu[key] = (kind, p.cpu_s, lost)
            by_kind[kind] += p.rss
        self.peak = max(self.peak, sum(by_kind.values()))
        for kind, rss in by_kind.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind[kind], rss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, cpu, _ in self.cpu.values():
            out[kind] = out.get(kind, 0.0) + cpu
        return out

    def unaccounted_cpu_s(self) -> float:
        """CPU of the processes no rusage will hold: their parent ignored SIGCHLD, so the
        kernel reaped them (pyspark's daemon does so with its forked workers)."""
        return sum(cpu for _, cpu, lost in self.cpu.values() if lost)


def reap_tree(skip: set[int], timeout: float = 120) -> None:
    """Wait for every process left below this one (orphans come to this subreaper) and reap
    them, so that their CPU is in RUSAGE_CHILDREN; SIGKILL what is still there after
    ``timeout`` s (processes this benchmark started, by pid)."""
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        tree = descendants(processes(), skip)
        if not tree:
            return
        for p in tree:
            if p.ppid == os.getpid():
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if time.monotonic() > deadline and not killed:
            for p in tree:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
            deadline += 30
        elif killed and time.monotonic() > deadline:
            raise RuntimeError(f"processes left after the run: {[p.pid for p in tree]}")
        time.sleep(0.05)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclasses.dataclass
class Measured:
    done: Finished  # the root process, from os.wait4
    started: float  # time.time() just before it started
    cpu_s: float  # the whole tree: rusage of the reaped, samples of the auto-reaped
    peak_rss_mb: float  # the tree's RSS summed, largest sample
    peak_by_kind: dict[str, float]  # MB
    cpu_by_kind: dict[str, float]  # s, from the samples
    server_cpu_s: float  # the emulator's over the run
    requests: int  # answers the emulator sent over the run
    stats: dict[str, Any]  # the emulator's counts at the end


def measure(cmd: list[str], emu: EmulatorProcess, env: dict[str, str] | None = None) -> Measured:
    skip = {emu.proc.pid}
    if descendants(processes(), skip):
        raise RuntimeError("processes of an earlier run are still there")
    sampler = Sampler(skip)
    r0, server0, cpu0 = emu.requests(), emu.cpu_s(), children_cpu_s()
    sampler.start()
    started = time.time()
    try:
        done = run_measured(cmd, env, timeout=3600)
        reap_tree(skip)
    finally:
        sampler.stop()
    cpu = children_cpu_s() - cpu0 + sampler.unaccounted_cpu_s()
    server = emu.cpu_s() - server0
    stats = emu.stats()
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return Measured(
        done,
        started,
        cpu,
        sampler.peak / 2**20,
        {k: v / 2**20 for k, v in sampler.peak_by_kind.items()},
        sampler.cpu_by_kind(),
        server,
        sum(stats["statuses"].values()) - r0,
        stats,
    )


# ---- the two runs ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    label: str
    records: int
    succeeded: int
    requests: int  # as the client reported them
    startup_s: float  # CLI: process wall - upload; Spark: the session's start
    upload_s: float  # CLI: its report's elapsed_s; Spark: the upload() call
    to_upload_end_s: float  # from the process's start to the upload's end
    m: Measured

    def exactly_once(self, runs: int) -> str:
        """'yes', or what the emulator's counts say against it."""
        statuses = self.m.stats["statuses"]
        applied = int(self.m.stats["applied"])
        checks = {
            "every record succeeded": self.succeeded == self.records,
            "applied = runs": applied == runs,
            "applied = requests": applied == self.requests,
            "only 200s": set(statuses) == {"200"},
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            return f"NO ({', '.join(failed)}; applied {applied:,}, statuses {statuses})"
        return "yes"


def cli_run(work: Workdir, manifest: Path, n: int) -> Row:
    from batchlog.settings import Settings

    default = Settings.__dataclass_fields__["concurrency"].default  # the CLI's default too
    assert isinstance(default, int)
    emu = EmulatorProcess(work)
    try:
        cmd = batchlog_cli(work, emu, manifest, default)
        m = measure(cmd, emu)
    finally:
        emu.close()
    report = orjson.loads(Path(cmd[cmd.index("--report") + 1]).read_bytes())
    elapsed = float(report["elapsed_s"])
    return Row(
        "`batchlog upload` (CLI, default flags), one process",
        int(report["records"]),
        int(report["succeeded"]),
        int(report["requests"]),
        m.done.wall_s - elapsed,
        elapsed,
        m.done.wall_s,
        m,
    )


def spark_run(work: Workdir, manifest: Path, master: str) -> tuple[Row, dict[str, Any]]:
    emu = EmulatorProcess(work)
    ckpt = work.root / f"spark-ckpt-{time.monotonic_ns()}"
    cmd = [
        PY,
        str(Path(__file__).resolve()),
        "--driver",
        str(manifest),
        emu.url,
        str(work.root / "config"),
        str(ckpt),
        master,
    ]
    env = {**os.environ, "PYSPARK_PYTHON": PY}  # the workers run this venv's Python
    try:
        m = measure(cmd, emu, env)
    finally:
        emu.close()
    doc: dict[str, Any] = orjson.loads(m.done.stdout.strip().splitlines()[-1])
    row = Row(
        f"`batchlog.spark.upload` on {master}, {doc['buckets']} buckets",
        int(doc["records"]),
        int(doc["succeeded"]),
        int(doc["requests"]),
        doc["session"] - doc["started"],
        doc["uploaded"] - doc["session"],
        doc["uploaded"] - m.started,
        m,
    )
    return row, doc


def table(rows: list[Row], runs: int) -> list[str]:
    def line(name: str, cells: list[str]) -> str:
        return f"| {name} | {' | '.join(cells)} |"

    def split(values: dict[str, float], fmt: str) -> str:
        return ", ".join(f"{k} {format(v, fmt)}" for k, v in sorted(values.items()))

    out = [
        line("", [r.label for r in rows]),
        line("---", ["---:" for _ in rows]),
        line(
            "records landed exactly once", [f"{r.records:,} ({r.exactly_once(runs)})" for r in rows]
        ),
        line("requests", [f"{r.requests:,}" for r in rows]),
        line(
            "start-up s (CLI: wall - upload; Spark: the session)",
            [f"{r.startup_s:.1f}" for r in rows],
        ),
        line(
            "upload s (CLI: its report; Spark: the upload() call)",
            [f"{r.upload_s:.1f}" for r in rows],
        ),
        line("records/s, the upload", [f"{r.records / r.upload_s:,.0f}" for r in rows]),
        line(
            "records/s, from the process's start to the upload's end",
            [f"{r.records / r.to_upload_end_s:,.0f}" for r in rows],
        ),
        line("CPU s, the whole process tree", [f"{r.m.cpu_s:.1f}" for r in rows]),
        line("CPU µs per record", [f"{r.m.cpu_s / r.records * 1e6:,.1f}" for r in rows]),
        line("CPU s by kind (sampled)", [split(r.m.cpu_by_kind, ".1f") for r in rows]),
        line(
            "peak RSS MB, the tree (sampled every 0.2 s)", [f"{r.m.peak_rss_mb:,.0f}" for r in rows]
        ),
        line("peak RSS MB by kind", [split(r.m.peak_by_kind, ",.0f") for r in rows]),
        line(
            "emulator CPU µs per request",
            [f"{r.m.server_cpu_s / max(1, r.m.requests) * 1e6:,.0f}" for r in rows],
        ),
    ]
    return out


def uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="records (default: 1,000,000)")
    p.add_argument("--master", default="local[2]", help="Spark master (default: local[2])")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--driver", nargs=5, help=argparse.SUPPRESS)  # the Spark run's own process
    a = p.parse_args()
    if a.driver:
        driver(*a.driver)
        return
    n = a.records
    if n < PER_RUN or n % PER_RUN:
        p.error(f"--records {n}: expected a multiple of {PER_RUN}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # orphans' CPU comes here
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    before = uptime()
    with tempfile.TemporaryDirectory(prefix="batchlog-spark-bench-") as tmp:
        work = Workdir(Path(tmp))
        manifest = write_manifest(work.root / "big.jsonl", n, per_run=PER_RUN)
        size = manifest.stat().st_size
        cli = cli_run(work, manifest, n)
        print(f"[cli: {cli.to_upload_end_s:.0f} s]", file=sys.stderr)
        spark, doc = spark_run(work, manifest, a.master)
        print(f"[spark: {spark.m.done.wall_s:.0f} s]", file=sys.stderr)
    after = uptime()
    runs = n // PER_RUN
    out = [
        f"### Spark: {n:,} records ({PER_RUN} per run: {runs:,} runs), one process and "
        f"{a.master}, 0 ms latency\n",
        f"`python benchmarks/spark.py --records {n}`: machine {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; a {size / 2**20:,.0f} MB "
        f"manifest. `uptime` before: `{before}`; after: `{after}`.\n",
        *table([cli, spark], runs),
        "",
        f"Spark's tasks (one per bucket): records {doc['task_records']}, upload seconds "
        f"{[round(s, 1) for s in doc['task_elapsed_s']]}; dead letter rows "
        f"{doc['dead_letter']}, 429s {doc['throttled']}.\n",
    ]
    text = "\n".join(out)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    failed = [r.label for r in (cli, spark) if r.exactly_once(runs) != "yes"]
    if failed:
        sys.exit(f"did not land exactly once: {', '.join(failed)}")


if __name__ == "__main__":
    main()

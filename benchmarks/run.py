"""batchlog against the clients users would pick instead, side by side, in one run.

    python benchmarks/run.py [--quick] [--only SCENARIO ...] [--markdown FILE]
                             [--requests N] [--client-cores LIST] [--no-pin]
                             [--trace-rate DIR]

(--quick: one scenario in under 2 minutes. Where CPU goes inside batchlog: hotpath.py.)

Every scenario runs against the project's emulator in its own process on loopback, with
signatures verified; every client runs in a process of its own (benchmarks/clients.py).
Scenarios:
  throughput  what users pay: `batchlog upload` (the CLI, default flags) and each peer at
              its best, 3,000 one-record requests, 64 in flight, 5 ms latency; whole-process
              CPU (every thread, start-up apart), the server's CPU, server and client pinned
              to different cores (taskset) and unpinned; a raw RSA signature in the same run
  threads     records/s of `batchlog upload` against its signing threads (1, 2, 4)
  ratelimit   server limited to R = 50, 150, 500 req/s (unknown to batchlog), 20 ms
  throttled   20% of requests answered 429 once, 20 ms: batchlog and AsyncBaseClient
  merging     many datasets per run: batchlog with and without merging
  memory      1,000,000 records: peak RSS of an upload, then of a resume
  mlflow      a real `mlflow server`: batchlog beside MlflowClient in a loop and in threads
  journal     batchlog with and without its checkpoint writes: what journaling costs
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from procs import UNPINNED, Finished, Placement, pinned_placement, proc_cpu_s, run_measured

HERE = Path(__file__).resolve().parent
PY = sys.executable
PLATFORM = "ocid1.aidataplatform.oc1..bench"  # clients.py's defaults
WORKSPACE = "bench"
debug: list[str] = []  # every client's raw figures, printed on stderr at the end
trace_dir: Path | None = None  # --trace-rate: batchlog clients' controller traces go here
# runs clients.py with the adaptive controller's debug trace (one line per decision) on
TRACING = (
    "import logging, runpy, sys\n"
    "logging.basicConfig(level=logging.WARNING, format='%(relativeCreated)d %(message)s')\n"
    "logging.getLogger('batchlog.ratecontrol').setLevel(logging.DEBUG)\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, sys.argv[0].rpartition('/')[0])\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


class Workdir:
    def __init__(self, root: Path) -> None:
        self.root = root
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key = key
        (root / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (root / "key.pem").chmod(0o600)
        (root / "pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (root / "config").write_text(
            "[DEFAULT]\nuser=ocid1.user.oc1..bench\nfingerprint=12:34:56:78:90:ab:cd:ef:12:34:56:78:90:ab:cd:ef\n"
            f"tenancy=ocid1.tenancy.oc1..bench\nregion=us-ashburn-1\nkey_file={root / 'key.pem'}\n"
        )


class EmulatorProcess:
    def __init__(self, work: Workdir, *flags: str, where: Placement = UNPINNED) -> None:
        self.proc = subprocess.Popen(
            where.server_cmd(
                [
                    PY,
                    "-m",
                    "batchlog",
                    "emulator",
                    "--port",
                    "0",
                    "--public-key",
                    str(work.root / "pub.pem"),
                    "--no-effects",
                    *flags,
                ]
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        self.url = line.split(" on ")[1].split(" ")[0]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_emulator/stats") as r:
            doc: dict[str, Any] = orjson.loads(r.read())
        return doc

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def requests(self) -> int:
        return sum(self.stats()["statuses"].values())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)


def client(
    work: Workdir, name: str, emu: EmulatorProcess, manifest: Path, *extra: str
) -> dict[str, Any]:
    cmd = clients_py(work, name, emu, manifest, *extra)
    traced = trace_dir is not None and name == "batchlog"
    if traced:
        cmd[1:1] = ["-c", TRACING]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if traced and trace_dir is not None:
        log = trace_dir / f"{manifest.stem}-{uuid.uuid4().hex[:6]}.log"
        log.write_text(out.stderr)
        print(f"[rate trace: {log}]", file=sys.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    stats = emu.stats()["statuses"]
    result["server_requests"] = sum(stats.values())
    result["server_429"] = stats.get("429", 0)
    result["server_200"] = stats.get("200", 0)
    result["server_statuses"] = stats
    debug.append(orjson.dumps(result).decode())
    return result


def write_manifest(path: Path, n: int, per_run: int = 1) -> Path:
    with open(path, "wb") as f:
        buf = []
        for i in range(n):
            run = f"run{i // per_run:08d}"
            buf.append(
                orjson.dumps(
                    {
                        "run_id": run,
                        "dataset_inputs": [
                            {
                                "dataset": {
                                    "name": f"dataset-{i:08d}",
                                    "digest": f"{i:016x}",
                                    "source": f"s3://bucket/data/{i:08d}.parquet",
                                    "source_type": "s3",
                                },
                                "tags": [{"key": "mlflow.data.context", "value": "training"}],
                            }
                        ],
                    }
                )
            )
            if len(buf) >= 10_000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")
    return path


def rsa_sign_us(work: Workdir, n: int = 2000) -> float:
    data = os.urandom(300)
    t0 = time.process_time()
    for _ in range(n):
        work.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return (time.process_time() - t0) / n * 1e6


def rate(r: dict[str, Any]) -> float:
    return max(1e-9, float(r["ok"]) / float(r["elapsed_s"]))


# ---- scenarios -----------------------------------------------------------------------------


# ---- what users pay: whole processes, start-up apart, server and client on their cores --


@dataclass
class Cost:
    """One client's upload of one manifest, measured as its user pays it."""

    client: str
    where: Placement
    extra: tuple[str, ...]  # flags beyond the defaults
    records: int
    ok: int
    elapsed_s: float  # the upload itself, as the client timed it (after start-up)
    full: Finished  # the whole process, N records
    start: Finished  # the same command on a one-record manifest: start-up and setup
    requests: int  # answers the server sent for the N records
    start_requests: int  # ... and for the one record
    server_cpu_s: float  # the server's CPU over the N records
    server_429: int
    rate_limit: float | None  # batchlog: the controller's rate at the end (req/s)

    @property
    def rate(self) -> float:
        return self.ok / max(1e-9, self.elapsed_s)

    @property
    def cpu_us(self) -> float:
        """Client CPU per request, start-up taken out."""
        extra = max(1, self.requests - self.start_requests)
        return (self.full.cpu_s - self.start.cpu_s) / extra * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu_s / max(1, self.requests) * 1e6


def batchlog_cli(
    work: Workdir, emu: EmulatorProcess, manifest: Path, concurrency: int, *extra: str
) -> list[str]:
    """`batchlog upload` as a user runs it: default flags but the concurrency; files of its
    own per run (the default would put the checkpoint next to the manifest, and resume)."""
    tag = work.root / f"cli-{uuid.uuid4().hex}"
    return [
        PY,
        "-m",
        "batchlog",
        "upload",
        "--config-file",
        str(work.root / "config"),
        "--endpoint",
        emu.url,
        "--platform-id",
        PLATFORM,
        "--workspace",
        WORKSPACE,
        "--concurrency",
        str(concurrency),
        "--checkpoint",
        f"{tag}.ckpt",
        "--dead-letter",
        f"{tag}.dead.jsonl",
        "--report",
        f"{tag}.report.json",
        *extra,
        str(manifest),
    ]


def peer_cli(
    work: Workdir, name: str, emu: EmulatorProcess, manifest: Path, concurrency: int
) -> list[str]:
    return clients_py(
        work,
        name,
        emu,
        manifest,
        "--platform",
        PLATFORM,
        "--workspace",
        WORKSPACE,
        "--concurrency",
        str(concurrency),
    )


def clients_py(
    work: Workdir, name: str, emu: EmulatorProcess, manifest: Path, *extra: str
) -> list[str]:
    """The command running one client of benchmarks/clients.py against ``emu``."""
    return [
        PY,
        str(HERE / "clients.py"),
        name,
        "--url",
        emu.url,
        "--manifest",
        str(manifest),
        "--config",
        str(work.root / "config"),
        "--workdir",
        str(work.root),
        *extra,
    ]


def figures(cmd: list[str], done: Finished) -> dict[str, Any]:
    """records, ok and elapsed_s: batchlog's --report, or clients.py's line of JSON."""
    if done.returncode not in (0, 1):  # 1: some records failed, counted below
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    if "--report" in cmd:
        doc = orjson.loads(Path(cmd[cmd.index("--report") + 1]).read_bytes())
        ok = int(doc["succeeded"]) + int(doc["already_done"])
        return {
            "records": doc["records"],
            "ok": ok,
            "elapsed_s": doc["elapsed_s"],
            "rate_limit": doc["rate_limit"],  # where the adaptive controller ended
        }
    doc = orjson.loads(done.stdout.strip().splitlines()[-1])
    return {"records": doc["records"], "ok": doc["ok"], "elapsed_s": doc["elapsed_s"]}


def user_cost(
    work: Workdir,
    client_name: str,
    where: Placement,
    manifests: tuple[Path, Path],
    latency_ms: int,
    concurrency: int,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Cost:
    """One client against a fresh emulator: first on one record (start-up), then on all."""
    one, full = manifests
    emu = EmulatorProcess(work, "--latency-ms", str(latency_ms), where=where)
    try:

        def command(manifest: Path) -> list[str]:
            if client_name == "batchlog":
                cmd = batchlog_cli(work, emu, manifest, concurrency, *extra)
            else:
                cmd = peer_cli(work, client_name, emu, manifest, concurrency)
            return where.client_cmd(cmd)

        r0 = emu.requests()
        cmd = command(one)
        start = run_measured(cmd, env)
        figures(cmd, start)
        r1 = emu.requests()
        cpu1 = emu.cpu_s()  # the stats requests stay outside the window
        cmd = command(full)
        done = run_measured(cmd, env)
        cpu2 = emu.cpu_s()
        stats = emu.stats()["statuses"]
        got = figures(cmd, done)
    finally:
        emu.close()
    cost = Cost(
        client=client_name,
        where=where,
        extra=tuple(extra),
        records=int(got["records"]),
        ok=int(got["ok"]),
        elapsed_s=float(got["elapsed_s"]),
        full=done,
        start=start,
        requests=sum(stats.values()) - r1,
        start_requests=r1 - r0,
        server_cpu_s=cpu2 - cpu1,
        server_429=int(stats.get("429", 0)),
        rate_limit=got.get("rate_limit"),
    )
    debug.append(
        orjson.dumps(
            {
                "client": client_name,
                "where": where.label,
                "extra": list(extra),
                "env": {k: v for k, v in (env or {}).items() if k.startswith("BATCHLOG_")},
                **got,
                "requests": cost.requests,
                "cpu_s": done.cpu_s,
                "wall_s": done.wall_s,
                "start_cpu_s": start.cpu_s,
                "start_wall_s": start.wall_s,
                "server_cpu_s": cost.server_cpu_s,
                "server_429": cost.server_429,
            }
        ).decode()
    )
    return cost


def sign_rate(work: Workdir, threads: int, seconds: float = 1.0) -> float:
    """Raw RSA-2048 signatures per second (wall) on this many threads of this process."""
    data = os.urandom(300)
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            work.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            counts[i] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def placements(pinned: Placement | None) -> list[Placement]:
    return [pinned, UNPINNED] if pinned is not None else [UNPINNED]


LABELS = {
    "batchlog": "batchlog upload (CLI, default flags)",
    "asyncbase": "oci AsyncBaseClient + semaphore",
    "mlopsclient": "aidp-python-client MLOpsClient, 64 threads",
    "requests": "requests + oci Signer, 64 threads",
}


def throughput(
    work: Workdir, n: int, out: list[str], pinned: Placement | None, latency_ms: int = 5
) -> list[Cost]:
    concurrency = 64
    manifests = (
        write_manifest(work.root / "one.jsonl", 1),
        write_manifest(work.root / f"throughput-{n}.jsonl", n),
    )
    sign = rsa_sign_us(work)
    runs: list[tuple[str, Placement, tuple[str, ...]]] = []
    for where in placements(pinned):
        runs.append(("batchlog", where, ()))
        if where is pinned or pinned is None:
            runs.append(("batchlog", where, ("--no-adaptive",)))
        for peer in ("asyncbase", "mlopsclient", "requests"):
            if peer != "requests" or where is pinned or pinned is None:
                runs.append((peer, where, ()))
    rows = [
        user_cost(work, name, where, manifests, latency_ms, concurrency, extra)
        for name, where, extra in runs
    ]
    sign_after = rsa_sign_us(work)
    ends = ", ".join(
        f"{r.rate_limit:,.0f} ({r.where.short})"
        for r in rows
        if r.client == "batchlog" and not r.extra
    )
    placed = pinned.label if pinned else "one core: no pinning"
    out.append(
        f"### What users pay: {n:,} records, one per run and request, {concurrency} in flight, "
        f"{latency_ms} ms server latency\n"
    )
    out.append(
        "| client | where it ran | records/s | batchlog is | client CPU µs/request |"
        " CPU / raw RSA sign | start-up CPU s | server CPU µs/request | peak RSS MB |"
        " records landed |"
    )
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ours = next(
            x for x in rows if x.client == "batchlog" and not x.extra and x.where == r.where
        )
        ratio = "" if r.client == "batchlog" else f"{ours.rate / r.rate:.2f}x"
        label = LABELS[r.client]
        if r.extra:
            label = f"batchlog upload {' '.join(r.extra)} (not the default)"
        out.append(
            f"| {label} | {r.where.short} | {r.rate:,.0f} | {ratio} | {r.cpu_us:,.0f} | "
            f"{r.cpu_us / sign:.2f} | {r.start.cpu_s:.2f} | {r.server_us:,.0f} | "
            f"{r.full.peak_rss_mb:.0f} | {r.ok:,}/{r.records:,} |"
        )
    out.append(
        f"\nRaw RSA-2048 PKCS#1 v1.5 SHA-256 signature on one thread, same run: {sign:.0f} µs "
        f"({sign_after:.0f} µs after the clients ran). batchlog's adaptive rate controller "
        f"ended at {ends} requests/s.\n"
    )
    out.append(
        "How it was measured: client CPU is user + system time of the whole client process, "
        "every thread, from os.wait4; start-up is the same command on a one-record manifest "
        "(imports, credentials, session), and the per-request figure is (CPU of the run - "
        "CPU of start-up) / (requests - 1). records/s counts from the upload's start, after "
        "start-up (batchlog: its --report's elapsed_s; peers: clients.py's timer). Server "
        "CPU is the emulator's (verifying every signature and answering), from "
        f"/proc/PID/stat, per request it answered. Placement: {placed}"
        "; on 2 cores the pinned client has ONE core (batchlog then signs on one thread), "
        "the honest ceiling of one event loop; unpinned, client and server share the cores.\n"
    )
    return rows


def signing_scaling(
    work: Workdir, n: int, out: list[str], pinned: Placement | None, latency_ms: int = 5
) -> None:
    """records/s of `batchlog upload` (default flags) against BATCHLOG_SIGNING_THREADS."""
    concurrency = 64
    manifests = (
        write_manifest(work.root / "one.jsonl", 1),
        write_manifest(work.root / f"throughput-{n}.jsonl", n),
    )
    counts = (1, 2, 4)
    raw = {t: sign_rate(work, t) for t in counts}
    out.append(
        f"### Signing threads: `batchlog upload`, {n:,} one-record requests, {concurrency} in "
        f"flight, {latency_ms} ms latency\n"
    )
    out.append(
        "| where it ran | client cores | signing threads | records/s | client CPU µs/request |"
        " server CPU µs/request | with --no-adaptive: records/s | client CPU µs/request |"
        " raw signatures/s on as many threads (this process) |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for where in placements(pinned):
        default = min(where.client_cores(), 8)  # batchlog's default: a thread per core
        for t in counts:
            env = {**os.environ, "BATCHLOG_SIGNING_THREADS": str(t)}
            r = user_cost(work, "batchlog", where, manifests, latency_ms, concurrency, env=env)
            fixed = user_cost(
                work, "batchlog", where, manifests, latency_ms, concurrency, ("--no-adaptive",), env
            )
            mark = " (default here)" if t == default else ""
            out.append(
                f"| {where.short} | {where.client_cores()} | {t}{mark} | {r.rate:,.0f} | "
                f"{r.cpu_us:,.0f} | {r.server_us:,.0f} | {fixed.rate:,.0f} | "
                f"{fixed.cpu_us:,.0f} | {raw[t]:,.0f} |"
            )
    out.append(
        "\nSigning threads set with BATCHLOG_SIGNING_THREADS (the default is one per core the "
        "process may run on, 8 at most). Raw signatures/s: this benchmark's own process, "
        "unpinned, RSA-2048 on that many threads for 1 s. "
        f"Placement: {pinned.label if pinned else 'one core: no pinning'}; with 2 cores the "
        "pinned client has one core, so more threads cannot sign faster there; unpinned, the "
        "threads share both cores with the server. With default flags the adaptive rate "
        "controller, not signing, may be the bound (it starts at 200 requests/s and climbs); "
        "the --no-adaptive columns show what signing and the event loop allow.\n"
    )


def ratelimit(work: Workdir, seconds: float, out: list[str]) -> None:
    out.append("### Unknown server limit R (token bucket), 20 ms latency, 64 in flight\n")
    out.append("| R req/s | records | achieved req/s | % of R | 429 share of requests | failed |")
    out.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for limit in (50, 150, 500):
        n = int(limit * seconds)
        manifest = write_manifest(work.root / f"rate{limit}.jsonl", n)
        emu = EmulatorProcess(work, "--latency-ms", "20", "--rate-limit", str(limit))
        try:
            r = client(work, "batchlog", emu, manifest, "--concurrency", "64")
        finally:
            emu.close()
        achieved = r["server_200"] / r["elapsed_s"]
        share = r["server_429"] / max(1, r["server_requests"])
        out.append(
            f"| {limit} | {n:,} | {achieved:,.1f} | {achieved / limit:.1%} | "
            f"{share:.2%} | {r['records'] - r['ok']} |"
        )
    out.append("")


def throttled(work: Workdir, n: int, out: list[str]) -> None:
    manifest = write_manifest(work.root / "throttled.jsonl", n)
    rows = {}
    for name in ("batchlog", "asyncbase"):
        emu = EmulatorProcess(work, "--latency-ms", "20", "--throttle-once", "0.2", "--seed", "1")
        try:
            rows[name] = client(work, name, emu, manifest, "--concurrency", "64")
        finally:
            emu.close()
    out.append(f"### 429-heavy: 20% of requests answered 429 once, {n:,} records, 20 ms\n")
    out.append("| client | records/s | batchlog is | 429s | records landed |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    ours = rate(rows["batchlog"])
    for name, r in rows.items():
        ratio = "" if name == "batchlog" else f"{ours / rate(r):.1f}x"
        out.append(
            f"| {name} | {rate(r):,.0f} | {ratio} | {r['server_429']:,} | "
            f"{r['ok']:,}/{r['records']:,} |"
        )
    out.append("")


def merging(work: Workdir, n: int, out: list[str]) -> None:
    per_run = 100
    manifest = write_manifest(work.root / "merging.jsonl", n, per_run=per_run)
    out.append(f"### Many datasets per run: {n:,} records, {per_run} per run, 20 ms latency\n")
    out.append("| batchlog | records/s | requests |")
    out.append("| --- | ---: | ---: |")
    for label, cap in (("merging (default)", "100"), ("no merging", "1")):
        emu = EmulatorProcess(work, "--latency-ms", "20")
        try:
            r = client(work, "batchlog", emu, manifest, "--max-datasets", cap)
        finally:
            emu.close()
        out.append(f"| {label} | {rate(r):,.0f} | {r['server_requests']:,} |")
    out.append("")


def memory(work: Workdir, n: int, out: list[str]) -> None:
    manifest = write_manifest(work.root / "big.jsonl", n, per_run=100)
    ckpt = str(work.root / "big.ckpt")
    emu = EmulatorProcess(work)
    try:
        first = client(work, "batchlog", emu, manifest, "--checkpoint", ckpt)
        with open(manifest, "ab") as f:  # a scheduled sync appends one record
            late = {"name": "late", "digest": "d1", "source": "s3://b/late", "source_type": "s3"}
            f.write(orjson.dumps({"run_id": "late", "datasets": [{"dataset": late}]}) + b"\n")
        again = client(work, "batchlog", emu, manifest, "--checkpoint", ckpt, "--resume")
    finally:
        emu.close()
    out.append(f"### Memory and resume: {n:,} records (100 per run), 0 ms latency\n")
    out.append("| run | records | requests | elapsed s | peak RSS MB |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    out.append(
        f"| upload | {first['records']:,} | {first['requests']:,} | "
        f"{first['elapsed_s']:.1f} | {first['peak_rss_mb']:.0f} |"
    )
    out.append(
        f"| resume: {n:,} done, 1 appended | {again['records']:,} | "
        f"{again['requests']:,} | {again['elapsed_s']:.2f} | {again['peak_rss_mb']:.0f} |"
    )
    out.append("")


class MlflowServer:
    def __init__(self, root: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log = open(root / "mlflow.log", "wb")
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'ml.db'}",
                "--default-artifact-root",
                str(root / "art"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def mlflow_scenario(work: Workdir, runs: int, out: list[str], per_run: int = 50) -> None:
    from mlflow import MlflowClient

    server = MlflowServer(work.root)
    rows = {}
    try:
        client_api = MlflowClient(server.url)
        for name in ("batchlog", "mlflow-loop", "mlflow-threads"):
            exp = client_api.create_experiment(f"bench-{name}")
            ids = [client_api.create_run(exp).info.run_id for _ in range(runs)]
            path = work.root / f"mlflow-{name}.jsonl"
            with open(path, "wb") as f:
                for r, run in enumerate(ids):
                    for j in range(per_run):
                        i = r * 1000 + j
                        f.write(
                            orjson.dumps(
                                {
                                    "run_id": run,
                                    "datasets": [
                                        {
                                            "dataset": {
                                                "name": f"dataset-{i}",
                                                "digest": f"{i:016x}",
                                                "source": f"s3://bucket/{i}.parquet",
                                                "source_type": "s3",
                                            },
                                            "tags": [
                                                {"key": "mlflow.data.context", "value": "training"}
                                            ],
                                        }
                                    ],
                                }
                            )
                            + b"\n"
                        )
                    f.write(
                        orjson.dumps(
                            {
                                "run_id": run,
                                "model_json": {
                                    "artifact_path": "model",
                                    "flavors": {"python_function": {}},
                                    "utc_time_created": f"2024-01-01 00:00:00.{r:06d}",
                                    "run_id": run,
                                },
                            }
                        )
                        + b"\n"
                    )
            extra = ["--mlflow"] if name == "batchlog" else []
            cmd = [
                PY,
                str(HERE / "clients.py"),
                name,
                "--url",
                server.url,
                "--manifest",
                str(path),
                "--workdir",
                str(work.root),
                "--concurrency",
                "16",
                *extra,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name] = orjson.loads(done.stdout.strip().splitlines()[-1])
            debug.append(orjson.dumps(rows[name]).decode())
    finally:
        server.close()
    n = runs * (per_run + 1)
    out.append(
        f"### Real `mlflow server` (sqlite, 1 worker): {runs} runs, {n:,} records "
        f"({per_run} datasets and 1 model per run), 16 in flight\n"
    )
    out.append("| client | records/s | batchlog is | requests | records landed |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    labels = {
        "batchlog": "batchlog --target mlflow",
        "mlflow-loop": "MlflowClient.log_inputs / log_model, a loop",
        "mlflow-threads": "MlflowClient.log_inputs / log_model, 16 threads",
    }
    ours = rate(rows["batchlog"])
    for name, r in rows.items():
        ratio = "" if name == "batchlog" else f"{ours / rate(r):.1f}x"
        reqs = r.get("requests", r["records"])
        out.append(
            f"| {labels[name]} | {rate(r):,.0f} | {ratio} | {reqs:,} | "
            f"{r['ok']:,}/{r['records']:,} |"
        )
    out.append("")


def journal_cost(work: Workdir, n: int, out: list[str]) -> None:
    manifest = write_manifest(work.root / "journal.jsonl", n)
    rates: dict[str, list[float]] = {"batchlog": [], "batchlog-nojournal": []}
    for _ in range(3):  # alternate, to spread the machine's noise over both
        for name in rates:
            emu = EmulatorProcess(work, "--latency-ms", "20")
            try:
                rates[name].append(rate(client(work, name, emu, manifest)))
            finally:
                emu.close()
    best = {name: max(r) for name, r in rates.items()}
    cost = 1 - best["batchlog"] / best["batchlog-nojournal"]
    out.append(f"### What the journal costs: {n:,} records, one per run, 64 in flight, 20 ms\n")
    out.append("| batchlog | records/s (best of 3) |")
    out.append("| --- | ---: |")
    out.append(
        f"| with the checkpoint journal (group commit, fsync every 0.2 s) | "
        f"{best['batchlog']:,.0f} |"
    )
    out.append(f"| journal writes turned off | {best['batchlog-nojournal']:,.0f} |")
    out.append(f"\nThroughput lost to journaling: {cost:.1%}.\n")


SCENARIOS = [
    "throughput",
    "threads",
    "ratelimit",
    "throttled",
    "merging",
    "memory",
    "mlflow",
    "journal",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=SCENARIOS,
    )
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument(
        "--requests",
        type=int,
        help="one-record requests in throughput and threads (default: 3,000; --quick 1,000)",
    )
    p.add_argument(
        "--client-cores",
        help="taskset core list for the clients (default: all but core 0, the server's)",
    )
    p.add_argument("--no-pin", action="store_true", help="run nothing pinned")
    p.add_argument(
        "--trace-rate",
        metavar="DIR",
        help="write the adaptive controller's decisions (debug log) of each batchlog client "
        "run by ratelimit, throttled, merging, memory and journal to a file in DIR",
    )
    a = p.parse_args()
    if a.trace_rate:
        global trace_dir
        trace_dir = Path(a.trace_rate)
        trace_dir.mkdir(parents=True, exist_ok=True)
    only = set(a.only or SCENARIOS)
    q = a.quick
    n_requests = a.requests or (1000 if q else 3000)
    pinned = None if a.no_pin else pinned_placement(a.client_cores)
    load = os.getloadavg()
    out = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start\n"
    ]
    with tempfile.TemporaryDirectory(prefix="batchlog-bench-") as tmp:
        work = Workdir(Path(tmp))
        steps: list[tuple[str, Callable[[], object]]] = [
            ("throughput", lambda: throughput(work, n_requests, out, pinned)),
            ("threads", lambda: signing_scaling(work, n_requests, out, pinned)),
            ("ratelimit", lambda: ratelimit(work, 5 if q else 20, out)),
            ("throttled", lambda: throttled(work, 300 if q else 1000, out)),
            ("merging", lambda: merging(work, 2000 if q else 20000, out)),
            ("memory", lambda: memory(work, 100_000 if q else 1_000_000, out)),
            ("mlflow", lambda: mlflow_scenario(work, 10 if q else 40, out)),
            ("journal", lambda: journal_cost(work, 2000 if q else 6000, out)),
        ]
        for name, step in steps:
            if name in only:
                t0 = time.monotonic()
                step()
                print(f"[{name} took {time.monotonic() - t0:.0f} s]", file=sys.stderr)
    load = os.getloadavg()
    out.append(f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.\n")
    text = "\n".join(out)
    print(text)
    for line in debug:
        print(line, file=sys.stderr)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()

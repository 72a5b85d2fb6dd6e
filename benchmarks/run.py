"""batchlog against the clients users would pick instead, side by side, in one run.

    python benchmarks/run.py [--quick] [--only SCENARIO ...] [--markdown FILE]

Every scenario runs against the project's emulator in its own process on loopback, with
signatures verified; every client runs in a process of its own (benchmarks/clients.py).
Scenarios:
  throughput  one record per run, 64 in flight, 20 ms latency: all four clients
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
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HERE = Path(__file__).resolve().parent
PY = sys.executable
debug: list[str] = []  # every client's raw figures, printed on stderr at the end


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
    def __init__(self, work: Workdir, *flags: str) -> None:
        self.proc = subprocess.Popen(
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
            ],
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

    def close(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)


def client(
    work: Workdir, name: str, emu: EmulatorProcess, manifest: Path, *extra: str
) -> dict[str, Any]:
    out = subprocess.run(
        [
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
        ],
        capture_output=True,
        text=True,
        check=False,
    )
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


def cpu_us(r: dict[str, Any]) -> float:
    return float(r["cpu_s"]) / max(1, int(r["server_requests"])) * 1e6


# ---- scenarios -----------------------------------------------------------------------------


def throughput(work: Workdir, n: int, out: list[str]) -> dict[str, Any]:
    manifest = write_manifest(work.root / "throughput.jsonl", n)
    sign = rsa_sign_us(work)
    rows = {}
    for name in ("batchlog", "asyncbase", "mlopsclient", "requests"):
        emu = EmulatorProcess(work, "--latency-ms", "20")
        try:
            rows[name] = client(work, name, emu, manifest, "--concurrency", "64")
        finally:
            emu.close()
    labels = {
        "batchlog": "batchlog",
        "asyncbase": "oci AsyncBaseClient + semaphore",
        "mlopsclient": "aidp-python-client MLOpsClient, 64 threads",
        "requests": "requests + oci Signer, 64 threads",
    }
    out.append(f"### Throughput: {n:,} records, one per run, 64 in flight, 20 ms latency\n")
    out.append(
        "| client | records/s | batchlog is | client CPU µs/request | CPU / raw RSA sign |"
        " peak RSS MB | records landed |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ours = rate(rows["batchlog"])
    for name, r in rows.items():
        ratio = "" if name == "batchlog" else f"{ours / rate(r):.1f}x"
        out.append(
            f"| {labels[name]} | {rate(r):,.0f} | {ratio} | {cpu_us(r):,.0f} | "
            f"{cpu_us(r) / sign:.2f} | {r['peak_rss_mb']:.0f} | {r['ok']:,}/{r['records']:,} |"
        )
    out.append(f"\nRaw RSA-2048 PKCS#1 v1.5 SHA-256 signature, same run: {sign:.0f} µs.\n")
    return rows


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["throughput", "ratelimit", "throttled", "merging", "memory", "mlflow", "journal"],
    )
    p.add_argument("--markdown", help="also write the tables to this file")
    a = p.parse_args()
    only = set(
        a.only or ["throughput", "ratelimit", "throttled", "merging", "memory", "mlflow", "journal"]
    )
    q = a.quick
    out = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}\n"
    ]
    with tempfile.TemporaryDirectory(prefix="batchlog-bench-") as tmp:
        work = Workdir(Path(tmp))
        steps = [
            ("throughput", lambda: throughput(work, 2000 if q else 8000, out)),
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
    text = "\n".join(out)
    print(text)
    for line in debug:
        print(line, file=sys.stderr)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()

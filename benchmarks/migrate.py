"""Migrating runs between two MLflow servers: batchlog against mlflow-export-import.

    python benchmarks/migrate.py [--runs 1000] [--quick] [--peer-python PY] [--keep DIR]

Three local `mlflow server`s on loopback (sqlite, one worker, job execution off, each in
its own process group, stopped at the end): a source seeded with --runs runs in 3
experiments (5 params, 3 metrics x 100 steps, 2 datasets and 1 model each; every 10th run
FAILED, the others FINISHED; fixed start and end times), a target for batchlog and one for
mlflow-export-import. The seed is written by MlflowClient (create_run, log_batch,
log_inputs, set_terminated) into the source's sqlite file before its server starts (4x
faster than through the server). The model is an MLflow 2 style entry of the run's
`mlflow.log-model.history` tag, recorded as the runs/log-model handler records it (an
MLmodel JSON with a python_function and an sklearn flavor, no artifacts): what both tools
can carry; MLflow 3 logged models are not carried by mlflow-export-import 1.2.0 (the PyPI
build).

Each tool migrates everything twice, as a nightly sync or a rerun after a lost checkpoint
would:
  batchlog              `batchlog export --tracking-uri SRC -o plan.jsonl`, then
                        `batchlog upload plan.jsonl --target mlflow --tracking-uri DST`
                        (default flags); the second time the same two commands, the upload
                        with --restart (a fresh checkpoint).
  mlflow-export-import  `export-experiments --experiments all --use-threads True`, then
                        `import-experiments --use-src-user-id True --use-threads True`
                        (its bulk commands, threads on, the source user kept); the second
                        time the same, into a new export directory. Its threads are
                        os.cpu_count() whatever --use-threads says (`os.cpu_count() or 4 if
                        use_threads else 1`); import-experiments has no
                        --import-source-tags, so its runs carry no source run id.
Each command runs in a process of its own; wall time and CPU (user+system of the command
and its children, getrusage(RUSAGE_CHILDREN)) are per command. Requests are counted by the
servers (their access log lines while the command ran), the same way for both tools; the
servers' CPU is their process groups' (/proc). A batchlog upload that exits 1 (records in
its dead letter) is part of the result, not an error of the benchmark: the comparison
shows what it left undone, and the second pass whether a rerun finishes it.

After each pass this script reads both servers back itself (REST: runs/search, every page,
and metrics/get-history for every metric) and compares every source run with the target
runs that match it: the tag batchlog.source_run_id, else mlflow-export-import's
mlflow_exim.run_info.run_id, else the experiment name and run name (the seed's run names
are unique in their experiment). A run is missing (no match), duplicated (2 or more), or
different when any copy differs in: run name, params, metric histories (every point:
key, step, timestamp, value, each once), tags (but the tools' own provenance tags, and the
model history compared apart), datasets (name, digest, source type, source, schema,
profile, context tag), models (every field, and `run_id` naming the run it is on), start
and end time, status.

mlflow-export-import is not installed in batchlog's environment (its PyPI build imports
`tabulate` without declaring it); give it a Python of its own:

    python3 -m venv /tmp/mei
    /tmp/mei/bin/pip install mlflow-export-import tabulate mlflow==MLFLOW_VERSION_OF_THIS_ENV
    python benchmarks/migrate.py --peer-python /tmp/mei/bin/python     # or env MEI_PYTHON

(`pip install -e '.[bench]'` installs it here instead; then no flag is needed.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPERIMENTS = ("churn", "fraud", "ranking")
METRICS = ("loss", "accuracy", "learning_rate")
STEPS = 100
PARAMS = 5
BASE_TIME = 1_700_000_000_000  # 2023-11-14, ms: every seeded time is fixed, not "now"
API = "/api/2.0/mlflow/"
HTTP_TIMEOUT = 60.0
MAX_PAGES = 10_000  # every paging loop stops here, whatever the server says
# provenance tags each tool adds on purpose: not a difference
TOOL_TAGS = ("batchlog.", "mlflow_exim.")
HISTORY_TAG = "mlflow.log-model.history"
KINDS = ("name", "params", "metrics", "tags", "datasets", "models", "times", "status")


# ---- servers ---------------------------------------------------------------------------------


T0 = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr, stamped with the time since the start."""
    t = int(time.monotonic() - T0)
    print(f"[{t // 60:02d}:{t % 60:02d}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """`mlflow server` on loopback in its own process group (uvicorn + huey children)."""

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = root / "server.log"
        port = free_port()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{root / 'mlflow.db'}",
                    "--default-artifact-root",
                    str(root / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,  # its own process group, stopped as a whole
                # no job runner (huey consumers: GenAI jobs, nothing of tracking's): 7 fewer
                # processes on 2 cores
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mlflow server {self.name} did not start:\n{tail}")

    def requests(self) -> int:
        """Requests answered so far: uvicorn's access log, one line per request."""
        with open(self.log_path, "rb") as f:
            return sum(1 for line in f if b'"' in line and b" HTTP/1.1" in line)

    def cpu(self) -> float:
        """CPU seconds of the server's process group so far (its processes and reaped ones)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.proc.pid:  # pgrp
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return total / tick

    def alive(self) -> bool:
        self.proc.poll()  # reap the leader, so that its group can end
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def settle(servers: Iterable[MlflowServer], seconds: float = 60) -> None:
    """Wait until the servers are idle: their job consumers start after /health answers and
    would bill their start-up to whichever tool runs first."""
    servers = list(servers)
    deadline = time.monotonic() + seconds
    last = sum(s.cpu() for s in servers)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(s.cpu() for s in servers)
        if now - last < 0.05 * len(servers):
            return
        last = now


def stop(servers: Iterable[MlflowServer]) -> None:
    """SIGTERM each server's whole process group (uvicorn, job runner, huey consumers), then
    SIGKILL what is left after 30 s."""
    left = list(servers)
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        for s in left:
            try:
                os.killpg(s.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            left = [s for s in left if s.alive()]
            time.sleep(0.2)
        if not left:
            return


# ---- REST reads (this script's own, for seeding the model and for the comparison) ------------


class Rest:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + API

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        url = self.url + path
        for attempt in range(6):  # a busy sqlite server may answer 5xx for a moment
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                    return json.loads(r.read() or b"{}")
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == 5:
                    raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:300]!r}") from e
            except OSError:
                if attempt == 5:
                    raise
            time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def pages(self, method: str, path: str, body: dict[str, Any], key: str) -> list[Any]:
        out: list[Any] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            if method == "GET":
                q = urllib.parse.urlencode(body)
                doc = self.call("GET", f"{path}?{q}")
            else:
                doc = self.call(method, path, body)
            out.extend(doc.get(key, []))
            token = doc.get("next_page_token")
            if not token:
                return out
            if token in seen:
                raise RuntimeError(f"{path}: a page token came back twice")
            seen.add(token)
            body = {**body, "page_token": token}
        raise RuntimeError(f"{path}: more than {MAX_PAGES} pages")


# ---- seeding the source (a worker process: MLflow's own client) -------------------------------


def seed_worker(store: str, runs: int) -> None:
    """Log `runs` runs into the source's database with MlflowClient: create_run, log_batch,
    log_inputs, the model as the runs/log-model handler records it, set_terminated."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
    from mlflow.models import Model

    client = MlflowClient(store)  # the sqlite file itself: 4x faster than through a server
    exp_ids = []
    for name in EXPERIMENTS:
        exp = client.get_experiment_by_name(name)
        exp_ids.append(exp.experiment_id if exp else client.create_experiment(name))

    def one(i: int) -> None:
        e = i % len(EXPERIMENTS)
        start = BASE_TIME + i * 60_000
        run = client.create_run(
            exp_ids[e],
            start_time=start,
            run_name=f"run-{i:05d}",
            tags={"mlflow.user": f"user{i % 7}", "mlflow.source.name": "train.py"},
        )
        run_id = run.info.run_id
        metrics = [
            Metric(key, round(((i + 1) * (s + 1) * (k + 1)) % 997 / 997, 6), start + s * 1000, s)
            for k, key in enumerate(METRICS)
            for s in range(STEPS)
        ]
        params = [Param(f"param_{j}", f"value-{i}-{j}") for j in range(PARAMS)]
        tags = [RunTag("team", ("risk", "growth", "search")[e]), RunTag("seed", str(i))]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        schema = json.dumps({"mlflow_colspec": [{"type": "double", "name": "x"}]})
        datasets = [
            DatasetInput(
                Dataset(
                    f"{EXPERIMENTS[e]}-{part}",
                    f"{i:08x}{part[:2]}",
                    "s3",
                    json.dumps({"uri": f"s3://data/{EXPERIMENTS[e]}/{i}/{part}.parquet"}),
                    schema,
                    json.dumps({"num_rows": 1000 + i}),
                ),
                [InputTag("mlflow.data.context", part)],
            )
            for part in ("training", "evaluation")
        ]
        client.log_inputs(run_id, datasets)
        model = {
            "artifact_path": "model",
            "flavors": {
                "python_function": {"loader_module": "mlflow.sklearn", "python_version": "3.11"},
                "sklearn": {"sklearn_version": "1.5.0", "serialization_format": "cloudpickle"},
            },
            "run_id": run_id,
            "utc_time_created": f"2023-11-14 22:13:20.{i % 1_000_000:06d}",
            "model_uuid": f"{i:032x}",
        }
        # what the runs/log-model handler does with an MLmodel JSON
        client._record_logged_model(run_id, Model.from_dict(model))  # type: ignore[no-untyped-call]
        status = "FAILED" if i % 10 == 9 else "FINISHED"
        client.set_terminated(run_id, status, end_time=start + 1_800_000)

    for i in range(runs):  # one writer: sqlite
        one(i)


def seed(root: Path, runs: int, timeout: float) -> float:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(root / "seed.log", "wb") as log:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--seed-worker",
                f"sqlite:///{root / 'mlflow.db'}",
                "--runs",
                str(runs),
            ],
            check=True,
            timeout=timeout,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    return time.monotonic() - t0


# ---- running one tool command ----------------------------------------------------------------


@dataclass
class Step:
    wall: float = 0.0
    cpu: float = 0.0
    requests: int = 0
    server_cpu: float = 0.0
    tool_requests: int | None = None  # what the tool itself reports, when it does
    exit: int = 0
    failed: int | None = None  # records the tool itself reports as failed (batchlog)


def timed(
    name: str,
    cmd: list[str],
    logs: Path,
    servers: Iterable[MlflowServer],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> Step:
    servers = list(servers)
    before_req = [s.requests() for s in servers]
    before_cpu = [s.cpu() for s in servers]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        proc = subprocess.run(
            cmd, stdout=out, stderr=err, env=env, cwd=cwd, timeout=timeout, check=False
        )
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(0.5)  # the servers' last access-log lines
    step = Step(
        wall=wall,
        cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        requests=sum(s.requests() - b for s, b in zip(servers, before_req, strict=True)),
        server_cpu=sum(s.cpu() - b for s, b in zip(servers, before_cpu, strict=True)),
        exit=proc.returncode,
    )
    if proc.returncode not in ok_codes:
        tail = (logs / f"{name}.err").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} exited {proc.returncode}: {' '.join(cmd)}\n{tail}")
    say(f"{name}: {wall:.1f} s, exit {proc.returncode}")
    return step


@dataclass
class Pass:
    export: Step
    load: Step
    result: Result | None = None

    @property
    def wall(self) -> float:
        return self.export.wall + self.load.wall

    @property
    def cpu(self) -> float:
        return self.export.cpu + self.load.cpu

    @property
    def requests(self) -> int:
        return self.export.requests + self.load.requests


def batchlog_pass(n: int, work: Path, src: MlflowServer, dst: MlflowServer, timeout: float) -> Pass:
    plan = work / "plan.jsonl"
    report = work / f"report-{n}.json"
    bl = [sys.executable, "-m", "batchlog"]
    export = timed(
        f"batchlog-export-{n}",
        [*bl, "export", "--tracking-uri", src.url, "-o", str(plan)],
        work,
        [src],
        timeout,
    )
    again = ["--restart"] if n > 1 else []  # the same plan path: a fresh checkpoint
    upload = timed(
        f"batchlog-upload-{n}",
        [
            *bl,
            "upload",
            str(plan),
            "--target",
            "mlflow",
            "--tracking-uri",
            dst.url,
            *again,
            "--report",
            str(report),
        ],
        work,
        [dst],
        timeout,
        ok_codes=(0, 1),  # 1: some records failed (dead letter): the comparison shows them
    )
    doc = json.loads(report.read_text())
    upload.failed = int(doc["failed"]) + int(doc["rejected"])
    upload.tool_requests = int(doc["requests"]) + int(doc.get("read_backs", 0))
    summary = (work / f"batchlog-export-{n}.err").read_text(errors="replace")
    found = re.findall(r"; ([\d,]+) requests, ", summary)  # the last line: the summary
    export.tool_requests = int(found[-1].replace(",", "")) if found else None
    return Pass(export, upload)


def mei_pass(
    n: int, work: Path, peer: str, src: MlflowServer, dst: MlflowServer, timeout: float
) -> Pass:
    out = work / f"export-{n}"
    mod = "mlflow_export_import.bulk."
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    export = timed(
        f"mei-export-{n}",
        [
            peer,
            "-m",
            mod + "export_experiments",
            "--experiments",
            "all",
            "--output-dir",
            str(out),
            "--use-threads",
            "True",
        ],
        work,
        [src],
        timeout,
        env={**base, "MLFLOW_TRACKING_URI": src.url},
        cwd=work,
    )
    load = timed(
        f"mei-import-{n}",
        [
            peer,
            "-m",
            mod + "import_experiments",
            "--input-dir",
            str(out),
            "--use-src-user-id",
            "True",
            "--use-threads",
            "True",
        ],
        work,
        [dst],
        timeout,
        env={**base, "MLFLOW_TRACKING_URI": dst.url},
        cwd=work,
    )
    return Pass(export, load)


# ---- reading back and comparing ------------------------------------------------------------


@dataclass
class RunData:
    run_id: str
    experiment: str
    name: str
    status: str
    start: int | None
    end: int | None
    params: dict[str, str]
    tags: dict[str, str]
    datasets: Counter[str]
    models: list[dict[str, Any]]
    metrics: dict[str, Counter[tuple[int, int, str]]] = field(default_factory=dict)


def read_server(url: str, threads: int = 8) -> list[RunData]:
    """Every active run of every experiment, with every point of every metric."""
    rest = Rest(url)
    exps = rest.pages(
        "POST",
        "experiments/search",
        {"max_results": 1000, "view_type": "ACTIVE_ONLY"},
        "experiments",
    )
    names = {e["experiment_id"]: e["name"] for e in exps}
    runs: list[RunData] = []
    raw = rest.pages(
        "POST",
        "runs/search",
        {"experiment_ids": list(names), "max_results": 1000, "run_view_type": "ACTIVE_ONLY"},
        "runs",
    )
    for r in raw:
        info, data = r["info"], r.get("data", {})
        tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        datasets: Counter[str] = Counter()
        for d in r.get("inputs", {}).get("dataset_inputs", []):
            ds = d["dataset"]
            fields = [ds.get(k) for k in ("name", "digest", "source_type", "source", "schema")]
            fields.append(ds.get("profile"))
            fields.append(sorted((t["key"], t["value"]) for t in d.get("tags", [])))
            datasets[json.dumps(fields)] += 1
        try:
            models = json.loads(tags.get(HISTORY_TAG, "[]"))
        except ValueError:
            models = [{"unparsable": tags[HISTORY_TAG]}]
        runs.append(
            RunData(
                run_id=info["run_id"],
                experiment=names[info["experiment_id"]],
                name=info.get("run_name", ""),
                status=info.get("status", ""),
                start=info.get("start_time"),
                end=info.get("end_time"),
                params={p["key"]: p["value"] for p in data.get("params", [])},
                tags=tags,
                datasets=datasets,
                models=models,
            )
        )
    wanted = [
        (run, m["key"])
        for run, r in zip(runs, raw, strict=True)
        for m in r["data"].get("metrics", [])
    ]
    local = threading.local()

    def history(item: tuple[RunData, str]) -> None:
        run, key = item
        if not hasattr(local, "rest"):
            local.rest = Rest(url)
        points = local.rest.pages(
            "GET",
            "metrics/get-history",
            {"run_id": run.run_id, "metric_key": key, "max_results": 25_000},
            "metrics",
        )
        run.metrics[key] = Counter(
            (int(p.get("step", 0)), int(p["timestamp"]), repr(float(p["value"]))) for p in points
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(history, wanted))
    return runs


def _compared_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k != HISTORY_TAG and not k.startswith(TOOL_TAGS)}


def _canonical(models: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(m, sort_keys=True) for m in models)


def diff_kinds(src: RunData, dst: RunData) -> set[str]:
    kinds = set()
    if src.name != dst.name:
        kinds.add("name")
    if src.params != dst.params:
        kinds.add("params")
    if src.metrics != dst.metrics:
        kinds.add("metrics")
    if _compared_tags(src.tags) != _compared_tags(dst.tags):
        kinds.add("tags")
    if src.datasets != dst.datasets:
        kinds.add("datasets")
    expected = [{**m, "run_id": dst.run_id} for m in src.models]
    if _canonical(expected) != _canonical(dst.models):
        kinds.add("models")
    if (src.start, src.end) != (dst.start, dst.end):
        kinds.add("times")
    if src.status != dst.status:
        kinds.add("status")
    return kinds


@dataclass
class Result:
    missing: int = 0
    duplicated: int = 0  # source runs with 2 or more copies
    copies: int = 0  # target runs beyond the first copy of each source run
    different: int = 0
    unmatched: int = 0  # target runs that match no source run
    kinds: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def compare(source: list[RunData], target: list[RunData]) -> Result:
    by_id = {r.run_id: r for r in source}
    by_name = {(r.experiment, r.name): r.run_id for r in source}
    matches: dict[str, list[RunData]] = defaultdict(list)
    res = Result()
    for t in target:
        src_id = t.tags.get("batchlog.source_run_id") or t.tags.get("mlflow_exim.run_info.run_id")
        if src_id is None:
            src_id = by_name.get((t.experiment, t.name))
        if src_id in by_id:
            matches[src_id].append(t)
        else:
            res.unmatched += 1
    for s in source:
        copies = matches.get(s.run_id, [])
        if not copies:
            res.missing += 1
            continue
        if len(copies) > 1:
            res.duplicated += 1
            res.copies += len(copies) - 1
        kinds: set[str] = set()
        for t in copies:
            kinds |= diff_kinds(s, t)
        if kinds:
            res.different += 1
            res.kinds.update(kinds)
            for k in kinds:
                res.examples.setdefault(k, f"{s.run_id} -> {copies[0].run_id}")
    return res


# ---- the whole benchmark -----------------------------------------------------------------------


def find_peer(flag: str | None) -> str:
    candidates = [flag, os.environ.get("MEI_PYTHON"), sys.executable]
    for py in candidates:
        if not py:
            continue
        ok = subprocess.run(
            [py, "-c", "import mlflow_export_import.bulk.import_experiments, tabulate"],
            capture_output=True,
            timeout=120,
            check=False,
            env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        )
        if ok.returncode == 0:
            return py
        if py is not sys.executable:
            sys.exit(f"{py}: cannot import mlflow_export_import and tabulate")
    import mlflow

    sys.exit(
        "mlflow-export-import is not installed; make a Python for it:\n"
        "  python3 -m venv /tmp/mei && /tmp/mei/bin/pip install mlflow-export-import tabulate "
        f"mlflow=={mlflow.__version__}\nthen pass --peer-python /tmp/mei/bin/python "
        "(or set MEI_PYTHON)"
    )


def version(py: str, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() or "?"


def figures(r: Result | None) -> str:
    if r is None:
        return "- | - | -"
    dup = f"{r.duplicated:,}" + (f" (+{r.copies:,} runs)" if r.copies else "")
    return f"{r.missing:,} | {dup} | {r.different:,}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1000, help="runs on the source (default 1000)")
    p.add_argument("--quick", action="store_true", help="50 runs: a smoke test")
    p.add_argument("--peer-python", help="a Python with mlflow-export-import (env MEI_PYTHON)")
    p.add_argument("--keep", type=Path, help="work here and keep the servers' data and logs")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    p.add_argument("--seed-worker", metavar="URL", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.seed_worker:
        seed_worker(a.seed_worker, a.runs)
        return
    runs = 50 if a.quick else a.runs
    if not 1 <= runs <= 100_000:
        sys.exit("--runs: 1 to 100000")
    peer = find_peer(a.peer_python)
    timeout = 600 + runs * 3.0  # one command, whatever it does
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
        work = a.keep
        run_all(a, runs, peer, timeout, work)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="batchlog-migrate-") as tmp:
            run_all(a, runs, peer, timeout, Path(tmp))


def run_all(a: argparse.Namespace, runs: int, peer: str, timeout: float, work: Path) -> None:
    t_start = time.monotonic()
    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
    servers = {n: MlflowServer(work / n, n) for n in ("batchlog", "mei")}
    try:
        say(f"seeding {runs} runs")
        seeded = seed(work / "source", runs, timeout)
        src = servers["source"] = MlflowServer(work / "source", "source")
        for s in servers.values():
            s.wait_ready()
        settle(servers.values())
        source = read_server(src.url)
        if len(source) != runs:
            raise RuntimeError(f"the source holds {len(source)} runs, not {runs}")
        say(f"seeded in {seeded:.0f} s; servers up, source read back")
        done: dict[str, list[Pass]] = {"batchlog": [], "mei": []}
        for n in (1, 2):
            for tool in ("batchlog", "mei"):
                say(f"{tool}, pass {n}")
                if tool == "batchlog":
                    step = batchlog_pass(n, work, src, servers[tool], timeout)
                else:
                    step = mei_pass(n, work, peer, src, servers[tool], timeout)
                step.result = compare(source, read_server(servers[tool].url))
                say(f"{tool}, pass {n}: target read back and compared")
                done[tool].append(step)
    finally:
        stop(servers.values())
        say("servers stopped")
    loads = (load, os.getloadavg()[0])
    report(a, runs, peer, done, time.monotonic() - t_start, loads)


PASSES = {
    "batchlog": ("1: export + upload", "2: both again, upload --restart"),
    "mei": ("1: export + import", "2: both again, a new export dir"),
}


def report(
    a: argparse.Namespace,
    runs: int,
    peer: str,
    done: dict[str, list[Pass]],
    total: float,
    loads: tuple[float, float],
) -> None:
    import mlflow

    names = {
        "batchlog": f"batchlog {version(sys.executable, 'batchlog')}",
        "mei": f"mlflow-export-import {version(peer, 'mlflow-export-import')}",
    }
    rows = [
        (f"{names[tool]} | {PASSES[tool][n]}", p)
        for tool, passes in done.items()
        for n, p in enumerate(passes)
    ]
    out = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, MLflow {mlflow.__version__} (servers and clients); "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; whole benchmark {total / 60:.1f} min; "
        f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end\n",
        "| tool | pass | exit codes | runs/s | wall s (export + import) | CPU s |"
        " servers' CPU s | requests | runs missing | runs duplicated | runs with differences |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, p in rows:
        out.append(
            f"| {label} | {p.export.exit}, {p.load.exit} | {runs / p.wall:,.1f} | {p.wall:,.1f} "
            f"({p.export.wall:,.1f} + {p.load.wall:,.1f}) | {p.cpu:,.1f} | "
            f"{p.export.server_cpu + p.load.server_cpu:,.1f} | {p.requests:,} | "
            f"{figures(p.result)} |"
        )
    out.append("")
    out.append("Runs with differences, by what differs (a run may count under several):\n")
    out.append("| tool | pass | " + " | ".join(KINDS) + " |")
    out.append("| --- | --- |" + " ---: |" * len(KINDS))
    for label, p in rows:
        r = p.result or Result()
        out.append(f"| {label} | " + " | ".join(f"{r.kinds[k]:,}" for k in KINDS) + " |")
    out.append("")
    for n, p in enumerate(done.get("batchlog", []), 1):
        out.append(
            f"batchlog's own figures, pass {n}: export {p.export.tool_requests:,} requests, "
            f"upload {p.load.tool_requests:,} requests and read-backs, "
            f"{p.load.failed:,} records failed (in its dead letter)."
        )
    text = "\n".join(out)
    print(text)
    # the raw figures, for whoever checks the table
    for tool, ps in done.items():
        for n, p in enumerate(ps, 1):
            r = p.result or Result()
            print(
                f"{tool} pass {n}: export {p.export} / import {p.load}; "
                f"target runs matching no source run {r.unmatched}; examples {r.examples}",
                file=sys.stderr,
            )
    if a.markdown:
        a.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()

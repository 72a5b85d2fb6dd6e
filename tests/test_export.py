"""batchlog export: a real `mlflow server` (sqlite, loopback) seeded with MLflow's client,
an `mlruns/` file store served by `mlflow server`, and small fake servers on loopback for
what a real one will not do on demand (a token it requires, 429s, a page token that
repeats, runs appearing mid-export)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

from batchlog.errors import ConfigurationError
from batchlog.export import (
    MAX_LINE_BYTES,
    ExportProgress,
    PlanFile,
    Selection,
    _Batch,
    _Entry,
    _parents_first,
    _RunWriter,
    export,
    parse_since,
    read_run_ids,
)
from batchlog.ratecontrol import make_gate
from batchlog.retry import RetryPolicy
from batchlog.source import Source
from batchlog.target import mlflow_target
from batchlog.transport import Transport
from tests.conftest import free_loopback_port, run_cli, start_mlflow_server, stop_mlflow_server

POINTS = 2_500  # points of the metric "loss" of the big run
OLD, NEW = 1_600_000_000_000, 1_700_000_000_000  # start times around --since


# ---- the plan's rules (plan-spec.md), checked line by line ---------------------------------

_KEY = re.compile(r"^[/\w.\- :]*$")
_STATUSES = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED", "INTERNAL_ERROR"}


def check_plan(data: bytes) -> list[dict[str, Any]]:
    """Every line valid under the plan's rules; a run's lines together, create-run first and
    update-run last; parents before children. The lines, parsed."""
    lines = [orjson.loads(line) for line in data.splitlines()]
    created: set[str] = set()
    current: str | None = None
    for raw, line in zip(data.splitlines(), lines, strict=True):
        op, run = line["op"], line["source_run_id"]
        assert "run_id" not in line
        if op == "create-run":
            assert current is None, f"run {current} has no update-run before {run}"
            assert run not in created, f"{run} created twice"
            assert set(line) <= {
                "op",
                "source_run_id",
                "experiment",
                "run_name",
                "start_time",
                "user",
                "parent_source_run_id",
            }
            assert isinstance(line["experiment"], str) and 1 <= len(line["experiment"]) <= 500
            assert len(line.get("run_name", "")) <= 250
            assert isinstance(line.get("start_time", 0), int) and line.get("start_time", 0) >= 0
            parent = line.get("parent_source_run_id")
            assert parent is None or parent in created, f"{run}: parent {parent} not before it"
            created.add(run)
            current = run
            continue
        assert run == current, f"{op} of {run} outside its run's lines"
        if op == "log-batch":
            params, metrics, tags = line["params"], line["metrics"], line["tags"]
            assert len(params) <= 100 and len(tags) <= 100 and len(metrics) <= 1000
            assert 1 <= len(params) + len(metrics) + len(tags) <= 1000
            assert len(raw) <= MAX_LINE_BYTES
            assert len({p["key"] for p in params}) == len(params)
            for entry in params + metrics + tags:
                assert 1 <= len(entry["key"]) <= 250 and _KEY.match(entry["key"])
            assert all(len(p["value"]) <= 6000 for p in params)
            assert all(len(t["value"]) <= 8000 for t in tags)
            assert not {t["key"] for t in tags} & {"mlflow.parentRunId", "batchlog.source_run_id"}
            for m in metrics:
                assert isinstance(m["value"], (int, float)) or m["value"] in (
                    "NaN",
                    "Infinity",
                    "-Infinity",
                )
                assert isinstance(m["timestamp"], int) and isinstance(m.get("step", 0), int)
        elif op == "log-inputs":
            assert line["dataset_inputs"]
            for item in line["dataset_inputs"]:
                for name in ("name", "digest", "source", "source_type"):
                    assert isinstance(item["dataset"][name], str)
        elif op == "log-model":
            model = json.loads(line["model_json"])
            assert isinstance(model["artifact_path"], str) and model["artifact_path"]
            assert isinstance(model["flavors"], dict)
            assert model["utc_time_created"].strip() and model["run_id"] == run
        else:
            assert op == "update-run", op
            assert line["status"] in _STATUSES
            assert isinstance(line.get("end_time", 0), int)
            current = None
    assert current is None, f"run {current} has no update-run"
    return lines


def runs_of(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The plan's lines by source run, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        out.setdefault(line["source_run_id"], []).append(line)
    return out


def created(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["op"] == "create-run"]


# ---- the seeded source ----------------------------------------------------------------


@dataclass
class Seeded:
    uri: str
    experiments: dict[str, str]  # name -> id
    big: str  # 150 params, 2,500 points, tags, a dataset, two models
    parent: str
    children: list[str]  # of parent; the first started before its parent
    old: str  # in exp-c: started and ended before --since
    ended_late: str  # in exp-c: started before --since, ended after
    new: str  # in exp-c: started after --since
    deleted: str  # in exp-c, deleted: never exported
    model_id: str  # the big run's MLflow 3 logged model
    proc: Any = field(repr=False, default=None)


def _post(uri: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}",
        data=orjson.dumps(body),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    from mlflow import MlflowClient
    from mlflow.entities import (
        Dataset,
        DatasetInput,
        InputTag,
        LoggedModelOutput,
        Metric,
        Param,
        RunTag,
    )

    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-source"))
    try:
        c = MlflowClient(uri)
        exps = {name: c.create_experiment(name) for name in ("exp-a", "exp-b", "exp-c")}
        gone = c.create_experiment("exp-deleted")
        c.create_run(gone)
        c.delete_experiment(gone)

        big = c.create_run(exps["exp-a"], run_name="big", start_time=NEW).info.run_id
        c.log_batch(big, params=[Param(f"p{i:03d}", f"v{i}") for i in range(100)])
        c.log_batch(big, params=[Param(f"p{i:03d}", f"v{i}") for i in range(100, 150)])
        c.log_batch(big, tags=[RunTag("team", "vision"), RunTag("note", "x" * 300)])
        for start in range(0, POINTS, 1000):
            points = [
                Metric("loss", 1.0 / (i + 1), NEW + i, i)
                for i in range(start, min(POINTS, start + 1000))
            ]
            c.log_batch(big, metrics=points)
        c.log_metric(big, "acc", float("nan"), timestamp=NEW, step=0)
        dataset = Dataset("train", "d1g3st", "s3", '{"uri": "s3://b/t"}', '{"cols": []}')
        tag = InputTag("mlflow.data.context", "training")
        c.log_inputs(big, datasets=[DatasetInput(dataset, [tag])])
        model_json = {  # MLflow 2: runs/log-model, kept in mlflow.log-model.history
            "artifact_path": "old-model",
            "flavors": {"python_function": {"loader_module": "x"}},
            "utc_time_created": "2023-01-01 00:00:00.000000",
            "run_id": big,
            "model_uuid": "0123456789abcdef",
        }
        _post(uri, "runs/log-model", {"run_id": big, "model_json": json.dumps(model_json)})
        # MLflow 3: a LoggedModel, in the run's outputs (what <flavor>.log_model makes)
        logged = c.create_logged_model(exps["exp-a"], source_run_id=big, name="new-model")
        c.log_outputs(big, [LoggedModelOutput(logged.model_id, 0)])
        c.set_terminated(big, "FINISHED", end_time=NEW + 10_000)

        parent = c.create_run(exps["exp-b"], run_name="parent", start_time=NEW + 100).info.run_id
        children = [
            c.create_run(
                exps["exp-b"],
                run_name=f"child{i}",
                start_time=NEW + 100 + delta,
                tags={"mlflow.parentRunId": parent},
            ).info.run_id
            for i, delta in enumerate((-50, 50))  # the first one starts before its parent
        ]
        for run in (parent, *children):
            c.log_metric(run, "m", 1.0, timestamp=NEW, step=0)
            c.set_terminated(run, "FINISHED", end_time=NEW + 1_000)

        old = c.create_run(exps["exp-c"], run_name="old", start_time=OLD).info.run_id
        c.set_terminated(old, "FAILED", end_time=OLD + 1_000)
        late = c.create_run(exps["exp-c"], run_name="late", start_time=OLD + 500).info.run_id
        c.set_terminated(late, "KILLED", end_time=NEW + 5)
        new = c.create_run(exps["exp-c"], run_name="new", start_time=NEW).info.run_id
        deleted = c.create_run(exps["exp-c"], run_name="deleted", start_time=NEW).info.run_id
        c.delete_run(deleted)
        yield Seeded(
            uri,
            exps,
            big,
            parent,
            children,
            old,
            late,
            new,
            deleted,
            logged.model_id,
            proc,
        )
    finally:
        stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def full_plan(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """The whole source exported once by the CLI: the plan's bytes and stderr."""
    out = tmp_path_factory.mktemp("full") / "plan.jsonl"
    done = run_cli(["export", "--tracking-uri", seeded.uri, "-o", str(out)])
    assert done.returncode == 0, done.stderr
    return out.read_bytes(), done.stderr


def export_args(seeded: Seeded, *rest: str) -> list[str]:
    return ["export", "--tracking-uri", seeded.uri, *rest]


# ---- the whole source ---------------------------------------------------------------


def test_every_active_run_is_exported_with_its_data(
    seeded: Seeded, full_plan: tuple[bytes, str]
) -> None:
    data, stderr = full_plan
    lines = check_plan(data)
    by_run = runs_of(lines)
    names = [line["experiment"] for line in created(lines)]
    # experiments oldest first (Default has no runs); runs by start time, parents first
    assert names == ["exp-a", "exp-b", "exp-b", "exp-b", "exp-c", "exp-c", "exp-c"]
    assert seeded.deleted not in by_run  # deleted runs and experiments are not exported
    assert "exp-deleted" not in names

    big = by_run[seeded.big]
    assert [line["op"] for line in big] == [
        "create-run",
        "log-batch",
        "log-batch",
        "log-batch",
        "log-batch",
        "log-inputs",
        "log-model",
        "log-model",
        "update-run",
    ]
    assert big[0] == {
        "op": "create-run",
        "source_run_id": seeded.big,
        "experiment": "exp-a",
        "run_name": "big",
        "start_time": NEW,
        "user": big[0]["user"],
    }
    batches = [line for line in big if line["op"] == "log-batch"]
    assert [len(b["params"]) for b in batches] == [100, 50, 0, 0]  # 150 params: 2 lines
    params = [p for b in batches for p in b["params"]]
    assert params == [{"key": f"p{i:03d}", "value": f"v{i}"} for i in range(150)]
    loss = [m for b in batches for m in b["metrics"] if m["key"] == "loss"]
    assert [(m["step"], m["timestamp"]) for m in loss] == [(i, NEW + i) for i in range(POINTS)]
    assert loss[7]["value"] == 1.0 / 8
    acc = [m for b in batches for m in b["metrics"] if m["key"] == "acc"]
    assert acc == [{"key": "acc", "value": "NaN", "timestamp": NEW, "step": 0}]
    tags = {t["key"]: t["value"] for b in batches for t in b["tags"]}
    assert tags["team"] == "vision" and tags["note"] == "x" * 300
    assert not {"mlflow.runName", "mlflow.user", "mlflow.log-model.history"} & set(tags)

    inputs = big[5]["dataset_inputs"]
    assert inputs == [
        {
            "dataset": {
                "name": "train",
                "digest": "d1g3st",
                "source_type": "s3",
                "source": '{"uri": "s3://b/t"}',
                "schema": '{"cols": []}',
            },
            "tags": [{"key": "mlflow.data.context", "value": "training"}],
        }
    ]
    old_model, new_model = (json.loads(line["model_json"]) for line in big[6:8])
    assert old_model == {
        "artifact_path": "old-model",
        "flavors": {"python_function": {"loader_module": "x"}},
        "utc_time_created": "2023-01-01 00:00:00.000000",
        "run_id": seeded.big,
        "model_uuid": "0123456789abcdef",
    }
    assert new_model["model_uuid"] == seeded.model_id
    assert new_model["artifact_path"] == "new-model"
    assert new_model["run_id"] == seeded.big
    assert big[-1] == {
        "op": "update-run",
        "source_run_id": seeded.big,
        "status": "FINISHED",
        "end_time": NEW + 10_000,
    }

    # the counts, per experiment, against the source's
    assert "experiment 'exp-a' (1): 1 runs exported, the source lists 1" in stderr
    assert "experiment 'exp-b' (2): 3 runs exported, the source lists 3" in stderr
    assert "experiment 'exp-c' (3): 3 runs exported, the source lists 3" in stderr
    assert f"7 runs in 4 experiments, {len(lines)} plan lines written to" in stderr


def test_parents_come_before_their_children(seeded: Seeded, full_plan: tuple[bytes, str]) -> None:
    lines = check_plan(full_plan[0])
    order = [line["source_run_id"] for line in created(lines)]
    first, second = seeded.children
    # the first child started before its parent: it waits for it
    assert order[1:4] == [seeded.parent, first, second]
    parents = {line["source_run_id"]: line.get("parent_source_run_id") for line in created(lines)}
    assert parents[first] == parents[second] == seeded.parent
    assert parents[seeded.parent] is None


def test_the_plan_is_the_same_whatever_the_page_and_window_sizes(
    seeded: Seeded, full_plan: tuple[bytes, str]
) -> None:
    """Small pages (get-history in 4 pages, runs/search in pages of 1) and one run at a
    time give the same bytes as the CLI's defaults: the order is the source's, not the
    reads'."""

    seen: list[ExportProgress] = []

    async def small() -> tuple[bytes, int]:
        async with Transport(mlflow_target(seeded.uri), None, concurrency=1, timeout=30) as t:
            source = Source(t, make_gate(None, True), RetryPolicy())
            out = io.BytesIO()
            sel = Selection(("exp-a", "exp-b", "exp-c"))
            await export(
                source,
                out,
                sel,
                concurrency=1,
                history_page=700,
                search_page=1,
                on_progress=seen.append,
            )
            return out.getvalue(), source.counts.requests

    data, requests = anyio.run(small)
    assert data == full_plan[0]
    # 4 get-history pages for loss; runs/search paged 1 by 1, twice (listed, then counted)
    assert requests >= 4 + 2 * 7
    assert [(p.experiment, p.experiment_done, p.experiment_runs, p.runs) for p in seen] == [
        ("exp-a", 1, 1, 1),
        ("exp-b", 1, 3, 2),
        ("exp-b", 2, 3, 3),
        ("exp-b", 3, 3, 4),
        ("exp-c", 1, 3, 5),
        ("exp-c", 2, 3, 6),
        ("exp-c", 3, 3, 7),
    ]


def test_filters_select_experiments_runs_and_times(seeded: Seeded, tmp_path: Path) -> None:
    def plan(*flags: str) -> list[dict[str, Any]]:
        out = tmp_path / "p.jsonl"
        done = run_cli(export_args(seeded, "-o", str(out), *flags))
        assert done.returncode == 0, done.stderr
        return created(check_plan(out.read_bytes()))

    by_name_and_id = plan("--experiment", "exp-c", "--experiment", seeded.experiments["exp-a"])
    assert [r["source_run_id"] for r in by_name_and_id] == [
        seeded.old,
        seeded.ended_late,
        seeded.new,
        seeded.big,
    ]  # experiments in the order given
    since = plan("--experiment", "exp-c", "--since", "2023-11-14T22:13:20Z")  # NEW
    assert {r["source_run_id"] for r in since} == {seeded.ended_late, seeded.new}
    assert plan("--since", str(NEW + 1)) == plan("--since", "2023-11-14T22:13:20.001+00:00")
    assert {r["source_run_id"] for r in plan("--since", str(NEW + 1))} == {
        seeded.big,  # ended after it
        seeded.parent,
        *seeded.children,
        seeded.ended_late,
    }

    listed = tmp_path / "ids.txt"
    listed.write_text(f"# two runs\n{seeded.new}\n\n{seeded.old}\n")
    named = plan("--run-ids", str(listed), "--run-id", seeded.new)
    assert [r["source_run_id"] for r in named] == [seeded.old, seeded.new]  # by start time
    # a child named alone brings its parent, first
    child = plan("--run-id", seeded.children[1])
    assert [r["source_run_id"] for r in child] == [seeded.parent, seeded.children[1]]


def test_stdout_and_gzip_hold_the_same_plan(
    seeded: Seeded, full_plan: tuple[bytes, str], tmp_path: Path
) -> None:
    streamed = run_cli(export_args(seeded, "-o", "-"))
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.encode() == full_plan[0]
    packed = tmp_path / "plan.jsonl.gz"
    done = run_cli(export_args(seeded, "-o", str(packed)))
    assert done.returncode == 0, done.stderr
    assert gzip.decompress(packed.read_bytes()) == full_plan[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.jsonl.gz"]  # no partial left
    # a reader of stdout that goes away: said in one line, exit 3
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchlog", *export_args(seeded, "-o", "-")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert b"cannot write the plan (stdout): Broken pipe" in err and b"Traceback" not in err


def test_parent_in_another_experiment_is_exported_once_before_its_child(
    seeded: Seeded, tmp_path: Path
) -> None:
    """MLflow's fluent API puts a nested run in the active experiment, which need not be
    its parent's: the parent is exported just before the child, in its own experiment, and
    not again in its experiment's turn."""
    from mlflow import MlflowClient

    c = MlflowClient(seeded.uri)
    first = c.create_experiment(f"nested-first-{time.time_ns()}")  # exported before exp-p
    home = c.create_experiment(f"nested-home-{time.time_ns()}")
    parent = c.create_run(home, start_time=NEW).info.run_id
    child = c.create_run(first, start_time=NEW, tags={"mlflow.parentRunId": parent}).info.run_id
    out = tmp_path / "p.jsonl"
    done = run_cli(export_args(seeded, "-o", str(out), "--experiment", first, "--experiment", home))
    assert done.returncode == 0, done.stderr
    runs = created(check_plan(out.read_bytes()))
    assert [(r["source_run_id"], r.get("parent_source_run_id")) for r in runs] == [
        (parent, None),
        (child, parent),
    ]
    assert runs[0]["experiment"].startswith("nested-home-")
    assert "1 runs exported, the source lists 1" in done.stderr
    assert "MISMATCH" not in done.stderr


def test_usage_errors_name_the_flag(seeded: Seeded, tmp_path: Path) -> None:
    out = str(tmp_path / "p.jsonl")
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        both = run_cli(["export"])
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert both.returncode == 2
    assert "--tracking-uri and -o are required" in both.stderr
    for flags, said in (
        (["--run-id", seeded.new, "--experiment", "exp-a"], "without --experiment"),
        (["--since", "yesterday"], "--since 'yesterday': expected an ISO-8601 time"),
        (["--experiment", "no-such"], "--experiment 'no-such': no experiment"),
        (["--experiment", "exp-deleted"], "the experiment is deleted"),
        (["--run-id", "0" * 32], f"--run-id {'0' * 32}: no such run"),
        (["--run-id", "not an id"], "is not a run id"),
    ):
        done = run_cli(export_args(seeded, "-o", out, *flags))
        assert done.returncode == 2, (flags, done.stderr)
        assert said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not os.listdir(tmp_path)  # no plan, no partial file


# ---- an mlruns/ directory, served -------------------------------------------------------

_MAKE_MLRUNS = """
import mlflow, sys
from mlflow import MlflowClient
c = MlflowClient(sys.argv[1])
e = c.create_experiment("from-files")
r = c.create_run(e, run_name="r", start_time=1000).info.run_id
c.log_param(r, "lr", "0.1")
for i in range(3):
    c.log_metric(r, "loss", 1.0 - i / 10, timestamp=2000 + i, step=i)
c.set_tag(r, "t", "v")
c.set_terminated(r, "FINISHED", end_time=3000)
print(r)
"""


def test_an_mlruns_directory_is_exported_by_serving_it(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    made = subprocess.run(
        [sys.executable, "-c", _MAKE_MLRUNS, "file:./mlruns"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.split()[-1]
    port = free_loopback_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "./mlruns"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # uvicorn and a job consumer: stopped as a group
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, server)
        out = tmp_path / "plan.jsonl"
        done = run_cli(["export", "--tracking-uri", uri, "-o", str(out)])
        assert done.returncode == 0, done.stderr
        by_run = runs_of(check_plan(out.read_bytes()))
        assert list(by_run) == [run_id]
        create, batch, update = by_run[run_id]
        assert create["experiment"] == "from-files" and create["start_time"] == 1000
        assert batch["params"] == [{"key": "lr", "value": "0.1"}]
        assert [(m["step"], m["timestamp"], m["value"]) for m in batch["metrics"]] == [
            (0, 2000, 1.0),
            (1, 2001, 0.9),
            (2, 2002, 0.8),
        ]
        assert {"key": "t", "value": "v"} in batch["tags"]
        assert update == {
            "op": "update-run",
            "source_run_id": run_id,
            "status": "FINISHED",
            "end_time": 3000,
        }
    finally:
        _stop_group(server)


def _wait_healthy(uri: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the mlruns server did not start")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ---- fake servers: what a real one will not do on demand ---------------------------------

Handler = Callable[["Seen"], tuple[int, Any, dict[str, str]]]


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


class FakeMlflow:
    """An MLflow-shaped server on 127.0.0.1 answering from ``routes`` (path under
    /api/2.0/mlflow/ -> handler), recording every request."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.seen: list[Seen] = []
        self.delay = 0.0  # seconds before each answer
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeMlflow:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/api/2.0/mlflow/{rel:.*}", self._answer)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen = Seen(request.match_info["rel"], dict(request.query), body, dict(request.headers))
        self.seen.append(seen)
        await asyncio.sleep(self.delay)
        handler = self.routes.get(seen.path)
        if handler is None:
            return web.json_response({"error_code": "ENDPOINT_NOT_FOUND"}, status=404)
        status, doc, headers = handler(seen)
        return web.json_response(doc, status=status, headers=headers)


# 100 kB of tags: the answers of searches are larger than other answers may be
_BULK = [{"key": f"note{i}", "value": "n" * 5_000} for i in range(20)]


def _run(run_id: str, start: int = 1000) -> dict[str, Any]:
    return {
        "info": {
            "run_id": run_id,
            "experiment_id": "1",
            "status": "FINISHED",
            "start_time": start,
            "end_time": start + 1,
            "lifecycle_stage": "active",
        },
        "data": {
            "metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": 0}],
            "tags": _BULK,
        },
    }


def fake_source(overrides: dict[str, Handler] | None = None) -> dict[str, Handler]:
    """One experiment "fx" with one run "r1" and its metric "m"; ``overrides`` replace
    routes."""
    routes: dict[str, Handler] = {
        "experiments/search": lambda s: (
            200,
            {"experiments": [{"experiment_id": "1", "name": "fx", "tags": _BULK}]},
            {},
        ),
        "runs/search": lambda s: (200, {"runs": [_run("r1")]}, {}),
        "runs/get": lambda s: (200, {"run": _run(s.query["run_id"])}, {}),
        "metrics/get-history": lambda s: (
            200,
            {"metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": 0}]},
            {},
        ),
    }
    routes.update(overrides or {})
    return routes


def test_the_source_token_is_sent_and_never_shown(tmp_path: Path) -> None:
    token = "tok-s3cret-123"

    def guarded(inner: Handler) -> Handler:
        def handle(seen: Seen) -> tuple[int, Any, dict[str, str]]:
            if seen.headers.get("Authorization") != f"Bearer {token}":
                return 401, {"error_code": "UNAUTHENTICATED", "message": "no"}, {}
            return inner(seen)

        return handle

    routes = {path: guarded(h) for path, h in fake_source().items()}
    out = tmp_path / "plan.jsonl"
    with FakeMlflow(routes) as fake:
        refused = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
        assert refused.returncode == 3
        assert "refused the credentials (401)" in refused.stderr
        assert "MLFLOW_TRACKING_TOKEN" in refused.stderr
        assert not out.exists()
        os.environ["MLFLOW_TRACKING_TOKEN"] = token
        try:
            done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
        finally:
            del os.environ["MLFLOW_TRACKING_TOKEN"]
    assert done.returncode == 0, done.stderr
    assert token not in done.stderr + refused.stderr
    assert token.encode() not in out.read_bytes()
    assert [line["op"] for line in check_plan(out.read_bytes())] == [
        "create-run",
        "log-batch",
        "update-run",
    ]


def test_credentials_in_the_uri_are_sent_as_basic_auth(tmp_path: Path) -> None:
    with FakeMlflow(fake_source()) as fake:
        uri = fake.url.replace("://", "://alice:p%40ss-w0rd@")
        done = run_cli(["export", "--tracking-uri", uri, "-o", "-", "--log-format", "json"])
    assert done.returncode == 0, done.stderr
    expected = "Basic " + base64.b64encode(b"alice:p@ss-w0rd").decode()
    assert {s.headers.get("Authorization") for s in fake.seen} == {expected}
    assert "p@ss-w0rd" not in done.stderr and "p%40ss-w0rd" not in done.stderr
    assert "p@ss" not in done.stdout


def test_429_and_500_are_retried(tmp_path: Path) -> None:
    Answer = tuple[int, Any, dict[str, str]]
    answers: Iterator[Answer] = iter([(429, {"error_code": "TOO_MANY"}, {"Retry-After": "0"})])
    fails: Iterator[Answer] = iter([(503, {"error_code": "UNAVAILABLE"}, {})])

    def flaky_get(seen: Seen) -> tuple[int, Any, dict[str, str]]:
        return next(answers, None) or (200, {"run": _run(seen.query["run_id"])}, {})

    def flaky_history(seen: Seen) -> tuple[int, Any, dict[str, str]]:
        point = {"key": "m", "value": 1.0, "timestamp": 1, "step": 0}
        return next(fails, None) or (200, {"metrics": [point]}, {})

    out = tmp_path / "plan.jsonl"
    flaky: dict[str, Handler] = {"runs/get": flaky_get, "metrics/get-history": flaky_history}
    with FakeMlflow(fake_source(flaky)) as fake:
        done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
    assert done.returncode == 0, done.stderr
    assert "2 retries, 1 throttled" in done.stderr
    assert len(check_plan(out.read_bytes())) == 3


def test_nothing_listening_stops_at_once(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_loopback_port()}"
    started = time.monotonic()
    done = run_cli(["export", "--tracking-uri", uri, "-o", str(tmp_path / "p.jsonl")])
    assert done.returncode == 3, done.stderr
    assert f"nothing is listening at {uri}" in done.stderr
    assert time.monotonic() - started < 10  # not 8 attempts' back-off (about 30 s)
    assert not os.listdir(tmp_path)


def test_a_page_token_that_repeats_stops_the_export(tmp_path: Path) -> None:
    def stuck(seen: Seen) -> tuple[int, Any, dict[str, str]]:
        point = {"key": "m", "value": 1.0, "timestamp": 1, "step": 0}
        return 200, {"metrics": [point], "next_page_token": "eyJvZmZzZXQiOiAxfQ=="}, {}

    out = tmp_path / "plan.jsonl"
    with FakeMlflow(fake_source({"metrics/get-history": stuck})) as fake:
        done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
        pages = [s for s in fake.seen if s.path == "metrics/get-history"]
    assert done.returncode == 3, done.stderr
    assert "metric 'm' of run r1: the source answered a page token it had already given" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert len(pages) == 2 and all(p.query["max_results"] for p in pages)
    assert not os.listdir(tmp_path)  # no plan, no partial file


def test_kill_or_sigterm_midway_leaves_no_plan_and_a_rerun_writes_it_whole(
    tmp_path: Path,
) -> None:
    runs = [_run(f"r{i}", start=1000 + i) for i in range(6)]
    routes = fake_source({"runs/search": lambda s: (200, {"runs": runs}, {})})
    out = tmp_path / "plan.jsonl"
    args = [sys.executable, "-m", "batchlog", "export", "-o", str(out), "--concurrency", "1"]
    with FakeMlflow(routes) as fake:
        fake.delay = 0.1  # a slow source: the export is stopped part way
        for sig, code in ((signal.SIGKILL, -9), (signal.SIGTERM, 130)):
            proc = subprocess.Popen(
                [*args, "--tracking-uri", fake.url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + 30
            while sum(s.path == "metrics/get-history" for s in fake.seen) < 2:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == code, err
            assert not out.exists()  # never a part of a plan under its name
            fake.seen.clear()
        assert "SIGTERM" in err.decode() and "Traceback" not in err.decode()
        assert not (tmp_path / ".plan.jsonl.partial").exists()  # SIGTERM: cleaned up
        fake.delay = 0.0
        done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
    assert done.returncode == 0, done.stderr
    lines = created(check_plan(out.read_bytes()))
    assert [line["source_run_id"] for line in lines] == [f"r{i}" for i in range(6)]
    assert os.listdir(tmp_path) == ["plan.jsonl"]


def test_an_output_that_is_no_regular_file_is_written_not_replaced(tmp_path: Path) -> None:
    """A FIFO (or a device: /dev/null) named by -o is written to as it is, never renamed
    over: the plan goes to its reader."""
    fifo = tmp_path / "plan.pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with FakeMlflow(fake_source()) as fake:
        done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(fifo)])
    reader.join(30)
    assert done.returncode == 0, done.stderr
    assert fifo.is_fifo() and os.listdir(tmp_path) == ["plan.pipe"]
    assert len(check_plan(got[0])) == 3


def test_one_export_per_output_and_an_error_keeps_the_earlier_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.jsonl"
    out.write_bytes(b"earlier\n")
    first = PlanFile(str(out), io.BytesIO())
    with pytest.raises(ConfigurationError, match="another batchlog export is writing it"):
        PlanFile(str(out), io.BytesIO())
    first.stream.write(b"new\n")
    first.abort()
    assert out.read_bytes() == b"earlier\n"
    second = PlanFile(str(out), io.BytesIO())
    second.stream.write(b"new\n")
    second.commit()
    assert out.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["plan.jsonl"]


def test_a_run_the_listing_missed_is_a_count_mismatch(tmp_path: Path) -> None:
    """The runs listed again after writing hold one the first listing did not (a page
    shifted under the export): exit 3, both counts said, no plan."""
    searches = iter([[_run("r1")]])

    def growing(seen: Seen) -> tuple[int, Any, dict[str, str]]:
        return 200, {"runs": next(searches, [_run("r1"), _run("r0", start=500)])}, {}

    out = tmp_path / "plan.jsonl"
    with FakeMlflow(fake_source({"runs/search": growing})) as fake:
        done = run_cli(["export", "--tracking-uri", fake.url, "-o", str(out)])
    assert done.returncode == 3, done.stderr
    assert "experiment 'fx' (1): 1 runs exported, the source lists 2: MISMATCH" in done.stderr
    assert "not exported: r0" in done.stderr
    assert not os.listdir(tmp_path)


# ---- pieces ---------------------------------------------------------------------------


def test_since_reads_iso_and_epoch_milliseconds() -> None:
    assert parse_since("1700000000000") == NEW
    assert parse_since("2023-11-14T22:13:20Z") == NEW
    assert parse_since("2023-11-15T00:13:20+02:00") == NEW
    assert parse_since("2023-11-14") == NEW - (22 * 3600 + 13 * 60 + 20) * 1000  # UTC
    with pytest.raises(ConfigurationError, match="--since"):
        parse_since("last tuesday")


def test_run_ids_file_names_a_bad_line() -> None:
    assert read_run_ids("f", "# c\n\n a1 \nb2\n") == ["a1", "b2"]
    with pytest.raises(ConfigurationError, match="--run-ids f:2: 'b c' is not a run id"):
        read_run_ids("f", "a1\nb c\n")


def test_a_cycle_of_parents_is_broken_not_looped() -> None:
    listed = {
        "a": _Entry("1", 1, None, "b"),
        "b": _Entry("1", 2, None, "a"),
        "c": _Entry("1", 0, None, "a"),
        "d": _Entry("1", 3, None, "d"),  # its own parent
    }
    order = _parents_first(listed)
    assert sorted(order) == ["a", "b", "c", "d"]
    assert order.index("a") < order.index("b") and order.index("a") < order.index("c")
    assert listed["a"].parent is None and listed["d"].parent is None
    assert listed["b"].parent == listed["c"].parent == "a"  # only the cycle is broken


def test_log_batch_lines_respect_every_limit() -> None:
    spool = io.BytesIO()
    writer = _RunWriter("r1", spool)
    batch = _Batch(writer)
    for i in range(250):
        batch.add("params", {"key": f"p{i}", "value": "v" * 5000})  # 1.25 MB of params
    for i in range(150):
        batch.add("tags", {"key": f"t{i}", "value": "t"})
    batch.add("tags", {"key": "huge", "value": "x" * 9000})  # MLflow would truncate it
    for i in range(2500):
        batch.add("metrics", {"key": "m", "value": i, "timestamp": i, "step": i})
    batch.flush()
    raw = spool.getvalue()
    lines = [orjson.loads(line) for line in raw.splitlines()]
    for line, data in zip(lines, raw.splitlines(), strict=True):
        assert len(data) <= MAX_LINE_BYTES
        assert len(line["params"]) <= 100 and len(line["tags"]) <= 100
        assert len(line["params"]) + len(line["metrics"]) + len(line["tags"]) <= 1000
    assert sum(len(line["params"]) for line in lines) == 250
    assert sum(len(line["metrics"]) for line in lines) == 2500
    huge = [line for line in lines if any(t["key"] == "huge" for t in line["tags"])]
    assert len(huge) == 1 and len(huge[0]["tags"]) == 1 and not huge[0]["params"]
    assert writer.lines == len(lines)

"""Calls still in flight when batchlog dies land on MLflow later: the resume must not log twice.

A real `mlflow server` sits behind tests/proxy.py's holding proxy, which forwards every
write 2.5-3.5 s after it read it (reads at once), even when the client has died meanwhile (as a load
balancer does). batchlog is killed with SIGKILL while log-model requests are held there;
the same command is run again at once. MLflow has no retry tokens and appends a model to
the run's ``mlflow.log-model.history`` tag on every call, so a resume that reads a run back
before the earlier attempt landed, and sends again, leaves the model there twice.

Read back directly from the server (not through the proxy), after the proxy has delivered
everything it held: each run must have exactly its one model, each dataset must be there,
and nothing may be in the dead letter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from mlflow import MlflowClient

from batchlog.emulator import EmulatorConfig, EmulatorThread
from tests.conftest import start_mlflow_server, stop_mlflow_server, write_manifest
from tests.proxy import HoldingProxy

RUNS = 40
# batchlog's --timeout: longer than the proxy's longest hold, with room for a loaded
# machine's mlflow server to apply what the proxy delivers (5 s gave a duplicate under load)
TIMEOUT_S = 8.0
# The proxy holds every write 2.5 to 3.5 s (uniformly): within one attempt's timeout even
# with the server's own queue added; reads pass at once (a write path queued behind a busy
# primary). Calls of the killed process then land after a resume's read-back of their run,
# unless the resume waits until they can no longer land (first sent + the attempt timeout).
HOLD_S = 2.5
HOLD_JITTER_S = 1.0
READ_HOLD_S = 0.0
# kill once this share of the log-model calls is held in the proxy
KILL_WHEN_HELD = 4


@dataclass
class Server:
    uri: str
    workers: int


@pytest.fixture(
    scope="module",
    params=[1, 2],
    ids=["1-worker", "2-workers"],
)
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Server]:
    """One worker; or two (two writes to one run may then race each other on the server's
    read-modify-write of the history tag)."""
    workers = int(request.param)
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp(f"mlflow{workers}"), workers)
    try:
        yield Server(uri, workers)
    finally:
        stop_mlflow_server(proc)


def _model(run: str, i: int) -> dict[str, Any]:
    return {
        "op": "log-model",
        "run_id": run,
        "model_json": {
            "artifact_path": f"model-{i}",
            "flavors": {"python_function": {"python_version": "3"}},
            "utc_time_created": f"2024-02-01 00:00:00.{i:06d}",
            "run_id": run,
        },
    }


def _dataset(run: str, i: int) -> dict[str, Any]:
    return {
        "run_id": run,
        "datasets": [
            {
                "dataset": {
                    "name": f"inflight-{i}",
                    "digest": f"{i:08x}",
                    "source": f"s3://b/inflight-{i}.parquet",
                    "source_type": "s3",
                },
                "tags": [{"key": "mlflow.data.context", "value": "training"}],
            }
        ],
    }


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCI_", "MLFLOW_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "batchlog", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill a batchlog process the test left running (a failed wait), and collect it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _models(client: MlflowClient, run: str) -> list[tuple[str, str]]:
    tags = client.get_run(run).data.tags
    history = json.loads(tags.get("mlflow.log-model.history", "[]"))
    return [(str(m.get("artifact_path")), str(m.get("utc_time_created"))) for m in history]


def test_resume_after_kill_with_calls_held_in_a_proxy_logs_each_model_once(
    tmp_path: Path, mlflow_server: Server
) -> None:
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"inflight-{mlflow_server.workers}-{time.time_ns()}")
    runs = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
    records: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        if i % 4 == 0:
            records.append(_dataset(run, i))
        records.append(_model(run, i))
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    expected_models = {
        r["run_id"]: (r["model_json"]["artifact_path"], r["model_json"]["utc_time_created"])
        for r in records
        if r.get("op") == "log-model"
    }
    expected_datasets = {
        (r["run_id"], r["datasets"][0]["dataset"]["name"]) for r in records if "datasets" in r
    }
    dead = tmp_path / "dead.jsonl"

    upstream_port = int(mlflow_server.uri.rsplit(":", 1)[1])
    proxy = HoldingProxy(
        "127.0.0.1", upstream_port, delay=HOLD_S, jitter=HOLD_JITTER_S, read_delay=READ_HOLD_S
    )
    with contextlib.ExitStack() as cleanup, proxy:
        args = [
            "upload",
            str(manifest),
            "--target",
            "mlflow",
            "--tracking-uri",
            proxy.url,
            "--timeout",
            str(TIMEOUT_S),
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--dead-letter",
            str(dead),
        ]
        first = _start(args)
        cleanup.callback(_reap, first)
        # kill while log-model calls are held: they reach MLflow after the client is gone
        want_held = len(expected_models) // KILL_WHEN_HELD
        deadline = time.monotonic() + 60
        while proxy.holding("/runs/log-model") < want_held:
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, f"never {want_held} held: {proxy.stats()}"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()

        second = _start(args)  # at once, as a user or a scheduler would
        cleanup.callback(_reap, second)
        _, err = second.communicate(timeout=180)
        assert proxy.wait_idle(30), proxy.stats()
        stats = proxy.stats()
    # the scenario happened: calls of the killed process landed after it was gone
    assert stats["delivered_after_client_left"] > 0, stats

    problems: list[str] = []
    if second.returncode != 0:
        problems.append(f"exit code {second.returncode}: {err.decode()[-2000:]}")
    dead_lines = dead.read_bytes().splitlines() if dead.exists() else []
    for line in dead_lines:
        doc = orjson.loads(line)
        problems.append(f"dead-lettered {doc.get('run_id')}: {doc.get('_error')}")
    duplicated = 0
    for run, model in expected_models.items():
        got = Counter(_models(client, run))
        if got != Counter({model: 1}):
            duplicated += max(0, got[model] - 1)
            problems.append(f"run {run}: expected {model} once, history has {dict(got)}")
    for run, name in sorted(expected_datasets):
        inputs = client.get_run(run).inputs
        names = {d.dataset.name for d in (inputs.dataset_inputs if inputs else [])}
        if name not in names:
            problems.append(f"run {run}: dataset {name} missing")
    assert not problems, (
        f"{len(problems)} problems, {duplicated} duplicated models ({mlflow_server.workers} "
        f"worker(s); proxy {stats}):\n" + "\n".join(problems[:40])
    )


def _post(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    return sock


def test_the_proxy_finishes_a_call_whose_client_died() -> None:
    """The proxy's own contract, against the emulator: a request whose client closed while
    it was held still reaches the upstream; one whose client waits gets the answer."""
    path = "/20260430/aiDataPlatforms/p/workspaces/w/mlops/api/2.0/mlflow/runs/log-model"
    bodies = [
        orjson.dumps(
            {
                "run_id": "proxyrun",
                "model_json": orjson.dumps(_model("proxyrun", i)["model_json"]).decode(),
            }
        )
        for i in range(2)
    ]
    with EmulatorThread(EmulatorConfig()) as emu:
        port = int(emu.url.rsplit(":", 1)[1])
        with HoldingProxy("127.0.0.1", port, delay=0.5) as proxy:
            gone = _post(proxy.port, path, bodies[0])
            deadline = time.monotonic() + 10
            while proxy.holding() < 1:
                assert time.monotonic() < deadline, proxy.stats()
                time.sleep(0.01)
            gone.close()  # the client dies while its request is held
            with _post(proxy.port, path, bodies[1]) as waiting, waiting.makefile("rb") as f:
                answer = f.readline()
            assert proxy.wait_idle(10), proxy.stats()
            deadline = time.monotonic() + 10  # the proxy counts a relay after it wrote it
            while proxy.stats()["relayed"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = proxy.stats()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert emu.state.applied == len(bodies)
    assert stats["delivered_after_client_left"] == 1 and stats["relayed"] == 1, stats

"""The MLflow target against a real `mlflow server` (sqlite, loopback), read back with MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from mlflow import MlflowClient

from batchlog.journal import read_checkpoint
from tests.conftest import run_cli, start_mlflow_server, stop_mlflow_server, write_manifest


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_mlflow_server(proc)


def new_runs(uri: str, n: int) -> list[str]:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"batchlog-{time.time_ns()}")
    return [client.create_run(exp).info.run_id for _ in range(n)]


def dataset(run: str, i: int) -> dict[str, Any]:
    return {
        "run_id": run,
        "datasets": [
            {
                "dataset": {
                    "name": f"ds-{i}",
                    "digest": f"{i:08x}",
                    "source": f"s3://b/{i}.parquet",
                    "source_type": "s3",
                    "schema": '{"mlflow_colspec": []}',
                },
                "tags": [{"key": "mlflow.data.context", "value": "training"}],
            }
        ],
    }


def model(run: str, i: int) -> dict[str, Any]:
    return {
        "op": "log-model",
        "run_id": run,
        "model_json": {
            "artifact_path": f"model-{i}",
            "flavors": {"python_function": {"python_version": "3"}},
            "utc_time_created": f"2024-01-01 00:00:{i % 60:02d}.{i:06d}",
            "run_id": run,
        },
    }


def mlflow_args(uri: str, *rest: str) -> list[str]:
    return ["upload", "--target", "mlflow", "--tracking-uri", uri, *rest]


def history(client: MlflowClient, run: str) -> list[dict[str, Any]]:
    tags = client.get_run(run).data.tags
    models = json.loads(tags.get("mlflow.log-model.history", "[]"))
    assert isinstance(models, list)
    return models


def test_datasets_and_models_land_exactly_as_in_the_manifest(
    tmp_path: Path, mlflow_uri: str
) -> None:
    runs = new_runs(mlflow_uri, 4)
    records: list[dict[str, Any]] = []
    for r, run in enumerate(runs):
        records += [dataset(run, r * 10 + j) for j in range(5)]  # merged into one request
        records += [model(run, r * 10 + j) for j in range(2)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli([*mlflow_args(mlflow_uri, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    assert orjson.loads((tmp_path / "r.json").read_bytes())["requests"] == 4 + 8

    client = MlflowClient(mlflow_uri)
    for r, run in enumerate(runs):
        got = client.get_run(run)
        inputs = {
            (
                d.dataset.name,
                d.dataset.digest,
                d.dataset.source,
                d.dataset.source_type,
                tuple((t.key, t.value) for t in d.tags),
            )
            for d in got.inputs.dataset_inputs
        }
        assert inputs == {
            (
                f"ds-{i}",
                f"{i:08x}",
                f"s3://b/{i}.parquet",
                "s3",
                (("mlflow.data.context", "training"),),
            )
            for i in range(r * 10, r * 10 + 5)
        }
        models = history(client, run)
        assert sorted(m["artifact_path"] for m in models) == [
            f"model-{r * 10}",
            f"model-{r * 10 + 1}",
        ]

    ok = run_cli(["verify", "--target", "mlflow", "--tracking-uri", mlflow_uri, str(manifest)])
    assert ok.returncode == 0, ok.stderr
    assert "28 on the server, 0 missing" in ok.stderr

    extra = write_manifest(
        tmp_path / "more.jsonl", [*records, dataset(runs[0], 999), model(runs[1], 998)]
    )
    missing = run_cli(["verify", "--target", "mlflow", "--tracking-uri", mlflow_uri, str(extra)])
    assert missing.returncode == 1
    assert f"{extra}:29: datasets not logged: ds-999" in missing.stdout
    assert f"{extra}:30: model model-998" in missing.stdout


def test_unknown_run_goes_to_the_dead_letter(tmp_path: Path, mlflow_uri: str) -> None:
    runs = new_runs(mlflow_uri, 2)
    records = [dataset(runs[0], 1), model(runs[0], 1), dataset("0" * 32, 2), dataset(runs[1], 3)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli(mlflow_args(mlflow_uri, str(manifest)))
    assert out.returncode == 1, out.stderr
    dead = [orjson.loads(x) for x in (tmp_path / "m.dead-letter.jsonl").read_bytes().splitlines()]
    assert [d["run_id"] for d in dead] == ["0" * 32]
    assert dead[0]["_error"]["code"] == "RESOURCE_DOES_NOT_EXIST"
    assert len(MlflowClient(mlflow_uri).get_run(runs[1]).inputs.dataset_inputs) == 1


def test_kill_midway_and_resume_logs_no_model_twice(tmp_path: Path, mlflow_uri: str) -> None:
    runs = new_runs(mlflow_uri, 100)
    records = [model(run, r * 10 + j) for r, run in enumerate(runs) for j in range(4)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    # a resume reads an in-doubt call back once its attempt can no longer land: a short
    # attempt timeout keeps that wait short here
    args = [*mlflow_args(mlflow_uri, str(manifest)), "--concurrency", "16", "--timeout", "5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCI_", "MLFLOW_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchlog", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = tmp_path / "m.batchlog-checkpoint"
    deadline = time.monotonic() + 60
    while True:  # kill once some models are journaled and others are in flight
        if ckpt.exists() and read_checkpoint(str(ckpt))[1].finished >= 60:
            break
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    _, point = read_checkpoint(str(ckpt))
    assert point.finished < len(records)
    assert point.doubt  # calls were in flight: the resume reads their runs back first

    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    client = MlflowClient(mlflow_uri)
    for r, run in enumerate(runs):
        logged = sorted(m["artifact_path"] for m in history(client, run))
        assert logged == [f"model-{r * 10 + j}" for j in range(4)], (run, logged)
    ok = run_cli(["verify", "--target", "mlflow", "--tracking-uri", mlflow_uri, str(manifest)])
    assert ok.returncode == 0, ok.stdout


def test_many_unknown_runs_reach_the_dead_letter_in_mlflow_terms(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """More unknown runs than the systemic threshold: each is the record's own failure
    (MLflow says RESOURCE_DOES_NOT_EXIST), never a stop blaming an OCI workspace."""
    runs = new_runs(mlflow_uri, 1)
    unknown = [dataset(f"{i:032x}", i) for i in range(12)]
    manifest = write_manifest(tmp_path / "m.jsonl", [*unknown, dataset(runs[0], 99)])
    out = run_cli([*mlflow_args(mlflow_uri, str(manifest)), "--concurrency", "4"])
    assert out.returncode == 1, out.stderr
    dead = [orjson.loads(x) for x in (tmp_path / "m.dead-letter.jsonl").read_bytes().splitlines()]
    assert sorted(d["run_id"] for d in dead) == sorted(r["run_id"] for r in unknown)
    assert {d["_error"]["code"] for d in dead} == {"RESOURCE_DOES_NOT_EXIST"}
    for word in ("platform", "workspace", "retry token", "OCI"):
        assert word not in out.stderr, out.stderr


def test_a_tracking_uri_that_is_not_mlflow_stops_in_mlflow_terms(
    tmp_path: Path, mlflow_uri: str
) -> None:
    runs = new_runs(mlflow_uri, 10)
    manifest = write_manifest(tmp_path / "m.jsonl", [dataset(run, i) for i, run in enumerate(runs)])
    out = run_cli(mlflow_args(mlflow_uri + "/not-mlflow", str(manifest)))
    assert out.returncode == 3, out.stderr
    assert "does not seem to point at an MLflow server" in out.stderr
    assert "platform" not in out.stderr and "workspace" not in out.stderr
    assert not (tmp_path / "m.dead-letter.jsonl").exists()


def test_a_model_mlflow_always_refuses_is_dead_lettered_once_confirmed_absent(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """MLflow answers 500 to this model every time; each 500 leaves it in doubt. Out of
    attempts, it is read back once the last attempt can no longer land: absent, so it is
    the record's failure (exit 1), not a job stuck at exit 3 on every rerun."""
    runs = new_runs(mlflow_uri, 1)
    bad = model(runs[0], 1)
    bad["model_json"]["signature"] = {"inputs": "garbage{"}
    manifest = write_manifest(tmp_path / "m.jsonl", [bad])
    args = [*mlflow_args(mlflow_uri, str(manifest)), "--timeout", "1", "--max-attempts", "2"]
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    dead = [orjson.loads(x) for x in (tmp_path / "m.dead-letter.jsonl").read_bytes().splitlines()]
    assert len(dead) == 1 and dead[0]["_error"]["status"] == 500
    assert "may have been applied" not in dead[0]["_error"]["message"]
    assert history(MlflowClient(mlflow_uri), runs[0]) == []


def test_credentials_in_the_tracking_uri_reach_mlflow_and_are_never_kept(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """`http://user:password@host` works as with MLflow's client (basic auth, the password
    percent-decoded); the checkpoint, the messages and `status` name the server without it."""
    runs = new_runs(mlflow_uri, 1)
    manifest = write_manifest(tmp_path / "m.jsonl", [dataset(runs[0], 1), model(runs[0], 2)])
    uri = mlflow_uri.replace("http://", "http://alice:pw-SECRET%2F1@")
    out = run_cli(mlflow_args(uri, str(manifest), "-v"))
    assert out.returncode == 0, out.stderr
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    assert read_checkpoint(str(checkpoint))[0]["target"] == f"mlflow/{mlflow_uri}"
    ok = run_cli(["verify", "--target", "mlflow", "--tracking-uri", uri, str(manifest)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shown = run_cli(["status", str(checkpoint)])
    assert f"mlflow/{mlflow_uri}" in shown.stdout
    for text in (out.stdout, out.stderr, ok.stdout, ok.stderr, shown.stdout, shown.stderr):
        assert "SECRET" not in text and "alice" not in text
    assert b"SECRET" not in checkpoint.read_bytes() and b"alice" not in checkpoint.read_bytes()
    assert [m["artifact_path"] for m in history(MlflowClient(mlflow_uri), runs[0])] == ["model-2"]

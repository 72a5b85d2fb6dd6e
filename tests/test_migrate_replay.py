"""Calls a target would apply twice (issue 11, hostile findings 2 and 4), through real HTTP:

- a run given twice in one job (``cat plan plan``, a sync appending a run exported again):
  its repeated log-model lines are read back before they are sent, on every target, as a
  hand-written manifest's repeated line is;
- an MLflow file store (``mlflow server --backend-store-uri ./mlruns``) keeps every metric
  point it is sent, replays included: a log-batch of a run found on the target (made by an
  earlier upload), in doubt, or repeated, is read back and only what is missing is sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from batchlog.emulator import EmulatorThread
from batchlog.verify_compare import metric_value
from tests.conftest import (
    Oci,
    free_loopback_port,
    model_record,
    run_cli,
    start_mlflow_server,
    stop_mlflow_server,
    upload_args,
    write_manifest,
)
from tests.test_export import _wait_healthy
from tests.test_migrate import (
    T0,
    _HoldWrites,
    _kill_when_held,
    assert_landed,
    assert_on_mlflow,
    batch,
    create,
    dataset,
    emulator_state,
    mlflow_args,
    model,
    nested_plan,
    point,
    prefixed,
    update,
)

StartEmulator = Callable[..., EmulatorThread]


@pytest.fixture(scope="module")
def sql_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-sql"))
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def files_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow server over a file store (./mlruns), which keeps replayed metric points."""
    root = tmp_path_factory.mktemp("mlflow-files")
    port = free_loopback_port()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "./mlruns"),
                *("--default-artifact-root", str(root / "artifacts")),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # uvicorn and a job consumer: stopped as a group
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc)
        yield uri
    finally:
        stop_mlflow_server(proc)


def metric_plan(prefix: str) -> list[dict[str, Any]]:
    """nested_plan plus a run with a long history over several log-batch lines."""
    plan = prefixed(nested_plan(), prefix)
    s = f"{prefix}srcLong"
    plan.append(create(s, f"{prefix}exp-a", run_name="long", start_time=T0))
    for b in range(3):
        metrics = [point("loss", 1 / (1 + i), T0 + i, i) for i in range(b * 400, b * 400 + 400)]
        metrics += [point("acc", i / 1200, T0 + i, i) for i in range(b * 400, b * 400 + 10)]
        plan.append(batch(s, metrics=metrics, params=[{"key": f"b{b}", "value": "x"}]))
    plan.append(model(s, 7))
    plan.append(update(s, "FINISHED", T0 + 50_000))
    return plan


def concatenated(tmp_path: Path, plan: list[dict[str, Any]]) -> Path:
    """``cat plan plan > p2``."""
    once = write_manifest(tmp_path / "plan.jsonl", plan)
    twice = tmp_path / "p2.jsonl"
    twice.write_bytes(once.read_bytes() * 2)
    return twice


def lands_with_nothing_failed(out: subprocess.CompletedProcess[str], p2: Path) -> None:
    """The upload of ``cat plan plan``: everything lands once, and each run's second
    create-run, the same as its first, stands for it: nothing fails (found by review: each
    was rejected, exit 1)."""
    assert out.returncode == 0, out.stderr
    assert not p2.with_name("p2.dead-letter.jsonl").exists(), out.stderr


def verify(plan: Path, uri: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["verify", str(plan), "--target", "mlflow", "--tracking-uri", uri])


def histories(client: MlflowClient, plan: list[dict[str, Any]]) -> dict[str, Counter[Any]]:
    """Source run -> Counter of (key, step, timestamp, value) on the target, every point as
    often as the server holds it (a file store keeps duplicates)."""
    out: dict[str, Counter[Any]] = {}
    keys: dict[str, set[str]] = {}
    for line in plan:
        if line["op"] == "log-batch":
            keys.setdefault(line["source_run_id"], set()).update(
                m["key"] for m in line.get("metrics", [])
            )
    for line in plan:
        if line["op"] != "create-run":
            continue
        s = line["source_run_id"]
        exp = client.get_experiment_by_name(line["experiment"])
        assert exp is not None
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`batchlog.source_run_id` = '{s}'", max_results=5
        )
        assert len(runs) == 1, (s, len(runs))
        got: Counter[Any] = Counter()
        for key in keys.get(s, ()):
            for m in client.get_metric_history(runs[0].info.run_id, key):
                got[(m.key, m.step, m.timestamp, metric_value(m.value))] += 1
        out[s] = got
    return out


def planned(plan: list[dict[str, Any]]) -> dict[str, Counter[Any]]:
    out: dict[str, Counter[Any]] = {}
    for line in plan:
        s = line["source_run_id"]
        if line["op"] == "create-run":
            out[s] = Counter()
        elif line["op"] == "log-batch":
            for m in line.get("metrics", []):
                out[s][(m["key"], m["step"], m["timestamp"], metric_value(m["value"]))] = 1
    return out


def exported_twice(
    s: str, e: str, later_name: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run as exported while it ran, then again once it ended (more points, the same
    model and one more, its final status; ``later_name``: its name by then)."""
    first = [
        create(s, e, run_name="r", start_time=T0),
        batch(s, metrics=[point("m", i, T0 + i, i) for i in range(5)]),
        model(s, 1),
        update(s, "RUNNING"),
    ]
    second = [
        create(s, e, run_name=later_name, start_time=T0),
        batch(s, metrics=[point("m", i, T0 + i, i) for i in range(8)]),
        model(s, 1),
        model(s, 2),
        update(s, "FINISHED", T0 + 100),
    ]
    return first, second


# ---- 2. a run given twice in one job ------------------------------------------------------


def test_mlflow_a_plan_given_twice_logs_every_model_once(tmp_path: Path, sql_uri: str) -> None:
    client = MlflowClient(sql_uri)
    plan = prefixed(nested_plan(), f"twice{time.time_ns()}-")
    p2 = concatenated(tmp_path, plan)
    out = run_cli(mlflow_args(sql_uri, p2))
    lands_with_nothing_failed(out, p2)
    assert_on_mlflow(client, plan)  # the history tag read back: each model once
    checked = verify(tmp_path / "plan.jsonl", sql_uri)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = verify(p2, sql_uri)  # the manifest uploaded: each repeat stands for its first
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_mlflow_a_run_appended_again_after_it_ended_logs_its_models_once(
    tmp_path: Path, sql_uri: str
) -> None:
    """A nightly sync appending a run exported again once it ended: its create-run, its
    data (now more of it), the same model and one more, its final status."""
    client = MlflowClient(sql_uri)
    p = f"again{time.time_ns()}-"
    s, e = f"{p}run", f"{p}exp"
    first, second = exported_twice(s, e, "r")
    whole = write_manifest(tmp_path / "sync.jsonl", first + second)
    out = run_cli(mlflow_args(sql_uri, whole))
    assert out.returncode in (0, 1), out.stderr
    merged = [second[0], second[1], first[2], second[3], second[4]]
    write_manifest(tmp_path / "merged.jsonl", merged)
    assert_on_mlflow(client, prefixed(merged, ""))
    checked = verify(tmp_path / "merged.jsonl", sql_uri)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_file_store_a_nightly_sync_appending_a_run_again_doubles_nothing(
    tmp_path: Path, files_uri: str
) -> None:
    """Found by review: a nightly sync appends to the same manifest and runs the same
    command (the same checkpoint). The run exported again when it ended was read back only
    within one invocation: after a resume its points went again (twice on a file store),
    and its model was logged twice, exit 0; a rename was lost."""
    client = MlflowClient(files_uri)
    p = f"night{time.time_ns()}-"
    s, e = f"{p}run", f"{p}exp"
    first, second = exported_twice(s, e, "r2")  # renamed on the source since
    manifest = write_manifest(tmp_path / "sync.jsonl", first)
    out = run_cli(mlflow_args(files_uri, manifest))
    assert out.returncode == 0, out.stderr
    write_manifest(tmp_path / "sync.jsonl", first + second)  # the next night's export
    out = run_cli(mlflow_args(files_uri, manifest))
    assert out.returncode == 0, out.stderr
    merged = [second[0], second[1], first[2], second[3], second[4]]
    assert histories(client, merged) == planned(merged)
    write_manifest(tmp_path / "merged.jsonl", merged)
    assert_on_mlflow(client, prefixed(merged, ""))


def test_mlflow_the_same_hand_written_model_line_twice_logs_it_once(
    tmp_path: Path, sql_uri: str
) -> None:
    client = MlflowClient(sql_uri)
    exp = client.create_experiment(f"hand{time.time_ns()}")
    run_id = client.create_run(exp).info.run_id
    line = model_record(run_id, 1)
    manifest = write_manifest(tmp_path / "m.jsonl", [line, model_record(run_id, 2), line])
    out = run_cli(mlflow_args(sql_uri, manifest))
    assert out.returncode == 0, out.stderr
    history = json.loads(client.get_run(run_id).data.tags["mlflow.log-model.history"])
    assert sorted(m["artifact_path"] for m in history) == ["model1", "model2"]


def test_emulator_a_plan_given_twice_lands_once_even_without_retry_tokens(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repeated lines carry the same retry token; with the server honouring none (as
    a day later), they are still read back first and not applied twice."""
    emu = emulator()
    emu.config.idempotency = False
    plan = nested_plan()
    p2 = concatenated(tmp_path, plan)
    out = run_cli(upload_args(oci, emu, str(p2)))
    lands_with_nothing_failed(out, p2)
    counts = emu.state.applied_counts()
    # an update-run sets a state: the same one twice leaves it as once (replay-safe, sent)
    assert {k[0] for k, v in counts.items() if v > 1} <= {"update-run"}, counts
    once = Counter({k: 1 for k in counts})
    monkeypatch.setattr(emu.state, "applied_counts", lambda: once)
    assert_landed(emu, plan)  # every run once, as the plan says


# ---- 4. a file-store target keeps every point it is sent -------------------------------------


def test_file_store_a_second_upload_with_a_fresh_checkpoint_doubles_no_point(
    tmp_path: Path, files_uri: str
) -> None:
    client = MlflowClient(files_uri)
    plan = metric_plan(f"fresh{time.time_ns()}-")
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = mlflow_args(files_uri, manifest)
    report = tmp_path / "report.json"
    assert run_cli([*args, "--report", str(report)]).returncode == 0
    assert json.loads(report.read_text())["read_backs"] == 0  # a first upload reads nothing
    want = planned(plan)
    assert histories(client, plan) == want
    again = run_cli([*args, "--restart", "--report", str(report)])
    assert again.returncode == 0, again.stderr
    assert json.loads(report.read_text())["read_backs"] > 0
    other = run_cli([*args, "--checkpoint", str(tmp_path / "other.ckpt")])
    assert other.returncode == 0, other.stderr
    assert histories(client, plan) == want
    assert_on_mlflow(client, plan)
    checked = verify(manifest, files_uri)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_file_store_a_plan_given_twice_doubles_no_point(tmp_path: Path, files_uri: str) -> None:
    client = MlflowClient(files_uri)
    plan = metric_plan(f"cat{time.time_ns()}-")
    p2 = concatenated(tmp_path, plan)
    out = run_cli(mlflow_args(files_uri, p2))
    lands_with_nothing_failed(out, p2)
    assert histories(client, plan) == planned(plan)
    checked = verify(tmp_path / "plan.jsonl", files_uri)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_file_store_a_log_batch_in_doubt_at_a_kill_is_not_applied_twice(
    tmp_path: Path, files_uri: str
) -> None:
    """Killed while log-batch calls are held (delivered after the client died): the resume
    reads the points back and sends only those missing."""
    client = MlflowClient(files_uri)
    p = f"kill{time.time_ns()}-"
    plan: list[dict[str, Any]] = []
    for r in range(3):  # every log-batch carries points: any held one would double them
        s = f"{p}run{r}"
        plan.append(create(s, f"{p}exp", run_name=f"r{r}", start_time=T0))
        for b in range(2):
            steps = range(b * 50, b * 50 + 50)
            plan.append(batch(s, metrics=[point("loss", r + i / 100, T0 + i, i) for i in steps]))
        plan.append(dataset(s, f"{p}ds{r}"))
        plan.append(update(s, "FINISHED", T0 + 1_000))
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(files_uri.rsplit(":", 1)[1])
    with _HoldWrites(port, (b"/runs/log-batch ",), hold=2.0) as proxy:
        args = mlflow_args(proxy.url, manifest, "--timeout", "3")
        _kill_when_held(args, proxy, "/runs/log-batch", 2)
        out = run_cli(args)
        assert out.returncode == 0, out.stderr
        assert proxy.wait_idle(10)
        assert proxy.stats()["delivered_after_client_left"] >= 2, proxy.stats()
    assert histories(client, plan) == planned(plan)
    checked = verify(manifest, files_uri)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_emulator_a_found_runs_log_batch_sends_only_the_points_it_lacks(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A sync a day later (retry tokens forgotten): the run exported again has more points
    and params; only those the target lacks go, signed with their own body and token."""
    emu = emulator()
    s, e = "syncrun", "sync-exp"
    first = [
        create(s, e, run_name="r", start_time=T0),
        batch(s, params=[{"key": "a", "value": "1"}], metrics=[point("m", 1, T0, 0)]),
        update(s, "RUNNING"),
    ]
    later = [
        create(s, e, run_name="r", start_time=T0),
        batch(
            s,
            params=[{"key": "a", "value": "1"}, {"key": "b", "value": "2"}],
            metrics=[point("m", 1, T0, 0), point("m", 2, T0 + 1, 1)],
            tags=[{"key": "t", "value": "v"}],
        ),
        update(s, "FINISHED", T0 + 5),
    ]
    assert (
        run_cli(upload_args(oci, emu, str(write_manifest(tmp_path / "a.jsonl", first)))).returncode
        == 0
    )
    emu.config.idempotency = False
    report = tmp_path / "report.json"
    out = run_cli(
        [
            *upload_args(oci, emu, str(write_manifest(tmp_path / "b.jsonl", later))),
            "--report",
            str(report),
        ]
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["read_backs"] == 1
    counts = emu.state.applied_counts()
    assert {k[0] for k, v in counts.items() if v > 1} <= {"update-run"}, counts
    run = next(
        r for r in emulator_state(emu)["runs"] if r["tags"].get("batchlog.source_run_id") == s
    )
    assert run["params"] == {"a": "1", "b": "2"}
    assert sorted((m["step"], m["value"]) for m in run["metrics"]) == [(0, 1.0), (1, 2.0)]
    assert run["info"]["status"] == "FINISHED"

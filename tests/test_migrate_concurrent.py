"""Plans on an open-source MLflow target (no retry tokens) under hostile conditions: two
uploads of one plan at the same time, a source experiment or run renamed between two
syncs, and the SQL store's pool running out ("QueuePool limit ... reached", answered 400).

One target `mlflow server` serves the module (a second one, the source, only the rename
test); runs are told apart by a prefix made from the clock.
"""

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
from multidict import CIMultiDict

from batchlog.retry import RetryPolicy
from batchlog.transport import _answer
from tests.conftest import run_cli, start_mlflow_server, stop_mlflow_server, write_manifest
from tests.proxy import HoldingProxy
from tests.test_migrate import T0, batch, create, dataset, model, point, update

SOURCE_TAG = "batchlog.source_run_id"
POOL_MESSAGE = (
    "(sqlalchemy.exc.TimeoutError) QueuePool limit of size 5 overflow 10 reached, "
    "connection timed out, timeout 30.00 (Background on this error at: "
    "https://sqlalche.me/e/20/3o7r)"
)


@pytest.fixture(scope="module")
def target_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-target"))
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)


def upload(uri: str, manifest: Path, *rest: str) -> list[str]:
    return ["upload", str(manifest), "--target", "mlflow", "--tracking-uri", uri, *rest]


def copies(client: MlflowClient, source: str) -> list[Any]:
    """The ACTIVE runs carrying the source tag, in every active experiment of the target."""
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    return client.search_runs(ids, f"tags.`{SOURCE_TAG}` = '{source}'", max_results=10)


def small_plan(prefix: str, runs: int, experiment: str) -> list[dict[str, Any]]:
    plan: list[dict[str, Any]] = []
    for i in range(runs):
        s = f"{prefix}{i}"
        plan.append(create(s, experiment, run_name=f"r{i}", start_time=T0 + i))
        plan.append(
            batch(
                s,
                params=[{"key": "p", "value": str(i)}],
                metrics=[point("m", float(k), T0 + k, k) for k in range(5)],
            )
        )
        plan.append(update(s, "FINISHED", T0 + 100))
    return plan


# ---- 1. two uploads of one plan at the same time ----------------------------------------


def test_two_uploads_of_one_plan_at_once_leave_each_run_once(
    tmp_path: Path, target_uri: str
) -> None:
    """Each with its own checkpoint: both look every run up, find nothing, create. They
    converge on one copy per run (the other deleted before any data went to it), and the
    data are not doubled; a copy made too late to converge (its runs/create delayed beyond
    the other's second look) is never silent: the run's update-run fails naming both copies
    (exit 1). The race depends on timing: BATCHLOG_CONCURRENT_ROUNDS=N repeats it (one
    round by default: three took 95 s of the suite)."""
    client = MlflowClient(target_uri)
    for round_ in range(int(os.environ.get("BATCHLOG_CONCURRENT_ROUNDS", "1"))):
        prefix = f"c{time.time_ns()}-{round_}-"
        plan = small_plan(prefix, 20, f"{prefix}exp")
        manifest = write_manifest(tmp_path / f"plan{round_}.jsonl", plan)
        env_args = [sys.executable, "-m", "batchlog"]
        procs = [
            subprocess.Popen(
                [
                    *env_args,
                    *upload(target_uri, manifest, "--checkpoint", str(tmp_path / f"ck{round_}{k}")),
                    # a few at a time: 2 x 32 requests at once exhaust the test server's
                    # pool for 30 s (QueuePool), a stall beyond what creation waits for
                    "--concurrency",
                    "4",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(2)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        told = "".join(err for _, err in outs)
        for proc, (_, err) in zip(procs, outs, strict=True):
            assert proc.returncode in (0, 1), err
            assert "Traceback" not in err
            if proc.returncode == 1:  # only for a copy made too late to converge: told
                lines = [x for x in err.splitlines() if ": 409 " in x or "failed" in x]
                assert all("ConcurrentUpload" in x for x in lines if ": 409 " in x), err
        doubled = []
        for i in range(20):
            s = f"{prefix}{i}"
            found = copies(client, s)
            assert 1 <= len(found) <= 2, (s, [r.info.run_id for r in found])
            if len(found) == 2:  # never silent: the update-run failed naming both copies
                doubled.append(s)
                ids = sorted(r.info.run_id for r in found)
                assert f"source run {s} has two copies" in told, told
                assert all(run_id in told for run_id in ids), told
            for run in found:
                assert run.data.params == {"p": str(i)}
                history = client.get_metric_history(run.info.run_id, "m")
                assert sorted((m.step, m.value) for m in history) == [
                    (k, float(k)) for k in range(5)
                ]
        assert len(doubled) <= 2, doubled  # the rare late copy, not the rule


# ---- 3. renamed experiments and runs ------------------------------------------------------


@pytest.fixture(scope="module")
def source_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-source"))
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)


def export(uri: str, out: Path) -> None:
    done = run_cli(["export", "--tracking-uri", uri, "-o", str(out)])
    assert done.returncode == 0, done.stderr


def test_a_source_experiment_and_run_renamed_between_two_syncs_copy_nothing_again(
    tmp_path: Path, source_uri: str, target_uri: str
) -> None:
    src = MlflowClient(source_uri)
    name = f"ren{time.time_ns()}"
    eid = src.create_experiment(name)
    runs = []
    for i in range(3):
        run = src.create_run(eid, run_name=f"run{i}", start_time=T0 + i)
        src.log_param(run.info.run_id, "p", str(i))
        src.log_metric(run.info.run_id, "m", 0.5 * i, timestamp=T0, step=i)
        src.set_terminated(run.info.run_id, "FINISHED", end_time=T0 + 10)
        runs.append(run.info.run_id)
    first = tmp_path / "first.jsonl"
    export(source_uri, first)
    done = run_cli(upload(target_uri, first))
    assert done.returncode == 0, done.stderr

    src.rename_experiment(eid, f"{name}-renamed")
    src.update_run(runs[0], name="run0-renamed")
    second = tmp_path / "second.jsonl"
    export(source_uri, second)
    done = run_cli(upload(target_uri, second, "--checkpoint", str(tmp_path / "fresh")))
    assert done.returncode == 0, done.stderr
    assert f"found in experiment {name!r}, the plan names {name + '-renamed'!r}" in done.stderr
    assert done.stderr.count("(renamed?)") == 1, done.stderr  # once per experiment

    tgt = MlflowClient(target_uri)
    assert tgt.get_experiment_by_name(f"{name}-renamed") is None  # nothing made for it
    for i, s in enumerate(runs):
        found = copies(tgt, s)
        assert len(found) == 1, (s, found)
        assert found[0].info.run_name == ("run0-renamed" if i == 0 else f"run{i}")
        assert len(tgt.get_metric_history(found[0].info.run_id, "m")) == 1
    verified = run_cli(["verify", str(second), "--target", "mlflow", "--tracking-uri", target_uri])
    assert verified.returncode == 0, (verified.stdout, verified.stderr)


# ---- 5. the SQL store's pool exhausted, answered 400 ----------------------------------------


def pool_answer(status: int = 400) -> bytes:
    body = orjson.dumps({"error_code": "BAD_REQUEST", "message": POOL_MESSAGE})
    return (
        f"HTTP/1.1 {status} BAD REQUEST\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_a_queuepool_answer_is_transient_and_in_doubt() -> None:
    for status in (400, 500, 503):
        answer = _answer(status, CIMultiDict(), pool_answer(status).split(b"\r\n\r\n")[1], "r")
        assert RetryPolicy().verdict(answer) == "retry", answer
        assert answer.in_doubt, answer
        assert "QueuePool limit" in answer.message
    plain = orjson.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad key"})
    answer = _answer(400, CIMultiDict(), plain, "r")
    assert RetryPolicy().verdict(answer) == "permanent" and not answer.in_doubt


class _PoolRunsOut(HoldingProxy):
    """Forwards every request; the first ``n`` POSTs whose request line holds one of
    ``fragments`` are applied upstream, but answered 400 QueuePool (the pool ran out as
    the answer was being made: in doubt)."""

    def __init__(self, port: int, fragments: tuple[bytes, ...], n: int) -> None:
        super().__init__("127.0.0.1", port, delay=0.0)
        self.left = {f: n for f in fragments}

    async def _forward(self, raw: bytes, delay: float) -> bytes | None:
        answer = await super()._forward(raw, delay)
        line = raw.split(b"\r\n", 1)[0]
        for fragment, left in self.left.items():
            if answer is not None and fragment in line and left > 0:
                self.left[fragment] = left - 1
                return pool_answer()
        return answer


def test_queuepool_answers_are_retried_and_a_model_in_doubt_lands_once(
    tmp_path: Path, target_uri: str
) -> None:
    s = f"pool{time.time_ns()}"
    plan = [
        create(s, s, run_name="r"),
        batch(s, params=[{"key": "p", "value": "1"}], metrics=[point("m", 1.0, T0)]),
        dataset(s, "d"),
        model(s, 1),
        update(s, "FINISHED", T0 + 5),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(target_uri.rsplit(":", 1)[1])
    fragments = (b"/runs/log-batch ", b"/runs/log-model ", b"/runs/log-inputs ")
    proxy = _PoolRunsOut(port, fragments, n=2)
    with proxy:
        # a short timeout: a call in doubt is read back once it can no longer land
        done = run_cli(upload(proxy.url, manifest, "--timeout", "2"))
        assert done.returncode == 0, done.stderr
        assert all(left < 2 for left in proxy.left.values()), proxy.left
    assert "read back" in done.stderr
    client = MlflowClient(target_uri)
    (run,) = copies(client, s)
    history = json.loads(run.data.tags["mlflow.log-model.history"])
    assert len(history) == 1, history
    assert run.data.params == {"p": "1"}
    assert len(client.get_metric_history(run.info.run_id, "m")) == 1
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["d"]

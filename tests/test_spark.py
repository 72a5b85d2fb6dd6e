"""batchlog.spark on local Spark (local[2,4]: 2 cores, a task tried up to 4 times) against
the emulator: exactly once across buckets, task retries, two attempts at once and re-runs.

pyspark and Java are required: without them these tests fail (CI installs the spark extra).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from pyspark.serializers import CloudPickleSerializer
from pyspark.sql import SparkSession

import batchlog
from batchlog.auth import load_credentials
from batchlog.emulator import EmulatorThread
from batchlog.errors import CheckpointError, ConfigurationError
from batchlog.planorder import NO_PARENT
from batchlog.spark import upload
from batchlog.spark.bucket import BucketJob, bucket_dir
from batchlog.validate import parse_line
from tests.conftest import (
    PLATFORM,
    WORKSPACE,
    Oci,
    expected_items,
    inputs_record,
    mixed_records,
    model_record,
    write_manifest,
    write_oci_config,
)
from tests.test_upload import assert_exactly_once

StartEmulator = Callable[..., EmulatorThread]

# pyspark leaves the sockets it collects results through to the garbage collector; one
# xdist worker runs the whole module (`-n 2 --dist loadgroup`): one JVM, not two
pytestmark = [
    pytest.mark.xdist_group("spark"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers run this venv's Python
    session = (
        SparkSession.builder.master("local[2,4]")
        .appName("batchlog-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def settings(oci: Oci, emu: EmulatorThread, **options: Any) -> batchlog.Settings:
    creds = load_credentials("api_key", str(oci.config), None)
    target = batchlog.OciTarget(emu.url, PLATFORM, WORKSPACE)
    return batchlog.Settings(target=target, keys=creds.keys, **options)


def sent(emu: EmulatorThread) -> int:
    return sum(emu.state.statuses.values())


def test_20000_records_in_8_buckets_land_exactly_once_and_a_rerun_sends_nothing(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    records = mixed_records(20_000, runs=1_000)
    for part in range(4):  # several files, each read as one or more splits
        write_manifest(tmp_path / f"runs-{part}.jsonl", records[part * 5000 : (part + 1) * 5000])
    df = spark.read.text(str(tmp_path / "runs-*.jsonl"))
    ckpt = tmp_path / "ckpt"

    result = upload(df, settings(oci, emu), str(ckpt), buckets=8)
    assert_exactly_once(emu, records)
    r = result.report
    assert (r.records, r.succeeded, r.failed, r.rejected, r.exit_code) == (20_000, 20_000, 0, 0, 0)
    assert r.requests == emu.state.statuses[200] < 20_000  # a run's inputs merged
    assert [t.bucket for t in result.tasks] == list(range(8))
    assert all(t.records > 1000 for t in result.tasks)  # spread over the buckets
    assert result.dead_letter.count() == 0
    # every run in one bucket, its lines in input order, each with its FILE:LINE
    runs_seen: dict[str, int] = {}
    files = {str(f): f.read_bytes().splitlines() for f in tmp_path.glob("runs-*.jsonl")}
    for bucket in range(8):
        folder = Path(bucket_dir(str(ckpt), bucket))
        lines = (folder / "records.jsonl").read_bytes().splitlines()
        sources = (folder / "sources.txt").read_text().splitlines()
        assert len(lines) == len(sources)
        places = []
        for line, source in zip(lines, sources, strict=True):
            file, number = source.rsplit(":", 1)
            assert files[file][int(number) - 1] == line
            places.append((file, int(number)))
            run = orjson.loads(line)["run_id"]
            assert runs_seen.setdefault(run, bucket) == bucket
        assert places == sorted(places)

    before = sent(emu)
    again = upload(df, settings(oci, emu), str(ckpt), buckets=8)
    assert sent(emu) == before  # nothing sent
    a = again.report
    assert (a.records, a.already_done, a.requests, a.succeeded, a.unsuccessful_total) == (
        20_000,
        20_000,
        0,
        0,
        0,
    )


def _kill_when_committed(folder: Path, done: threading.Event) -> int:
    """SIGKILL the Python worker holding ``folder``'s lease once its checkpoint has a
    commit; its pid, or 0 if the job ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set():
        checkpoint = folder / "checkpoint"
        if checkpoint.is_file() and b'"commit"' in checkpoint.read_bytes():
            note = (folder / "lease").read_text()
            pid = int(note.split("pid=")[1].split()[0])
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    return 0


def test_a_task_killed_midway_is_retried_and_everything_lands_exactly_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator(latency=0.03)
    records = [inputs_record(f"run{i:04d}", f"ds{i:08d}") for i in range(400)]
    write_manifest(tmp_path / "runs.jsonl", records)
    ckpt = tmp_path / "ckpt"
    results: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            df = spark.read.text(str(tmp_path / "runs.jsonl"))
            results.append(upload(df, settings(oci, emu, concurrency=2), str(ckpt), buckets=2))
        except BaseException as exc:  # shown by the assertion below
            results.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    killed = _kill_when_committed(Path(bucket_dir(str(ckpt), 0)), done)
    thread.join(180)
    assert killed, "the bucket finished before it could be killed"
    (result,) = results
    assert not isinstance(result, BaseException), result
    assert_exactly_once(emu, records)
    assert result.tasks[0].attempt >= 1  # bucket 0 was retried by Spark
    assert result.tasks[0].already_done > 0  # and resumed its checkpoint
    assert result.report.records == 400 and result.report.unsuccessful_total == 0


def test_two_attempts_of_one_bucket_at_once_the_second_waits_and_sends_nothing_twice(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.02)
    records = [inputs_record(f"run{i:04d}", f"ds{i:08d}") for i in range(150)]
    lines = [(orjson.dumps(r).decode(), f"row {i}") for i, r in enumerate(records)]
    ckpt = str(tmp_path / "ckpt")
    job = BucketJob(settings(oci, emu, concurrency=2), ckpt, rate=None, lease_wait=60)
    figures: dict[str, Any] = {}

    def attempt(name: str, which: BucketJob) -> None:
        try:
            figures[name] = which.run(3, iter(lines))
        except BaseException as exc:
            figures[name] = exc

    first = threading.Thread(target=attempt, args=("first", job))
    first.start()
    lease = Path(bucket_dir(ckpt, 3)) / "checkpoint"
    deadline = time.monotonic() + 30
    while not lease.is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    impatient = BucketJob(job.settings, ckpt, rate=None, lease_wait=0.3)
    attempt("impatient", impatient)
    second = threading.Thread(target=attempt, args=("second", job))
    second.start()
    first.join(60)
    second.join(60)

    refused = figures["impatient"]  # stopped: told once by upload, never retried
    assert (refused.status, refused.error) == ("stopped", "CheckpointError")
    message = refused.message
    assert "held by another attempt of this bucket" in message and "pid=" in message
    assert "\n" not in message
    one, two = figures["first"], figures["second"]
    assert one.succeeded == 150 and one.requests == emu.state.statuses[200]
    assert (two.succeeded, two.already_done, two.requests) == (0, 150, 0)
    assert two.lease_wait_s > 0
    assert_exactly_once(emu, records)


def test_the_fleet_keeps_under_the_servers_rate_limit(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    limit = 200.0
    emu = emulator(rate_limit=limit)
    records = [inputs_record(f"run{i:04d}", f"ds{i:08d}") for i in range(800)]
    write_manifest(tmp_path / "runs.jsonl", records)
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    result = upload(df, settings(oci, emu, rate=limit), str(tmp_path / "ckpt"), buckets=2)
    assert_exactly_once(emu, records)
    assert [t.rate_limit for t in result.tasks] == [limit / 2, limit / 2]  # 2 at once
    r = result.report
    assert r.throttled == sum(t.throttled for t in result.tasks) == emu.state.statuses[429]
    assert r.throttled < 0.02 * r.requests, (r.throttled, r.requests)


def test_bad_lines_go_to_the_dead_letter_frame_with_their_file_and_line(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    good = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(60)]
    bad = [
        b'{"run_id": "r-bad", oops',
        orjson.dumps(inputs_record("-nope", "dsx")),
        orjson.dumps({**inputs_record("r-typo", "dsy"), "dataset_input": []}),
    ]
    lines: list[Any] = [*good[:20], bad[0], *good[20:40], b"", bad[1], *good[40:], bad[2]]
    manifest = write_manifest(tmp_path / "runs.jsonl", lines)
    expected = {}
    for number, line in enumerate(manifest.read_bytes().splitlines(), 1):
        if line in bad:
            rejection = parse_line(line, 0, "x")
            assert not isinstance(rejection, batchlog.records.Record)
            expected[f"{manifest}:{number}"] = (
                line.decode(),
                f"{rejection.field}: {rejection.reason}",
            )
    result = upload(
        spark.read.text(str(manifest)), settings(oci, emu), str(tmp_path / "c"), buckets=3
    )
    assert_exactly_once(emu, good)
    r = result.report
    assert (r.records, r.succeeded, r.rejected, r.exit_code) == (63, 60, 3, 1)
    rows = result.dead_letter.collect()
    got = {row.source: (row.record, row.reason) for row in rows}
    assert got == expected
    assert {row.status for row in rows} == {"rejected"}


def test_a_table_of_fields_as_columns_lands_exactly_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    records = mixed_records(1000, runs=150)
    rows: list[tuple[Any, ...]] = []
    for r in records:
        if "model_json" in r:  # a string column holding the MLmodel JSON
            rows.append(("log-model", r["run_id"], None, orjson.dumps(r["model_json"]).decode()))
        else:
            rows.append((None, r["run_id"], r["dataset_inputs"], None))
    schema = (
        "op string, run_id string, dataset_inputs array<struct<dataset: struct<name: string, "
        "digest: string, source: string, source_type: string>, tags: array<struct<key: "
        "string, value: string>>>>, model_json string"
    )
    df = spark.createDataFrame(rows, schema)
    result = upload(df, settings(oci, emu), str(tmp_path / "ckpt"), buckets=4)
    assert_exactly_once(emu, records)
    assert (result.report.succeeded, result.report.unsuccessful_total) == (1000, 0)
    sources = Path(bucket_dir(str(tmp_path / "ckpt"), 0), "sources.txt").read_text().split("\n")
    assert all(s.startswith("row ") and len(s) >= 16 for s in sources if s)
    assert set(expected_items(records)) == set(emu.state.applied_counts())


def _plan(trees: int) -> list[dict[str, Any]]:
    """Plan lines, parents first: each tree a root, a child and a grandchild."""
    out: list[dict[str, Any]] = []
    for t in range(trees):
        chain = [f"root{t}", f"child{t}", f"grand{t}"]
        for depth, run in enumerate(chain):
            create = {"op": "create-run", "source_run_id": run, "experiment": "exp"}
            if depth:
                create["parent_source_run_id"] = chain[depth - 1]
            out.append(create)
        for run in reversed(chain):
            out.append(
                {"op": "log-batch", "source_run_id": run, "params": [{"key": "p", "value": run}]}
            )
            out.append({"op": "update-run", "source_run_id": run, "status": "FINISHED"})
    return out


def test_a_migration_plan_keeps_nested_runs_with_their_parents(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    plan = _plan(12)
    loop = [  # a loop has no first run: rejected, naming the parent
        {
            "op": "create-run",
            "source_run_id": "x",
            "experiment": "exp",
            "parent_source_run_id": "y",
        },
        {
            "op": "create-run",
            "source_run_id": "y",
            "experiment": "exp",
            "parent_source_run_id": "x",
        },
    ]
    write_manifest(tmp_path / "plan.jsonl", [*plan, *loop])
    df = spark.read.text(str(tmp_path / "plan.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    result = upload(df, settings(oci, emu), ckpt, buckets=4)
    r = result.report
    assert (r.records, r.succeeded, r.failed, r.rejected) == (len(plan) + 2, len(plan), 0, 2)
    assert emu.state.op_applied["runs/create"] == 36
    tree_bucket: dict[str, int] = {}
    for bucket in range(4):
        records = Path(bucket_dir(ckpt, bucket), "records.jsonl")
        for line in records.read_bytes().splitlines() if records.is_file() else []:
            run = orjson.loads(line)["source_run_id"]
            if run not in ("x", "y"):
                assert (
                    tree_bucket.setdefault(re.sub("^(root|child|grand)", "", run), bucket) == bucket
                )
    assert len(set(tree_bucket.values())) > 1  # the trees spread over buckets
    dead = {row.source: row.reason for row in result.dead_letter.collect()}
    assert set(dead) == {f"{tmp_path / 'plan.jsonl'}:{len(plan) + n}" for n in (1, 2)}
    assert all(reason == f"parent_source_run_id: {NO_PARENT}" for reason in dead.values())

    before = sent(emu)
    upload(df, settings(oci, emu), ckpt, buckets=4)
    assert sent(emu) == before


def test_the_pickled_task_holds_no_key_material(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    passphrase = b"correct horse battery staple"
    pem = oci.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(passphrase),
    )
    config, _ = write_oci_config(tmp_path, pem, "encrypted.pem", "config", passphrase.decode())
    emu = emulator()
    creds = load_credentials("api_key", str(config), None)
    target = batchlog.OciTarget(emu.url, PLATFORM, WORKSPACE)
    job = BucketJob(batchlog.Settings(target=target, keys=creds.keys), str(tmp_path), None, 1)
    pickled = CloudPickleSerializer().dumps(job)  # type: ignore[no-untyped-call]
    body = b"".join(line for line in oci.key_pem.splitlines() if b"-----" not in line)
    for secret in (passphrase, pem, oci.key_pem, body[:64], body[-64:]):
        assert secret not in pickled
    for line in pem.splitlines()[3:-1]:  # the encrypted PEM's body, line by line
        assert len(line) < 20 or line not in pickled

    records = [inputs_record(f"run{i}", f"ds{i:08d}") for i in range(20)]
    write_manifest(tmp_path / "runs.jsonl", records)
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    result = upload(df, job.settings, str(tmp_path / "ckpt"), buckets=2)
    assert result.report.succeeded == 20  # the executors loaded the key again
    assert_exactly_once(emu, records)


def test_object_storage_and_other_buckets_are_refused_before_any_task(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    write_manifest(tmp_path / "runs.jsonl", [inputs_record("r1", "ds00000001")])
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    with pytest.raises(ConfigurationError, match="object storage"):
        upload(df, settings(oci, emu), "oci://bucket@ns/ckpt")
    upload(df, settings(oci, emu), str(tmp_path / "ckpt"), buckets=2)
    with pytest.raises(ConfigurationError, match="buckets=2, not 3"):
        upload(df, settings(oci, emu), str(tmp_path / "ckpt"), buckets=3)
    assert sent(emu) == 1
    # an input now empty is refused too (its bucket held a record), and each bucket ran
    write_manifest(tmp_path / "none.jsonl", [])
    empty = spark.read.text(str(tmp_path / "none.jsonl"))
    with pytest.raises(CheckpointError, match="holds other records"):
        upload(empty, settings(oci, emu), str(tmp_path / "ckpt"), buckets=2)
    nothing = upload(empty, settings(oci, emu), str(tmp_path / "new"), buckets=2)
    assert [(t.bucket, t.records) for t in nothing.tasks] == [(0, 0), (1, 0)]
    assert sent(emu) == 1


def _models_in_bucket_order(ckpt: Path, buckets: int) -> dict[str, list[str]]:
    """Each run's model artifact paths in the order its bucket's records.jsonl holds them
    (batchlog sends a run's log-models in no promised order: the bucket's order is
    what order_by sets)."""
    runs: dict[str, list[str]] = {}
    for bucket in range(buckets):
        for line in Path(bucket_dir(str(ckpt), bucket), "records.jsonl").read_bytes().splitlines():
            doc = orjson.loads(line)
            model = doc["model_json"]  # a string column stays a string
            model = orjson.loads(model) if isinstance(model, str) else model
            runs.setdefault(doc["run_id"], []).append(model["artifact_path"])
    return runs


def test_order_by_columns_order_a_table_and_stay_out_of_the_record(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    records = [model_record(f"run{r}", n) for r in range(6) for n in range(3)]
    rows = [  # given newest first: logged_at puts each run's models back in order
        ("log-model", rec["run_id"], orjson.dumps(rec["model_json"]).decode(), 1000 + i)
        for i, rec in enumerate(records)
    ][::-1]
    df = spark.createDataFrame(rows, "op string, run_id string, model_json string, logged_at long")
    ckpt = tmp_path / "ckpt"
    result = upload(df, settings(oci, emu), str(ckpt), buckets=2, order_by=["logged_at"])
    assert (result.report.succeeded, result.report.unsuccessful_total) == (18, 0)
    assert_exactly_once(emu, records)
    in_order = ["model0", "model1", "model2"]
    assert _models_in_bucket_order(ckpt, 2) == {f"run{r}": in_order for r in range(6)}
    text = spark.createDataFrame(  # text lines and an order column: the lines alone are sent
        [(orjson.dumps(rec).decode(), -i) for i, rec in enumerate(records)], "value string, at long"
    )
    emu2 = emulator()
    upload(text, settings(oci, emu2), str(tmp_path / "ckpt2"), buckets=2, order_by=["at"])
    assert_exactly_once(emu2, records)
    backwards = in_order[::-1]
    assert _models_in_bucket_order(tmp_path / "ckpt2", 2) == {
        f"run{r}": backwards for r in range(6)
    }


def test_a_tasks_log_names_the_inputs_source_not_the_bucket_file(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emu = emulator(known_runs=frozenset({"run1", "run2"}))  # run9 does not exist: a 404
    lines = [
        (orjson.dumps(inputs_record("run1", "ds00000001")).decode(), "/in/a.jsonl:7"),
        ('{"run_id": "run2", oops', "/in/a.jsonl:8"),
        (orjson.dumps(inputs_record("run9", "ds00000009")).decode(), "row 0123456789ab"),
    ]
    job = BucketJob(settings(oci, emu), str(tmp_path / "ckpt"), rate=None, lease_wait=5)
    with caplog.at_level("WARNING", logger="batchlog"):
        figures = job.run(0, iter(lines))
    assert (figures.succeeded, figures.rejected, figures.failed) == (1, 1, 1)
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("/in/a.jsonl:8: ") for m in logged), logged
    assert any(m.startswith("row 0123456789ab: 404") for m in logged), logged
    assert not any("records.jsonl" in m for m in logged), logged
    sources = {getattr(r, "batchlog_failure", {}).get("source") for r in caplog.records}
    assert {"/in/a.jsonl:8", "row 0123456789ab"} <= sources
    # the bucket's own dead letter still names its records.jsonl lines (the frame reads them)
    dead = Path(bucket_dir(str(tmp_path / "ckpt"), 0), "dead-letter.jsonl").read_bytes()
    assert b"records.jsonl:2" in dead and b"records.jsonl:3" in dead


def test_a_wrong_key_fails_the_call_in_one_line_and_the_right_key_then_sends_all_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / "other.pem").write_bytes(other_pem)
    (tmp_path / "other.pem").chmod(0o600)
    wrong = tmp_path / "wrong_config"
    wrong.write_text(
        oci.config.read_text().replace(
            str(tmp_path / "oci_api_key.pem"), str(tmp_path / "other.pem")
        )
    )
    emu = emulator()
    records = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(60)]
    write_manifest(tmp_path / "runs.jsonl", records)
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    creds = load_credentials("api_key", str(wrong), None)
    bad = batchlog.Settings(
        target=batchlog.OciTarget(emu.url, PLATFORM, WORKSPACE), keys=creds.keys
    )
    with pytest.raises(batchlog.errors.SystemicError) as caught:
        upload(df, bad, ckpt, buckets=2)
    message = str(caught.value)
    assert "401" in message and "bucket" in message, message
    assert "\n" not in message and "java" not in message.lower() and "Traceback" not in message
    body = b"".join(line for line in other_pem.splitlines() if b"-----" not in line)
    assert body[:40].decode() not in message and "PRIVATE KEY" not in message
    assert emu.state.applied == 0 and emu.state.statuses[401] > 0

    result = upload(df, settings(oci, emu), ckpt, buckets=2)
    assert (result.report.succeeded, result.report.unsuccessful_total) == (60, 0)
    assert_exactly_once(emu, records)


def test_a_json_string_dataset_inputs_column_lands_exactly_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    records = [inputs_record(f"run{i % 7}", f"ds{i:08d}") for i in range(40)]
    rows = [(r["run_id"], orjson.dumps(r["dataset_inputs"]).decode()) for r in records]
    df = spark.createDataFrame(rows, "run_id string, dataset_inputs string")
    result = upload(df, settings(oci, emu), str(tmp_path / "ckpt"), buckets=2)
    assert (result.report.succeeded, result.report.unsuccessful_total) == (40, 0)
    assert_exactly_once(emu, records)


def test_parent_chains_are_resolved_only_when_a_line_may_name_a_parent(
    tmp_path: Path,
    oci: Oci,
    emulator: StartEmulator,
    spark: SparkSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchlog.spark.inputs as inputs

    calls: list[int] = []
    resolve = inputs._roots

    def counted(*args: Any) -> Any:
        calls.append(1)
        return resolve(*args)

    monkeypatch.setattr(inputs, "_roots", counted)
    emu = emulator()
    records = [inputs_record(f"run{i}", f"ds{i:08d}") for i in range(30)]
    write_manifest(tmp_path / "runs.jsonl", records)
    upload(spark.read.text(str(tmp_path / "runs.jsonl")), settings(oci, emu), str(tmp_path / "a"))
    table = spark.createDataFrame(
        [(r["run_id"], orjson.dumps(r["dataset_inputs"]).decode()) for r in records],
        "run_id string, dataset_inputs string",
    )
    upload(table, settings(oci, emu), str(tmp_path / "b"))
    assert calls == []  # no line names a parent: no pass to find roots
    assert_exactly_once(emu, records)

    # a key spelled with a \u escape still names the parent: the child goes with it
    plan = _plan(3)
    lines = [
        orjson.dumps(p).replace(b'"parent_source_run_id"', b'"parent\\u005fsource_run_id"')
        for p in plan
    ]
    write_manifest(tmp_path / "plan.jsonl", lines)
    result = upload(
        spark.read.text(str(tmp_path / "plan.jsonl")), settings(oci, emu), str(tmp_path / "c")
    )
    assert calls == [1]
    assert (result.report.succeeded, result.report.unsuccessful_total) == (len(plan), 0)


# inputs (review)


def _sources_and_lines(ckpt: Path, buckets: int) -> list[tuple[str, bytes]]:
    """(source, line) of every line the buckets hold, from sources.txt and records.jsonl."""
    out: list[tuple[str, bytes]] = []
    for bucket in range(buckets):
        folder = Path(bucket_dir(str(ckpt), bucket))
        if (folder / "records.jsonl").is_file():
            lines = (folder / "records.jsonl").read_bytes().splitlines()
            sources = (folder / "sources.txt").read_text().splitlines()
            out += zip(sources, lines, strict=True)
    return out


def _assert_each_file_line_holds_its_line(pairs: list[tuple[str, bytes]]) -> None:
    for source, line in pairs:
        file, number = source.rsplit(":", 1)
        assert Path(file).read_bytes().splitlines()[int(number) - 1] == line, source


def test_a_partitioned_text_path_is_read_as_lines_named_by_file_and_line(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    records = [inputs_record(f"run{i}", f"ds{i:08d}") for i in range(12)]
    files = []
    for day, part in (("2026-11-24", records[:6]), ("2026-11-25", records[6:])):
        folder = tmp_path / "in" / f"date={day}"
        folder.mkdir(parents=True)
        files.append(write_manifest(folder / "runs.jsonl", [*part, b'{"run_id": "x", oops']))
    df = spark.read.text(str(tmp_path / "in"))
    assert df.columns == ["value", "date"]  # the partition column besides the lines
    for name, order_by in (("plain", None), ("by-date", ["date"])):
        emu = emulator()
        ckpt = tmp_path / name
        result = upload(df, settings(oci, emu), str(ckpt), buckets=2, order_by=order_by)
        r = result.report
        assert (r.records, r.succeeded, r.rejected) == (14, 12, 2), name
        assert_exactly_once(emu, records)
        assert {row.source for row in result.dead_letter.collect()} == {f"{f}:7" for f in files}
        _assert_each_file_line_holds_its_line(_sources_and_lines(ckpt, 2))


def test_a_filtered_text_frame_names_no_line_by_a_wrong_number(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    import hashlib

    lines: list[Any] = [
        {"note": "skip me"} if i % 4 == 0 else inputs_record(f"t{i:03d}", f"ds{i:08d}")
        for i in range(40)
    ]
    f = write_manifest(tmp_path / "t.jsonl", lines)
    emu = emulator()
    ckpt = tmp_path / "where"
    filtered = spark.read.text(str(f)).where("value not like '%skip me%'")
    result = upload(filtered, settings(oci, emu), str(ckpt), buckets=2)
    assert (result.report.succeeded, result.report.unsuccessful_total) == (30, 0)
    pairs = _sources_and_lines(ckpt, 2)
    assert len(pairs) == 30
    for source, line in pairs:  # numbers counted after the filter would be wrong: a key
        assert source == f"{f} row {hashlib.sha256(line).hexdigest()[:12]}", source

    # a bare read, the lines column selected: still FILE:LINE, each at its line
    emu = emulator()
    ckpt = tmp_path / "bare"
    result = upload(spark.read.text(str(f)).select("value"), settings(oci, emu), str(ckpt))
    assert (result.report.succeeded, result.report.rejected) == (30, 10)
    _assert_each_file_line_holds_its_line(_sources_and_lines(ckpt, 8))
    dead = {row.source for row in result.dead_letter.collect()}
    assert dead == {f"{f}:{n}" for n in range(1, 41, 4)}


def test_order_by_the_column_of_lines_is_refused_in_one_line(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    f = write_manifest(tmp_path / "runs.jsonl", [inputs_record("run1", "ds00000001")])
    with pytest.raises(ConfigurationError) as caught:
        upload(spark.read.text(str(f)), settings(oci, emu), str(tmp_path / "c"), order_by=["value"])
    message = str(caught.value)
    assert "order_by" in message and "'value'" in message and "\n" not in message, message
    assert sent(emu) == 0


def test_the_column_of_lines_is_chosen_by_its_name(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator()
    records = [inputs_record(f"run{i}", f"ds{i:08d}") for i in range(4)]
    text = [orjson.dumps(r).decode() for r in records]
    # one string column named otherwise: no lines and no field, refused naming it
    table = spark.createDataFrame([("ds",)], "dataset_name string")
    with pytest.raises(ConfigurationError) as caught:
        upload(table, settings(oci, emu), str(tmp_path / "a"), buckets=1)
    message = str(caught.value)
    assert "(dataset_name)" in message and "lines=" in message and "\n" not in message
    # a table of fields with a string column besides: the column is a field, rejected
    typo = spark.createDataFrame([("run9", "ds")], "run_id string, dataset_name string")
    one = upload(typo, settings(oci, emu), str(tmp_path / "a2"), buckets=1)
    (reason,) = [row.reason for row in one.dead_letter.collect()]
    assert reason.startswith("dataset_name: unknown field"), reason
    # the lines in `value`, other columns (a note) left out
    noted = spark.createDataFrame([(t, "note") for t in text[:2]], "value string, note string")
    two = upload(noted, settings(oci, emu), str(tmp_path / "b"), buckets=1)
    assert (two.report.succeeded, two.report.unsuccessful_total) == (2, 0)
    # lines= names another column
    named = spark.createDataFrame([(t,) for t in text[2:]], "json string")
    three = upload(named, settings(oci, emu), str(tmp_path / "c"), buckets=1, lines="json")
    assert (three.report.succeeded, three.report.unsuccessful_total) == (2, 0)
    assert_exactly_once(emu, records)
    before = sent(emu)
    both = spark.createDataFrame([(text[0], "run0")], "value string, run_id string")
    with pytest.raises(ConfigurationError, match=r"'value'.*\(run_id\)"):
        upload(both, settings(oci, emu), str(tmp_path / "d"), buckets=1)
    with pytest.raises(ConfigurationError, match="lines: no string column 'nope'"):
        upload(named, settings(oci, emu), str(tmp_path / "e"), buckets=1, lines="nope")
    assert sent(emu) == before


def test_a_file_name_with_a_space_is_named_as_it_is_on_disk(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    import hashlib

    emu = emulator()
    bad = b'{"run_id": "x", oops'
    f = write_manifest(tmp_path / "with space ü.jsonl", [inputs_record("run1", "ds00000001"), bad])
    result = upload(spark.read.text(str(f)), settings(oci, emu), str(tmp_path / "a"), buckets=1)
    assert [row.source for row in result.dead_letter.collect()] == [f"{f}:2"]
    only_bad = spark.read.text(str(f)).where("value like '%oops%'")  # a key, the file decoded
    again = upload(only_bad, settings(oci, emu), str(tmp_path / "b"), buckets=1)
    key = hashlib.sha256(bad).hexdigest()[:12]
    assert [row.source for row in again.dead_letter.collect()] == [f"{f} row {key}"]


# buckets (review)


def _bucket_of(run: str, buckets: int) -> int:
    """The bucket batchlog.spark gives ``run`` (Spark's crc32 of the run id, mod)."""
    import zlib

    return zlib.crc32(run.encode()) % buckets


def _bucket_files(ckpt: str, buckets: int) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for b in range(buckets):
        folder = Path(bucket_dir(ckpt, b))
        out[b] = ((folder / "records.jsonl").read_bytes(), (folder / "sources.txt").read_bytes())
    return out


def _sources_hold_their_records(ckpt: str, buckets: int) -> None:
    for b, (records, sources) in _bucket_files(ckpt, buckets).items():
        lines, places = records.splitlines(), sources.decode().splitlines()
        assert len(lines) == len(places)
        for line, place in zip(lines, places, strict=True):
            file, number = place.rsplit(":", 1)
            assert Path(file).read_bytes().splitlines()[int(number) - 1] == line, (b, place)


def test_lines_appended_to_the_input_are_sent_alone_and_anything_else_is_refused_intact(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator(idempotency=False)  # a second send shows as applied twice (MLflow's case)
    records = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(40)]
    write_manifest(tmp_path / "a.jsonl", records)
    ckpt = str(tmp_path / "ckpt")
    text = str(tmp_path / "*.jsonl")
    upload(spark.read.text(text), settings(oci, emu), ckpt, buckets=4)
    # the nightly sync: lines appended to the file, and a new file that sorts after it
    more = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(40, 46)]
    more.append(inputs_record("run001", "ds99999999"))  # a run seen before
    write_manifest(tmp_path / "a.jsonl", [*records, *more[:4]])
    write_manifest(tmp_path / "b.jsonl", more[4:])
    result = upload(spark.read.text(text), settings(oci, emu), ckpt, buckets=4)
    r = result.report
    assert (r.records, r.already_done, r.succeeded, r.unsuccessful_total) == (47, 40, 7, 0)
    assert_exactly_once(emu, [*records, *more])
    _sources_hold_their_records(ckpt, 4)

    # a line put before the others is no append: that bucket is refused, its files as
    # they were (its dead letter names its lines by them); the others go on
    first = inputs_record("run000", "ds77777777")
    write_manifest(tmp_path / "0.jsonl", [first])
    before = _bucket_files(ckpt, 4)
    sent_before = sent(emu)
    with pytest.raises(CheckpointError) as caught:
        upload(spark.read.text(text), settings(oci, emu), ckpt, buckets=4)
    message = str(caught.value)
    refused = _bucket_of("run000", 4)
    assert f"bucket {refused}: " in message and "holds other records" in message, message
    for words in ("restart=True", "new checkpoint_dir", "every record", "MLflow", "24 h"):
        assert words in message, message
    assert "\n" not in message
    assert _bucket_files(ckpt, 4)[refused] == before[refused]
    assert sent(emu) == sent_before
    _sources_hold_their_records(ckpt, 4)


def test_a_task_that_cannot_go_on_stops_the_call_once_in_one_line_after_every_task_ended(
    tmp_path: Path,
    oci: Oci,
    emulator: StartEmulator,
    spark: SparkSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import fcntl

    emu = emulator(latency=0.05)
    runs = [f"run{i:04d}" for i in range(400)]
    zero = [inputs_record(r, f"ds{i:08d}") for i, r in enumerate(runs) if _bucket_of(r, 2) == 0]
    one = [inputs_record(r, f"ds{i:08d}") for i, r in enumerate(runs) if _bucket_of(r, 2) == 1]
    one = one[:80]  # some seconds of work for bucket 1, one request at a time
    write_manifest(tmp_path / "runs.jsonl", [*zero[:10], *one])
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    folder = Path(bucket_dir(ckpt, 0))
    folder.mkdir(parents=True)
    holder = open(folder / "lease", "a+b")  # another attempt holds bucket 0's lease
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    capfd.readouterr()
    try:
        with pytest.raises(CheckpointError) as caught:
            upload(df, settings(oci, emu, concurrency=1), ckpt, buckets=2, lease_wait=0.5)
        # bucket 1's task had ended: its lease is free and its records all landed
        with open(Path(bucket_dir(ckpt, 1), "lease"), "a+b") as lease:
            fcntl.flock(lease.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_exactly_once(emu, one)
    finally:
        holder.close()
    message = str(caught.value)
    assert message.startswith("bucket 0: ") and "held by another attempt" in message, message
    assert "\n" not in message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "at org.apache" not in err, err[-2000:]
    result = upload(df, settings(oci, emu), ckpt, buckets=2)
    assert (result.report.succeeded, result.report.already_done) == (10, 80)
    assert_exactly_once(emu, [*zero[:10], *one])


def test_a_systemic_stop_is_tried_once_per_bucket_and_names_no_command_line_flag(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    emu = emulator(key_id="ocid1.tenancy.oc1..other/ocid1.user.oc1..other/00:11")
    records = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(60)]
    write_manifest(tmp_path / "runs.jsonl", records)
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    with pytest.raises(batchlog.errors.SystemicError) as caught:
        upload(df, settings(oci, emu, concurrency=1), str(tmp_path / "ckpt"), buckets=2)
    message = str(caught.value)
    assert "401" in message and "call upload again" in message, message
    assert " --" not in message and "same command" not in message, message
    # about systemic_after (8) answers per bucket: each bucket tried once (4 tries: 64+)
    assert emu.state.statuses[401] < 2 * 2 * 8, emu.state.statuses


def test_a_second_attempt_waits_for_a_live_lease_holder_by_default(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import inspect
    import types

    import batchlog.spark.bucket as bucket

    # the lease's clock runs 10000 times fast: a second here is hours there
    fast = types.SimpleNamespace(monotonic=lambda: time.monotonic() * 10_000, sleep=time.sleep)
    monkeypatch.setattr(bucket, "time", fast)
    emu = emulator()
    records = [inputs_record(f"run{i:03d}", f"ds{i:08d}") for i in range(20)]
    lines = [(orjson.dumps(r).decode(), f"row {i}") for i, r in enumerate(records)]
    ckpt = str(tmp_path / "ckpt")
    folder = Path(bucket_dir(ckpt, 0))
    folder.mkdir(parents=True)
    holder = open(folder / "lease", "a+b")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    default = inspect.signature(upload).parameters["lease_wait"].default
    waiting = BucketJob(settings(oci, emu), ckpt, rate=None, lease_wait=default)
    figures: list[Any] = []

    def attempt() -> None:
        try:
            figures.append(waiting.run(0, iter(lines)))
        except BaseException as exc:
            figures.append(exc)

    thread = threading.Thread(target=attempt)
    try:
        thread.start()
        thread.join(1.0)  # hours of the lease's clock
        assert thread.is_alive() and not figures, figures
        bounded = BucketJob(settings(oci, emu), ckpt, rate=None, lease_wait=300)
        stopped = bounded.run(0, iter(lines))  # a number still bounds the wait
        assert (stopped.status, stopped.error) == ("stopped", "CheckpointError")
        assert "held by another attempt" in stopped.message
    finally:
        holder.close()  # the holder ends: the waiting attempt goes on
        thread.join(60)
    (done,) = figures
    assert not isinstance(done, BaseException), done
    assert done.succeeded == 20 and done.lease_wait_s > 300
    assert_exactly_once(emu, records)


def test_a_file_read_twice_numbers_each_copy_by_the_files_own_lines(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, spark: SparkSession
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    a = write_manifest(folder / "a.jsonl", [inputs_record(f"a{i:03d}", "ds1") for i in range(20)])
    write_manifest(folder / "b.jsonl", [inputs_record(f"b{i:03d}", "ds1") for i in range(5)])
    cases = [
        ("twice", [str(a), str(a)], 40, None),
        ("glob-and-file", [str(folder / "*.jsonl"), str(a)], 45, None),
        ("several-splits", [str(a), str(a)], 40, "300"),  # a file in several splits
    ]
    for name, paths, records, split in cases:
        if split:
            spark.conf.set("spark.sql.files.maxPartitionBytes", split)
        try:
            df = spark.read.text(paths)
            ckpt = tmp_path / name
            result = upload(df, settings(oci, emulator()), str(ckpt), buckets=2)
        finally:
            spark.conf.unset("spark.sql.files.maxPartitionBytes")
        assert result.report.records == records, name  # each copy's lines stay records
        pairs = _sources_and_lines(ckpt, 2)
        _assert_each_file_line_holds_its_line(pairs)
        places = sorted(source for source, _ in pairs if source.startswith(str(a)))
        assert places == sorted(2 * [f"{a}:{n}" for n in range(1, 21)]), name


def test_a_filesystem_error_in_a_task_stops_its_bucket_in_one_line_tried_once(
    tmp_path: Path,
    oci: Oci,
    emulator: StartEmulator,
    spark: SparkSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    emu = emulator()
    runs = [f"run{i:04d}" for i in range(40)]
    records = [inputs_record(r, f"ds{i:08d}") for i, r in enumerate(runs)]
    write_manifest(tmp_path / "runs.jsonl", records)
    df = spark.read.text(str(tmp_path / "runs.jsonl"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    blocked = Path(bucket_dir(str(ckpt), 1))
    blocked.write_text("not a folder")  # the bucket's folder cannot be made
    capfd.readouterr()
    with pytest.raises(CheckpointError) as caught:
        upload(df, settings(oci, emu), str(ckpt), buckets=2)
    message = str(caught.value)
    assert message.startswith("bucket 1: ") and str(blocked) in message, message
    assert "File exists" in message and "\n" not in message, message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "at org.apache" not in err, err[-2000:]
    zero = [r for r in records if _bucket_of(str(r["run_id"]), 2) == 0]
    assert_exactly_once(emu, zero)  # the other bucket's work is done and kept
    blocked.unlink()
    result = upload(df, settings(oci, emu), str(ckpt), buckets=2)
    assert (result.report.already_done, result.report.succeeded) == (len(zero), 40 - len(zero))
    assert_exactly_once(emu, records)

    # a spill that fails (a full disk, a read-only mount) stops its bucket the same way
    job = BucketJob(settings(oci, emu), str(tmp_path / "ro"), rate=None, lease_wait=1)
    folder = Path(bucket_dir(str(tmp_path / "ro"), 0))
    folder.mkdir(parents=True)
    (folder / "records.jsonl.tmp").mkdir()  # the spill's temp file cannot be opened
    lines = [(orjson.dumps(r).decode(), f"row {i}") for i, r in enumerate(records[:3])]
    stopped = job.run(0, iter(lines))
    assert (stopped.status, stopped.error) == ("stopped", "CheckpointError"), stopped
    assert stopped.message.startswith("bucket 0: ") and "records.jsonl.tmp" in stopped.message

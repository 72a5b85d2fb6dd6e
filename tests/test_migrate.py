"""Upload of migration plans (issue 11): runs created or found on the target, their data
logged exactly once, through real HTTP with real signatures (the emulator as AI Data
Platform) and against a real `mlflow server`.

Plans are written here as plan-spec.md gives them: a create-run per run (parents first),
its log-batch lines, log-inputs, log-model, then its update-run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from mlflow import MlflowClient

from batchlog.emulator import EmulatorThread
from batchlog.emulator.server import http_response
from tests.conftest import (
    Oci,
    run_cli,
    start_mlflow_server,
    stop_mlflow_server,
    upload_args,
    write_manifest,
)
from tests.proxy import HoldingProxy

StartEmulator = Callable[..., EmulatorThread]
SOURCE_TAG = "batchlog.source_run_id"
PARENT_TAG = "mlflow.parentRunId"
T0 = 1_700_000_000_000

# ---- plans ---------------------------------------------------------------------------------


def create(source: str, experiment: str, **extra: Any) -> dict[str, Any]:
    return {"op": "create-run", "source_run_id": source, "experiment": experiment, **extra}


def batch(source: str, **fields: Any) -> dict[str, Any]:
    return {"op": "log-batch", "source_run_id": source, **fields}


def point(key: str, value: Any, ts: int, step: int = 0) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": ts, "step": step}


def dataset(source: str, name: str) -> dict[str, Any]:
    return {
        "op": "log-inputs",
        "source_run_id": source,
        "dataset_inputs": [
            {
                "dataset": {
                    "name": name,
                    "digest": hashlib.sha256(name.encode()).hexdigest()[:8],
                    "source": f"s3://b/{name}.parquet",
                    "source_type": "s3",
                },
                "tags": [{"key": "mlflow.data.context", "value": "training"}],
            }
        ],
    }


def model(source: str, n: int) -> dict[str, Any]:
    doc = {
        "artifact_path": f"model-{n}",
        "flavors": {"python_function": {"python_version": "3"}},
        "utc_time_created": f"2024-03-01 00:00:{n % 60:02d}.{n:06d}",
        "run_id": source,  # the SOURCE id: rewritten to the target run at send
    }
    return {"op": "log-model", "source_run_id": source, "model_json": json.dumps(doc)}


def update(source: str, status: str = "FINISHED", end: int | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"op": "update-run", "source_run_id": source, "status": status}
    if end is not None:
        line["end_time"] = end
    return line


def nested_plan(prefix: str = "") -> list[dict[str, Any]]:
    """3 runs in 2 experiments: P, its child C (both in exp-a), Q in exp-b. P has 150
    params over two log-batch lines, metrics with NaN, tags, a dataset and a model.
    ``prefix`` goes before every experiment name and source run id."""
    p, c, q = f"{prefix}srcP", f"{prefix}srcC", f"{prefix}srcQ"
    a, b = f"{prefix}exp-a", f"{prefix}exp-b"
    params = [{"key": f"p{i:03d}", "value": f"v{i}"} for i in range(150)]
    return [
        create(p, a, run_name="parent", start_time=T0, user="alice"),
        batch(p, params=params[:100]),
        batch(
            p,
            params=params[100:],
            metrics=[
                point("loss", 0.9, T0 + 1, 0),
                point("loss", 0.5, T0 + 2, 1),
                point("loss", "NaN", T0 + 3, 2),
                point("acc", 0.1, T0 + 1, 0),
                point("acc", 0.75, T0 + 4, 1),
            ],
            tags=[{"key": "team", "value": "vision"}, {"key": "mlflow.note.content", "value": "n"}],
        ),
        dataset(p, f"{prefix}train-set"),
        model(p, 1),
        update(p, "FINISHED", T0 + 9_000),
        create(c, a, run_name="child", start_time=T0 + 10, parent_source_run_id=p),
        batch(c, metrics=[point("loss", i / 10, T0 + 20 + i, i) for i in range(5)]),
        update(c, "FINISHED", T0 + 8_000),
        create(q, b, run_name="other", start_time=T0 + 30, user="bob"),
        batch(q, params=[{"key": "lr", "value": "0.01"}], tags=[{"key": "k", "value": "v"}]),
        model(q, 2),
        update(q, "KILLED", T0 + 7_000),
    ]


def prefixed(plan: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """``plan`` with its source ids and experiments made unique on a shared server."""
    out = []
    for line in plan:
        line = dict(line)
        line["source_run_id"] = prefix + line["source_run_id"]
        if "experiment" in line:
            line["experiment"] = prefix + line["experiment"]
        if "parent_source_run_id" in line:
            line["parent_source_run_id"] = prefix + line["parent_source_run_id"]
        if line["op"] == "log-model":
            doc = json.loads(line["model_json"])
            doc["run_id"] = line["source_run_id"]
            line["model_json"] = json.dumps(doc)
        out.append(line)
    return out


def many_runs(n: int, experiments: int = 3, batches: int = 2) -> list[dict[str, Any]]:
    """``n`` runs over a few experiments, every 5th nested under the run before it."""
    lines: list[dict[str, Any]] = []
    for i in range(n):
        s = f"run{i:04d}"
        extra: dict[str, Any] = {"run_name": f"r{i}", "start_time": T0 + i}
        if i % 5 == 4:
            extra["parent_source_run_id"] = f"run{i - 1:04d}"
        lines.append(create(s, f"exp-{i % experiments}", **extra))
        for b in range(batches):
            lines.append(
                batch(
                    s,
                    params=[{"key": f"p{b}-{k}", "value": str(k)} for k in range(3)],
                    metrics=[point("m", b * 10 + k, T0 + b * 10 + k, b * 10 + k) for k in range(4)],
                    tags=[{"key": f"t{b}", "value": s}],
                )
            )
        if i % 2 == 0:
            lines.append(dataset(s, f"ds-{i}"))
        if i % 3 == 0:
            lines.append(model(s, i))
        lines.append(update(s, "FINISHED", T0 + 100_000 + i))
    return lines


class Expected:
    """What each source run of a plan must look like on the target."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        for line in lines:
            s = line["source_run_id"]
            if line["op"] == "create-run":
                self.runs[s] = {
                    "create": line,
                    "params": {},
                    "metrics": [],
                    "tags": {},
                    "datasets": [],
                    "models": [],
                    "update": None,
                }
                continue
            run = self.runs[s]
            if line["op"] == "log-batch":
                run["params"].update({p["key"]: p["value"] for p in line.get("params", [])})
                run["metrics"] += line.get("metrics", [])
                run["tags"].update({t["key"]: t["value"] for t in line.get("tags", [])})
            elif line["op"] == "log-inputs":
                run["datasets"] += line["dataset_inputs"]
            elif line["op"] == "log-model":
                run["models"].append(json.loads(line["model_json"]))
            else:
                run["update"] = line

    def items(self, targets: dict[str, str]) -> set[tuple[str, str, str]]:
        """(op, target run, item) of every effect the plan makes once, as the emulator's
        effect log names them (update-run's item is its final state)."""
        out = {("create-experiment", "", r["create"]["experiment"]) for r in self.runs.values()}
        for s, run in self.runs.items():
            t = targets[s]
            out.add(("create-run", t, s))
            out |= {("log-batch", t, f"param:{k}") for k in run["params"]}
            out |= {("log-batch", t, f"tag:{k}") for k in run["tags"]}
            for m in run["metrics"]:
                item = f"metric:{m['key']}@{m['step']}@{m['timestamp']}={value_text(m['value'])}"
                out.add(("log-batch", t, item))
            for d in run["datasets"]:
                out.add(("log-inputs", t, f"{d['dataset']['name']}@{d['dataset']['digest']}"))
            for m in run["models"]:
                out.add(("log-model", t, f"{m['artifact_path']}@{m['utc_time_created']}"))
            u = run["update"]
            if u is not None:
                out.add(("update-run", t, f"{u['status']}@{u.get('end_time')}"))
        return out


# ---- the emulator's state --------------------------------------------------------------------


def emulator_state(emu: EmulatorThread) -> dict[str, Any]:
    """``GET /_emulator/runs``: every experiment and run the emulator holds."""
    conn = http.client.HTTPConnection(emu.url.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", "/_emulator/runs")
        resp = conn.getresponse()
        assert resp.status == 200
        doc: dict[str, Any] = orjson.loads(resp.read())
        return doc
    finally:
        conn.close()


def by_source(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in state["runs"]:
        s = run["tags"].get(SOURCE_TAG)
        if s is not None:
            out.setdefault(s, []).append(run)
    return out


def value_text(value: Any) -> str:
    """A metric value as the emulator's effect log writes it."""
    return value if isinstance(value, str) else str(float(value))


def metric_key(m: dict[str, Any]) -> tuple[str, int, int, str]:
    return (m["key"], m["timestamp"], m["step"], value_text(m["value"]))


def assert_landed(emu: EmulatorThread, plan: list[dict[str, Any]]) -> dict[str, str]:
    """Every source run of ``plan`` once on the emulator, equal to the plan, every effect
    applied once. Returns source -> target run id."""
    expected = Expected(plan)
    state = emulator_state(emu)
    found = by_source(state)
    assert set(found) == set(expected.runs), sorted(found)
    problems = [f"{s}: {len(runs)} runs" for s, runs in found.items() if len(runs) != 1]
    assert not problems, problems
    targets = {s: runs[0]["run_id"] for s, runs in found.items()}
    for s, want in expected.runs.items():
        run = found[s][0]
        c = want["create"]
        assert run["created"] is True
        assert run["experiment_name"] == c["experiment"], s
        info = run["info"]
        if "run_name" in c:
            assert info["run_name"] == c["run_name"], s
        if "start_time" in c:
            assert info["start_time"] == c["start_time"], s
        assert run["params"] == want["params"], s
        assert Counter(map(metric_key, run["metrics"])) == Counter(map(metric_key, want["metrics"]))
        tags = dict(want["tags"])
        tags[SOURCE_TAG] = s
        if c.get("user"):
            tags["mlflow.user"] = c["user"]
        if c.get("parent_source_run_id"):
            tags[PARENT_TAG] = targets[c["parent_source_run_id"]]
        got_tags = {k: v for k, v in run["tags"].items() if k != "mlflow.runName"}
        assert got_tags == tags, s
        assert run["datasets"] == want["datasets"], s
        assert run["models"] == [{**m, "run_id": targets[s]} for m in want["models"]], s
        u = want["update"]
        if u is not None:
            assert info["status"] == u["status"], s
            assert info.get("end_time") == u.get("end_time"), s
    counts = emu.state.applied_counts()
    assert set(counts) == expected.items(targets)
    twice = [k for k, v in counts.items() if v > 1]
    assert not twice, twice[:10]
    return targets


def requests_seen(emu: EmulatorThread) -> int:
    return sum(emu.state.statuses.values())


def dead_letter(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# ---- 1. the emulator: a nested plan lands once, reruns and fresh checkpoints add nothing -----


def test_a_plan_lands_once_and_a_fresh_checkpoint_creates_and_logs_nothing_again(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    plan = nested_plan()
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    targets = assert_landed(emu, plan)
    state = emulator_state(emu)
    assert sorted(e["name"] for e in state["experiments"]) == ["exp-a", "exp-b"]
    assert state["applied_by_op"]["experiments/create"] == 2
    assert state["applied_by_op"]["runs/create"] == 3
    assert set(targets.values()).isdisjoint(targets)  # target ids, not the source ids

    sent = requests_seen(emu)
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    assert requests_seen(emu) == sent  # the checkpoint says everything is done

    # a fresh checkpoint: the runs are found by their tag, nothing is logged twice
    for fresh in (["--restart"], []):
        if not fresh:
            (tmp_path / "plan.batchlog-checkpoint").unlink()
        out = run_cli([*args, *fresh])
        assert out.returncode == 0, out.stderr
        assert assert_landed(emu, plan) == targets
        assert emulator_state(emu)["applied_by_op"]["runs/create"] == 3
        assert emulator_state(emu)["applied_by_op"]["experiments/create"] == 2


def test_a_fresh_checkpoint_after_the_retry_tokens_expired_logs_nothing_twice(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A nightly sync a day later: the plan is the same, its retry tokens long forgotten by
    the server (the emulator without idempotency). The runs are found by their tag; their
    log-model and log-inputs calls must not be applied a second time."""
    emu = emulator()
    plan = nested_plan()
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = upload_args(oci, emu, str(manifest))
    assert run_cli(args).returncode == 0
    targets = assert_landed(emu, plan)
    emu.config.idempotency = False  # every token forgotten
    out = run_cli([*args, "--restart"])
    assert out.returncode == 0, out.stderr
    state = emulator_state(emu)
    assert state["applied_by_op"]["runs/create"] == 3
    found = by_source(state)
    for s, runs in found.items():
        assert len(runs) == 1 and runs[0]["run_id"] == targets[s]
    counts = emu.state.applied_counts()
    twice = [k for k, v in counts.items() if v > 1 and k[0] in ("log-model", "log-inputs")]
    assert not twice, twice


# ---- 2. failures: a deleted experiment, lines out of order --------------------------------


def test_a_deleted_experiment_fails_its_runs_create_and_dead_letters_its_lines(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    gone = emu.state.tracking.create_experiment({"name": "gone"})[0]["experiment_id"]
    emu.state.tracking.delete_experiment(gone)
    plan = [
        create("srcX", "gone", run_name="x", start_time=T0),
        batch("srcX", params=[{"key": "a", "value": "1"}]),
        model("srcX", 7),
        update("srcX", "FINISHED", T0 + 5),
        *nested_plan(),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{manifest}:1: " in out.stderr and "'gone'" in out.stderr, out.stderr
    assert "deleted" in out.stderr
    assert_landed(emu, nested_plan())  # the other runs landed
    dead = dead_letter(tmp_path / "plan.dead-letter.jsonl")
    assert [d["_error"]["source"] for d in dead] == [f"{manifest}:{n}" for n in (1, 2, 3, 4)]
    assert "gone" in dead[0]["_error"]["message"]
    assert all(d["_error"]["code"] == "RunNotCreated" for d in dead[1:]), dead
    assert all(d["_error"]["status"] == 424 for d in dead[1:]), dead

    # restored on the target: the dead letter is a manifest, uploaded as it is
    emu.state.tracking.experiments[gone].lifecycle_stage = "active"
    out = run_cli(upload_args(oci, emu, str(tmp_path / "plan.dead-letter.jsonl")))
    assert out.returncode == 0, out.stderr
    landed = by_source(emulator_state(emu))["srcX"]
    assert len(landed) == 1 and landed[0]["experiment_id"] == gone
    assert landed[0]["params"] == {"a": "1"} and len(landed[0]["models"]) == 1
    assert landed[0]["info"]["status"] == "FINISHED"
    counts = emu.state.applied_counts()
    assert not [k for k, v in counts.items() if v > 1]


def test_a_dead_letter_with_the_experiment_renamed_lands_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    gone = emu.state.tracking.create_experiment({"name": "gone"})[0]["experiment_id"]
    emu.state.tracking.delete_experiment(gone)
    plan = [
        create("srcX", "gone", start_time=T0),
        batch("srcX", metrics=[point("m", 1, T0, 0)]),
        dataset("srcX", "dsx"),
        update("srcX", "FAILED"),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 1
    dead = dead_letter(tmp_path / "plan.dead-letter.jsonl")
    assert len(dead) == 4
    dead[0]["experiment"] = "restored-here"
    fixed = write_manifest(tmp_path / "fixed.jsonl", dead)
    for _ in range(2):  # again with a fresh checkpoint: nothing twice
        out = run_cli(upload_args(oci, emu, str(fixed), "--restart"))
        assert out.returncode == 0, out.stderr
    assert_landed(emu, [{k: v for k, v in dead[0].items() if k != "_error"}, *plan[1:]])


def test_lines_out_of_order_are_rejected_by_line_and_field_and_the_good_ones_go(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    good = nested_plan()
    lines: list[Any] = [
        batch("early", params=[{"key": "a", "value": "1"}]),  # 1: before its create-run
        create("early", "exp-a"),  # 2: fine
        *good,  # 3..15
        create("srcQ", "exp-b"),  # 16: a second create-run for srcQ
        create("orphan", "exp-b", parent_source_run_id="late"),  # 17: its parent comes later
        update("orphan", "FINISHED"),  # 18: its create-run was rejected
        create("late", "exp-b"),  # 19
        create("long", "exp-b", run_name="r" * 251),  # 20: MLflow's runs.name holds 250
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", lines)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    err = out.stderr
    assert f"{manifest}:1: source_run_id: no create-run for this run earlier in the plan" in err
    assert f"{manifest}:16: source_run_id: a second create-run for this run" in err
    assert f"{manifest}:17: parent_source_run_id: no create-run for the parent run" in err
    assert f"{manifest}:18: source_run_id: no create-run for this run earlier" in err
    assert f"{manifest}:20: run_name: 251 characters, at most 250" in err
    dead = dead_letter(tmp_path / "plan.dead-letter.jsonl")
    copies = [d["_error"]["source"] for d in dead if d["_error"]["status"] == "context"]
    assert copies == [f"{manifest}:12"]  # srcQ's create-run, before its second one
    dead = [d for d in dead if d["_error"]["status"] != "context"]
    assert sorted(d["_error"]["source"] for d in dead) == sorted(
        f"{manifest}:{n}" for n in (1, 16, 17, 18, 20)
    )
    assert all(d["_error"]["status"] == "rejected" for d in dead)
    found = by_source(emulator_state(emu))
    assert set(found) == {"srcP", "srcC", "srcQ", "early", "late"}
    assert all(len(runs) == 1 for runs in found.values())
    assert found["srcQ"][0]["info"]["run_name"] == "other"  # the first create-run's


# ---- 3. exactly once under crashes --------------------------------------------------------


def start_cli(args: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCI_", "MLFLOW_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "batchlog", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def rerun_until_done(args: list[str], attempts: int = 5) -> subprocess.CompletedProcess[str]:
    for _ in range(attempts):
        out = run_cli(args)
        if out.returncode == 0:
            return out
        assert out.returncode == 3, out.stderr  # stopped (faults in a row): resumed
    raise AssertionError(f"not done after {attempts} runs: {out.stderr}")


def test_kill_9_at_several_moments_then_resume_lands_every_run_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.01, fail_after=0.05, reset_after=0.05, seed=11)
    plan = many_runs(40)
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "8"]
    for at in (5, 40, 90, 150):
        proc = start_cli(args)
        try:
            deadline = time.monotonic() + 60
            while emu.state.applied < at and proc.poll() is None:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.005)
        finally:
            reap(proc)  # SIGKILL: nothing flushed
    assert emu.state.applied < len(plan) + 6  # killed before the end
    rerun_until_done(args)
    assert_landed(emu, plan)


class _HoldCreates(HoldingProxy):
    """Holds the first ``n`` runs/create requests ``hold`` seconds (longer than the client's
    timeout: their answer is lost, but they land); everything else passes at once."""

    def __init__(self, port: int, n: int, hold: float) -> None:
        super().__init__("127.0.0.1", port, delay=0.0)
        self.n, self.hold = n, hold

    def _delay(self, request_line: bytes) -> float:
        if b"/runs/create " in request_line and self.n > 0:
            self.n -= 1
            return self.hold
        return 0.0


def test_a_runs_create_whose_answer_is_lost_leaves_one_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    plan = many_runs(6, batches=1)
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(emu.url.rsplit(":", 1)[1])
    with _HoldCreates(port, n=4, hold=1.5) as proxy:
        args = [
            *upload_args(oci, emu, str(manifest)),
            "--endpoint",
            proxy.url,
            "--timeout",
            "1",
        ]
        # the first process dies with runs/create held; the second one times out on some
        proc = start_cli(args)
        try:
            deadline = time.monotonic() + 30
            while proxy.holding("/runs/create") < 2:
                assert proc.poll() is None and time.monotonic() < deadline, proxy.stats()
                time.sleep(0.01)
        finally:
            reap(proc)
        rerun_until_done(args)
        assert proxy.wait_idle(10)
        assert proxy.stats()["delivered_after_client_left"] >= 2, proxy.stats()
    assert_landed(emu, plan)


# ---- 4. a real `mlflow server` as the target ------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-target"))
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)


def mlflow_args(uri: str, manifest: Path, *rest: str) -> list[str]:
    return ["upload", str(manifest), "--target", "mlflow", "--tracking-uri", uri, *rest]


def mlflow_runs(client: MlflowClient, plan: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Source run -> the runs carrying its tag, in its experiment."""
    out: dict[str, list[Any]] = {}
    for line in plan:
        if line["op"] != "create-run":
            continue
        experiment = client.get_experiment_by_name(line["experiment"])
        assert experiment is not None, line["experiment"]
        s = line["source_run_id"]
        out[s] = client.search_runs(
            [experiment.experiment_id], f"tags.`{SOURCE_TAG}` = '{s}'", max_results=10
        )
    return out


def assert_on_mlflow(client: MlflowClient, plan: list[dict[str, Any]]) -> dict[str, str]:
    """Every source run once on MLflow, equal to the plan (every metric point once)."""
    expected = Expected(plan)
    found = mlflow_runs(client, plan)
    problems = [f"{s}: {len(runs)} runs" for s, runs in found.items() if len(runs) != 1]
    assert not problems, problems
    targets = {s: runs[0].info.run_id for s, runs in found.items()}
    for s, want in expected.runs.items():
        run = client.get_run(targets[s])
        c = want["create"]
        if "run_name" in c:
            assert run.info.run_name == c["run_name"], s
        if "start_time" in c:
            assert run.info.start_time == c["start_time"], s
        if c.get("user"):
            assert run.info.user_id == c["user"], s
        assert run.data.params == want["params"], s
        points = []
        for key in {m["key"] for m in want["metrics"]}:
            for m in client.get_metric_history(targets[s], key):
                value = "NaN" if math.isnan(m.value) else m.value
                points.append((m.key, m.timestamp, m.step, value_text(value)))
        assert sorted(points) == sorted(map(metric_key, want["metrics"])), s
        tags = dict(want["tags"])
        tags[SOURCE_TAG] = s
        if c.get("user"):
            tags["mlflow.user"] = c["user"]
        if c.get("parent_source_run_id"):
            tags[PARENT_TAG] = targets[c["parent_source_run_id"]]
        got = dict(run.data.tags)
        history = json.loads(got.pop("mlflow.log-model.history", "[]"))
        got.pop("mlflow.runName", None)
        assert got == tags, s
        assert [(m["artifact_path"], m["utc_time_created"], m["run_id"]) for m in history] == [
            (m["artifact_path"], m["utc_time_created"], targets[s]) for m in want["models"]
        ], s
        names = [d.dataset.name for d in (run.inputs.dataset_inputs if run.inputs else [])]
        assert names == [d["dataset"]["name"] for d in want["datasets"]], s
        u = want["update"]
        if u is not None:
            status = "FAILED" if u["status"] == "INTERNAL_ERROR" else u["status"]
            assert run.info.status == status, s
            assert run.info.end_time == u.get("end_time"), s
    return targets


def test_mlflow_a_plan_lands_once_and_a_fresh_checkpoint_adds_nothing(
    tmp_path: Path, mlflow_uri: str
) -> None:
    client = MlflowClient(mlflow_uri)
    plan = nested_plan(f"m{time.time_ns()}-")
    plan[-1]["status"] = "INTERNAL_ERROR"  # MLflow drops it without a word: sent as FAILED
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = mlflow_args(mlflow_uri, manifest)
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    targets = assert_on_mlflow(client, plan)
    for fresh in (["--restart"], []):
        if not fresh:
            (tmp_path / "plan.batchlog-checkpoint").unlink()
        out = run_cli([*args, *fresh])
        assert out.returncode == 0, out.stderr
        assert assert_on_mlflow(client, plan) == targets


class _HoldWrites(HoldingProxy):
    """Holds POSTs whose request line holds one of ``fragments`` for ``hold`` seconds
    (within the client's timeout); everything else passes at once. Delivered even if the
    client has died meanwhile."""

    def __init__(self, port: int, fragments: tuple[bytes, ...], hold: float) -> None:
        super().__init__("127.0.0.1", port, delay=0.0)
        self.fragments, self.hold = fragments, hold

    def _delay(self, request_line: bytes) -> float:
        return self.hold if any(f in request_line for f in self.fragments) else 0.0


def _kill_when_held(args: list[str], proxy: HoldingProxy, fragment: str, n: int) -> None:
    """Run batchlog and SIGKILL it once ``n`` requests with ``fragment`` are held."""
    proc = start_cli(args)
    try:
        deadline = time.monotonic() + 30
        while proxy.holding(fragment) < n:
            assert proc.poll() is None and time.monotonic() < deadline, proxy.stats()
            time.sleep(0.01)
    finally:
        reap(proc)


def test_mlflow_calls_in_doubt_at_kills_leave_one_run_and_one_model(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """Killed while runs/create calls are held (they land after the client died), then
    again while log-model calls are; the resumes leave one run per source run and each
    model once (runs/create and log-model are not idempotent on MLflow)."""
    client = MlflowClient(mlflow_uri)
    plan = prefixed(many_runs(6, experiments=2, batches=1), f"d{time.time_ns()}-")
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(mlflow_uri.rsplit(":", 1)[1])
    with _HoldWrites(port, (b"/runs/create ", b"/runs/log-model "), hold=2.0) as proxy:
        args = mlflow_args(proxy.url, manifest, "--timeout", "3")
        _kill_when_held(args, proxy, "/runs/create", 2)
        _kill_when_held(args, proxy, "/runs/log-model", 1)  # resumed at once, killed again
        out = run_cli(args)
        assert out.returncode == 0, out.stderr
        assert proxy.wait_idle(10)
        assert proxy.stats()["delivered_after_client_left"] >= 3, proxy.stats()
    assert_on_mlflow(client, plan)


# ---- 5. a run's status last -----------------------------------------------------------------


def test_update_run_is_applied_after_every_other_call_of_its_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    plan = many_runs(8, batches=4)
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(emu.url.rsplit(":", 1)[1])
    with _HoldWrites(port, (b"/runs/log-batch ",), hold=0.3) as proxy:  # log-batch is slow
        args = [*upload_args(oci, emu, str(manifest)), "--endpoint", proxy.url]
        out = run_cli([*args, "--concurrency", "16"])
        assert out.returncode == 0, out.stderr
    targets = assert_landed(emu, plan)
    last: dict[str, int] = {}
    status_at: dict[str, int] = {}
    for i, effect in enumerate(emu.state.effects):  # in the order applied
        if effect["op"] == "update-run":
            status_at[effect["run_id"]] = i
        elif effect["run_id"]:
            last[effect["run_id"]] = i
    assert set(status_at) == set(targets.values())
    late = [run for run, i in status_at.items() if i < last[run]]
    assert not late, late


def test_a_log_batch_held_by_a_401_still_goes_before_its_runs_status(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A 401 holds a call back (it may be the job's credentials); a success later sends it
    again. Its run's update-run must still come after it: left for the next run of the
    command (exit 3, which sends it)."""
    emu = emulator()
    store = emu.state.tracking
    eid = store.create_experiment({"name": "exp-h"})[0]["experiment_id"]
    body = {"experiment_id": eid, "tags": [{"key": SOURCE_TAG, "value": "held"}]}
    target = store.create_run(body)[0]["run"]["info"]["run_id"]  # an earlier upload's run
    emu.config.canned[target] = [
        http_response(401, [("content-type", "application/json")], b'{"code":"NotAuthenticated"}')
    ]
    plan = [
        create("held", "exp-h"),
        batch("held", params=[{"key": "a", "value": "1"}]),
        update("held", "FINISHED", T0),
        *nested_plan(),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "run the same command again" in out.stderr
    assert store.runs[target].status == "RUNNING"  # not yet
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    ops = [e["op"] for e in emu.state.effects if e["run_id"] == target]
    assert ops == ["log-batch", "update-run"], ops
    assert store.runs[target].params == {"a": "1"} and store.runs[target].status == "FINISHED"


# ---- more, found while testing ---------------------------------------------------------------


def test_merged_log_inputs_of_a_plan_refused_whole_go_one_by_one_to_the_target_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Consecutive log-inputs lines of a run go as one call; a 400 to it sends its lines one
    by one (one bad dataset must not sink the rest), each still to the run's target id."""
    emu = emulator()
    store = emu.state.tracking
    eid = store.create_experiment({"name": "exp-s"})[0]["experiment_id"]
    body = {"experiment_id": eid, "tags": [{"key": SOURCE_TAG, "value": "split"}]}
    target = store.create_run(body)[0]["run"]["info"]["run_id"]
    emu.config.canned[target] = [  # the merged call is refused whole, once
        http_response(
            400,
            [("content-type", "application/json")],
            b'{"code":"InvalidParameter","message":"one of the datasets is refused"}',
        )
    ]
    plan = [
        create("split", "exp-s"),
        dataset("split", "ds-one"),
        dataset("split", "ds-two"),
        update("split", "FINISHED", T0),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 0, out.stderr
    held = by_source(emulator_state(emu))["split"]
    assert len(held) == 1 and held[0]["run_id"] == target
    names = [d["dataset"]["name"] for d in held[0]["datasets"]]
    assert names == ["ds-one", "ds-two"] and held[0]["info"]["status"] == "FINISHED"
    assert max(emu.state.applied_counts().values()) == 1


class _RefuseCreates(HoldingProxy):
    """Answers every runs/create itself with a 503 (never forwarded); the rest passes."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, delay=0.0)

    async def _forward(self, raw: bytes, delay: float) -> bytes | None:
        if b"/runs/create " in raw.split(b"\r\n", 1)[0]:
            return http_response(503, [("content-type", "application/json")], b'{"code":"Busy"}')
        return await super()._forward(raw, delay)


def test_a_create_run_that_gives_up_dead_letters_its_runs_lines_in_the_same_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Out of attempts on runs/create (503s): the create-run is recorded failed, and so is
    every line of its run, in this run of the command (none left unsent, unaccounted)."""
    emu = emulator()
    plan = nested_plan()
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(emu.url.rsplit(":", 1)[1])
    with _RefuseCreates(port) as proxy:
        args = [
            *upload_args(oci, emu, str(manifest)),
            "--endpoint",
            proxy.url,
            "--max-attempts",
            "2",
            "--report",
            str(tmp_path / "r.json"),
        ]
        out = run_cli(args)
    assert out.returncode == 1, out.stderr
    dead = dead_letter(tmp_path / "plan.dead-letter.jsonl")
    assert len(dead) == len(plan), [d["_error"] for d in dead]
    codes = Counter(d["_error"]["code"] for d in dead)
    # P's and Q's create-run gave up; C's waited for P: its create-run fails with the rest
    assert codes == Counter({"Busy": 2, "RunNotCreated": len(plan) - 2}), codes
    child = next(d for d in dead if d["op"] == "create-run" and d["source_run_id"] == "srcC")
    assert "its parent run (srcP)" in child["_error"]["message"]
    r = orjson.loads((tmp_path / "r.json").read_bytes())
    assert (r["records"], r["failed"]) == (len(plan), len(plan)), r


ODD_NUMBERS = '"metadata": {"big": 123456789012345678901234567890, "huge": 1e400, "x": 0.1}'


def odd_model(source: str) -> dict[str, Any]:
    """A log-model whose model_json holds numbers orjson cannot keep: an integer beyond 64
    bits (read as a float) and one beyond a double (refused)."""
    text = (
        '{"artifact_path": "odd", "flavors": {"python_function": {}}, '
        f'"utc_time_created": "2024-03-01 00:00:00.000001", "run_id": "{source}", '
        f"{ODD_NUMBERS}}}"
    )
    return {"op": "log-model", "source_run_id": source, "model_json": text}


def test_a_models_json_is_sent_as_written_but_for_its_run_id(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    line = odd_model("srcO")
    line["model_json"] = line["model_json"].replace(', "huge": 1e400', "")  # the emulator's orjson
    plan = [create("srcO", "exp-o"), line, update("srcO", "FINISHED", T0)]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 0, out.stderr
    target = by_source(emulator_state(emu))["srcO"][0]["run_id"]
    sent = [e["model_json"] for e in emu.state.effects if e["op"] == "log-model"]
    assert len(sent) == 1 and "123456789012345678901234567890" in sent[0], sent
    assert json.loads(sent[0])["run_id"] == target


def test_mlflow_a_model_with_numbers_beyond_a_double_lands(tmp_path: Path, mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    s = f"odd{time.time_ns()}"
    plan = [create(s, s), odd_model(s), update(s, "FINISHED", T0)]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(mlflow_args(mlflow_uri, manifest))
    assert out.returncode == 0, out.stderr
    run = mlflow_runs(client, plan)[s][0]
    history = json.loads(run.data.tags["mlflow.log-model.history"])
    assert [(m["artifact_path"], m["run_id"]) for m in history] == [("odd", run.info.run_id)]


class _SlowFirstSearch(_HoldWrites):
    """runs/create held ``hold`` seconds; the first runs/search ``search`` seconds (a busy
    moment), later ones pass at once."""

    def __init__(self, port: int, hold: float, search: float) -> None:
        super().__init__(port, (b"/runs/create ",), hold)
        self.search = search

    def _delay(self, request_line: bytes) -> float:
        if b"/runs/search " in request_line and self.search:
            search, self.search = self.search, 0.0
            return search
        return super()._delay(request_line)


def test_mlflow_a_create_run_sent_late_in_its_attempt_is_waited_out_before_the_lookup(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """The run's lookup took most of the attempt's time, then runs/create went out and its
    answer was lost (kill -9). The resume must wait until that runs/create can no longer
    land (its own send time + the timeout), not the attempt's start + the timeout."""
    client = MlflowClient(mlflow_uri)
    s = f"late{time.time_ns()}"
    plan = [create(s, s), batch(s, params=[{"key": "a", "value": "1"}]), update(s, "FINISHED")]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    port = int(mlflow_uri.rsplit(":", 1)[1])
    with _SlowFirstSearch(port, hold=2.5, search=1.5) as proxy:
        args = mlflow_args(proxy.url, manifest, "--timeout", "3")
        proc = start_cli(args)
        try:
            deadline = time.monotonic() + 30
            while proxy.holding("/runs/create") < 1:
                assert proc.poll() is None and time.monotonic() < deadline, proxy.stats()
                time.sleep(0.01)
        finally:
            reap(proc)
        out = run_cli(args)
        assert out.returncode == 0, out.stderr
        assert proxy.wait_idle(10)
        assert proxy.stats()["delivered_after_client_left"] == 1, proxy.stats()
    assert_on_mlflow(client, plan)


def test_two_runs_carrying_one_source_id_fail_its_create_run_naming_both(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    store = emu.state.tracking
    eid = store.create_experiment({"name": "exp-a"})[0]["experiment_id"]
    body = {"experiment_id": eid, "tags": [{"key": SOURCE_TAG, "value": "srcP"}]}
    ids = [store.create_run(body)[0]["run"]["info"]["run_id"] for _ in range(2)]
    plan = nested_plan()
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{manifest}:1: 409 DuplicateRuns" in out.stderr and all(i in out.stderr for i in ids)
    dead = dead_letter(tmp_path / "plan.dead-letter.jsonl")
    srcs = {d["source_run_id"] for d in dead}
    assert srcs == {"srcP", "srcC"}  # the child waits for its parent: it fails with it
    assert len(by_source(emulator_state(emu))["srcQ"]) == 1


def test_a_negative_metric_timestamp_is_rejected_before_sending(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """MLflow refuses a timestamp below 0 (the whole batch, 400): named in the line."""
    emu = emulator()
    plan = [
        create("srcN", "exp-n"),
        batch("srcN", metrics=[point("m", 1.0, -5, 0)]),
        batch("srcN", metrics=[point("m", 2.0, T0, -3)]),  # a negative step is fine
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert f"{manifest}:2: metrics[0].timestamp: " in out.stderr, out.stderr
    assert emu.state.statuses[400] == 0  # never sent
    run = by_source(emulator_state(emu))["srcN"][0]
    assert [metric_key(m) for m in run["metrics"]] == [("m", T0, -3, "2.0")]


def test_a_metric_value_written_as_an_integer_beyond_a_double_is_rejected(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    huge = b'{"op":"log-batch","source_run_id":"srcN","metrics":[{"key":"m","value":1' + (
        b"0" * 400 + b',"timestamp":1}]}'
    )
    plan = [create("srcN", "exp-n"), huge, batch("srcN", metrics=[point("m", 2.0, T0)])]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert f"{manifest}:2: metrics[0].value: beyond a double" in out.stderr, out.stderr
    run = by_source(emulator_state(emu))["srcN"][0]
    assert [metric_key(m) for m in run["metrics"]] == [("m", T0, 0, "2.0")]

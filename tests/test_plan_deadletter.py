"""A plan's dead letter is uploadable as it is (issue 11, hostile finding 6): a line of a
run whose create-run succeeded comes with that create-run line before it, so that the
dead letter's own upload finds the run by its tag and logs to it (no second run), and the
original job's failures are then resolved as for any dead letter.

Through real HTTP and real signatures, against the emulator as AI Data Platform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from batchlog.emulator import EmulatorThread
from tests.conftest import Oci, run_cli, upload_args, write_manifest
from tests.test_migrate import (
    T0,
    StartEmulator,
    batch,
    by_source,
    create,
    dead_letter,
    emulator_state,
    point,
    update,
)


def report_of(path: Path) -> dict[str, Any]:
    doc = orjson.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


def without_notes(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if not k.startswith("_")}


def one_run(emu: EmulatorThread, source: str) -> dict[str, Any]:
    runs = by_source(emulator_state(emu))[source]
    assert len(runs) == 1, runs  # never a second run
    run: dict[str, Any] = runs[0]
    return run


def test_a_log_batch_the_server_refuses_comes_with_its_runs_create_run_and_lands_on_that_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The finding: the dead letter held only the log-batch line, and its upload said
    `source_run_id: no create-run for this run earlier in the plan`."""
    emu = emulator()
    plan = [
        create("srcA", "exp", run_name="a", start_time=T0),
        batch("srcA", params=[{"key": "lr", "value": "0.1"}]),
        # the same param with another value: MLflow (and the emulator) refuse it, 400;
        # validate cannot know (another line set it)
        batch("srcA", params=[{"key": "lr", "value": "0.2"}], metrics=[point("m", 1, T0)]),
        update("srcA", "FINISHED", T0 + 5),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    report = tmp_path / "report.json"
    args = upload_args(oci, emu, str(manifest), "--report", str(report))
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    doc = report_of(report)
    assert doc["failed"] == 1 and doc["succeeded"] == 3, doc  # the create-run's copy is no failure
    target = one_run(emu, "srcA")["run_id"]

    dead_path = tmp_path / "plan.dead-letter.jsonl"
    dead = dead_letter(dead_path)
    assert len(dead) == 2, dead
    context, failed = dead
    assert without_notes(context) == plan[0]  # the create-run line, first
    assert context["_error"]["status"] == "context", context
    assert context["_error"]["source"] == f"{manifest}:1"
    assert target in context["_error"]["message"]
    assert failed["_error"]["status"] == 400 and failed["op"] == "log-batch", failed
    # which of the two log-batch lines lost the race is not fixed: fix the one that failed
    failed["params"] = [{"key": "lr2", "value": failed["params"][0]["value"]}]
    write_manifest(dead_path, [context, failed])

    out = run_cli(upload_args(oci, emu, str(dead_path)))
    assert out.returncode == 0, out.stderr
    run = one_run(emu, "srcA")
    assert run["run_id"] == target  # the same run: found by its tag, not made again
    assert set(run["params"]) == {"lr", "lr2"}, run["params"]
    assert emulator_state(emu)["applied_by_op"]["runs/create"] == 1

    # the original job run again: its failure was fixed and uploaded from the dead letter
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    doc = report_of(report)
    assert doc["resolved_by"] == str(tmp_path / "plan.dead-letter.batchlog-checkpoint"), doc
    status = run_cli(["status", str(tmp_path / "plan.batchlog-checkpoint")])
    assert status.returncode == 0, status.stderr
    assert "were fixed and uploaded" in status.stdout, status.stdout


def test_rejected_lines_of_a_created_run_come_with_one_copy_of_its_create_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Lines rejected before sending (a value MLflow would cut short) of a run that was
    created: one create-run copy per run, before the first of them; a run whose create-run
    failed keeps its own failed line, no copy."""
    emu = emulator()
    gone = emu.state.tracking.create_experiment({"name": "gone"})[0]["experiment_id"]
    emu.state.tracking.delete_experiment(gone)
    long_value = "x" * 6001  # a param value holds 6,000 characters at most
    plan = [
        create("srcA", "exp", start_time=T0),
        batch("srcA", params=[{"key": "p", "value": long_value}]),
        batch("srcA", tags=[{"key": "t", "value": "ok"}]),
        batch("srcA", params=[{"key": "q", "value": long_value}]),
        create("srcB", "gone", start_time=T0),
        batch("srcB", params=[{"key": "p", "value": long_value}]),
        batch("srcB", params=[{"key": "b", "value": "1"}]),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    target = one_run(emu, "srcA")["run_id"]
    dead_path = tmp_path / "plan.dead-letter.jsonl"
    dead = dead_letter(dead_path)
    creates = [d for d in dead if d["op"] == "create-run"]
    assert sorted(d["source_run_id"] for d in creates) == ["srcA", "srcB"], dead
    a = [without_notes(d) for d in dead if d["source_run_id"] == "srcA"]
    assert a == [plan[0], plan[1], plan[3]], a  # the copy first, once
    assert [d["_error"]["status"] for d in dead if d["source_run_id"] == "srcA"] == [
        "context",
        "rejected",
        "rejected",
    ]
    b = [d for d in dead if d["source_run_id"] == "srcB"]
    assert b[0]["op"] == "create-run" and b[0]["_error"]["status"] != "context", b

    fixed = []
    for line in dead:
        if (
            line["op"] == "log-batch"
            and "params" in line
            and len(line["params"][0]["value"]) > 6000
        ):
            line["params"][0]["value"] = "short"
        if line["op"] == "create-run" and line["source_run_id"] == "srcB":
            line["experiment"] = "here"
        fixed.append(line)
    write_manifest(dead_path, fixed)
    out = run_cli(upload_args(oci, emu, str(dead_path)))
    assert out.returncode == 0, out.stderr
    run = one_run(emu, "srcA")
    assert run["run_id"] == target
    assert run["params"] == {"p": "short", "q": "short"} and run["tags"].get("t") == "ok"
    assert one_run(emu, "srcB")["params"] == {"p": "short", "b": "1"}


def test_a_line_appended_for_a_run_an_earlier_run_created_comes_with_its_create_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The run's create-run lies behind the checkpoint's watermark (never read again): it
    is found in the manifest for the dead letter."""
    emu = emulator()
    plan = [
        create("srcA", "exp", start_time=T0),
        batch("srcA", params=[{"key": "lr", "value": "0.1"}]),
        create("srcB", "exp", start_time=T0),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    args = upload_args(oci, emu, str(manifest))
    assert run_cli(args).returncode == 0
    target = one_run(emu, "srcA")["run_id"]
    refused = batch("srcA", params=[{"key": "lr", "value": "0.2"}])  # 400: lr is 0.1
    long = batch("srcA", tags=[{"key": "t", "value": "x" * 8001}])  # rejected: too long
    write_manifest(manifest, [*plan, refused, long])
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    dead_path = tmp_path / "plan.dead-letter.jsonl"
    dead = dead_letter(dead_path)
    assert without_notes(dead[0]) == plan[0] and dead[0]["_error"]["status"] == "context"
    rest = sorted(dead[1:], key=lambda d: d["_error"]["source"])  # refused, then long
    assert [without_notes(d) for d in rest] == [refused, long], dead
    rest[0]["params"][0]["value"] = "0.1"
    rest[1]["tags"][0]["value"] = "short"
    write_manifest(dead_path, dead)
    out = run_cli(upload_args(oci, emu, str(dead_path)))
    assert out.returncode == 0, out.stderr
    run = one_run(emu, "srcA")
    assert run["run_id"] == target and run["tags"].get("t") == "short"


def test_a_nested_runs_line_comes_with_its_parents_create_run_too(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: the dead letter held the child's create-run (a copy, or its own
    failed line) but not its parent's, and its upload rejected every line with "no
    create-run for the parent run earlier in the plan"."""
    emu = emulator()
    plan = [
        create("srcP", "exp", run_name="parent", start_time=T0),
        update("srcP", "FINISHED", T0 + 5),
        create("srcC", "exp", run_name="child", start_time=T0, parent_source_run_id="srcP"),
        batch("srcC", params=[{"key": "lr", "value": "0.1"}]),
        batch("srcC", params=[{"key": "lr", "value": "0.2"}]),  # refused: 400
        update("srcC", "FINISHED", T0 + 5),
    ]
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    dead_path = tmp_path / "plan.dead-letter.jsonl"
    dead = dead_letter(dead_path)
    assert [without_notes(d) for d in dead[:2]] == [plan[0], plan[2]], dead  # parents first
    fixed = [without_notes(d) for d in dead]
    fixed[-1]["params"] = [{"key": "lr", "value": "0.1"}]  # the user's fix
    write_manifest(dead_path, fixed)
    again = run_cli(upload_args(oci, emu, str(dead_path)))
    assert again.returncode == 0, again.stderr
    child = one_run(emu, "srcC")
    assert child["tags"]["mlflow.parentRunId"] == one_run(emu, "srcP")["run_id"], child

"""`batchlog verify` of a migration plan (issue 11, item 4): every source run on the target
exactly once, equal to the plan field by field, each difference one line naming the plan's
line; against the emulator as AI Data Platform (signed reads) and a real `mlflow server`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from batchlog.emulator import EmulatorThread
from batchlog.verify_compare import Point, compare_metric, metric_value
from tests.conftest import (
    WORKSPACE,
    Oci,
    free_loopback_port,
    run_cli,
    start_mlflow_server,
    stop_mlflow_server,
    upload_args,
    write_manifest,
)
from tests.test_migrate import (
    SOURCE_TAG,
    T0,
    batch,
    by_source,
    create,
    emulator_state,
    many_runs,
    mlflow_runs,
    nested_plan,
    point,
    update,
)

StartEmulator = Callable[..., EmulatorThread]
PARENT_TAG = "mlflow.parentRunId"


def verify_args(oci: Oci, emu: EmulatorThread, manifest: Path, *rest: str) -> list[str]:
    """The upload's flags for the emulator, to verify."""
    return ["verify", *upload_args(oci, emu)[1:], str(manifest), *rest]


def out_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def uploaded(tmp_path: Path, oci: Oci, emu: EmulatorThread) -> tuple[Path, dict[str, str]]:
    """nested_plan() uploaded to ``emu``: the plan file, and source -> target run."""
    manifest = write_manifest(tmp_path / "plan.jsonl", nested_plan())
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 0, out.stderr
    runs = by_source(emulator_state(emu))
    return manifest, {s: r[0]["run_id"] for s, r in runs.items()}


# ---- AI Data Platform (the emulator) ---------------------------------------------------------


def test_a_plan_uploaded_to_ai_data_platform_verifies_clean(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest, _ = uploaded(tmp_path, oci, emu)
    out = run_cli(verify_args(oci, emu, manifest))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""
    assert "13 records: 13 on the server, 0 missing or different" in out.stderr, out.stderr
    assert "3 runs of a plan: 3 as in the plan" in out.stderr, out.stderr


def test_every_difference_on_ai_data_platform_is_one_line_naming_the_plan_line(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    _, t = uploaded(tmp_path, oci, emu)
    store = emu.state.tracking  # altered between requests, as another client would
    store.log_batch(
        {"run_id": t["srcQ"], "params": [{"key": "intruder", "value": "1"}],
         "tags": [{"key": "k", "value": "changed"}]},
        100, None, True,
    )  # fmt: skip
    store.update_run({"run_id": t["srcQ"], "status": "FINISHED"}, None)
    store.log_batch(
        {"run_id": t["srcC"], "metrics": [point("loss", 7, T0 + 99, 99)],
         "tags": [{"key": PARENT_TAG, "value": t["srcQ"]}]},
        100, None, True,
    )  # fmt: skip
    experiment = store.names["exp-a"]
    for _ in range(2):  # two runs of one source run, made by another tool
        store.create_run(
            {"experiment_id": experiment, "tags": [{"key": SOURCE_TAG, "value": "srcN"}]}
        )
    plan = nested_plan()
    plan[1]["params"][0]["value"] = "edited"  # line 2: p000 is v0 on the target
    plan[3]["dataset_inputs"][0]["dataset"]["name"] = "other-set"  # line 4
    plan += [
        create("srcM", "exp-a", run_name="never-uploaded"),  # line 14
        update("srcM"),  # 15
        create("srcN", "exp-a"),  # 16
        update("srcN"),  # 17
        batch("srcZ", params=[{"key": "a", "value": "1"}]),  # 18: no create-run
    ]
    manifest = write_manifest(tmp_path / "verify.jsonl", plan)
    out = run_cli(verify_args(oci, emu, manifest))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr

    def at(line: int, source: str) -> str:
        target = f" (target {t[source]})" if source in t else ""
        return f"{manifest}:{line}: run {source}{target}: "

    found = out_lines(out.stdout)
    p, c, q = at(1, "srcP"), at(7, "srcC"), at(10, "srcQ")
    expected = [
        at(2, "srcP") + "param 'p000': the plan has 'edited', the target 'v0'",
        p + "dataset 'train-set' (digest ",  # on the target only
        at(4, "srcP") + "dataset 'other-set' (digest ",  # in the plan only
        c + f"parent: {PARENT_TAG} is {t['srcQ']}, which is the copy of srcQ, not of srcP",
        c + "metric 'loss': 1 point on the target that the plan does not have (the first: "
        f"step 99, timestamp {T0 + 99}, value 7.0)",
        q + "param 'intruder' is on the target, not in the plan",
        at(11, "srcQ") + "tag 'k': the plan has 'v', the target 'changed'",
        at(13, "srcQ") + "status: the plan has 'KILLED', the target 'FINISHED'",
        at(14, "srcM") + f"missing: no run in experiment 'exp-a' carries {SOURCE_TAG} = srcM",
        at(16, "srcN") + "2 copies on the target, in experiment 'exp-a': ",
        at(18, "srcZ") + "no create-run for this run earlier in the plan",
    ]
    for want in expected:
        assert sum(line.startswith(want) for line in found) == 1, (want, found)
    assert len(found) == len(expected), found
    assert found == sorted(found, key=lambda line: int(line.split(":")[1]))  # plan order
    assert "5 runs of a plan: 0 as in the plan, 1 missing, 1 with copies, 3 different" in (
        out.stderr
    ), out.stderr


def test_more_than_ten_differences_of_a_run_are_counted_not_listed(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    uploaded(tmp_path, oci, emu)
    plan = nested_plan()
    for param in plan[1]["params"]:  # 100 params, each another value
        param["value"] += "-edited"
    manifest = write_manifest(tmp_path / "verify.jsonl", plan)
    out = run_cli(verify_args(oci, emu, manifest))
    assert out.returncode == 1, out.stderr
    found = out_lines(out.stdout)
    assert len(found) == 11, found
    assert all(f"{manifest}:2: run srcP " in line for line in found), found
    assert found[-1].endswith(": and 90 more differences"), found


def loss_lines(source: str, lines: int, per_line: int) -> list[dict[str, Any]]:
    """``lines`` log-batch lines of ``per_line`` points of metric loss each, steps 0 up."""
    return [
        batch(source, metrics=[point("loss", s / 7, T0 + s, s) for s in range(n, n + per_line)])
        for n in range(0, lines * per_line, per_line)
    ]


def test_points_missing_over_many_lines_count_every_line_and_list_one_difference(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Issue 11 finding 7: 900 points missing over 9 log-batch lines are 9 lines missing or
    different in the summary (not 1), and one line of the listing for the metric."""
    emu = emulator()
    lines = loss_lines("srcS", 10, 100)
    head, tail = create("srcS", "exp-a", run_name="s"), update("srcS")
    sent = write_manifest(tmp_path / "sent.jsonl", [head, lines[-1], tail])
    assert run_cli(upload_args(oci, emu, str(sent))).returncode == 0
    [run] = by_source(emulator_state(emu))["srcS"]
    manifest = write_manifest(tmp_path / "plan.jsonl", [head, *lines, tail])
    out = run_cli(verify_args(oci, emu, manifest))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "12 records: 3 on the server, 9 missing or different" in out.stderr, out.stderr
    assert "1 runs of a plan: 0 as in the plan, 0 missing, 0 with copies, 1 different" in (
        out.stderr
    ), out.stderr
    assert out_lines(out.stdout) == [
        f"{manifest}:2: run srcS (target {run['run_id']}): metric 'loss': 900 of 1,000 points "
        f"of the plan not on the target (steps 0-899; the first: step 0, timestamp {T0}, "
        "value 0.0)"
    ]


def test_many_nested_runs_verify_a_few_at_a_time(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "plan.jsonl", many_runs(40))
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    out = run_cli(verify_args(oci, emu, manifest, "--concurrency", "3"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "40 runs of a plan: 40 as in the plan" in out.stderr, out.stderr


def test_hand_written_batch_lines_are_checked_on_their_run(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    lines: list[dict[str, Any]] = [
        {"op": "log-batch", "run_id": "hand1", "params": [{"key": "a", "value": "1"}],
         "metrics": [point("m", "NaN", T0, 0)]},
        {"op": "update-run", "run_id": "hand1", "status": "FINISHED", "end_time": T0 + 5},
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "hand.jsonl", lines)
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    out = run_cli(verify_args(oci, emu, manifest))
    assert out.returncode == 0, out.stdout + out.stderr
    lines[0]["params"][0]["value"] = "2"
    lines[1]["end_time"] = T0 + 6
    out = run_cli(verify_args(oci, emu, write_manifest(tmp_path / "edited.jsonl", lines)))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out_lines(out.stdout) == [
        f"{tmp_path / 'edited.jsonl'}:1: run hand1: param 'a': the plan has '2', the target '1'",
        f"{tmp_path / 'edited.jsonl'}:2: run hand1: end time: the plan has {T0 + 6}, the "
        f"target {T0 + 5}",
    ]


def test_a_target_that_cannot_be_read_is_exit_3_in_one_line(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest, _ = uploaded(tmp_path, oci, emu)
    args = verify_args(oci, emu, manifest, "--max-attempts", "2")
    wrong = [a if a != WORKSPACE else "ws-other" for a in args]  # every request: 404
    nothing = [a if a != emu.url else f"http://127.0.0.1:{free_loopback_port()}" for a in args]
    for argv, why in ((wrong, "404"), (nothing, "connection refused")):
        out = run_cli(argv)
        assert out.returncode == 3, out.stdout + out.stderr
        said = [line for line in out.stderr.splitlines() if "cannot read runs back" in line]
        assert len(said) == 1 and why in said[0], out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""


# ---- comparing points ---------------------------------------------------------------------


def test_metric_values_nan_and_infinity_compare_as_mlflow_keeps_them() -> None:
    assert metric_value("NaN") == metric_value(math.nan) == "NaN"
    assert metric_value("Infinity") == metric_value(1.7976931348623157e308) == math.inf
    assert metric_value("-Infinity") == metric_value(-1.7976931348623157e308) == -math.inf
    assert metric_value(3) == metric_value(3.0)
    planned: dict[Point, int] = {(0, T0, metric_value("Infinity")): 5, (1, T0, "NaN"): 5}
    got: Counter[Point] = Counter({(0, T0, math.inf): 1, (1, T0, "NaN"): 2})
    [(seq, said)] = compare_metric("m", planned, got, True, 1)
    assert seq == 5 and said.startswith("metric 'm': 1 point logged more than once"), said
    assert compare_metric("m", planned, Counter(planned.keys()), True, 1) == []


# ---- a real `mlflow server` ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real `mlflow server` with nested_plan() uploaded to it, and the plan file."""
    root = tmp_path_factory.mktemp("verify-mlflow")
    proc, uri = start_mlflow_server(root / "server")
    try:
        manifest = write_manifest(root / "plan.jsonl", nested_plan())
        out = run_cli(["upload", str(manifest), "--target", "mlflow", "--tracking-uri", uri])
        assert out.returncode == 0, out.stderr
        yield uri, manifest
    finally:
        stop_mlflow_server(proc)


def mlflow_verify(uri: str, manifest: Path) -> tuple[int, list[str], str]:
    out = run_cli(["verify", str(manifest), "--target", "mlflow", "--tracking-uri", uri])
    return out.returncode, out_lines(out.stdout), out.stderr


def test_mlflow_a_plan_uploaded_verifies_clean(mlflow_seeded: tuple[str, Path]) -> None:
    """NaN, and Infinity that MLflow's SQL store keeps as the largest double, compare equal."""
    uri, manifest = mlflow_seeded
    rc, found, err = mlflow_verify(uri, manifest)
    assert rc == 0, (found, err)
    assert found == [] and "3 runs of a plan: 3 as in the plan" in err, err


def test_mlflow_a_param_a_metric_point_and_a_tag_altered_are_each_named(
    mlflow_seeded: tuple[str, Path],
) -> None:
    uri, manifest = mlflow_seeded
    client = MlflowClient(uri)
    t = {s: runs[0].info.run_id for s, runs in mlflow_runs(client, nested_plan()).items()}
    client.log_param(t["srcQ"], "intruder", "1")
    client.log_metric(t["srcP"], "loss", 0.5, timestamp=T0 + 2, step=1)  # the same point
    client.log_metric(t["srcP"], "acc", 0.2, timestamp=T0 + 50, step=7)
    client.set_tag(t["srcP"], "team", "audio")
    rc, found, err = mlflow_verify(uri, manifest)
    assert rc == 1, (found, err)
    p = f"{manifest}:1: run srcP (target {t['srcP']}): "
    for want in (
        f"{manifest}:3: run srcP (target {t['srcP']}): tag 'team': the plan has 'vision', "
        "the target 'audio'",
        p + f"metric 'acc': 1 point on the target that the plan does not have (the first: "
        f"step 7, timestamp {T0 + 50}, value 0.2)",
        f"{manifest}:10: run srcQ (target {t['srcQ']}): param 'intruder' is on the target, "
        "not in the plan",
    ):
        assert want in found, (want, found)
    assert not [line for line in found if "'loss'" in line], found  # MLflow kept it once


def test_mlflow_a_second_run_with_the_source_tag_is_two_copies(
    mlflow_seeded: tuple[str, Path],
) -> None:
    uri, manifest = mlflow_seeded
    client = MlflowClient(uri)
    first = mlflow_runs(client, nested_plan())["srcC"][0].info.run_id
    experiment = client.get_experiment_by_name("exp-a")
    assert experiment is not None
    second = client.create_run(experiment.experiment_id, tags={SOURCE_TAG: "srcC"}).info.run_id
    rc, found, err = mlflow_verify(uri, manifest)
    assert rc == 1, (found, err)
    [line] = [line for line in found if " run srcC" in line]
    assert line.startswith(f"{manifest}:7: run srcC: 2 copies on the target, in experiment "), line
    assert first in line and second in line, line
    assert "1 with copies" in err, err


def test_verify_source_uri_compares_a_source_server_with_the_target(
    mlflow_seeded: tuple[str, Path], tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The MLflow server as the source, exported and uploaded to the emulator; verify
    --source-uri exports it again to a temporary plan and compares."""
    uri, _ = mlflow_seeded
    emu = emulator()
    plan = tmp_path / "plan.jsonl"
    out = run_cli(["export", "--tracking-uri", uri, "-o", str(plan)])
    assert out.returncode == 0, out.stderr
    assert run_cli(upload_args(oci, emu, str(plan))).returncode == 0
    args = ["verify", *upload_args(oci, emu)[1:], "--source-uri", uri]
    out = run_cli(args)
    assert out.returncode == 0, out.stdout + out.stderr
    source = mlflow_runs(MlflowClient(uri), nested_plan())["srcQ"][0].info.run_id
    [target] = by_source(emulator_state(emu))[source]
    emu.state.tracking.log_batch(
        {"run_id": target["run_id"], "tags": [{"key": "k", "value": "changed"}]}, 100, None, True
    )
    out = run_cli([*args, "--experiment", "exp-b"])
    assert out.returncode == 1, out.stdout + out.stderr
    assert out_lines(out.stdout) == [
        f"run {source} (target {target['run_id']}): tag 'k': the plan has 'v', the target 'changed'"
    ]
    assert "1 runs of a plan: 0 as in the plan" in out.stderr, out.stderr
    both = run_cli([*args, str(plan)])
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    assert "see 'batchlog verify --help'" in both.stderr, both.stderr


def test_mlflow_points_missing_over_several_lines_count_each_line(
    mlflow_seeded: tuple[str, Path], tmp_path: Path
) -> None:
    """Issue 11 finding 7 on a real server: a metric the server does not have, over 3
    log-batch lines of run srcP, makes those 3 lines missing (one listing line)."""
    uri, seeded = mlflow_seeded
    _, _, before = mlflow_verify(uri, seeded)  # earlier tests may have altered the server
    plan = nested_plan()
    extra = [
        batch("srcP", metrics=[point("grad", s, T0 + s, s) for s in range(n, n + 50)])
        for n in (0, 50, 100)
    ]
    plan[5:5] = extra  # before srcP's update-run (line 6): lines 6, 7, 8
    manifest = write_manifest(tmp_path / "plan.jsonl", plan)
    rc, found, err = mlflow_verify(uri, manifest)
    assert rc == 1, (found, err)

    def not_complete(summary: str) -> int:
        said = summary.split(" missing or different")[0].rsplit(" ", 1)[-1]
        return int(said.replace(",", ""))

    assert not_complete(err) == not_complete(before) + 3, (before, err)
    grad = [line for line in found if "'grad'" in line]
    assert len(grad) == 1 and grad[0].startswith(f"{manifest}:6: run srcP "), found
    assert grad[0].endswith(
        f"metric 'grad': 150 of 150 points of the plan not on the target (steps 0-149; the "
        f"first: step 0, timestamp {T0}, value 0.0)"
    ), grad

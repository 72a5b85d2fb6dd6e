"""End to end: the CLI in its own process, real HTTP on loopback, signatures verified."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from batchlog.emulator import EmulatorThread
from batchlog.emulator.server import http_response
from tests.conftest import (
    KEY_ID,
    PLATFORM,
    WORKSPACE,
    Oci,
    expected_items,
    inputs_record,
    mixed_records,
    model_record,
    run_cli,
    upload_args,
    write_manifest,
)

StartEmulator = Callable[..., EmulatorThread]


def assert_exactly_once(emu: EmulatorThread, records: list[dict[str, object]]) -> None:
    counts = emu.state.applied_counts()
    assert set(counts) == expected_items(records)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]


def report(path: Path) -> dict[str, object]:
    doc = orjson.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


def test_mixed_manifest_lands_exactly_once_and_rerun_sends_nothing(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.005)
    records = mixed_records(2000, runs=300)
    manifest = write_manifest(tmp_path / "runs.jsonl", records)
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)
    r = report(tmp_path / "r.json")
    assert (r["records"], r["succeeded"], r["failed"], r["rejected"]) == (2000, 2000, 0, 0)
    assert emu.state.statuses[401] == 0  # every signature verified
    # log-inputs of one run went together: fewer requests than records
    assert r["requests"] == emu.state.statuses[200] < 2000
    assert "checkpoint" in out.stderr and str(tmp_path / "runs.batchlog-checkpoint") in out.stderr

    sent = sum(emu.state.statuses.values())
    again = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r2.json")])
    assert again.returncode == 0, again.stderr
    assert sum(emu.state.statuses.values()) == sent  # nothing sent
    r2 = report(tmp_path / "r2.json")
    assert (r2["already_done"], r2["requests"], r2["succeeded"]) == (2000, 0, 0)


def test_bad_lines_are_named_kept_aside_and_good_lines_land(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    good = mixed_records(30, runs=6)
    lines: list[object] = list(good)
    bad_digest = inputs_record("run00001", "toolong")
    bad_digest["dataset_inputs"][0]["dataset"]["digest"] = "x" * 40
    lines.insert(3, b'{"run_id": "run00000", "dataset_inputs": [')  # line 4
    lines.insert(10, {"run_id": "run00001", "dataset_input": []})  # line 11
    lines.insert(15, bad_digest)  # line 16
    lines.insert(20, b"")  # a blank line, skipped (line 21)
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    out = run_cli([*upload_args(oci, emu, str(manifest)), "-v"])
    assert out.returncode == 1, out.stderr
    assert f"{manifest}:4: (line): invalid JSON" in out.stderr
    assert (
        f"{manifest}:11: dataset_input: unknown field (did you mean 'dataset_inputs'?)"
        in out.stderr
    )
    assert f"{manifest}:16: dataset_inputs[0].dataset.digest: 40 characters" in out.stderr
    assert_exactly_once(emu, good)

    dead = tmp_path / "m.dead-letter.jsonl"
    docs = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert sorted(d["_error"]["source"] for d in docs) == [
        f"{manifest}:11",
        f"{manifest}:16",
        f"{manifest}:4",
    ]
    assert all(d["_error"]["status"] == "rejected" for d in docs)
    # fix the dead letter and upload it: it is a manifest
    fixed = []
    for d in docs:
        if "_raw" in d:
            fixed.append(inputs_record("run00000", "repaired"))
        elif "dataset_input" in d:
            fixed.append(inputs_record("run00001", "retyped"))
        else:
            d["dataset_inputs"][0]["dataset"]["digest"] = "short"
            fixed.append(d)  # _error is ignored: a note
    fixed_path = write_manifest(tmp_path / "fixed.jsonl", fixed)
    out = run_cli(upload_args(oci, emu, str(fixed_path)))
    assert out.returncode == 0, out.stderr
    assert emu.state.applied_counts()[("log-inputs", "run00001", "toolong@short")] == 1


def test_throttling_and_server_faults_recover_with_the_same_retry_token(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(throttle_once=0.3, fail_before=0.1, fail_after=0.1, reset_after=0.05, seed=7)
    records = mixed_records(300, runs=300)  # one record per run: one request per record
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)
    r = report(tmp_path / "r.json")
    assert r["throttled"] == emu.state.statuses[429] > 0
    assert r["retries"] > 0
    tokens = Counter(emu.state.retry_tokens)
    assert len(tokens) == 300  # one token per record, reused by every retry
    assert max(tokens.values()) > 1
    assert len(emu.state.request_ids) == len(emu.state.retry_tokens)  # fresh id per attempt


def test_unknown_runs_go_to_the_dead_letter(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    records = mixed_records(60, runs=20)
    known = {r["run_id"] for r in records if r["run_id"] not in ("run00003", "run00011")}
    emu = emulator(known_runs=frozenset(known))
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    landed = [r for r in records if r["run_id"] in known]
    assert_exactly_once(emu, landed)
    dead = [orjson.loads(x) for x in (tmp_path / "m.dead-letter.jsonl").read_bytes().splitlines()]
    assert sorted({d["run_id"] for d in dead}) == ["run00003", "run00011"]
    assert len(dead) == len(records) - len(landed)
    assert {d["_error"]["status"] for d in dead} == {404}
    assert all(d["_error"]["code"] == "NotAuthorizedOrNotFound" for d in dead)
    assert all(d["_error"]["opc_request_id"] for d in dead)


def test_wrong_key_stops_early_and_leaves_the_job_resumable(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    emu = emulator(public_key=other.public_key())
    records = mixed_records(500, runs=500)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 3, out.stderr
    assert "unauthenticated (401)" in out.stderr
    assert sum(emu.state.statuses.values()) < 100  # stopped early, not 500 requests
    assert not (tmp_path / "m.dead-letter.jsonl").exists()  # nothing marked failed

    fixed = emulator()  # the right key now: the same command finishes the job
    out = run_cli(upload_args(oci, fixed, str(manifest)))
    assert out.returncode == 0, out.stderr
    assert_exactly_once(fixed, records)


def test_wrong_workspace_stops_early(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(200, runs=200))
    args = upload_args(oci, emu, str(manifest))
    args[args.index(WORKSPACE)] = "no-such-workspace"
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "is likely wrong" in out.stderr and "404" in out.stderr
    assert emu.state.applied == 0


def test_configuration_errors_stop_before_any_request(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10))
    cases = {
        "OCI config file": [
            "upload",
            "--config-file",
            str(tmp_path / "nope"),
            "--platform-id",
            PLATFORM,
            "--workspace",
            WORKSPACE,
            "--endpoint",
            emu.url,
            str(manifest),
        ],
        "--workspace is required": [
            "upload",
            "--config-file",
            str(oci.config),
            "--platform-id",
            PLATFORM,
            "--endpoint",
            emu.url,
            str(manifest),
        ],
        "plain http is refused": [
            "upload",
            "--config-file",
            str(oci.config),
            "--platform-id",
            PLATFORM,
            "--workspace",
            WORKSPACE,
            "--endpoint",
            "http://example.com",
            str(manifest),
        ],
        "no such file": upload_args(oci, emu, str(tmp_path / "missing.jsonl")),
        "not a positive": [*upload_args(oci, emu, str(manifest)), "--concurrency", "0"],
        "profile 'NOPE' not found": [*upload_args(oci, emu, str(manifest)), "--profile", "NOPE"],
    }
    for message, args in cases.items():
        out = run_cli(args)
        assert out.returncode == 2, (message, out.stderr)
        assert message in out.stderr, (message, out.stderr)
    assert sum(emu.state.statuses.values()) == 0


def test_gzip_stdin_and_several_manifests(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    a = mixed_records(40, runs=10)
    b = [inputs_record(f"other{i}", f"b{i}") for i in range(20)]
    plain = write_manifest(tmp_path / "a.jsonl", a)
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in b))
    out = run_cli(upload_args(oci, emu, str(plain), str(gz)))
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, a + b)

    c = [model_record(f"piped{i}", i) for i in range(15)]
    data = b"".join(orjson.dumps(r) + b"\n" for r in c)
    out = run_cli(
        [*upload_args(oci, emu, "-"), "--checkpoint", str(tmp_path / "stdin.ckpt")],
        input=data.decode(),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, a + b + c)


def test_appended_manifest_continues_changed_manifest_is_refused(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    first = mixed_records(50, runs=10)
    manifest = write_manifest(tmp_path / "m.jsonl", first)
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    more = [inputs_record(f"late{i}", f"late{i}") for i in range(10)]
    with open(manifest, "ab") as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in more))
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    assert report(tmp_path / "r.json")["already_done"] == 50
    assert_exactly_once(emu, first + more)

    edited = list(first + more)
    edited[49] = inputs_record("run00009", "edited")
    write_manifest(manifest, edited)
    before = sum(emu.state.statuses.values())
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 3, out.stderr
    assert "not what they were" in out.stderr and "--restart" in out.stderr
    assert sum(emu.state.statuses.values()) == before


def test_headers(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(5, runs=5))
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    for h in emu.state.headers_seen:
        assert h["Content-Type"] == "application/json" and h["Accept"] == "application/json"
        assert len(h["opc-retry-token"]) <= 64
        assert len(h["opc-request-id"]) == 32 and h["opc-request-id"].isalnum()
        assert "dh-user-principal" not in h
    emu2 = emulator()
    out = run_cli(
        [*upload_args(oci, emu2, str(manifest)), "--user-principal", "alice", "--restart"]
    )
    assert out.returncode == 0, out.stderr
    assert all(h["dh-user-principal"] == "alice" for h in emu2.state.headers_seen)


def test_principal_refreshes_its_token_once_on_401(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    import threading

    import anyio
    from cryptography.hazmat.primitives.asymmetric import rsa

    import batchlog
    from batchlog.signing import KeySnapshot

    class ExpiringToken:
        """A principal whose first token the server no longer accepts."""

        refreshable = True

        def __init__(self) -> None:
            self.refreshes = 0
            self.lock = threading.Lock()
            self.stale = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        def snapshot(self) -> KeySnapshot:
            n = self.refreshes  # read once: the key and its generation go together
            return KeySnapshot(KEY_ID, oci.key if n else self.stale, n)

        def refresh(self, seen: int | None = None) -> None:
            with self.lock:  # refreshes run on several signing threads
                if seen is None or seen == self.refreshes:
                    self.refreshes += 1

    emu = emulator()
    records = mixed_records(40, runs=40)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    keys = ExpiringToken()
    settings = batchlog.Settings(
        target=batchlog.OciTarget(emu.url, PLATFORM, WORKSPACE),
        keys=keys,
        concurrency=4,
    )
    report = anyio.run(batchlog.upload, [str(manifest)], settings)
    assert report.succeeded == 40 and report.exit_code == 0
    assert keys.refreshes == 1  # one refresh serves every call that met the stale token
    assert_exactly_once(emu, records)


def test_a_key_file_readable_by_others_gets_a_warning(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    (tmp_path / "oci_api_key.pem").chmod(0o644)
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(3))
    out = run_cli(upload_args(oci, emu, str(manifest)))  # (a dry run reads no key)
    assert out.returncode == 0, out.stderr
    assert "readable by others" in out.stderr and "chmod 600" in out.stderr


@pytest.mark.parametrize("lost", [0, 3], ids=["nothing-failed", "some-failed-before"])
def test_a_systemic_stop_says_truly_what_was_held_back_and_what_failed_before(
    lost: int, tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: after records had failed (in the dead letter), a stop on 8 calls in a
    row out of attempts still said "Nothing was recorded as failed". One request at a time:
    10 land, `lost` fail for good (a run the server does not know), 8 get a 500 with one
    attempt each (the stop), 10 are never sent."""
    down = [f"down{i}" for i in range(8)]
    good = [inputs_record(f"g{i}", f"ds{i}") for i in range(20)]
    gone = [inputs_record("nosuchrun", f"lost{i}") for i in range(lost)]
    fault = http_response(500, [], b'{"code": "InternalServerError", "message": "down"}')
    emu = emulator(
        known_runs=frozenset([*(r["run_id"] for r in good), *down]),
        canned={run: [fault] for run in down},
    )
    held = [inputs_record(run, f"held{n}") for n, run in enumerate(down)]
    records = [*good[:10], *gone, *held, *good[10:]]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "1", "--max-attempts", "1"]
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    stops = [line for line in out.stderr.splitlines() if line.startswith("batchlog: stopped: 8")]
    assert len(stops) == 1, out.stderr  # (failed twice under heavy load: the output says why)
    stop = stops[0]
    assert "8 records held back by the stop" in stop, stop
    assert "run the same command again once the cause is fixed: it sends them" in stop, stop
    dead = tmp_path / "m.dead-letter.jsonl"
    if lost:
        assert "Nothing was recorded as failed" not in out.stderr, out.stderr
        assert "held back by the stop were not recorded as failed" in stop, stop
        assert f"{lost} records failed before the stop" in stop and str(dead) in stop, stop
        assert len(dead.read_bytes().splitlines()) == lost
    else:
        assert "Nothing was recorded as failed in this run" in stop, stop
        assert not dead.exists()

    again = run_cli(args)  # the 500s are over: the held calls are sent by the same command
    assert again.returncode == (1 if lost else 0), again.stderr
    assert_exactly_once(emu, [*good, *held])
    assert len(dead.read_bytes().splitlines()) == lost if lost else not dead.exists()


def test_a_success_answered_after_a_systemic_stop_does_not_fail_the_held_calls(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by CI under load: a call in flight when 8 calls in a row ran out of attempts
    succeeded after the stop, and its success recorded the 8 held calls as failed (dead
    letter, exit 1 on every later run) instead of holding them for the next run."""
    down = [f"down{i}" for i in range(8)]
    fault = http_response(500, [], b'{"code": "InternalServerError", "message": "down"}')
    emu = emulator(
        known_runs=frozenset(["slow", *down]),
        canned={run: [fault] for run in down},
        slow={"slow": 1.5},  # answered well after the 8 others ran out of attempts
    )
    records = [inputs_record("slow", "late"), *(inputs_record(r, f"held{r}") for r in down)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "2", "--max-attempts", "1"]
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "8 records held back by the stop" in out.stderr, out.stderr
    assert not (tmp_path / "m.dead-letter.jsonl").exists(), out.stderr
    again = run_cli(args)  # the 500s are over: the held calls are sent by the same command
    assert again.returncode == 0, again.stderr
    assert_exactly_once(emu, records)


def test_a_record_out_of_its_only_attempt_says_1_attempt(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: "gave up after 1 attempts"."""
    fault = http_response(500, [], b'{"code": "InternalServerError", "message": "down"}')
    emu = emulator(canned={"once": [fault]})
    records = [inputs_record("g0", "ds0"), inputs_record("once", "ds1"), inputs_record("g2", "ds2")]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "1", "--max-attempts", "1"]
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    assert "gave up after 1 attempt: down" in out.stderr, out.stderr
    [dead] = [orjson.loads(x) for x in (tmp_path / "m.dead-letter.jsonl").read_bytes().splitlines()]
    assert dead["_error"]["message"].startswith("gave up after 1 attempt: "), dead


def test_a_stop_tells_the_records_held_back_from_the_rest_pending_and_they_add_up(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: every call answered 500, 2 attempts each, and the stop said "for the
    12 records held back by the stop" and on the next line "157 records were in flight or
    waiting to be sent": two counts, neither saying how it relates to the other. The summary
    splits the report's `pending` into `held_back` and the rest, the stop message gives the
    same count, and the rerun sends every one of them."""
    emu = emulator(fail_before=1.0, seed=7)
    records = mixed_records(160, runs=40)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--max-attempts", "2"]
    out = run_cli([*args, "--report", str(tmp_path / "r.json")])
    assert out.returncode == 3, out.stderr
    r = report(tmp_path / "r.json")
    held, pending = r["held_back"], r["pending"]
    assert isinstance(held, int) and isinstance(pending, int) and 0 < held <= pending, r
    lines = out.stderr.splitlines()
    [stop] = [
        line for line in lines if line.startswith("batchlog: stopped: ") and "in a row" in line
    ]
    assert f"the {held:,} records held back by the stop" in stop, (held, stop)
    [left] = [line for line in lines if "pending:" in line]
    assert f"{pending:,} records pending: {held:,} held back by the stop" in left, left
    assert f"{pending - held:,} in flight or waiting to be sent" in left, left
    assert "run the same command again" in left, left

    emu.config.fail_before = 0.0  # the cause is fixed: the same command sends them all
    again = run_cli([*args, "--report", str(tmp_path / "r2.json")])
    assert again.returncode == 0, again.stderr
    r2 = report(tmp_path / "r2.json")
    assert (r2["already_done"], r2["succeeded"], r2["held_back"]) == (0, 160, 0), r2
    assert_exactly_once(emu, records)


def test_one_record_that_did_not_succeed_is_1_record() -> None:
    """Found by review: "1 records of this job did not succeed", "1 records were in flight"."""
    from batchlog.console import summary_lines
    from batchlog.report import Counters, Report

    c = Counters(records=3, succeeded=1, failed=1)
    r = Report.build(c, "interrupted", "interrupted", "m.batchlog-checkpoint", "m.dead.jsonl")
    text = "\n".join(summary_lines(r))
    assert "1 record of this job did not succeed" in text, text
    assert "1 record pending" in text, text
    assert not re.search(r"(?<![\d.,])1 records\b(?!/s)", text), text

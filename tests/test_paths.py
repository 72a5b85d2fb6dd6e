"""Where files go (issue 10, item 6): the naming rule, a dead letter only once something
failed, no cascading names, stdin jobs in the current directory, every path printed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog.emulator import EmulatorThread
from batchlog.settings import default_checkpoint, default_dead_letter
from tests.conftest import Oci, inputs_record, mixed_records, run_cli, upload_args, write_manifest
from tests.test_integrity import dead_lines, jsonl

StartEmulator = Callable[..., EmulatorThread]


@pytest.mark.parametrize(
    ("manifests", "checkpoint", "dead_letter"),
    [
        (["runs.jsonl"], "runs.batchlog-checkpoint", "runs.dead-letter.jsonl"),
        (["runs.jsonl.gz"], "runs.batchlog-checkpoint", "runs.dead-letter.jsonl"),
        (["data/runs.ndjson"], "data/runs.batchlog-checkpoint", "data/runs.dead-letter.jsonl"),
        (["runs.json"], "runs.batchlog-checkpoint", "runs.dead-letter.jsonl"),
        (["runs"], "runs.batchlog-checkpoint", "runs.dead-letter.jsonl"),
        (["a.jsonl", "b.jsonl"], "a.batchlog-checkpoint", "a.dead-letter.jsonl"),
        (["-"], "stdin.batchlog-checkpoint", "stdin.dead-letter.jsonl"),
        (["-", "b.jsonl"], "stdin.batchlog-checkpoint", "stdin.dead-letter.jsonl"),
        # a dead letter uploaded again: a counter, never x.dead-letter.dead-letter.jsonl
        (["x.dead-letter.jsonl"], "x.dead-letter.batchlog-checkpoint", "x.dead-letter-2.jsonl"),
        (
            ["x.dead-letter-2.jsonl"],
            "x.dead-letter-2.batchlog-checkpoint",
            "x.dead-letter-3.jsonl",
        ),
        (
            ["x.dead-letter-9.jsonl.gz"],
            "x.dead-letter-9.batchlog-checkpoint",
            "x.dead-letter-10.jsonl",
        ),
        (
            ["stdin.dead-letter.jsonl"],
            "stdin.dead-letter.batchlog-checkpoint",
            "stdin.dead-letter-2.jsonl",
        ),
    ],
)
def test_default_names(manifests: list[str], checkpoint: str, dead_letter: str) -> None:
    assert default_checkpoint(manifests) == checkpoint
    assert default_dead_letter(manifests) == dead_letter


# Every combination of run (plain, --emulate) and first manifest (a manifest, its dead letter,
# that one's -2, a rehearsal's dead letters, stdin, .gz): (manifest, kind, checkpoint, dead
# letter). ".emulated" is added once, after the stem, and never to a name that has it; a
# dead letter's dead letter counts up. Found by review: an emulated upload of
# x.emulated.dead-letter.jsonl was checkpointed in x.emulated.dead-letter.emulated...
NAMES = [
    ("x.jsonl", "", "x.batchlog-checkpoint", "x.dead-letter.jsonl"),
    ("x.jsonl", "emulated", "x.emulated.batchlog-checkpoint", "x.emulated.dead-letter.jsonl"),
    ("x.jsonl.gz", "", "x.batchlog-checkpoint", "x.dead-letter.jsonl"),
    ("x.jsonl.gz", "emulated", "x.emulated.batchlog-checkpoint", "x.emulated.dead-letter.jsonl"),
    # the real upload's dead letter, uploaded for real or rehearsed
    ("x.dead-letter.jsonl", "", "x.dead-letter.batchlog-checkpoint", "x.dead-letter-2.jsonl"),
    (
        "x.dead-letter.jsonl",
        "emulated",
        "x.dead-letter.emulated.batchlog-checkpoint",
        "x.emulated.dead-letter-2.jsonl",
    ),
    ("x.dead-letter-2.jsonl", "", "x.dead-letter-2.batchlog-checkpoint", "x.dead-letter-3.jsonl"),
    (
        "x.dead-letter-2.jsonl.gz",
        "emulated",
        "x.dead-letter-2.emulated.batchlog-checkpoint",
        "x.emulated.dead-letter-3.jsonl",
    ),
    # a rehearsal's dead letter: its names say "emulated" already
    (
        "x.emulated.dead-letter.jsonl",
        "emulated",
        "x.emulated.dead-letter.batchlog-checkpoint",
        "x.emulated.dead-letter-2.jsonl",
    ),
    (
        "x.emulated.dead-letter.jsonl.gz",
        "",
        "x.emulated.dead-letter.batchlog-checkpoint",
        "x.emulated.dead-letter-2.jsonl",
    ),
    (
        "x.emulated.dead-letter-2.jsonl",
        "emulated",
        "x.emulated.dead-letter-2.batchlog-checkpoint",
        "x.emulated.dead-letter-3.jsonl",
    ),
    ("-", "", "stdin.batchlog-checkpoint", "stdin.dead-letter.jsonl"),
    ("-", "emulated", "stdin.emulated.batchlog-checkpoint", "stdin.emulated.dead-letter.jsonl"),
    (
        "stdin.dead-letter.jsonl",
        "emulated",
        "stdin.dead-letter.emulated.batchlog-checkpoint",
        "stdin.emulated.dead-letter-2.jsonl",
    ),
    (
        "stdin.emulated.dead-letter.jsonl",
        "emulated",
        "stdin.emulated.dead-letter.batchlog-checkpoint",
        "stdin.emulated.dead-letter-2.jsonl",
    ),
]


@pytest.mark.parametrize(("manifest", "kind", "checkpoint", "dead_letter"), NAMES)
def test_names_of_every_kind_of_run_never_cascade(
    manifest: str, kind: str, checkpoint: str, dead_letter: str
) -> None:
    assert default_checkpoint([manifest], kind) == checkpoint
    assert default_dead_letter([manifest], kind) == dead_letter
    # uploading each dead letter again, three times over: a counter, names never grow
    names, current = [checkpoint, dead_letter], dead_letter
    for _ in range(3):
        names += [default_checkpoint([current], kind), default_dead_letter([current], kind)]
        current = names[-1]
    for name in names:
        assert name.count("emulated") <= 1 and name.count("dead-letter") <= 1, names
        assert ("emulated" in name) >= (kind == "emulated"), names  # a rehearsal's own


def test_jobs_on_different_files_never_share_a_checkpoint() -> None:
    """Two jobs of one kind on different files of the table (a .gz is the same file)
    never share a checkpoint."""
    for kind in ("", "emulated"):
        rows = [r for r in NAMES if r[1] == kind and not r[0].endswith(".gz")]
        checkpoints = [default_checkpoint([r[0]], kind) for r in rows]
        assert len(set(checkpoints)) == len(checkpoints), checkpoints


def test_a_job_where_everything_succeeds_leaves_no_dead_letter(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(40, runs=10))
    elsewhere = tmp_path / "not-yet" / "dead.jsonl"
    for extra in ([], ["--dead-letter", str(elsewhere), "--restart"]):
        out = run_cli([*upload_args(oci, emu, str(manifest)), *extra])
        assert out.returncode == 0, out.stderr
        assert "(created on the first failure)" in out.stderr, out.stderr
    assert not (tmp_path / "m.dead-letter.jsonl").exists()
    assert not elsewhere.parent.exists()  # not even its directory


def test_the_dead_letter_is_created_by_the_first_failure(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records: list[object] = [*mixed_records(20, runs=5), {"run_id": "r", "dataset_input": []}]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    dead = tmp_path / "later" / "dead.jsonl"
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--dead-letter", str(dead)])
    assert out.returncode == 1, out.stderr
    assert [d["_error"]["source"] for d in dead_lines(dead)] == [f"{manifest}:21"]


def test_uploading_a_dead_letter_again_never_cascades_names(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record("good", "ok1"), {"run_id": "bad", "dataset_input": []}]
    manifest = write_manifest(tmp_path / "x.jsonl", records)
    current = manifest
    for n, name in enumerate(("x.dead-letter.jsonl", "x.dead-letter-2.jsonl")):
        out = run_cli(upload_args(oci, emu, str(current)), cwd=tmp_path)
        assert out.returncode == 1, out.stderr
        assert f"dead letter {tmp_path / name}" in out.stderr, out.stderr
        [line] = dead_lines(tmp_path / name)
        assert line["run_id"] == "bad" and line["_error"]["status"] == "rejected", (n, line)
        current = tmp_path / name
    assert sorted(p.name for p in tmp_path.glob("*dead-letter*.jsonl")) == [
        "x.dead-letter-2.jsonl",
        "x.dead-letter.jsonl",
    ]


def test_a_rehearsals_dead_letter_rehearsed_again_never_cascades_names(tmp_path: Path) -> None:
    records = [inputs_record("good", "ok1"), {"run_id": "bad", "dataset_input": []}]
    current = write_manifest(tmp_path / "x.jsonl", records)
    rounds = [
        ("x.emulated.batchlog-checkpoint", "x.emulated.dead-letter.jsonl"),
        ("x.emulated.dead-letter.batchlog-checkpoint", "x.emulated.dead-letter-2.jsonl"),
        ("x.emulated.dead-letter-2.batchlog-checkpoint", "x.emulated.dead-letter-3.jsonl"),
    ]
    for checkpoint, dead_letter in rounds:
        out = run_cli(["upload", current.name, "--emulate"], cwd=tmp_path)
        assert out.returncode == 1, out.stderr
        assert f"batchlog: checkpoint {checkpoint}\n" in out.stderr, out.stderr
        assert f"batchlog: dead letter {dead_letter} (" in out.stderr, out.stderr
        [line] = dead_lines(tmp_path / dead_letter)
        assert line["run_id"] == "bad" and line["_error"]["status"] == "rejected", line
        current = tmp_path / dead_letter
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(n.count("emulated") == 1 for n in names if n != "x.jsonl"), names
    assert len(names) == 1 + 3 * 3, names  # each round: checkpoint, its .lock, dead letter


def test_every_path_the_job_writes_is_printed_at_start(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10, runs=5))
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert f"batchlog: checkpoint {tmp_path / 'm.batchlog-checkpoint'}" in out.stderr, lines
    dead = (
        f"batchlog: dead letter {tmp_path / 'm.dead-letter.jsonl'} (created on the first failure)"
    )
    assert dead in lines, lines
    assert f"batchlog: report {tmp_path / 'r.json'}" in out.stderr, lines
    assert (tmp_path / "r.json").exists()


def test_stdin_jobs_write_stdin_files_into_the_current_directory_and_say_so(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    args = upload_args(oci, emu, "-")
    first = mixed_records(10, runs=5)
    out = run_cli(args, input=jsonl(first), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("stdin")) == [
        "stdin.batchlog-checkpoint",
        "stdin.batchlog-checkpoint.lock",
    ]
    assert "checkpoint stdin.batchlog-checkpoint" in out.stderr, out.stderr
    assert "--checkpoint" in out.stderr  # how to keep another stdin job apart
    # another stdin job in the same directory: refused, naming the file and the way out
    other = [inputs_record("other", f"o{i}") for i in range(3)]
    out = run_cli(args, input=jsonl(other), cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "stdin.batchlog-checkpoint" in out.stderr and "--checkpoint" in out.stderr


def test_an_earlier_jobs_dead_letter_is_set_aside_though_nothing_fails_now(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10, runs=5))
    earlier = b'{"run_id": "old", "_error": {"status": 404}}\n'
    (tmp_path / "m.dead-letter.jsonl").write_bytes(earlier)
    out = run_cli(upload_args(oci, emu, str(manifest)))  # a new job: no checkpoint yet
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "m.dead-letter.jsonl").exists()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("m.dead-letter.jsonl.")]
    assert aside.read_bytes() == earlier and aside.name in out.stderr
    os.remove(aside)


def test_a_stream_given_as_a_path_needs_files_named(tmp_path: Path) -> None:
    """``<(zcat runs.gz)`` is /dev/fd/63: nothing can be created beside it."""
    data = jsonl(mixed_records(5, runs=5))
    out = run_cli(["upload", "/dev/stdin", "--emulate"], input=data, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "/dev/stdin is a stream" in out.stderr and "--checkpoint" in out.stderr, out.stderr
    named = ["--checkpoint", str(tmp_path / "c"), "--dead-letter", str(tmp_path / "d")]
    out = run_cli(["upload", "/dev/stdin", "--emulate", *named], input=data, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_a_report_or_log_file_that_cannot_be_written_is_refused_before_any_request(
    tmp_path: Path,
) -> None:
    """Found by review: a --report into a missing directory was noticed after the whole
    upload, which still exited 0; --report and --log-file could name one file."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"run_id": "r1", "dataset_inputs": []}\n')
    for extra in (
        ["--report", str(tmp_path / "nodir" / "r.json")],
        ["--log-file", str(tmp_path / "nodir" / "l.log")],
        ["--report", str(tmp_path / "same"), "--log-file", str(tmp_path / "same")],
    ):
        for dry in ([], ["--dry-run"]):
            out = run_cli(["upload", str(manifest), "--emulate", *extra, *dry], cwd=tmp_path)
            assert out.returncode == 2, (extra, dry, out.stderr)
            assert "requests" not in out.stderr, out.stderr

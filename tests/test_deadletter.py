"""A dead-letter line is the original line, byte for byte, with one ``_error`` member added
at the end of its top-level object: uploading the fixed dead letter sends what the manifest
said (big integers, number spellings, escapes and duplicated keys included)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlog.deadletter import dead_letter_line
from batchlog.emulator import EmulatorThread
from batchlog.records import Record, Rejection
from batchlog.validate import parse_line
from tests.conftest import Oci, inputs_record, run_cli, upload_args, write_manifest
from tests.test_upload import assert_exactly_once
from tests.test_validate import SCALARS, json_texts

StartEmulator = Callable[..., EmulatorThread]

ERROR = {
    "status": 400,
    "code": "InvalidParameter",
    "message": 'bad "value" caf\u00e9 \\ {}',
    "source": "m.jsonl:3",
    "attempts": 1,
}
NOTE = b'"_error":' + orjson.dumps(ERROR)


def spliced(original: bytes, error: dict[str, Any] = ERROR) -> bytes:
    """``original`` (a JSON object without a top-level _error) with _error added last."""
    close = len(original.rstrip(b" \t\r\n")) - 1
    assert original[close : close + 1] == b"}"
    empty = original[original.index(b"{") + 1 : close].strip(b" \t\r\n") == b""
    note = b'"_error":' + orjson.dumps(error)
    return original[:close] + (b"" if empty else b",") + note + original[close:]


def spelled_int(text: str) -> int | str:
    return int(text) if len(text) < 4000 else text  # int() refuses more than 4300 digits


def top_level_pairs(line: bytes) -> list[tuple[str, Any]]:
    """The top-level members of a JSON object line, every one, in order (the stdlib parser
    calls the hook for the outermost object last)."""
    seen: list[list[tuple[str, Any]]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append(pairs)
        return dict(pairs)

    doc = json.loads(line, object_pairs_hook=hook, parse_int=spelled_int, parse_float=str)
    assert isinstance(doc, dict)
    return seen[-1]


def error_members(line: bytes) -> list[Any]:
    return [value for key, value in top_level_pairs(line) if key == "_error"]


MODEL_BIG_INT = (
    b'{"op":"log-model","run_id":"r1","model_json":{"artifact_path":"m","flavors":{},'
    b'"utc_time_created":"2025-01-01 00:00:00.000000","run_id":"r1",'
    b'"metadata":{"c":12345678901234567890123,"f":1E2,"g":0.10,"h":-0.0}}}'
)
ORIGINALS = [
    MODEL_BIG_INT,
    b'{"run_id":"r1","x":1E2,"y":0.10,"z":-0.0,"w":1.50e+2,"v":100}',
    b'{"run_id":"r\\u0031","s":"caf\\u00e9 \\"q\\" \\\\ \\/ \\n",'
    b'"\xc3\xa9":"\xc3\xa9 \\ud83d\\ude00"}',
    b'{"run_id":"x","run_id":"y","dataset_inputs":[]}',
    b'{"run_id":"r1","_note":{"_error":"kept"},"model_json":"{\\"_error\\":1}","_errors":1}',
    b'  { "run_id" : "r1" , "a" : [ 1 , 2 ] }  ',
    b'{\t"run_id":"r1"\r}\t',
    b'{"run_id": "r1",\r"dataset_inputs": [] \r}',  # a line holds no newline, \r it may
    b"{}",
    b"{ }",
    b"\t{}  ",
]


@pytest.mark.parametrize("original", ORIGINALS)
def test_the_original_line_is_kept_byte_for_byte(original: bytes) -> None:
    dead = dead_letter_line(original, ERROR)
    assert dead == spliced(original)
    assert error_members(dead) == [ERROR]
    assert [kv for kv in top_level_pairs(dead) if kv[0] != "_error"] == top_level_pairs(original)
    assert orjson.loads(dead)["_error"] == ERROR


def test_numbers_beyond_a_double_are_kept_too() -> None:
    original = b'{"run_id":"r1","huge":1e400,"long":' + b"9" * 5000 + b"}"
    dead = dead_letter_line(original, ERROR)
    assert dead == spliced(original)
    assert error_members(dead) == [ERROR]


def test_a_fixed_dead_letter_sends_what_the_manifest_said() -> None:
    """The model_json text, as sent, is the manifest's: not 1.2345678901234568e+22."""
    first = parse_line(MODEL_BIG_INT, 0, "m.jsonl:1")
    again = parse_line(dead_letter_line(MODEL_BIG_INT, ERROR), 0, "dead.jsonl:1")
    assert isinstance(first, Record) and isinstance(again, Record), (first, again)
    assert again.model_json == first.model_json
    assert b"12345678901234567890123" in again.model_json.encode()


def test_a_duplicated_key_stays_duplicated() -> None:
    """A line rejected for a duplicated key is rejected again, not silently de-duplicated."""
    original = b'{"run_id":"x","run_id":"y","dataset_inputs":[]}'
    dead = dead_letter_line(original, ERROR)
    item = parse_line(dead, 0, "dead.jsonl:1")
    assert isinstance(item, Rejection)
    assert (item.field, item.reason) == ("run_id", "duplicated key")


NEW = {"status": 500, "code": "InternalServerError", "message": "again", "source": "d:1"}
NEW_NOTE = b'"_error":' + orjson.dumps(NEW)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"_error":{"code":"old"},"run_id":"r1"}', b'{"run_id":"r1",' + NEW_NOTE + b"}"),
        (
            b'{"run_id":"r1", "_error": {"code":"old"}, "a":1}',
            b'{"run_id":"r1", "a":1,' + NEW_NOTE + b"}",
        ),
        (b'{"run_id":"r1", "_error":{"code":"old"} }', b'{"run_id":"r1" ,' + NEW_NOTE + b"}"),
        (b'{"_error":{"code":"old"}}', b"{" + NEW_NOTE + b"}"),
        (b' { "_error" : 1 } ', b" {  " + NEW_NOTE + b"} "),
        (b'{"_error":1,"run_id":"r1","_error":2}', b'{"run_id":"r1",' + NEW_NOTE + b"}"),
        (b'{"_error":1, "_error":2, "a":3}', b'{"a":3,' + NEW_NOTE + b"}"),
        (b'{"a":1,"_error":2,"_error":3,"b":4}', b'{"a":1,"b":4,' + NEW_NOTE + b"}"),
        (b'{"_\\u0065rror":1,"a":{"_error":2}}', b'{"a":{"_error":2},' + NEW_NOTE + b"}"),
    ],
)
def test_an_error_already_there_is_replaced(line: bytes, expected: bytes) -> None:
    dead = dead_letter_line(line, NEW)
    assert dead == expected
    assert error_members(dead) == [NEW]


@pytest.mark.parametrize("original", ORIGINALS)
def test_a_dead_letter_that_fails_again_has_one_error(original: bytes) -> None:
    once = dead_letter_line(original, ERROR)
    twice = dead_letter_line(once, NEW)
    assert twice == spliced(original, NEW)
    assert error_members(twice) == [NEW]
    assert parse_line(twice, 0, "d:1").__class__ is parse_line(original, 0, "m:1").__class__


@pytest.mark.parametrize(
    "line",
    [
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"run_id": "r1", ',
        b'{"a": NaN}',
        b'{"a": 1}}',
        b'{"a": 1} {"b": 2}',
        b'{"a" 1}',
        b"{1: 2}",
        b'{"a": 1,}',
        b"\xef\xbb\xbf\xef\xbb\xbf{}",  # one BOM starts a manifest line (issue 9), not two
        b'{"run_id": "r\xff1"}',
        b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}",  # deeper than the parser's stack
    ],
)
def test_a_line_that_is_not_a_json_object_is_kept_as_raw_text(line: bytes) -> None:
    dead = dead_letter_line(line, ERROR)
    text = line.decode("utf-8", errors="backslashreplace")
    assert dead == orjson.dumps({"_raw": text, "_error": ERROR})


KEYS = ["_error", "run_id", "a", "_\\u0065rror", ""]
SPACE = st.sampled_from(["", " ", "\t", "\r", " \r\t "])  # no newline: lines never hold one


@st.composite
def object_lines(draw: st.DrawFn) -> str:
    """JSON object texts with top-level _error members here and there, spaced anyhow."""
    members = draw(st.lists(st.tuples(st.sampled_from(KEYS), json_texts(SCALARS)), max_size=5))
    parts = [
        draw(SPACE) + json.dumps(k).replace("\\\\u", "\\u") + draw(SPACE) + ":" + draw(SPACE) + v
        for k, v in members
    ]
    body = ",".join(p + draw(SPACE) for p in parts) or draw(SPACE)
    return draw(SPACE) + "{" + body + "}" + draw(SPACE)


def strict_object(line: bytes) -> bool:
    def constant(name: str) -> None:
        raise ValueError(name)

    try:
        return isinstance(json.loads(line, parse_constant=constant), dict)
    except ValueError:
        return False


@settings(database=None, deadline=None, max_examples=300)
@given(object_lines(), st.integers(min_value=0, max_value=200))
def test_any_line_gives_one_error_and_its_members_unchanged(text: str, cut: int) -> None:
    for line in (text.encode(), text[:cut].encode()):
        dead = dead_letter_line(line, ERROR)
        if not strict_object(line):
            raw = line.decode("utf-8", errors="backslashreplace")
            assert dead == orjson.dumps({"_raw": raw, "_error": ERROR})
            continue
        assert error_members(dead) == [ERROR]
        kept = [kv for kv in top_level_pairs(line) if kv[0] != "_error"]
        assert [kv for kv in top_level_pairs(dead) if kv[0] != "_error"] == kept
        if not error_members(line):
            assert dead == spliced(line)


# ---- a line kept as _raw, uploaded again (newcomer review, item 7) ---------------------------

REPLACE = "replace this whole line with the corrected record"


def rejection_error(item: Rejection) -> dict[str, Any]:
    """The ``_error`` the job writes for a rejected line."""
    return {
        "status": "rejected",
        "code": "InvalidRecord",
        "field": item.field,
        "message": item.reason,
        "source": item.source,
    }


def rejected_again(line: bytes, source: str = "d.jsonl:1") -> Rejection:
    item = parse_line(line, 0, source)
    assert isinstance(item, Rejection), item
    return item


@pytest.mark.parametrize(
    ("original", "reason"),
    [
        (b'{"run_id": "r2", oops', "invalid JSON: Expecting property name"),
        (b"not json at all", "invalid JSON: Expecting value"),
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b'{"run_id": "r\xff1"}', "not valid UTF-8 at byte 13"),
    ],
)
def test_a_raw_line_uploaded_again_says_to_replace_it_and_is_never_wrapped_twice(
    original: bytes, reason: str
) -> None:
    first = rejected_again(original, "m.jsonl:2")
    dead = dead_letter_line(original, rejection_error(first))
    again = dead
    for generation in range(2, 5):  # the dead letter of the dead letter of ...
        item = rejected_again(again, f"d{generation}.jsonl:1")
        assert item.field == "_raw", item
        assert item.reason.startswith("the original line could not be read as a record ("), item
        assert reason in item.reason and item.reason.endswith(f"): {REPLACE}"), item
        assert first.reason in item.reason and item.reason.count("could not be read") == 1
        again = dead_letter_line(again, rejection_error(item))
        doc = orjson.loads(again)
        assert list(doc) == ["_raw", "_error"], doc  # one _error, last; _raw as it was
        assert doc["_raw"] == orjson.loads(dead)["_raw"]
        assert doc["_error"] == rejection_error(item)


def test_a_raw_line_whose_error_was_taken_out_is_told_by_its_text() -> None:
    for text, why in (("oops", "invalid JSON: Expecting value"), ("{}", "missing, and neither")):
        item = rejected_again(orjson.dumps({"_raw": text, "_note": "mine"}))
        assert item.field == "_raw" and item.reason.endswith(REPLACE), item
        assert f"({why}" in item.reason, item


def test_a_raw_line_that_also_holds_a_record_is_the_record() -> None:
    noted = {"_raw": "old text", **inputs_record("r2", "ds")}  # fixed, _raw left as a note
    assert isinstance(parse_line(orjson.dumps(noted), 0, "d.jsonl:1"), Record)


def test_a_dead_letter_with_raw_lines_uploaded_again_then_fixed(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The user's round trip: upload, upload the dead letter as it is (told what to do, kept
    as it was with its _error replaced), then with the lines replaced (sent, exit 0)."""
    emu = emulator()
    good = inputs_record("r1", "ds1")
    bad = [b'{"run_id": "r2", oops', b"[1, 2]"]
    manifest = write_manifest(tmp_path / "m.jsonl", [good, *bad])
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 1
    dead = tmp_path / "m.dead-letter.jsonl"
    first = dead.read_bytes().splitlines()
    assert [orjson.loads(line)["_raw"].encode() for line in first] == bad

    out = run_cli(upload_args(oci, emu, str(dead)))
    assert out.returncode == 1, out.stderr
    for number, why in ((1, "invalid JSON: Expecting property name"), (2, "got an array")):
        [said] = [
            line for line in out.stderr.splitlines() if f"m.dead-letter.jsonl:{number}:" in line
        ]
        assert f"m.dead-letter.jsonl:{number}: _raw: the original line could not be read " in said
        assert why in said and said.endswith(REPLACE), said
    again = (tmp_path / "m.dead-letter-2.jsonl").read_bytes().splitlines()
    for before, after in zip(first, again, strict=True):
        old, new = orjson.loads(before), orjson.loads(after)
        assert list(new) == ["_raw", "_error"] and new["_raw"] == old["_raw"]
        assert new["_error"]["field"] == "_raw" and REPLACE in new["_error"]["message"]

    out = run_cli(upload_args(oci, emu, str(tmp_path / "m.dead-letter-2.jsonl")))
    assert out.returncode == 1 and out.stderr.count(REPLACE) == 2, out.stderr
    assert out.stderr.count("could not be read") == 2, out.stderr  # never nested

    fixed = [inputs_record("r2", "ds2"), inputs_record("r3", "ds3")]
    write_manifest(tmp_path / "m.dead-letter-2.jsonl", fixed)
    out = run_cli(upload_args(oci, emu, str(tmp_path / "m.dead-letter-2.jsonl"), "--restart"))
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, [good, *fixed])


def test_the_readme_shows_the_raw_shape_and_its_message_as_they_are() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### The dead letter\n", 1)[1].split("\n### ", 1)[0]
    shown = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    [raw_line] = [line for line in shown if line.startswith('{"_raw"')]
    [message] = [line for line in shown if line.startswith("runs.dead-letter.jsonl:1: _raw: ")]
    doc = orjson.loads(raw_line)
    original = doc["_raw"].encode()
    item = rejected_again(original, doc["_error"]["source"])
    assert dead_letter_line(original, rejection_error(item)) == raw_line.encode()
    assert str(rejected_again(raw_line.encode(), "runs.dead-letter.jsonl:1")) == message


# ---- a fixed dead letter, uploaded, resolves the failures of earlier runs -------------------

BAD_LINES = [b'{"run_id": "r2", oops', b"[1, 2]", b'{"run_id": "r3"}']


def long_record(run: str) -> dict[str, Any]:
    """A record whose line is longer than the dead-letter line it replaces: the fixed file
    grows, and a rerun of the first job must not cut it back."""
    return inputs_record(run, f"fixed-{run}", _note="x" * 400)


def emulate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["upload", *map(str, args), "--emulate"])


def report_of(path: Path) -> dict[str, Any]:
    doc = orjson.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


def test_a_dead_letter_fixed_and_uploaded_resolves_the_earlier_failures(tmp_path: Path) -> None:
    """The finding: after the dead letter was fixed and uploaded, a rerun of the job (a
    scheduled sync, a record appended) exits 0 and says so; status too."""
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1"), *BAD_LINES])
    assert emulate(manifest).returncode == 1
    dead = tmp_path / "m.emulated.dead-letter.jsonl"
    write_manifest(dead, [long_record(f"f{i}") for i in range(3)])  # fixed in place
    fixed = dead.read_bytes()
    assert emulate(dead).returncode == 0
    with open(manifest, "ab") as f:
        f.write(orjson.dumps(inputs_record("r4", "ds4")) + b"\n")
    report = tmp_path / "r.json"
    out = emulate(manifest, "--report", report)
    assert out.returncode == 0, out.stderr
    shows = str(tmp_path / "m.emulated.dead-letter.batchlog-checkpoint")
    doc = report_of(report)
    assert doc["exit_code"] == 0 and doc["unsuccessful_total"] == 0, doc
    assert doc["rejected_total"] == 3 and doc["resolved_by"] == shows, doc
    assert "did not succeed" not in out.stderr, out.stderr
    assert "of earlier runs were fixed and uploaded from" in out.stderr, out.stderr
    assert dead.read_bytes() == fixed  # the user's fixed file, never cut back
    dry = emulate(manifest, "--dry-run")
    assert dry.returncode == 0, dry.stderr  # exits as the run would
    status = run_cli(["status", str(tmp_path / "m.emulated.batchlog-checkpoint")])
    assert status.returncode == 0 and "0 with failures" in status.stdout, status.stdout
    assert "were fixed and uploaded (checkpoint" in status.stdout, status.stdout

    # a new failure now: exit 1 for it alone; the earlier ones stay resolved
    with open(manifest, "ab") as f:
        f.write(b'{"run_id": "r5"}\n')
    out = emulate(manifest, "--report", report)
    assert out.returncode == 1, out.stderr
    doc = report_of(report)
    assert doc["unsuccessful_total"] == 1 and doc["resolved_by"] == shows, doc
    assert "1 record of this job did not succeed" in out.stderr, out.stderr

    # the dead letter grew after its upload: unresolved until it is uploaded again
    out = emulate(manifest, "--report", report)
    assert out.returncode == 1, out.stderr
    doc = report_of(report)
    assert doc["unsuccessful_total"] == 4 and doc["resolved_by"] == "", doc
    lines = dead.read_bytes().splitlines()
    lines[-1] = orjson.dumps(long_record("r5"))
    dead.write_bytes(b"\n".join(lines) + b"\n")
    assert emulate(dead).returncode == 0  # resumes: sends the line added since
    out = emulate(manifest, "--report", report)
    assert out.returncode == 0, out.stderr
    assert report_of(report)["resolved_by"] == shows


def test_a_dead_letter_uploaded_with_a_line_failing_resolves_once_its_own_is_fixed(
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1"), *BAD_LINES])
    assert emulate(manifest).returncode == 1
    dead = tmp_path / "m.emulated.dead-letter.jsonl"
    write_manifest(dead, [long_record("f1"), long_record("f2"), BAD_LINES[2]])  # one left bad
    assert emulate(dead).returncode == 1
    report = tmp_path / "r.json"
    out = emulate(manifest, "--report", report)
    assert out.returncode == 1, out.stderr
    assert report_of(report)["resolved_by"] == ""
    dead2 = tmp_path / "m.emulated.dead-letter-2.jsonl"
    assert len(dead2.read_bytes().splitlines()) == 1
    write_manifest(dead2, [long_record("f3")])
    assert emulate(dead2).returncode == 0
    out = emulate(manifest, "--report", report)
    assert out.returncode == 0, out.stderr
    shows = str(tmp_path / "m.emulated.dead-letter.batchlog-checkpoint")
    assert report_of(report)["resolved_by"] == shows  # its dead letter's own upload shown too
    status = run_cli(["status", str(tmp_path / "m.emulated.batchlog-checkpoint")])
    assert "0 with failures" in status.stdout, status.stdout


def test_a_rehearsals_and_a_real_jobs_dead_letters_never_resolve_each_other(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1"), *BAD_LINES])
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 1  # real
    assert emulate(manifest).returncode == 1  # rehearsal
    real, rehearsed = tmp_path / "m.dead-letter.jsonl", tmp_path / "m.emulated.dead-letter.jsonl"
    for dead in (real, rehearsed):
        write_manifest(dead, [long_record(f"f{i}") for i in range(3)])
    # each uploaded the other way: the real one rehearsed, the rehearsal's for real
    assert emulate(real).returncode == 0
    assert run_cli(upload_args(oci, emu, str(rehearsed))).returncode == 0
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 1
    assert emulate(manifest).returncode == 1
    # each its own way: resolved
    assert run_cli(upload_args(oci, emu, str(real))).returncode == 0
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    assert emulate(manifest).returncode == 1  # the rehearsal's checkpoint is the real one's


def test_a_dead_letter_that_cannot_be_created_mid_job_is_named_not_a_bug(
    tmp_path: Path, oci: Oci, emulator: Callable[..., EmulatorThread]
) -> None:
    """Found by review: the dead letter is created at the first failure; when that fails
    (its folder replaced by a file, a full disk) the job ended as "a bug in batchlog"."""
    import os
    import sys
    import time

    emu = emulator()
    folder = tmp_path / "out"
    args = upload_args(oci, emu, "--dead-letter", str(folder / "dl.jsonl"), "--checkpoint")
    args += [str(tmp_path / "ck"), "-"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCI_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchlog", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    good = [inputs_record(f"run{i}", f"ds{i}") for i in range(3)]
    proc.stdin.write("".join(json.dumps(r) + "\n" for r in good))
    proc.stdin.flush()
    for _ in range(300):  # bounded: the three land within seconds
        if len(emu.state.applied_counts()) == 3:
            break
        time.sleep(0.05)
    folder.write_text("not a folder")  # after the start's check: the first failure finds it
    _, err = proc.communicate(json.dumps({"run_id": "bad run"}) + "\n", timeout=60)
    assert proc.returncode == 3, err
    assert "dead-letter file" in err and str(folder / "dl.jsonl") in err, err
    assert "bug" not in err, err
    assert_exactly_once(emu, good)

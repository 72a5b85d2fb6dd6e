"""Each kind of bad manifest line is named precisely; good lines parse to records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlog.emulator import EmulatorThread
from batchlog.records import Record, Rejection
from batchlog.validate import parse_line
from tests.conftest import (
    Oci,
    inputs_record,
    mixed_records,
    model_record,
    run_cli,
    upload_args,
    write_manifest,
)


def parse(doc: object) -> Record | Rejection:
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return parse_line(raw, 0, "m.jsonl:7")


def rejected(doc: object) -> tuple[str, str]:
    item = parse(doc)
    assert isinstance(item, Rejection), item
    assert str(item).startswith(f"m.jsonl:7: {item.field}: ")
    return item.field, item.reason


def test_inputs_record_parses_with_op_inferred() -> None:
    item = parse(inputs_record("run1", "ds1"))
    assert isinstance(item, Record)
    assert item.op == "log-inputs" and item.run_id == "run1"
    assert item.dataset_inputs[0]["dataset"]["name"] == "ds1"


def test_datasets_is_a_synonym_and_notes_are_dropped() -> None:
    rec = inputs_record("run1", "ds1")
    rec["datasets"] = rec.pop("dataset_inputs")
    rec["_comment"] = "exported from mlflow"
    rec["datasets"][0]["dataset"]["_origin"] = "x"
    item = parse(rec)
    assert isinstance(item, Record)
    assert item.dataset_inputs[0]["dataset"] == {
        "name": "ds1",
        "digest": "dds1",
        "source": "s3://b/ds1",
        "source_type": "s3",
    }


def test_model_json_object_is_sent_as_written() -> None:
    item = parse(model_record("run1", 3))
    assert isinstance(item, Record)
    assert item.op == "log-model"
    assert orjson.loads(item.model_json)["artifact_path"] == "model3"
    assert item.model_json == orjson.dumps(model_record("run1", 3)["model_json"]).decode()


def test_model_json_string_is_kept_as_given() -> None:
    doc = model_record("run1", 1)
    doc["model_json"] = orjson.dumps(doc["model_json"]).decode()
    item = parse(doc)
    assert isinstance(item, Record) and item.model_json == doc["model_json"]


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        (b'{"run_id": "r1", ', "(line)", "invalid JSON"),
        (b'{"run_id": "r\xff1"}', "(line)", "not valid UTF-8"),
        (b"[1, 2]", "(line)", "expected a JSON object, got an array"),
        (b'{"op": "log-inputs"}', "run_id", "required"),
        (b'{"run_id": 5, "dataset_inputs": []}', "run_id", "expected a string"),
        (b'{"run_id": "-bad", "dataset_inputs": []}', "run_id", "does not match"),
        (b'{"run_id": "r1"}', "op", "missing"),
        (b'{"op": "log-metric", "run_id": "r1"}', "op", "is not one of"),
        (
            b'{"run_id": "r1", "dataset_input": []}',
            "dataset_input",
            "did you mean 'dataset_inputs'",
        ),
        (b'{"run_id": "r1", "datasets": [], "dataset_inputs": []}', "datasets", "not both"),
        (b'{"run_id": "r1", "dataset_inputs": {}}', "dataset_inputs", "expected an array"),
        (
            b'{"run_id": "r1", "dataset_inputs": [{"tags": []}]}',
            "dataset_inputs[0].dataset",
            "required",
        ),
        (b'{"op": "log-model", "run_id": "r1"}', "model_json", "required"),
        (b'{"run_id": "r1", "model_json": "{not json"}', "model_json", "not a JSON document"),
        (b'{"run_id": "r1", "model_json": "[1]"}', "model_json", "expected a JSON object"),
        (
            b'{"run_id": "r1", "model_json": {"flavors": {}, "utc_time_created": "t", '
            b'"run_id": "r1"}}',
            "model_json.artifact_path",
            "required",
        ),
    ],
)
def test_bad_lines_name_field_and_reason(line: bytes, field: str, reason: str) -> None:
    got_field, got_reason = rejected(line)
    assert got_field == field
    assert reason in got_reason


def test_dataset_field_limits_and_types() -> None:
    rec = inputs_record("r1", "ds1")
    rec["dataset_inputs"][0]["dataset"]["digest"] = "x" * 37
    assert rejected(rec) == (
        "dataset_inputs[0].dataset.digest",
        "37 characters, more than the limit of 36",
    )
    rec = inputs_record("r1", "ds1")
    del rec["dataset_inputs"][0]["dataset"]["source_type"]
    assert rejected(rec) == ("dataset_inputs[0].dataset.source_type", "required")
    rec = inputs_record("r1", "ds1")
    rec["dataset_inputs"][0]["dataset"]["name"] = 12
    assert rejected(rec)[0] == "dataset_inputs[0].dataset.name"
    rec = inputs_record("r1", "ds1")
    rec["dataset_inputs"][0]["dataset"]["schema_"] = "{}"
    assert rejected(rec) == (
        "dataset_inputs[0].dataset.schema_",
        "unknown field (did you mean 'schema'?)",
    )


def test_tag_limits() -> None:
    rec = inputs_record("r1", "ds1")
    rec["dataset_inputs"][0]["tags"][0]["value"] = "v" * 501
    assert rejected(rec)[0] == "dataset_inputs[0].tags[0].value"
    rec = inputs_record("r1", "ds1")
    rec["dataset_inputs"][0]["tags"][0] = {"key": "k"}
    assert rejected(rec) == ("dataset_inputs[0].tags[0].value", "required")


def test_run_id_limit() -> None:
    assert isinstance(parse(inputs_record("a" * 256, "ds")), Record)
    assert rejected(inputs_record("a" * 257, "ds"))[0] == "run_id"


def three_inputs(name: str = "dataset_inputs") -> dict[str, Any]:
    """A log-inputs record of three dataset inputs, the third with two tags."""
    rec = inputs_record("r1", "ds0")
    rec["dataset_inputs"] += [inputs_record("r1", f"ds{i}")["dataset_inputs"][0] for i in (1, 2)]
    rec["dataset_inputs"][2]["tags"].append({"key": "k2", "value": "v2"})
    rec[name] = rec.pop("dataset_inputs")
    return rec


def _tag(rec: dict[str, Any]) -> dict[str, Any]:
    tag: dict[str, Any] = rec["datasets" if "datasets" in rec else "dataset_inputs"][2]["tags"][1]
    return tag


def _dataset(rec: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = rec["datasets" if "datasets" in rec else "dataset_inputs"][2]
    return item


DEEP_DEFECTS: list[tuple[Callable[[dict[str, Any]], Any], str, str]] = [
    (
        lambda r: _tag(r).update(value="v" * 501),
        ".tags[1].value",
        "501 characters, more than the limit of 500",
    ),
    (lambda r: _tag(r).update(value=7), ".tags[1].value", "expected a string, got a number"),
    (lambda r: _tag(r).pop("value"), ".tags[1].value", "required"),
    (
        lambda r: _tag(r).update(key="k" * 256),
        ".tags[1].key",
        "256 characters, more than the limit of 255",
    ),
    (lambda r: _tag(r).pop("key"), ".tags[1].key", "required"),
    (lambda r: _tag(r).update(valu="x"), ".tags[1].valu", "unknown field (did you mean 'value'?)"),
    (
        lambda r: _dataset(r)["tags"].__setitem__(1, "x"),
        ".tags[1]",
        "expected an object, got a string",
    ),
    (lambda r: _dataset(r).update(tags={}), ".tags", "expected an array, got an object"),
    (lambda r: _dataset(r).update(tag=[]), ".tag", "unknown field (did you mean 'tags'?)"),
    (lambda r: _dataset(r).update(dataset=[]), ".dataset", "expected an object, got an array"),
    (lambda r: _dataset(r).pop("dataset"), ".dataset", "required"),
    (lambda r: _dataset(r)["dataset"].pop("digest"), ".dataset.digest", "required"),
    (
        lambda r: _dataset(r)["dataset"].update(schema=None),
        ".dataset.schema",
        "expected a string, got null",
    ),
    (
        lambda r: _dataset(r)["dataset"].update(profile="p" * 16_777_216),
        ".dataset.profile",
        "16777216 characters, more than the limit of 16777215",
    ),
    (
        lambda r: _dataset(r)["dataset"].update({"a key": 1}),
        '.dataset["a key"]',
        "unknown field",
    ),
]


@pytest.mark.parametrize("name", ["dataset_inputs", "datasets"])
@pytest.mark.parametrize(("spoil", "path", "reason"), DEEP_DEFECTS)
def test_a_deep_field_is_named_by_its_whole_path(
    name: str, spoil: Callable[[dict[str, Any]], Any], path: str, reason: str
) -> None:
    """The third dataset input's fields (its second tag's too): the message names that
    input and that tag, with the array's own name, exactly."""
    rec = three_inputs(name)
    assert isinstance(parse(rec), Record)
    spoil(rec)
    assert rejected(rec) == (f"{name}[2]{path}", reason)


def test_notes_deep_in_the_third_input_are_dropped_and_the_rest_kept() -> None:
    rec = three_inputs()
    clean = orjson.loads(orjson.dumps(rec["dataset_inputs"]))
    rec["dataset_inputs"][2]["_n"] = 1
    rec["dataset_inputs"][2]["dataset"]["_n"] = {"x": [1]}
    rec["dataset_inputs"][2]["tags"][1]["_n"] = "note"
    item = parse(rec)
    assert isinstance(item, Record)
    assert list(item.dataset_inputs) == clean
    assert [list(d) for d in item.dataset_inputs] == [["dataset", "tags"]] * 3


def model_line(model_json_text: str) -> bytes:
    """A log-model line whose model_json value is given as text, followed by a note."""
    return (
        '{"op": "log-model", "run_id": "r1", "model_json": '
        + model_json_text
        + ', "_note": {"model_json": 1}}'
    ).encode()


def model_text(metadata: str) -> str:
    return (
        '{"artifact_path": "model", "flavors": {"python_function": {}}, '
        '"utc_time_created": "2024-05-01 10:00:00.000000", "run_id": "r1", '
        f'"metadata": {metadata}}}'
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b'{"op": "log-inputs", "run_id": "r1"}', "dataset_inputs"),
        (b'{"run_id": "r1", "dataset_inputs": []}', "dataset_inputs"),
        (b'{"op": "log-inputs", "run_id": "r1", "dataset_inputs": []}', "dataset_inputs"),
        (b'{"run_id": "r1", "datasets": []}', "datasets"),
        (b'{"op": "log-inputs", "run_id": "r1", "datasets": []}', "datasets"),
    ],
)
def test_a_log_inputs_record_with_no_datasets_is_rejected(line: bytes, field: str) -> None:
    assert rejected(line) == (field, "nothing to log")


def test_a_record_with_neither_datasets_nor_model_is_rejected() -> None:
    assert rejected(b'{"run_id": "r1"}') == (
        "op",
        "missing, and neither dataset_inputs nor model_json is given",
    )


INPUTS_LINE = (
    '{"run_id": "r1", "dataset_inputs": [{"dataset": {"name": "ds1", "digest": "d1", '
    '"source": "s3://b/ds1", "source_type": "s3"}, "tags": [{"key": "k", "value": "v"}]}]}'
)
MODEL_WITH_FLAVOR = model_text("{}").replace(
    '"python_function": {}', '"sklearn": {"sklearn_version": "1.5.2"}'
)
DUPLICATED_VERSION = MODEL_WITH_FLAVOR.replace(
    '"sklearn_version": "1.5.2"', '"sklearn_version": "1.5.2", "sklearn_version": "1.6"'
)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (INPUTS_LINE.replace('"run_id": "r1"', '"run_id": "r1", "run_id": "r2"'), "run_id"),
        (INPUTS_LINE.replace('"tags": [', '"tags": [], "tags": ['), "dataset_inputs[0].tags"),
        (
            INPUTS_LINE.replace('"name": "ds1"', '"name": "ds1", "name": "ds2"'),
            "dataset_inputs[0].dataset.name",
        ),
        (
            INPUTS_LINE.replace('"dataset_inputs"', '"datasets"').replace(
                '"digest": "d1"', '"digest": "d1", "digest": "d2"'
            ),
            "datasets[0].dataset.digest",
        ),
        (
            INPUTS_LINE.replace('"key": "k"', '"key": "k", "key": "k2"'),
            "dataset_inputs[0].tags[0].key",
        ),
        (INPUTS_LINE[:-1] + ', "_note": 1, "_note": 2}', "_note"),
        (INPUTS_LINE[:-1] + ', "_note": [{"a": 1, "a": 2}]}', "_note[0].a"),
        # an escaped colon in the kept value hides the dropped member from a colon count
        (INPUTS_LINE[:-1] + ', "_n": "x", "_n": "\\u003a"}', "_n"),
        (model_line(DUPLICATED_VERSION).decode(), "model_json.flavors.sklearn.sklearn_version"),
        (
            model_line(json.dumps(DUPLICATED_VERSION)).decode(),
            "model_json.flavors.sklearn.sklearn_version",
        ),
        (
            model_line(model_text('{"a.b": 1, "a.b": 1}')).decode(),
            'model_json.metadata["a.b"]',
        ),
        (model_line(MODEL_WITH_FLAVOR).decode()[:-1] + ', "model_json": {}}', "model_json"),
    ],
)
def test_a_duplicated_key_is_rejected_with_its_path(line: str, field: str) -> None:
    assert rejected(line.encode()) == (field, "duplicated key")


@pytest.mark.parametrize(
    "metadata",
    [
        '{"big": 123456789012345678901234567890}',
        '{"tenth": 0.1, "third": 0.333333333333333333333333333}',
        '{"huge": 1e400, "tiny": 1E-400, "negative_zero": -0.0, "exponent": 1.50e+2}',
        '{"digits": ' + "9" * 5000 + "}",
        '{ "spaced" : [ 1 , 2.0 ] , "text": "caf\\u00e9 \\"q\\" \u00e9 :" }',
    ],
)
@pytest.mark.parametrize("as_string", [False, True])
def test_model_json_is_sent_exactly_as_written(metadata: str, as_string: bool) -> None:
    text = model_text(metadata)
    item = parse(model_line(json.dumps(text) if as_string else text))
    assert isinstance(item, Record), item
    assert item.model_json == text


def test_deeply_nested_model_json_is_sent_and_too_deep_a_line_is_rejected() -> None:
    deep = model_text("[" * 300 + "]" * 300)
    item = parse(model_line(deep))
    assert isinstance(item, Record), item
    assert item.model_json == deep
    for depth in (600, 5000):
        field, reason = rejected(model_line(model_text("[" * depth + "]" * depth)))
        assert (field, reason) == ("(line)", "nested more than 512 levels deep")


@pytest.mark.parametrize(
    ("value", "kind"),
    [("5", "a number"), ("null", "null"), ("{}", "an object"), ("[]", "an array")],
)
def test_model_json_utc_time_created_must_be_a_string(value: str, kind: str) -> None:
    text = model_text("{}").replace('"2024-05-01 10:00:00.000000"', value)
    for model_json in (text, json.dumps(text)):
        assert rejected(model_line(model_json)) == (
            "model_json.utc_time_created",
            f"expected a string, got {kind}",
        )


@pytest.mark.parametrize("value", ['""', '" "', '"\\t \\n"'])
def test_model_json_utc_time_created_must_not_be_empty(value: str) -> None:
    """MLflow puts the current time in place of an empty utc_time_created: a read-back could
    never recognise the model, and it would be logged twice."""
    text = model_text("{}").replace('"2024-05-01 10:00:00.000000"', value)
    for model_json in (text, json.dumps(text)):
        assert rejected(model_line(model_json)) == (
            "model_json.utc_time_created",
            "expected a non-empty string",
        )


def test_text_that_is_not_unicode_is_rejected_where_it_is() -> None:
    line = INPUTS_LINE.replace('"ds1"', '"\\ud800"', 1).encode()
    assert rejected(line) == (
        "dataset_inputs[0].dataset.name",
        "a lone surrogate escape (\\ud800) is not Unicode text",
    )
    assert rejected(b'{"run_id": "r1", "model_json": {"x": NaN}}')[0] == "(line)"


def assert_well_formed(item: Record | Rejection) -> None:
    assert isinstance(item, (Record, Rejection))
    if isinstance(item, Rejection):
        assert item.field and item.reason
        assert str(item) == f"m.jsonl:7: {item.field}: {item.reason}"
        assert "\n" not in str(item)
        str(item).encode("utf-8")  # printable: no lone surrogates


@settings(database=None, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_record_or_a_rejection(raw: bytes) -> None:
    assert_well_formed(parse_line(raw, 0, "m.jsonl:7"))


KEYS = [
    *("run_id", "op", "dataset_inputs", "datasets", "model_json", "dataset", "tags"),
    *("name", "digest", "source", "source_type", "key", "value", "_note", "a.b", "", "\n"),
]
SCALARS = [
    *('"r1"', '"log-inputs"', '"log-model"', '"s3://b/x"', '"\\u003a"', '"\\ud800"', '"\u00e9"'),
    *("0", "-1", "0.1", "1e400", "123456789012345678901234567890", "true", "null", "NaN"),
]


def objects(values: st.SearchStrategy[str], unique: bool = False) -> st.SearchStrategy[str]:
    """JSON object texts over a few keys, so that a key often comes twice unless unique."""
    member = st.tuples(st.sampled_from(KEYS), values)
    members = (
        st.lists(member, max_size=4, unique_by=lambda kv: kv[0])
        if unique
        else st.lists(member, max_size=4)
    )
    return members.map(lambda kvs: "{" + ", ".join(f"{json.dumps(k)}:{v}" for k, v in kvs) + "}")


def json_texts(scalars: list[str], unique: bool = False) -> st.SearchStrategy[str]:
    """JSON texts nested a few levels, written by hand so every number keeps its spelling."""
    return st.recursive(
        st.sampled_from(scalars),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
            objects(inner, unique),
        ),
        max_leaves=12,
    )


def has_duplicated_key(text: str) -> bool | None:
    """Whether the stdlib parser sees a key twice in one object; None if it is not JSON."""
    found = False

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in members}) != len(members)
        return dict(members)

    def constant(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    return found


@settings(database=None, deadline=None, max_examples=300)
@given(objects(json_texts(SCALARS)), st.integers(min_value=0, max_value=400))
def test_json_lines_give_a_record_or_a_rejection_and_duplicates_are_caught(
    line: str, cut: int
) -> None:
    for text in (line, line[:cut]):
        item = parse_line(text.encode("utf-8", "surrogatepass"), 0, "m.jsonl:7")
        assert_well_formed(item)
        duplicated = has_duplicated_key(text)
        if isinstance(item, Rejection) and item.reason == "duplicated key":
            assert duplicated
        elif duplicated and "\\ud800" not in text:
            assert isinstance(item, Rejection) and item.reason == "duplicated key", item


@settings(database=None, deadline=None)
@given(objects(json_texts([s for s in SCALARS if s not in ('"\\ud800"', "NaN")], True), True))
def test_model_json_text_survives_any_values(metadata: str) -> None:
    text = model_text(metadata)
    for model_json in (text, json.dumps(text)):
        item = parse(model_line(model_json))
        assert isinstance(item, Record), item
        assert item.model_json == text


BOM = b"\xef\xbb\xbf"


def test_a_line_starting_with_a_utf8_bom_parses_and_keeps_its_bytes() -> None:
    """Windows editors write a BOM: it was "invalid JSON: Expecting value"."""
    for doc in (inputs_record("run1", "ds1"), model_record("run1", 3)):
        raw = BOM + orjson.dumps(doc)
        item = parse(raw)
        assert isinstance(item, Record), item
        assert item.raw == raw  # hashed, checkpointed and dead-lettered as it is
        assert item.run_id == "run1"
    model = parse(BOM + orjson.dumps(model_record("run1", 3)))
    assert isinstance(model, Record)
    assert model.model_json == orjson.dumps(model_record("run1", 3)["model_json"]).decode()
    assert rejected(BOM + b'{"run_id": "r1", "dataset": []}')[0] == "dataset"  # named
    assert rejected(BOM + BOM + b"{}")[1].startswith("invalid JSON")  # one BOM, not any


def test_a_bom_line_keeps_its_members_for_the_dead_letter() -> None:
    from batchlog.validate import top_level_spans

    text = (BOM + b'{"run_id": "r1", "x": 1}').decode()
    assert [key for key, _, _ in top_level_spans(text)] == ["run_id", "x"]
    for key, start, end in top_level_spans(text):
        assert text[start:end].startswith(f'"{key}"')


def test_validate_piped_to_head_stops_quietly(tmp_path: Path) -> None:
    """Found by newcomer review: `batchlog validate big.jsonl | head -1` ended with
    "internal error: BrokenPipeError ... this is a bug" (exit 3)."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(f'{{"run_id": "r{i}"}}\n' for i in range(20000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchlog", "validate", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(60)
    assert proc.returncode == 141, err
    assert "internal error" not in err and "Traceback" not in err, err


def test_validate_counts_exactly_the_requests_an_upload_sends(
    tmp_path: Path, oci: Oci, emulator: Callable[..., EmulatorThread]
) -> None:
    """validate counts requests without forming them: the count must still be the
    upload's, merges (by run, at most 100 datasets) and models in between included."""
    one_run = [inputs_record("big", f"b{i:04d}") for i in range(150)]  # 100 + 50
    three = three_inputs()
    three["run_id"] = "big"  # merged with the ones before it
    records = [*mixed_records(120, runs=25), *one_run, three, model_record("big", 1)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    said = run_cli(["validate", str(manifest)])
    assert said.returncode == 0, said.stderr
    emu = emulator()
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 0, out.stderr
    sent = len(emu.state.retry_tokens)
    assert f"{len(records)} records, 0 invalid, {sent} requests to send" in said.stderr

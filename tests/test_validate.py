"""Each kind of bad manifest line is named precisely; good lines parse to records."""

from __future__ import annotations

import orjson
import pytest

from batchlog.records import Record, Rejection
from batchlog.validate import parse_line
from tests.conftest import inputs_record, model_record


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


def test_model_json_object_becomes_compact_string() -> None:
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

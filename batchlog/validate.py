"""Turn one manifest line into a record, or say exactly which field is wrong and why.

Pure functions, no I/O: every rule of the README's manifest format lives here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import orjson

from batchlog.limits import (
    DATASET_LIMITS,
    DATASET_REQUIRED,
    MODEL_JSON_REQUIRED,
    RUN_ID_PATTERN,
    TAG_KEY_MAX,
    TAG_VALUE_MAX,
)
from batchlog.manifest import display_name, read_lines
from batchlog.records import OPS, Op, Record, Rejection

RECORD_FIELDS = ("op", "run_id", "dataset_inputs", "datasets", "model_json")
INPUT_FIELDS = ("dataset", "tags")
DATASET_FIELDS = tuple(DATASET_LIMITS)
TAG_FIELDS = ("key", "value")


class Invalid(Exception):
    """Raised inside this module; becomes a Rejection."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


def parse_manifests(manifests: list[str]) -> Iterator[Record | Rejection]:
    """Every non-blank line of the manifests, in order, parsed (no resume, no skipping)."""
    seq = 0
    for index, path in enumerate(manifests):
        name = display_name(path)
        for line in read_lines(path, index):
            yield parse_line(line.raw, seq, f"{name}:{line.number}")
            seq += 1


def parse_line(raw: bytes, seq: int, source: str) -> Record | Rejection:
    """Validate one non-blank manifest line."""
    try:
        return _parse(raw, seq, source)
    except Invalid as exc:
        return Rejection(seq=seq, source=source, raw=raw, field=exc.field, reason=exc.reason)


def _parse(raw: bytes, seq: int, source: str) -> Record:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid("(line)", f"not valid UTF-8 at byte {exc.start}") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Invalid("(line)", f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Invalid("(line)", f"expected a JSON object, got {_kind(doc)}")
    _reject_unknown(doc, RECORD_FIELDS, "")
    op = _op(doc)
    run_id = doc.get("run_id")
    if run_id is None:
        raise Invalid("run_id", "required")
    if not isinstance(run_id, str):
        raise Invalid("run_id", f"expected a string, got {_kind(run_id)}")
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise Invalid("run_id", f"{_short(run_id)} does not match ^[a-zA-Z0-9][\\w\\-]{{0,255}}$")
    if op == "log-inputs":
        name = "dataset_inputs" if "dataset_inputs" in doc else "datasets"
        inputs = tuple(_dataset_inputs(doc.get(name, []), name))
        return Record(seq, source, raw, op, run_id, inputs, "")
    return Record(seq, source, raw, op, run_id, (), _model_json(doc.get("model_json")))


def _op(doc: dict[str, Any]) -> Op:
    has_inputs = "dataset_inputs" in doc or "datasets" in doc
    has_model = "model_json" in doc
    if "dataset_inputs" in doc and "datasets" in doc:
        raise Invalid("datasets", "give dataset_inputs or its synonym datasets, not both")
    op = doc.get("op")
    if op is None:
        if has_inputs and has_model:
            raise Invalid("op", "both dataset inputs and model_json: say which with op")
        if has_inputs:
            return "log-inputs"
        if has_model:
            return "log-model"
        raise Invalid("op", "missing, and neither dataset_inputs nor model_json is given")
    if op not in OPS:
        raise Invalid("op", f"{_short(op)} is not one of log-inputs, log-model")
    if op == "log-inputs" and has_model:
        raise Invalid("model_json", "not allowed in a log-inputs record")
    if op == "log-model" and has_inputs:
        field = "dataset_inputs" if "dataset_inputs" in doc else "datasets"
        raise Invalid(field, "not allowed in a log-model record")
    if op == "log-model" and not has_model:
        raise Invalid("model_json", "required")
    return op  # type: ignore[no-any-return]


def _dataset_inputs(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Invalid(name, f"expected an array, got {_kind(value)}")
    out = []
    for i, item in enumerate(value):
        path = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise Invalid(path, f"expected an object, got {_kind(item)}")
        _reject_unknown(item, INPUT_FIELDS, path + ".")
        dataset = item.get("dataset")
        if dataset is None:
            raise Invalid(path + ".dataset", "required")
        if not isinstance(dataset, dict):
            raise Invalid(path + ".dataset", f"expected an object, got {_kind(dataset)}")
        _reject_unknown(dataset, DATASET_FIELDS, path + ".dataset.")
        for key in DATASET_REQUIRED:
            if key not in dataset:
                raise Invalid(f"{path}.dataset.{key}", "required")
        for key, value_ in dataset.items():
            if key.startswith("_"):
                continue
            _string(value_, f"{path}.dataset.{key}", DATASET_LIMITS[key])
        tags = item.get("tags", [])
        if not isinstance(tags, list):
            raise Invalid(path + ".tags", f"expected an array, got {_kind(tags)}")
        for j, tag in enumerate(tags):
            tpath = f"{path}.tags[{j}]"
            if not isinstance(tag, dict):
                raise Invalid(tpath, f"expected an object, got {_kind(tag)}")
            _reject_unknown(tag, TAG_FIELDS, tpath + ".")
            for key, limit in (("key", TAG_KEY_MAX), ("value", TAG_VALUE_MAX)):
                if key not in tag:
                    raise Invalid(f"{tpath}.{key}", "required")
                _string(tag[key], f"{tpath}.{key}", limit)
        clean: dict[str, Any] = {"dataset": _strip_notes(dataset)}
        if "tags" in item:
            clean["tags"] = [_strip_notes(t) for t in tags]
        out.append(clean)
    return out


def _model_json(value: Any) -> str:
    if isinstance(value, str):
        try:
            model = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise Invalid("model_json", f"not a JSON document: {exc}") from None
    elif isinstance(value, dict):
        model = value
    else:
        raise Invalid("model_json", f"expected a JSON string or object, got {_kind(value)}")
    if not isinstance(model, dict):
        raise Invalid("model_json", f"expected a JSON object, got {_kind(model)}")
    for key in MODEL_JSON_REQUIRED:
        if key not in model:
            raise Invalid(f"model_json.{key}", "required")
    if not isinstance(model["artifact_path"], str) or not model["artifact_path"]:
        raise Invalid("model_json.artifact_path", "expected a non-empty string")
    if not isinstance(model["flavors"], dict):
        raise Invalid("model_json.flavors", f"expected an object, got {_kind(model['flavors'])}")
    if not isinstance(model["run_id"], str):
        raise Invalid("model_json.run_id", f"expected a string, got {_kind(model['run_id'])}")
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _string(value: Any, field: str, limit: int) -> None:
    if not isinstance(value, str):
        raise Invalid(field, f"expected a string, got {_kind(value)}")
    if len(value) > limit:
        raise Invalid(field, f"{len(value)} characters, more than the limit of {limit}")


def _reject_unknown(obj: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in obj:
        if key in known or key.startswith("_"):
            continue
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise Invalid(prefix + key, f"unknown field{hint}")


def _strip_notes(obj: dict[str, Any]) -> dict[str, Any]:
    if any(k.startswith("_") for k in obj):
        return {k: v for k, v in obj.items() if not k.startswith("_")}
    return obj


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Turn one manifest line into a record, or say exactly which field is wrong and why.

Pure functions, no I/O: every rule of the README's manifest format lives here.
A line is never half-read: a key given twice in one object, a lone surrogate or nesting
deeper than MAX_NESTING rejects the line, and a model_json object is sent as written.
"""

from __future__ import annotations

import difflib
import json
import re
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
from batchlog.planfields import (
    CREATE_RUN_FIELDS,
    LOG_BATCH_FIELDS,
    UPDATE_RUN_FIELDS,
    FieldError,
    create_run_fields,
    log_batch_fields,
    update_run_fields,
)
from batchlog.planfields import (
    json_kind as _kind,
)
from batchlog.planfields import source_run_id as plan_source_run_id
from batchlog.records import OPS, PLAN_OPS, Op, Record, Rejection

RECORD_FIELDS = ("op", "run_id", "dataset_inputs", "datasets", "model_json")
INPUT_FIELDS = ("dataset", "tags")
DATASET_FIELDS = tuple(DATASET_LIMITS)
TAG_FIELDS = ("key", "value")
MAX_NESTING = 512  # arrays and objects inside one another; deeper lines are rejected
KEY_SHOWN = 40  # characters of a key that a message shows; a longer one is cut
FIELD_SHOWN = 120  # characters of a field's path that a message shows: its start and end

_PLAIN_KEY = re.compile(r"[\w\-]+")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BOM = "\ufeff"  # a UTF-8 byte order mark, read past at the start of a line
_COLON_ESCAPE = "\\u003"  # a colon written \u003a escapes the count (catches \u0030-f too)


class Invalid(Exception):
    """Raised inside this module; becomes a Rejection."""

    def __init__(self, field: str, reason: str) -> None:
        if len(field) > FIELD_SHOWN:  # a path hundreds of keys deep: where it starts and ends
            field = field[:40] + "..." + field[43 - FIELD_SHOWN :]
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


def parse_manifests(manifests: list[str]) -> Iterator[Record | Rejection]:
    """Every non-blank line of the manifests, in order, parsed (no resume, no skipping)."""
    seq = 0
    for index, path in enumerate(manifests):
        name = display_name(path)
        for line in read_lines(path, index):
            source = f"{name}:{line.number}"
            if line.problem:  # over-long: never read whole
                yield Rejection(
                    seq=seq, source=source, raw=line.raw, field="(line)", reason=line.problem
                )
            else:
                yield parse_line(line.raw, seq, source)
            seq += 1


def parse_line(raw: bytes, seq: int, source: str) -> Record | Rejection:
    """Validate one non-blank manifest line."""
    try:
        return _parse(raw, seq, source)
    except Invalid as exc:
        return Rejection(seq=seq, source=source, raw=raw, field=exc.field, reason=exc.reason)


def _parse(raw: bytes, seq: int, source: str) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid("(line)", f"not valid UTF-8 at byte {exc.start}") from None
    line = line.removeprefix(_BOM)  # Windows editors write one; the raw bytes keep it
    doc = _load_json(line, "", "invalid JSON")
    if not isinstance(doc, dict):
        raise Invalid("(line)", f"expected a JSON object, got {_kind(doc)}")
    if isinstance(doc.get("_raw"), str) and all(key.startswith("_") for key in doc):
        raise Invalid("_raw", kept_as_text(doc))
    if doc.get("op") in PLAN_OPS or "source_run_id" in doc:
        return _plan_record(doc, raw, seq, source, line)
    _reject_unknown(doc, RECORD_FIELDS, "")
    op = _op(doc)
    return _data_record(doc, op, _run_id(doc), False, raw, seq, source, line)


def _run_id(doc: dict[str, Any]) -> str:
    run_id = doc.get("run_id")
    if run_id is None:
        raise Invalid("run_id", "required")
    if not isinstance(run_id, str):
        raise Invalid("run_id", f"expected a string, got {_kind(run_id)}")
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise Invalid("run_id", f"{_short(run_id)} does not match ^[a-zA-Z0-9][\\w\\-]{{0,255}}$")
    return run_id


def _data_record(
    doc: dict[str, Any],
    op: Op,
    run_id: str,
    plan: bool,
    raw: bytes,
    seq: int,
    source: str,
    line: str,
) -> Record:
    """A log-inputs or log-model record."""
    if op == "log-inputs":
        name = "datasets" if "datasets" in doc else "dataset_inputs"
        if name not in doc:
            raise Invalid(name, "nothing to log")
        inputs = tuple(_dataset_inputs(doc[name], name))
        return Record(seq, source, raw, op, run_id, inputs, "", source_run=plan)
    model = _model_json(doc["model_json"], line)
    return Record(seq, source, raw, op, run_id, (), model, source_run=plan)


_PLAN_FIELDS: dict[str, tuple[str, ...]] = {
    "create-run": CREATE_RUN_FIELDS,
    "log-batch": LOG_BATCH_FIELDS,
    "update-run": UPDATE_RUN_FIELDS,
    "log-inputs": (*RECORD_FIELDS, "source_run_id"),
    "log-model": (*RECORD_FIELDS, "source_run_id"),
}


def _plan_record(doc: dict[str, Any], raw: bytes, seq: int, source: str, line: str) -> Record:
    """A migration plan's record (README, "Migration plans"): create-run, log-batch and
    update-run, or a log-inputs or log-model naming its run by ``source_run_id``."""
    op = _op(doc)
    _reject_unknown(doc, _PLAN_FIELDS[op], "")
    if "run_id" in doc and "source_run_id" in doc:
        raise Invalid(
            "source_run_id",
            "give run_id (a run on the target) or source_run_id (a plan's run), not both",
        )
    plan = "source_run_id" in doc or op == "create-run"
    try:
        run_id = plan_source_run_id(doc) if plan else _run_id(doc)
        if op == "create-run":
            fields = create_run_fields(doc)
        elif op == "log-batch":
            fields = log_batch_fields(doc, len(raw), plan)
        elif op == "update-run":
            fields = update_run_fields(doc)
        else:
            return _data_record(doc, op, run_id, plan, raw, seq, source, line)
    except FieldError as exc:
        raise Invalid(exc.field, exc.reason) from None
    return Record(seq, source, raw, op, run_id, (), "", source_run=plan, fields=fields)


_KEPT_AS_TEXT = "the original line could not be read as a record ("
_REPLACE_IT = "): replace this whole line with the corrected record"


def kept_as_text(doc: dict[str, Any]) -> str:
    """Why a dead-letter line that still holds its original line as the text ``_raw`` (and
    no record) is rejected: the reason the original was, told once however many times the
    line went through a dead letter (each time its ``_error`` says it)."""
    error = doc.get("_error")
    said = error.get("message") if isinstance(error, dict) else None
    if isinstance(said, str) and said.startswith(_KEPT_AS_TEXT) and said.endswith(_REPLACE_IT):
        reason = said[len(_KEPT_AS_TEXT) : -len(_REPLACE_IT)]  # a dead letter's dead letter
    elif isinstance(said, str) and isinstance(error, dict) and error.get("field") == "(line)":
        reason = said  # the first dead letter's: why the original line was rejected
    else:  # no _error (taken out by hand): the text as it stands now
        try:
            _parse(doc["_raw"].encode("utf-8", "surrogatepass"), 0, "")
            reason = "_raw holds a record, but as text"
        except Invalid as exc:
            reason = exc.reason
    return f"{_KEPT_AS_TEXT}{reason}{_REPLACE_IT}"


def _load_json(text: str, path: str, not_json: str) -> Any:
    """Parse one JSON document; Invalid names the member at fault, under ``path``.

    orjson is fast and strict (no NaN, no lone surrogate) but keeps the last of a duplicated
    key, reads integers beyond 64 bits as floats and refuses numbers beyond a double. Its
    result stands when the text provably has no duplicated key: a colon is either a
    member's or inside a string, so writing the result back gives as many colons as the
    text has unless a member was dropped (a colon written as an escape takes the careful
    way). Everything else is decided by the stdlib parser, which sees every member.
    """
    try:
        doc = orjson.loads(text)
        if _COLON_ESCAPE not in text and text.count(":") == orjson.dumps(doc).count(b":"):
            return doc
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass  # not JSON, a number beyond a double, or nested deeper than orjson writes
    try:
        doc = _STRICT_JSON.decode(text)
        _check_members(doc, path, 1)
    except (json.JSONDecodeError, _NotJson) as exc:
        raise Invalid(path or "(line)", f"{not_json}: {exc}") from None
    except RecursionError:
        raise Invalid(path or "(line)", f"nested more than {MAX_NESTING} levels deep") from None
    return doc


class _NotJson(Exception):
    """A value that JSON does not have (NaN, Infinity) in text the stdlib parser reads."""


class _DuplicatedKey(dict[str, Any]):
    """A parsed object in which ``key`` was given more than once."""

    def __init__(self, members: list[tuple[str, Any]], key: str) -> None:
        super().__init__(members)
        self.key = key


def _object(members: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(members)
    if len(obj) == len(members):
        return obj
    seen: set[str] = set()
    for key, _ in members:
        if key in seen:
            return _DuplicatedKey(members, key)
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than members means a repeat")


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _integer(text: str) -> int | float:
    """An integer; one too long for int() (4300 digits) only needs to be known as a number."""
    try:
        return int(text)
    except ValueError:
        return float(text)


_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_no_constant, parse_int=_integer
)
_SPANS_JSON = json.JSONDecoder(parse_int=_integer, parse_constant=_no_constant)


def _check_members(value: Any, path: str, depth: int) -> None:
    """Reject the first duplicated key, lone surrogate or too deep nesting, depth first."""
    if isinstance(value, str):
        if surrogate := _LONE_SURROGATE.search(value):
            raise Invalid(path or "(line)", _not_unicode(surrogate.group()))
        return
    if depth > MAX_NESTING and isinstance(value, (dict, list)):
        raise RecursionError  # treated like the parser running out of stack
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_members(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        if isinstance(value, _DuplicatedKey):
            raise Invalid(_member(path, value.key), "duplicated key")
        for key, item in value.items():
            if surrogate := _LONE_SURROGATE.search(key):
                raise Invalid(_member(path, key), _not_unicode(surrogate.group()))
            _check_members(item, _member(path, key), depth + 1)


def _not_unicode(surrogate: str) -> str:
    return f"a lone surrogate escape (\\u{ord(surrogate):04x}) is not Unicode text"


def _member(path: str, key: str) -> str:
    """The path of member ``key`` of the object at ``path``: path.key, or path["key"], or
    path["the key's start"...] for a long key (a message never echoes a huge key)."""
    if len(key) > KEY_SHOWN:
        return f"{path}[{json.dumps(key[:KEY_SHOWN])}...]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def top_level_spans(text: str) -> list[tuple[str, int, int]]:
    """Every top-level member of the JSON object ``text`` as written, in order, a key given
    twice included: ``(key, start, end)``, ``text[start:end]`` running from the opening
    quote of the key to the end of its value (key escapes decoded: ``"_\\u0065rror"`` is
    ``_error``). Raises ValueError if ``text`` is not one JSON object (NaN and Infinity
    are not JSON), with nothing but JSON whitespace around it (and a BOM before it, as a
    manifest line may have), or is nested deeper than the parser's stack."""
    try:
        return [(key, start, end) for key, start, _, end in _members(text)]
    except (_NotJson, RecursionError) as exc:
        raise ValueError(f"not a JSON object: {exc}") from None


def _member_text(line: str, name: str) -> str:
    """The text of top-level member ``name``'s value as written (``line`` is a JSON object)."""
    for key, _, start, end in _members(line):
        if key == name:
            return line[start:end]
    raise AssertionError(f"unreachable: {name} is a member of the line")


def _members(text: str) -> Iterator[tuple[str, int, int, int]]:
    """(key, start of the key, start of the value, end of the value) of each top-level
    member of the JSON object ``text``; raises ValueError as soon as it is not one."""
    scan = _SPANS_JSON.raw_decode
    pos = _skip_space(text, len(_BOM) if text.startswith(_BOM) else 0)
    if not text.startswith("{", pos):
        raise ValueError("not a JSON object")
    pos = _skip_space(text, pos + 1)
    if not text.startswith("}", pos):
        while True:
            if not text.startswith('"', pos):
                raise ValueError(f"expected a key at character {pos}")
            key, after = scan(text, pos)
            colon = _skip_space(text, after)
            if not text.startswith(":", colon):
                raise ValueError(f"expected ':' at character {colon}")
            start = _skip_space(text, colon + 1)
            _, end = scan(text, start)
            yield key, pos, start, end
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos = _skip_space(text, pos + 1)
            elif text.startswith("}", pos):
                break
            else:
                raise ValueError(f"expected ',' or '}}' at character {pos}")
    if _skip_space(text, pos + 1) != len(text):
        raise ValueError(f"text after the object at character {pos + 1}")


def _skip_space(text: str, pos: int) -> int:
    """The first position from ``pos`` on that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _op(doc: dict[str, Any]) -> Op:
    has_inputs = "dataset_inputs" in doc or "datasets" in doc
    has_model = "model_json" in doc
    if "dataset_inputs" in doc and "datasets" in doc:
        raise Invalid("datasets", "give dataset_inputs or its synonym datasets, not both")
    if "op" not in doc:
        if has_inputs and has_model:
            raise Invalid("op", "both dataset inputs and model_json: say which with op")
        if has_inputs:
            return "log-inputs"
        if has_model:
            return "log-model"
        raise Invalid("op", "missing, and neither dataset_inputs nor model_json is given")
    op = doc["op"]
    if not isinstance(op, str):  # null too: it is not an op left out
        raise Invalid("op", f"expected a string, got {_kind(op)}")
    if op not in OPS:
        raise Invalid("op", f"{_short(op)} is not one of {', '.join(OPS)}")
    if op == "log-inputs" and has_model:
        raise Invalid("model_json", "not allowed in a log-inputs record")
    if op == "log-model" and has_inputs:
        field = "dataset_inputs" if "dataset_inputs" in doc else "datasets"
        raise Invalid(field, "not allowed in a log-model record")
    if op == "log-model" and not has_model:
        raise Invalid("model_json", "required")
    return op


def _dataset_inputs(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Invalid(name, f"expected an array, got {_kind(value)}")
    if not value:
        raise Invalid(name, "nothing to log")
    out = []
    for i, item in enumerate(value):
        if _plain_input(item):  # most items: sent as they are, no field path made
            clean = {"dataset": item["dataset"]}
            if "tags" in item:
                clean["tags"] = item["tags"]
            out.append(clean)
        else:  # a defect (named with its path) or notes (dropped)
            out.append(_dataset_input(item, f"{name}[{i}]"))
    return out


_INPUT_KEYS = frozenset(INPUT_FIELDS)
_DATASET_KEYS = frozenset(DATASET_FIELDS)
_DATASET_REQUIRED_KEYS = frozenset(DATASET_REQUIRED)
_TAG_KEYS = frozenset(TAG_FIELDS)


def _plain_input(item: Any) -> bool:
    """True when ``_dataset_input`` would take ``item`` as it is: every field known and
    present where required, each a string within its limit, and no notes. False sends it
    the careful way, which names the field at fault (profiled: building a path for every
    good field cost a third of `batchlog validate`)."""
    if not isinstance(item, dict) or not item.keys() <= _INPUT_KEYS:
        return False
    dataset = item.get("dataset")
    if not isinstance(dataset, dict) or not (
        _DATASET_REQUIRED_KEYS <= dataset.keys() <= _DATASET_KEYS
    ):
        return False
    for key, text in dataset.items():
        if not isinstance(text, str) or len(text) > DATASET_LIMITS[key]:
            return False
    tags = item.get("tags", [])
    if not isinstance(tags, list):
        return False
    for tag in tags:
        if not isinstance(tag, dict) or tag.keys() != _TAG_KEYS:
            return False
        key, text = tag["key"], tag["value"]
        if not isinstance(key, str) or len(key) > TAG_KEY_MAX:
            return False
        if not isinstance(text, str) or len(text) > TAG_VALUE_MAX:
            return False
    return True


def _dataset_input(item: Any, path: str) -> dict[str, Any]:
    """One dataset input, checked field by field: Invalid names the first field at fault
    under ``path``; the input without its notes."""
    if not isinstance(item, dict):
        raise Invalid(path, f"expected an object, got {_kind(item)}")
    _reject_unknown(item, INPUT_FIELDS, path)
    dataset = item.get("dataset")
    if dataset is None:
        raise Invalid(path + ".dataset", "required")
    if not isinstance(dataset, dict):
        raise Invalid(path + ".dataset", f"expected an object, got {_kind(dataset)}")
    _reject_unknown(dataset, DATASET_FIELDS, path + ".dataset")
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
        _reject_unknown(tag, TAG_FIELDS, tpath)
        for key, limit in (("key", TAG_KEY_MAX), ("value", TAG_VALUE_MAX)):
            if key not in tag:
                raise Invalid(f"{tpath}.{key}", "required")
            _string(tag[key], f"{tpath}.{key}", limit)
    clean: dict[str, Any] = {"dataset": _strip_notes(dataset)}
    if "tags" in item:
        clean["tags"] = [_strip_notes(t) for t in tags]
    return clean


def _model_json(value: Any, line: str) -> str:
    """The MLmodel document as sent: a string as given, an object as written in ``line``."""
    if isinstance(value, str):
        model = _load_json(value, "model_json", "not a JSON document")
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
    for key in ("utc_time_created", "run_id"):
        if not isinstance(model[key], str):
            raise Invalid(f"model_json.{key}", f"expected a string, got {_kind(model[key])}")
    if not model["utc_time_created"].strip():  # MLflow would put the current time instead
        raise Invalid("model_json.utc_time_created", "expected a non-empty string")
    if isinstance(value, str):
        return value
    return _member_text(line, "model_json")


def _string(value: Any, field: str, limit: int) -> None:
    if not isinstance(value, str):
        raise Invalid(field, f"expected a string, got {_kind(value)}")
    if len(value) > limit:
        raise Invalid(field, f"{len(value)} characters, more than the limit of {limit}")


def _reject_unknown(obj: dict[str, Any], known: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key in known or key.startswith("_"):
            continue
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise Invalid(_member(path, key), f"unknown field{hint}")


def _strip_notes(obj: dict[str, Any]) -> dict[str, Any]:
    if any(k.startswith("_") for k in obj):
        return {k: v for k, v in obj.items() if not k.startswith("_")}
    return obj


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

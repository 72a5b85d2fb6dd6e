"""The fields of a migration plan's lines (create-run, log-batch, update-run), checked
against the limits the target enforces, so that a line the server would refuse, or worse
cut short without a word (MLflow truncates long param and tag values), is rejected here
with its field named. Pure functions, no I/O; batchlog.validate calls them.
"""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any

from batchlog.limits import RUN_ID_PATTERN

CREATE_RUN_FIELDS = (
    "op",
    "source_run_id",
    "experiment",
    "run_name",
    "start_time",
    "user",
    "parent_source_run_id",
)
LOG_BATCH_FIELDS = ("op", "run_id", "source_run_id", "params", "metrics", "tags")
UPDATE_RUN_FIELDS = ("op", "run_id", "source_run_id", "status", "end_time")

# MLflow's log-batch limits (mlflow/utils/validation.py); AI Data Platform documents none
MAX_PARAMS = 100
MAX_TAGS = 100
MAX_METRICS = 1000
MAX_ENTRIES = 1000  # params, metrics and tags of one request together
MAX_BATCH_BYTES = 1_000_000  # one log-batch line (its request is a little smaller)
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_EXPERIMENT_NAME = 500
MAX_RUN_NAME = 250  # MLflow keeps the name in runs.name, VARCHAR(250)
MAX_USER = 256
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED", "INTERNAL_ERROR")
METRIC_WORDS = ("NaN", "Infinity", "-Infinity")  # how MLflow's JSON writes those values
RESERVED_TAGS = ("batchlog.source_run_id",)  # set by batchlog on the runs it creates
PLAN_RESERVED_TAGS = ("mlflow.parentRunId",)  # a plan gives parent_source_run_id instead
_INT64 = 1 << 63
_KEY = re.compile(r"[/\w.\- :]+")


class FieldError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


def create_run_fields(doc: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "experiment": _text(doc, "experiment", MAX_EXPERIMENT_NAME, required=True)
    }
    for name, limit in (("run_name", MAX_RUN_NAME), ("user", MAX_USER)):
        if doc.get(name) is not None:
            fields[name] = _text(doc, name, limit)
    if doc.get("start_time") is not None:
        fields["start_time"] = _millis(doc["start_time"], "start_time")
    if doc.get("parent_source_run_id") is not None:
        fields["parent_source_run_id"] = source_run_id(doc, "parent_source_run_id")
        if fields["parent_source_run_id"] == doc.get("source_run_id"):
            raise FieldError("parent_source_run_id", "a run cannot be its own parent")
    return fields


def log_batch_fields(doc: dict[str, Any], size: int, plan: bool) -> dict[str, Any]:
    """``size``: bytes of the line; ``plan``: the line names a source run."""
    if size > MAX_BATCH_BYTES:
        raise FieldError("(line)", f"{size:,} bytes: a log-batch line holds at most 1,000,000")
    params = _entries(doc, "params", MAX_PARAMS)
    metrics = _entries(doc, "metrics", MAX_METRICS)
    tags = _entries(doc, "tags", MAX_TAGS)
    total = len(params) + len(metrics) + len(tags)
    if total == 0:
        raise FieldError("params", "nothing to log (params, metrics and tags are all empty)")
    if total > MAX_ENTRIES:
        raise FieldError(
            "(line)", f"{total:,} params, metrics and tags: one log-batch takes at most 1,000"
        )
    seen: set[str] = set()
    out_params = []
    for i, item in enumerate(params):
        key = _key(item, f"params[{i}]", ("key", "value"))
        if key in seen:
            raise FieldError(f"params[{i}].key", f"{key!r} is given twice in this line")
        seen.add(key)
        out_params.append({"key": key, "value": _value(item, f"params[{i}]", MAX_PARAM_VALUE)})
    out_tags = []
    for i, item in enumerate(tags):
        key = _key(item, f"tags[{i}]", ("key", "value"))
        reserved = RESERVED_TAGS + (PLAN_RESERVED_TAGS if plan else ())
        if key in reserved:
            raise FieldError(f"tags[{i}].key", f"{key} is set by batchlog, not by a plan's line")
        out_tags.append({"key": key, "value": _value(item, f"tags[{i}]", MAX_TAG_VALUE)})
    out_metrics = []
    for i, item in enumerate(metrics):
        where = f"metrics[{i}]"
        key = _key(item, where, ("key", "value", "timestamp", "step"))
        if "timestamp" not in item:
            raise FieldError(f"{where}.timestamp", "required")
        metric = {
            "key": key,
            "value": _metric_value(item.get("value"), f"{where}.value"),
            # MLflow refuses a timestamp below 0 (the whole batch): found by test
            "timestamp": _millis(item["timestamp"], f"{where}.timestamp"),
            "step": _int64(item.get("step", 0), f"{where}.step"),
        }
        out_metrics.append(metric)
    return {"params": out_params, "metrics": out_metrics, "tags": out_tags}


def update_run_fields(doc: dict[str, Any]) -> dict[str, Any]:
    status = doc.get("status")
    if status is None:
        raise FieldError("status", "required")
    if status not in STATUSES:
        raise FieldError("status", f"expected one of {', '.join(STATUSES)}")
    fields: dict[str, Any] = {"status": status}
    if doc.get("end_time") is not None:
        fields["end_time"] = _millis(doc["end_time"], "end_time")
    return fields


def source_run_id(doc: dict[str, Any], name: str = "source_run_id") -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise FieldError(
            name, "required" if value is None else f"expected a string, got {json_kind(value)}"
        )
    if not RUN_ID_PATTERN.fullmatch(value):
        raise FieldError(name, "does not match ^[a-zA-Z0-9][\\w\\-]{0,255}$")
    return value


def _text(doc: dict[str, Any], name: str, limit: int, required: bool = False) -> str:
    value = doc.get(name)
    if value is None and required:
        raise FieldError(name, "required")
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {json_kind(value)}")
    if not value.strip():
        raise FieldError(name, "empty")
    if len(value) > limit:
        raise FieldError(name, f"{len(value):,} characters, at most {limit:,}")
    return value


def _millis(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(
            name, f"expected milliseconds since 1970 (an integer), got {json_kind(value)}"
        )
    if not 0 <= value < _INT64:
        raise FieldError(name, "expected milliseconds since 1970, 0 or more")
    return value


def _int64(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"expected an integer, got {json_kind(value)}")
    if not -_INT64 <= value < _INT64:
        raise FieldError(name, "beyond a 64-bit integer")
    return value


def _entries(doc: dict[str, Any], name: str, limit: int) -> list[dict[str, Any]]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise FieldError(name, f"expected an array, got {json_kind(value)}")
    if len(value) > limit:
        raise FieldError(name, f"{len(value):,} entries, at most {limit:,} in one log-batch")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise FieldError(f"{name}[{i}]", f"expected an object, got {json_kind(item)}")
    return value


def _key(item: dict[str, Any], where: str, allowed: tuple[str, ...]) -> str:
    for name in item:
        if name not in allowed:
            raise FieldError(
                f"{where}.{name}"[:120], f"unknown field (expected {', '.join(allowed)})"
            )
    key = item.get("key")
    if not isinstance(key, str):
        raise FieldError(
            f"{where}.key",
            "required" if key is None else f"expected a string, got {json_kind(key)}",
        )
    if not key or len(key) > MAX_KEY:
        raise FieldError(f"{where}.key", f"{len(key):,} characters, expected 1 to {MAX_KEY}")
    norm = posixpath.normpath(key)
    if not _KEY.fullmatch(key) or norm != key or norm == "." or norm.startswith(("..", "/")):
        raise FieldError(
            f"{where}.key",
            "MLflow allows letters, digits, '_', '-', '.', ' ', ':' and '/' (not a path "
            "that leaves its folder, starts with '/' or has '//' or '.' parts)",
        )
    return key


def _value(item: dict[str, Any], where: str, limit: int) -> str:
    value = item.get("value")
    if not isinstance(value, str):
        raise FieldError(
            f"{where}.value",
            "required" if value is None else f"expected a string, got {json_kind(value)}",
        )
    if len(value) > limit:
        raise FieldError(
            f"{where}.value",
            f"{len(value):,} characters, at most {limit:,} (MLflow would cut it short silently)",
        )
    return value


def _metric_value(value: Any, name: str) -> float | int | str:
    if value is None:
        raise FieldError(name, "required")
    if isinstance(value, str):
        if value in METRIC_WORDS:
            return str(value)
        raise FieldError(name, f"expected a number or one of {', '.join(METRIC_WORDS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"expected a number, got {json_kind(value)}")
    try:  # an integer beyond a double raises (found by test: it ended the job)
        number = float(value) if isinstance(value, int) and abs(value) > 2**53 else value
    except OverflowError:
        raise FieldError(name, "beyond a double") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise FieldError(name, "beyond a double")
    return number


def json_kind(value: Any) -> str:
    """What a JSON value is, in a message's words (also batchlog.validate's)."""
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

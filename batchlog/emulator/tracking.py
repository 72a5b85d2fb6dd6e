"""The emulator's MLflow tracking store: experiments, runs, params, metrics and tags in memory,
validated and de-duplicated as open-source MLflow's SQL store does (the measured behaviour in
the project notes), so that a client's retries and replays meet the same rules as on a real
server.

- experiments/create: a name taken (by any experiment, deleted ones too) is 400
  ``RESOURCE_ALREADY_EXISTS``; get-by-name of a missing name is 404 ``RESOURCE_DOES_NOT_EXIST``.
- runs/log-batch: MLflow's limits (1000 metrics, 100 params, 100 tags, 1000 in all, a body of
  at most 1,000,000 bytes, keys of 1-250 characters of MLflow's key characters); a param value
  over 6000 or a tag value over 8000 characters is refused (MLflow truncates silently; what
  AI Data Platform does is not known, and refusing is what shows a client's mistake); a param
  key twice in one request, or a param logged again with another value, is refused and
  nothing of the request is applied; the same value again is a no-op; exact duplicate metric
  points (key, value, timestamp, step) are dropped, other points appended; tags upsert.
- Metric values: JSON numbers, or the strings "NaN", "Infinity", "-Infinity" (MLflow's JSON),
  answered the same way.
- Runs the store did not create ("implicit" runs: the pre-existing runs hand-written manifests
  name) exist when ``known`` is None or holds them, as the emulator's runs/get has always
  answered; others are 404 ``NotAuthorizedOrNotFound``, as for log-inputs.
- Lists of search and get-history answers are omitted when empty, and ``next_page_token``
  when there is no next page, as MLflow's JSON omits them; page tokens are MLflow's
  (base64 of ``{"offset": N}``).

Errors are raised as ``ApiError`` (status, code, message); the server turns them into OCI's
``{"code", "message"}`` answer. Not thread-safe: used from the emulator's event loop only.
"""

from __future__ import annotations

import base64
import binascii
import math
import posixpath
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from batchlog.limits import RUN_ID_PATTERN

HISTORY_TAG = "mlflow.log-model.history"
RUN_NAME_TAG = "mlflow.runName"
INVALID = "INVALID_PARAMETER_VALUE"
EXISTS = "RESOURCE_ALREADY_EXISTS"
MISSING = "RESOURCE_DOES_NOT_EXIST"
RUN_NOT_FOUND = "NotAuthorizedOrNotFound"  # what the emulator has always answered for a run

MAX_METRICS = 1000
MAX_PARAMS_TAGS = 100
MAX_ENTITIES = 1000
MAX_BATCH_BYTES = 1_000_000
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_EXPERIMENT_NAME = 500
MAX_EXPERIMENT_TAG_VALUE = 20_000
MAX_SEARCH_RESULTS = 50_000
RUNS_SEARCH_DEFAULT = 1000
STATUSES = frozenset({"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED", "INTERNAL_ERROR"})
VIEW_TYPES = {"ACTIVE_ONLY": 1, "DELETED_ONLY": 2, "ALL": 3, 1: 1, 2: 2, 3: 3}
_KEY_CHARS = re.compile(r"[/\w.\- :]*")  # MLflow's key characters (not Windows)
_SPECIAL_VALUES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# one runs/search clause: entity.key op value; the key bare, `back-quoted` or "double-quoted"
_CLAUSE = re.compile(
    r"\s*(?P<entity>[A-Za-z_]+)\.(?:`(?P<bq>[^`]+)`|\"(?P<dq>[^\"]+)\"|(?P<bare>\w+))"
    r"\s*(?P<op>!=|=)\s*(?:'(?P<sq>[^']*)'|\"(?P<dv>[^\"]*)\")\s*"
)
_AND = re.compile(r"AND\b", re.IGNORECASE)
_RUN_ATTRIBUTES = ("run_id", "status", "run_name", "user_id")
_ORDER = re.compile(
    r"\s*(?:attributes?\.)?(?P<key>start_time|end_time|run_name|run_id|status)"
    r"(?:\s+(?P<dir>ASC|DESC))?\s*",
    re.IGNORECASE,
)
_EXPERIMENT_FILTER = re.compile(
    r"\s*(?:attributes?\.)?name\s*=\s*(?:'(?P<sq>[^']*)'|\"(?P<dq>[^\"]*)\")\s*"
)
_FILTER_HELP = (
    "the emulator understands tags.KEY = 'value' (KEY bare, `quoted` or \"quoted\") and "
    "attributes.run_id|status|run_name|user_id = 'value', with = or !=, joined by AND"
)


class ApiError(Exception):
    """An error answer: HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(400, INVALID, message)


class Point(NamedTuple):
    """One metric point as logged."""

    key: str
    value: float
    timestamp: int
    step: int

    def identity(self) -> tuple[str, int, int, float | str]:
        """What MLflow compares to drop an exact duplicate (NaN equals NaN there)."""
        return (
            self.key,
            self.timestamp,
            self.step,
            "NaN" if math.isnan(self.value) else self.value,
        )

    def order(self) -> tuple[int, int, float]:
        """get-history's order: timestamp, step, value (MLflow stores NaN as 0)."""
        return (self.timestamp, self.step, 0.0 if math.isnan(self.value) else self.value)

    def recency(self) -> tuple[int, int, float]:
        """What makes a point the latest of its key: step, timestamp, value (MLflow's)."""
        return (self.step, self.timestamp, 0.0 if math.isnan(self.value) else self.value)

    def item(self) -> str:
        """The point in the emulator's effect log: metric:KEY@STEP@TIMESTAMP=VALUE."""
        return f"metric:{self.key}@{self.step}@{self.timestamp}={metric_json(self.value)}"

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "value": metric_json(self.value),
            "timestamp": self.timestamp,
            "step": self.step,
        }


def metric_json(value: float) -> float | str:
    """A metric value as MLflow's JSON writes it: NaN and infinities as strings."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@dataclass
class Experiment:
    experiment_id: str
    name: str
    artifact_location: str
    creation_time: int
    seq: int  # creation order: searches list the newest first
    tags: dict[str, str] = field(default_factory=dict)
    lifecycle_stage: str = "active"

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "name": self.name,
            "artifact_location": self.artifact_location,
            "lifecycle_stage": self.lifecycle_stage,
            "creation_time": self.creation_time,
            "last_update_time": self.creation_time,
            "tags": _pairs(self.tags),
        }


@dataclass
class Run:
    run_id: str
    created: bool = False  # by runs/create; False: a run that existed before (implicit)
    experiment_id: str = ""
    run_name: str = ""
    user_id: str = ""
    status: str = "RUNNING"
    start_time: int | None = None
    end_time: int | None = None
    artifact_uri: str = ""
    lifecycle_stage: str = "active"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)  # every point, in the order logged
    seen: set[tuple[str, int, int, float | str]] = field(default_factory=set)  # identities
    latest: dict[str, Point] = field(default_factory=dict)  # key -> latest point

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "run_id": self.run_id,
            "run_uuid": self.run_id,
            "run_name": self.run_name,
            "experiment_id": self.experiment_id,
            "user_id": self.user_id,
            "status": self.status,
            "artifact_uri": self.artifact_uri,
            "lifecycle_stage": self.lifecycle_stage,
        }
        if self.start_time is not None:  # MLflow leaves unset times out
            info["start_time"] = self.start_time
        if self.end_time is not None:
            info["end_time"] = self.end_time
        return info


Artifacts = dict[str, tuple[list[Any], list[Any]]]  # run id -> (models, dataset inputs)


class Store:
    """Experiments and runs. ``artifacts`` is the emulator's record of the models and dataset
    inputs logged to each run (log-model, log-inputs), shared, read to answer runs/get."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.experiments: dict[str, Experiment] = {}  # id -> experiment
        self.names: dict[str, str] = {}  # name -> id (deleted ones too: names stay taken)
        self.runs: dict[str, Run] = {}  # created runs, and implicit runs written to
        self._artifacts = artifacts
        self._last_id = 0  # experiment ids are "1", "2", ... as MLflow's SQL store gives

    # ---- experiments -------------------------------------------------------------------

    def create_experiment(self, doc: dict[str, Any]) -> tuple[dict[str, Any], list[Effect]]:
        name = doc.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("Missing value for required parameter 'name'.")
        if len(name) > MAX_EXPERIMENT_NAME:
            raise invalid(f"name exceeds the maximum length of {MAX_EXPERIMENT_NAME}")
        tags = _tags(doc.get("tags"), "tags", MAX_EXPERIMENT_TAG_VALUE)
        location = doc.get("artifact_location")
        if location is not None and not isinstance(location, str):
            raise invalid("artifact_location must be a string")
        if name in self.names:
            raise ApiError(400, EXISTS, f"Experiment(name={name}) already exists.")
        self._last_id += 1
        eid = str(self._last_id)
        self.experiments[eid] = Experiment(
            eid, name, location or f"oci://emulator/{eid}", _now(), self._last_id, dict(tags)
        )
        self.names[name] = eid
        return {"experiment_id": eid}, [Effect("create-experiment", "", name, eid)]

    def experiment_by_name(self, name: str) -> dict[str, Any]:
        if not name:
            raise invalid("Missing value for required parameter 'experiment_name'.")
        eid = self.names.get(name)
        if eid is None:
            raise ApiError(404, MISSING, f"Could not find experiment with name '{name}'")
        return {"experiment": self.experiments[eid].as_json()}

    def experiment_by_id(self, eid: str) -> dict[str, Any]:
        if not eid:
            raise invalid("Missing value for required parameter 'experiment_id'.")
        if eid not in self.experiments:
            raise ApiError(404, MISSING, f"No Experiment with id={eid} exists")
        return {"experiment": self.experiments[eid].as_json()}

    def search_experiments(self, doc: dict[str, Any]) -> dict[str, Any]:
        limit = _max_results(doc.get("max_results"), None)  # required, as on MLflow
        stages = _stages(doc.get("view_type"), "view_type")
        wanted: str | None = None
        text = doc.get("filter")
        if text:
            found = _EXPERIMENT_FILTER.fullmatch(text) if isinstance(text, str) else None
            if found is None:
                raise invalid(
                    f"unsupported filter {text!r}: the emulator understands name = 'NAME'"
                )
            wanted = found["sq"] if found["sq"] is not None else found["dq"]
        if doc.get("order_by"):
            raise invalid(f"unsupported order_by {doc['order_by']!r}: the emulator has none")
        found_all = [
            e
            for e in sorted(self.experiments.values(), key=lambda e: -e.seq)
            if e.lifecycle_stage in stages and (wanted is None or e.name == wanted)
        ]
        page, token = _page(found_all, doc.get("page_token"), limit)
        return _listing("experiments", [e.as_json() for e in page], token)

    def delete_experiment(self, eid: str) -> None:
        """Mark an experiment and its runs deleted (for tests; no endpoint). Call it from the
        emulator's loop, or between requests."""
        self.experiments[eid].lifecycle_stage = "deleted"
        for run in self.runs.values():
            if run.experiment_id == eid:
                run.lifecycle_stage = "deleted"

    # ---- runs --------------------------------------------------------------------------

    def create_run(self, doc: dict[str, Any]) -> tuple[dict[str, Any], list[Effect]]:
        eid = doc.get("experiment_id")
        if not isinstance(eid, str) or not eid:
            raise invalid("Missing value for required parameter 'experiment_id'.")
        experiment = self.experiments.get(eid)
        if experiment is None:
            raise ApiError(404, MISSING, f"No Experiment with id={eid} exists")
        if experiment.lifecycle_stage != "active":
            raise invalid(
                f"The experiment {eid} must be in the 'active' state. "
                f"Current state is {experiment.lifecycle_stage}."
            )
        tags = dict(_tags(doc.get("tags"), "tags", MAX_TAG_VALUE))
        name = _optional(doc, "run_name", str)
        user = _optional(doc, "user_id", str)
        start = _optional(doc, "start_time", int)
        if name and tags.get(RUN_NAME_TAG, name) != name:
            raise invalid(
                f"Both 'run_name' argument and '{RUN_NAME_TAG}' tag are specified, but with "
                f"different values (run_name='{name}', {RUN_NAME_TAG}='{tags[RUN_NAME_TAG]}')."
            )
        run_id = uuid.uuid4().hex
        name = name or tags.get(RUN_NAME_TAG) or f"run-{run_id[:8]}"  # MLflow makes one up
        tags[RUN_NAME_TAG] = name
        run = Run(
            run_id,
            created=True,
            experiment_id=eid,
            run_name=name,
            user_id=user or "",
            start_time=_now() if start is None else start,
            artifact_uri=f"{experiment.artifact_location}/{run_id}/artifacts",
            tags=tags,
        )
        self.runs[run_id] = run
        source = tags.get("batchlog.source_run_id", "")
        return {"run": self.run_json(run)}, [Effect("create-run", run_id, source, eid)]

    def get_run(self, run_id: str, known: frozenset[str] | None) -> dict[str, Any]:
        if not run_id:
            raise invalid("Missing value for required parameter 'run_id'.")
        return {"run": self.run_json(self.run(run_id, known, write=False))}

    def search_runs(self, doc: dict[str, Any]) -> dict[str, Any]:
        ids = doc.get("experiment_ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise invalid("experiment_ids must be an array of strings")
        limit = _max_results(doc.get("max_results"), RUNS_SEARCH_DEFAULT)
        stages = _stages(doc.get("run_view_type"), "run_view_type")
        tests = _run_filter(doc.get("filter"))
        order = _run_order(doc.get("order_by"))
        wanted = set(ids)
        found = [
            r
            for r in self.runs.values()
            if r.created
            and r.experiment_id in wanted
            and r.lifecycle_stage in stages
            and all(t(r) for t in tests)
        ]
        found.sort(key=lambda r: r.run_id)  # the tie-break, then the order asked (stable)
        for key, descending in reversed(order):
            found.sort(key=_sort_key(key), reverse=descending)
        page, token = _page(found, doc.get("page_token"), limit)
        return _listing("runs", [self.run_json(r) for r in page], token)

    def log_batch(
        self, doc: dict[str, Any], size: int, known: frozenset[str] | None, enforce: bool
    ) -> list[Effect]:
        """Apply a log-batch request (its body ``size`` bytes) whole, or raise and apply
        nothing."""
        run_id = _run_id(doc)
        metrics = _array(doc, "metrics")
        params = _array(doc, "params")
        tags_in = _array(doc, "tags")
        if enforce:
            _batch_limits(len(metrics), len(params), len(tags_in), size)
        points = [_point(m, i) for i, m in enumerate(metrics)]
        param_list = _pairs_in(params, "params", MAX_PARAM_VALUE if enforce else None)
        tag_list = _tags(tags_in, "tags", MAX_TAG_VALUE if enforce else None)
        keys = [k for k, _ in param_list]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise invalid(
                f"Duplicate parameter keys have been submitted: {dupes}. Please ensure the "
                "request contains only one param value per param key."
            )
        run = self.run(run_id, known, write=True)
        changed = [
            {"key": k, "old_value": run.params[k], "new_value": v}
            for k, v in param_list
            if k in run.params and run.params[k] != v
        ]
        if changed:
            raise invalid(
                f"Changing param values is not allowed. Params were already logged="
                f"'{changed}' for run ID='{run_id}'."
            )
        effects = []
        for key, value in param_list:
            run.params[key] = value
            effects.append(Effect("log-batch", run_id, f"param:{key}", value))
        for p in points:
            effects.append(Effect("log-batch", run_id, p.item(), p.value))
            if p.identity() in run.seen:
                continue  # an exact duplicate: MLflow drops it
            run.seen.add(p.identity())
            run.points.append(p)
            latest = run.latest.get(p.key)
            if latest is None or p.recency() > latest.recency():
                run.latest[p.key] = p
        for key, value in tag_list:
            run.tags[key] = value
            if key == RUN_NAME_TAG:
                run.run_name = value  # MLflow renames the run
            effects.append(Effect("log-batch", run_id, f"tag:{key}", value))
        return effects

    def update_run(
        self, doc: dict[str, Any], known: frozenset[str] | None
    ) -> tuple[dict[str, Any], list[Effect]]:
        run_id = _run_id(doc)
        status = _optional(doc, "status", str)
        if status is not None and status not in STATUSES:
            raise invalid(f"Invalid value {status!r} for parameter 'status'")
        end = _optional(doc, "end_time", int)
        name = _optional(doc, "run_name", str)
        run = self.run(run_id, known, write=True)
        if status is not None:
            run.status = status
        if end is not None:
            run.end_time = end
        if name:
            run.run_name = run.tags[RUN_NAME_TAG] = name
        item = f"{run.status}@{run.end_time}"
        return {"run_info": run.info()}, [Effect("update-run", run_id, item, None)]

    def metric_history(self, query: dict[str, str], known: frozenset[str] | None) -> dict[str, Any]:
        run_id = query.get("run_id") or query.get("run_uuid") or ""
        key = query.get("metric_key", "")
        if not run_id:
            raise invalid("Missing value for required parameter 'run_id'.")
        if not key:
            raise invalid("Missing value for required parameter 'metric_key'.")
        limit: int | None = None
        if "max_results" in query:
            try:
                limit = int(query["max_results"])
            except ValueError:
                raise invalid(f"Invalid value {query['max_results']!r} for max_results") from None
            if limit < 1:
                raise invalid(f"Invalid value {limit} for parameter 'max_results' supplied.")
        run = self.run(run_id, known, write=False)
        points = sorted((p for p in run.points if p.key == key), key=Point.order)
        if limit is None:  # no max_results: every point, no token (MLflow 3.17)
            return _listing("metrics", [p.as_json() for p in points], None)
        page, token = _page(points, query.get("page_token"), limit)
        return _listing("metrics", [p.as_json() for p in page], token)

    def delete_run(self, run_id: str) -> None:
        """Mark a run deleted (for tests; no endpoint)."""
        self.runs[run_id].lifecycle_stage = "deleted"

    # ---- runs that exist ---------------------------------------------------------------

    def run(self, run_id: str, known: frozenset[str] | None, write: bool) -> Run:
        """The run ``run_id``: one created, or an implicit one that exists (``known`` is None
        or holds it), kept when written to. Raises 404, or 400 to write a deleted run."""
        run = self.runs.get(run_id)
        if run is None:
            if known is not None and run_id not in known:
                raise ApiError(404, RUN_NOT_FOUND, f"Run {run_id} not found.")
            run = Run(run_id)
            if write:
                self.runs[run_id] = run
        if write and run.lifecycle_stage != "active":
            raise invalid(
                f"The run {run_id} must be in the 'active' state. "
                f"Current state is {run.lifecycle_stage}."
            )
        return run

    def check_writable(self, run_id: str, known: frozenset[str] | None) -> None:
        """Raise as ``run`` would for a write, without keeping an implicit run."""
        run = self.runs.get(run_id)
        if run is None:
            self.run(run_id, known, write=False)
        else:
            self.run(run_id, known, write=True)

    def run_json(self, run: Run) -> dict[str, Any]:
        """The run as MLflow answers it (info, data with the latest metrics, inputs)."""
        models, inputs = self._artifacts.get(run.run_id, ([], []))
        tags = _pairs({k: v for k, v in run.tags.items() if k != HISTORY_TAG})
        history = orjson.dumps(models).decode() if models else run.tags.get(HISTORY_TAG)
        if history is not None:
            tags.append({"key": HISTORY_TAG, "value": history})
        return {
            "info": run.info(),
            "data": {
                "params": _pairs(run.params),
                "metrics": [p.as_json() for p in run.latest.values()],
                "tags": tags,
            },
            "inputs": {"dataset_inputs": inputs},
        }

    def dump(self) -> dict[str, Any]:
        """Everything held, for tests (``GET /_emulator/runs``)."""
        ids = list(self.runs) + [r for r in self._artifacts if r not in self.runs]
        runs = []
        for run_id in ids:
            run = self.runs.get(run_id) or Run(run_id)
            models, inputs = self._artifacts.get(run_id, ([], []))
            experiment = self.experiments.get(run.experiment_id)
            runs.append(
                {
                    "run_id": run_id,
                    "created": run.created,
                    "experiment_id": run.experiment_id,
                    "experiment_name": experiment.name if experiment else "",
                    "info": run.info(),
                    "params": dict(run.params),
                    "metrics": [p.as_json() for p in run.points],
                    "tags": dict(run.tags),
                    "datasets": list(inputs),
                    "models": list(models),
                }
            )
        return {"experiments": [e.as_json() for e in self.experiments.values()], "runs": runs}


class Effect(NamedTuple):
    """One thing a call applied, for the emulator's effect log."""

    op: str  # create-experiment, create-run, log-batch, update-run
    run_id: str  # "" for an experiment
    item: str  # what, within the run: the source run id, "param:k", "metric:k@step@ts=v"...
    value: Any  # the value logged, the experiment id...

    def as_json(self) -> dict[str, Any]:
        value = metric_json(self.value) if isinstance(self.value, float) else self.value
        return {"op": self.op, "run_id": self.run_id, "item": self.item, "value": value}


# ---- request fields ------------------------------------------------------------------------


def _now() -> int:
    return int(time.time() * 1000)


def _optional(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is int else "a string"
        raise invalid(f"Invalid value {value!r} for parameter '{name}': must be {what}")
    if isinstance(value, int) and value < 0:
        raise invalid(f"Invalid value {value} for parameter '{name}': must be >= 0")
    return value


def _run_id(doc: dict[str, Any]) -> str:
    run_id = doc.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise invalid("Missing value for required parameter 'run_id'.")
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise invalid(f"Invalid value {run_id!r} for parameter 'run_id' supplied.")
    return run_id


def _array(doc: dict[str, Any], name: str) -> list[Any]:
    value = doc.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"{name} must be an array")
    return value


def _batch_limits(metrics: int, params: int, tags: int, size: int) -> None:
    for what, count, limit in (
        ("metrics", metrics, MAX_METRICS),
        ("params", params, MAX_PARAMS_TAGS),
        ("tags", tags, MAX_PARAMS_TAGS),
        ("metrics, params, and tags", metrics + params + tags, MAX_ENTITIES),
    ):
        if count > limit:
            raise invalid(
                f"A batch logging request can contain at most {limit} {what}. Got {count} "
                f"{what}. Please split up {what} across multiple requests and try again."
            )
    if size > MAX_BATCH_BYTES:
        raise invalid(
            f"Batched logging API requests must be at most {MAX_BATCH_BYTES} bytes, got a "
            f"request of size {size}."
        )


def _key(key: Any, path: str) -> str:
    """A metric, param or tag key as MLflow accepts it."""
    if not isinstance(key, str):
        raise invalid(f"Missing value for required parameter '{path}'.")
    norm = posixpath.normpath(key)
    if not _KEY_CHARS.fullmatch(key) or norm != key or norm == "." or norm.startswith(("..", "/")):
        raise invalid(
            f"Invalid value {key!r} for parameter '{path}' supplied: names may only contain "
            "alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), colon(:) and "
            "slashes (/), and must not resolve to other names as paths"
        )
    if len(key) > MAX_KEY:
        raise invalid(f"'{path}' exceeds the maximum length of {MAX_KEY} characters")
    return key


def _pairs_in(items: list[Any], name: str, value_max: int | None) -> list[tuple[str, str]]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"{name}[{i}] must be an object")
        key = _key(item.get("key"), f"{name}[{i}].key")
        value = item.get("value")
        if not isinstance(value, str):
            raise invalid(f"Missing value for required parameter '{name}[{i}].value'.")
        if value_max is not None and len(value) > value_max:
            raise invalid(
                f"'{name}[{i}].value' ({key}) exceeds the maximum length of {value_max} "
                "characters (MLflow would truncate it silently; the emulator refuses it)"
            )
        out.append((key, value))
    return out


def _tags(value: Any, name: str, value_max: int | None) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"{name} must be an array")
    return _pairs_in(value, name, value_max)


def _point(item: Any, i: int) -> Point:
    path = f"metrics[{i}]"
    if not isinstance(item, dict):
        raise invalid(f"{path} must be an object")
    key = _key(item.get("key"), f"{path}.key")
    raw = item.get("value")
    if isinstance(raw, str) and raw in _SPECIAL_VALUES:
        value = _SPECIAL_VALUES[raw]
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif raw is None:
        raise invalid(f"Missing value for required parameter '{path}.value'.")
    else:
        raise invalid(
            f"Invalid value {raw!r} for parameter '{path}.value': a number, or \"NaN\", "
            '"Infinity" or "-Infinity"'
        )
    stamp = item.get("timestamp")
    if stamp is None:
        raise invalid(f"Missing value for required parameter '{path}.timestamp'.")
    if isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0:
        raise invalid(f"Invalid value {stamp!r} for parameter '{path}.timestamp'")
    step = item.get("step", 0)
    if step is None:
        step = 0
    if isinstance(step, bool) or not isinstance(step, int):
        raise invalid(f"Invalid value {step!r} for parameter '{path}.step'")
    return Point(key, value, stamp, step)


def _max_results(value: Any, default: int | None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(
            f"Invalid value {value} for parameter 'max_results' supplied. It must be a "
            "positive integer"
        )
    if value > MAX_SEARCH_RESULTS:
        raise invalid(
            f"Invalid value {value} for parameter 'max_results' supplied. It must be at most "
            f"{MAX_SEARCH_RESULTS}"
        )
    return value


def _stages(value: Any, name: str) -> frozenset[str]:
    kind = VIEW_TYPES.get(value if value is not None else "ACTIVE_ONLY")
    if kind is None or isinstance(value, bool):
        raise invalid(f"Invalid value {value!r} for parameter '{name}'")
    return frozenset({1: {"active"}, 2: {"deleted"}, 3: {"active", "deleted"}}[kind])


def _run_filter(text: Any) -> list[Callable[[Run], bool]]:
    """The tests a runs/search filter makes, one per clause; an unsupported filter is 400."""
    if not text:
        return []
    if not isinstance(text, str):
        raise invalid("filter must be a string")
    tests = []
    pos = 0
    while True:
        found = _CLAUSE.match(text, pos)
        if found is None:
            raise invalid(f"unsupported filter {text!r}: {_FILTER_HELP}")
        entity = found["entity"].lower()
        key = found["bq"] or found["dq"] or found["bare"]
        wanted = found["sq"] if found["sq"] is not None else found["dv"]
        equal = found["op"] == "="
        if entity in ("tag", "tags"):
            tests.append(_tag_test(key, wanted, equal))
        elif entity in ("attribute", "attributes", "run") and key in _RUN_ATTRIBUTES:
            tests.append(_attribute_test(key, wanted, equal))
        else:
            raise invalid(f"unsupported filter clause {found.group().strip()!r}: {_FILTER_HELP}")
        pos = found.end()
        if pos == len(text):
            return tests
        joined = _AND.match(text, pos)
        if joined is None:
            raise invalid(f"unsupported filter {text!r}: {_FILTER_HELP}")
        pos = joined.end()


def _tag_test(key: str, wanted: str, equal: bool) -> Callable[[Run], bool]:
    """A tag clause: = or != (which, as in SQL, only matches runs that have the tag)."""

    def test(run: Run) -> bool:
        return key in run.tags and (run.tags[key] == wanted) == equal

    return test


def _attribute_test(key: str, wanted: str, equal: bool) -> Callable[[Run], bool]:
    def test(run: Run) -> bool:
        return bool(getattr(run, key) == wanted) == equal

    return test


def _run_order(value: Any) -> list[tuple[str, bool]]:
    """(attribute, descending) pairs; by default start_time DESC (then run_id), MLflow's."""
    if not value:
        return [("start_time", True)]
    if not isinstance(value, list):
        raise invalid("order_by must be an array of strings")
    out = []
    for item in value:
        found = _ORDER.fullmatch(item) if isinstance(item, str) else None
        if found is None:
            raise invalid(
                f"unsupported order_by {item!r}: the emulator orders by attributes "
                "start_time, end_time, run_name, run_id or status, ASC or DESC"
            )
        out.append((found["key"].lower(), (found["dir"] or "ASC").upper() == "DESC"))
    return out


def _sort_key(key: str) -> Callable[[Run], tuple[int, Any]]:
    def value(run: Run) -> tuple[int, Any]:
        found = getattr(run, key)
        return (0, 0) if found is None else (1, found)  # unset first, as NULLs in SQLite

    return value


def _page(items: list[Any], token: Any, limit: int) -> tuple[list[Any], str | None]:
    offset = _offset(token)
    end = offset + limit
    return items[offset:end], _token(end) if end < len(items) else None


def _token(offset: int) -> str:
    return base64.b64encode(orjson.dumps({"offset": offset})).decode()


def _offset(token: Any) -> int:
    if not token:
        return 0
    try:
        doc = orjson.loads(base64.b64decode(str(token), validate=True))
    except (binascii.Error, ValueError):
        raise invalid("Invalid page token, could not base64-decode") from None
    offset = doc.get("offset") if isinstance(doc, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise invalid(f"Invalid page token, decoded value={doc!r}")
    return offset


def _listing(name: str, items: list[Any], token: str | None) -> dict[str, Any]:
    """A search answer as MLflow's JSON has it: no list when empty, no token at the end."""
    out: dict[str, Any] = {}
    if items:
        out[name] = items
    if token:
        out["next_page_token"] = token
    return out


def _pairs(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in values.items()]

"""How a target run differs from what a migration plan says of it: pure functions, no I/O.

``PlanRun`` gathers what the plan's lines say of one run; ``compare_run`` and
``compare_metric`` list the differences, each with the plan line it is about. Metric
histories are compared as sets of (step, timestamp, value) per key: a point the plan gives
twice (a file-store source keeps replays) is one point, a point the target holds twice is
a difference (exactly once is the promise); NaN equals NaN, and MLflow's SQL store keeps an
infinity as +/-1.7976931348623157e308, which equals it. batchlog.verify_plan reads the
target and calls these.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchlog.migrate import SOURCE_TAG, USER_TAG
from batchlog.records import Record

MAX_DOUBLE = 1.7976931348623157e308  # MLflow's SQL store keeps +/-Infinity as +/-this

Value = float | str  # a metric value compared: a float (infinities included) or "NaN"
Point = tuple[int, int, Value]  # step, timestamp, value


# ---- what the plan says of a run -------------------------------------------------------------


@dataclass(slots=True)
class PlanRun:
    """A run as the plan's lines read so far describe it."""

    source: str  # the source run id (a hand-written line: the target run id)
    seq: int  # its first line's place in the job
    experiment: str | None = None  # the experiment the plan names (None: hand-written)
    target: str | None = None  # the target run, when the lines name it (hand-written)
    create: Mapping[str, Any] | None = None  # the create-run's fields: compared both ways
    lines: dict[int, str] = field(default_factory=dict)  # seq -> "FILE:LINE"
    params: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (value, seq)
    tags: dict[str, tuple[str, int]] = field(default_factory=dict)
    metrics: dict[str, dict[Point, int]] = field(default_factory=dict)  # key -> point -> seq
    datasets: list[tuple[str, str, int]] = field(default_factory=list)  # name, digest, seq
    models: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    update: tuple[Mapping[str, Any], int] | None = None
    early: list[tuple[int, str]] = field(default_factory=list)  # the plan's own mistakes

    def add(self, record: Record) -> None:
        self.lines[record.seq] = record.source
        fields = record.fields or {}
        if record.op == "create-run":
            self.create = fields
        elif record.op == "log-batch":
            for p in fields.get("params", ()):
                if p["key"] in self.params and self.params[p["key"]][0] != p["value"]:
                    self.early.append(
                        (record.seq, f"param {p['key']!r} is given another value earlier")
                    )
                self.params[p["key"]] = (p["value"], record.seq)
            for t in fields.get("tags", ()):
                self.tags[t["key"]] = (t["value"], record.seq)
            for m in fields.get("metrics", ()):
                point = (m["step"], m["timestamp"], metric_value(m["value"]))
                self.metrics.setdefault(m["key"], {}).setdefault(point, record.seq)
        elif record.op == "update-run":
            self.update = (fields, record.seq)
        elif record.op == "log-inputs":
            for item in record.dataset_inputs:
                ds = item["dataset"]
                self.datasets.append((ds["name"], ds["digest"], record.seq))
        else:
            self.models.append((json.loads(record.model_json), record.seq))


def metric_value(value: Any) -> Value:
    """A metric value as compared: NaN as "NaN", the words as floats, MLflow's SQL stand-in
    for an infinity (the largest double) as the infinity."""
    if isinstance(value, str):
        if value == "NaN":
            return "NaN"
        value = {"Infinity": math.inf, "-Infinity": -math.inf}.get(value, value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if abs(number) >= MAX_DOUBLE:
        return math.copysign(math.inf, number)
    return number


def target_point(item: Any) -> Point | None:
    """(step, timestamp, value) of a point get-history answered; None if it is not one."""
    if not isinstance(item, dict):
        return None
    try:
        value = metric_value(item.get("value"))
        return (_int(item.get("step", 0)), _int(item.get("timestamp")), value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int:
    """An int64 of MLflow's JSON (a number, or a string of digits as protobuf writes it)."""
    if isinstance(value, bool) or value is None:
        raise TypeError("not an integer")
    return int(value)


# ---- comparing -------------------------------------------------------------------------------

Difference = tuple[int, str]  # the plan line's seq, what differs


def compare_run(
    plan: PlanRun, run: dict[str, Any], target_id: str, status_as: Callable[[str], str]
) -> list[Difference]:
    """How the target run differs from the plan, but for metric histories and the parent
    (which need more reads). A whole run (with its create-run) is compared both ways; a
    hand-written line only for what it holds."""
    out: list[Difference] = []
    whole = plan.create is not None
    info = _dict(run.get("info"))
    data = _dict(run.get("data"))
    tags = run_tags(run)
    params = _pairs(data.get("params"))
    if plan.create is not None:
        seq, c = plan.seq, plan.create
        _same(out, seq, "run name", c.get("run_name"), info.get("run_name"))
        _same(out, seq, "start time", c.get("start_time"), _maybe_int(info.get("start_time")))
        if c.get("user") is not None:
            _same(out, seq, f"user ({USER_TAG})", c["user"], tags.get(USER_TAG), absent="none")
    if plan.update is not None:
        u, seq = plan.update
        status = status_as(u["status"])  # as the target keeps it (MLflow: no INTERNAL_ERROR)
        _same(out, seq, "status", status, info.get("status"))
        if u.get("end_time") is not None:
            _same(out, seq, "end time", u["end_time"], _maybe_int(info.get("end_time")))
    for key, (value, seq) in plan.params.items():
        _same(out, seq, f"param {key!r}", value, params.get(key), absent="missing")
    for key, (value, seq) in plan.tags.items():
        _same(out, seq, f"tag {key!r}", value, tags.get(key), absent="missing")
    if whole:
        for key in params.keys() - plan.params.keys():
            out.append((plan.seq, f"param {key!r} is on the target, not in the plan"))
        for key in tags.keys() - plan.tags.keys():
            if not key.startswith("mlflow.") and key != SOURCE_TAG:  # the server's, batchlog's
                out.append((plan.seq, f"tag {key!r} is on the target, not in the plan"))
        for key in metric_keys(run) - plan.metrics.keys():
            out.append((plan.seq, f"metric {key!r} is on the target, not in the plan"))
    out += _datasets(plan, run, whole)
    out += _models(plan, run, target_id, whole)
    return out


def compare_metric(
    key: str, planned: Mapping[Point, int], got: Counter[Point], whole: bool, seq: int
) -> list[Difference]:
    """One metric's history: every point of the plan once on the target (and, for a whole
    run, no other point)."""
    out: list[Difference] = []
    missing = [p for p in planned if p not in got]
    if missing:
        first = missing[0]
        low, high = min(p[0] for p in missing), max(p[0] for p in missing)
        steps = f"step {low}" if low == high else f"steps {low}-{high}"
        out.append(
            (
                planned[first],
                f"metric {key!r}: {len(missing):,} of {_count(len(planned), 'point')} of the "
                f"plan not on the target ({steps}; the first: {_point(first)})",
            )
        )
    twice = [p for p, n in got.items() if n > 1 and p in planned]
    if twice:
        out.append(
            (
                planned[twice[0]],
                f"metric {key!r}: {_count(len(twice), 'point')} logged more than once "
                f"(the first: {_point(twice[0])}, {got[twice[0]]} times)",
            )
        )
    extra = [p for p in got if p not in planned]
    if whole and extra:
        out.append(
            (
                seq,
                f"metric {key!r}: {_count(len(extra), 'point')} on the target that the plan "
                f"does not have (the first: {_point(extra[0])})",
            )
        )
    return out


def metric_lines(planned: Mapping[Point, int], got: Counter[Point]) -> set[int]:
    """The plan lines (seqs) with a point of this metric not on the target exactly once:
    each is missing or different, though compare_metric lists the metric once."""
    return {seq for p, seq in planned.items() if got.get(p, 0) != 1}


def _datasets(plan: PlanRun, run: dict[str, Any], whole: bool) -> list[Difference]:
    out: list[Difference] = []
    have: Counter[tuple[str, str]] = Counter()
    for item in _list(_dict(run.get("inputs")).get("dataset_inputs")):
        ds = _dict(_dict(item).get("dataset"))
        have[(str(ds.get("name", "")), str(ds.get("digest", "")))] += 1
    planned: set[tuple[str, str]] = set()
    for name, digest, seq in plan.datasets:
        if (name, digest) in planned:
            continue
        planned.add((name, digest))
        n = have.get((name, digest), 0)
        if n != 1:
            said = "not on the target" if n == 0 else f"logged {n} times"
            out.append((seq, f"dataset {name!r} (digest {digest}): {said}"))
    if whole:
        for name, digest in have.keys() - planned:
            out.append(
                (plan.seq, f"dataset {name!r} (digest {digest}) is on the target, not in the plan")
            )
    return out


def _models(plan: PlanRun, run: dict[str, Any], target_id: str, whole: bool) -> list[Difference]:
    # imported here: the job (batchlog.replay) uses this module, and a dry run the job's
    # helpers, which must not load aiohttp with the transport
    from batchlog.transport import HISTORY_TAG, model_identity

    out: list[Difference] = []
    logged = _history(run)
    if logged is None:
        seq = plan.models[0][1] if plan.models else plan.seq
        return [(seq, f"the target's {HISTORY_TAG} tag cannot be read (cut short?)")]
    have: Counter[str] = Counter(model_identity(m) for m in logged)
    names = {model_identity(m): m for m in logged}
    planned: set[str] = set()
    for model, seq in plan.models:
        if "run_id" in model:  # the upload rewrites it to the target run
            model = {**model, "run_id": target_id}
        ours = model_identity(model)
        if ours in planned:
            continue
        planned.add(ours)
        n = have.get(ours, 0)
        if n != 1:
            said = "not on the target" if n == 0 else f"logged {n} times"
            out.append((seq, f"model {_model_name(model)}: {said}"))
    if whole:
        for identity in have.keys() - planned:
            name = _model_name(names[identity])
            out.append((plan.seq, f"model {name} is on the target, not in the plan"))
    return out


def _history(run: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The models of the run's history tag ([] without one; None: it cannot be parsed)."""
    from batchlog.transport import HISTORY_TAG

    value = run_tags(run).get(HISTORY_TAG)
    if value is None:
        return []
    try:
        models = json.loads(value)
    except ValueError:
        return None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else None


def _model_name(model: dict[str, Any]) -> str:
    name = repr(model.get("artifact_path") or model.get("model_uuid") or "?")
    when = model.get("utc_time_created")
    return f"{name} of {when}" if when else name


def _same(
    out: list[Difference], seq: int, what: str, want: Any, got: Any, absent: str = ""
) -> None:
    if want is None or want == got:
        return
    if got is None and absent:
        out.append((seq, f"{what}: {absent} on the target (the plan has {_show(want)})"))
    else:
        out.append((seq, f"{what}: the plan has {_show(want)}, the target {_show(got)}"))


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _point(p: Point) -> str:
    value = p[2] if isinstance(p[2], str) else repr(p[2])
    value = {"inf": "Infinity", "-inf": "-Infinity"}.get(value, value)
    return f"step {p[0]}, timestamp {p[1]}, value {value}"


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'s' * (n != 1)}"


def run_tags(run: dict[str, Any]) -> dict[str, Any]:
    """A run's tags (runs/get's ``data.tags``) as a dict."""
    return _pairs(_dict(run.get("data")).get("tags"))


def metric_keys(run: dict[str, Any]) -> set[Any]:
    """The keys of a run's metrics (runs/get's ``data.metrics``: the latest point of each)."""
    return {_dict(m).get("key") for m in _list(_dict(run.get("data")).get("metrics"))}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pairs(value: Any) -> dict[str, Any]:
    return {
        str(item.get("key")): item.get("value") for item in _list(value) if isinstance(item, dict)
    }


def _maybe_int(value: Any) -> Any:
    try:
        return _int(value)
    except (TypeError, ValueError):
        return value

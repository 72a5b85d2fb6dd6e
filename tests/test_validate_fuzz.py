"""A fuzz of the manifest validator against the documented schema.

The schema below is copied from the README's "Manifest format" and the API reference
(``shared/reference/api.md``: the servers' real limits), not imported from batchlog, so that
the code is compared with the documentation, not with itself. Generated lines are:

- valid by construction, with one field exactly at its limit or one below, any Unicode
  (astral, zero-width, combining, escapes), notes holding anything JSON has, nesting up to
  the limit: each must be accepted, and the body batchlog sends must carry the same data;
- valid records with exactly one defect (a field one past its limit, every wrong type,
  missing or unknown fields, a key given twice, a lone surrogate escape, NaN, bytes that
  are not UTF-8, too deep a nesting, conflicting fields): each must be rejected naming that
  field;
- records of random shape compared with an independent reading of the schema, and bytes
  mutations of valid lines.

Every verdict must be a Record or a Rejection (nothing else escapes), and a rejection one
line of bounded length, ``field: reason``.

Profiles: CI runs FUZZ_EXAMPLES examples per test (a few seconds in all);
``BATCHLOG_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_validate_fuzz.py`` runs
more.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchlog import limits
from batchlog.plan import make_call
from batchlog.records import OPS, Record, Rejection
from batchlog.target import MlflowTarget, OciTarget, Target
from batchlog.validate import parse_line

# ---- profile -------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("BATCHLOG_FUZZ_EXAMPLES", "0")) or 40
settings.register_profile(
    "batchlog-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("batchlog-fuzz")
# lines of megabytes (schema and profile at their limits): fewer of them
BIG = settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 40))

SOURCE = "m.jsonl:7"

# ---- the documented schema -------------------------------------------------------------------

DATASET_LIMITS = {
    "name": 500,
    "digest": 36,
    "source": 65_535,
    "source_type": 36,
    "schema": 1_048_575,
    "profile": 16_777_215,
}
DATASET_REQUIRED = ("name", "digest", "source", "source_type")
TAG_LIMITS = {"key": 255, "value": 500}
RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")  # ^...$: the whole value
RUN_ID_MAX = 256
MODEL_REQUIRED = ("artifact_path", "flavors", "utc_time_created", "run_id")
RECORD_FIELDS = ("op", "run_id", "dataset_inputs", "datasets", "model_json")
INPUT_FIELDS = ("dataset", "tags")
MAX_NESTING = 512  # arrays and objects inside one another, the line's own object included
BIG_FIELDS = ("schema", "profile")  # their limits make lines of megabytes

FIELD_SHOWN_MAX = 200  # a rejection's field and reason are each at most this long
REASON_SHOWN_MAX = 200


def test_the_limits_module_says_what_the_documentation_says() -> None:
    assert limits.DATASET_LIMITS == DATASET_LIMITS
    assert tuple(limits.DATASET_REQUIRED) == DATASET_REQUIRED
    assert {"key": limits.TAG_KEY_MAX, "value": limits.TAG_VALUE_MAX} == TAG_LIMITS
    assert limits.RUN_ID_PATTERN.pattern == RUN_ID.pattern
    assert tuple(limits.MODEL_JSON_REQUIRED) == MODEL_REQUIRED


# ---- writing JSON by hand ------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: a number spelled so (1e400, 5000 digits), NaN, bytes."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """An object written member by member, so that a key can come twice."""

    members: tuple[tuple[str, Any], ...]


NOT_UTF8 = "\ue000"  # written into a Raw, replaced by bytes that are not UTF-8
BAD_BYTES = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"]
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def write(value: Any, ascii_only: bool = False, space: str = "") -> str:
    """JSON text of ``value``; a lone surrogate in a string is always written as an escape."""
    out: list[str] = []
    _write(value, ascii_only, space, out)
    return "".join(out)  # one copy of lines of megabytes, not one per level


def _write(value: Any, ascii_only: bool, space: str, out: list[str]) -> None:
    if isinstance(value, Raw):
        out.append(value.text)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=ascii_only)
        if not ascii_only and not value.isascii() and _SURROGATE.search(value):
            text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        out.append(text)
    elif isinstance(value, list):
        out.append("[")
        for n, item in enumerate(value):
            out.append("," + space if n else "")
            _write(item, ascii_only, space, out)
        out.append("]")
    elif isinstance(value, (dict, Pairs)):
        out.append("{")
        members = value.members if isinstance(value, Pairs) else tuple(value.items())
        for n, (key, item) in enumerate(members):
            out.append("," + space if n else "")
            _write(key, ascii_only, space, out)
            out.append(":" + space)
            _write(item, ascii_only, space, out)
        out.append("}")
    else:
        out.append(json.dumps(value))  # null, booleans, integers of any size, finite floats


def encode(text: str, bad: bytes = b"\xff") -> bytes:
    return text.encode("utf-8").replace(NOT_UTF8.encode(), bad)


def member(path: str, key: str) -> str:
    """How a message names member ``key`` of the object at ``path``."""
    if re.fullmatch(r"[\w\-]+", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


# ---- strategies: values ------------------------------------------------------------------------

ODD_CHARS = [
    *("\u200b", "\u200d", "\ufeff", "\u2028", "\u2029", "\u0301", "\u202e", "\x85"),
    *("\U0001f600", "\U0010ffff", '"', "\\", "/", "\x00", "\x1f", "\x7f", "\u00e9", ":"),
]
chars = st.one_of(
    st.characters(exclude_categories=["Cs"], exclude_characters=NOT_UTF8),
    st.sampled_from(ODD_CHARS),
)
texts = st.text(chars, max_size=12)


@st.composite
def exact_text(draw: st.DrawFn, size: int) -> str:
    """A string of exactly ``size`` code points, any characters, cheap when ``size`` is big."""
    head = draw(st.text(chars, max_size=min(size, 8)))
    fill = draw(chars) if size <= 70_000 else draw(st.sampled_from("x "))
    return head + fill * (size - len(head))


RAW_NUMBERS = [
    *("1e400", "-1e400", "1E-400", "-0", "-0.0", "0.1e1", "1.50e+2"),
    *("123456789012345678901234567890", "9" * 5000, "-" + "1" * 4400),
]
NOT_JSON = ["NaN", "Infinity", "-Infinity"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
    st.sampled_from(RAW_NUMBERS).map(Raw),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, Raw)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def not_a(*kinds: str) -> st.SearchStrategy[Any]:
    """Values of every JSON kind but ``kinds``: what a field of those kinds must refuse."""
    every = {
        "null": st.none(),
        "a boolean": st.booleans(),
        "a number": st.one_of(
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=False, allow_infinity=False),
            st.sampled_from(RAW_NUMBERS).map(Raw),
        ),
        "a string": texts,
        "an array": st.lists(scalars, max_size=2),
        "an object": st.dictionaries(texts, scalars, max_size=2),
    }
    return st.one_of(*(s for k, s in every.items() if k not in kinds))


@st.composite
def deep(draw: st.DrawFn, levels: int) -> Raw:
    """``levels`` arrays and objects inside one another, as text (too deep to recurse)."""
    opened, closed = [], []
    for _ in range(levels):
        if draw(st.booleans()):
            opened.append("[")
            closed.append("]")
        else:
            opened.append("{" + write(draw(texts)) + ":")
            closed.append("}")
    return Raw("".join(opened) + write(draw(scalars)) + "".join(reversed(closed)))


notes = st.dictionaries(st.text(chars, max_size=6).map(lambda k: "_" + k), anything, max_size=2)
run_ids = st.one_of(
    st.from_regex(RUN_ID, fullmatch=True),
    st.sampled_from(["a" * RUN_ID_MAX, "0" + "_-" * 127 + "z", "A"]),
)


word_chars = st.from_regex(r"[\w\-]", fullmatch=True)


@st.composite
def run_id_of_size(draw: st.DrawFn, size: int) -> str:
    head = draw(st.sampled_from("aZ09")) + "".join(draw(st.lists(word_chars, max_size=8)))
    return head + draw(word_chars) * (size - len(head))


# ---- strategies: valid records -----------------------------------------------------------------


@dataclass
class Case:
    """A record as written, and what must come of it."""

    doc: Any  # what ``write`` writes
    datasets: list[dict[str, Any]]  # the dataset inputs the body must carry (log-inputs)
    model: Any = None  # the MLmodel document: its text as sent (log-model)
    ascii_only: bool = False
    space: str = ""

    def line(self) -> str:
        return write(self.doc, self.ascii_only, self.space)


@st.composite
def dataset_inputs(draw: st.DrawFn, focus: tuple[str, int] | None) -> tuple[Any, Any]:
    """(one dataset input as written, as sent): small valid strings, a field of ``focus``
    (name, size) at that size."""
    sent: dict[str, Any] = {}
    for key in DATASET_LIMITS:
        if key in DATASET_REQUIRED or draw(st.booleans()):
            sent[key] = draw(st.text(chars, max_size=min(DATASET_LIMITS[key], 12)))
    tags = [
        {"key": draw(texts), "value": draw(texts)}
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    if focus is not None:
        name, size = focus
        if name in DATASET_LIMITS:
            sent[name] = draw(exact_text(size))
        else:
            if not tags:
                tags.append({"key": "k", "value": "v"})
            tags[-1][name] = draw(exact_text(size))
    dataset = {**sent, **draw(notes)}
    written: dict[str, Any] = {"dataset": _shuffled(draw, dataset)}
    item: dict[str, Any] = {"dataset": sent}
    keep_empty = draw(st.booleans())
    if tags or keep_empty:
        written["tags"] = [_shuffled(draw, {**t, **draw(notes)}) for t in tags]
        item["tags"] = tags
    written.update(draw(notes))
    return _shuffled(draw, written), item


def _shuffled(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    return dict(draw(st.permutations(list(obj.items()))))


@st.composite
def model_documents(draw: st.DrawFn, depth: int = 2) -> dict[str, Any]:
    """An MLmodel document, to be written ``depth`` levels deep (2: in the line's object)."""
    model: dict[str, Any] = {
        "artifact_path": draw(st.text(chars, min_size=1, max_size=12)),
        "flavors": draw(st.dictionaries(texts, anything, max_size=2)),
        "utc_time_created": draw(st.text(chars, max_size=8).map(lambda t: "2024-05-01" + t)),
        "run_id": draw(texts),
    }
    model.update(
        draw(st.dictionaries(texts.filter(lambda k: k not in model), anything, max_size=3))
    )
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # nesting at the limit
        model["deep"] = draw(deep(MAX_NESTING - depth))
    return _shuffled(draw, model)


@st.composite
def valid_cases(draw: st.DrawFn, focus_fields: tuple[str, ...]) -> Case:
    """A valid record; one field of ``focus_fields`` exactly at its limit or one below."""
    ascii_only, space = draw(st.booleans()), draw(st.sampled_from(["", " ", "\t "]))
    focus = draw(st.sampled_from(focus_fields))
    size = {**DATASET_LIMITS, **TAG_LIMITS, "run_id": RUN_ID_MAX}[focus]
    size -= draw(st.sampled_from([0, 1]))
    run_id = draw(run_ids) if focus != "run_id" else draw(run_id_of_size(size))
    doc: dict[str, Any] = {"run_id": run_id, **draw(notes)}
    if focus != "run_id" or draw(st.booleans()):
        name = draw(st.sampled_from(["dataset_inputs", "datasets"]))
        inputs = [
            draw(dataset_inputs((focus, size) if i == 0 and focus != "run_id" else None))
            for i in range(draw(st.integers(min_value=1, max_value=3)))
        ]
        doc[name] = [written for written, _ in inputs]
        if draw(st.booleans()):
            doc["op"] = "log-inputs"
        if draw(st.integers(min_value=0, max_value=9)) == 0:  # nesting at the limit
            doc["_deep"] = draw(deep(MAX_NESTING - 1))
        return Case(_shuffled(draw, doc), [sent for _, sent in inputs], None, ascii_only, space)
    as_text = draw(st.booleans())
    model = draw(model_documents(depth=1 if as_text else 2))
    text = write(model, ascii_only, space)
    doc["model_json"] = text if as_text else model
    if draw(st.booleans()):
        doc["op"] = "log-model"
    return Case(_shuffled(draw, doc), [], text, ascii_only, space)


SMALL_FIELDS = ("run_id", "name", "digest", "source", "source_type", "key", "value")
TARGETS: list[Target] = [OciTarget("http://127.0.0.1", "p", "w"), MlflowTarget("http://127.0.0.1")]


def check_accepted(case: Case) -> None:
    raw = encode(case.line())
    item = parse_line(raw, 0, SOURCE)
    assert isinstance(item, Record), item
    doc = case.doc
    assert item.run_id == doc["run_id"] and item.raw == raw
    for target in TARGETS:
        body = orjson.loads(make_call(target, (item,)).body)
        if case.model is None:
            assert item.op == "log-inputs"
            assert body == {"run_id": doc["run_id"], target.datasets_field: case.datasets}
        else:
            assert item.op == "log-model"
            assert body == {"run_id": doc["run_id"], "model_json": case.model}
            assert isinstance(json.loads(case.model, parse_int=Decimal), dict)


@FUZZ
@given(valid_cases(SMALL_FIELDS))
def test_a_valid_record_at_or_below_each_limit_is_accepted_and_sent_as_is(case: Case) -> None:
    check_accepted(case)


@pytest.mark.parametrize("field", BIG_FIELDS)
@BIG
@given(data=st.data())
def test_schema_and_profile_at_their_limits_are_accepted(field: str, data: st.DataObject) -> None:
    check_accepted(data.draw(valid_cases((field,))))


# ---- strategies: one defect --------------------------------------------------------------------


@dataclass
class Defect:
    """A line with exactly one thing wrong, and how its rejection must name it."""

    line: bytes
    field: str
    reason: str  # a regular expression the whole reason must match


@st.composite
def base_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record as a plain structure, small values, no notes."""
    doc: dict[str, Any] = {"run_id": draw(run_ids)}
    if draw(st.booleans()):
        name = draw(st.sampled_from(["dataset_inputs", "datasets"]))
        doc[name] = [draw(dataset_inputs(None))[1] for _ in range(draw(st.integers(1, 2)))]
    else:
        doc["model_json"] = draw(model_documents())
    return doc


def datasets_name(doc: dict[str, Any]) -> str:
    return "datasets" if "datasets" in doc else "dataset_inputs"


@st.composite
def written(
    draw: st.DrawFn,
    doc: Any,
    field: str,
    reason: str,
    in_model: str | None = None,
    model_as_text: bool = True,
) -> Defect:
    """The line of ``doc``, written any way JSON allows; the model_json object maybe as a
    string. ``in_model``: the field and reason when the defect sits in a model_json written
    as a string (where it is no longer the line's but the document's)."""
    ascii_only, space = draw(st.booleans()), draw(st.sampled_from(["", " ", "\t"]))
    bad = draw(st.sampled_from(BAD_BYTES))
    model = doc.get("model_json") if isinstance(doc, dict) else None
    if isinstance(model, (dict, Pairs)) and model_as_text and draw(st.booleans()):
        doc = {**doc, "model_json": write(model, ascii_only, space)}
        if in_model is not None:
            field, reason = in_model.split(": ", 1)
    return Defect(encode(write(doc, ascii_only, space), bad), field, reason)


def objects_in(value: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every object in ``value``, with its path as messages name it."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(value, dict):
        out.append((path, value))
        for k, v in value.items():
            out += objects_in(v, member(path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += objects_in(v, f"{path}[{i}]")
    return out


def schema_objects(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """The objects whose members the schema names: (path, object, its fields)."""
    out: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [("", doc, RECORD_FIELDS)]
    name = datasets_name(doc)
    for i, item in enumerate(doc.get(name, [])):
        p = f"{name}[{i}]"
        out += [(p, item, INPUT_FIELDS), (p + ".dataset", item["dataset"], tuple(DATASET_LIMITS))]
        out += [
            (f"{p}.tags[{j}]", t, tuple(TAG_LIMITS)) for j, t in enumerate(item.get("tags", []))
        ]
    return out


def typed_sites(doc: dict[str, Any]) -> list[tuple[dict[str, Any] | list[Any], Any, str, str]]:
    """Each value the schema types: (its container, key, field as named, its role)."""
    sites: list[tuple[Any, Any, str, str]] = [(doc, "run_id", "run_id", "run_id")]
    if "model_json" in doc:
        sites.append((doc, "model_json", "model_json", "model_json"))
        sites += [(doc["model_json"], k, f"model_json.{k}", "m." + k) for k in MODEL_REQUIRED]
        return sites
    name = datasets_name(doc)
    sites.append((doc, name, name, "inputs"))
    for i, item in enumerate(doc[name]):
        p = f"{name}[{i}]"
        sites += [(doc[name], i, p, "input"), (item, "dataset", p + ".dataset", "dataset")]
        sites += [(item["dataset"], k, f"{p}.dataset.{k}", "text") for k in DATASET_LIMITS]
        sites.append((item, "tags", p + ".tags", "tags"))
        for j, tag in enumerate(item.get("tags", [])):
            sites += [(item["tags"], j, f"{p}.tags[{j}]", "tag")]
            sites += [(tag, k, f"{p}.tags[{j}].{k}", "text") for k in TAG_LIMITS]
    return sites


def got(value: Any) -> str:
    return re.escape(kind(value))


def expectation(role: str, value: Any) -> str | None:
    """The reason a value of ``role`` must be refused with (a regular expression); None when
    the value is valid there."""
    if role == "run_id":
        if value is None:
            return "required"
        if not isinstance(value, str):
            return f"expected a string, got {got(value)}"
        return None if RUN_ID.fullmatch(value) else ".* does not match .*"
    if role == "inputs":
        if not isinstance(value, list):
            return f"expected an array, got {got(value)}"
        return "nothing to log" if not value else None
    if role in ("input", "tag"):
        return None if isinstance(value, dict) else f"expected an object, got {got(value)}"
    if role == "dataset":
        if value is None:
            return "required"
        return None if isinstance(value, dict) else f"expected an object, got {got(value)}"
    if role == "tags":
        return None if isinstance(value, list) else f"expected an array, got {got(value)}"
    if role in ("text", "m.run_id"):
        return None if isinstance(value, str) else f"expected a string, got {got(value)}"
    if role == "model_json":
        if isinstance(value, dict):
            return None
        if isinstance(value, str):
            return "not a JSON document: .*|expected a JSON object, got .*"
        return f"expected a JSON string or object, got {got(value)}"
    if role == "m.artifact_path":
        return None if isinstance(value, str) and value else "expected a non-empty string"
    if role == "m.flavors":
        return None if isinstance(value, dict) else f"expected an object, got {got(value)}"
    assert role == "m.utc_time_created"
    if not isinstance(value, str):
        return f"expected a string, got {got(value)}"
    return None if value.strip() else "expected a non-empty string"


@st.composite
def wrong_types(draw: st.DrawFn) -> Defect:
    """A typed value replaced by a value of any other kind (or an empty string)."""
    doc = draw(base_docs())
    container, key, field, role = draw(st.sampled_from(typed_sites(doc)))
    value = draw(st.one_of(not_a("a string"), st.just(""), st.text(chars, max_size=3)))
    if role == "model_json" and isinstance(value, str):
        value = draw(st.sampled_from(["", "{", "[]", "null", "1e400", "NaN", '"{}"', "{}}"]))
    reason = expectation(role, value)
    if reason is None:
        value, reason = None, expectation(role, None)
    assert reason is not None
    container[key] = value
    return draw(written(doc, field, reason))


@st.composite
def past_limits(draw: st.DrawFn, big_field: str = "") -> Defect:
    """A string one character past its limit; a run_id that does not match."""
    doc = draw(base_docs())
    if "model_json" in doc:
        doc = {"run_id": doc["run_id"], "datasets": [draw(dataset_inputs(None))[1]]}
    name = datasets_name(doc)
    item = doc[name][-1]
    small = sorted(DATASET_LIMITS.keys() - BIG_FIELDS)
    what = big_field or draw(st.sampled_from([*small, "key", "value", "run_id"]))
    p = f"{name}[{len(doc[name]) - 1}]"
    if what == "run_id":
        doc["run_id"] = draw(
            st.sampled_from(["", "-a", "_a", "a b", "a.b", "a/b", "a\n", "\u00e9a", "a\u200b"])
            | run_id_of_size(RUN_ID_MAX + 1)
        )
        return draw(written(doc, "run_id", ".* does not match .*"))
    if what in DATASET_LIMITS:
        size = DATASET_LIMITS[what] + 1
        item["dataset"][what] = draw(exact_text(size))
        field = f"{p}.dataset.{what}"
    else:
        size = TAG_LIMITS[what] + 1
        item.setdefault("tags", []).append({"key": "k", "value": "v", what: draw(exact_text(size))})
        field = f"{p}.tags[{len(item['tags']) - 1}].{what}"
    return draw(written(doc, field, f"{size} characters, more than the limit of {size - 1}"))


@st.composite
def missing_fields(draw: st.DrawFn) -> Defect:
    doc = draw(base_docs())
    sites = [(doc, "run_id", "run_id")]
    if "model_json" in doc:
        sites += [(doc["model_json"], k, f"model_json.{k}") for k in MODEL_REQUIRED]
    else:
        name = datasets_name(doc)
        for i, item in enumerate(doc[name]):
            p = f"{name}[{i}]"
            sites += [(item, "dataset", p + ".dataset")]
            sites += [(item["dataset"], k, f"{p}.dataset.{k}") for k in DATASET_REQUIRED]
            for j, tag in enumerate(item.get("tags", [])):
                sites += [(tag, k, f"{p}.tags[{j}].{k}") for k in TAG_LIMITS]
    container, key, field = draw(st.sampled_from(sites))
    del container[key]
    return draw(written(doc, field, "required"))


@st.composite
def nothing_to_send(draw: st.DrawFn) -> Defect:
    """A record naming an operation and not its data."""
    doc = draw(base_docs())
    doc.pop("model_json", None)
    doc.pop(datasets_name(doc), None)
    op = draw(st.sampled_from([None, "log-inputs", "log-model"]))
    if op is None:
        return draw(
            written(doc, "op", "missing, and neither dataset_inputs nor model_json is given")
        )
    doc["op"] = op
    if op == "log-model":
        return draw(written(doc, "model_json", "required"))
    return draw(written(doc, "dataset_inputs", "nothing to log"))


@st.composite
def unknown_fields(draw: st.DrawFn) -> Defect:
    doc = draw(base_docs())
    path, obj, known = draw(st.sampled_from(schema_objects(doc)))
    key = draw(st.text(chars, max_size=10).filter(lambda k: k[:1] != "_" and k not in known))
    obj[key] = draw(anything)
    return draw(written(doc, member(path, key), r"unknown field( \(did you mean '\w+'\?\))?"))


@st.composite
def duplicated_keys(draw: st.DrawFn) -> Defect:
    """A key given twice in any object (notes and the model document included)."""
    doc = draw(base_docs())
    doc.update(draw(notes))
    path, obj = draw(st.sampled_from(objects_in(doc)))
    if not obj:
        obj["x"] = 1
    items = list(obj.items())
    key, value = draw(st.sampled_from(items))
    again = (key, draw(st.sampled_from([value, draw(anything)])))
    twice = Pairs(tuple([*items, again] if draw(st.booleans()) else [again, *items]))
    doc = _put(doc, obj, twice)
    return draw(written(doc, member(path, key), "duplicated key"))


def _put(root: Any, old: Any, new: Any) -> Any:
    """``root`` with the object ``old`` (found by identity) replaced by ``new``."""
    if root is old:
        return new
    if isinstance(root, dict):
        return {k: _put(v, old, new) for k, v in root.items()}
    if isinstance(root, list):
        return [_put(v, old, new) for v in root]
    return root


LONE = ["\ud800", "\udfff", "\udc00x", "a\ud83d", "\ude00\ud83d"]
LONE_REASON = r"a lone surrogate escape \(\\ud[89a-f][0-9a-f]{2}\) is not Unicode text"


@st.composite
def lone_surrogates(draw: st.DrawFn) -> Defect:
    """A lone surrogate escape in any key or string value."""
    doc = draw(base_docs())
    doc.update(draw(notes))
    path, obj = draw(st.sampled_from(objects_in(doc)))
    lone = draw(st.sampled_from(LONE))
    if obj and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(obj)))
        obj[key] = lone
    else:
        key = lone
        obj[key] = draw(scalars)
    return draw(written(doc, member(path, key), LONE_REASON))


@st.composite
def broken_lines(draw: st.DrawFn) -> Defect:
    """Bytes that are not UTF-8, NaN or Infinity, nesting past the limit, anywhere; a line
    that is not an object."""
    doc = draw(base_docs())
    path, obj = draw(st.sampled_from(objects_in(doc)))
    in_model = path.startswith("model_json")
    how = draw(st.sampled_from(["utf8", "nan", "deep", "not an object"]))
    if how == "utf8":
        obj[draw(texts)] = Raw('"a' + NOT_UTF8 + 'b"')
        # (in a model_json string, the escape \ue000 would stand for it: not a defect)
        reason = r"not valid UTF-8 at byte \d+"
        return draw(written(doc, "(line)", reason, model_as_text=not in_model))
    if how == "nan":
        obj[draw(texts)] = Raw(draw(st.sampled_from(NOT_JSON)))
        reason = "invalid JSON: .* is not a JSON value"
        model = "model_json: not a JSON document: .* is not a JSON value"
        return draw(written(doc, "(line)", reason, model if in_model else None))
    if how == "deep":  # the line's own object is one level: this is one too many
        if draw(st.booleans()):
            path, obj, in_model = "", doc, False
        obj["_deep"] = draw(deep(MAX_NESTING))
        reason = f"nested more than {MAX_NESTING} levels deep"
        return draw(written(doc, "(line)", reason, f"model_json: {reason}" if in_model else None))
    value = draw(not_a("an object"))
    return draw(written(value, "(line)", f"expected a JSON object, got {got(value)}"))


@st.composite
def bad_ops(draw: st.DrawFn) -> Defect:
    """op of another kind, another operation, or one that contradicts the fields given."""
    doc = draw(base_docs())
    inputs = "model_json" not in doc
    how = draw(st.sampled_from(["kind", "name", "model too", "both names", "other op"]))
    if how == "kind":
        doc["op"] = value = draw(not_a("a string"))
        return draw(written(doc, "op", f"expected a string, got {got(value)}"))
    if how == "name":
        doc["op"] = draw(texts.filter(lambda t: t not in OPS))
        return draw(written(doc, "op", ".* is not one of " + re.escape(", ".join(OPS))))
    if how == "model too":
        if inputs:
            doc["model_json"] = draw(model_documents())
        else:
            doc[draw(st.sampled_from(["dataset_inputs", "datasets"]))] = draw(anything)
        return draw(written(doc, "op", "both dataset inputs and model_json: say which with op"))
    if how == "both names":
        doc["dataset_inputs"] = draw(anything)
        doc["datasets"] = draw(anything)
        reason = "give dataset_inputs or its synonym datasets, not both"
        return draw(written(doc, "datasets", reason))
    if inputs:
        doc["op"] = "log-model"
        return draw(written(doc, datasets_name(doc), "not allowed in a log-model record"))
    doc["op"] = "log-inputs"
    return draw(written(doc, "model_json", "not allowed in a log-inputs record"))


def check_rejected(defect: Defect) -> Rejection:
    item = parse_line(defect.line, 0, SOURCE)
    assert isinstance(item, Rejection), (defect, item)
    assert_well_formed(item)
    assert names(item.field, defect.field), (defect, item)
    assert re.fullmatch(defect.reason, item.reason), (defect, item)
    return item


def names(shown: str, field: str) -> bool:
    """Whether a message's ``shown`` field names ``field``: in full, or a long path by its
    start and its end."""
    if shown == field:
        return True
    cuts = [m.start() for m in re.finditer(re.escape("..."), shown)]
    return any(
        field.startswith(shown[:at]) and field.endswith(shown[at + 3 :]) and len(shown) < len(field)
        for at in cuts
    )


def assert_well_formed(item: Record | Rejection) -> None:
    """A verdict: a record, or one bounded line naming a field and a reason."""
    assert isinstance(item, (Record, Rejection)), item
    if isinstance(item, Rejection):
        assert item.field and item.reason
        assert str(item) == f"{SOURCE}: {item.field}: {item.reason}"
        assert len(str(item).splitlines()) == 1, item
        assert len(item.field) <= FIELD_SHOWN_MAX and len(item.reason) <= REASON_SHOWN_MAX
        orjson.dumps({"field": item.field, "message": item.reason})  # the dead letter's _error
        str(item).encode("utf-8")


@FUZZ
@given(
    st.one_of(
        wrong_types(),
        past_limits(),
        missing_fields(),
        nothing_to_send(),
        unknown_fields(),
        duplicated_keys(),
        lone_surrogates(),
        broken_lines(),
        bad_ops(),
    )
)
def test_a_record_with_one_defect_is_rejected_naming_the_field(defect: Defect) -> None:
    check_rejected(defect)


@pytest.mark.parametrize("field", BIG_FIELDS)
@BIG
@given(data=st.data())
def test_schema_and_profile_past_their_limits_are_rejected(field: str, data: st.DataObject) -> None:
    check_rejected(data.draw(past_limits(field)))


# ---- records of random shape against the schema -------------------------------------------------


def faults(doc: Any) -> set[str]:
    """Every field the documented schema finds at fault in ``doc`` (a parsed line without
    a key given twice, a lone surrogate or NaN): a rejection must name one of them."""
    if not isinstance(doc, dict):
        return {"(line)"}
    out = {member("", k) for k in doc if k not in RECORD_FIELDS and k[:1] != "_"}
    has_inputs = "dataset_inputs" in doc or "datasets" in doc
    name = "datasets" if "datasets" in doc else "dataset_inputs"
    if "dataset_inputs" in doc and "datasets" in doc:
        out.add("datasets")
    if "op" in doc:
        op = doc["op"] if doc["op"] in ("log-inputs", "log-model") else None
    elif has_inputs != ("model_json" in doc):
        op = "log-inputs" if has_inputs else "log-model"
    else:
        op = None  # neither or both: op must say
    if op is None:
        out.add("op")
    run_id = doc.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        out.add("run_id")
    if op == "log-inputs":
        if "model_json" in doc:
            out.add("model_json")
        out |= input_faults(doc.get(name), name)
    elif op == "log-model":
        if has_inputs:
            out.add(name)
        out |= model_faults(doc.get("model_json"))
    return out


def input_faults(inputs: Any, name: str) -> set[str]:
    if not isinstance(inputs, list) or not inputs:
        return {name}
    out: set[str] = set()
    for i, item in enumerate(inputs):
        p = f"{name}[{i}]"
        if not isinstance(item, dict):
            out.add(p)
            continue
        out |= {member(p, k) for k in item if k not in INPUT_FIELDS and k[:1] != "_"}
        dataset = item.get("dataset")
        if not isinstance(dataset, dict):
            out.add(p + ".dataset")
        else:
            out |= object_faults(dataset, f"{p}.dataset", DATASET_LIMITS, DATASET_REQUIRED)
        tags = item.get("tags", [])
        if not isinstance(tags, list):
            out.add(p + ".tags")
            continue
        for j, tag in enumerate(tags):
            t = f"{p}.tags[{j}]"
            if not isinstance(tag, dict):
                out.add(t)
            else:
                out |= object_faults(tag, t, TAG_LIMITS, tuple(TAG_LIMITS))
    return out


def object_faults(obj: dict[str, Any], path: str, sizes: dict[str, int], required: Any) -> set[str]:
    out = {member(path, k) for k in obj if k not in sizes and k[:1] != "_"}
    out |= {f"{path}.{k}" for k in required if k not in obj}
    for k, v in obj.items():
        if k in sizes and (not isinstance(v, str) or len(v) > sizes[k]):
            out.add(f"{path}.{k}")
    return out


def not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def model_faults(model: Any) -> set[str]:
    if isinstance(model, str):
        try:
            model = json.loads(model, parse_constant=not_json, parse_int=Decimal)
        except (ValueError, TypeError):
            return {"model_json"}
    if not isinstance(model, dict):
        return {"model_json"}
    out = {f"model_json.{k}" for k in MODEL_REQUIRED if k not in model}
    checks: dict[str, Callable[[Any], bool]] = {
        "artifact_path": lambda v: isinstance(v, str) and v != "",
        "flavors": lambda v: isinstance(v, dict),
        "utc_time_created": lambda v: isinstance(v, str) and v.strip() != "",
        "run_id": lambda v: isinstance(v, str),
    }
    out |= {f"model_json.{k}" for k, ok in checks.items() if k in model and not ok(model[k])}
    return out


def places(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in ``value``."""
    out: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += [(value, k), *places(v)]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += [(value, i), *places(v)]
    return out


SCHEMA_WORDS = [*RECORD_FIELDS, *INPUT_FIELDS, *DATASET_LIMITS, *TAG_LIMITS, *MODEL_REQUIRED]


@st.composite
def shaped_records(draw: st.DrawFn) -> Any:
    """A valid record with a few random changes: a value replaced by anything, a member
    taken out or added (often a field of the schema, in the wrong place)."""
    doc: dict[str, Any] = draw(base_docs())
    if draw(st.booleans()):
        doc["op"] = "log-model" if "model_json" in doc else "log-inputs"
    if "model_json" in doc and draw(st.booleans()):
        doc["model_json"] = write(doc["model_json"])
    doc.update(draw(notes))
    for _ in range(draw(st.integers(0, 3))):
        if not doc:
            break
        container, key = draw(st.sampled_from(places(doc)))
        how = draw(st.sampled_from(["replace", "remove", "add"]))
        if how == "replace":
            container[key] = draw(anything | st.sampled_from(["", "x" * 600, "log-model"]))
        elif how == "remove" and isinstance(container, dict):
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(SCHEMA_WORDS) | texts)] = draw(anything)
    return doc


def has(value: Any, test: Any) -> bool:
    """Whether ``test`` holds for ``value`` or anything in it."""
    if test(value):
        return True
    if isinstance(value, dict):
        return any(has(v, test) for v in value.values())
    return isinstance(value, list) and any(has(v, test) for v in value)


@FUZZ
@given(shaped_records(), st.booleans())
def test_the_verdict_on_any_record_agrees_with_the_documented_schema(
    doc: Any, ascii_only: bool
) -> None:
    item = parse_line(encode(write(doc, ascii_only)), 0, SOURCE)
    assert_well_formed(item)
    found = faults(doc)
    if has(doc, lambda v: isinstance(v, Raw) and v.text in NOT_JSON):
        found = {"(line)"}
    if not found:
        assert isinstance(item, Record), (doc, item)
    else:
        assert isinstance(item, Rejection) and item.field in found, (doc, item, found)


# ---- bytes ------------------------------------------------------------------------------------


@st.composite
def mutated_lines(draw: st.DrawFn) -> bytes:
    """A valid line with bytes cut, inserted or replaced, or cut short."""
    line = bytearray(encode(draw(valid_cases(SMALL_FIELDS)).line()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(line)))
        how = draw(st.sampled_from(["cut", "insert", "replace", "end"]))
        piece = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(BAD_BYTES))
        if how == "cut":
            del line[at : at + len(piece)]
        elif how == "insert":
            line[at:at] = piece
        elif how == "replace":
            line[at : at + len(piece)] = piece
        else:
            del line[at:]
    return bytes(line)


@FUZZ
@given(mutated_lines())
def test_a_damaged_line_gives_a_record_or_a_rejection(line: bytes) -> None:
    assert_well_formed(parse_line(line, 0, SOURCE))


# ---- regressions found by the fuzz ---------------------------------------------------------------

INPUTS = '"run_id": "r1", "dataset_inputs": [{"dataset": {"name": "n", "digest": "d", "source": "s", "source_type": "t"}}]'  # noqa: E501


@pytest.mark.parametrize(
    ("op", "kind"),
    [("null", "null"), ("true", "a boolean"), ("1e400", "a number"), ('{"a": [1]}', "an object")],
)
def test_an_op_that_is_not_a_string_is_refused_by_its_kind(op: str, kind: str) -> None:
    """``"op": null`` was taken for an op left out (the README: op is log-inputs or
    log-model, or left out), and other kinds were named in Python (True, inf, {'a': [1]})."""
    item = parse_line(f'{{"op": {op}, {INPUTS}}}'.encode(), 0, SOURCE)
    assert isinstance(item, Rejection), item
    assert (item.field, item.reason) == ("op", f"expected a string, got {kind}")


HUGE = "k" * 100_000


@pytest.mark.parametrize(
    ("line", "start", "end"),
    [
        (f'{{{INPUTS}, "{HUGE}": 1}}', '["kkkk', ""),
        (f'{{{INPUTS}, "_n": {{"{HUGE}": 1, "{HUGE}": 2}}}}', '_n["kkkk', ""),
        (f'{{{INPUTS}, "_n": {{"\\ud800{HUGE}": 1}}}}', '_n["\\ud800kkk', ""),
        (
            "{"
            + INPUTS
            + ', "_n": '
            + '{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": ' * 400
            + '{"x": 1, "x": 2}'
            + "}" * 401,
            "_n.aaaa",
            ".aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.x",
        ),
    ],
    ids=["unknown", "twice", "surrogate", "deep"],
)
def test_a_huge_or_deep_key_is_named_but_never_echoed_whole(
    line: str, start: str, end: str
) -> None:
    """A message named a 100,000-character key, or a path 400 keys deep, in full."""
    item = parse_line(line.encode(), 0, SOURCE)
    assert isinstance(item, Rejection), item
    assert_well_formed(item)
    assert item.field.startswith(start) and item.field.endswith(end), item.field

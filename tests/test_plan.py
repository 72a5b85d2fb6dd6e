"""Calls depend only on the manifest's content; tokens are stable, short and target-bound."""

from __future__ import annotations

import orjson

from batchlog.plan import Call, Grouper, GroupLimits, split
from batchlog.records import Record
from batchlog.target import OciTarget
from batchlog.validate import parse_line
from tests.conftest import inputs_record, mixed_records, model_record

TARGET = OciTarget("https://example.invalid", "ocid1.p", "ws")


def records(docs: list[dict[str, object]]) -> list[Record]:
    out = []
    for i, d in enumerate(docs):
        item = parse_line(orjson.dumps(d), i, f"m:{i + 1}")
        assert isinstance(item, Record)
        out.append(item)
    return out


def plan(
    recs: list[Record], limits: GroupLimits | None = None, target: OciTarget = TARGET
) -> list[Call]:
    g = Grouper(target, limits or GroupLimits())
    calls = [c for r in recs for c in g.add(r)]
    return calls + list(g.flush())


def test_consecutive_inputs_of_a_run_merge_models_do_not() -> None:
    recs = records(
        [
            inputs_record("r1", "a"),
            inputs_record("r1", "b"),
            model_record("r1", 1),
            model_record("r1", 2),
            inputs_record("r1", "c"),
            inputs_record("r2", "d"),
        ]
    )
    calls = plan(recs)
    assert [(c.op, [r.seq for r in c.records]) for c in calls] == [
        ("log-inputs", [0, 1]),
        ("log-model", [2]),
        ("log-model", [3]),
        ("log-inputs", [4]),
        ("log-inputs", [5]),
    ]
    body = orjson.loads(calls[0].body)
    assert [d["dataset"]["name"] for d in body["dataset_inputs"]] == ["a", "b"]


def test_grouping_respects_dataset_cap() -> None:
    recs = records([inputs_record("r1", f"d{i}") for i in range(7)])
    calls = plan(recs, GroupLimits(max_datasets=3))
    assert [len(c.records) for c in calls] == [3, 3, 1]


def test_tokens_are_deterministic_short_and_bound_to_target() -> None:
    recs = records(mixed_records(40))
    a, b = plan(recs), plan(records(mixed_records(40)))
    assert [c.token for c in a] == [c.token for c in b]
    assert all(len(c.token) <= 64 for c in a)
    assert len({c.token for c in a}) == len(a)
    other = plan(recs, target=OciTarget("https://example.invalid", "ocid1.p", "ws2"))
    assert not {c.token for c in a} & {c.token for c in other}
    # the endpoint host is not part of the identity: the same workspace via another name
    alias = plan(recs, target=OciTarget("https://alias.invalid", "ocid1.p", "ws"))
    assert [c.token for c in a] == [c.token for c in alias]


def test_split_gives_each_record_its_single_token() -> None:
    recs = records([inputs_record("r1", "a"), inputs_record("r1", "b")])
    merged = plan(recs)[0]
    singles = split(TARGET, merged)
    assert [c.token for c in singles] == [plan([r])[0].token for r in recs]


def test_path_parameters_are_percent_encoded() -> None:
    t = OciTarget("https://h", "ocid1/odd id", "w s")
    assert t.path("log-inputs").startswith("/20260430/aiDataPlatforms/ocid1%2Fodd%20id/")
    assert "/workspaces/w%20s/mlops/api/2.0/mlflow/runs/log-inputs" in t.path("log-inputs")


def test_a_call_sent_before_is_formed_again_exactly_whatever_was_appended() -> None:
    """A merged call in doubt, regrouped with a line appended since, would go out under a
    new retry token and be applied twice."""
    from batchlog.plan import Grouper, GroupLimits
    from batchlog.records import Record
    from batchlog.target import OciTarget

    target = OciTarget("http://127.0.0.1", "p", "w")

    def rec(seq: int) -> Record:
        ds = {"name": f"d{seq}", "digest": "x", "source": "s", "source_type": "s3"}
        return Record(seq, f"m:{seq + 1}", b"{}", "log-inputs", "run", ({"dataset": ds},), "")

    def calls(grouper: Grouper, n: int) -> list[tuple[int, ...]]:
        out = [c for i in range(n) for c in grouper.add(rec(i))] + list(grouper.flush())
        return [tuple(r.seq for r in c.records) for c in out]

    assert calls(Grouper(target, GroupLimits()), 3) == [(0, 1, 2)]
    assert calls(Grouper(target, GroupLimits(), {0: 2}), 3) == [(0, 1), (2,)]
    assert calls(Grouper(target, GroupLimits(max_datasets=1), {1: 2}), 4) == [(0,), (1, 2), (3,)]

"""The emulator's experiments and runs operations (issue 11), through real HTTP with real OCI
signatures: create and find experiments, create runs (retry tokens: never a second run), log
batches under MLflow's limits and replay rules, update, read back, search and page."""

from __future__ import annotations

import base64
import hashlib
import http.client
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from batchlog.emulator import EmulatorThread
from batchlog.signing import KeySource, StaticKey, sign_get, sign_post
from tests.conftest import KEY_ID, PLATFORM, WORKSPACE, Oci, inputs_record, model_record

StartEmulator = Callable[..., EmulatorThread]
PREFIX = f"/20260430/aiDataPlatforms/{PLATFORM}/workspaces/{WORKSPACE}/mlops/api/2.0/mlflow/"
SOURCE_TAG = "batchlog.source_run_id"


class Api:
    """Signed requests to one emulator, one connection each (http.client: no redirects)."""

    def __init__(self, emu: EmulatorThread, keys: KeySource) -> None:
        self.emu = emu
        self.keys = keys
        self.host = emu.url.removeprefix("http://")

    def post(self, op: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
        headers = {
            **sign_post(self.keys, PREFIX + op, self.host, len(data), sha),
            "content-type": "application/json",
            "x-content-sha256": sha,
        }
        if token is not None:
            headers["opc-retry-token"] = token
        return self._send("POST", PREFIX + op, data, headers)

    def get(self, op: str, **query: Any) -> tuple[int, dict[str, Any]]:
        path = PREFIX + op + ("?" + urlencode(query) if query else "")
        return self._send("GET", path, None, sign_get(self.keys, path, self.host))

    def _send(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.host, timeout=10)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, orjson.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        """What the emulator holds (``GET /_emulator/runs``: no signature)."""
        conn = http.client.HTTPConnection(self.host, timeout=10)
        try:
            conn.request("GET", "/_emulator/runs")
            resp = conn.getresponse()
            assert resp.status == 200
            doc: dict[str, Any] = orjson.loads(resp.read())
            return doc
        finally:
            conn.close()

    # ---- shortcuts -----------------------------------------------------------------------

    def experiment(self, name: str) -> str:
        status, doc = self.post("experiments/create", {"name": name}, token="exp-" + name)
        assert status == 200, doc
        return str(doc["experiment_id"])

    def new_run(self, experiment_id: str, source: str, **fields: Any) -> dict[str, Any]:
        body = {
            "experiment_id": experiment_id,
            "tags": [{"key": SOURCE_TAG, "value": source}],
            **fields,
        }
        status, doc = self.post("runs/create", body, token="run-" + source)
        assert status == 200, doc
        run: dict[str, Any] = doc["run"]
        return run


@pytest.fixture
def api(oci: Oci, emulator: StartEmulator) -> Api:
    return Api(emulator(), StaticKey(KEY_ID, oci.key))


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"]["tags"]}


def runs_by_source(state: dict[str, Any], source: str) -> list[dict[str, Any]]:
    return [r for r in state["runs"] if r["tags"].get(SOURCE_TAG) == source]


def test_experiments_create_replays_by_token_and_refuses_a_taken_name(api: Api) -> None:
    body = {"name": "exp-a"}
    status, first = api.post("experiments/create", body, token="t-exp-a")
    assert status == 200 and set(first) == {"experiment_id"}
    assert api.post("experiments/create", body, token="t-exp-a") == (200, first)  # replay
    status, doc = api.post("experiments/create", {"name": "exp-b"}, token="t-exp-a")
    assert (status, doc["code"]) == (409, "InvalidatedRetryToken")
    for token in ("t-other", None):  # the name is taken: MLflow's 400, not 409
        status, doc = api.post("experiments/create", body, token=token)
        assert (status, doc["code"]) == (400, "RESOURCE_ALREADY_EXISTS")
        assert "exp-a" in doc["message"]

    status, doc = api.get("experiments/get-by-name", experiment_name="exp-a")
    assert status == 200
    experiment = doc["experiment"]
    assert experiment["experiment_id"] == first["experiment_id"]
    assert experiment["name"] == "exp-a" and experiment["lifecycle_stage"] == "active"
    status, doc = api.get("experiments/get-by-name", experiment_name="nope")
    assert (status, doc["code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    status, doc = api.get("experiments/get", experiment_id=first["experiment_id"])
    assert status == 200 and doc["experiment"]["name"] == "exp-a"

    state = api.state()
    assert [e["name"] for e in state["experiments"]] == ["exp-a"]
    assert state["applied_by_op"] == {"experiments/create": 1}


def test_experiments_search_pages_and_requires_max_results(api: Api) -> None:
    names = [f"exp-{i}" for i in range(5)]
    for name in names:
        api.experiment(name)
    seen: list[str] = []
    token = None
    for _ in range(10):  # bounded: 3 pages expected
        body: dict[str, Any] = {"max_results": 2}
        if token:
            body["page_token"] = token
        status, doc = api.post("experiments/search", body)
        assert status == 200
        seen += [e["name"] for e in doc["experiments"]]
        token = doc.get("next_page_token")
        if not token:
            break
    assert seen == names[::-1]  # newest first, as MLflow
    status, doc = api.post("experiments/search", {"max_results": 10, "filter": "name = 'exp-3'"})
    assert status == 200 and [e["name"] for e in doc["experiments"]] == ["exp-3"]
    for bad in ({}, {"max_results": 0}, {"max_results": 50_001}, {"max_results": 5, "filter": "x"}):
        status, doc = api.post("experiments/search", bad)
        assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE"), bad
    status, doc = api.post("experiments/search", {"max_results": 2, "page_token": "%%%"})
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")


def test_runs_create_replayed_with_its_token_returns_the_same_run(api: Api) -> None:
    eid = api.experiment("exp")
    body = {
        "experiment_id": eid,
        "run_name": "train",
        "start_time": 1_700_000_000_000,
        "tags": [{"key": SOURCE_TAG, "value": "S1"}, {"key": "mlflow.user", "value": "alice"}],
    }
    status, first = api.post("runs/create", body, token="t-run-S1")
    assert status == 200
    run = first["run"]
    run_id = run["info"]["run_id"]
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    assert run["info"]["experiment_id"] == eid and run["info"]["run_name"] == "train"
    assert run["info"]["status"] == "RUNNING"
    assert run["info"]["start_time"] == 1_700_000_000_000
    assert tags_of(run) == {SOURCE_TAG: "S1", "mlflow.user": "alice", "mlflow.runName": "train"}
    for _ in range(3):
        assert api.post("runs/create", body, token="t-run-S1") == (200, first)
    status, doc = api.post("runs/create", {**body, "run_name": "other"}, token="t-run-S1")
    assert (status, doc["code"]) == (409, "InvalidatedRetryToken")

    state = api.state()
    assert [r["run_id"] for r in runs_by_source(state, "S1")] == [run_id]
    assert state["applied_by_op"] == {"experiments/create": 1, "runs/create": 1}

    # without the token, runs/create makes another run, as MLflow does: the client's guard
    # is runs/search by its tag
    status, doc = api.post("runs/create", body)
    assert status == 200 and doc["run"]["info"]["run_id"] != run_id
    assert len(runs_by_source(api.state(), "S1")) == 2

    status, doc = api.post("runs/create", {**body, "experiment_id": "999"}, token="t-x")
    assert (status, doc["code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    status, doc = api.post("runs/create", {"run_name": "x"}, token="t-y")
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")
    bad_name = {**body, "tags": [{"key": "mlflow.runName", "value": "else"}]}
    status, doc = api.post("runs/create", bad_name, token="t-z")
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")


def metric(key: str, value: Any, ts: int, step: int = 0) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": ts, "step": step}


def test_log_batch_enforces_mlflows_limits_and_applies_nothing_of_a_refused_batch(
    api: Api,
) -> None:
    run_id = api.new_run(api.experiment("exp"), "S1")["info"]["run_id"]
    params = [{"key": f"p{i}", "value": "v"} for i in range(101)]
    tags = [{"key": f"t{i}", "value": "v"} for i in range(101)]
    metrics = [metric("m", i, 1000 + i) for i in range(1001)]
    refused = {
        "101 params": {"params": params},
        "101 tags": {"tags": tags},
        "1001 metrics": {"metrics": metrics},
        "1001 in all": {"metrics": metrics[:1000], "tags": tags[:1]},
        "key of 251": {"params": [{"key": "k" * 251, "value": "v"}]},
        "key characters": {"tags": [{"key": "a;b", "value": "v"}]},
        "key as a path": {"params": [{"key": "a/../b", "value": "v"}]},
        "empty key": {"params": [{"key": "", "value": "v"}]},
        "param value 6001": {"params": [{"key": "p", "value": "x" * 6001}]},
        "tag value 8001": {"tags": [{"key": "t", "value": "x" * 8001}]},
        "duplicate param": {"params": [{"key": "p", "value": "1"}, {"key": "p", "value": "1"}]},
        "no timestamp": {"metrics": [{"key": "m", "value": 1.0}]},
        "value a word": {"metrics": [metric("m", "high", 1)]},
        "param value a number": {"params": [{"key": "p", "value": 1}]},
        "body over 1 MB": {"tags": [{"key": f"t{i}", "value": "x" * 7999} for i in range(100)]}
        | {"params": [{"key": f"p{i}", "value": "x" * 5999} for i in range(100)]},
    }
    for why, body in refused.items():
        status, doc = api.post("runs/log-batch", {"run_id": run_id, **body}, token="t-" + why)
        assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE"), why
    assert (
        "at most 100 params"
        in api.post("runs/log-batch", {"run_id": run_id, "params": params})[1]["message"]
    )
    held = runs_by_source(api.state(), "S1")[0]
    assert (
        held["params"] == {}
        and held["metrics"] == []
        and set(held["tags"])
        == {
            SOURCE_TAG,
            "mlflow.runName",
        }
    )

    # the largest allowed batch goes in
    full = {
        "run_id": run_id,
        "params": params[:100],
        "tags": tags[:100],
        "metrics": metrics[:800],
    }
    assert api.post("runs/log-batch", full, token="t-full") == (200, {})
    held = runs_by_source(api.state(), "S1")[0]
    assert len(held["params"]) == 100 and len(held["metrics"]) == 800


def test_log_batch_replays_like_mlflow_params_fixed_metrics_deduplicated_tags_upserted(
    api: Api,
) -> None:
    run_id = api.new_run(api.experiment("exp"), "S1")["info"]["run_id"]
    batch = {
        "run_id": run_id,
        "params": [{"key": "lr", "value": "0.1"}],
        "metrics": [metric("loss", 0.5, 1000, 0), metric("loss", "NaN", 1001, 1)],
        "tags": [{"key": "team", "value": "a"}],
    }
    assert api.post("runs/log-batch", batch, token="t1") == (200, {})
    # the same batch again under another token (an answer lost past the token's life):
    # the param is a no-op, the points exact duplicates, dropped
    assert api.post("runs/log-batch", batch, token="t2") == (200, {})
    more = {
        "run_id": run_id,
        "params": [{"key": "lr", "value": "0.1"}, {"key": "epochs", "value": "3"}],
        "metrics": [
            metric("loss", 0.5, 1000, 0),  # exact duplicate: dropped
            metric("loss", 0.25, 1000, 0),  # same step and time, other value: kept
            metric("acc", "Infinity", 1002, 2),
            metric("acc", "-Infinity", 1003, 3),
        ],
        "tags": [{"key": "team", "value": "b"}],  # upsert
    }
    assert api.post("runs/log-batch", more, token="t3") == (200, {})
    changed = {
        "run_id": run_id,
        "params": [{"key": "lr", "value": "0.2"}],
        "metrics": [metric("loss", 9.0, 5000, 9)],
        "tags": [{"key": "team", "value": "c"}],
    }
    status, doc = api.post("runs/log-batch", changed, token="t4")
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert "Changing param values is not allowed" in doc["message"]

    held = runs_by_source(api.state(), "S1")[0]
    assert held["params"] == {"lr": "0.1", "epochs": "3"}
    assert held["metrics"] == [
        metric("loss", 0.5, 1000, 0),
        metric("loss", "NaN", 1001, 1),
        metric("loss", 0.25, 1000, 0),
        metric("acc", "Infinity", 1002, 2),
        metric("acc", "-Infinity", 1003, 3),
    ]
    assert held["tags"]["team"] == "b"
    assert api.post("runs/log-batch", batch, token="t1") == (200, {})  # a token replay
    applied = api.state()["applied_by_op"]
    assert applied["runs/log-batch"] == 3  # neither the replay nor the refused one counts
    # the effect log counts each point every time an applied call carried it, dropped or not:
    # what a test checks to see that a client never sent a point twice
    counts = api.emu.state.applied_counts()
    assert counts[("log-batch", run_id, "metric:loss@0@1000=0.5")] == 3
    assert counts[("log-batch", run_id, "metric:loss@0@1000=0.25")] == 1
    assert counts[("log-batch", run_id, "metric:acc@2@1002=Infinity")] == 1
    assert counts[("log-batch", run_id, "param:lr")] == 3

    status, doc = api.get("runs/get", run_id=run_id)
    assert status == 200
    latest = {m["key"]: m for m in doc["run"]["data"]["metrics"]}
    assert latest["loss"] == metric("loss", "NaN", 1001, 1)  # step 1 is the latest
    assert latest["acc"] == metric("acc", "-Infinity", 1003, 3)
    assert not any(
        isinstance(m["value"], float) and math.isnan(m["value"]) for m in latest.values()
    )


def test_runs_update_and_runs_get_show_the_whole_run(api: Api) -> None:
    eid = api.experiment("exp")
    run_id = api.new_run(eid, "S1", run_name="r", start_time=1000, user_id="alice")["info"][
        "run_id"
    ]
    batch = {
        "run_id": run_id,
        "params": [{"key": "p", "value": "1"}],
        "metrics": [metric("m", 1, 10, 0), metric("m", 2, 11, 1)],
        "tags": [{"key": "t", "value": "v"}],
    }
    assert api.post("runs/log-batch", batch, token="b1") == (200, {})
    inputs = inputs_record(run_id, "ds-a")
    assert api.post("runs/log-inputs", inputs, token="i1") == (200, {})
    model = model_record(run_id, 1)
    body = {"run_id": run_id, "model_json": orjson.dumps(model["model_json"]).decode()}
    assert api.post("runs/log-model", body, token="m1") == (200, {})
    update = {"run_id": run_id, "status": "INTERNAL_ERROR", "end_time": 2000, "run_name": "r2"}
    status, doc = api.post("runs/update", update, token="u1")
    assert status == 200 and doc["run_info"]["status"] == "INTERNAL_ERROR"
    assert doc["run_info"]["end_time"] == 2000 and doc["run_info"]["run_name"] == "r2"
    status, doc = api.post("runs/update", {"run_id": run_id, "status": "DONE"}, token="u2")
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")

    status, doc = api.get("runs/get", run_id=run_id)
    assert status == 200
    run = doc["run"]
    info = run["info"]
    assert {k: info[k] for k in ("status", "end_time", "start_time", "run_name")} == {
        "status": "INTERNAL_ERROR",
        "end_time": 2000,
        "start_time": 1000,
        "run_name": "r2",
    }
    assert (info["experiment_id"], info["user_id"], info["run_id"]) == (eid, "alice", run_id)
    assert run["data"]["params"] == [{"key": "p", "value": "1"}]
    assert run["data"]["metrics"] == [metric("m", 2.0, 11, 1)]
    tags = tags_of(run)
    assert tags["t"] == "v" and tags["mlflow.runName"] == "r2" and tags[SOURCE_TAG] == "S1"
    assert orjson.loads(tags["mlflow.log-model.history"]) == [model["model_json"]]
    assert run["inputs"]["dataset_inputs"] == inputs["dataset_inputs"]

    held = runs_by_source(api.state(), "S1")[0]
    assert held["created"] is True and held["experiment_name"] == "exp"
    assert held["datasets"] == inputs["dataset_inputs"] and held["models"] == [model["model_json"]]
    assert held["info"]["status"] == "INTERNAL_ERROR"


def test_runs_search_by_source_tag_pages_and_names_an_unsupported_filter(api: Api) -> None:
    eid, other = api.experiment("exp"), api.experiment("other")
    ids = {
        f"S{i}": api.new_run(eid, f"S{i}", start_time=1000 + i)["info"]["run_id"] for i in range(5)
    }
    api.new_run(other, "S0-elsewhere")

    for text in (f"tags.`{SOURCE_TAG}` = 'S3'", f"tags.\"{SOURCE_TAG}\" = 'S3'"):
        body = {
            "experiment_ids": [eid],
            "filter": text,
            "max_results": 2,
            "run_view_type": "ACTIVE_ONLY",
        }
        status, doc = api.post("runs/search", body)
        assert status == 200, doc
        assert [r["info"]["run_id"] for r in doc["runs"]] == [ids["S3"]]
        assert tags_of(doc["runs"][0])[SOURCE_TAG] == "S3" and "next_page_token" not in doc
    none = {"experiment_ids": [eid], "filter": f"tags.`{SOURCE_TAG}` = 'S9'", "max_results": 2}
    assert api.post("runs/search", none) == (200, {})  # MLflow's JSON: nothing at all
    both = {"experiment_ids": [eid, other], "filter": f"tags.`{SOURCE_TAG}` = 'S0-elsewhere'"}
    status, doc = api.post("runs/search", both)
    assert status == 200 and len(doc["runs"]) == 1

    seen: list[str] = []
    token = None
    for _ in range(10):  # bounded: 3 pages expected
        body = {"experiment_ids": [eid], "max_results": 2, "run_view_type": "ALL"}
        if token:
            body["page_token"] = token
        status, doc = api.post("runs/search", body)
        assert status == 200
        seen += [r["info"]["run_id"] for r in doc["runs"]]
        token = doc.get("next_page_token")
        if not token:
            break
    assert seen == [ids[f"S{i}"] for i in (4, 3, 2, 1, 0)]  # start_time DESC, as MLflow

    status, doc = api.post("runs/search", {"experiment_ids": [eid], "filter": "params.lr = '1'"})
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")
    assert "params.lr = '1'" in doc["message"]
    for bad in (
        {"experiment_ids": [eid], "filter": "tags.a = 'x' OR tags.b = 'y'"},
        {"experiment_ids": [eid], "max_results": 50_001},
        {"experiment_ids": [eid], "run_view_type": "SOME"},
        {"experiment_ids": [eid], "order_by": ["metrics.loss"]},
    ):
        status, doc = api.post("runs/search", bad)
        assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE"), bad


def test_metric_history_pages_every_point(api: Api) -> None:
    run_id = api.new_run(api.experiment("exp"), "S1")["info"]["run_id"]
    points = [metric("loss", i / 10, 1000 + i, i) for i in range(25)]
    batch = {"run_id": run_id, "metrics": [*points, metric("acc", 1, 1, 0)]}
    assert api.post("runs/log-batch", batch, token="b") == (200, {})
    pages: list[int] = []
    got: list[dict[str, Any]] = []
    token = None
    for _ in range(10):  # bounded: 3 pages expected
        query: dict[str, Any] = {"run_id": run_id, "metric_key": "loss", "max_results": 10}
        if token:
            query["page_token"] = token
        status, doc = api.get("metrics/get-history", **query)
        assert status == 200
        pages.append(len(doc["metrics"]))
        got += doc["metrics"]
        token = doc.get("next_page_token")
        if not token:
            break
    assert pages == [10, 10, 5] and got == points
    status, doc = api.get("metrics/get-history", run_id=run_id, metric_key="loss")
    assert status == 200 and doc == {"metrics": points}  # no max_results: all, no token
    assert api.get("metrics/get-history", run_id=run_id, metric_key="none") == (200, {})
    status, doc = api.get("metrics/get-history", run_id=run_id)
    assert (status, doc["code"]) == (400, "INVALID_PARAMETER_VALUE")


def test_runs_never_created_follow_runs_get_known_runs_or_every_run(
    oci: Oci, emulator: StartEmulator
) -> None:
    api = Api(emulator(known_runs=frozenset({"pre1"})), StaticKey(KEY_ID, oci.key))
    batch = {"run_id": "pre1", "params": [{"key": "p", "value": "1"}]}
    assert api.post("runs/log-batch", batch, token="b1") == (200, {})
    for op, body in (
        ("runs/log-batch", {**batch, "run_id": "nope"}),
        ("runs/update", {"run_id": "nope", "status": "FINISHED"}),
    ):
        status, doc = api.post(op, body, token=op)
        assert (status, doc["code"]) == (404, "NotAuthorizedOrNotFound"), op
    status, doc = api.get("runs/get", run_id="nope")
    assert (status, doc["code"]) == (404, "NotAuthorizedOrNotFound")
    status, doc = api.get("metrics/get-history", run_id="nope", metric_key="m")
    assert (status, doc["code"]) == (404, "NotAuthorizedOrNotFound")
    status, doc = api.get("runs/get", run_id="pre1")
    assert status == 200 and doc["run"]["data"]["params"] == [{"key": "p", "value": "1"}]

    # a created run is known, whatever known_runs says; log-inputs accepts it
    run_id = api.new_run(api.experiment("exp"), "S1")["info"]["run_id"]
    assert api.post("runs/log-inputs", inputs_record(run_id, "ds"), token="i") == (200, {})
    held = {r["run_id"]: r for r in api.state()["runs"]}
    assert held["pre1"]["created"] is False and held["pre1"]["experiment_id"] == ""
    assert held[run_id]["created"] is True and len(held[run_id]["datasets"]) == 1


def test_a_reset_after_runs_create_leaves_one_run_that_the_token_returns(
    oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(seed=1)
    api = Api(emu, StaticKey(KEY_ID, oci.key))
    eid = api.experiment("exp")
    body = {"experiment_id": eid, "tags": [{"key": SOURCE_TAG, "value": "S1"}]}
    emu.config.reset_after = 1.0  # applied, then the connection is reset: no answer
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        api.post("runs/create", body, token="t-S1")
    held = runs_by_source(api.state(), "S1")
    assert len(held) == 1  # the run exists
    emu.config.reset_after = 0.0
    status, doc = api.post("runs/create", body, token="t-S1")
    assert status == 200 and doc["run"]["info"]["run_id"] == held[0]["run_id"]
    state = api.state()
    assert len(runs_by_source(state, "S1")) == 1 and state["applied_by_op"]["runs/create"] == 1


def test_faults_and_signatures_apply_to_the_new_operations(
    oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(seed=2)
    api = Api(emu, StaticKey(KEY_ID, oci.key))
    eid = api.experiment("exp")
    body = {"experiment_id": eid, "tags": [{"key": SOURCE_TAG, "value": "S1"}]}

    emu.config.fail_before = 1.0
    status, doc = api.post("runs/create", body, token="t")
    assert (status, doc["code"]) == (500, "InternalServerError")
    assert runs_by_source(api.state(), "S1") == []
    emu.config.fail_before = 0.0
    emu.config.fail_after = 1.0
    status, doc = api.post("runs/create", body, token="t")
    assert status == 500 and len(runs_by_source(api.state(), "S1")) == 1
    emu.config.fail_after = 0.0
    assert api.post("runs/create", body, token="t")[0] == 200
    assert len(runs_by_source(api.state(), "S1")) == 1

    emu.config.unauthorized = True
    for status, doc in (
        api.get("experiments/get-by-name", experiment_name="exp"),
        api.post("runs/search", {"experiment_ids": [eid]}),
        api.get("metrics/get-history", run_id="r", metric_key="m"),
    ):
        assert (status, doc["code"]) == (401, "NotAuthenticated")
    emu.config.unauthorized = False
    stranger = Api(
        emu, StaticKey(KEY_ID, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    for status, doc in (
        stranger.get("experiments/get-by-name", experiment_name="exp"),
        stranger.post("experiments/create", {"name": "x"}),
        stranger.post("runs/log-batch", {"run_id": "r", "params": []}),
    ):
        assert (status, doc["code"]) == (401, "NotAuthenticated")
    emu.config.redirect_to = "https://sso.example/login"
    assert api.post("experiments/create", {"name": "y"}, token="y")[0] == 302
    emu.config.redirect_to = None
    assert [e["name"] for e in api.state()["experiments"]] == ["exp"]

    emu.config.faults_on_get = True  # reads get the faults too, when asked
    emu.config.fail_before = 1.0
    status, doc = api.get("experiments/get-by-name", experiment_name="exp")
    assert (status, doc["code"]) == (500, "InternalServerError")
    status, doc = api.post("runs/search", {"experiment_ids": [eid]})  # a POST: always
    assert status == 500

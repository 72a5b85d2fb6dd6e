"""An MLflow target crosses to another process (a Spark executor) without its credentials:
credentials from MLflow's variables cross as which variables to read again, and are read
from the executor's environment; credentials written into the tracking URI, or given as a
value, refuse to pickle, saying what to do instead. A target without credentials pickles as
it is."""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchlog.emulator import EmulatorThread
from batchlog.errors import ConfigurationError
from batchlog.settings import Settings
from batchlog.target import API_VERSION, MlflowTarget, mlflow_target, mlflow_target_from_env
from tests.conftest import PLATFORM, WORKSPACE, mixed_records, write_manifest
from tests.test_key_recipes import EXECUTOR
from tests.test_upload import StartEmulator, assert_exactly_once

TOKEN = "tok-PICKLE-SECRET-4711"
USER = "alice-PICKLE-USER"
PASSWORD = "pw-PICKLE-SECRET-0815"
VARIABLES = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# MLflow's variables per kind of credentials, and the Authorization header they make
KINDS = {
    "token": ({"MLFLOW_TRACKING_TOKEN": TOKEN}, f"Bearer {TOKEN}"),
    "basic": (
        {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD},
        "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    ),
}


def secrets_in(data: bytes | str) -> list[str]:
    """The credentials, in any form they could be kept, found in ``data``."""
    raw = data if isinstance(data, bytes) else data.encode()
    basic = KINDS["basic"][1].removeprefix("Basic ")
    return [s for s in (TOKEN, PASSWORD, USER, basic, basic[:16]) if s.encode() in raw]


def tracking_uri(emu: EmulatorThread) -> str:
    """The emulator's MLflow API as a tracking URI (the prefix an AI Data Platform
    workspace serves it under). Built with public_key=None, the emulator checks no
    signature and keeps the headers it received."""
    return f"{emu.url}/{API_VERSION}/aiDataPlatforms/{PLATFORM}/workspaces/{WORKSPACE}/mlops"


def executor_env(variables: dict[str, str]) -> dict[str, str]:
    """An executor's environment: none of MLflow's credentials but ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return {**env, **variables}


def clear_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def pickled_settings(
    tmp_path: Path, emu: EmulatorThread, monkeypatch: pytest.MonkeyPatch, kind: str
) -> tuple[Settings, bytes]:
    """Settings for the emulator's MLflow API, with credentials from MLflow's variables
    on the driver, and their pickle."""
    clear_variables(monkeypatch)
    for name, value in KINDS[kind][0].items():
        monkeypatch.setenv(name, value)
    target = mlflow_target_from_env(tracking_uri(emu))
    target = dataclasses.replace(target, datasets_field="dataset_inputs")  # the emulator's
    assert target.headers() == {"authorization": KINDS[kind][1]}
    settings = Settings(
        target=target,
        keys=None,
        concurrency=4,
        checkpoint=str(tmp_path / "job.batchlog-checkpoint"),
        dead_letter=str(tmp_path / "job.dead-letter.jsonl"),
    )
    return settings, pickle.dumps(settings)


def run_executor(
    tmp_path: Path, data: bytes, manifest: Path, variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "settings.pickle").write_bytes(data)
    return subprocess.run(
        [sys.executable, "-c", EXECUTOR, str(tmp_path / "settings.pickle"), str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        env=executor_env(variables),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_from_mlflow_variables_cross_as_the_variables_and_are_read_again(
    tmp_path: Path, emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    emu = emulator(public_key=None)
    settings, data = pickled_settings(tmp_path, emu, monkeypatch, kind)
    assert secrets_in(data) == []
    assert pickle.loads(data) == settings  # read again from this process's variables

    records = mixed_records(12, runs=3)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    done = run_executor(tmp_path, data, manifest, KINDS[kind][0])
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"succeeded": 12, "exit": 0}
    assert_exactly_once(emu, records)
    sent = {headers.get("Authorization") for headers in emu.state.headers_seen}
    assert sent == {KINDS[kind][1]}  # every request, as the driver would have sent it


@pytest.mark.parametrize(
    ("kind", "given", "named"),
    [
        ("token", {}, "MLFLOW_TRACKING_TOKEN"),
        ("token", dict(KINDS["basic"][0]), "MLFLOW_TRACKING_TOKEN"),  # not what was used
        ("basic", {}, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (
            "basic",
            {"MLFLOW_TRACKING_USERNAME": USER},
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_without_the_variables_where_it_is_unpickled_it_fails_in_one_line(
    tmp_path: Path,
    emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    given: dict[str, str],
    named: str,
) -> None:
    emu = emulator(public_key=None)
    _, data = pickled_settings(tmp_path, emu, monkeypatch, kind)
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    done = run_executor(tmp_path, data, manifest, given)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]  # what Spark shows of a task's failure
    prefix = "batchlog.errors.ConfigurationError: "
    assert last.startswith(prefix), done.stderr
    message = last.removeprefix(prefix)
    assert message.startswith(f"{named} ") and "executor" in message, message
    assert f"spark.executorEnv.{named.split()[0]}" in message
    assert secrets_in(done.stderr) == []
    assert emu.state.headers_seen == []  # nothing was sent

    clear_variables(monkeypatch)  # the same in this process, as a ConfigurationError
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        pickle.loads(data)
    assert str(raised.value) == message


@pytest.mark.parametrize("environment", [{}, KINDS["token"][0]])
def test_credentials_in_the_tracking_uri_refuse_to_pickle_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]
) -> None:
    clear_variables(monkeypatch)
    for name, value in environment.items():  # the URI's credentials win, as in MLflow
        monkeypatch.setenv(name, value)
    target = mlflow_target_from_env(f"http://{USER}:{PASSWORD}@127.0.0.1:5000/prefix")
    assert target.uri_credentials
    settings = Settings(target=target, keys=None)
    with pytest.raises(ConfigurationError) as raised:
        pickle.dumps(settings)
    message = str(raised.value)
    assert "\n" not in message and secrets_in(message) == []
    assert "tracking URI" in message
    for name in VARIABLES:
        assert name in message
    assert copy.deepcopy(settings) == settings  # a copy stays in this process: allowed

    cloudpickle = pytest.importorskip("pyspark.cloudpickle")  # as batchlog.spark pickles
    with pytest.raises(ConfigurationError) as raised:
        cloudpickle.dumps(settings)
    assert str(raised.value) == message


def test_credentials_given_as_a_value_refuse_to_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_variables(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)  # not where these came from
    for target in (
        MlflowTarget("http://127.0.0.1:5000", authorization=f"Bearer {TOKEN}"),
        mlflow_target("http://127.0.0.1:5000", KINDS["basic"][1]),
    ):
        with pytest.raises(ConfigurationError) as raised:
            pickle.dumps(Settings(target=target, keys=None))
        message = str(raised.value)
        assert "\n" not in message and secrets_in(message) == []
        assert "mlflow_target_from_env" in message and "MLFLOW_TRACKING_TOKEN" in message


def test_a_target_without_credentials_pickles_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_variables(monkeypatch)
    target = mlflow_target_from_env("http://127.0.0.1:5000/prefix/")
    target = dataclasses.replace(target, datasets_field="dataset_inputs")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)  # where it is unpickled: not read
    back = pickle.loads(pickle.dumps(target))
    assert back == target and back.headers() == {}
    assert (back.uri, back.datasets_field) == ("http://127.0.0.1:5000/prefix", "dataset_inputs")

"""The emulator's own behaviour: runs/get (signed GET), fault injection toggled at run time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa

from batchlog.emulator import EmulatorThread
from batchlog.plan import make_call
from batchlog.retry import Answer
from batchlog.signing import StaticKey, sign_get, sign_post
from batchlog.target import OciTarget
from batchlog.transport import Transport
from tests.conftest import KEY_ID, PLATFORM, WORKSPACE, Oci, inputs_record, model_record
from tests.test_transport import call_for, record

StartEmulator = Callable[..., EmulatorThread]


def target(emu: EmulatorThread, platform: str = PLATFORM) -> OciTarget:
    return OciTarget(emu.url, platform, WORKSPACE)


async def raw_get(
    emu: EmulatorThread, path_and_query: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            emu.url + path_and_query,
            headers=headers,
            allow_redirects=False,
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read() or b"{}"), dict(resp.headers)


def get_path(run_id: str, platform: str = PLATFORM) -> str:
    return (
        f"/20260430/aiDataPlatforms/{platform}/workspaces/{WORKSPACE}"
        f"/mlops/api/2.0/mlflow/runs/get?run_id={run_id}"
    )


def test_runs_get_answers_an_mlflow_shaped_run_of_what_was_applied(
    oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(known_runs=frozenset({"r1", "r2"}))
    keys = StaticKey(KEY_ID, oci.key)
    t = target(emu)
    docs = [model_record("r1", 1), inputs_record("r1", "ds-a"), model_record("r1", 2)]
    host = emu.url.removeprefix("http://")

    async def go() -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        async with Transport(t, keys, concurrency=2, timeout=10) as transport:
            for doc in docs:
                assert (await transport.send(call_for(t, doc))).status == 200
        out = []
        for run_id in ("r1", "r2", "r3"):
            signed = sign_get(keys, get_path(run_id), host)
            out.append(await raw_get(emu, get_path(run_id), {**signed, "opc-request-id": "RID1"}))
        return out

    (s1, r1, h1), (s2, r2, _), (s3, r3, _) = asyncio.run(go())
    assert s1 == 200 and h1["opc-request-id"] == "RID1"
    run = r1["run"]
    assert run["info"]["run_id"] == "r1"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    history = orjson.loads(tags["mlflow.log-model.history"])
    assert history == [docs[0]["model_json"], docs[2]["model_json"]]
    assert run["inputs"]["dataset_inputs"] == docs[1]["dataset_inputs"]
    assert s2 == 200 and r2["run"]["info"]["run_id"] == "r2"
    assert r2["run"]["data"]["tags"] == [] and r2["run"]["inputs"]["dataset_inputs"] == []
    assert s3 == 404 and r3["code"] == "NotAuthorizedOrNotFound"
    assert emu.state.applied == 3  # reading applies nothing


def test_runs_get_verifies_the_get_signature(oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    keys = StaticKey(KEY_ID, oci.key)
    stranger = StaticKey(KEY_ID, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    host = emu.url.removeprefix("http://")
    path = get_path("r1")

    async def go() -> list[tuple[int, str]]:
        cases = {
            "unsigned": {},
            "other key": sign_get(stranger, path, host),
            "other path": sign_get(keys, get_path("r2"), host),
            "post headers": sign_post(keys, path, host, 0, "x"),
            "good": sign_get(keys, path, host),
        }
        out = []
        for headers in cases.values():
            status, body, _ = await raw_get(emu, path, headers)
            out.append((status, str(body.get("code", ""))))
        status, body, _ = await raw_get(
            emu, get_path("r1", "ocid1.other"), sign_get(keys, get_path("r1", "ocid1.other"), host)
        )
        out.append((status, str(body.get("code", ""))))
        bare = get_path("r1").split("?")[0]
        status, body, _ = await raw_get(emu, bare, sign_get(keys, bare, host))
        out.append((status, str(body.get("code", ""))))
        return out

    assert asyncio.run(go()) == [
        (401, "NotAuthenticated"),
        (401, "NotAuthenticated"),
        (401, "NotAuthenticated"),
        (401, "NotAuthenticated"),
        (200, ""),
        (404, "NotAuthorizedOrNotFound"),
        (400, "InvalidParameter"),
    ]


def test_redirect_to_answers_every_post_with_a_302(oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator(redirect_to="https://sso.example/login")
    t = target(emu)

    async def go() -> Answer:
        async with Transport(t, StaticKey(KEY_ID, oci.key), concurrency=2, timeout=10) as tr:
            return await tr.send(call_for(t, model_record("r1", 1)))

    answer = asyncio.run(go())
    assert (answer.status, answer.code) == (302, "Redirect")
    assert answer.message == "redirected to https://sso.example/login"
    assert emu.state.applied == 0 and emu.state.statuses[302] == 1


def test_unauthorized_and_key_id_can_change_while_serving(
    oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    t = target(emu)
    keys = StaticKey(KEY_ID, oci.key)

    async def go() -> list[Any]:
        out: list[Any] = []
        async with Transport(t, keys, concurrency=2, timeout=10) as tr:

            async def both(n: int) -> None:
                answer = await tr.send(call_for(t, model_record("r1", n)))
                out.append((answer.status, answer.code))
                out.append(await tr.get_run("r1") is not None)

            await both(1)
            emu.config.unauthorized = True  # every request refused from now on
            await both(2)
            emu.config.unauthorized = False
            await both(3)
            emu.config.key_id = "ST$rotated"  # a session token rotated under our feet
            await both(4)
            emu.config.key_id = KEY_ID
            await both(5)
        return out

    assert asyncio.run(go()) == [
        (200, ""),
        True,
        (401, "NotAuthenticated"),
        False,
        (200, ""),
        True,
        (401, "NotAuthenticated"),
        False,
        (200, ""),
        True,
    ]
    assert emu.state.applied == 3


def test_unauthorized_is_off_by_default_and_options_still_apply(
    oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(known_runs=frozenset({"r1"}))
    assert emu.config.unauthorized is False and emu.config.redirect_to is None
    t = target(emu)
    calls = [make_call(t, (record(model_record(run, 1)),)) for run in ("r1", "r9")]

    async def go() -> list[int]:
        async with Transport(t, StaticKey(KEY_ID, oci.key), concurrency=2, timeout=10) as tr:
            return [(await tr.send(c)).status for c in calls]

    assert asyncio.run(go()) == [200, 404]

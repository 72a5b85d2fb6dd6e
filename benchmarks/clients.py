"""One client uploading one manifest, in a process of its own; prints one JSON line of figures.

    python benchmarks/clients.py CLIENT --url URL --manifest FILE --config OCI_CONFIG [...]

CLIENT is batchlog, asyncbase (oci.async_base_client.AsyncBaseClient + semaphore),
mlopsclient (aidp-python-client MLOpsClient in a thread pool) or requests (requests +
oci.signer.Signer in a thread pool). Timing starts after imports and setup; CPU is the
process's user+system time over the upload; memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

RESOURCE = (
    "/aiDataPlatforms/{aiDataPlatformId}/workspaces/{workspaceKey}/mlops/api/2.0/mlflow/runs/"
)
API = "/20260430" + RESOURCE


def load(manifest: str) -> list[tuple[str, dict[str, Any]]]:
    """(operation, body) per record, for the peers (batchlog reads the manifest itself)."""
    out = []
    with open(manifest, "rb") as f:
        for line in f:
            doc = orjson.loads(line)
            if "model_json" in doc:
                model = doc["model_json"]
                body = {
                    "run_id": doc["run_id"],
                    "model_json": model if isinstance(model, str) else orjson.dumps(model).decode(),
                }
                out.append(("log-model", body))
            else:
                inputs = doc.get("dataset_inputs") or doc.get("datasets") or []
                out.append(("log-inputs", {"run_id": doc["run_id"], "dataset_inputs": inputs}))
    return out


def oci_config(path: str) -> dict[str, Any]:
    import oci

    return dict(oci.config.from_file(path))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """This process's own peak RSS (ru_maxrss would include the parent's, kept over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cpu0, t0 = cpu(), time.perf_counter()
    result = run()
    elapsed, used = time.perf_counter() - t0, cpu() - cpu0
    peak = peak_rss_mb()
    return {**result, "elapsed_s": elapsed, "cpu_s": used, "peak_rss_mb": peak}


# ---- batchlog ----------------------------------------------------------------------------


def run_batchlog(a: argparse.Namespace) -> dict[str, Any]:
    import anyio

    import batchlog
    from batchlog.auth import load_credentials
    from batchlog.target import mlflow_target

    if a.mlflow:
        target: Any = mlflow_target(a.url)
        keys = None
    else:
        target = batchlog.OciTarget(a.url, a.platform, a.workspace)
        keys = load_credentials("api_key", a.config, "DEFAULT").keys
    settings = batchlog.Settings(
        target=target,
        keys=keys,
        concurrency=a.concurrency,
        checkpoint=a.checkpoint or os.path.join(a.workdir, f"bench-{uuid.uuid4().hex}.ckpt"),
        dead_letter=os.path.join(a.workdir, "bench.dead.jsonl"),
        restart=not a.resume,
        grouping=batchlog.GroupLimits(max_datasets=a.max_datasets),
    )

    def go() -> dict[str, Any]:
        r = anyio.run(batchlog.upload, [a.manifest], settings)
        return {
            "records": r.records,
            "ok": r.succeeded + r.already_done,
            "requests": r.requests,
            "throttled": r.throttled,
            "final_rate": r.rate_limit,
        }

    return measure(go)


# ---- oci.async_base_client.AsyncBaseClient -------------------------------------------------


def run_asyncbase(a: argparse.Namespace) -> dict[str, Any]:
    import oci
    from oci.async_base_client import AsyncBaseClient

    config = oci_config(a.config)
    signer = oci.signer.Signer.from_config(config)
    records = load(a.manifest)

    async def main() -> dict[str, Any]:
        client = AsyncBaseClient(
            "ml_ops",
            config,
            signer,
            {},
            service_endpoint=a.url,
            base_path="/20260430",
            skip_deserialization=True,
            retry_strategy=oci.retry.DEFAULT_RETRY_STRATEGY,
        )
        sem = asyncio.Semaphore(a.concurrency)
        ok = 0

        async def one(op: str, body: dict[str, Any]) -> None:
            nonlocal ok
            async with sem:
                try:
                    await client.call_api(
                        resource_path=RESOURCE + op,
                        method="POST",
                        path_params={"aiDataPlatformId": a.platform, "workspaceKey": a.workspace},
                        header_params={
                            "accept": "application/json",
                            "content-type": "application/json",
                        },
                        body=body,
                    )
                    ok += 1
                except Exception:
                    pass

        async with client:
            await asyncio.gather(*(one(op, body) for op, body in records))
        return {"records": len(records), "ok": ok}

    return measure(lambda: asyncio.run(main()))


# ---- aidp-python-client MLOpsClient in threads --------------------------------------------


def run_mlopsclient(a: argparse.Namespace) -> dict[str, Any]:
    import oci
    from aidp_python_client.aidataplatform_dp.ml_ops_client import MLOpsClient

    config = oci_config(a.config)
    client = MLOpsClient(
        config, service_endpoint=a.url, retry_strategy=oci.retry.DEFAULT_RETRY_STRATEGY
    )
    client.base_client.session.mount(
        "http://", __import__("requests").adapters.HTTPAdapter(pool_maxsize=a.concurrency)
    )
    records = load(a.manifest)

    def one(rec: tuple[str, dict[str, Any]]) -> bool:
        op, body = rec
        try:
            if op == "log-inputs":
                client.log_experiment_run_inputs(a.platform, a.workspace, body)
            else:
                client.log_experiment_run_model(a.platform, a.workspace, body)
            return True
        except Exception:
            return False

    def go() -> dict[str, Any]:
        with ThreadPoolExecutor(a.concurrency) as pool:
            ok = sum(pool.map(one, records))
        return {"records": len(records), "ok": ok}

    return measure(go)


# ---- requests + oci.signer.Signer in threads ----------------------------------------------


def run_requests(a: argparse.Namespace) -> dict[str, Any]:
    import oci
    import requests

    config = oci_config(a.config)
    signer = oci.signer.Signer.from_config(config)
    records = load(a.manifest)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=a.concurrency))
    base = a.url + API.format(aiDataPlatformId=a.platform, workspaceKey=a.workspace)

    def one(rec: tuple[str, dict[str, Any]]) -> bool:
        op, body = rec
        data = orjson.dumps(body)
        token = uuid.uuid4().hex  # a random token per record, as such scripts do
        for attempt in range(8):
            r = session.post(
                base + op,
                data=data,
                auth=signer,
                headers={
                    "content-type": "application/json",
                    "accept": "application/json",
                    "opc-retry-token": token,
                    "opc-request-id": uuid.uuid4().hex.upper(),
                },
            )
            if r.status_code == 200:
                return True
            if r.status_code != 429 and r.status_code < 500:
                return False
            time.sleep(random.uniform(0, min(30, 2**attempt)))
        return False

    def go() -> dict[str, Any]:
        with ThreadPoolExecutor(a.concurrency) as pool:
            ok = sum(pool.map(one, records))
        return {"records": len(records), "ok": ok}

    return measure(go)


# ---- MlflowClient, in a loop or in threads --------------------------------------------------


def run_mlflow(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.models import Model

    client = MlflowClient(a.url)
    records = load(a.manifest)

    def one(rec: tuple[str, dict[str, Any]]) -> bool:
        op, body = rec
        try:
            if op == "log-inputs":
                inputs = [
                    DatasetInput(
                        Dataset(
                            d["dataset"]["name"],
                            d["dataset"]["digest"],
                            d["dataset"]["source_type"],
                            d["dataset"]["source"],
                            d["dataset"].get("schema"),
                            d["dataset"].get("profile"),
                        ),
                        [InputTag(t["key"], t["value"]) for t in d.get("tags", [])],
                    )
                    for d in body["dataset_inputs"]
                ]
                client.log_inputs(body["run_id"], inputs)
            else:
                model = Model.from_dict(orjson.loads(body["model_json"]))
                client._record_logged_model(body["run_id"], model)
            return True
        except Exception:
            return False

    def go() -> dict[str, Any]:
        if threads <= 1:
            ok = sum(one(r) for r in records)
        else:
            with ThreadPoolExecutor(threads) as pool:
                ok = sum(pool.map(one, records))
        return {"records": len(records), "ok": ok}

    return measure(go)


def run_batchlog_nojournal(a: argparse.Namespace) -> dict[str, Any]:
    """batchlog with the checkpoint's writes and fsyncs turned off: what journaling costs."""
    from batchlog.deadletter import DeadLetter
    from batchlog.journal import Journal

    Journal.write = lambda self, data: None  # type: ignore[method-assign]
    DeadLetter.write = lambda self, data: None  # type: ignore[method-assign]
    return run_batchlog(a)


RUNNERS = {
    "batchlog": run_batchlog,
    "batchlog-nojournal": run_batchlog_nojournal,
    "asyncbase": run_asyncbase,
    "mlopsclient": run_mlopsclient,
    "requests": run_requests,
    "mlflow-loop": lambda a: run_mlflow(a, 1),
    "mlflow-threads": lambda a: run_mlflow(a, a.concurrency),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("client", choices=sorted(RUNNERS))
    p.add_argument("--url", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--config", default="")
    p.add_argument("--platform", default="ocid1.aidataplatform.oc1..bench")
    p.add_argument("--workspace", default="bench")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-datasets", type=int, default=100)
    p.add_argument("--workdir", default=".")
    p.add_argument("--checkpoint")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--mlflow", action="store_true", help="batchlog: the URL is an MLflow server")
    a = p.parse_args()
    result = RUNNERS[a.client](a)
    result["client"] = a.client
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()

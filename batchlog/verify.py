"""Read every run of a manifest back from an MLflow server: the proof a migration is complete.

A log-inputs record is complete when each of its datasets (name and digest) is among the
run's dataset inputs; a log-model record when its model (``transport.model_identity``: the
model_uuid, or the whole model as MLflow keeps it) is in the run's
``mlflow.log-model.history`` tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from batchlog.errors import SystemicError
from batchlog.manifest import check_readable
from batchlog.records import Record
from batchlog.target import MlflowTarget
from batchlog.transport import (
    Transport,
    logged_datasets,
    logged_models,
    model_identity,
    parse_model,
)
from batchlog.validate import parse_manifests

BATCH = 256  # records checked together (their runs are read concurrently)
READ_PAUSES = (0.2, 1.0, 0.0)  # a run that cannot be read is tried again after these


@dataclass
class VerifyReport:
    records: int = 0
    complete: int = 0
    missing: list[str] = field(default_factory=list)  # "FILE:LINE: what is missing"
    invalid: int = 0  # lines that are not valid records (batchlog validate names them)

    @property
    def exit_code(self) -> int:
        return 0 if not self.missing and not self.invalid else 1


async def verify(
    manifests: list[str],
    target: MlflowTarget,
    *,
    concurrency: int = 16,
    timeout: float = 60.0,
    ca_bundle: str | None = None,
    verify_tls: bool = True,
) -> VerifyReport:
    check_readable(manifests)
    report = VerifyReport()
    async with Transport(
        target,
        None,
        concurrency=concurrency,
        timeout=timeout,
        ca_bundle=ca_bundle,
        verify_tls=verify_tls,
    ) as transport:
        batch: list[Record] = []
        for item in parse_manifests(manifests):
            if not isinstance(item, Record):
                report.invalid += 1
                continue
            batch.append(item)
            if len(batch) >= BATCH:
                await _check(batch, transport, report, concurrency)
                batch = []
        if batch:
            await _check(batch, transport, report, concurrency)
    return report


async def _check(
    batch: list[Record], transport: Transport, report: VerifyReport, concurrency: int
) -> None:
    endpoint = transport.target.endpoint
    runs: dict[str, dict[str, object] | None] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def fetch(run_id: str) -> None:
        async with limiter:
            for pause in READ_PAUSES:
                read = await transport.read_run(run_id)
                if not read.problem:
                    runs[run_id] = read.run
                    return
                await anyio.sleep(pause)
        problems.append(f"{read.problem} (run {run_id})")

    problems: list[str] = []
    async with anyio.create_task_group() as tg:
        for run_id in {r.run_id for r in batch}:
            tg.start_soon(fetch, run_id)
    if problems:  # no proof either way: not "missing", the verification itself failed
        raise SystemicError(
            f"cannot read runs back from {endpoint}: {problems[0]}; nothing was verified "
            "(exit 3): fix the cause and run verify again"
        )
    for record in batch:
        report.records += 1
        problem = _missing(record, runs.get(record.run_id))
        if problem:
            report.missing.append(f"{record.source}: {problem}")
        else:
            report.complete += 1


def _missing(record: Record, run: dict[str, object] | None) -> str:
    if run is None:
        return f"run {record.run_id} not found"
    if record.op == "log-model":
        model = parse_model(record.model_json)
        ours = model_identity(model)
        if any(model_identity(m) == ours for m in logged_models(run)):
            return ""
        return f"model {model.get('artifact_path')} of {model.get('utc_time_created')} not logged"
    have = logged_datasets(run)
    absent = [
        d["dataset"]["name"]
        for d in record.dataset_inputs
        if (d["dataset"]["name"], d["dataset"]["digest"]) not in have
    ]
    return f"datasets not logged: {', '.join(absent)}" if absent else ""

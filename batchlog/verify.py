"""Read every run of a manifest back from the target (AI Data Platform or an MLflow server):
the proof a migration is complete.

A log-inputs record is complete when each of its datasets (name and digest) is among the
run's dataset inputs; a log-model record when its model (``transport.model_identity``: the
model_uuid, or the whole model as MLflow keeps it) is in the run's
``mlflow.log-model.history`` tag. A migration plan's lines (and hand-written log-batch and
update-run lines) are compared run by run, field by field: batchlog.verify_plan.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field

import anyio

from batchlog.errors import SystemicError
from batchlog.manifest import check_readable
from batchlog.records import PLAN_OPS, Record
from batchlog.retry import RetryPolicy
from batchlog.signing import KeySource
from batchlog.target import MlflowTarget, Target
from batchlog.transport import (
    Transport,
    logged_datasets,
    logged_models,
    model_identity,
    parse_model,
)
from batchlog.validate import parse_manifests
from batchlog.verify_plan import PlanTally, PlanVerifier, Reader

BATCH = 256  # records checked together (their runs are read concurrently)
READ_PAUSES = (0.2, 1.0, 0.0)  # a run that cannot be read is tried again after these


@dataclass
class VerifyReport:
    records: int = 0
    complete: int = 0
    missing: list[str] = field(default_factory=list)  # "FILE:LINE: what is missing"
    invalid: int = 0  # lines that are not valid records (batchlog validate names them)
    runs: PlanTally = field(default_factory=PlanTally)  # a plan's runs (none: no plan)
    # (seq, n, line) before they are sorted into ``missing`` in manifest order
    _keyed: list[tuple[int, int, str]] = field(default_factory=list, repr=False)

    @property
    def exit_code(self) -> int:
        return 0 if not self.missing and not self.invalid else 1


async def verify(
    manifests: list[str],
    target: Target,
    keys: KeySource | None = None,
    *,
    concurrency: int = 16,
    timeout: float = 60.0,
    max_attempts: int = 5,
    ca_bundle: str | None = None,
    verify_tls: bool = True,
    user_principal: str | None = None,
) -> VerifyReport:
    """Read back what ``manifests`` say is on ``target`` (``keys`` sign requests to AI
    Data Platform). Raises SystemicError when the target cannot be read (exit 3)."""
    check_readable(manifests)
    report = VerifyReport()
    async with Transport(
        target,
        keys,
        concurrency=concurrency,
        timeout=timeout,
        ca_bundle=ca_bundle,
        verify_tls=verify_tls,
        user_principal=user_principal,
    ) as transport:
        reader = Reader(transport, RetryPolicy(max_attempts=max_attempts))
        problem: SystemicError | None = None
        async with anyio.create_task_group() as tg:
            plans = PlanVerifier(reader, target.run_status, concurrency, tg)
            try:
                await _read(manifests, transport, report, plans, concurrency)
            except SystemicError as exc:  # raised here, not out of the task group
                problem = exc
                tg.cancel_scope.cancel()
        problem = problem or plans.problem
        if problem is not None:
            raise problem
    report.runs = plans.tally
    report.records += plans.tally.records
    report.complete += plans.tally.complete
    report._keyed += plans.tally.lines
    report._keyed.sort(key=lambda k: (k[0], k[1]))
    report.missing = [line for _, _, line in report._keyed]
    return report


async def verify_source(
    source: MlflowTarget,
    experiments: tuple[str, ...],
    target: Target,
    keys: KeySource | None = None,
    *,
    source_ca_bundle: str | None = None,
    source_verify_tls: bool = True,
    concurrency: int = 16,
    timeout: float = 60.0,
    max_attempts: int = 5,
    ca_bundle: str | None = None,
    verify_tls: bool = True,
    user_principal: str | None = None,
) -> VerifyReport:
    """Compare a source MLflow server with the target directly: its runs (of
    ``experiments``, else every active experiment) are exported to a temporary plan
    (batchlog.export, with its count check), which is then verified. The lines name the
    source runs, not the temporary plan's lines."""
    from batchlog.export import Selection, export
    from batchlog.ratecontrol import make_gate
    from batchlog.source import Source

    with tempfile.TemporaryDirectory(prefix="batchlog-verify-") as directory:
        path = os.path.join(directory, "source-plan.jsonl")
        async with Transport(
            source,
            None,
            concurrency=concurrency,
            timeout=timeout,
            ca_bundle=source_ca_bundle,
            verify_tls=source_verify_tls,
        ) as transport:
            reads = Source(transport, make_gate(None, adaptive=True), RetryPolicy(max_attempts))
            with open(path, "wb") as plan:
                await export(reads, plan, Selection(experiments), concurrency=concurrency)
        report = await verify(
            [path],
            target,
            keys,
            concurrency=concurrency,
            timeout=timeout,
            max_attempts=max_attempts,
            ca_bundle=ca_bundle,
            verify_tls=verify_tls,
            user_principal=user_principal,
        )
    where = re.compile(re.escape(path) + r":[0-9]+: ")
    report.missing = [where.sub("", line, count=1) for line in report.missing]
    return report


async def _read(
    manifests: list[str],
    transport: Transport,
    report: VerifyReport,
    plans: PlanVerifier,
    concurrency: int,
) -> None:
    batch: list[Record] = []
    for item in parse_manifests(manifests):
        if not isinstance(item, Record):
            report.invalid += 1
        elif item.source_run or item.op in PLAN_OPS:
            await plans.add(item)
        else:
            batch.append(item)
            if len(batch) >= BATCH:
                await _check(batch, transport, report, concurrency)
                batch = []
    if batch:
        await _check(batch, transport, report, concurrency)
    await plans.finish()


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
            report._keyed.append((record.seq, 0, f"{record.source}: {problem}"))
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

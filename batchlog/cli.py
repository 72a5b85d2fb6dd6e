"""The command line: parse, wire the library together, print. The only module that prints."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import anyio
import orjson

from batchlog.check import check_manifests, checkpoint_status
from batchlog.errors import (
    BUG_ADVICE,
    BatchlogError,
    ConfigurationError,
    internal_error,
    redact,
)
from batchlog.files import MIB, UnusableFile, read_capped
from batchlog.job import Job
from batchlog.plan import GroupLimits
from batchlog.records import Rejection
from batchlog.report import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_SYSTEMIC,
    EXIT_USAGE,
    Counters,
    Report,
)
from batchlog.retry import RetryPolicy
from batchlog.settings import (
    CONCURRENCY,
    GRACE,
    MAX_ATTEMPTS,
    MAX_DATASETS,
    RATE,
    TIMEOUT,
    Bounds,
    Settings,
    check_output_paths,
    default_checkpoint,
    default_dead_letter,
    resolve_paths,
)
from batchlog.signing import KeySource, StaticKey
from batchlog.target import (
    MlflowTarget,
    OciTarget,
    check_endpoint,
    check_ids,
    mlflow_target,
    region_endpoint,
)
from batchlog.verify import verify

EMULATED_PLATFORM = "ocid1.aidataplatform.oc1..emulator"
EMULATED_WORKSPACE = "emulator"
EMULATED_KEY_ID = "emulator/batchlog/throwaway"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit 2 with a clear message, as documented
        self.print_usage(sys.stderr)
        raise ConfigurationError(message)


def _in(bounds: Bounds) -> Callable[[str], float]:
    """The argparse type of a number flag: ``bounds``, or exit 2 naming the flag and them."""

    def parse(text: str) -> float:
        glimpse = text if len(text) <= 24 else text[:20] + "..."  # 5000 digits: a glimpse
        try:
            value: float = int(text) if bounds.whole else float(text)
        except ValueError:
            value = math.nan
        if value not in bounds:
            raise argparse.ArgumentTypeError(f"{glimpse!r} is not {bounds}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log every failure (by default the first 100)"
    )
    p = _Parser(
        prog="batchlog",
        description="Bulk upload of MLflow run inputs and models.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser(
        "upload", parents=[common], help="upload manifests (resumes from the checkpoint)"
    )
    up.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSON Lines, .gz, or -")
    t = up.add_argument_group("target")
    _target_flags(t)
    t.add_argument(
        "--platform-id",
        default=os.environ.get("BATCHLOG_PLATFORM_ID"),
        help="AI Data Platform OCID (env BATCHLOG_PLATFORM_ID)",
    )
    t.add_argument(
        "--workspace",
        default=os.environ.get("BATCHLOG_WORKSPACE"),
        help="workspace key (env BATCHLOG_WORKSPACE)",
    )
    t.add_argument("--endpoint", help="https://HOST[:PORT]; default from the profile's region")
    t.add_argument("--ca-bundle", help="PEM file of CAs to trust (private CAs)")
    t.add_argument("--user-principal", help="send as the dh-user-principal header")
    a = up.add_argument_group("auth")
    a.add_argument(
        "--auth",
        default="api_key",
        choices=("api_key", "security_token", "instance_principal", "resource_principal"),
    )
    a.add_argument("--config-file", help="OCI config (default OCI_CONFIG_FILE or ~/.oci/config)")
    a.add_argument("--profile", help="OCI config profile (default OCI_CLI_PROFILE or DEFAULT)")
    r = up.add_argument_group("pace")
    r.add_argument(
        "--concurrency",
        type=_in(CONCURRENCY),
        default=32,
        help=f"requests in flight at most (32; {CONCURRENCY.span})",
    )
    r.add_argument(
        "--rate",
        type=_in(RATE),
        help=f"requests per second at most; without it the rate adapts to the server ({RATE.span})",
    )
    r.add_argument(
        "--no-adaptive",
        action="store_true",
        help="do not adapt the rate: send at --rate (or unlimited)",
    )
    r.add_argument(
        "--max-attempts",
        type=_in(MAX_ATTEMPTS),
        default=8,
        help=f"attempts per request (8; {MAX_ATTEMPTS.span})",
    )
    r.add_argument(
        "--timeout",
        type=_in(TIMEOUT),
        default=60.0,
        help=f"seconds for one attempt (60; {TIMEOUT.span})",
    )
    r.add_argument(
        "--max-datasets-per-request",
        type=_in(MAX_DATASETS),
        default=100,
        help=f"merge consecutive log-inputs of a run up to this many datasets (100; "
        f"{MAX_DATASETS.span})",
    )
    f = up.add_argument_group("files")
    f.add_argument(
        "--checkpoint", help="journal of finished records (default: next to the first manifest)"
    )
    f.add_argument("--dead-letter", help="records that did not succeed, as a manifest")
    f.add_argument("--restart", action="store_true", help="ignore the checkpoint, start over")
    f.add_argument("--report", help="write the final report as JSON to this file")
    f.add_argument(
        "--grace",
        type=_in(GRACE),
        default=10.0,
        help=f"seconds in-flight requests get on SIGINT/SIGTERM (10; {GRACE.span})",
    )
    up.add_argument(
        "--emulate",
        action="store_true",
        help="start the built-in emulator on loopback and upload to it",
    )
    up.add_argument("--dry-run", action="store_true", help="validate and plan, send nothing")

    vf = sub.add_parser(
        "verify", parents=[common], help="read every run back from MLflow: what is missing"
    )
    vf.add_argument("manifests", nargs="+", metavar="MANIFEST")
    _target_flags(vf)
    vf.add_argument(
        "--concurrency",
        type=_in(CONCURRENCY),
        default=16,
        help=f"runs read at once at most (16; {CONCURRENCY.span})",
    )

    v = sub.add_parser("validate", parents=[common], help="check manifests, no network")
    v.add_argument("manifests", nargs="+", metavar="MANIFEST")

    s = sub.add_parser(
        "status", parents=[common], help="what a checkpoint says is done, failed, pending"
    )
    s.add_argument("checkpoint")
    s.add_argument("--dead-letter", help="dead-letter file, to count failed runs")

    e = sub.add_parser("emulator", parents=[common], help="serve the emulator on loopback")
    port, chance = Bounds(0, 65_535, whole=True), Bounds(0, 1)
    e.add_argument(
        "--port",
        type=_in(port),
        default=8080,
        help=f"loopback port (8080; {port.span}, 0: any free)",
    )
    e.add_argument("--public-key", help="PEM public key: verify signatures (default: accept)")
    e.add_argument("--known-runs", help="file with one run id a line (others: 404)")
    e.add_argument(
        "--rate-limit", type=_in(RATE), help=f"requests per second (429 above; {RATE.span})"
    )
    latency = Bounds(0, 600_000)
    e.add_argument(
        "--latency-ms",
        type=_in(latency),
        default=0.0,
        help=f"milliseconds added to every answer ({latency.span})",
    )
    for flag, what in (
        ("--fail-before", "chance of 500 before apply"),
        ("--fail-after", "chance of 500 after apply"),
        ("--reset-after", "chance of a connection reset after apply"),
        ("--throttle-once", "chance a new retry token gets one 429"),
    ):
        e.add_argument(flag, type=_in(chance), default=0.0, help=f"{what} ({chance.span})")
    e.add_argument("--no-effects", action="store_true", help="count applies, keep no list")
    seed = Bounds(0, 2**32 - 1, whole=True)
    e.add_argument("--seed", type=_in(seed), help=f"for the chances above ({seed.span})")
    return p


def _target_flags(group: Any) -> None:
    group.add_argument(
        "--target",
        choices=("oci", "mlflow"),
        default="oci",
        help="Oracle AI Data Platform (default) or an MLflow tracking server",
    )
    group.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="with --target mlflow (env MLFLOW_TRACKING_URI)",
    )


def _mlflow_target(args: argparse.Namespace) -> tuple[MlflowTarget, str | None, bool]:
    """The MLflow target, CA file and TLS verification, from flags and MLflow's variables,
    in MLflow's order: credentials in the URI, else basic auth, else a bearer token."""
    from batchlog.transport import tls_context

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    authorization = ""
    if user and password:
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        if any(ord(c) < 32 or ord(c) == 127 for c in token):  # never echoed
            raise ConfigurationError(
                "MLFLOW_TRACKING_TOKEN holds line breaks or control characters: it cannot "
                "be sent in a header (check how it was set)"
            )
        authorization = f"Bearer {token}"
    elif user or password:
        raise ConfigurationError(
            "set both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or neither"
        )
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower()
    if insecure not in ("", "true", "false", "1", "0"):
        raise ConfigurationError(
            f"MLFLOW_TRACKING_INSECURE_TLS={insecure!r}: expected true or false (or 1 or 0)"
        )
    cert_path = "MLFLOW_TRACKING_SERVER_CERT_PATH"
    ca, name = getattr(args, "ca_bundle", None), "--ca-bundle"  # the flag over the variable
    if not ca:
        ca, name = os.environ.get(cert_path), cert_path
    verify_tls = insecure not in ("true", "1")
    if ca and not verify_tls:  # as MLflow: verification off and a CA to verify with
        raise ConfigurationError(
            f"MLFLOW_TRACKING_INSECURE_TLS and {name} are both set: unset one (TLS "
            "verification cannot be both off and done with a CA file)"
        )
    tls_context(ca or None, verify_tls, name)  # a CA file that is none: refused now
    return mlflow_target(args.tracking_uri, authorization), ca or None, verify_tls


# ---- upload ------------------------------------------------------------------------------


def _settings(
    args: argparse.Namespace,
    keys: KeySource | None,
    endpoint: str,
    platform: str,
    workspace: str,
    site: str = "",
    target: MlflowTarget | None = None,
) -> Settings:
    return Settings(
        target=target or OciTarget(endpoint, platform, workspace, site=site),
        keys=keys,
        concurrency=args.concurrency,
        rate=args.rate,
        adaptive=not args.no_adaptive,
        retry=RetryPolicy(max_attempts=args.max_attempts),
        timeout=args.timeout,
        ca_bundle=args.ca_bundle,
        user_principal=args.user_principal,
        checkpoint=args.checkpoint,
        dead_letter=args.dead_letter,
        restart=args.restart,
        grouping=GroupLimits(max_datasets=args.max_datasets_per_request),
        grace=args.grace,
    )


def _real_settings(args: argparse.Namespace) -> Settings:
    if args.target == "mlflow":
        target, ca, verify_tls = _mlflow_target(args)
        return dataclasses.replace(
            _settings(args, None, "", "", "", target=target), ca_bundle=ca, verify_tls=verify_tls
        )
    platform, workspace = check_ids(args.platform_id, args.workspace)
    from batchlog.auth import load_credentials
    from batchlog.transport import tls_context

    tls_context(args.ca_bundle, True, "--ca-bundle")  # a CA file that is none: refused now

    creds = load_credentials(args.auth, args.config_file, args.profile)
    if args.endpoint:
        endpoint = check_endpoint(args.endpoint)
    elif creds.region:
        endpoint = region_endpoint(creds.region)
    else:
        raise ConfigurationError("no --endpoint and no region in the OCI profile: give one")
    return _settings(args, creds.keys, endpoint, platform, workspace)


async def _upload(args: argparse.Namespace, out: TextIO) -> int:
    emulator = None
    if args.emulate:
        from cryptography.hazmat.primitives.asymmetric import rsa

        from batchlog.emulator import Emulator, EmulatorConfig

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        emulator = Emulator(EmulatorConfig(public_key=key.public_key(), key_id=EMULATED_KEY_ID))
        url = await emulator.start()
        # a rehearsal never shares a checkpoint with the real upload: its own files, and
        # a target identity of its own (the port changes from run to run)
        settings = dataclasses.replace(
            _settings(
                args,
                StaticKey(EMULATED_KEY_ID, key),
                url,
                args.platform_id or EMULATED_PLATFORM,
                args.workspace or EMULATED_WORKSPACE,
                site="emulator",
            ),
            checkpoint=args.checkpoint or default_checkpoint(args.manifests, "emulated"),
            dead_letter=args.dead_letter or default_dead_letter(args.manifests, "emulated"),
        )
        print(f"batchlog: emulator listening on {url} (signatures verified)", file=out)
    else:
        settings = _real_settings(args)
    try:
        job = Job(args.manifests, settings, on_progress=_Progress(out))
        check_output_paths(
            args.manifests,
            checkpoint=job.checkpoint_path,
            dead_letter=job.dead_letter_path,
            report=args.report,
        )
        job.open()
        print(f"batchlog: checkpoint {job.checkpoint_path}", file=out)
        print(f"batchlog: dead letter {job.dead_letter_path}", file=out)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, job, out)
            report = await job.run()
            tg.cancel_scope.cancel()
    finally:
        if emulator is not None:
            await emulator.stop()
    _print_report(report, out)
    if emulator is not None:
        print(f"batchlog: emulator applied {emulator.state.applied} calls", file=out)
    if args.report:
        try:
            with open(args.report, "wb") as f:
                f.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            print(f"batchlog: cannot write --report {args.report}: {exc.strerror}", file=out)
    return report.exit_code


async def _watch_signals(job: Job, out: TextIO) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping:  # unanswered calls are sent again on resume, with the same tokens
                print(f"\nbatchlog: {name} again: stopping now", file=out)
            else:
                print(
                    f"\nbatchlog: {name}: reading no more records, finishing in-flight "
                    "requests (again to stop at once)",
                    file=out,
                )
            stopping = True
            job.request_stop()


class _Progress:
    """A live line on a terminal; a summary line every few seconds otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = time.monotonic()  # the first line after one interval, not at once

    def __call__(self, c: Counters) -> None:
        now = time.monotonic()
        if now - self._last < (0.25 if self._tty else 5.0):
            return
        self._last = now
        elapsed = max(now - c.started, 1e-9)
        done = c.succeeded + c.failed + c.rejected
        rate = "" if math.isinf(c.rate) else f" limit {c.rate:.0f}/s"
        eta = c.eta()
        left = "" if eta is None else f", ETA {_duration(eta)}"
        line = (
            f"{c.finished:,} done ({c.succeeded:,} ok, {c.failed:,} failed, "
            f"{c.rejected:,} rejected, {c.skipped:,} skipped) {done / elapsed:,.0f} rec/s "
            f"{c.throttled:,} throttled{rate} {c.in_flight} in flight{left}"
        )
        wait = c.retry_after_left()
        if wait >= 1:
            line += f", waiting {_duration(wait)} on the server's Retry-After"
        if self._tty:
            print("\r\033[K" + line, end="", file=self._out, flush=True)
        else:
            print("batchlog: " + line, file=self._out, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _print_report(r: Report, out: TextIO) -> None:
    if out.isatty():
        print(file=out)
    print(
        f"batchlog: {r.status}: {r.records:,} records: {r.succeeded:,} succeeded, "
        f"{r.failed:,} failed, {r.rejected:,} rejected, {r.skipped:,} already done; "
        f"{r.requests:,} requests, {r.retries:,} retries, {r.throttled:,} throttled, "
        + (f"{r.read_backs:,} read back, " if r.read_backs else "")
        + f"{r.elapsed_s:.1f} s",
        file=out,
    )
    if r.message:
        print(f"batchlog: {r.message}", file=out)
    if r.unsuccessful_total:
        here = r.failed + r.rejected
        earlier = r.unsuccessful_total - here
        when = f" ({here:,} in this run, {earlier:,} in earlier runs)" if earlier else ""
        print(
            f"batchlog: {r.unsuccessful_total:,} records of this job did not succeed{when}: "
            f"they are in {r.dead_letter}; fix them and upload that file",
            file=out,
        )
    if r.status in ("stopped", "interrupted"):  # a "failed" job's message says what to do
        print("batchlog: run the same command again to resume", file=out)


# ---- other commands ------------------------------------------------------------------------


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    def show(rejection: Rejection) -> None:
        print(str(rejection), file=sys.stdout)

    summary = check_manifests(args.manifests, show)
    print(
        f"batchlog: {summary.records:,} records, {summary.rejected:,} invalid, "
        f"{summary.calls:,} requests to send",
        file=out,
    )
    return EXIT_SOME_FAILED if summary.rejected else EXIT_OK


def _status(args: argparse.Namespace, out: TextIO) -> int:
    st = checkpoint_status(args.checkpoint, args.dead_letter)
    lines = [
        f"target     {st.target}",
        f"manifests  {', '.join(st.manifests)}",
        f"records    {st.succeeded:,} succeeded, {st.failed:,} failed, "
        f"{st.rejected:,} rejected, "
        + (f"{st.pending:,} pending" if st.pending is not None else "pending unknown"),
    ]
    if st.runs_total is not None:
        lines.append(
            f"runs       {st.runs_total:,}: {st.runs_done:,} done, "
            f"{st.runs_failed:,} with failures, {st.runs_pending:,} pending"
        )
    if st.last_write:
        lines.append(
            "written    " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.last_write))
        )
    if st.changed:
        lines.append("warning    a manifest changed since these records were uploaded")
    print("\n".join(lines), file=sys.stdout)
    return EXIT_OK


async def _verify(args: argparse.Namespace, out: TextIO) -> int:
    if args.target != "mlflow":
        raise ConfigurationError("verify reads runs back from MLflow: give --target mlflow")
    target, ca, verify_tls = _mlflow_target(args)
    report = await verify(
        args.manifests, target, concurrency=args.concurrency, ca_bundle=ca, verify_tls=verify_tls
    )
    for line in report.missing:
        print(line, file=sys.stdout)
    print(
        f"batchlog: verify: {report.records:,} records: {report.complete:,} on the server, "
        f"{len(report.missing):,} missing or different, {report.invalid:,} invalid lines",
        file=out,
    )
    return report.exit_code


async def _emulator(args: argparse.Namespace, out: TextIO) -> int:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from batchlog.emulator import Emulator, EmulatorConfig

    key = None
    if args.public_key:
        try:
            key = load_pem_public_key(_read_input("--public-key", args.public_key))
        except ValueError:
            raise ConfigurationError(
                f"--public-key {args.public_key}: not a PEM public key"
            ) from None
    runs = None
    if args.known_runs:
        try:
            text = _read_input("--known-runs", args.known_runs).decode()
        except UnicodeDecodeError:
            raise ConfigurationError(f"--known-runs {args.known_runs}: not UTF-8 text") from None
        runs = frozenset(line.strip() for line in text.splitlines() if line.strip())
    emulator = Emulator(
        EmulatorConfig(
            public_key=key,  # type: ignore[arg-type]
            known_runs=runs,
            rate_limit=args.rate_limit,
            latency=args.latency_ms / 1000,
            fail_before=args.fail_before,
            fail_after=args.fail_after,
            reset_after=args.reset_after,
            throttle_once=args.throttle_once,
            keep_effects=not args.no_effects,
            seed=args.seed,
        )
    )
    try:
        url = await emulator.start(port=args.port)
    except OSError as exc:
        await emulator.stop()
        raise ConfigurationError(
            f"--port {args.port}: cannot listen on 127.0.0.1: {exc.strerror or exc}"
        ) from None
    print(
        f"batchlog emulator on {url} (Ctrl-C to stop); applied effects at {url}/_emulator/applied",
        file=out,
        flush=True,
    )
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    finally:
        await emulator.stop()
    return EXIT_OK


class _RedactingFormatter(logging.Formatter):
    """Tracebacks (-v) with anything shaped like a credential cut out: they quote messages
    batchlog did not write. batchlog's own messages never hold a secret."""

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


def _read_input(flag: str, path: str) -> bytes:
    """The bytes of a file a flag names; a ConfigurationError naming the flag if unreadable."""
    try:
        return read_capped(path, 16 * MIB, "a list or a key")
    except UnusableFile as exc:
        raise ConfigurationError(f"{flag} {path}: {exc}") from None


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except ConfigurationError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_USAGE
    handler = logging.StreamHandler(out)
    handler.setFormatter(_RedactingFormatter("batchlog: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    try:
        if args.command == "upload":
            if args.dry_run:
                return _dry_run(args, out)
            return int(anyio.run(_upload, args, out))
        if args.command == "validate":
            return _validate(args, out)
        if args.command == "status":
            return _status(args, out)
        if args.command == "verify":
            return int(anyio.run(_verify, args, out))
        return int(anyio.run(_emulator, args, out))
    except ConfigurationError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_USAGE
    except BatchlogError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_SYSTEMIC
    except KeyboardInterrupt:
        print("\nbatchlog: interrupted", file=out)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if args.verbose:
            print(redact("".join(traceback.format_exception(exc))), end="", file=out)
        print(f"batchlog: error: {internal_error(exc)}: {BUG_ADVICE}", file=out)
        return EXIT_SYSTEMIC


def _dry_run(args: argparse.Namespace, out: TextIO) -> int:
    if not args.emulate:
        _real_settings(args)  # fail on configuration now, as a real run would
    rc = _validate(args, out)
    print("batchlog: dry run: nothing was sent", file=out)
    return rc


def entrypoint() -> None:
    sys.exit(main())


__all__ = ["build_parser", "entrypoint", "main", "resolve_paths"]

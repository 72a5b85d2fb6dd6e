"""The command line: parse, wire the library together, print. The only module that prints."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import orjson
from anyio.abc import TaskStatus

from batchlog import interrupts
from batchlog.console import Console, console_of, json_requested
from batchlog.errors import (
    BUG_ADVICE,
    BatchlogError,
    CheckpointError,
    ConfigurationError,
    internal_error,
    redact,
)
from batchlog.files import MIB, UnusableFile, read_capped
from batchlog.manifest import STDIN, check_readable, display_name
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
    Status,
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
from batchlog.target import (
    MlflowTarget,
    OciTarget,
    Target,
    check_endpoint,
    check_ids,
    env_authorization,
    mlflow_target,
    region_endpoint,
)

if TYPE_CHECKING:  # only sending needs these (aiohttp, cryptography): imported where it does
    from batchlog.emulator.rehearsal import Files
    from batchlog.job import Job
    from batchlog.signing import KeySource

EMULATED_PLATFORM = "ocid1.aidataplatform.oc1..emulator"
EMULATED_WORKSPACE = "emulator"
EMULATED_KEY_ID = "emulator/batchlog/throwaway"


class UsageError(ConfigurationError):
    """A command line that cannot be run: one line, then where the help is."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command  # the subcommand whose help to point at (None: batchlog's)

    @property
    def hint(self) -> str:
        return f"see 'batchlog {self.command} --help'" if self.command else "see 'batchlog --help'"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and where the help is: no usage block above the line that
    matters. The top-level parser also names every missing required flag at once."""

    commands: dict[str, argparse.ArgumentParser]  # the top level's subcommands

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a prefix is not a flag: `--max-attempt` would change meaning once a flag is added
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # exit 2 with a clear message, as documented
        if message.endswith("required: command"):  # argparse's words for no subcommand
            message = "give a command: " + _and(list(self.commands), "or")
        elif message.startswith("argument command: invalid choice: "):
            word = message.split("'")[1] if message.count("'") >= 2 else ""
            near = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.6)
            message += f" (did you mean {near[0]}?)" if near else ""
        raise UsageError(message, self.prog.partition(" ")[2] or None)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        for name, default in _COMMON_DEFAULTS.items():  # given neither before nor after
            if not hasattr(parsed, name):
                setattr(parsed, name, default)
        command = getattr(parsed, "command", None)
        # BATCHLOG_PLATFORM_ID/WORKSPACE name the real job: a rehearsal takes ids as flags
        # only, or its checkpoint would belong to whichever ids the environment had
        rehearsal = command == "upload" and parsed.emulate
        for name, variable in (
            ("platform_id", _ENV["--platform-id"]),
            ("workspace", _ENV["--workspace"]),
        ):
            if hasattr(parsed, name) and getattr(parsed, name) is None and not rehearsal:
                setattr(parsed, name, os.environ.get(variable))
        if extra:
            raise UsageError(self._unrecognized(command, extra), command)
        if command is not None:
            _check_required(parsed, self.commands[command])
        return parsed

    def _unrecognized(self, command: str | None, extra: list[str]) -> str:
        """argparse's message, naming the flags only (the value after a misspelt flag may be
        a password), with the flag a misspelt one resembles."""
        named = [word.partition("=")[0] for word in extra if word.startswith("-")]
        if named:
            values = len(extra) - len(named)
            message = "unrecognized arguments: " + " ".join(_glimpse(f) for f in named)
            message += f" (and {values} value{'s' * (values > 1)})" if values else ""
        else:
            shown = (_glimpse(redact(word)) for word in extra)  # redacted whole, then cut
            message = "unrecognized arguments: " + " ".join(shown)
        parser = self.commands.get(command or "", self)
        flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--")]
        for word in extra:
            if word.startswith("--"):
                near = difflib.get_close_matches(word.partition("=")[0], flags, n=1, cutoff=0.8)
                if near:
                    return f"{message} (did you mean {near[0]}?)"
        return message


def _glimpse(text: str) -> str:
    """A word of the command line as a message shows it: 5000 digits are not echoed whole."""
    return text if len(text) <= 24 else text[:20] + "..."


def _and(words: list[str], last: str = "and") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


# the flags a command cannot run without, and the variable that can stand for each
_ENV = {
    "--platform-id": "BATCHLOG_PLATFORM_ID",
    "--workspace": "BATCHLOG_WORKSPACE",
    "--tracking-uri": "MLFLOW_TRACKING_URI",
}


# Flags of a real target: --emulate would ignore them, and a rehearsal of an MLflow job (or
# of a profile, an endpoint) would run under other rules unnoticed. --platform-id and
# --workspace go with it: they name the emulated calls and their retry tokens.
_REAL_TARGET = ("target", "tracking_uri", "endpoint", "ca_bundle", "auth", "config_file", "profile")
_SHOWN_VALUE = ("target", "auth")  # named with their value; others' values may be secrets


def _check_required(args: argparse.Namespace, command: argparse.ArgumentParser) -> None:
    """Every missing required flag in one line, not one per run; the --emulate-* options
    only with --emulate, and no flag of a real target with it."""
    if args.command == "upload" and not args.emulate:
        stray = [name for name in _EMULATE_OPTIONS if getattr(args, name) is not None]
        if stray:
            flags = [f"--{name.replace('_', '-')}" for name in stray]
            verb = "is" if len(flags) == 1 else "are"
            raise UsageError(f"{_and(flags)} {verb} for --emulate: add it", "upload")
    if args.command == "upload" and args.emulate:
        # a default (the environment's MLFLOW_TRACKING_URI included) is not a flag given
        real = [n for n in _REAL_TARGET if getattr(args, n) != command.get_default(n)]
        if real:
            flags = [
                f"--{n.replace('_', '-')}" + (f" {getattr(args, n)}" if n in _SHOWN_VALUE else "")
                for n in real
            ]
            one = len(flags) == 1
            raise UsageError(
                f"{_and(flags)} {'does' if one else 'do'} not go with --emulate (an upload to "
                f"the built-in AI Data Platform emulator): leave {'it' if one else 'them'} "
                "out to rehearse, or leave out --emulate",
                "upload",
            )
    if args.command == "verify" and args.source_uri and args.manifests:
        raise UsageError("give MANIFEST or --source-uri, not both", "verify")
    if args.command == "verify" and args.experiment and not args.source_uri:
        raise UsageError("--experiment goes with --source-uri", "verify")
    missing: list[str] = []
    source = args.command == "verify" and args.source_uri  # no MANIFEST: a source server
    if args.command in ("upload", "verify") and not args.manifests and not source:
        missing.append("MANIFEST")
    offline = args.command == "upload" and (args.emulate or args.dry_run)
    if args.command in ("upload", "verify") and not offline:
        if args.target == "mlflow":
            missing += [] if args.tracking_uri else ["--tracking-uri"]
        else:
            given = {"--platform-id": args.platform_id, "--workspace": args.workspace}
            missing += [flag for flag, value in given.items() if not value]
    if args.command == "export":
        missing += [] if args.tracking_uri else ["--tracking-uri"]
        missing += [] if args.output else ["-o"]
    if missing:
        envs = [_ENV[flag] for flag in missing if flag in _ENV]
        raise UsageError(
            f"{_and(missing)} {'is' if len(missing) == 1 else 'are'} required"
            + (f" (or env {', '.join(envs)})" if envs else ""),
            args.command,
        )


_PORT = Bounds(0, 65_535, whole=True)
_CHANCE = Bounds(0, 1)
_LATENCY = Bounds(0, 600_000)  # milliseconds
_SEED = Bounds(0, 2**32 - 1, whole=True)
_EMULATE_OPTIONS = ("emulate_rate_limit", "emulate_latency_ms", "emulate_fail_rate")
_MANIFESTS = "[options] MANIFEST [MANIFEST ...]"


def _in(bounds: Bounds) -> Callable[[str], float]:
    """The argparse type of a number flag: ``bounds``, or exit 2 naming the flag and them."""

    def parse(text: str) -> float:
        try:
            value: float = int(text) if bounds.whole else float(text)
        except ValueError:
            value = math.nan
        if value not in bounds:
            raise argparse.ArgumentTypeError(f"{_glimpse(text)!r} is not {bounds}")
        return value

    return parse


# Help texts say each value flag's default: "%(default)s" (or "g" for floats) where argparse
# holds it, words where it is computed (a path next to the manifest, a variable). A default
# taken from the environment is never shown: MLFLOW_TRACKING_URI may hold a password.
def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # as _output_flags: given before the command, kept
        help="log every failure (by default the first 100)",
    )
    _output_flags(common)
    p = _Parser(
        prog="batchlog",
        description="Bulk upload of MLflow run inputs and models.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser(
        "upload",
        parents=[common],
        usage=f"%(prog)s {_MANIFESTS}",
        help="upload manifests (resumes from the checkpoint)",
    )
    up.add_argument(
        "manifests",
        nargs="*",  # required, but checked with the flags: every one missing named at once
        metavar="MANIFEST",
        help="JSON Lines file, .gz, or - for stdin",
    )
    t = up.add_argument_group("target")
    _target_flags(t)
    _oci_flags(t, up.add_argument_group("auth"))
    r = up.add_argument_group("pace")
    r.add_argument(
        "--concurrency",
        metavar="N",
        type=_in(CONCURRENCY),
        default=32,
        help=f"requests in flight at most (default: %(default)s; {CONCURRENCY.span})",
    )
    r.add_argument(
        "--rate",
        metavar="R",
        type=_in(RATE),
        help="requests per second at most (default: none, the rate adapts to the server; "
        f"{RATE.span})",
    )
    r.add_argument(
        "--no-adaptive",
        action="store_true",
        help="do not adapt the rate: send at --rate (or unlimited)",
    )
    r.add_argument(
        "--max-attempts",
        metavar="N",
        type=_in(MAX_ATTEMPTS),
        default=8,
        help=f"attempts per request (default: %(default)s; {MAX_ATTEMPTS.span})",
    )
    r.add_argument(
        "--timeout",
        metavar="S",
        type=_in(TIMEOUT),
        default=60.0,
        help=f"seconds for one attempt (default: %(default)g; {TIMEOUT.span})",
    )
    r.add_argument(
        "--max-datasets-per-request",
        metavar="N",
        type=_in(MAX_DATASETS),
        default=100,
        help="merge consecutive log-inputs of a run up to this many datasets "
        f"(default: %(default)s; {MAX_DATASETS.span})",
    )
    f = up.add_argument_group("files")
    f.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="journal of finished records (default: next to the first manifest, printed)",
    )
    f.add_argument(
        "--dead-letter",
        metavar="PATH",
        help="records that did not succeed, as a manifest (default: next to the first "
        "manifest, printed)",
    )
    f.add_argument("--restart", action="store_true", help="ignore the checkpoint, start over")
    f.add_argument(
        "--report",
        metavar="FILE",
        help="write the final report as JSON to this file (default: none)",
    )
    f.add_argument(
        "--grace",
        metavar="S",
        type=_in(GRACE),
        default=10.0,
        help=f"seconds in-flight requests get on SIGINT/SIGTERM (default: %(default)g; "
        f"{GRACE.span})",
    )
    up.add_argument("--dry-run", action="store_true", help="validate and plan, send nothing")
    em = up.add_argument_group("rehearsal")
    em.add_argument(
        "--emulate",
        action="store_true",
        help="start the built-in emulator on loopback and upload to it (checkpoint of its own)",
    )
    em.add_argument(
        "--emulate-rate-limit",
        metavar="R",
        type=_in(RATE),
        help=f"the emulator answers 429 above this many requests per second (default: no "
        f"limit; {RATE.span})",
    )
    em.add_argument(
        "--emulate-latency-ms",
        metavar="MS",
        type=_in(_LATENCY),
        help=f"milliseconds the emulator adds to every answer (default: 0; {_LATENCY.span})",
    )
    em.add_argument(
        "--emulate-fail-rate",
        metavar="P",
        type=_in(_CHANCE),
        help=f"share of calls the emulator answers 500, before applying them (default: 0; "
        f"{_CHANCE.span})",
    )

    vf = sub.add_parser(
        "verify",
        parents=[common],
        usage=f"%(prog)s {_MANIFESTS}",
        help="read every run back from the target: what is missing or different",
        description="Read back what manifests or a migration plan say is on the target "
        "(AI Data Platform, or --target mlflow), with the upload's target and credential "
        "flags. A plan is compared run by run: each source run once, with its params, "
        "tags, metric histories, datasets, models, parent, status and times. Exit 0 only "
        "when nothing differs, 1 when something does, 3 when the target cannot be read.",
    )
    vf.add_argument(
        "manifests", nargs="*", metavar="MANIFEST", help="JSON Lines file, .gz, or - for stdin"
    )
    t = vf.add_argument_group("target")
    _target_flags(t)
    _oci_flags(t, vf.add_argument_group("auth"))
    vf.add_argument(
        "--concurrency",
        metavar="N",
        type=_in(CONCURRENCY),
        default=16,
        help=f"runs read at once at most (default: %(default)s; {CONCURRENCY.span})",
    )
    vf.add_argument(
        "--source-uri",
        metavar="URI",
        help="instead of MANIFEST: compare this source MLflow server with the target "
        "directly (its runs are exported to a temporary plan first; credentials as for "
        "export, user:password@ in the URI first; default: none)",
    )
    vf.add_argument(
        "--experiment",
        action="append",
        metavar="NAME_OR_ID",
        help="with --source-uri: the source experiments to compare (repeatable; default: "
        "every active experiment)",
    )
    vf.add_argument(
        "--max-attempts",
        metavar="N",
        type=_in(MAX_ATTEMPTS),
        default=5,
        help="attempts per read (429, 5xx and no answer are retried; default: "
        f"%(default)s; {MAX_ATTEMPTS.span})",
    )
    vf.add_argument(
        "--timeout",
        metavar="S",
        type=_in(TIMEOUT),
        default=60.0,
        help=f"seconds for one attempt (default: %(default)g; {TIMEOUT.span})",
    )

    v = sub.add_parser("validate", parents=[common], help="check manifests, no network")
    v.add_argument(
        "manifests", nargs="+", metavar="MANIFEST", help="JSON Lines file, .gz, or - for stdin"
    )

    s = sub.add_parser(
        "status", parents=[common], help="what a checkpoint says is done, failed, not finished"
    )
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="the checkpoint file of a job")
    s.add_argument(
        "--dead-letter",
        metavar="FILE",
        help="dead-letter file, to count failed runs (default: the one the checkpoint names)",
    )

    e = sub.add_parser("emulator", parents=[common], help="serve the emulator on loopback")
    e.add_argument(
        "--port",
        metavar="PORT",
        type=_in(_PORT),
        default=8080,
        help=f"loopback port (default: %(default)s; {_PORT.span}, 0: any free)",
    )
    e.add_argument(
        "--write-config",
        metavar="DIR",
        help="write a throwaway key and an OCI config for it into DIR, kept, and print the "
        "upload command that works against the emulator (default: a temporary directory, "
        "removed when the emulator stops)",
    )
    e.add_argument(
        "--public-key",
        metavar="FILE",
        help="PEM public key: verify signatures with it, write no config (default: the "
        "throwaway key's)",
    )
    e.add_argument(
        "--known-runs",
        metavar="FILE",
        help="file with one run id a line, others 404 (default: every run)",
    )
    e.add_argument(
        "--rate-limit",
        metavar="R",
        type=_in(RATE),
        help=f"requests per second, 429 above (default: no limit; {RATE.span})",
    )
    e.add_argument(
        "--latency-ms",
        metavar="MS",
        type=_in(_LATENCY),
        default=0.0,
        help=f"milliseconds added to every answer (default: %(default)g; {_LATENCY.span})",
    )
    for flag, what in (
        ("--fail-before", "chance of 500 before apply"),
        ("--fail-after", "chance of 500 after apply"),
        ("--reset-after", "chance of a connection reset after apply"),
        ("--throttle-once", "chance a new retry token gets one 429"),
    ):
        e.add_argument(
            flag,
            metavar="P",
            type=_in(_CHANCE),
            default=0.0,
            help=f"{what} (default: %(default)g; {_CHANCE.span})",
        )
    e.add_argument("--no-effects", action="store_true", help="count applies, keep no list")
    e.add_argument(
        "--seed",
        metavar="N",
        type=_in(_SEED),
        help=f"for the chances above (default: random; {_SEED.span})",
    )
    x = sub.add_parser(
        "export",
        parents=[common],
        usage="%(prog)s --tracking-uri URI -o PLAN [options]",
        help="read runs from an MLflow server into a migration plan",
        description="Read the runs of an MLflow tracking server (an mlruns/ directory: "
        "serve it with MLFLOW_ALLOW_FILE_STORE=true mlflow server --backend-store-uri "
        "./mlruns) and write them as a plan: JSON Lines that batchlog upload sends. "
        "Credentials as MLflow's client takes them: user:password@ in the URI, else "
        "MLFLOW_TRACKING_USERNAME/PASSWORD, else MLFLOW_TRACKING_TOKEN; TLS with "
        "MLFLOW_TRACKING_SERVER_CERT_PATH or MLFLOW_TRACKING_INSECURE_TLS.",
    )
    x.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the source MLflow server (required; default: env MLFLOW_TRACKING_URI)",
    )
    x.add_argument(
        "-o",
        "--output",
        metavar="PLAN",
        help="the plan file (required, no default): written beside it and renamed when "
        "whole and checked; a name ending .gz is gzip; - streams it to stdout",
    )
    x.add_argument(
        "--experiment",
        action="append",
        metavar="NAME_OR_ID",
        help="export this experiment (a name, else an id; repeatable; default: every "
        "active experiment)",
    )
    x.add_argument(
        "--run-id",
        action="append",
        metavar="ID",
        help="export this run, and its parents (repeatable; default: none, by experiment)",
    )
    x.add_argument(
        "--run-ids",
        metavar="FILE",
        help="export the runs of FILE, one id a line (default: none, by experiment)",
    )
    x.add_argument(
        "--since",
        metavar="TIME",
        help="only runs that started or ended at or after TIME (ISO-8601, UTC unless it "
        "says otherwise, or epoch ms; default: every run); MLflow runs have no update "
        "time: a run that only logged data since, without starting or ending, is not "
        "selected",
    )
    x.add_argument(
        "--concurrency",
        metavar="N",
        type=_in(CONCURRENCY),
        default=16,
        help=f"runs read at once, and requests in flight, at most (default: %(default)s; "
        f"{CONCURRENCY.span})",
    )
    x.add_argument(
        "--rate",
        metavar="R",
        type=_in(RATE),
        help="requests per second at most (default: none, the rate adapts to the server; "
        f"{RATE.span})",
    )
    x.add_argument(
        "--max-attempts",
        metavar="N",
        type=_in(MAX_ATTEMPTS),
        default=8,
        help=f"attempts per request (default: %(default)s; {MAX_ATTEMPTS.span})",
    )
    x.add_argument(
        "--timeout",
        metavar="S",
        type=_in(TIMEOUT),
        default=60.0,
        help=f"seconds for one attempt (default: %(default)g; {TIMEOUT.span})",
    )
    p.commands = dict(sub.choices)
    return p


# the values of the options every command has, when given neither before nor after it
_COMMON_DEFAULTS: dict[str, object] = {
    "verbose": False,
    "quiet": False,
    "log_format": "text",
    "log_file": None,
}
_COMMANDS = ("upload", "verify", "validate", "status", "emulator", "export")


def _output_flags(common: argparse.ArgumentParser) -> None:
    # no default: one given before the command is not undone by the command's own default
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="errors only on stderr: no progress, no line per failure, the summary only "
        "when the run did not succeed (the --log-file still gets everything)",
    )
    common.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text (default), or json: one JSON object per line on stderr for each event "
        "(progress every 5 s, each failure, warnings, the summary)",
    )
    common.add_argument(
        "--log-file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="also append every event to PATH, in --log-format, whatever -q says",
    )


def _target_flags(group: Any) -> None:
    group.add_argument(
        "--target",
        choices=("oci", "mlflow"),
        default="oci",
        help="Oracle AI Data Platform (oci) or an MLflow tracking server (default: %(default)s)",
    )
    group.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the MLflow server, with --target mlflow (default: env MLFLOW_TRACKING_URI)",
    )


def _oci_flags(target: Any, auth: Any) -> None:
    """The flags of an AI Data Platform target and how requests to it are signed."""
    target.add_argument(
        "--platform-id",
        metavar="OCID",
        help="AI Data Platform OCID (required; default: env BATCHLOG_PLATFORM_ID, not read "
        "with --emulate)",
    )
    target.add_argument(
        "--workspace",
        metavar="KEY",
        help="workspace key (required; default: env BATCHLOG_WORKSPACE, not read with --emulate)",
    )
    target.add_argument(
        "--endpoint",
        metavar="URL",
        help="https://HOST[:PORT] (default: the endpoint of the profile's region)",
    )
    target.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="PEM file of CAs to trust, for private CAs (default: the system's)",
    )
    target.add_argument(
        "--user-principal",
        metavar="P",
        help="send as the dh-user-principal header (default: not sent)",
    )
    auth.add_argument(
        "--auth",
        default="api_key",
        choices=("api_key", "security_token", "instance_principal", "resource_principal"),
        help="how requests are signed (default: %(default)s)",
    )
    auth.add_argument(
        "--config-file",
        metavar="FILE",
        help="OCI config (default: env OCI_CONFIG_FILE, else ~/.oci/config)",
    )
    auth.add_argument(
        "--profile",
        metavar="NAME",
        help="OCI config profile (default: env OCI_CLI_PROFILE, else DEFAULT)",
    )


def _mlflow_target(args: argparse.Namespace) -> tuple[MlflowTarget, str | None, bool]:
    """The MLflow target, CA file and TLS verification, from flags and MLflow's variables,
    in MLflow's order: credentials in the URI, else basic auth, else a bearer token."""
    from batchlog.transport import tls_context

    authorization, env = env_authorization()  # pickled as these variables (Spark)
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
    return mlflow_target(args.tracking_uri, authorization, env), ca or None, verify_tls


# ---- upload ------------------------------------------------------------------------------


def _settings(
    args: argparse.Namespace,
    keys: KeySource | None,
    endpoint: str,
    platform: str,
    workspace: str,
    site: str = "",
    target: Target | None = None,
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
    oci, keys = _oci_target(args)
    return _settings(args, keys, oci.endpoint, oci.platform_id, oci.workspace, site=oci.site)


def _oci_target(args: argparse.Namespace) -> tuple[OciTarget, KeySource]:
    """The AI Data Platform target and the key that signs for it, from the flags and the
    OCI config (upload and verify alike)."""
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
    site = "emulator" if platform == EMULATED_PLATFORM else ""  # the printed rehearsal command
    return OciTarget(endpoint, platform, workspace, site=site), creds.keys


async def _upload(args: argparse.Namespace, out: TextIO) -> int:
    emulator = None
    if args.emulate:
        from cryptography.hazmat.primitives.asymmetric import rsa

        from batchlog.check import PLANNED_ENDPOINT
        from batchlog.emulator import Emulator, EmulatorConfig
        from batchlog.signing import StaticKey

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # a rehearsal never shares a checkpoint with the real upload: its own files, and
        # a target identity of its own (the port changes from run to run)
        platform = args.platform_id or EMULATED_PLATFORM
        workspace = args.workspace or EMULATED_WORKSPACE
        settings = dataclasses.replace(
            _settings(
                args,
                StaticKey(EMULATED_KEY_ID, key),
                PLANNED_ENDPOINT,  # the emulator's URL once it listens
                platform,
                workspace,
                site="emulator",
            ),
            checkpoint=args.checkpoint or default_checkpoint(args.manifests, "emulated"),
            dead_letter=args.dead_letter or default_dead_letter(args.manifests, "emulated"),
        )
        _check_files(args, settings)  # the command line's mistakes before anything starts
        emulator = Emulator(
            EmulatorConfig(
                public_key=key.public_key(),
                key_id=EMULATED_KEY_ID,
                rate_limit=args.emulate_rate_limit,
                latency=(args.emulate_latency_ms or 0) / 1000,
                fail_before=args.emulate_fail_rate or 0.0,
            )
        )
        url = await emulator.start()
        target = OciTarget(url, platform, workspace, site="emulator")
        settings = dataclasses.replace(settings, target=target)
    else:
        settings = _real_settings(args)
    from batchlog.job import Job

    accepted = False  # the --report path: once accepted, every exit writes the report
    try:
        job = Job(args.manifests, settings, on_progress=console_of(out).progress)
        _check_files(args, settings)
        accepted = True
        job.open()
        if emulator is not None:  # said once the job can start: no line before an error
            print(f"batchlog: emulator listening on {emulator.url} ({_emulated(args)})", file=out)
        _print_paths(args, job.checkpoint_path, job.dead_letter_path, out)
        async with anyio.create_task_group() as tg:
            await tg.start(_watch_signals, job, out)
            report = await job.run()
            tg.cancel_scope.cancel()
    except BatchlogError as exc:
        if not accepted:
            raise
        return _ended_early(args, settings, exc, out)
    finally:
        if emulator is not None:
            await emulator.stop()
    if emulator is not None:  # before the summary: with --log-format json, it is the last event
        answered = emulator.state.statuses
        print(
            f"batchlog: emulator applied {emulator.state.applied:,} calls; answered "
            f"{answered[429]:,} with 429, {answered[500]:,} with 500",
            file=out,
        )
    if report.records == 0 and report.exit_code == EXIT_OK:  # an empty manifest: no zeros
        said = f"nothing to upload: {_holds_no_records(args.manifests)}"
        console_of(out).emit("summary", report.as_dict(), [f"batchlog: {said}"])
    else:
        console_of(out).summary(report)
    if args.report and not _write_report(args.report, report.as_dict(), out):
        return max(report.exit_code, EXIT_SYSTEMIC)  # the figures a scheduler reads are missing
    return report.exit_code


def _write_report(path: str, doc: dict[str, Any], out: TextIO) -> bool:
    """``doc`` as the --report file; False (said) when it cannot be written."""
    try:
        with open(path, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as exc:
        print(f"batchlog: error: cannot write --report {path}: {exc.strerror or exc}", file=out)
        with contextlib.suppress(OSError):  # a stale report must not tell of another run
            os.remove(path)
        return False
    return True


def _ended_early(
    args: argparse.Namespace, settings: Settings, exc: BatchlogError, out: TextIO
) -> int:
    """An upload that ended before its job ran (a checkpoint in use, a changed manifest):
    the error, then a report of nothing done in place of the last run's, and the summary
    event a scheduler waits for."""
    code = EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_SYSTEMIC
    print(f"batchlog: error: {exc}", file=out)
    checkpoint, dead_letter = resolve_paths(settings, args.manifests)
    status: Status = "failed" if code == EXIT_USAGE else "stopped"
    doc = Report.build(Counters(), status, str(exc), checkpoint, dead_letter).as_dict()
    doc["exit_code"] = code  # a configuration error is 2 whatever the status says
    if args.report and not _write_report(args.report, doc, out):
        code = max(code, EXIT_SYSTEMIC)
        doc["exit_code"] = code
    console_of(out).emit("summary", doc, [], loud=True)  # the text said it in the error
    return code


def _check_files(args: argparse.Namespace, settings: Settings) -> None:
    """What the job refuses of the files it is given (a manifest missing or given twice, an
    output that is a manifest or another output), before anything starts."""
    check_readable(args.manifests)
    checkpoint, dead_letter = resolve_paths(settings, args.manifests)
    check_output_paths(
        args.manifests,
        checkpoint=checkpoint,
        dead_letter=dead_letter,
        report=args.report,
        log_file=args.log_file,
    )


def _emulated(args: argparse.Namespace) -> str:
    """What the --emulate emulator does, in words."""
    said = ["signatures verified"]
    if args.emulate_rate_limit is not None:
        said.append(f"rate limit {args.emulate_rate_limit:g}/s")
    if args.emulate_latency_ms:
        said.append(f"latency {args.emulate_latency_ms:g} ms")
    if args.emulate_fail_rate:
        said.append(f"{args.emulate_fail_rate * 100:g}% of calls answered 500")
    return ", ".join(said)


async def _watch_signals(
    job: Job, out: TextIO, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    console = console_of(out)
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()  # the job starts once its signals are watched
            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopping:  # unanswered calls are sent again on resume, with the same tokens
                    console.signal(name, f"{name} again: stopping now")
                else:
                    console.signal(
                        name,
                        f"{name}: reading no more records, finishing in-flight requests "
                        "(again to stop at once)",
                    )
                stopping = True
                job.request_stop()
    finally:
        interrupts.hold()  # the job is over: its outcome (and exit code) stands


# ---- other commands ------------------------------------------------------------------------


def _holds_no_records(manifests: list[str]) -> str:
    names = ", ".join(display_name(m) for m in manifests)
    return f"{names} {'holds' if len(manifests) == 1 else 'hold'} no records"


def _show_rejections(args: argparse.Namespace, out: TextIO) -> Callable[[Rejection], None]:
    """How validate and --dry-run show an invalid line: ``FILE:LINE: field: reason`` on
    stdout, or with --log-format json a ``failure`` event with the upload's fields (on
    stderr even with -q: the invalid lines are what these commands are asked for)."""
    console = console_of(out)

    def show(rejection: Rejection) -> None:
        if args.log_format != "json":
            print(str(rejection), file=sys.stdout)
            return
        fields = {
            "status": "rejected",
            "code": "InvalidRecord",
            "field": rejection.field,
            "message": rejection.reason,
            "source": rejection.source,
        }
        console.emit("failure", fields, [str(rejection)], loud=True)

    return show


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    from batchlog.check import check_manifests  # here: --help needs none of it

    summary = check_manifests(args.manifests, _show_rejections(args, out))
    if not summary.records:
        print(f"batchlog: no records in {', '.join(map(display_name, args.manifests))}", file=out)
        return EXIT_OK
    print(
        f"batchlog: {summary.records:,} records, {summary.rejected:,} invalid, "
        f"{summary.calls:,} requests to send",
        file=out,
    )
    return EXIT_SOME_FAILED if summary.rejected else EXIT_OK


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from batchlog.check import checkpoint_status

    try:
        st = checkpoint_status(args.checkpoint, args.dead_letter)
    except ConfigurationError as exc:
        if not str(exc).endswith("is not a batchlog checkpoint"):
            raise
        # a manifest given in place of its checkpoint: name the checkpoints it has
        kept = [
            path
            for path in (
                default_checkpoint([args.checkpoint]),
                default_checkpoint([args.checkpoint], "emulated"),
            )
            if os.path.isfile(path)
        ]
        if kept:
            hint = f"give its checkpoint: {' or '.join(kept)}"
        else:
            hint = "for a manifest, give its checkpoint (by default "
            hint += f"{default_checkpoint([args.checkpoint])}, not there yet)"
        raise ConfigurationError(f"{exc}; {hint}") from None
    lines = [
        f"target     {st.target}",
        f"manifests  {', '.join(st.manifests)}",
        f"records    {st.succeeded:,} succeeded, {st.failed:,} failed, "
        f"{st.rejected:,} rejected, "
        + (
            f"{st.not_finished:,} not finished (read or not: the same upload command goes on "
            "with them)"
            if st.not_finished is not None
            else "not finished: unknown (the manifests cannot be read again)"
        ),
    ]
    if st.runs_total is not None:
        lines.append(
            f"runs       {st.runs_total:,}: {st.runs_done:,} done, "
            f"{st.runs_failed:,} with failures, {st.runs_not_finished:,} not finished"
        )
    if st.resolved_by:
        lines.append(
            f"fixed      the failures in {st.dead_letter} were fixed and uploaded "
            f"(checkpoint {st.resolved_by})"
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
    """``batchlog verify``: read back what the manifests (or a plan) say is on the target."""
    from batchlog.verify import verify, verify_source

    target: Target
    keys: KeySource | None = None
    ca, verify_tls = args.ca_bundle, True
    if args.target == "mlflow":
        target, ca, verify_tls = _mlflow_target(args)
    else:
        target, keys = _oci_target(args)
    pace = {
        "concurrency": args.concurrency,
        "timeout": args.timeout,
        "max_attempts": args.max_attempts,
        "ca_bundle": ca,
        "verify_tls": verify_tls,
        "user_principal": args.user_principal,
    }
    if args.source_uri:
        # the source read as export reads it: MLflow's variables, the URI's user:password@
        given = argparse.Namespace(tracking_uri=args.source_uri)
        source, source_ca, source_tls = _mlflow_target(given)
        experiments = tuple(args.experiment or ())
        report = await verify_source(
            source,
            experiments,
            target,
            keys,
            source_ca_bundle=source_ca,
            source_verify_tls=source_tls,
            **pace,
        )
    else:
        report = await verify(args.manifests, target, keys, **pace)
    for line in report.missing:
        print(line, file=sys.stdout)
    runs = report.runs
    said = (
        f"batchlog: verify: {report.records:,} records: {report.complete:,} on the server, "
        f"{report.records - report.complete:,} missing or different, "
        f"{report.invalid:,} invalid lines"
    )
    if runs.runs:
        said += (
            f"; {runs.runs:,} runs of a plan: {runs.as_planned:,} as in the plan, "
            f"{runs.missing:,} missing, {runs.copies:,} with copies, "
            f"{runs.different:,} different"
        )
    print(said, file=out)
    return report.exit_code


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    """``batchlog export``: the plan of a source MLflow server (batchlog.export)."""
    from batchlog.export import (
        ExportMismatch,
        PlanFile,
        Selection,
        check_run_id,
        export,
        parse_since,
        read_run_ids,
    )
    from batchlog.ratecontrol import make_gate
    from batchlog.source import Source
    from batchlog.transport import Transport

    run_ids = list(args.run_id or [])
    for run_id in run_ids:
        check_run_id(run_id)
    if args.run_ids:
        try:
            text = _read_input("--run-ids", args.run_ids).decode()
        except UnicodeDecodeError:
            raise ConfigurationError(f"--run-ids {args.run_ids}: not UTF-8 text") from None
        run_ids += read_run_ids(args.run_ids, text)
        if not run_ids:
            raise ConfigurationError(f"--run-ids {args.run_ids}: holds no run id")
    since = parse_since(args.since) if args.since is not None else None
    selection = Selection(tuple(args.experiment or ()), tuple(run_ids), since)
    target, ca, verify_tls = _mlflow_target(args)
    console = console_of(out)
    plan = PlanFile(args.output, sys.stdout.buffer)
    shown = "stdout" if args.output == STDIN else args.output
    try:
        async with Transport(
            target,
            None,
            concurrency=args.concurrency,
            timeout=args.timeout,
            ca_bundle=ca,
            verify_tls=verify_tls,
        ) as transport:
            gate = make_gate(args.rate, adaptive=True)
            source = Source(transport, gate, RetryPolicy(max_attempts=args.max_attempts))
            report = await export(
                source,
                plan.stream,
                selection,
                concurrency=args.concurrency,
                on_progress=_export_progress(console),
            )
        plan.commit()
    except ExportMismatch as exc:
        plan.abort()
        _export_summary(console, exc.report, shown, EXIT_SYSTEMIC)
        raise
    except OSError as exc:  # a full disk (the plan, or a run spooled in TMPDIR), a closed pipe
        plan.abort()
        raise BatchlogError(
            f"cannot write the plan ({shown}): {exc.strerror or exc}; nothing was put in place"
        ) from None
    except BaseException:
        plan.abort()
        raise
    _export_summary(console, report, shown, EXIT_OK)
    return EXIT_OK


def _export_progress(console: Console) -> Callable[[Any], None]:
    """An event every 5 s while the export runs (the upload's pace)."""
    last = [time.monotonic()]

    def show(p: Any) -> None:
        now = time.monotonic()
        if now - last[0] < 5.0:
            return
        last[0] = now
        limit = "" if math.isinf(p.rate) else f", rate limit {p.rate:,.0f} requests/s"
        text = (
            f"batchlog: export: {p.runs:,} runs written; experiment {p.experiment!r} "
            f"({p.experiments_done + 1} of {p.experiments}): {p.experiment_done:,} of "
            f"{p.experiment_runs:,} runs; {p.requests:,} requests, {p.retries:,} retries, "
            f"{p.throttled:,} throttled{limit}"
        )
        fields = dataclasses.asdict(p)
        fields["rate"] = None if math.isinf(p.rate) else round(p.rate, 1)
        console.emit("progress", fields, [text])

    return show


def _export_summary(console: Console, r: Any, output: str, code: int) -> None:
    """Runs exported per experiment, against the source's count, and the totals."""
    lines = []
    for c in r.experiments:
        added = f" ({c.parents_added:,} of them parents of nested runs)" if c.parents_added else ""
        said = "" if c.matches else ": MISMATCH"
        lines.append(
            f"batchlog: export: experiment {c.name!r} ({c.experiment_id}): {c.exported:,} runs "
            f"exported, the source lists {c.source:,}{added}{said}"
        )
    where = f"written to {output}" if code == EXIT_OK else f"not written to {output}"
    lines.append(
        f"batchlog: export: {r.runs:,} runs in {len(r.experiments):,} experiments, "
        f"{r.lines:,} plan lines {where}; {r.requests:,} requests, {r.retries:,} retries, "
        f"{r.throttled:,} throttled; elapsed {r.elapsed_s:.1f} s"
    )
    fields = {
        "runs": r.runs,
        "lines": r.lines,
        "output": output,
        "experiments": [
            {
                "experiment_id": c.experiment_id,
                "name": c.name,
                "exported": c.exported,
                "source": c.source,
                "parents_added": c.parents_added,
                "missing": c.missing,
                "gone": c.gone,
            }
            for c in r.experiments
        ],
        "requests": r.requests,
        "retries": r.retries,
        "throttled": r.throttled,
        "elapsed_s": round(r.elapsed_s, 3),
        "exit_code": code,
    }
    console.emit("summary", fields, lines, loud=code != EXIT_OK)


async def _emulator(args: argparse.Namespace, out: TextIO) -> int:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from batchlog.emulator import Emulator, EmulatorConfig, rehearsal

    if args.public_key and args.write_config:
        raise ConfigurationError(
            "--write-config writes a key of its own: give it or --public-key, not both"
        )
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
    # without --public-key, a rehearsal as for real: a key of its own, its signatures
    # verified, and only the platform and workspace the printed command names
    identity = None if key else rehearsal.Identity.new()
    emulator = Emulator(
        EmulatorConfig(
            public_key=identity.key.public_key() if identity else key,  # type: ignore[arg-type]
            key_id=identity.key_id if identity else None,
            platform_id=rehearsal.PLATFORM if identity else None,
            workspace=rehearsal.WORKSPACE if identity else None,
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
    temporary = None  # the directory made for the key and config, removed at the end
    try:
        files = None
        if identity is not None:
            where = args.write_config
            if where is None:
                where = temporary = tempfile.mkdtemp(prefix="batchlog-emulator-")
            files = rehearsal.write(where, identity)
        print(
            f"batchlog emulator on {url} (Ctrl-C to stop); applied effects at "
            f"{url}/_emulator/applied",
            file=out,
            flush=True,
        )
        if files is not None:
            kept = "removed when the emulator stops" if temporary else "kept"
            print(
                f"batchlog emulator: a throwaway key and an OCI config for it are in "
                f"{files.directory} ({kept}); upload to the emulator with:",
                file=out,
            )
            print("  " + _rehearsal_command(url, files), file=out, flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    finally:
        interrupts.hold()  # stopping: another Ctrl-C changes nothing
        await emulator.stop()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return EXIT_OK


def _rehearsal_command(url: str, files: Files) -> str:
    """The upload command that works against the emulator, as a shell reads it, for any
    manifest: the emulator's platform id gives each the checkpoint --emulate would."""
    from batchlog.emulator import rehearsal

    words = ["batchlog", "upload", "MANIFEST"]
    words += ["--config-file", files.config, "--endpoint", url]
    words += ["--platform-id", rehearsal.PLATFORM, "--workspace", rehearsal.WORKSPACE]
    return " ".join(shlex.quote(w) for w in words)


def _check_text(args: argparse.Namespace) -> None:
    """Every argument must be UTF-8 text: it goes into the checkpoint, reports and URLs.
    (A file name in another encoding arrives with surrogate escapes.)"""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = "manifest" if name == "manifests" else "--" + name.replace("_", "-")
                    raise ConfigurationError(
                        f"{shown}: not valid UTF-8 (rename the file, or give text in UTF-8)"
                    ) from None


def _read_input(flag: str, path: str) -> bytes:
    """The bytes of a file a flag names; a ConfigurationError naming the flag if unreadable."""
    try:
        return read_capped(path, 16 * MIB, "a list or a key")
    except UnusableFile as exc:
        raise ConfigurationError(f"{flag} {path}: {exc}") from None


EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    console = Console(out or sys.stderr, json=json_requested(argv))  # every line an event
    own = not interrupts.installed()  # called by a program, not the command: restore after
    try:
        interrupts.arm()  # until a job watches for signals, one ends the command here
        return _main(argv, console.out)
    except BaseException as exc:
        name = interrupts.interrupted_by(exc)
        if name is None:
            raise
        command = next((word for word in argv if word in _COMMANDS), "upload")
        said = "interrupted before any request was sent" if command == "upload" else "interrupted"
        text = [f"batchlog: {name}: {said}"]
        console.emit("signal", {"signal": name, "message": said}, text, loud=True)
        return EXIT_INTERRUPTED
    finally:
        if own:
            interrupts.restore()
        else:
            interrupts.hold()
        console.close()


def _main(argv: list[str], out: TextIO) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_text(args)
    except ConfigurationError as exc:
        _log_anyway(argv, out)  # cron's missing variable belongs in the scheduler's log too
        print(f"batchlog: error: {exc}", file=out)
        if isinstance(exc, UsageError):  # the line that matters, then where help is
            print(exc.hint, file=out)
        return EXIT_USAGE
    try:  # -q, -v, --log-file
        console_of(out).configure(
            args.log_format == "json",
            args.quiet,
            args.verbose,
            args.log_file,
            _inputs_and_outputs(args),
        )
    except ConfigurationError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_USAGE
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
        if args.command == "export":
            return int(anyio.run(_export, args, out))
        return int(anyio.run(_emulator, args, out))
    except ConfigurationError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_USAGE
    except BatchlogError as exc:
        print(f"batchlog: error: {exc}", file=out)
        return EXIT_SYSTEMIC
    except BrokenPipeError:  # `batchlog validate big.jsonl | head`: the reader had enough
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if args.verbose:
            print(redact("".join(traceback.format_exception(exc))), end="", file=out)
        print(f"batchlog: error: {internal_error(exc)}: {BUG_ADVICE}", file=out)
        return EXIT_SYSTEMIC


def _log_anyway(argv: list[str], out: TextIO) -> None:
    """--log-file as the command line names it, when it could not be parsed: a usage error
    is logged as any error. Every other word of the line counts as a file the command
    reads (one may be a manifest); a log file that cannot be used is left out."""
    path, at = None, -1
    for n, word in enumerate(argv):
        if word == "--log-file" and n + 1 < len(argv):
            path, at = argv[n + 1], n + 1
        elif word.startswith("--log-file="):
            path, at = word.partition("=")[2], n
    if not path:
        return
    others = [word for n, word in enumerate(argv) if n != at and not word.startswith("-")]
    with contextlib.suppress(ConfigurationError, UnicodeError, ValueError):
        console_of(out).configure(json_requested(argv), "-q" in argv, False, path, others)


def _print_paths(args: argparse.Namespace, checkpoint: str, dead_letter: str, out: TextIO) -> None:
    """Every file the job writes, before it sends anything."""
    note = ""
    if args.manifests[0] == STDIN and not args.checkpoint:
        note = (
            " (the default for - in this directory: give --checkpoint and --dead-letter "
            "to keep another stdin job apart)"
        )
    print(f"batchlog: checkpoint {checkpoint}{note}", file=out)
    try:
        kept = os.path.getsize(dead_letter) > 0
    except OSError:
        kept = False
    when = (
        "(holds earlier runs' failures; new ones are added)"
        if kept
        else "(created on the first failure)"
    )
    print(f"batchlog: dead letter {dead_letter} {when}", file=out)
    if args.report:
        print(f"batchlog: report {args.report} (written at the end)", file=out)


def _dry_run(args: argparse.Namespace, out: TextIO) -> int:
    """Plan the upload from the manifests and the checkpoint alone: no credentials, no
    network, nothing written but --report. Exits as the run would if every request it
    plans succeeded (1: invalid lines, or failures of earlier runs; 3: it would refuse)."""
    from batchlog.check import PLANNED_ENDPOINT, KnownTarget, plan_upload

    target: Target | None = None
    if args.emulate or args.platform_id == EMULATED_PLATFORM:  # its own checkpoint, identity
        platform = args.platform_id or EMULATED_PLATFORM
        workspace = args.workspace or EMULATED_WORKSPACE
        target = OciTarget(PLANNED_ENDPOINT, platform, workspace, site="emulator")
        known = KnownTarget("oci-aidp", identity=target.identity)
        checkpoint = args.checkpoint or default_checkpoint(args.manifests, "emulated")
        dead_letter = args.dead_letter or default_dead_letter(args.manifests, "emulated")
    else:
        if args.target == "mlflow":
            if args.tracking_uri:  # the URI and MLflow's variables checked, none required
                target = _mlflow_target(args)[0]
            known = KnownTarget("mlflow", identity=target.identity if target else None)
        else:  # what was given: the endpoint otherwise comes from a profile, not read
            endpoint = check_endpoint(args.endpoint) if args.endpoint else None
            platform, workspace = args.platform_id or None, args.workspace or None
            known = KnownTarget("oci-aidp", None, endpoint, platform, workspace)
            if platform and workspace:  # retry tokens name the workspace
                target = OciTarget(endpoint or PLANNED_ENDPOINT, platform, workspace)
                known = dataclasses.replace(known, identity=target.identity if endpoint else None)
        checkpoint = args.checkpoint or default_checkpoint(args.manifests)
        dead_letter = args.dead_letter or default_dead_letter(args.manifests)
    stand_in = OciTarget(PLANNED_ENDPOINT, "-", "-")  # Settings check the flags; no target
    settings = _settings(args, None, "", "", "", target=target or stand_in)
    check_output_paths(
        args.manifests,
        checkpoint=checkpoint,
        dead_letter=dead_letter,
        report=args.report,
        log_file=getattr(args, "log_file", None),
    )

    show = _show_rejections(args, out)
    try:
        plan = plan_upload(
            args.manifests, checkpoint, known, target, settings.grouping, args.restart, show
        )
    except CheckpointError as exc:
        print(f"batchlog: dry run: a run would stop before sending anything: {exc}", file=out)
        doc = _plan_doc(0, 0, 0, 0, 0, 0, checkpoint, dead_letter, EXIT_SYSTEMIC)
        doc["message"] = str(exc)
        written = _write_plan(args, doc, out)
        print(f"batchlog: dry run: nothing was sent{written}", file=out)
        console_of(out).emit("summary", doc, [], loud=True)
        return EXIT_SYSTEMIC
    doubt = f" ({plan.in_doubt:,} sent before and never answered)" if plan.in_doubt else ""
    print(f"batchlog: dry run: checkpoint {plan.checkpoint}", file=out)
    said = (
        f"{plan.records:,} records, {plan.invalid:,} invalid, {plan.done:,} already done, "
        f"{plan.to_send:,} to send: {plan.requests:,} requests{doubt}"
    )
    if not plan.records:
        said = f"nothing to upload: {_holds_no_records(args.manifests)}"
    print(f"batchlog: dry run: {said}", file=out)
    rc = EXIT_SOME_FAILED if plan.invalid or plan.unsuccessful_before else EXIT_OK
    doc = _plan_doc(
        plan.records,
        plan.invalid,
        plan.done,
        plan.to_send,
        plan.requests,
        plan.in_doubt,
        checkpoint,
        dead_letter,
        rc,
    )
    written = _write_plan(args, doc, out)
    print(f"batchlog: dry run: nothing was sent{written}", file=out)
    # the plan as the last event, as a run's summary (text: the lines above said it)
    console_of(out).emit("summary", doc, [], loud=rc != EXIT_OK)
    return rc


def _plan_doc(
    records: int,
    invalid: int,
    done: int,
    to_send: int,
    requests: int,
    in_doubt: int,
    checkpoint: str,
    dead_letter: str,
    rc: int,
) -> dict[str, Any]:
    """The dry run's --report and summary event."""
    return {
        "version": 1,  # as the run's report (README, "Output for schedulers")
        "dry_run": True,
        "records": records,
        "invalid": invalid,
        "already_done": done,
        "to_send": to_send,
        "requests": requests,
        "requests_in_doubt": in_doubt,
        "checkpoint": checkpoint,
        "dead_letter": dead_letter,
        "exit_code": rc,
    }


def _write_plan(args: argparse.Namespace, doc: dict[str, Any], out: TextIO) -> str:
    """The plan as --report, and what the last line says of it."""
    if not args.report:
        return ""
    try:
        with open(args.report, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as exc:
        print(f"batchlog: cannot write --report {args.report}: {exc.strerror}", file=out)
        with contextlib.suppress(OSError):  # a stale plan must not pass for this one
            os.remove(args.report)
        return ""
    return f"; the plan is in {args.report}"


def _inputs_and_outputs(args: argparse.Namespace) -> list[str]:
    """Files the command reads or writes that a --log-file must not be."""
    named = [getattr(args, name, None) for name in ("checkpoint", "dead_letter", "report")]
    return [*getattr(args, "manifests", []), *(path for path in named if path)]


def entrypoint() -> None:
    sys.exit(main())


__all__ = ["build_parser", "entrypoint", "main", "resolve_paths"]

"""Everything a job needs to know, as one frozen value."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from batchlog.errors import ConfigurationError
from batchlog.manifest import STDIN
from batchlog.plan import GroupLimits
from batchlog.retry import RetryPolicy
from batchlog.target import OciTarget, Target

TYPE_CHECKING = False  # not typing's: no module to import for it
if TYPE_CHECKING:
    from batchlog.signing import KeySource  # cryptography: for the commands that sign


@dataclass(frozen=True, slots=True)
class Bounds:
    """The values a number setting accepts (the CLI's flags take the same): beyond them a
    job would stall, crash deep inside a library, or be a typo (``--rate 1e-300``)."""

    low: float
    high: float
    whole: bool = False  # whole numbers only

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # nan compares false anyway
            return False
        return self.low <= value <= self.high  # exact for any int, however large

    @property
    def span(self) -> str:
        """The range, as --help shows it: "1 to 4096"."""
        return f"{_shown(self.low)} to {_shown(self.high)}"

    def __str__(self) -> str:
        """What is expected, e.g. "a whole number from 0 to 65535"."""
        if self.whole and self.low == 1:
            return f"a positive whole number up to {_shown(self.high)}"
        return f"{'a whole number' if self.whole else 'a number'} from {self.span}"


def _shown(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)


CONCURRENCY = Bounds(1, 4096, whole=True)  # requests in flight
RATE = Bounds(0.01, 1_000_000)  # requests per second
MAX_ATTEMPTS = Bounds(1, 1000, whole=True)
TIMEOUT = Bounds(0.1, 86_400)  # seconds for one attempt
MAX_DATASETS = Bounds(1, 10_000, whole=True)  # dataset inputs merged into one log-inputs
GRACE = Bounds(0, 86_400)  # seconds in-flight requests get on a stop request


@dataclass(frozen=True)
class Settings:
    target: Target
    keys: KeySource | None  # signs every request (OCI); None: the target does not sign
    concurrency: int = 32  # requests in flight at most
    rate: float | None = None  # requests per second at most (a ceiling when adaptive)
    adaptive: bool = True  # find the server's limit by itself
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 60.0  # seconds for one attempt
    ca_bundle: str | None = None
    verify_tls: bool = True  # off only on request (MLFLOW_TRACKING_INSECURE_TLS)
    user_principal: str | None = None
    checkpoint: str | None = None  # default: next to the first manifest
    dead_letter: str | None = None  # default: next to the first manifest
    restart: bool = False  # ignore (and overwrite) an existing checkpoint
    grouping: GroupLimits = field(default_factory=GroupLimits)
    flush_interval: float = 0.2  # seconds between journal commits
    grace: float = 10.0  # seconds in-flight requests get to finish on a stop request
    systemic_after: int = 8  # stop when this many answers are all 401/404 before any success

    def __post_init__(self) -> None:
        numbers: list[tuple[str, object, Bounds]] = [
            ("concurrency", self.concurrency, CONCURRENCY),
            ("retry.max_attempts", self.retry.max_attempts, MAX_ATTEMPTS),
            ("timeout", self.timeout, TIMEOUT),
            ("grouping.max_datasets", self.grouping.max_datasets, MAX_DATASETS),
            ("grace", self.grace, GRACE),
        ]
        if self.rate is not None:  # None: no ceiling
            numbers.append(("rate", self.rate, RATE))
        for name, value, bounds in numbers:
            if value not in bounds:
                raise ConfigurationError(f"{name} {_glimpse(value)}: expected {bounds}")
        if self.ca_bundle or not self.verify_tls:  # else nothing to check: aiohttp unloaded
            from batchlog.transport import tls_context

            tls_context(self.ca_bundle, self.verify_tls)  # a CA file that is none: refused now
        if self.user_principal and any(ord(c) < 32 or ord(c) == 127 for c in self.user_principal):
            raise ConfigurationError("--user-principal holds line breaks or control characters")


def _glimpse(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to be written out
        return "(a huge number)"
    return text if len(text) <= 24 else text[:20] + "..."


def _stem(manifest: str) -> str:
    """The first manifest's path without, in this order, a trailing ``.gz``, ``.jsonl``,
    ``.ndjson`` and ``.json``; ``stdin`` (in the current directory) for ``-``."""
    if manifest == STDIN:
        return "stdin"
    folder = os.path.realpath(os.path.dirname(os.path.abspath(manifest)))
    if folder in ("/dev", "/proc") or folder.startswith("/proc/"):  # <(...), /dev/stdin
        raise ConfigurationError(
            f"{manifest} is a stream with no folder to keep files in beside it: give "
            "--checkpoint FILE and --dead-letter FILE (or pipe it to batchlog upload -)"
        )
    stem = manifest
    for suffix in (".gz", ".jsonl", ".ndjson", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem


_AGAIN = re.compile(r"\.dead-letter(?:-(\d+))?$")
EMULATED = "emulated"  # the kind of a job whose calls go to the emulator
EMULATOR_SITE = "emulator"  # the OciTarget.site of such a job: one site, whatever its port


def _kind_of(target: Target) -> str:
    """``emulated`` for a job sent to the emulator (``--emulate``, or the command
    ``batchlog emulator`` prints): its files are named apart from the real upload's."""
    return EMULATED if isinstance(target, OciTarget) and target.site == EMULATOR_SITE else ""


def _naming(manifests: list[str], kind: str) -> tuple[str, str, int]:
    """The first manifest's stem, the stem without ``.dead-letter[-N]`` and ``N`` (0: not a
    dead letter, 1 for ``.dead-letter``). ``kind`` is added to both, once: a name that has
    it already (a rehearsal's dead letter, rehearsed again) is not marked twice."""
    stem = _stem(manifests[0])
    again = _AGAIN.search(stem)
    base, rounds = stem, 0
    if again:  # x.dead-letter is round 1 (so is a stray x.dead-letter-0)
        base, rounds = stem[: again.start()], max(1, int(again.group(1) or 0))
    if kind and not base.endswith(f".{kind}"):
        # after the whole stem in the checkpoint: x.dead-letter rehearsed is not the job of
        # x.emulated.dead-letter (the rehearsal's own dead letter)
        stem, base = f"{stem}.{kind}", f"{base}.{kind}"
    return stem, base, rounds


def default_checkpoint(manifests: list[str], kind: str = "") -> str:
    """``STEM.batchlog-checkpoint``; ``kind`` keeps apart jobs that must never share a
    checkpoint (``STEM.emulated.batchlog-checkpoint`` for ``emulated`` runs)."""
    return _naming(manifests, kind)[0] + ".batchlog-checkpoint"


def default_dead_letter(manifests: list[str], kind: str = "") -> str:
    """``STEM.dead-letter.jsonl``; for a dead letter uploaded again (``x.dead-letter.jsonl``
    or ``x.dead-letter-N.jsonl``), ``x.dead-letter-2.jsonl`` (``N+1``): a counter, so that
    names never grow and never name the manifest itself. ``kind`` goes before
    ``.dead-letter``, once (``x.emulated.dead-letter-2.jsonl``)."""
    _, base, rounds = _naming(manifests, kind)
    return base + ".dead-letter" + (f"-{rounds + 1}" if rounds else "") + ".jsonl"


def resolve_paths(settings: Settings, manifests: list[str]) -> tuple[str, str]:
    kind = _kind_of(settings.target)
    checkpoint = settings.checkpoint or default_checkpoint(manifests, kind)
    dead_letter = settings.dead_letter or default_dead_letter(manifests, kind)
    check_output_paths(manifests, checkpoint=checkpoint, dead_letter=dead_letter)
    return checkpoint, dead_letter


def check_output_paths(manifests: list[str], **outputs: str | None) -> None:
    """Refuse files batchlog writes that are a manifest, each other, or a directory: a dead
    letter set aside or a report written over a manifest would lose it."""
    inputs = {os.path.realpath(m) for m in manifests if m != STDIN}
    seen: dict[str, str] = {}
    for name, path in outputs.items():
        if not path:
            continue
        flag = "--" + name.replace("_", "-")
        real = os.path.realpath(path)
        if real in inputs:
            raise ConfigurationError(f"{flag} {path} is one of the manifests")
        if real in seen:
            raise ConfigurationError(f"{flag} {path} is also the {seen[real]}")
        if os.path.isdir(path):
            raise ConfigurationError(f"{flag} {path} is a directory: give a file name")
        if os.path.exists(path) and not os.path.isfile(path):
            # a device or a FIFO: a checkpoint or dead letter there would be renamed, cut or
            # locked beside it (found by review, as root: /dev/null and /dev/full replaced)
            raise ConfigurationError(
                f"{flag} {path} is not a regular file (a device or a pipe?): give a file name"
            )
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.access(parent, os.W_OK):
            raise ConfigurationError(f"{flag} {path}: cannot write in {parent}")
        if name in ("report", "log_file") and not os.path.isdir(parent):
            # found now, not after the whole upload (a scheduler would find no report)
            raise ConfigurationError(f"{flag} {path}: no directory {parent}")
        seen[real] = flag

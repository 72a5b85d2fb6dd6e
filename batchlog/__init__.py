"""batchlog: bulk, resumable, exactly-once upload of ML run inputs and models.

    import batchlog
    report = await batchlog.upload(["runs.jsonl"], batchlog.Settings(target=..., keys=...))

See README.md for the manifest format and the command line.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing alone takes 2 ms of the start (below)
if TYPE_CHECKING:
    from typing import Any

    from batchlog.errors import (
        BatchlogError,
        CheckpointError,
        ConfigurationError,
        DeadLetterError,
        SystemicError,
    )
    from batchlog.job import Job, upload
    from batchlog.plan import GroupLimits
    from batchlog.report import Counters, Report
    from batchlog.retry import RetryPolicy
    from batchlog.settings import Settings
    from batchlog.signing import StaticKey
    from batchlog.target import OciTarget

# Each name is imported on first use: the command line (batchlog/__main__.py) must set up its
# signal handling before the library loads (about 0.2 s with aiohttp, which only the commands
# that send import: --help, validate, status and --dry-run load none of it), and every entry
# point imports this package first.
_EXPORTS = {
    "BatchlogError": "batchlog.errors",
    "CheckpointError": "batchlog.errors",
    "ConfigurationError": "batchlog.errors",
    "DeadLetterError": "batchlog.errors",
    "SystemicError": "batchlog.errors",
    "Job": "batchlog.job",
    "upload": "batchlog.job",
    "GroupLimits": "batchlog.plan",
    "Counters": "batchlog.report",
    "Report": "batchlog.report",
    "RetryPolicy": "batchlog.retry",
    "Settings": "batchlog.settings",
    "StaticKey": "batchlog.signing",
    "OciTarget": "batchlog.target",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule, as `import batchlog` used to load them all
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BatchlogError",
    "CheckpointError",
    "ConfigurationError",
    "Counters",
    "DeadLetterError",
    "GroupLimits",
    "Job",
    "OciTarget",
    "Report",
    "RetryPolicy",
    "Settings",
    "StaticKey",
    "SystemicError",
    "upload",
]
__version__ = "0.1.0"

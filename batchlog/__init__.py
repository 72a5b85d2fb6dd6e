"""batchlog: bulk, resumable, exactly-once upload of ML run inputs and models.

    import batchlog
    report = await batchlog.upload(["runs.jsonl"], batchlog.Settings(target=..., keys=...))

See README.md for the manifest format and the command line.
"""

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

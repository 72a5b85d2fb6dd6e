"""The exceptions batchlog raises.

    BatchlogError                 root of everything raised on purpose
    +-- ConfigurationError        a bad flag, missing config or key: nothing was sent (exit 2)
    +-- CheckpointError           the checkpoint belongs to another job or cannot be written
    +-- DeadLetterError           the dead-letter file cannot be written
    +-- SystemicError             the server refuses every request alike (auth, wrong ids)

A bad manifest line is not an exception: it is a ``Rejection`` that flows to the dead letter
like any other failed record. Transient and permanent request failures are outcomes too.
"""

from __future__ import annotations


class BatchlogError(Exception):
    """Root of batchlog's own exceptions."""


class ConfigurationError(BatchlogError):
    """A flag, a config file or a key is wrong or missing; raised before any request."""


class CheckpointError(BatchlogError):
    """The checkpoint is from another job, or cannot be read or written."""


class DeadLetterError(BatchlogError):
    """The dead-letter file cannot be written."""


class SystemicError(BatchlogError):
    """Every request fails the same way (credentials, platform id, workspace): stop early."""

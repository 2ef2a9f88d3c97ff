"""Errors the user can act on. Each maps to a documented CLI exit code and a status reason."""

from __future__ import annotations


class BackfillError(Exception):
    """Base class: ``str(error)`` is safe to print (no DSNs or passwords)."""

    exit_code = 1
    reason = "Error"


class ManifestError(BackfillError):
    """The manifest does not satisfy the schema. Nothing was sent to the database."""

    exit_code = 2
    reason = "InvalidSpec"

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source} is not a valid Backfill:\n" + "\n".join(f"  - {p}" for p in problems))


class ValidationFailed(BackfillError):
    """The spec does not fit the database (unknown table/column, bad expression, no usable key...).

    Raised before the first write; ``field`` names the spec field to fix.
    """

    exit_code = 2
    reason = "ValidationFailed"

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ConnectionFailed(BackfillError):
    """The database could not be reached or refused the credentials."""

    exit_code = 4
    reason = "ConnectionFailed"


class AlreadyRunning(BackfillError):
    """Another runner holds this backfill's advisory lock for the shard (this backfill's own
    previous session is waited for first, up to ``limits.restartWait``)."""

    exit_code = 3
    reason = "AlreadyRunning"


class CheckpointMismatch(BackfillError):
    """A checkpoint exists for this backfill but for a different change (spec fingerprint)."""

    exit_code = 2
    reason = "CheckpointMismatch"


class CheckpointUnavailable(BackfillError):
    """The role may not create or write the checkpoint table."""

    exit_code = 2
    reason = "CheckpointUnavailable"


class RetriesExhausted(BackfillError):
    """A batch kept failing with transient errors past ``limits.maxRetries``."""

    exit_code = 1
    reason = "RetriesExhausted"


class HandlerFailed(BackfillError):
    """``spec.handler`` raised, returned something else than a row count, or ended the batch
    transaction itself; that batch was rolled back (earlier batches stay committed)."""

    exit_code = 1
    reason = "Error"

"""What the engine reports while it runs, and how callers steer it.

The engine emits these immutable events to listeners (progress bar, logs, metrics, the
Kubernetes status reporter); it never talks to those sinks itself. A listener must be quick and
must not raise: the engine logs and ignores listener exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from backfill_api.model import BatchSpec, LimitsSpec, ScheduleSpec
from backfill_api.status import ImpactLimit, ShardState


@dataclass(frozen=True)
class RunStarted:
    identity: str
    shard: int
    shard_count: int
    resumed: bool
    rows_updated: int
    """Rows updated by earlier runs of this shard (from the checkpoint)."""
    estimated_keys: int
    """Estimated keys in this shard's range (for progress and ETA)."""
    keys_done: int
    """Estimated keys already behind the checkpoint."""


@dataclass(frozen=True)
class BatchCommitted:
    identity: str
    shard: int
    batch_number: int
    rows_updated: int
    """Rows changed by this batch."""
    keys_scanned: int
    """Keys the batch's range covered (rows updated <= keys scanned when ``where`` filters)."""
    batch_size: int
    """Size the batch was planned with."""
    next_batch_size: int
    duration_seconds: float
    """Time the write transaction was open (the longest any row lock was held)."""
    last_key: tuple[str, ...]
    total_rows_updated: int
    total_batches: int
    throttle_reason: str = ""
    """The throttle that delayed this batch (``""`` when none): ``status.progress.throttleReason``."""


@dataclass(frozen=True)
class Throttled:
    identity: str
    shard: int
    reason: str
    """A ``backfill_api.status.ThrottleReason`` value (``pause``, ``maxRowsPerSecond``, ``window``, ...)."""
    seconds: float
    next_window_start: datetime | None = None
    """Reason ``window``: when the next run window opens (UTC)."""


@dataclass(frozen=True)
class HealthObserved:
    """One look of the health throttles (``spec.limits.health``, WAL rate, backends, lock waits)."""

    identity: str
    shard: int
    wal_bytes_per_second: float | None
    """Server-wide WAL rate between this look and the previous one; None when not measured."""
    active_backends: int | None
    lock_waits: int | None
    query_value: float | None
    """The health query's value (a boolean as 0/1); None when it did not run this time."""


@dataclass(frozen=True)
class ReplicationLagObserved:
    identity: str
    shard: int
    lag_seconds: float | None
    """Largest replay lag over connected replicas; None when there are none."""


@dataclass(frozen=True)
class ImpactObserved:
    """A decision of the application-impact throttle (``spec.limits.applicationImpact``)."""

    identity: str
    shard: int
    present: bool
    """Another session's activity was seen (else the backfill runs flat out)."""
    duty: float
    """Fraction of wall time the backfill may spend in batches, 0..1."""
    pressure: float
    """Largest signal relative to the budget: 1.0 = exactly at it."""
    limited_by: ImpactLimit
    """What limits the speed now (``backfill_api.status.ImpactLimit``)."""
    batch_target_seconds: float
    pause_seconds: float
    throughput_ratio: float | None
    """Other sessions' write rate over the baseline's; None when the baseline was idle."""
    app_write_rate: float
    baseline_write_rate: float
    active_sessions: float
    lock_waiters: int
    wal_bytes_per_second: float
    statement_ms: float | None
    summary: str
    lock_wait_seconds: float | None = None
    """The lock_timeout of a batch while an application is present (None: the spec's)."""
    lock_yields: int = 0
    """Batches of this shard that yielded to an application's row lock, this run."""


@dataclass(frozen=True)
class RetryScheduled:
    identity: str
    shard: int
    error_kind: str
    """``lockTimeout``, ``statementTimeout``, ``deadlock``, ``serialization`` or ``connection``."""
    attempt: int
    delay_seconds: float
    next_batch_size: int
    message: str
    """The database's message, redacted."""


@dataclass(frozen=True)
class RunFinished:
    identity: str
    shard: int
    state: ShardState
    """``done``, ``paused`` or ``failed``."""
    rows_updated: int
    batches: int
    remaining_matches: int | None = None
    """Rows in the processed range that still match ``where`` (verification); None when not checked."""
    error: str | None = None


Event = (
    RunStarted | BatchCommitted | Throttled | ReplicationLagObserved | RetryScheduled | RunFinished | ImpactObserved
    | HealthObserved
)
Listener = Callable[[Event], None]


@dataclass(frozen=True)
class Tuning:
    """The live-tunable part of a spec: may change between batches without restarting."""

    batch: BatchSpec = field(default_factory=BatchSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    schedule: ScheduleSpec | None = None
    """Run windows (``spec.schedule``)."""


class RunControl(Protocol):
    """Asked by the engine between batches (never during one)."""

    def stop_reason(self) -> str | None:
        """Non-None to stop at the next batch boundary (e.g. ``signal``, ``suspended``)."""

    def tuning(self) -> Tuning | None:
        """The current tuning, or None to keep what the engine has."""


class StaticControl:
    """A control that never re-tunes; ``request_stop`` is safe to call from a signal handler."""

    def __init__(self) -> None:
        self._stop: str | None = None

    def request_stop(self, reason: str) -> None:
        self._stop = self._stop or reason

    def stop_reason(self) -> str | None:
        return self._stop

    def tuning(self) -> Tuning | None:
        return None

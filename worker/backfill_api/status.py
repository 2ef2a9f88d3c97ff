"""The Backfill's status as types, and the pure computations over it.

The status is the contract between the workers (``status.shards.<i>``), the operator (everything
else), ``kubectl get`` columns and the Argo CD / Flux health checks. It has one definition:
the models below. The CRD's status schema and ``docs/reference.md`` are generated from them;
writers build them and send :meth:`to_wire`, readers :meth:`parse` what the API server returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .conditions import READY, RECONCILING, STALLED, Condition
from .durations import format_duration
from .errors import BackfillError


class Phase(StrEnum):
    """``status.phase``: where the Backfill as a whole is."""

    PENDING = "Pending"
    RUNNING = "Running"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


PHASES = tuple(Phase)


class ThrottleReason(StrEnum):
    """``throttleReason`` values: why a running shard is waiting between batches (empty: it is not).

    Each names the spec field that asked for the wait."""

    PAUSE = "pause"
    """``spec.batch.pause`` after each batch."""
    MAX_ROWS_PER_SECOND = "maxRowsPerSecond"
    REPLICATION_LAG = "replicationLag"
    """A replica lags more than ``spec.limits.maxReplicationLag``."""
    APPLICATION_IMPACT = "applicationImpact"
    """The ``protect`` throttle's pause."""
    HEALTH_QUERY = "healthQuery"
    """``spec.limits.health.query`` says unhealthy (or failed: it counts as unhealthy)."""
    WAL_RATE = "maxWalBytesPerSecond"
    """The server's WAL rate since the last batch is above ``spec.limits.maxWalBytesPerSecond``."""
    ACTIVE_BACKENDS = "maxActiveBackends"
    LOCK_WAITS = "maxLockWaits"
    WINDOW = "window"
    """Outside every ``spec.schedule`` window (``nextWindowStart`` says when the next opens)."""


class ImpactLimit(StrEnum):
    """``impact.limitedBy``: what limits the backfill's speed now under ``applicationImpact: protect``."""

    NO_APPLICATION = "noApplication"
    """Nobody else is at work: full speed."""
    FULL_SPEED = "fullSpeed"
    """An application is there, but the backfill runs at full duty without reaching the budget."""
    RAMP_UP = "rampUp"
    """Below the budget: the duty grows by the most the controller allows per window."""
    MEASURING = "measuring"
    """An application just arrived: slowed down until it is measured alone."""
    THROUGHPUT = "throughput"
    """The application's write rate (``minThroughputRatio``)."""
    LATENCY = "latency"
    """Its mean statement latency from ``pg_stat_statements`` (``maxLatencyRatio``)."""
    ACTIVE_SESSIONS = "activeSessions"
    """Its sessions in flight, Little's law for latency (``maxLatencyRatio``)."""
    LOCK_WAITS = "lockWaits"
    """Its sessions waited for the backfill's rows: batches are kept short (``maxLockHold``)."""


class ShardState(StrEnum):
    """``status.shards.<i>.state``: where one key-range shard is."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"


class StallReason(StrEnum):
    """``Stalled`` condition reasons: why the operator cannot make the Backfill converge.

    *Recoverable* ones are about the spec or the cluster and clear by themselves once fixed (the
    operator posts a ``Resolved`` event); the others end the run (phase Failed), which is retried
    by setting ``spec.suspend`` to true and back to false. The worker's reasons are the
    ``reason`` of each :class:`~backfill_api.errors.BackfillError` (a test keeps them in sync).
    """

    # the operator's own findings (recoverable)
    INVALID_SPEC = "InvalidSpec"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    SECRET_REF_MISSING = "SecretRefMissing"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    SECRET_FORBIDDEN = "SecretForbidden"
    JOB_NAME_TAKEN = "JobNameTaken"
    JOB_REJECTED = "JobRejected"
    """The API server refused to create the worker Job (invalid pod settings, quota, admission)."""
    # a run that failed
    JOB_FAILED = "JobFailed"
    OOM_KILLED = "OOMKilled"
    """The worker container exceeded its memory limit (read from its pod; the worker cannot say)."""
    FAILED = "Failed"
    # reported by a worker (BackfillError.reason)
    ERROR = "Error"
    VALIDATION_FAILED = "ValidationFailed"
    CONNECTION_FAILED = "ConnectionFailed"
    ALREADY_RUNNING = "AlreadyRunning"
    CHECKPOINT_MISMATCH = "CheckpointMismatch"
    CHECKPOINT_UNAVAILABLE = "CheckpointUnavailable"
    RETRIES_EXHAUSTED = "RetriesExhausted"

    @property
    def recoverable(self) -> bool:
        """Clears once the spec or the cluster is fixed; the run is not over."""
        return self in _RECOVERABLE

    @property
    def permanent(self) -> bool:
        """A worker failure no pod restart can fix: fail at once instead of using up backoffLimit."""
        return self in _PERMANENT

    @classmethod
    def of_worker(cls, reason: object) -> StallReason:
        """A worker's ``lastErrorReason``; one this version does not know counts as ``Error``."""
        try:
            return cls(str(reason))
        except ValueError:
            return cls.ERROR


_RECOVERABLE = frozenset({
    StallReason.INVALID_SPEC, StallReason.IMMUTABLE_FIELD_CHANGED, StallReason.SECRET_REF_MISSING,
    StallReason.SECRET_NOT_FOUND, StallReason.SECRET_KEY_NOT_FOUND, StallReason.SECRET_FORBIDDEN,
    StallReason.JOB_NAME_TAKEN, StallReason.JOB_REJECTED,
})
_PERMANENT = frozenset({
    StallReason.INVALID_SPEC, StallReason.VALIDATION_FAILED,
    StallReason.CHECKPOINT_MISMATCH, StallReason.CHECKPOINT_UNAVAILABLE,
})


def error_classes() -> list[type[BackfillError]]:
    """BackfillError and all its subclasses (each has its exit code and reason)."""
    found: list[type[BackfillError]] = []
    pending: list[type[BackfillError]] = [BackfillError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def error_reasons() -> set[str]:
    """The ``reason`` of every BackfillError class (the worker's vocabulary)."""
    return {cls.reason for cls in error_classes()}


class _StatusModel(BaseModel):
    """camelCase on the wire; unknown fields ignored (a newer writer may add some)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: only the fields that were set (an explicit ``None`` deletes in a merge patch)."""
        return self.model_dump(by_alias=True, mode="json", exclude_unset=True)

    @classmethod
    def parse(cls, raw: Any) -> Self:
        """Read what the API server returned; an unreadable value reads as empty (and is overwritten)."""
        try:
            return cls.model_validate(raw if isinstance(raw, Mapping) else {})
        except ValidationError:
            return cls()


class ImpactStatus(_StatusModel):
    """What the application-impact throttle (``spec.limits.applicationImpact``) is doing and why."""

    summary: str = ""
    """For a human, e.g. ``duty 35% (throughput 1.10)``."""
    application_present: bool = False
    """Whether other sessions are writing (an application to protect)."""
    duty_percent: float = 100.0
    """Share of wall time the backfill spends in batches."""
    pressure: float = 0.0
    """The strongest signal relative to its budget (1.0 = exactly at the budget)."""
    limited_by: ImpactLimit | None = None
    """What limits the speed now: a signal at or near its budget (throughput, latency,
    activeSessions, lockWaits), the controller's growth per window (rampUp), or nothing
    (noApplication, fullSpeed; measuring while a newly arrived application is measured alone)."""
    lock_wait_ms: float | None = None
    """How long a batch may wait for an application's row lock (its lock_timeout) while one is present."""
    lock_yields: int = 0
    """Batches that met an application's row lock, gave up their own locks and were retried smaller (this run)."""
    pause_ms: float = 0.0
    """Pause after each batch."""
    batch_target_ms: float = 0.0
    """Target duration of one batch transaction."""
    throughput_ratio: float | None = None
    """The application's write rate now over its baseline."""
    app_transactions_per_second: float = 0.0
    """Other sessions' completed write transactions per second."""
    baseline_transactions_per_second: float = 0.0
    """The same, measured while the backfill paused."""
    active_sessions: float = 0.0
    """Other sessions running a statement (smoothed)."""
    lock_waiters: int = 0
    """Sessions waiting on rows the backfill holds."""
    wal_bytes_per_second: float = 0.0
    """WAL written per second, all sessions."""
    statement_ms: float | None = None
    """Mean statement latency from pg_stat_statements, where installed."""


class ShardStatus(_StatusModel):
    """Progress of one key-range shard, written by its worker."""

    state: ShardState | None = None
    last_key: list[str] | None = Field(default=None, description="Checkpoint mirror: last key processed.")
    rows_updated: int = 0
    """Rows changed by this shard, over all runs: updated (``set``), deleted (``delete``) or
    written into the target (``copy``: inserted, or overwritten by ``onConflict: update``)."""
    batches: int = 0
    """Committed batches of this shard."""
    batch_size: int = 0
    """Batch size the next batch is planned with."""
    rows_per_second: float = 0.0
    """Recent rate while running; 0 otherwise."""
    percent: int = 0
    """Estimated share of the shard's keys done, 0..100."""
    eta_seconds: float | None = None
    """Estimated seconds left; absent when unknown."""
    throttle_reason: str = ""
    """Why the worker is waiting right now, if it is: a ``ThrottleReason`` value (``pause``,
    ``maxRowsPerSecond``, ``replicationLag``, ``applicationImpact``, ``healthQuery``,
    ``maxWalBytesPerSecond``, ``maxActiveBackends``, ``maxLockWaits``, ``window``)."""
    next_window_start: str | None = None
    """While waiting for a ``spec.schedule`` window: when the next one opens (RFC 3339, UTC)."""
    throttled_seconds: dict[str, float] = Field(default_factory=dict)
    """Seconds this run of the shard has waited, by ``throttleReason``."""
    last_error: str = ""
    """The last error (secrets redacted)."""
    last_error_reason: str = ""
    """The reason of the last error (an ``errors.py`` reason such as RetriesExhausted)."""
    remaining_matches: int | None = None
    """Rows still matching ``spec.where`` when the shard finished (``copy``: rows matching it that
    are missing from the target; dry run: rows that would change)."""
    estimated_keys: int = 0
    """Planner's estimate of the keys in the shard's range (its blocks under ``walk: ctid``)."""
    keys_done: int = 0
    """Keys (blocks under ``walk: ctid``) covered by committed batches."""
    run: int | None = None
    """The launch (``status.run``) whose worker wrote this report."""
    updated_at: str = ""
    """When the worker last reported (RFC 3339)."""
    impact: ImpactStatus | None = None
    """The application-impact throttle's state in this shard."""
    checkpoint: str | None = Field(
        default=None,
        description="checkpoint.mode atLeastOnce only: the shard's progress record as JSON "
        "(kept here, not in the database).",
    )


class Progress(_StatusModel):
    """``status.progress``: the shards summed up (what ``kubectl get`` shows)."""

    rows_updated: int = 0
    """Rows changed (updated, deleted or copied: see the shards' ``rowsUpdated``), all shards."""
    batches: int = 0
    """Committed batches, all shards."""
    percent: int = Field(default=0, ge=0, le=100)
    """Estimated share of keys done, weighted by each shard's estimated keys."""
    rows_per_second: float = 0.0
    """Sum of the running shards' recent rates."""
    eta: str = ""
    """Estimated time left (slowest shard), as a duration such as ``1m30s``; empty when unknown."""
    batch_size: int = 0
    """Largest current batch size (the biggest transaction in flight)."""
    throttle_reason: str = ""
    """Why a running shard is waiting, if one is (a ``ThrottleReason`` value)."""
    next_window_start: str | None = None
    """The earliest ``nextWindowStart`` of the running shards (outside ``spec.schedule``)."""
    impact: ImpactStatus | None = None
    """The application-impact state of the most throttled running shard (the one holding the run back)."""


class EstimateStatus(_StatusModel):
    """``status.estimate``: the run's size from the plan's timed sample batch, written by the first
    shard's worker before its first batch. An estimate, never a promise (adaptive sizing and
    throttles change the pace)."""

    duration: str = ""
    """Expected duration of the whole run, e.g. ``2h30m`` (what ``kubectl get`` shows)."""
    seconds: float = 0.0
    rows: int = 0
    """Rows expected to change (the sample batch's ratio of changed rows to keys, scaled)."""
    batches: int = 0
    wal_bytes: int | None = None
    """WAL the run is expected to write (the sample batch's, scaled)."""
    dead_tuples: int = 0
    """Rows the run is expected to leave dead in the table (updates and deletes)."""
    warnings: list[str] = Field(default_factory=list)
    """Codes of the plan's warnings (``backfill plan`` prints each with its measurement and fix)."""
    basis: str = ""
    """What the numbers were scaled from."""
    measured_at: str | None = None


class StatusCondition(_StatusModel):
    """A kstatus condition as stored (``Ready``, ``Reconciling``, ``Stalled``)."""

    type: str
    status: str = Field(json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str = ""
    message: str = ""
    last_transition_time: str = Field(default="", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class BackfillStatus(_StatusModel):
    """Written by the operator and the workers; the database checkpoint is the source of truth."""

    phase: Phase | None = None
    observed_generation: int | None = None
    """The ``metadata.generation`` this status describes."""
    message: str = ""
    """What is going on, for a human."""
    conditions: list[StatusCondition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """kstatus conditions: Ready, Reconciling, Stalled."""
    progress: Progress | None = None
    estimate: EstimateStatus | None = None
    """The plan's estimate of the run (duration, rows, WAL, dead tuples), before the first batch."""
    shards: dict[str, ShardStatus] = Field(default_factory=dict)
    """Per shard (key ``"0"``, ``"1"``...), written by each shard's worker."""
    job_names: list[str] = Field(default_factory=list)
    """The current worker Jobs, by shard."""
    run: int = Field(default=0, description="Launch counter: worker Jobs are named <name>-s<shard>-r<run>.")
    started_at: str | None = None
    """When the first worker Job was created."""
    completed_at: str | None = None
    """When the Backfill reached Succeeded or Failed."""

    def condition(self, type_: str) -> StatusCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def stall_reason(self) -> StallReason | None:
        """The reason of a ``Stalled=True`` condition, or None."""
        stalled = self.condition(STALLED)
        if stalled is None or stalled.status != "True":
            return None
        return StallReason.of_worker(stalled.reason) if stalled.reason else None

    def shard(self, index: int) -> ShardStatus:
        """The report of one shard; an empty one when it has not reported."""
        return self.shards.get(str(index)) or ShardStatus()


@dataclass(frozen=True)
class Stall:
    """Why the operator cannot make the Backfill converge (kstatus ``Stalled=True``)."""

    reason: StallReason
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", StallReason(self.reason))


def format_eta(seconds: float | None) -> str:
    """``"1m30s"``, ``"1h2m5s"``; ``""`` when unknown. Whole seconds: a human reads it.

    The same form as the spec's durations, in the status, the CLI's progress and ``plan``.
    """
    if seconds is None or seconds < 0:
        return ""
    return format_duration(timedelta(seconds=round(seconds)))


def aggregate_progress(
    shards: Mapping[str, ShardStatus | Mapping[str, Any]], parallelism: int, *, succeeded: bool = False
) -> Progress:
    """``status.progress`` from ``status.shards``: sums, a key-weighted percent, the slowest ETA.

    Shards that have not reported yet count as 0 % done. The batch size shown is the largest
    current one (the biggest transaction in flight).
    """
    reports = [_shard(shards.get(str(i))) for i in range(parallelism)]
    done = [r.state == ShardState.DONE for r in reports]
    active = [r for r in reports if r.state == ShardState.RUNNING]
    if all(r.estimated_keys > 0 for r in reports):
        done_keys = sum(
            r.estimated_keys if finished else min(r.estimated_keys, r.keys_done)
            for r, finished in zip(reports, done, strict=True)
        )
        percent = 100.0 * done_keys / sum(r.estimated_keys for r in reports)
    else:
        percent = sum(100.0 if finished else r.percent for r, finished in zip(reports, done, strict=True)) / parallelism
    etas = [r.eta_seconds for r, finished in zip(reports, done, strict=True) if not finished]
    known = [e for e in etas if e is not None and e >= 0]
    eta = format_eta(max(known)) if etas and len(known) == len(etas) else ""
    if succeeded:
        percent, eta = 100.0, ""
    impacts = [r.impact for r in active if r.impact is not None]
    return Progress(
        rows_updated=sum(r.rows_updated for r in reports),
        batches=sum(r.batches for r in reports),
        percent=max(0, min(100, int(percent))),
        rows_per_second=round(sum(r.rows_per_second for r in active), 1),
        eta=eta,
        batch_size=max((r.batch_size for r in reports), default=0),
        throttle_reason=next((r.throttle_reason for r in active if r.throttle_reason), ""),
        next_window_start=min((r.next_window_start for r in active if r.next_window_start), default=None),
        impact=min(impacts, key=lambda i: i.duty_percent) if impacts else None,
    )


def _shard(report: ShardStatus | Mapping[str, Any] | None) -> ShardStatus:
    return report if isinstance(report, ShardStatus) else ShardStatus.parse(report)


def phase_conditions(phase: Phase | str, message: str, stall: Stall | None) -> list[Condition]:
    """The kstatus triple for a phase; a stall (if any) takes ``Stalled`` and ``Ready``'s reason."""
    phase = Phase(phase)
    if stall is not None:
        return [
            Condition(READY, "False", stall.reason, stall.message),
            Condition(RECONCILING, "False", stall.reason, "waiting for the spec or the cluster to be fixed"),
            Condition(STALLED, "True", stall.reason, stall.message),
        ]
    if phase is Phase.SUCCEEDED:
        return [
            Condition(READY, "True", "Succeeded", message),
            Condition(RECONCILING, "False", "Succeeded", "done"),
            Condition(STALLED, "False", "Succeeded", "done"),
        ]
    if phase is Phase.PAUSED:
        # Reconciling stays True: a paused backfill is unfinished work, and kstatus (Flux
        # `wait: true`, `dependsOn`) must keep dependents waiting rather than read it as Current.
        return [
            Condition(READY, "False", "Suspended", message),
            Condition(RECONCILING, "True", "Suspended", "spec.suspend is true: resumes from the checkpoint when false"),
            Condition(STALLED, "False", "Suspended", "spec.suspend is true"),
        ]
    if phase is Phase.FAILED:  # a stall always accompanies Failed; kept for completeness
        return [
            Condition(READY, "False", "Failed", message),
            Condition(RECONCILING, "False", "Failed", message),
            Condition(STALLED, "True", "Failed", message),
        ]
    reason = "Progressing" if phase is Phase.RUNNING else "Pending"
    return [
        Condition(READY, "False", reason, message),
        Condition(RECONCILING, "True", reason, message),
        Condition(STALLED, "False", reason, message),
    ]


def for_merge_patch(value: Any, *, in_list: bool = False) -> Any:
    """The wire form of a status merge patch: an empty string means "absent".

    Some API servers (seen on a 1.20 build) turn ``""`` inside a JSON merge patch into ``null``
    and then reject it against the schema's ``type: string``. So an empty value is sent as
    ``null`` (which deletes the key, as RFC 7386 says), or left out inside list items (where
    ``null`` would be a value). Readers treat a missing field as empty.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item == "":
                if not in_list:
                    out[key] = None
            else:
                out[key] = for_merge_patch(item, in_list=in_list)
        return out
    if isinstance(value, list):
        return [for_merge_patch(item, in_list=True) for item in value]
    return value


def stored_form(value: Any) -> Any:
    """What the server keeps after such a patch: no empty strings, no nulls (for comparisons)."""
    if isinstance(value, dict):
        return {k: stored_form(v) for k, v in value.items() if v not in ("", None)}
    if isinstance(value, list):
        return [stored_form(v) for v in value]
    return value

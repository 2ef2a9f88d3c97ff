"""The health throttles' I/O: the check before the first write, and the probe between batches.

The probe runs on a session of its own (``backfill <identity> shard <i> health``) with a short
``statement_timeout``: a slow or blocked health query never holds up the shard's session, and it
never runs inside a batch. The backfill's own sessions (their ``application_name`` starts with
``backfill <identity>``) are not counted as active backends or lock waiters.

A health check that fails at run time (an error, a timeout, a lost session, a wrong answer)
counts as *unhealthy*: the shard waits and checks again after ``interval``. After
``limits.maxRetries`` consecutive failed checks the run stops with ``RetriesExhausted`` (and
resumes from its checkpoint when started again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_api.errors import RetriesExhausted, ValidationFailed
from backfill_api.model import HealthQuerySpec, LimitsSpec
from backfill_worker.observe.events import HealthObserved
from backfill_worker.sql.connection import first_line
from backfill_worker.throttles import health
from backfill_worker.throttles.impact_signals import like_prefix
from backfill_worker.throttles.throttle import Wait

log = logging.getLogger(__name__)

PROBE_STATEMENT_TIMEOUT_MS = 1000
"""``statement_timeout`` of the server sample (the health query has its own ``timeout``)."""

SERVER_QUERY = """
SELECT
  CASE WHEN %(wal)s THEN (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END,
  (SELECT count(*) FROM pg_stat_activity
     WHERE backend_type = 'client backend' AND state IS NOT NULL AND state <> 'idle'
       AND pid <> pg_backend_pid() AND NOT (coalesce(application_name, '') = %(own)s
       OR coalesce(application_name, '') LIKE %(own_sessions)s)),
  (SELECT count(*) FROM pg_stat_activity
     WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
       AND NOT (coalesce(application_name, '') = %(own)s OR coalesce(application_name, '') LIKE %(own_sessions)s))
"""
"""The WAL position (only when bounded: it fails on a standby), other client sessions that are
not idle (running a statement, or inside a transaction), other sessions waiting for a lock."""

STATS_VISIBLE_QUERY = (
    "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
    " OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')"
)


def own_names(identity: str) -> dict[str, str]:
    """The query parameters recognising the backfill's own sessions."""
    own = f"backfill {identity}"[:63]
    return {"own": own, "own_sessions": like_prefix(f"backfill {identity} "[:63])}


def _set_timeout(conn: psycopg.Connection, milliseconds: int, *, local: bool) -> None:
    scope = sql.SQL("true" if local else "false")
    conn.execute(sql.SQL("SELECT set_config('statement_timeout', %s, {})").format(scope), [str(milliseconds)])


def _milliseconds(spec: HealthQuerySpec) -> int:
    return max(1, round(spec.timeout.total_seconds() * 1000))


def run_health_query(conn: psycopg.Connection, spec: HealthQuerySpec) -> bool | float:
    """The health query's value on an autocommit session (raises psycopg or HealthValueError)."""
    _set_timeout(conn, _milliseconds(spec), local=False)
    cursor = conn.execute(spec.query)  # trusted input: the manifest author's SQL, as written
    rows = cursor.fetchmany(2) if cursor.description else []
    return health.interpret(rows)


def observed(
    identity: str, shard: int, sample: health.ServerSample | None, previous: health.ServerSample | None,
    value: bool | float | None,
) -> HealthObserved:
    """The event for the metrics (PURE): the WAL rate between the last two samples, the counts, the value."""
    wal_rate = None
    if sample is not None and previous is not None and sample.wal_bytes is not None and previous.wal_bytes is not None:
        seconds = sample.at - previous.at
        wal_rate = max(0, sample.wal_bytes - previous.wal_bytes) / seconds if seconds > 0 else None
    return HealthObserved(
        identity, shard, wal_bytes_per_second=wal_rate,
        active_backends=sample.active_backends if sample is not None else None,
        lock_waits=sample.lock_waits if sample is not None else None,
        query_value=float(value) if value is not None else None,
    )


# -- before the first write ---------------------------------------------------------------------


def validate(conn: psycopg.Connection, limits: LimitsSpec, redact: Callable[[str], str]) -> None:
    """Run each configured health check once (rolled back); ValidationFailed naming the field."""
    if limits.health is not None:
        _validate_query(conn, limits.health, redact)
    if limits.max_wal_bytes_per_second > 0:
        _validate_wal(conn, redact)
    for field, bound in (("maxActiveBackends", limits.max_active_backends), ("maxLockWaits", limits.max_lock_waits)):
        if bound > 0:
            _validate_stats_visible(conn, f"spec.limits.{field}")


def _validate_query(conn: psycopg.Connection, spec: HealthQuerySpec, redact: Callable[[str], str]) -> None:
    field = "spec.limits.health.query"
    try:
        with conn.transaction(force_rollback=True):
            _set_timeout(conn, _milliseconds(spec), local=True)
            cursor = conn.execute(spec.query)
            rows = cursor.fetchmany(2) if cursor.description else []
    except psycopg.errors.QueryCanceled:
        raise ValidationFailed(
            field, f"did not answer within spec.limits.health.timeout ({spec.timeout.total_seconds():g}s): "
            "make the query cheaper or raise the timeout"
        ) from None
    except psycopg.Error as error:
        raise ValidationFailed(field, f"failed: {redact(first_line(error))}; fix the query (it runs as written)") from None
    try:
        value = health.interpret(rows)
    except health.HealthValueError as error:
        raise ValidationFailed(field, str(error)) from None
    problem = health.check_shape(value, spec.max_value)
    if problem is not None:
        raise ValidationFailed("spec.limits.health.maxValue", problem)


def _validate_wal(conn: psycopg.Connection, redact: Callable[[str], str]) -> None:
    field = "spec.limits.maxWalBytesPerSecond"
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is not None and row[0]:
        raise ValidationFailed(
            field, "the server is a standby (in recovery): its WAL position is the primary's to measure; "
            "run against the primary, or set maxWalBytesPerSecond to 0"
        )
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT pg_current_wal_lsn()")
    except psycopg.Error as error:
        raise ValidationFailed(
            field, f"pg_current_wal_lsn() is not available to this role ({redact(first_line(error))}): "
            "grant EXECUTE on it, or set maxWalBytesPerSecond to 0"
        ) from None


def _validate_stats_visible(conn: psycopg.Connection, field: str) -> None:
    row = conn.execute(STATS_VISIBLE_QUERY).fetchone()
    if not (row and row[0]):
        raise ValidationFailed(
            field, "this role cannot see other roles' sessions in pg_stat_activity, so the bound would never "
            "trigger: GRANT pg_read_all_stats TO the role, or set it to 0"
        )


# -- between batches ----------------------------------------------------------------------------


@dataclass
class HealthGate:
    """One shard's health checks, on a session of its own (opened on first use, reopened after a loss)."""

    identity: str
    shard: int
    open_session: Callable[[], psycopg.Connection]
    emit: Callable[[HealthObserved], None]
    redact: Callable[[str], str]
    clock: Callable[[], float] = time.monotonic
    conn: psycopg.Connection | None = None
    mark: health.WalMark | None = None
    previous: health.ServerSample | None = None
    query_checked_at: float | None = None
    query_unhealthy: bool = False
    failures: int = 0

    def check(self, limits: LimitsSpec) -> Wait | None:
        """One look: the wait before the next batch (None: go). Failures count as unhealthy."""
        try:
            sample, unhealthy = self._look(limits)
        except (psycopg.Error, health.HealthValueError, OSError) as error:
            return self._failed(limits, error)
        self.failures = 0
        poll = limits.health.interval.total_seconds() if limits.health is not None else health.POLL_SECONDS
        decision = health.decide(limits, unhealthy=unhealthy, sample=sample, mark=self.mark, query_poll_seconds=poll)
        self.mark = decision.mark
        return decision.wait

    def _look(self, limits: LimitsSpec) -> tuple[health.ServerSample | None, bool]:
        conn = self._session()
        now = self.clock()
        value: bool | float | None = None
        spec = limits.health
        if spec is not None and (
            self.query_unhealthy or self.query_checked_at is None
            or now - self.query_checked_at >= spec.interval.total_seconds()
        ):
            value = run_health_query(conn, spec)
            self.query_checked_at = now
            self.query_unhealthy = health.query_unhealthy(value, spec.max_value)
        if spec is None:
            self.query_unhealthy = False
        sample = self._sample(conn, limits) if health.server_sample_needed(limits) else None
        self.emit(observed(self.identity, self.shard, sample, self.previous, value))
        if sample is not None:
            self.previous = sample
        return sample, self.query_unhealthy

    def _sample(self, conn: psycopg.Connection, limits: LimitsSpec) -> health.ServerSample:
        _set_timeout(conn, PROBE_STATEMENT_TIMEOUT_MS, local=False)
        params = {"wal": limits.max_wal_bytes_per_second > 0, **own_names(self.identity)}
        row = conn.execute(SERVER_QUERY, params).fetchone()
        assert row is not None
        return health.ServerSample(self.clock(), None if row[0] is None else int(row[0]), int(row[1]), int(row[2]))

    def _failed(self, limits: LimitsSpec, error: BaseException) -> Wait:
        self.failures += 1
        message = self.redact(first_line(error))
        if self.failures > limits.max_retries:
            raise RetriesExhausted(
                f"shard {self.shard}: the health check failed {self.failures} times in a row ({message}); "
                "fix spec.limits.health.query (or the database), raise spec.limits.maxRetries, or remove the bound. "
                "The run resumes from the checkpoint"
            ) from None
        if isinstance(error, psycopg.OperationalError) or (self.conn is not None and self.conn.closed):
            self.close()  # a lost session: the next check opens a new one
        log.warning("shard %s: health check failed (%s); counted as unhealthy, checking again", self.shard, message)
        self.query_unhealthy = limits.health is not None
        poll = limits.health.interval.total_seconds() if limits.health is not None else health.POLL_SECONDS
        return Wait(health.first_reason(limits), poll)

    def _session(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = self.open_session()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except (psycopg.Error, OSError):  # already broken
                pass
        self.conn = None

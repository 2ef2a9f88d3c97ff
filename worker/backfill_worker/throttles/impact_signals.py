"""The queries behind the application-impact throttle: one sample of what PostgreSQL exposes.

Everything here is read-only and cheap (a few shared-memory counters and a scan of
``pg_stat_activity``). The backfill's own sessions are recognised by their
``application_name`` (``backfill <namespace>/<name> ...``, set by ``connection.open_connection``).
Visibility: other roles' ``pg_stat_activity`` rows show their state only to superusers and
members of ``pg_read_all_stats``; without that role the active-session and lock-wait signals
read 0 and the throttle relies on the transaction rates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from backfill_worker.throttles.app_impact import Activity

log = logging.getLogger(__name__)

SAMPLE_QUERY = """
SELECT
  (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()),
  pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
  (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint,
  (SELECT count(*) FROM pg_stat_activity
     WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
       AND coalesce(application_name, '') NOT LIKE %(own)s),
  (SELECT count(*) FROM pg_stat_activity w
     WHERE CASE WHEN w.wait_event_type = 'Lock' AND coalesce(w.application_name, '') NOT LIKE %(own)s
           THEN pg_blocking_pids(w.pid) && ARRAY(
             SELECT pid FROM pg_stat_activity WHERE application_name LIKE %(own)s)
           ELSE false END)
"""
"""Commits of this database, the snapshot's xmax (latest completed transaction id + 1: its
deltas count completed write transactions, server-wide, exact and immediate), the WAL position, other sessions running a statement, and other
sessions waiting for a lock one of the backfill's sessions holds."""

LOCK_WAITERS_QUERY = (
    "SELECT count(*) FROM pg_stat_activity WHERE CASE WHEN wait_event_type = 'Lock' "
    "THEN pg_backend_pid() = ANY(pg_blocking_pids(pid)) ELSE false END"
)
"""Run inside the batch transaction, after its UPDATE: sessions waiting for our row locks now."""

STATEMENTS_QUERY = """
SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(total_exec_time), 0)::float8 FROM pg_stat_statements
WHERE toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE %(table)s AND query NOT LIKE 'SELECT set_config(%%'
  AND query NOT LIKE '%%pg_stat_%%' AND query NOT LIKE %(checkpoint)s
  AND upper(query) NOT IN ('BEGIN', 'COMMIT', 'END', 'ROLLBACK')
"""
"""Other sessions' statements: the backfill's own are those naming its table or checkpoint
schema in the double-quoted form ``psycopg.sql.Identifier`` writes (an application writing
exactly ``"schema"."table"`` is counted as the backfill's), the sampling itself, and bare
transaction control."""


@dataclass(frozen=True)
class Sample:
    at: float
    """``time.monotonic()`` when the sample was taken."""
    commits: int
    next_xid: int
    wal_bytes: int
    active_others: int
    lock_waiters: int
    statement_calls: int | None = None
    statement_ms: float | None = None
    """Sum of ``total_exec_time``; None without ``pg_stat_statements``."""


def like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with ``text``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def like_anywhere(text: str) -> str:
    return "%" + like_prefix(text)


def quoted(*parts: str) -> str:
    """``"a"."b"`` as ``psycopg.sql.Identifier`` renders it."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def time_weighted_active(samples: Sequence[tuple[float, int]]) -> float | None:
    """PURE: the mean number of other active sessions over a window, from ``(seconds, count)`` samples.

    Samples are taken only between our batches, at two kinds of moment: right after a batch, when
    sessions that waited for its rows are still catching up (the batch's effect), and at the end
    of a pause (the application alone). Each stands for the time it follows, so a run at 2 %
    duty is not judged by its 2 % worst moments: an unweighted mean held such a run in the
    controller's hold band (``activeSessions`` ~0.9) while the application ran at 0.96x."""
    total = sum(seconds for seconds, _ in samples)
    if total <= 0:
        return None
    return sum(seconds * count for seconds, count in samples) / total


def activity_between(first: Sample, last: Sample, *, own_writes: int, own_commits: int, active: float,
                     lock_waiters: int) -> Activity:
    """PURE: the other sessions' activity from two samples, the backfill's own transactions removed."""
    seconds = max(last.at - first.at, 1e-3)
    statement_ms = None
    if (first.statement_calls is not None and last.statement_calls is not None
            and first.statement_ms is not None and last.statement_ms is not None):
        calls = last.statement_calls - first.statement_calls
        statement_ms = (last.statement_ms - first.statement_ms) / calls if calls > 0 else None
    return Activity(
        seconds=seconds,
        write_rate=max(0, last.next_xid - first.next_xid - own_writes) / seconds,
        commit_rate=max(0, last.commits - first.commits - own_commits) / seconds,
        active=active,
        lock_waiters=lock_waiters,
        wal_rate=max(0, last.wal_bytes - first.wal_bytes) / seconds,
        statement_ms=statement_ms,
    )


class Sampler:
    """Reads samples on a connection it is given (between batches: the shard's own, idle one)."""

    def __init__(self, own_application_prefix: str, table: tuple[str, str], checkpoint_schema: str) -> None:
        self._own = like_prefix(own_application_prefix[:63])
        self._table = like_anywhere(quoted(*table))
        self._checkpoint = like_anywhere(quoted(checkpoint_schema) + ".")
        self._statements: bool | None = None
        """None: not yet tried; False: pg_stat_statements is not installed or not readable."""

    def sample(self, conn: psycopg.Connection, at: float, *, statements: bool = True) -> Sample:
        row = conn.execute(SAMPLE_QUERY, {"own": self._own}).fetchone()
        assert row is not None
        calls, total = self._read_statements(conn) if statements else (None, None)
        return Sample(at, int(row[0] or 0), int(row[1]), int(row[2]), int(row[3]), int(row[4]), calls, total)

    def _read_statements(self, conn: psycopg.Connection) -> tuple[int | None, float | None]:
        if self._statements is False:
            return None, None
        if self._statements is None:
            installed = conn.execute("SELECT to_regclass('pg_stat_statements') IS NOT NULL").fetchone()
            self._statements = bool(installed and installed[0])
            if not self._statements:
                return None, None
        try:
            row = conn.execute(STATEMENTS_QUERY, {"table": self._table, "checkpoint": self._checkpoint}).fetchone()
        except psycopg.Error as error:  # created but not preloaded, or not readable: do without it
            log.info("pg_stat_statements not usable (%s); the throttle does without statement latency",
                     type(error).__name__)
            self._statements = False
            return None, None
        assert row is not None
        return int(row[0]), float(row[1])


def lock_waiters(conn: psycopg.Connection) -> int:
    """Sessions waiting for a lock this session holds (call inside the batch transaction)."""
    row = conn.execute(LOCK_WAITERS_QUERY).fetchone()
    return int(row[0]) if row else 0

"""Pure throttle decisions, plus the one query that reads replication lag.

Reasons are the status contract's ``throttleReason`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from backfill_api.status import ThrottleReason

PAUSE = ThrottleReason.PAUSE
MAX_ROWS_PER_SECOND = ThrottleReason.MAX_ROWS_PER_SECOND
REPLICATION_LAG = ThrottleReason.REPLICATION_LAG

LAG_POLL_SECONDS = 1.0
"""How often lag is read while running, and re-read while waiting for replicas."""

# A replica that has replayed everything we wrote counts as 0: replay_lag itself keeps showing the
# last sample for 10-20 s after the replica caught up (it is only cleared by later status
# replies), and a backfill waiting for it would stall on a stale number.
LAG_QUERY = (
    "SELECT max(CASE WHEN replay_lsn >= pg_current_wal_lsn() THEN 0"
    " ELSE extract(epoch FROM replay_lag) END)::float8, count(*) FROM pg_stat_replication"
)


@dataclass(frozen=True)
class Wait:
    reason: str
    seconds: float


def after_batch(rows: int, batch_seconds: float, pause_seconds: float, max_rows_per_second: float) -> Wait | None:
    """The wait after a batch: the ``pause``, or what keeps this runner under its row rate.

    ``batch_seconds`` is the time since the previous batch's wait ended (probe + write); a batch
    of ``rows`` rows may not take less than ``rows / max_rows_per_second`` overall.
    """
    rate_wait = rows / max_rows_per_second - batch_seconds if max_rows_per_second > 0 else 0.0
    if rate_wait > pause_seconds and rate_wait > 0:
        return Wait(MAX_ROWS_PER_SECOND, rate_wait)
    if pause_seconds > 0:
        return Wait(PAUSE, pause_seconds)
    return None


def per_runner_rate(max_rows_per_second: int, shard_count: int) -> float:
    """The spec's limit is for the whole backfill: each of the shards gets an equal share."""
    return max_rows_per_second / shard_count if max_rows_per_second > 0 else 0.0


def lag_wait(lag_seconds: float | None, max_lag_seconds: float) -> Wait | None:
    """Wait (and re-check) while the slowest replica lags more than allowed; 0 disables."""
    if max_lag_seconds <= 0 or lag_seconds is None or lag_seconds <= max_lag_seconds:
        return None
    return Wait(REPLICATION_LAG, LAG_POLL_SECONDS)


def read_replication_lag(conn: psycopg.Connection) -> float | None:
    """Largest replay lag over connected replicas, None when there are none (or it is hidden).

    ``replay_lag`` is only visible to superusers and members of ``pg_read_all_stats``.
    """
    row = conn.execute(LAG_QUERY).fetchone()
    if row is None or row[0] is None:
        return None
    return float(row[0])

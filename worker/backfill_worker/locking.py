"""Single runner per (backfill, shard): a session-level advisory lock.

Session locks vanish with the connection, so a crashed runner never leaves a stale lock; after a
reconnect the runner must take it again (and stop if someone else has it by then).
"""

from __future__ import annotations

import psycopg

PLAN_LOCK_SHARD = -1
"""Pseudo-shard whose transaction lock serialises the one-time shard planning."""


def try_lock(conn: psycopg.Connection, identity: str, shard: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext('backfill:' || %s), %s)", [identity, shard]).fetchone()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection, identity: str, shard: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtext('backfill:' || %s), %s)", [identity, shard])


def lock_planning(conn: psycopg.Connection, identity: str) -> None:
    """Inside a transaction: wait until no other runner is planning this backfill's shards."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('backfill:' || %s), %s)", [identity, PLAN_LOCK_SHARD])

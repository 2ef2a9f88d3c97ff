"""Single runner per (backfill, shard): a session-level advisory lock.

Session locks vanish with the connection, so a crashed runner never leaves a stale lock; after a
reconnect the runner must take it again (and stop if someone else has it by then).
"""

from __future__ import annotations

import time

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


def take_over_from_own_session(conn: psycopg.Connection, identity: str, shard: int, stale_pid: int, wait_seconds: float = 30.0) -> bool:
    """After a silent network partition, the server may still run the runner's *previous* session
    (it has not noticed the client is gone) holding the shard's lock and the batch's row locks.
    If exactly that backend (``stale_pid``, a backfill session of this identity and role) holds the lock, end it and take
    the lock; True on success. Never touches a session that is not this runner's own."""
    deadline = time.monotonic() + wait_seconds
    while True:
        if try_lock(conn, identity, shard):
            return True
        holder = conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid = %s "
            "AND l.classid::bigint = (hashtext('backfill:' || %s)::bigint & 4294967295) "
            "AND starts_with(a.application_name, left('backfill ' || %s, 40)) AND a.usename = current_user",
            [shard, identity, identity],
        ).fetchone()
        if holder is None or holder[0] != stale_pid or time.monotonic() > deadline:
            return False
        conn.execute("SELECT pg_terminate_backend(%s, 5000)", [stale_pid])
        time.sleep(0.1)

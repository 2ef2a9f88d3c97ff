"""Single runner per (backfill, shard): a session-level advisory lock.

Session locks vanish with the connection, so a crashed runner never leaves a stale lock; after a
reconnect the runner must take it again (and stop if someone else has it by then).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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


# -- a restart waits for the previous run's session --------------------------------------------


def own_application_names(identity: str, shard: int) -> tuple[str, ...]:
    """The ``application_name`` values the engine gives the sessions that hold a shard's lock
    (the run's main session holds the first shard's; a reconnected or per-shard session has the
    shard's own name), as the server stores them (at most 63 bytes)."""
    return tuple(dict.fromkeys(_server_name(name) for name in (f"backfill {identity}", f"backfill {identity} shard {shard}")))


def _server_name(name: str) -> str:
    # connection.open_connection cuts at 63 characters; the server keeps at most 63 bytes.
    return name[:63].encode()[:63].decode(errors="ignore")


@dataclass(frozen=True)
class LockHolder:
    """The backend holding a shard's advisory lock, from ``pg_locks`` and ``pg_stat_activity``."""

    pid: int
    application_name: str
    state: str
    """``active``, ``idle``, ``idle in transaction``..."""
    query: str
    """Its current (or last) statement, as ``pg_stat_activity`` shows it."""
    running_seconds: float
    """Since its current statement started (or its last one, when idle)."""
    statement_started: float = 0.0
    """``query_start`` (epoch seconds): a new value means the holder went on to another statement."""
    idle_seconds: float = 0.0
    """How long it has waited for its client (``idle``, ``idle in transaction``); 0 while ``active``."""

    def moved_on_from(self, earlier: LockHolder) -> bool:
        """PURE: since ``earlier`` this holder started another statement (or is another backend):
        it is alive and working, not a killed run's backend finishing its last statement."""
        return self.pid != earlier.pid or self.statement_started != earlier.statement_started

    def waits_for_a_live_client(self) -> bool:
        """PURE: idle for longer than a dying backend can be: when its client is gone, a backend
        exits as soon as it has finished its statement and reads the next command (it gets EOF)."""
        return self.state != "active" and self.idle_seconds >= IDLE_GRACE_SECONDS

    def is_live_runner(self, first_seen: LockHolder | None) -> bool:
        """PURE: moved on since it was first seen, or idle for its client: not a dying backend."""
        return (first_seen is not None and self.moved_on_from(first_seen)) or self.waits_for_a_live_client()


IDLE_GRACE_SECONDS = 1.0
"""An own holder idle this long is kept by a live (perhaps frozen) client, not a killed one's."""


@dataclass(frozen=True)
class Refusal:
    holder: LockHolder | None
    waited: float
    own: bool
    """The holder is this backfill's own session, waited for in vain (a live runner, not a dying one)."""
    alive: bool = False
    """That own session went on to new statements while we looked: a live runner, refused at once."""


STATEMENT_SHOWN = 160
"""Characters of the holder's statement that are printed."""


class LockDecision(Enum):
    WAIT = "wait"
    """The holder is a session of this same backfill (a previous run's, still finishing its batch)."""
    REFUSE = "refuse"
    """Held by anything else, or waited long enough."""


def decide_lock(
    holder: LockHolder | None, identity: str, shard: int, waited: float, bound: float, first_seen: LockHolder | None = None
) -> LockDecision:
    """Whether to wait for the shard's lock (PURE).

    ``holder`` None: the lock was released between the try and the look-up: try again at once
    (WAIT with no holder to report). A holder is waited for only when it is one of this
    backfill's own sessions, only while it is still on the statement it was first seen running
    (``first_seen``: a killed run's backend finishes that one statement and exits; one that starts
    another is a live runner, refused at once), and only up to ``bound`` seconds in all.
    """
    if waited >= bound:
        return LockDecision.REFUSE
    if holder is None:
        return LockDecision.WAIT
    if not is_own(holder, identity, shard):
        return LockDecision.REFUSE
    if holder.is_live_runner(first_seen):
        return LockDecision.REFUSE
    return LockDecision.WAIT


def is_own(holder: LockHolder, identity: str, shard: int) -> bool:
    """The holder is a session the engine opened for this backfill's shard (PURE)."""
    return holder.application_name in own_application_names(identity, shard)


def describe_holder(holder: LockHolder, redact: Callable[[str], str], limit: int = STATEMENT_SHOWN) -> str:
    """``pid 123 (active for 2.1 s): UPDATE ...`` with the statement redacted and cut (PURE)."""
    text = " ".join(redact(holder.query).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"pid {holder.pid} ({holder.state or 'unknown'} for {holder.running_seconds:.1f} s): {text or '(no statement)'}"




def lock_holder(conn: psycopg.Connection, identity: str, shard: int) -> LockHolder | None:
    row = conn.execute(
        "SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.state, ''), coalesce(a.query, ''), "
        "extract(epoch FROM now() - coalesce(a.query_start, a.backend_start, now()))::float8, "
        "coalesce(extract(epoch FROM a.query_start), 0)::float8, "
        "CASE WHEN a.state = 'active' THEN 0 ELSE coalesce(extract(epoch FROM now() - a.state_change), 0) END::float8 "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid = %s::int::oid "
        "AND l.classid::bigint = (hashtext('backfill:' || %s)::bigint & 4294967295) "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.pid <> pg_backend_pid() LIMIT 1",
        [shard, identity],
    ).fetchone()
    if row is None:
        return None
    pid, name, state, query, seconds, started, idle = row
    return LockHolder(int(pid), name, state, query, max(0.0, float(seconds)), float(started), max(0.0, float(idle)))


def acquire(
    conn: psycopg.Connection,
    identity: str,
    shard: int,
    *,
    wait_seconds: float,
    on_wait: Callable[[LockHolder, float], None],
    poll_seconds: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Refusal | None:
    """Take the shard's lock: None once it is ours, else why not.

    While a session of this same backfill holds it (a killed run's backend still finishing its
    statement), poll up to ``wait_seconds``; ``on_wait(holder, waited)`` is called on each poll.
    No batch can start before this returns None: the lock is taken by ``pg_try_advisory_lock``.
    """
    started = clock()
    last: LockHolder | None = None
    first_seen: LockHolder | None = None
    while True:
        if try_lock(conn, identity, shard):
            return None
        holder = lock_holder(conn, identity, shard)
        last = holder or last
        first_seen = first_seen or holder
        waited = clock() - started
        if decide_lock(holder, identity, shard, waited, wait_seconds, first_seen) is LockDecision.REFUSE:
            shown = holder or last
            alive = holder is not None and holder.is_live_runner(first_seen)
            return Refusal(shown, waited, own=shown is not None and is_own(shown, identity, shard), alive=alive)
        if holder is not None:
            on_wait(holder, waited)
            sleep(poll_seconds)

"""One batch: its key range (walked outside any transaction) and its one short transaction.

The transaction: ``SET LOCAL`` timeouts, the change over the range (``changes.py``: one
set-based ``UPDATE``, ``DELETE`` or ``INSERT ... SELECT``, by the spec's kind), the checkpoint
(in transactional mode: written here, before COMMIT, so data and checkpoint commit together),
COMMIT. Row locks are held only for this.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from backfill_api.errors import BackfillError
from backfill_api.model import LimitsSpec
from backfill_worker.changes.changes import BatchChange
from backfill_worker.checkpoints.checkpoint import Key
from backfill_worker.run.checkpointing import Checkpoints
from backfill_worker.sql import blocks, prefetch, statements
from backfill_worker.sql.statements import Target
from backfill_worker.throttles import impact_governor, impact_signals


class LockYielded(Exception):
    """The batch met an application's row lock within its short lock_timeout and was rolled back."""


@dataclass(frozen=True)
class Range:
    """The batch's keys: ``lower < key <= upper``."""

    lower: Key | None
    upper: Key
    size: int
    """The batch size the range was walked with."""
    keys: int
    """Keys in the range (the whole rest of the shard for its last batch)."""
    last: bool
    """The range reaches the shard's upper bound."""


def walk(
    conn: psycopg.Connection, target: Target, prefetcher: prefetch.BoundPrefetcher | None, shard: int,
    lower: Key | None, run_upper: Key, size: int,
) -> Range:
    """``size`` keys past ``lower`` (the prefetched bound when it is for this batch), at most ``run_upper``.

    ``walk: ctid``: ``size`` blocks past ``lower``, by arithmetic (no probe).
    """
    if target.by_ctid:
        block_end, counted_blocks = blocks.next_upper(lower, run_upper, size)
        return Range(lower, block_end, size, counted_blocks, block_end == run_upper)
    prefetched = prefetcher.take(lower, size) if prefetcher is not None else None
    if prefetched is not None:
        size, found = prefetched.size, prefetched.upper
    else:
        found = prefetch.probe(conn, target, lower, run_upper, size)
    upper: Key = found if found is not None else run_upper
    if upper == lower:  # a key whose text form does not read back: the walk would never advance
        raise BackfillError(
            f"shard {shard}: the key walk did not advance past {list(upper)} (its text form does not read back "
            "to the same key); nothing of this batch was committed. Choose a key of an exact type (spec.key)"
        )
    if found is not None:
        keys = size
    else:
        counted = conn.execute(
            statements.count_keys(target, has_lower=lower is not None), statements.range_params(lower, run_upper)
        ).fetchone()
        keys = int(counted[0]) if counted else 0
    return Range(lower, upper, size, keys, upper == run_upper)


def commits_asynchronously(checkpoints: Checkpoints, last: bool, governor: impact_governor.Governor | None) -> bool:
    """Asynchronous commit for all but the last batch, in transactional mode only.

    The batch's data and its checkpoint are one transaction, so a server crash can only lose both
    together (the rerun redoes them: still exactly-once), and the backend need not wait for a WAL
    flush per batch (about 10% of a 30 ms batch). The last batch commits with the session's
    setting, which also flushes every earlier commit before the run reports ``done``.
    """
    return checkpoints.commits_with_data and not last and (governor is None or not governor.synchronous_commit)


def write(
    conn: psycopg.Connection, change: BatchChange, limits: LimitsSpec, keys: Range, *, asynchronous: bool,
    governor: impact_governor.Governor | None, checkpoints: Checkpoints, identity: str, shard: int,
    lock_timeout: tuple[float, bool] | None = None,
) -> int:
    """The batch's transaction; returns the rows changed. Nothing of it stays if it raises.

    ``lock_timeout``: seconds, and whether its expiry is a yield (``LockYielded``: the batch gave
    way to an application's row lock) rather than a lock timeout error; default the spec's."""
    if governor is not None:
        governor.note_batch()
    timeout, yields = lock_timeout or (limits.lock_timeout.total_seconds(), False)
    try:
        return _transaction(conn, change, limits, keys, asynchronous, governor, checkpoints, identity, shard, timeout)
    except psycopg.errors.LockNotAvailable:
        if not yields:
            raise
        raise LockYielded from None


def _transaction(
    conn: psycopg.Connection, change: BatchChange, limits: LimitsSpec, keys: Range, asynchronous: bool,
    governor: impact_governor.Governor | None, checkpoints: Checkpoints, identity: str, shard: int, lock_timeout: float,
) -> int:
    with change.transaction(conn):
        conn.execute(
            "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true), "
            "set_config('synchronous_commit', coalesce(%s, current_setting('synchronous_commit')), true)",
            [_ms(lock_timeout), _ms(limits.statement_timeout.total_seconds()), "off" if asynchronous else None],
        )
        rows = change.apply(conn, keys.lower, keys.upper)
        if governor is not None:  # now we hold every row lock of the batch: who waits for them?
            governor.note_lock_waiters(impact_signals.lock_waiters(conn))
        # transactional: the checkpoint row, in this transaction, before COMMIT (atLeastOnce: nothing)
        checkpoints.record_batch(conn, identity, shard, keys.upper, rows, keys.keys, keys.last)
    return rows


def _ms(seconds: float) -> str:
    return f"{max(0, round(seconds * 1000))}ms"

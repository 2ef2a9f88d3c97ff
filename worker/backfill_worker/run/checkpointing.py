"""The one checkpoint interface the engine uses, and its two implementations.

:class:`TableCheckpoints` (``checkpoint.mode: transactional``, exactly-once) writes each batch's
checkpoint row inside the batch's own transaction, before its COMMIT. :class:`StoredCheckpoints`
(``atLeastOnce``) saves the record to a :class:`~.checkpoint.ProgressStore` after the COMMIT, so
a crash between the two replays at most that one batch. The engine's batch loop calls the same
methods on either; planning (:func:`plan`) is written once over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import psycopg

from backfill_api.errors import CheckpointMismatch, CheckpointUnavailable
from backfill_api.model import Backfill
from backfill_worker.checkpoints import checkpoint_guard
from backfill_worker.checkpoints.checkpoint import DONE, RUNNING, CheckpointTable, Key, ProgressStore, ShardCheckpoint
from backfill_worker.sql import locking, sharding
from backfill_worker.sql.connection import first_line, open_connection
from backfill_worker.sql.statements import Target

log = logging.getLogger(__name__)


class ClearableStore(ProgressStore, Protocol):
    """A progress store that ``backfill reset`` can empty (the CLI's JSON file)."""

    def clear(self) -> int: ...


class Checkpoints(Protocol):
    """Where a run's shard checkpoints live; the batch loop never asks which one it has."""

    commits_with_data: bool
    """The checkpoint commits in the batch's transaction (so an asynchronous commit loses both or neither)."""
    plans_atomically: bool
    """The whole plan is saved in one transaction (so a partial set means rows were deleted by hand)."""
    guard_schema: str | None
    """The checkpoint table's schema for ``checkpoint_guard`` (None: the progress is not in a table)."""

    def prepare(self, conn: psycopg.Connection) -> None: ...

    def load(self, conn: psycopg.Connection, backfill: Backfill) -> list[ShardCheckpoint]: ...

    def save_plan(self, conn: psycopg.Connection, backfill: Backfill, planned: Sequence[ShardCheckpoint]) -> list[ShardCheckpoint]:
        """Save the planned shards (inside the planning transaction); returns them as now stored."""
        ...

    def reload(self, conn: psycopg.Connection, identity: str, shard: int) -> ShardCheckpoint | None:
        """After a reconnect: the checkpoint as committed (None: the runner's own copy is the truth)."""
        ...

    def record_batch(
        self, conn: psycopg.Connection, identity: str, shard: int, upper: Key, rows: int, keys: int, last: bool
    ) -> None:
        """Inside the batch's transaction, before COMMIT."""
        ...

    def batch_committed(self, checkpoint: ShardCheckpoint) -> None:
        """After the batch's COMMIT, with the shard's new checkpoint."""
        ...

    def record_state(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        """Label the shard (``running``, ``paused``, ``done``) on its own session if that is still open."""
        ...

    def record_failure(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        """State ``failed`` and its reason, on a fresh session if the shard's broke."""
        ...


class TableCheckpoints:
    """``transactional``: ``<checkpoint.schema>.checkpoints``, written by the batch's transaction."""

    commits_with_data = True
    plans_atomically = True

    def __init__(self, table: CheckpointTable, dsn: str, redact: Callable[[str], str]) -> None:
        self.table = table
        self.guard_schema: str | None = table.schema
        self._dsn = dsn
        self._redact = redact

    def prepare(self, conn: psycopg.Connection) -> None:
        self.table.ensure(conn)

    def load(self, conn: psycopg.Connection, backfill: Backfill) -> list[ShardCheckpoint]:
        return self.table.load(conn, backfill.identity)

    def save_plan(self, conn: psycopg.Connection, backfill: Backfill, planned: Sequence[ShardCheckpoint]) -> list[ShardCheckpoint]:
        self.table.insert_plan(conn, list(planned))
        return self.table.load(conn, backfill.identity)

    def reload(self, conn: psycopg.Connection, identity: str, shard: int) -> ShardCheckpoint | None:
        # A COMMIT whose acknowledgement was lost may or may not have happened: the table knows.
        return next((c for c in self.table.load(conn, identity) if c.shard == shard), None)

    def record_batch(
        self, conn: psycopg.Connection, identity: str, shard: int, upper: Key, rows: int, keys: int, last: bool
    ) -> None:
        recorded = conn.execute(
            self.table.record_batch_statement(), [list(upper), rows, keys, DONE if last else RUNNING, identity, shard]
        ).rowcount
        if recorded != 1:  # reset or deleted under us: committing would lose exactly-once
            raise CheckpointUnavailable(
                f"the checkpoint row of {identity} shard {shard} disappeared during the run "
                "(reset or deleted by hand); the batch was rolled back. Rerun to start from the current checkpoint"
            )

    def batch_committed(self, checkpoint: ShardCheckpoint) -> None:
        pass  # already committed with the batch

    def record_state(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        if conn is None or conn.closed:
            return
        try:
            self.table.set_state(conn, checkpoint.identity, checkpoint.shard, checkpoint.state)
        except psycopg.Error as error:  # the batch data is safe either way; only the label is stale
            log.warning(
                "shard %s: could not record state %s: %s", checkpoint.shard, checkpoint.state, self._redact(first_line(error))
            )

    def record_failure(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        identity, shard, state, reason = checkpoint.identity, checkpoint.shard, checkpoint.state, checkpoint.last_error
        try:
            if conn is not None and not conn.closed:
                self.table.set_state(conn, identity, shard, state, reason)
            else:
                with open_connection(self._dsn, f"backfill {identity} shard {shard}") as fresh:
                    self.table.set_state(fresh, identity, shard, state, reason)
        except psycopg.Error as error:  # the database is unreachable: the label stays as it was
            log.warning("shard %s: could not record state failed: %s", shard, self._redact(first_line(error)))


class StoredCheckpoints:
    """``atLeastOnce``: a :class:`ProgressStore` outside the database, saved after each COMMIT."""

    commits_with_data = False
    plans_atomically = False
    guard_schema: str | None = None

    def __init__(self, store: ProgressStore) -> None:
        self.store = store

    def prepare(self, conn: psycopg.Connection) -> None:
        pass  # nothing to create in the database

    def load(self, conn: psycopg.Connection, backfill: Backfill) -> list[ShardCheckpoint]:
        return [cp for i in range(backfill.spec.parallelism) if (cp := self.store.load(i)) is not None]

    def save_plan(self, conn: psycopg.Connection, backfill: Backfill, planned: Sequence[ShardCheckpoint]) -> list[ShardCheckpoint]:
        for cp in planned:
            self.store.save(cp.shard, cp)
        return list(planned)

    def reload(self, conn: psycopg.Connection, identity: str, shard: int) -> ShardCheckpoint | None:
        return None  # the store holds what this runner saved: its own copy is current

    def record_batch(
        self, conn: psycopg.Connection, identity: str, shard: int, upper: Key, rows: int, keys: int, last: bool
    ) -> None:
        pass  # saved after the COMMIT (batch_committed): that gap is the at-least-once

    def batch_committed(self, checkpoint: ShardCheckpoint) -> None:
        self.store.save(checkpoint.shard, checkpoint)

    def record_state(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        self.store.save(checkpoint.shard, checkpoint)

    def record_failure(self, conn: psycopg.Connection | None, checkpoint: ShardCheckpoint) -> None:
        self.store.save(checkpoint.shard, checkpoint)


def check_fingerprints(backfill: Backfill, found: Sequence[ShardCheckpoint]) -> None:
    expected = backfill.spec.fingerprint()
    for cp in found:
        if cp.fingerprint != expected:
            raise CheckpointMismatch(
                f"{backfill.identity} has a checkpoint from a different spec ({', '.join(checkpoint_guard.FINGERPRINT_FIELDS)} "
                f"changed: fingerprint {cp.fingerprint} != {expected}). Restore the original spec to resume, or run "
                "`backfill reset FILE` to forget the checkpoint and start over"
            )


def plan(conn: psycopg.Connection, checkpoints: Checkpoints, backfill: Backfill, target: Target) -> dict[int, ShardCheckpoint]:
    """Every shard's checkpoint: the recorded ones, the missing ones planned (first planner wins)."""
    count = backfill.spec.parallelism

    def load_all() -> dict[int, ShardCheckpoint]:
        loaded = checkpoints.load(conn, backfill)
        check_fingerprints(backfill, loaded)
        return {cp.shard: cp for cp in loaded}

    checkpoints.prepare(conn)
    found = load_all()
    if checkpoints.plans_atomically and 0 < len(found) < count:
        # The plan is inserted in one transaction, so a partial set means rows were deleted by hand:
        # re-planning the missing shards could overlap or miss the remaining shards' ranges.
        missing = sorted(set(range(count)) - set(found))
        raise CheckpointMismatch(
            f"the checkpoint of {backfill.identity} is incomplete (shards {missing} missing): "
            "run `backfill reset FILE` to start over"
        )
    if not found:
        checkpoint_guard.refuse_if_elsewhere(conn, backfill, checkpoints.guard_schema)
    if len(found) < count:
        # Shard workers of one backfill may start together: plan under one advisory lock and look
        # again once we hold it, so exactly one plan is ever saved.
        with conn.transaction():
            locking.lock_planning(conn, backfill.identity)
            found = load_all()
            if len(found) < count:
                planned = sharding.plan_shards(
                    conn, target, identity=backfill.identity, fingerprint=backfill.spec.fingerprint(), shard_count=count
                )
                saved = checkpoints.save_plan(conn, backfill, [cp for cp in planned if cp.shard not in found])
                check_fingerprints(backfill, saved)
                found.update({cp.shard: cp for cp in saved})
    return found

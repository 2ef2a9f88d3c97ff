"""Splitting the key range into ``parallelism`` shards once, at the start of a run.

The run's upper bound is the largest key at planning time (rows inserted later are the
application's job). Boundaries are quantiles of the key, found by walking the key index from
one boundary to the next, so the whole split reads the index once.
"""

from __future__ import annotations

import psycopg

from backfill_worker.checkpoints.checkpoint import PENDING, Key, ShardCheckpoint
from backfill_worker.sql import blocks, statements
from backfill_worker.sql.statements import Target

EXACT_COUNT_BELOW = 100_000
"""Below this estimate (or when never analyzed) the keys are counted exactly."""


def estimate_keys(conn: psycopg.Connection, target: Target) -> int:
    row = conn.execute(
        "SELECT reltuples::bigint, relkind FROM pg_class WHERE oid = %s::regclass", [target.table_identifier.as_string(conn)]
    ).fetchone()
    estimate = int(row[0]) if row else -1
    if row is None or row[1] == "p" or estimate < EXACT_COUNT_BELOW:
        counted = conn.execute(statements.count_all(target)).fetchone()
        return int(counted[0]) if counted else 0
    return estimate


def edge(conn: psycopg.Connection, target: Target, *, last: bool) -> Key | None:
    row = conn.execute(statements.edge_key(target, last=last)).fetchone()
    return tuple(row) if row else None


def plan_shards(
    conn: psycopg.Connection, target: Target, *, identity: str, fingerprint: str, shard_count: int
) -> list[ShardCheckpoint]:
    """Bounds for every shard: shard i covers keys in (lower_i, upper_i] (block ranges under ``walk: ctid``)."""
    if target.by_ctid:
        return blocks.plan_shards(conn, target, identity=identity, fingerprint=fingerprint, shard_count=shard_count)
    run_max = edge(conn, target, last=True)
    if run_max is None:
        return [
            ShardCheckpoint(identity, i, shard_count, fingerprint, None, None, state=PENDING) for i in range(shard_count)
        ]
    total = estimate_keys(conn, target)
    step = max(1, total // shard_count)
    uppers: list[Key] = []
    lower: Key | None = None
    probe_first = statements.probe_upper_bound(target, has_lower=False)
    probe_next = statements.probe_upper_bound(target, has_lower=True)
    for _ in range(shard_count - 1):
        params = [*statements.range_params(lower, run_max), step - 1]
        row = conn.execute(probe_next if lower is not None else probe_first, params).fetchone()
        if row is None or tuple(row) == run_max:
            break
        lower = tuple(row)
        uppers.append(lower)
    uppers.append(run_max)
    uppers += [run_max] * (shard_count - len(uppers))  # a small table leaves trailing shards empty
    planned = []
    for i in range(shard_count):
        shard_lower = uppers[i - 1] if i > 0 else None
        empty = shard_lower is not None and shard_lower == uppers[i]
        estimated = 0 if empty else (step if i < shard_count - 1 else max(0, total - step * (shard_count - 1)))
        planned.append(ShardCheckpoint(identity, i, shard_count, fingerprint, shard_lower, uppers[i], estimated_keys=estimated))
    return planned

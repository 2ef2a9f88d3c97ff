"""``walk: ctid``: batches and shards as ranges of physical blocks (docs/ctid.md).

A block range reuses the key machinery: its "key" is a block number as text (one value), the
range ``(lo, hi]`` of keys is the blocks ``lo .. hi-1`` (``statements._range``), the checkpoint's
``last_key`` is the next block to do, and the run's upper bound is the table's block count at
planning time (rows in blocks added later are not this backfill's). Walking needs no probe: a
batch of ``size`` blocks ends ``size`` blocks on. Everything here is pure except
:func:`relation_blocks` and :func:`plan_shards`'s one catalog read.
"""

from __future__ import annotations

import psycopg

from backfill_api.errors import ValidationFailed
from backfill_worker.checkpoints.checkpoint import PENDING, Key, ShardCheckpoint
from backfill_worker.sql.statements import Target

MIN_SERVER_VERSION = 140000
"""TID Range Scan (``ctid >= ... AND ctid < ...`` without a sequential scan) is PostgreSQL 14's."""
END_OF_ANY_TABLE = 4294967295
"""A block number past every real block (block numbers are 32-bit; 0xFFFFFFFF is never used):
the end of the last shard's verification, which so also counts blocks added during the run."""


def check_server_version(server_version_num: int) -> None:
    """Refuse ``walk: ctid`` where PostgreSQL cannot serve block ranges without a full scan."""
    if server_version_num < MIN_SERVER_VERSION:
        v = server_version_num
        major = str(v // 10000) if v >= 100000 else f"{v // 10000}.{v // 100 % 100}"
        raise ValidationFailed(
            "spec.walk",
            f"walk: ctid needs PostgreSQL 14 or later (TID Range Scan); this server is version {major}, where "
            "every block-range batch would scan the whole table. Use walk: key with a unique key, or upgrade",
        )


def block(key: Key | None) -> int:
    """The block a range bound stands for (None: the table's first block)."""
    return 0 if key is None else int(key[0])


def next_upper(lower: Key | None, run_upper: Key, size: int) -> tuple[Key, int]:
    """The end of the batch of ``size`` blocks after ``lower`` (at most ``run_upper``) and its block count."""
    start, end = block(lower), block(run_upper)
    upper = min(start + max(1, size), end)
    return (str(upper),), max(0, upper - start)


def shard_bounds(blocks: int, shard_count: int) -> list[tuple[Key | None, Key]]:
    """``(lower, upper)`` of every shard: ``blocks`` split into equal consecutive block ranges."""
    uppers = [blocks * (i + 1) // shard_count for i in range(shard_count)]
    return [((str(uppers[i - 1]),) if i > 0 else None, (str(uppers[i]),)) for i in range(shard_count)]


def verification_upper(cp: ShardCheckpoint) -> Key | None:
    """The end of the shard's verification range: its own end, but the last shard's reaches past
    any block, so the shards together count rows matching ``where`` in the whole table."""
    if cp.upper_key is None or cp.shard != cp.shard_count - 1:
        return cp.upper_key
    return (str(END_OF_ANY_TABLE),)


def relation_blocks(conn: psycopg.Connection, target: Target) -> int:
    """The table's main-fork size in blocks, now."""
    row = conn.execute(
        "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::bigint",
        [target.table_identifier.as_string(conn)],
    ).fetchone()
    return int(row[0]) if row else 0


def plan_shards(
    conn: psycopg.Connection, target: Target, *, identity: str, fingerprint: str, shard_count: int
) -> list[ShardCheckpoint]:
    """Every shard's block range; the table's block count now is the run's fixed end."""
    blocks = relation_blocks(conn, target)
    if blocks == 0:
        return [ShardCheckpoint(identity, i, shard_count, fingerprint, None, None, state=PENDING) for i in range(shard_count)]
    return [
        ShardCheckpoint(identity, i, shard_count, fingerprint, lower, upper, estimated_keys=block(upper) - block(lower))
        for i, (lower, upper) in enumerate(shard_bounds(blocks, shard_count))
    ]

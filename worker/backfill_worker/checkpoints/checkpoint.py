"""Where a backfill remembers how far each shard got.

Transactional mode (default, exactly-once): one row per (backfill, shard) in
``<checkpoint.schema>.checkpoints``, updated by the same transaction as the batch's UPDATE, so a
batch and its checkpoint commit or vanish together. The shard bounds and the run's upper key
are stored too, so every runner (and every rerun) walks exactly the same ranges.

At-least-once mode: the same record kept by a :class:`ProgressStore` outside the database
(a JSON file for the CLI, the Backfill status in-cluster), saved after each commit.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from backfill_api.errors import CheckpointUnavailable
from backfill_api.status import ShardState

# The contract's shard states, by their short names here (the checkpoint table stores the values).
PENDING = ShardState.PENDING
RUNNING = ShardState.RUNNING
PAUSED = ShardState.PAUSED
DONE = ShardState.DONE
FAILED = ShardState.FAILED

Key = tuple[str, ...]


@dataclass(frozen=True)
class ShardCheckpoint:
    identity: str
    shard: int
    shard_count: int
    fingerprint: str
    lower_key: Key | None
    """Exclusive lower bound of the shard; None = from the table's first key."""
    upper_key: Key | None
    """Inclusive upper bound (the run's max key for the last shard); None = nothing to do."""
    last_key: Key | None = None
    """Last key of the last committed batch; None = not started."""
    rows_updated: int = 0
    batches: int = 0
    keys_done: int = 0
    estimated_keys: int = 0
    state: ShardState = PENDING
    updated_at: datetime | None = None
    last_error: str | None = None
    """Why the last run failed (state ``failed``); cleared by the next committed batch."""

    @property
    def resume_after(self) -> Key | None:
        return self.last_key if self.last_key is not None else self.lower_key

    @property
    def empty(self) -> bool:
        return self.upper_key is None or (self.lower_key is not None and self.lower_key == self.upper_key)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardCheckpoint:
        keys = {"lower_key", "upper_key", "last_key"}
        values: dict[str, Any] = {k: (tuple(v) if k in keys and v is not None else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        if values.get("updated_at"):
            values["updated_at"] = datetime.fromisoformat(values["updated_at"])
        if "state" in values:
            values["state"] = ShardState(values["state"])
        return cls(**values)

    def after_batch(self, last_key: Key, rows: int, keys: int, done: bool) -> ShardCheckpoint:
        return replace(
            self,
            last_key=last_key,
            rows_updated=self.rows_updated + rows,
            batches=self.batches + 1,
            keys_done=self.keys_done + keys,
            state=DONE if done else RUNNING,
            updated_at=datetime.now(UTC),
        )


class ProgressStore(Protocol):
    """Progress kept outside the database (``checkpoint.mode: atLeastOnce``)."""

    def load(self, shard: int) -> ShardCheckpoint | None: ...

    def save(self, shard: int, state: ShardCheckpoint) -> None: ...


class JsonFileStore:
    """One JSON file per backfill under ``directory`` (the CLI's ``--state-dir``); atomic writes."""

    def __init__(self, directory: str | Path, identity: str) -> None:
        self.path = Path(directory) / (identity.replace("/", "__") + ".json")
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            return data
        except FileNotFoundError:
            return {}

    def load(self, shard: int) -> ShardCheckpoint | None:
        data = self._read().get(str(shard))
        return ShardCheckpoint.from_json(data) if data else None

    def save(self, shard: int, state: ShardCheckpoint) -> None:
        # Shards save from several threads, and `--shard` runs from several processes:
        # read-modify-write under a thread lock and an exclusive lock on a sibling lock file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            data = self._read()
            data[str(shard)] = state.to_json()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1)
            os.replace(tmp, self.path)

    def clear(self) -> int:
        count = len(self._read())
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".lock").unlink(missing_ok=True)
        return count


_COLUMNS = (
    "identity, shard, shard_count, fingerprint, lower_key, upper_key, last_key, rows_updated, batches, "
    "keys_done, estimated_keys, state, updated_at"
)


class CheckpointTable:
    """SQL for ``<schema>.checkpoints``. All identifiers quoted; values always parameters."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.table = sql.Identifier(schema, "checkpoints")

    def exists(self, conn: psycopg.Connection) -> bool:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [self.table.as_string(conn)]).fetchone()
        return bool(row and row[0])

    def ensure(self, conn: psycopg.Connection) -> None:
        """Create schema and table on first use; explain ``atLeastOnce`` when the role may not."""
        try:
            with conn.transaction():
                # Concurrent first runs (several shard workers) would race on the catalog:
                # CREATE ... IF NOT EXISTS is not atomic against a concurrent CREATE (unique
                # violation in pg_namespace / pg_type). Serialise creators on this schema.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('backfill:checkpoints:' || %s))", [self.schema])
                if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [self.schema]).fetchone():
                    # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when it exists.
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                if not self.exists(conn):
                    conn.execute(
                        sql.SQL(
                            """
                            CREATE TABLE IF NOT EXISTS {} (
                                identity text NOT NULL,
                                shard integer NOT NULL,
                                shard_count integer NOT NULL,
                                fingerprint text NOT NULL,
                                lower_key text[],
                                upper_key text[],
                                last_key text[],
                                rows_updated bigint NOT NULL DEFAULT 0,
                                batches bigint NOT NULL DEFAULT 0,
                                keys_done bigint NOT NULL DEFAULT 0,
                                estimated_keys bigint NOT NULL DEFAULT 0,
                                state text NOT NULL,
                                created_at timestamptz NOT NULL DEFAULT now(),
                                updated_at timestamptz NOT NULL DEFAULT now(),
                                last_error text,
                                PRIMARY KEY (identity, shard)
                            )
                            """
                        ).format(self.table)
                    )
                self._add_error_column(conn)
                row = conn.execute(
                    "SELECT has_table_privilege(%s, 'SELECT, INSERT, UPDATE, DELETE')", [self.table.as_string(conn)]
                ).fetchone()
                if not (row and row[0]):
                    raise psycopg.errors.InsufficientPrivilege("permission denied for the checkpoint table")
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction) as error:
            raise CheckpointUnavailable(
                f"cannot create or write the checkpoint table {self.schema}.checkpoints "
                f"({error.diag.message_primary or error}). Either let the role create it "
                f"(GRANT CREATE ON DATABASE, or create schema {self.schema!r} and the table beforehand), "
                "or set spec.checkpoint.mode: atLeastOnce to keep progress outside the database "
                "(a crash may then apply the last batch twice: only for idempotent set expressions)"
            ) from None

    def has_error_column(self, conn: psycopg.Connection) -> bool:
        """Tables created before ``last_error`` existed lack it (and a restricted role may not add it)."""
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'last_error' "
            "AND NOT attisdropped)",
            [self.table.as_string(conn)],
        ).fetchone()
        return bool(row and row[0])

    def _add_error_column(self, conn: psycopg.Connection) -> None:
        if self.has_error_column(conn):
            return
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS last_error text").format(self.table))
        except psycopg.errors.InsufficientPrivilege:  # a DBA-made table: failures then show without their reason
            pass

    def load(self, conn: psycopg.Connection, identity: str) -> list[ShardCheckpoint]:
        if not self.exists(conn):
            return []
        error = sql.SQL(", last_error") if self.has_error_column(conn) else sql.SQL(", NULL AS last_error")
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                sql.SQL("SELECT {}{} FROM {} WHERE identity = %s ORDER BY shard").format(sql.SQL(_COLUMNS), error, self.table),
                [identity],
            ).fetchall()
        return [_from_row(row) for row in rows]

    def insert_plan(self, conn: psycopg.Connection, shards: list[ShardCheckpoint]) -> None:
        """Insert the planned shard rows unless another runner already did (first planner wins)."""
        for cp in shards:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (identity, shard, shard_count, fingerprint, lower_key, upper_key, estimated_keys, state) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (identity, shard) DO NOTHING"
                ).format(self.table),
                [cp.identity, cp.shard, cp.shard_count, cp.fingerprint, _arr(cp.lower_key), _arr(cp.upper_key), cp.estimated_keys, cp.state],
            )

    def record_batch_statement(self) -> sql.Composed:
        """Params: last_key, rows, keys, state, identity, shard. Runs inside the batch's transaction."""
        return sql.SQL(
            "UPDATE {} SET last_key = %s, rows_updated = rows_updated + %s, batches = batches + 1, "
            "keys_done = keys_done + %s, state = %s, updated_at = now() WHERE identity = %s AND shard = %s"
        ).format(self.table)

    def set_state(self, conn: psycopg.Connection, identity: str, shard: int, state: ShardState, error: str | None = None) -> None:
        """Label the shard (never a ``done`` one); ``last_error`` is set to ``error`` (None clears it)."""
        error_column = sql.SQL(", last_error = %s") if self.has_error_column(conn) else sql.SQL("")
        params: list[object] = [state, *([error] if self.has_error_column(conn) else []), identity, shard, DONE]
        conn.execute(
            sql.SQL("UPDATE {} SET state = %s{}, updated_at = now() WHERE identity = %s AND shard = %s AND state <> %s").format(
                self.table, error_column
            ),
            params,
        )

    def delete(self, conn: psycopg.Connection, identity: str) -> int:
        if not self.exists(conn):
            return 0
        cur = conn.execute(sql.SQL("DELETE FROM {} WHERE identity = %s").format(self.table), [identity])
        return cur.rowcount


def _arr(key: Key | None) -> list[str] | None:
    return list(key) if key is not None else None


def _key(value: list[str] | None) -> Key | None:
    return tuple(value) if value is not None else None


def _from_row(row: dict[str, Any]) -> ShardCheckpoint:
    return ShardCheckpoint(
        identity=row["identity"],
        shard=row["shard"],
        shard_count=row["shard_count"],
        fingerprint=row["fingerprint"],
        lower_key=_key(row["lower_key"]),
        upper_key=_key(row["upper_key"]),
        last_key=_key(row["last_key"]),
        rows_updated=row["rows_updated"],
        batches=row["batches"],
        keys_done=row["keys_done"],
        estimated_keys=row["estimated_keys"],
        state=ShardState(row["state"]),
        updated_at=row["updated_at"],
        last_error=row.get("last_error"),
    )

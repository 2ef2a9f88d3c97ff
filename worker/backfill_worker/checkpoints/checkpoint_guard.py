"""Refuse to start a backfill afresh when its progress is recorded somewhere else.

A fresh start re-applies ``set`` to every matching row, so it must never happen by accident.
The fields of the change itself (``FINGERPRINT_FIELDS``) are hashed into every checkpoint:
another value is refused as ``CheckpointMismatch``. The fields that decide *where* progress is
looked up cannot be caught that way, because under a new location the old checkpoint is simply
not found. So before planning a new run, the engine looks for this backfill's progress (same
identity, or the same fingerprint under another identity) in every checkpoint table it may read,
and the CLI looks in its ``--state-dir``. ``CLI_GUARDS`` maps the cluster's list of immutable
fields (``api.IMMUTABLE_SPEC_FIELDS``, which the operator's ``specdiff`` enforces) to the guard
that covers each one locally; a test keeps the two lists equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_api.errors import CheckpointMismatch
from backfill_api.model import Backfill
from backfill_worker.checkpoints.checkpoint import ProgressStore

FINGERPRINT_FIELDS = ("table", "key", "walk", "set", "delete", "copy", "from", "handler", "where", "parallelism")
"""Hashed into ``BackfillSpec.fingerprint()``: another value -> CheckpointMismatch."""

CLI_GUARDS: dict[str, str] = {
    **{field: "fingerprint: a checkpoint of another fingerprint is not resumed" for field in FINGERPRINT_FIELDS},
    "checkpoint": "location scan: progress of this backfill in another schema, or in the --state-dir, is refused",
    "database": "none needed: the checkpoint lives in the database it describes, so another database has its own",
}
"""How the CLI guards each of ``api.IMMUTABLE_SPEC_FIELDS`` (``metadata.name``/``namespace``,
the identity, are covered by the location scan's fingerprint match)."""


@dataclass(frozen=True)
class Found:
    schema: str
    identity: str
    state: str
    rows_updated: int


_TABLES = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = 'checkpoints' AND c.relkind IN ('r', 'p') AND has_table_privilege(c.oid, 'SELECT')
  AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped
       AND a.attname IN ('identity', 'fingerprint', 'state', 'rows_updated')) = 4
ORDER BY n.nspname
"""


def find_elsewhere(conn: psycopg.Connection, identity: str, fingerprint: str, current_schema: str | None) -> list[Found]:
    """Checkpoint rows of ``identity`` outside ``current_schema``, and rows of ``fingerprint`` under
    another identity anywhere (``current_schema`` None: the current location is not a table)."""
    found: list[Found] = []
    for (schema,) in conn.execute(_TABLES).fetchall():
        rows = conn.execute(
            sql.SQL(
                "SELECT identity, state, sum(rows_updated)::bigint FROM {} WHERE identity = %s OR fingerprint = %s "
                "GROUP BY identity, state ORDER BY identity, state"
            ).format(sql.Identifier(schema, "checkpoints")),
            [identity, fingerprint],
        ).fetchall()
        for other, state, rows_updated in rows:
            if other == identity and schema == current_schema:
                continue  # the checkpoint at the current location: the engine resumes it
            found.append(Found(schema, other, state, int(rows_updated or 0)))
    return found


def describe(found: Found, identity: str) -> str:
    """PURE: the refusal for one stray checkpoint, with the ways out."""
    where = f"exists in schema {found.schema!r} (state {found.state}, {found.rows_updated:,} rows updated)"
    if found.identity == identity:
        return (
            f"a checkpoint for backfill {identity} {where}, but spec.checkpoint now points elsewhere: starting over "
            f"would apply the change twice. Set spec.checkpoint.schema back to {found.schema!r} "
            "(and spec.checkpoint.mode back to transactional), or `backfill reset` it there "
            f"(with spec.checkpoint.schema: {found.schema}) to start over deliberately"
        )
    return (
        f"a checkpoint for the same change ({', '.join(FINGERPRINT_FIELDS)}) under backfill {found.identity} {where}: "
        f"running it again as {identity} would apply the change twice. Set metadata.namespace/name back to "
        f"{found.identity}, or `backfill reset` that backfill to start over deliberately"
    )


def refuse_if_elsewhere(conn: psycopg.Connection, backfill: Backfill, current_schema: str | None) -> None:
    """Raise CheckpointMismatch when this backfill's progress lives somewhere it would not be resumed from."""
    strays = find_elsewhere(conn, backfill.identity, backfill.spec.fingerprint(), current_schema)
    if strays:
        raise CheckpointMismatch(describe(strays[0], backfill.identity))


def refuse_file_progress(store: ProgressStore, backfill: Backfill) -> None:
    """Transactional mode, but an ``atLeastOnce`` progress file of this backfill exists (CLI)."""
    saved = [cp for shard in range(backfill.spec.parallelism) if (cp := store.load(shard)) is not None]
    if saved:
        path = getattr(store, "path", "the state directory")
        raise CheckpointMismatch(
            f"a progress file for backfill {backfill.identity} exists ({path}, {sum(cp.rows_updated for cp in saved):,} "
            "rows updated under spec.checkpoint.mode: atLeastOnce): starting over in transactional mode would apply "
            "the change twice. Set spec.checkpoint.mode back to atLeastOnce, or `backfill reset` it in that mode to "
            "start over deliberately"
        )

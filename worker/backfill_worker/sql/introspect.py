"""Catalog lookups: the target table, its columns and the unique indexes that can drive keysets.

Read-only queries against ``pg_catalog``; names are compared as exact strings (the manifest's
``identifiers`` module already folded unquoted names to lower case), never interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from backfill_api.identifiers import QualifiedName

if TYPE_CHECKING:
    from backfill_worker.sql.statements import Target


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    generated: bool


@dataclass(frozen=True)
class UniqueIndex:
    name: str
    columns: tuple[str, ...]
    primary: bool
    usable: bool
    """Valid, btree, not partial, plain columns only, ascending: fit to walk a keyset."""
    order_problem: str | None = None
    """Why the index cannot serve the key's ordering although ``usable`` (another collation than
    the column's, or a non-default operator class such as ``text_pattern_ops``); None if it can."""


@dataclass(frozen=True)
class TableInfo:
    oid: int
    schema: str
    name: str
    kind: str
    """``pg_class.relkind``: ``r`` table, ``p`` partitioned table, ``v`` view, ..."""
    columns: dict[str, Column]
    unique_indexes: tuple[UniqueIndex, ...]
    estimated_rows: int
    """``pg_class.reltuples`` (-1 when never analyzed; summed over partitions)."""


_KIND_NAMES = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "i": "an index",
    "I": "a partitioned index",
    "c": "a composite type",
    "t": "a TOAST table",
}


def kind_name(kind: str) -> str:
    return _KIND_NAMES.get(kind, f"a relation of kind {kind!r}")


def find_table(conn: psycopg.Connection, name: QualifiedName) -> TableInfo | None:
    """Resolve ``name`` like PostgreSQL would (the search path when unqualified)."""
    if name.schema is None:
        row = conn.execute(
            """
            SELECT c.oid, n.nspname, c.relname, c.relkind
            FROM unnest(current_schemas(false)) WITH ORDINALITY AS s(nspname, position)
            JOIN pg_namespace n ON n.nspname = s.nspname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s
            ORDER BY s.position LIMIT 1
            """,
            [name.name],
        ).fetchone()
    else:
        row = conn.execute(
            """
            SELECT c.oid, n.nspname, c.relname, c.relkind
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %s AND c.relname = %s
            """,
            [name.schema, name.name],
        ).fetchone()
    if row is None:
        return None
    oid, schema, relname, kind = row
    return TableInfo(
        oid=oid,
        schema=schema,
        name=relname,
        kind=kind,
        columns=_columns(conn, oid),
        unique_indexes=_unique_indexes(conn, oid),
        estimated_rows=_estimated_rows(conn, oid),
    )


def _columns(conn: psycopg.Connection, oid: int) -> dict[str, Column]:
    rows = conn.execute(
        """
        SELECT attname, format_type(atttypid, atttypmod), attnotnull, attgenerated <> ''
        FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum
        """,
        [oid],
    ).fetchall()
    return {name: Column(name, type_, not_null, generated) for name, type_, not_null, generated in rows}


def _unique_indexes(conn: psycopg.Connection, oid: int) -> tuple[UniqueIndex, ...]:
    rows = conn.execute(
        """
        SELECT ic.relname, i.indisprimary,
               array(SELECT a.attname FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord),
               i.indisvalid AND i.indisready AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
                 AND am.amname = 'btree' AND 0 <> ALL (i.indkey[0:i.indnkeyatts - 1])
                 AND (SELECT coalesce(bool_and(o = 0), true) FROM unnest(i.indoption::int2[]) AS o),
               (SELECT string_agg(CASE
                         WHEN k.coll <> a.attcollation THEN format(
                           'column %%I is compared with collation %%s in the index but %%s in the table',
                           a.attname, (SELECT quote_ident(collname) FROM pg_collation WHERE oid = k.coll),
                           (SELECT quote_ident(collname) FROM pg_collation WHERE oid = a.attcollation))
                         WHEN NOT opc.opcdefault THEN format(
                           'column %%I uses the operator class %%s, not the default one of its type',
                           a.attname, opc.opcname)
                       END, '; ' ORDER BY k.ord)
                FROM unnest(i.indkey[0:i.indnkeyatts - 1], i.indcollation::oid[], i.indclass::oid[])
                       WITH ORDINALITY AS k(attnum, coll, opclass, ord)
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                JOIN pg_opclass opc ON opc.oid = k.opclass)
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = %s AND i.indisunique
        ORDER BY i.indisprimary DESC, ic.relname
        """,
        [oid],
    ).fetchall()
    return tuple(
        UniqueIndex(name, tuple(columns), primary, usable, problem) for name, primary, columns, usable, problem in rows
    )


def _estimated_rows(conn: psycopg.Connection, oid: int) -> int:
    row = conn.execute(
        """
        SELECT CASE WHEN c.relkind = 'p'
                    THEN (SELECT coalesce(sum(greatest(p.reltuples, 0)), -1)::bigint
                          FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhrelid WHERE h.inhparent = c.oid)
                    ELSE c.reltuples::bigint END
        FROM pg_class c WHERE c.oid = %s
        """,
        [oid],
    ).fetchone()
    return int(row[0]) if row else -1


_HIERARCHY = """
WITH RECURSIVE tree(oid) AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = %(table)s
    UNION SELECT h.inhrelid FROM pg_inherits h JOIN tree ON h.inhparent = tree.oid
)
"""
"""``tree``: the table named by ``%(schema)s``/``%(table)s``, its partitions and inheritance children, recursively."""


def hierarchy_blocks(conn: psycopg.Connection, target: Target) -> int:
    """Main-fork blocks of the target table, its partitions and inheritance children, now."""
    row = conn.execute(
        _HIERARCHY + "SELECT coalesce(sum(pg_relation_size(oid)), 0) / current_setting('block_size')::bigint FROM tree",
        {"schema": target.schema, "table": target.table},
    ).fetchone()
    return int(row[0]) if row else 0


def hierarchy_key_indexes(conn: psycopg.Connection, target: Target) -> dict[str, frozenset[str]]:
    """The target table, its partitions and inheritance children (recursively), each with its
    btree indexes whose leading columns are the key columns in order, in the key's collations
    and default operator classes: the indexes that can serve a batch's key walk on it."""
    rows = conn.execute(
        _HIERARCHY + """
        SELECT c.relname,
               array(SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                     JOIN pg_am am ON am.oid = ic.relam
                     WHERE i.indrelid = c.oid AND am.amname = 'btree' AND i.indpred IS NULL AND i.indexprs IS NULL
                       AND i.indnkeyatts >= cardinality(%(key)s::text[])
                       AND (SELECT bool_and(a.attname = (%(key)s::text[])[k.ord] AND k.coll = a.attcollation AND opc.opcdefault)
                            FROM unnest(i.indkey[0:cardinality(%(key)s::text[]) - 1], i.indcollation::oid[], i.indclass::oid[])
                                   WITH ORDINALITY AS k(attnum, coll, opclass, ord)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                            JOIN pg_opclass opc ON opc.oid = k.opclass
                            WHERE k.ord <= cardinality(%(key)s::text[])))
        FROM tree JOIN pg_class c ON c.oid = tree.oid
        """,
        {"schema": target.schema, "table": target.table, "key": list(target.key)},
    ).fetchall()
    found = {name: frozenset(indexes) for name, indexes in rows}
    return {**found, target.table: found.get(target.table, frozenset()) | {target.key_index}}


# -- what a plan warns about (planner / plan_warnings) -----------------------------------------


@dataclass(frozen=True)
class ReferencingKey:
    """A foreign key of another table (the child) that references the target."""

    constraint: str
    child_schema: str
    child_table: str
    columns: tuple[str, ...]
    """The child's columns, in the constraint's order."""
    referenced_columns: tuple[str, ...]
    """The target's columns they reference."""
    on_delete: str
    """``pg_constraint.confdeltype``: ``a`` no action, ``r`` restrict, ``c`` cascade, ``n`` set null, ``d`` set default."""
    on_update: str
    indexed: bool
    """An index of the child (valid, not partial) leads with exactly these columns (any order)."""
    child_rows: int
    """``reltuples`` of the child (summed over its partitions; -1 never analyzed)."""
    child_blocks: int
    """Main-fork blocks of the child (and its partitions), now."""


def referencing_keys(conn: psycopg.Connection, oid: int) -> tuple[ReferencingKey, ...]:
    """Foreign keys that reference table ``oid`` (top-level constraints: a partitioned child's
    clones on its partitions are one key), with whether the child can find the referencing rows
    through an index."""
    rows = conn.execute(
        """
        SELECT con.conname, n.nspname, c.relname,
               array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
               array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord),
               con.confdeltype::text, con.confupdtype::text,
               EXISTS (SELECT 1 FROM pg_index i
                       WHERE i.indrelid = con.conrelid AND i.indisvalid AND i.indpred IS NULL
                         AND i.indnkeyatts >= cardinality(con.conkey)
                         AND i.indkey[0:cardinality(con.conkey) - 1] @> con.conkey
                         AND con.conkey @> i.indkey[0:cardinality(con.conkey) - 1]),
               CASE WHEN c.relkind = 'p'
                    THEN (SELECT coalesce(sum(greatest(p.reltuples, 0)), -1)::bigint
                          FROM pg_partition_tree(c.oid) t JOIN pg_class p ON p.oid = t.relid WHERE t.isleaf)
                    ELSE c.reltuples::bigint END,
               CASE WHEN c.relkind = 'p'
                    THEN (SELECT coalesce(sum(pg_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t)
                    ELSE pg_relation_size(c.oid) END / current_setting('block_size')::bigint
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE con.contype = 'f' AND con.confrelid = %s AND con.conparentid = 0
        ORDER BY n.nspname, c.relname, con.conname
        """,
        [oid],
    ).fetchall()
    return tuple(
        ReferencingKey(name, schema, table, tuple(cols), tuple(refs), on_delete, on_update, indexed, int(rows_), int(blocks_))
        for name, schema, table, cols, refs, on_delete, on_update, indexed, rows_, blocks_ in rows
    )


@dataclass(frozen=True)
class TableTrigger:
    name: str
    timing: str
    """``BEFORE``, ``AFTER`` or ``INSTEAD OF``."""
    events: tuple[str, ...]
    """``INSERT``, ``UPDATE``, ``DELETE``, ``TRUNCATE``."""
    per_row: bool
    columns: tuple[str, ...]
    """``UPDATE OF`` columns (empty: any column)."""
    function: str


def triggers(conn: psycopg.Connection, oid: int) -> tuple[TableTrigger, ...]:
    """User triggers of table ``oid`` that fire in an ordinary session (enabled ``O`` or ``A``)."""
    rows = conn.execute(
        """
        SELECT t.tgname, t.tgtype::int,
               array(SELECT a.attname FROM unnest(t.tgattr::int2[]) AS k(attnum)
                     JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k.attnum),
               t.tgfoid::regproc::text
        FROM pg_trigger t
        WHERE t.tgrelid = %s AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')
        ORDER BY t.tgname
        """,
        [oid],
    ).fetchall()
    found = []
    for name, tgtype, columns, function in rows:
        timing = "INSTEAD OF" if tgtype & 64 else "BEFORE" if tgtype & 2 else "AFTER"
        events = tuple(event for bit, event in ((4, "INSERT"), (16, "UPDATE"), (8, "DELETE"), (32, "TRUNCATE")) if tgtype & bit)
        found.append(TableTrigger(name, timing, events, bool(tgtype & 1), tuple(columns), function))
    return tuple(found)


@dataclass(frozen=True)
class VacuumSettings:
    """What decides when and how fast autovacuum cleans the table (its reloptions, else the server's)."""

    enabled: bool
    """``autovacuum`` and ``track_counts`` on, and the table's ``autovacuum_enabled`` not false."""
    threshold: int
    """``autovacuum_vacuum_threshold``."""
    scale_factor: float
    """``autovacuum_vacuum_scale_factor``."""
    cost_delay_ms: float
    cost_limit: int
    page_cost: int
    """``vacuum_cost_page_miss`` + ``vacuum_cost_page_dirty``: a page a backfill dirtied costs both."""
    table_rows: int
    table_blocks: int


def vacuum_settings(conn: psycopg.Connection, oid: int) -> VacuumSettings:
    row = conn.execute(
        """
        WITH rel AS (SELECT option_name, option_value FROM pg_class c, pg_options_to_table(c.reloptions) WHERE c.oid = %(oid)s),
        opt AS (SELECT name, coalesce((SELECT option_value FROM rel WHERE option_name = name), current_setting(name)) AS value
                FROM unnest(array['autovacuum_vacuum_threshold', 'autovacuum_vacuum_scale_factor',
                                  'autovacuum_vacuum_cost_delay', 'autovacuum_vacuum_cost_limit']) AS name)
        SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool
                 AND coalesce((SELECT option_value FROM rel WHERE option_name = 'autovacuum_enabled')::bool, true),
               (SELECT value FROM opt WHERE name = 'autovacuum_vacuum_threshold')::int,
               (SELECT value FROM opt WHERE name = 'autovacuum_vacuum_scale_factor')::float8,
               (SELECT value FROM opt WHERE name = 'autovacuum_vacuum_cost_delay'),
               (SELECT value FROM opt WHERE name = 'autovacuum_vacuum_cost_limit')::int,
               current_setting('vacuum_cost_delay'), current_setting('vacuum_cost_limit')::int,
               current_setting('vacuum_cost_page_miss')::int + current_setting('vacuum_cost_page_dirty')::int,
               greatest(c.reltuples, 0)::bigint, pg_relation_size(c.oid) / current_setting('block_size')::bigint
        FROM pg_class c WHERE c.oid = %(oid)s
        """,
        {"oid": oid},
    ).fetchone()
    assert row is not None
    enabled, threshold, scale, delay, limit, base_delay, base_limit, page_cost, rows, blocks = row
    delay_ms = _milliseconds(delay)
    return VacuumSettings(
        enabled=bool(enabled), threshold=int(threshold), scale_factor=float(scale),
        cost_delay_ms=_milliseconds(base_delay) if delay_ms < 0 else delay_ms,
        cost_limit=int(base_limit) if int(limit) < 0 else int(limit),
        page_cost=int(page_cost), table_rows=int(rows), table_blocks=int(blocks),
    )


def _milliseconds(setting: str) -> float:
    """A ``*_cost_delay`` as ``current_setting`` prints it (``2ms``, ``0``, ``-1``) or a reloption (``20``)."""
    text = setting.strip()
    for unit, factor in (("ms", 1.0), ("us", 0.001), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)

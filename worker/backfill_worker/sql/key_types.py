"""Which key types the engine can carry exactly (checked at validation, field ``spec.key``).

Keys travel as text parameters and are stored as text in the checkpoint, so a key type is
usable only if its text form reads back to an equal value under the pinned session settings
(``session_settings.py``). That is known for the built-in scalar types below, string types,
enums, and domains, arrays, ranges and composites built from them. An extension's or user's
base type (``cube``, ``hstore``, a C type) may print lossily: it is refused, naming the type.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

EXACT_BUILTINS = frozenset(
    {
        "int2", "int4", "int8", "oid", "xid8", "numeric", "float4", "float8", "money", "bool",
        "text", "varchar", "bpchar", "name", "char", "bytea", "uuid",
        "date", "time", "timetz", "timestamp", "timestamptz", "interval",
        "inet", "cidr", "macaddr", "macaddr8", "bit", "varbit", "pg_lsn", "jsonb",
    }
)
"""Built-in (``pg_catalog``) base types whose text output, under the pinned settings, reads back
to an equal value (floats: ``extra_float_digits`` > 0 prints the shortest exact form)."""


@dataclass(frozen=True)
class TypeRow:
    """What decides exactness, from ``pg_type``."""

    oid: int
    display: str
    schema: str
    name: str
    kind: str
    """``typtype``: b base, c composite, d domain, e enum, r range, m multirange."""
    category: str
    element: int
    """Array element type (0 if none)."""


def verdict(row: TypeRow) -> tuple[bool, list[int]]:
    """PURE: ``(acceptable_so_far, types_to_check_next)`` for one type."""
    if row.kind == "e":
        return True, []
    if row.kind in ("d", "c", "r", "m"):
        return True, []  # the caller expands them into their parts
    if row.element:
        return True, [row.element]
    if row.schema == "pg_catalog" and row.name in EXACT_BUILTINS:
        return True, []
    # String-category types (citext, a varchar-like extension type): their text is their value.
    return row.category == "S", []


_TYPE_QUERY = """
SELECT t.oid, format_type(t.oid, NULL), n.nspname, t.typname, t.typtype, t.typcategory,
       CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0 END,
       CASE t.typtype WHEN 'd' THEN ARRAY[t.typbasetype]
                      WHEN 'r' THEN ARRAY(SELECT rngsubtype FROM pg_range WHERE rngtypid = t.oid)
                      WHEN 'm' THEN ARRAY(SELECT rngsubtype FROM pg_range WHERE rngmultitypid = t.oid)
                      WHEN 'c' THEN ARRAY(SELECT atttypid FROM pg_attribute
                                          WHERE attrelid = t.typrelid AND attnum > 0 AND NOT attisdropped)
                      ELSE ARRAY[]::oid[] END
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %s
"""


def first_inexact(conn: psycopg.Connection, type_oid: int) -> str | None:
    """The (innermost) type that cannot be carried exactly, or None when ``type_oid`` can."""
    todo, seen = [type_oid], set()
    while todo:
        oid = todo.pop()
        if oid in seen:
            continue
        seen.add(oid)
        found = conn.execute(_TYPE_QUERY, [oid]).fetchone()
        if found is None:
            return f"type oid {oid}"
        row = TypeRow(*found[:7])
        ok, more = verdict(row)
        if not ok:
            return row.display
        todo.extend(more)
        todo.extend(int(part) for part in found[7])
    return None


def column_type_oids(conn: psycopg.Connection, table_oid: int, columns: tuple[str, ...]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s AND attname = ANY(%s)", [table_oid, list(columns)]
    ).fetchall()
    return {name: int(oid) for name, oid in rows}

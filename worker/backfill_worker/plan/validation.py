"""Everything checked before the first write: a bad spec changes zero rows.

Each failure is a :class:`ValidationFailed` naming the spec field to fix. The SQL fragments are
compiled with ``EXPLAIN`` / ``LIMIT 0`` inside a transaction that is always rolled back.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from backfill_api.errors import ValidationFailed
from backfill_api.identifiers import QualifiedName
from backfill_api.model import BackfillSpec, ChangeKind, ConflictPolicy, CopySpec, FromTable, Walk
from backfill_worker.changes import changes
from backfill_worker.sql import blocks, key_types, statements
from backfill_worker.sql.introspect import TableInfo, UniqueIndex, find_table, kind_name
from backfill_worker.sql.secrets import redact
from backfill_worker.sql.statements import CopyInto, Join, Target

VALIDATION_STATEMENT_TIMEOUT = "30s"


def _table(conn: psycopg.Connection, name: QualifiedName, text: str, field: str) -> TableInfo:
    """A table (plain or partitioned) by its manifest name, or ValidationFailed naming ``field``."""
    table = find_table(conn, name)
    if table is None:
        where = "in the search path" if name.schema is None else "in that schema"
        raise ValidationFailed(
            field, f"table {text!r} not found {where}: check the name (quote mixed-case names, e.g. '\"MyTable\"')"
        )
    if table.kind not in ("r", "p"):
        raise ValidationFailed(field, f"{table.schema}.{table.name} is {kind_name(table.kind)}, not a table")
    return table


def resolve_target(conn: psycopg.Connection, spec: BackfillSpec) -> Target:
    """Table, key and columns from the catalog; raises ValidationFailed naming the field."""
    table = _table(conn, spec.qualified_table, spec.table, "spec.table")
    if spec.walk is Walk.CTID:
        return _block_target(conn, spec, table)
    index = _key_index(table, spec.key)
    key = index.columns
    for column in key:
        if not table.columns[column].not_null:
            raise ValidationFailed(
                "spec.key",
                f"key column {column!r} is nullable: rows with NULL keys would be skipped; add NOT NULL or choose another key",
            )
    _check_key_types(conn, table, key)
    _check_set_columns(spec, table, key)
    return Target(
        schema=table.schema,
        table=table.name,
        key=key,
        key_index=index.name,
        set=tuple((spec.set or {}).items()),
        where=spec.where,
        key_types=tuple(table.columns[c].type for c in key),
        joins=tuple(_resolve_join(conn, table, number, item) for number, item in enumerate(spec.from_ or ())),
        copy=None if spec.copy_ is None else _resolve_copy(conn, table, spec.copy_),
        kind=spec.kind,
    )


def _resolve_join(conn: psycopg.Connection, target: TableInfo, number: int, item: FromTable) -> Join:
    field = f"spec.from[{number}]"
    table = _table(conn, item.qualified_table, item.table, f"{field}.table")
    alias = item.alias or table.name
    if alias == target.name:
        raise ValidationFailed(
            f"{field}.alias", f"{alias!r} is the target table's own name (which the fragments use for it): give the joined table another alias"
        )
    return Join(table.schema, table.name, alias, item.condition)


def _resolve_copy(conn: psycopg.Connection, source: TableInfo, copy: CopySpec) -> CopyInto:
    """The copy target, its columns (each with its expression over the source) and its conflict key."""
    table = _table(conn, copy.qualified_table, copy.table, "spec.copy.table")
    if table.oid == source.oid:
        raise ValidationFailed("spec.copy.table", "the copy target is the source table itself: name another table")
    if copy.columns is None:
        columns: tuple[tuple[str, str | None], ...] = tuple(
            (name, None) for name, column in table.columns.items() if name in source.columns and not column.generated
        )
        if not columns:
            raise ValidationFailed(
                "spec.copy.columns",
                f"{table.schema}.{table.name} has no column named like one of {source.schema}.{source.name}: "
                "map them with spec.copy.columns (target column: SQL expression over the source row)",
            )
    else:
        for name in copy.columns:
            if name not in table.columns:
                raise ValidationFailed(f"spec.copy.columns.{name}", f"column {name!r} does not exist in {table.schema}.{table.name}")
            if table.columns[name].generated:
                raise ValidationFailed(f"spec.copy.columns.{name}", f"column {name!r} is a generated column and cannot be written")
        columns = tuple(copy.columns.items())
    conflict_key = _conflict_key(table, copy, tuple(name for name, _ in columns))
    return CopyInto(table.schema, table.name, columns, conflict_key, copy.on_conflict == ConflictPolicy.UPDATE)


def _conflict_key(table: TableInfo, copy: CopySpec, copied: tuple[str, ...]) -> tuple[str, ...]:
    """The target columns the conflict policy (and the verification) match on: a unique index's."""
    field = "spec.copy.conflictKey"
    display = f"{table.schema}.{table.name}"
    if copy.conflict_key is None:
        primary = next((index for index in table.unique_indexes if index.primary), None)
        if primary is None:
            raise ValidationFailed(
                field,
                f"{display} has no primary key, so a rerun could not recognise rows it already holds: name the columns of "
                "a unique index in spec.copy.conflictKey, or create one (a copy target without a unique key is refused)",
            )
        key = primary.columns
    else:
        key = tuple(copy.conflict_key)
    for column in key:
        if column not in table.columns:
            raise ValidationFailed(field, f"column {column!r} does not exist in {display}")
        if column not in copied:
            raise ValidationFailed(field, f"conflict key column {column!r} is not among the copied columns: add it to spec.copy.columns")
        if not table.columns[column].not_null:
            raise ValidationFailed(
                field, f"conflict key column {column!r} of {display} is nullable: rows with NULL would never conflict; add NOT NULL"
            )
    if not any(index.usable and set(index.columns) == set(key) for index in table.unique_indexes):
        raise ValidationFailed(
            field,
            f"no unique index of {display} covers exactly {list(key)}: ON CONFLICT needs one (and without it a copy "
            f"could duplicate rows); create it, e.g. CREATE UNIQUE INDEX ON {display} ({', '.join(key)})",
        )
    return key


def _block_target(conn: psycopg.Connection, spec: BackfillSpec, table: TableInfo) -> Target:
    """``walk: ctid``: no key; PostgreSQL >= 14 and a plain table (block numbers are per relation)."""
    blocks.check_server_version(conn.info.server_version)
    if table.kind != "r":
        raise ValidationFailed(
            "spec.walk",
            f"{table.schema}.{table.name} is partitioned: block numbers belong to each partition, so walk: ctid "
            "cannot range over the parent. Run one backfill per partition (spec.table: the partition)",
        )
    _check_set_columns(spec, table, ())
    return Target(
        schema=table.schema, table=table.name, key=(), key_index="", set=tuple((spec.set or {}).items()),
        where=spec.where, by_ctid=True,
        joins=tuple(_resolve_join(conn, table, number, item) for number, item in enumerate(spec.from_ or ())),
        copy=None if spec.copy_ is None else _resolve_copy(conn, table, spec.copy_),
        kind=spec.kind,
    )


def _check_set_columns(spec: BackfillSpec, table: TableInfo, key: tuple[str, ...]) -> None:
    for column in spec.set or {}:
        if column not in table.columns:
            raise ValidationFailed(f"spec.set.{column}", f"column {column!r} does not exist in {table.schema}.{table.name}")
        if column in key:
            raise ValidationFailed(
                f"spec.set.{column}", f"column {column!r} is part of the key {list(key)}: the key must not change during a backfill"
            )
        if table.columns[column].generated:
            raise ValidationFailed(f"spec.set.{column}", f"column {column!r} is a generated column and cannot be set")


def _check_key_types(conn: psycopg.Connection, table: TableInfo, key: tuple[str, ...]) -> None:
    oids = key_types.column_type_oids(conn, table.oid, key)
    for column in key:
        inexact = key_types.first_inexact(conn, oids[column])
        if inexact is not None:
            raise ValidationFailed(
                "spec.key",
                f"key column {column!r} is of type {table.columns[column].type}, and values of type {inexact} are not known "
                "to read back exactly from their text form (keys are carried and checkpointed as text): rows could be "
                "skipped or changed twice. Use a key of an exact type (integer, bigint, numeric, text, uuid, date, "
                "timestamp, timestamptz, or a composite of those), e.g. a unique index on another column",
            )


def _key_index(table: TableInfo, key: list[str] | None) -> UniqueIndex:
    usable = [index for index in table.unique_indexes if index.usable]
    if key is None:
        primary = next((index for index in table.unique_indexes if index.primary), None)
        if primary is None:
            raise ValidationFailed(
                "spec.key", f"{table.schema}.{table.name} has no primary key: set spec.key to columns covered by a unique index"
            )
        if not primary.usable:
            raise ValidationFailed(
                "spec.key", f"the primary key {primary.name} cannot drive a keyset walk: set spec.key to another unique index's columns"
            )
        key = list(primary.columns)
    for column in key:
        if column not in table.columns:
            raise ValidationFailed("spec.key", f"key column {column!r} does not exist in {table.schema}.{table.name}")
    covering = [index for index in usable if set(index.columns) == set(key)]
    serving = [index for index in covering if index.order_problem is None]
    if serving:
        return serving[0]
    if covering:
        index = covering[0]
        raise ValidationFailed(
            "spec.key",
            f"the unique index {index.name} cannot serve the key's order: {index.order_problem}. Every batch compares "
            "keys with the column's collation and its type's default operators, so this index would not be used and "
            "each batch would scan the whole table. Create a unique index that can, e.g. "
            f"CREATE UNIQUE INDEX ON {table.schema}.{table.name} ({', '.join(index.columns)}), "
            "or give the column the index's collation",
        )
    raise ValidationFailed(
        "spec.key",
        f"no unique index covers exactly {key} (a key must be unique: rows would be skipped or repeated); "
        "use the primary key or create a unique index on these columns",
    )


def check_permissions(conn: psycopg.Connection, target: Target) -> None:
    """UPDATE/SELECT privileges and a writable (non-replica, non-read-only) session."""
    read_only, in_recovery = conn.execute("SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()").fetchone()  # type: ignore[misc]
    if in_recovery:
        raise ValidationFailed("spec.database", "the server is a read-only replica: point the DSN at the primary")
    if read_only:
        raise ValidationFailed("spec.database", "the session is read-only (default_transaction_read_only): use a writable role or database")
    table = target.table_identifier.as_string(conn)
    needed = {
        ChangeKind.SET: "SELECT, UPDATE", ChangeKind.DELETE: "SELECT, DELETE", ChangeKind.COPY: "SELECT",
        ChangeKind.HANDLER: "SELECT, UPDATE",
    }[target.kind]
    if not _has_privilege(conn, table, None, "SELECT"):
        raise ValidationFailed("spec.table", f"the role lacks SELECT on {target.display_table}: GRANT {needed} to it")
    if target.kind == ChangeKind.HANDLER:  # its rows() locks them FOR NO KEY UPDATE, which needs UPDATE on some column
        allowed = conn.execute("SELECT has_any_column_privilege(%s, 'UPDATE')", [table]).fetchone()[0]  # type: ignore[index]
        if not allowed:
            raise ValidationFailed("spec.handler", f"the role lacks UPDATE on {target.display_table}: GRANT UPDATE to it")
    for column, _ in target.set:
        if not _has_privilege(conn, table, column, "UPDATE"):
            raise ValidationFailed(f"spec.set.{column}", f"the role lacks UPDATE on {target.display_table}({column}): GRANT UPDATE to it")
    if target.kind == ChangeKind.DELETE and not _has_privilege(conn, table, None, "DELETE"):
        raise ValidationFailed("spec.delete", f"the role lacks DELETE on {target.display_table}: GRANT DELETE to it")
    for number, join in enumerate(target.joins):
        if not _has_privilege(conn, sql.Identifier(join.schema, join.table).as_string(conn), None, "SELECT"):
            raise ValidationFailed(f"spec.from[{number}].table", f"the role lacks SELECT on {join.schema}.{join.table}: GRANT SELECT to it")
    if target.copy is not None:
        _check_copy_permissions(conn, target.copy)


def _check_copy_permissions(conn: psycopg.Connection, copy: CopyInto) -> None:
    table = copy.table_identifier.as_string(conn)
    if not _has_privilege(conn, table, None, "SELECT"):  # the verification reads the target
        raise ValidationFailed("spec.copy.table", f"the role lacks SELECT on {copy.display_table}: GRANT SELECT, INSERT to it")
    for column, _ in copy.columns:
        if not _has_privilege(conn, table, column, "INSERT"):
            raise ValidationFailed("spec.copy.table", f"the role lacks INSERT on {copy.display_table}({column}): GRANT INSERT to it")
        if copy.update and column not in copy.conflict_key and not _has_privilege(conn, table, column, "UPDATE"):
            raise ValidationFailed(
                "spec.copy.onConflict", f"onConflict: update needs UPDATE on {copy.display_table}({column}): GRANT UPDATE to it"
            )


def _has_privilege(conn: psycopg.Connection, table: str, column: str | None, privilege: str) -> bool:
    if column is None:
        row = conn.execute("SELECT has_table_privilege(%s, %s)", [table, privilege]).fetchone()
    else:
        row = conn.execute("SELECT has_column_privilege(%s, %s, %s)", [table, column, privilege]).fetchone()
    return bool(row and row[0])


def check_fragments(conn: psycopg.Connection, target: Target, dsn_secrets: list[str]) -> None:
    """Compile every ``set`` expression and the ``where`` predicate, alone and in the real statements.

    Both the parenthesised and the bare form must compile, so a fragment cannot escape its
    parentheses (``x) OR (y``, ``'a', other = 'b'``).
    """
    # NULL key bounds: the statements are only planned (EXPLAIN), so any typed-by-context value will do.
    one_key: list[str | None] = [None] * target.bound_width
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT set_config('statement_timeout', %s, true)", [VALIDATION_STATEMENT_TIMEOUT])
        for column, expression in target.set:
            field = f"spec.set.{column}"
            _check_single_value(conn, target, expression, field, dsn_secrets)
            for wrapped in (True, False):
                _compile(conn, statements.update_one_column(target, column, expression, wrapped=wrapped), one_key, field, dsn_secrets)
        predicates = [(f"spec.from[{number}].condition", join.condition) for number, join in enumerate(target.joins)]
        if target.where is not None:
            predicates.append(("spec.where", target.where))
        for field, predicate in predicates:
            for wrapped in (True, False):
                _compile(conn, statements.select_where(target, predicate, wrapped=wrapped), [0], field, dsn_secrets)
        if target.copy is not None:
            _check_copy_fragments(conn, target, dsn_secrets)
        # The real statements, as the engine will issue them.
        for has_lower in (False, True):
            bounds = statements.range_params(one_key if has_lower else None, one_key)
            field = "spec.copy" if target.copy is not None else "spec"
            _compile(conn, statements.explain(statements.batch_statement(target, has_lower=has_lower)), bounds, field, dsn_secrets)
            if target.by_ctid and target.kind == ChangeKind.SET:
                checked = statements.update_batch_checked(target, has_lower=has_lower)
                _compile(conn, statements.explain(checked), bounds, "spec", dsn_secrets)
            elif not target.by_ctid:
                _compile(conn, statements.explain(statements.probe_upper_bound(target, has_lower=has_lower)), [*bounds, 0], "spec", dsn_secrets)
    if target.by_ctid and target.kind == ChangeKind.SET:
        check_where_becomes_false(conn, target)


SAMPLE_BLOCKS = 8
"""Blocks of the rolled-back sample batch that checks, before any write, that ``set`` makes
``where`` false (``walk: ctid``); every real batch checks its own rows again before COMMIT."""


def check_where_becomes_false(conn: psycopg.Connection, target: Target) -> None:
    """Apply the change to the first blocks' matching rows and roll back: refuse a ``where`` that stays true.

    Only a sample (rows elsewhere may differ): the batches' own check is the guarantee. It waits
    for row locks at most ``SAMPLE_LOCK_TIMEOUT``; rows locked by the application are skipped by
    giving up the sample, not the run.
    """
    statement = statements.update_batch_checked(target, has_lower=False)
    with conn.transaction(force_rollback=True):
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
            [VALIDATION_STATEMENT_TIMEOUT, SAMPLE_LOCK_TIMEOUT],
        )
        try:
            with conn.transaction():
                row = conn.execute(statement, [str(SAMPLE_BLOCKS)]).fetchone()
        except psycopg.Error:
            # Busy rows, a slow sample, or a set expression failing on these rows (the first batch
            # then fails the same way, uncommitted): the per-batch check still refuses before any commit.
            return
    changed, still = (int(row[0]), int(row[1])) if row else (0, 0)
    if still:
        raise ValidationFailed("spec.where", changes.where_stays_true(still, changed, f"a rolled-back sample of blocks 0..{SAMPLE_BLOCKS - 1}"))


SAMPLE_LOCK_TIMEOUT = "500ms"


def _check_single_value(conn: psycopg.Connection, target: Target, expression: str, field: str, dsn_secrets: list[str]) -> None:
    """The expression compiles, wrapped and bare, and the bare form is one column."""
    for wrapped in (True, False):
        cursor = _compile(conn, statements.select_expression(target, expression, wrapped=wrapped), [0], field, dsn_secrets)
        if not wrapped and len(cursor.description or ()) != 1:
            raise ValidationFailed(field, "the expression must be a single value (it yields several columns)")


def _check_copy_fragments(conn: psycopg.Connection, target: Target, dsn_secrets: list[str]) -> None:
    """Each copied value compiles over the source alone, and is assignable to its target column."""
    assert target.copy is not None
    for column, expression in target.copy.columns:
        field = f"spec.copy.columns.{column}"
        if expression is not None:
            _check_single_value(conn, target, expression, field, dsn_secrets)
        _compile(conn, statements.insert_one_column(target, column, expression), [0], field, dsn_secrets)


def _compile(
    conn: psycopg.Connection, statement: sql.Composed, params: Sequence[object], field: str, dsn_secrets: list[str]
) -> psycopg.Cursor:
    """Run ``statement`` inside a savepoint; attribute a failure to ``field``.

    Parameters are always passed, so psycopg uses the extended protocol and a fragment holding
    ``;`` cannot smuggle in a second statement.
    """
    try:
        with conn.transaction():
            return conn.execute(statement, params)
    except psycopg.errors.QueryCanceled:
        raise ValidationFailed(field, "compiling the statement timed out") from None
    except psycopg.Error as error:
        message = redact(_first_line(error), dsn_secrets)
        if "multiple commands" in message:
            message = "must be a single SQL expression without ';'"
        elif isinstance(error, psycopg.errors.InvalidTextRepresentation) and field == "spec":
            message = f"{message} (the key values are compared as text; check spec.key)"
        raise ValidationFailed(field, message) from None


def _first_line(error: psycopg.Error) -> str:
    diag = error.diag
    text = diag.message_primary or str(error)
    if diag.message_hint:
        text += f" (hint: {diag.message_hint})"
    return text.splitlines()[0] if text else type(error).__name__

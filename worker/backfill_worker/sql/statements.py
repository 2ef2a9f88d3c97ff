"""Pure builders of every statement the engine runs against the target table.

Identifiers always go through ``sql.Identifier``; the user's ``set``/``where`` fragments are
trusted input composed only through ``sql.SQL`` and always wrapped in their own parentheses on
their own lines (so a trailing ``-- comment`` cannot swallow the rest of the statement).

Key values travel as text: a Python ``str`` parameter is sent with the *unknown* type, so
PostgreSQL infers the key column's type from the comparison and no client-side cast is needed
(integer, uuid, text, timestamptz, numeric, composite keys alike). A composite key uses a row
comparison ``(a, b) > (%s, %s)``, which a btree index on ``(a, b)`` serves directly.

With ``walk: ctid`` the "key" is a block number (one text value) and the range is
``ctid >= '(lo,0)' AND ctid < '(hi,0)'``: blocks ``lo .. hi-1``, served by a TID Range Scan. Only
:func:`_range` differs, so every statement built on it batches by blocks unchanged.

Two placeholder styles exist because psycopg only interprets ``%`` when parameters are passed:
``PSYCOPG`` (``%s``, literal ``%`` in fragments doubled) for statements executed with
parameters, ``DOLLAR`` (``$1``, fragments verbatim) for ``PREPARE`` in the generic-plan check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from psycopg import sql

from backfill_api.model import ChangeKind


class Style(Enum):
    PSYCOPG = "psycopg"
    DOLLAR = "dollar"


@dataclass(frozen=True)
class Join:
    """One ``spec.from`` table of an update: ``FROM schema.table AS alias`` and its join condition."""

    schema: str
    table: str
    alias: str
    condition: str


@dataclass(frozen=True)
class CopyInto:
    """The resolved ``spec.copy``: target table, ``(column, expression over the source)`` pairs,
    the conflict key (target columns of a unique index) and whether a conflict updates."""

    schema: str
    table: str
    columns: tuple[tuple[str, str | None], ...]
    """``(target column, SQL expression over the source)``; None: the source column of that name."""
    conflict_key: tuple[str, ...]
    update: bool

    @property
    def table_identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def display_table(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class Target:
    """The resolved, validated shape of one backfill: what the statements are built from."""

    schema: str
    table: str
    key: tuple[str, ...]
    """Key columns in the order of the unique index that covers them."""
    key_index: str
    set: tuple[tuple[str, str], ...]
    """``(column, expression)`` pairs in manifest order."""
    where: str | None = None
    key_types: tuple[str, ...] = field(default=())
    joins: tuple[Join, ...] = ()
    """``spec.from``: tables joined into the update (and into its verification)."""
    copy: CopyInto | None = None
    """``spec.copy``: where the rows of each range are copied to."""
    kind: ChangeKind = ChangeKind.SET
    """Which kind of change the spec gives: ``set``, ``delete``, ``copy`` or ``handler``."""
    by_ctid: bool = False
    """``walk: ctid``: ranges of physical blocks instead of key ranges (``key`` is empty)."""

    @property
    def bound_width(self) -> int:
        """Values in one range bound: the key's columns, or the block number."""
        return 1 if self.by_ctid else len(self.key)

    @property
    def table_identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def display_table(self) -> str:
        return f"{self.schema}.{self.table}"


class _Binder:
    """Hands out placeholders in statement order for one style."""

    def __init__(self, style: Style) -> None:
        self.style = style
        self.count = 0

    def param(self) -> sql.Composable:
        self.count += 1
        return sql.Placeholder() if self.style is Style.PSYCOPG else sql.SQL(f"${self.count}")

    def fragment(self, text: str) -> sql.Composable:
        # A literal '%' (e.g. LIKE '%x') must be doubled when psycopg formats parameters.
        return sql.SQL(text.replace("%", "%%") if self.style is Style.PSYCOPG else text)


def _key_columns(target: Target) -> list[sql.Identifier]:
    if target.joins:  # a joined table may have a column of the same name: say whose key it is
        return [sql.Identifier(target.schema, target.table, column) for column in target.key]
    return [sql.Identifier(column) for column in target.key]


def _key_expr(target: Target) -> sql.Composable:
    """``k`` for one column, ``(a, b)`` for a composite key (row comparison)."""
    columns = _key_columns(target)
    if len(columns) == 1:
        return columns[0]
    return sql.SQL("({})").format(sql.SQL(", ").join(columns))


def _key_params(target: Target, binder: _Binder) -> sql.Composable:
    params = [binder.param() for _ in target.key]
    if len(params) == 1:
        return params[0]
    return sql.SQL("({})").format(sql.SQL(", ").join(params))


def _key_as_text(target: Target) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(column) for column in _key_columns(target))


def _order_by(target: Target, descending: bool = False) -> sql.Composable:
    # Table-qualified: a bare name would bind to the ``k::text AS k`` output column and sort as text.
    suffix = sql.SQL(" DESC") if descending else sql.SQL("")
    return sql.SQL(", ").join(
        sql.SQL("{}{}").format(sql.Identifier(target.schema, target.table, column), suffix) for column in target.key
    )


def _block(binder: _Binder) -> sql.Composable:
    """The first tuple id of a block given as a number: ``'(n,0)'::tid`` (a TID Range Scan bound)."""
    return sql.SQL("('(' || {}::bigint || ',0)')::tid").format(binder.param())


def _ctid(target: Target) -> sql.Composable:
    # Table-qualified: a ``from`` table has a ctid too.
    return sql.Identifier(target.schema, target.table, "ctid")


def _range(target: Target, binder: _Binder, has_lower: bool) -> sql.Composable:
    """``key > lo AND key <= hi`` (``lo`` omitted for the first batch of the first shard).

    ``walk: ctid``: ``ctid >= (lo,0) AND ctid < (hi,0)``, the blocks ``lo .. hi-1``.
    """
    if target.by_ctid:
        blocks: list[sql.Composable] = []
        if has_lower:
            blocks.append(sql.SQL("{} >= {}").format(_ctid(target), _block(binder)))
        blocks.append(sql.SQL("{} < {}").format(_ctid(target), _block(binder)))
        return sql.SQL(" AND ").join(blocks)
    key = _key_expr(target)
    parts: list[sql.Composable] = []
    if has_lower:
        parts.append(sql.SQL("{} > {}").format(key, _key_params(target, binder)))
    parts.append(sql.SQL("{} <= {}").format(key, _key_params(target, binder)))
    return sql.SQL(" AND ").join(parts)


def _where(target: Target, binder: _Binder) -> sql.Composable:
    if target.where is None:
        return sql.SQL("")
    return sql.SQL(" AND (\n{}\n)").format(binder.fragment(target.where))


def _joins(target: Target, binder: _Binder) -> sql.Composable:
    """`` AND (condition)`` of every ``spec.from`` table (after the range, before ``where``)."""
    return sql.SQL("").join(sql.SQL(" AND (\n{}\n)").format(binder.fragment(join.condition)) for join in target.joins)


def _from_list(target: Target) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.Identifier(join.schema, join.table), sql.Identifier(join.alias))
        for join in target.joins
    )


def _from_clause(target: Target) -> sql.Composable:
    """`` FROM x AS a, ...`` of an update with ``spec.from`` (nothing without)."""
    return sql.SQL(" FROM {}").format(_from_list(target)) if target.joins else sql.SQL("")


def range_params(lower: Sequence[str | None] | None, upper: Sequence[str | None]) -> list[str | None]:
    """Parameters for :func:`_range`, in placeholder order."""
    return [*(lower or ()), *upper]


def edge_key(target: Target, *, last: bool) -> sql.Composed:
    """The smallest (or largest) key, as text. Walks the key index from one end."""
    return sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
        _key_as_text(target), target.table_identifier, _order_by(target, descending=last)
    )


def probe_upper_bound(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """The key ``size`` keys after ``lo`` (params: lo..., hi..., offset).

    An index-only walk of the key index, run outside the write transaction. No row -> the range
    has fewer than ``size`` keys left and the batch ends at ``hi``.
    """
    binder = _Binder(style)
    return sql.SQL("SELECT {keys} FROM {table} WHERE {range} ORDER BY {order} LIMIT 1 OFFSET {offset}").format(
        keys=_key_as_text(target),
        table=target.table_identifier,
        range=_range(target, binder, has_lower),
        order=_order_by(target),
        offset=binder.param(),
    )


def update_batch(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """One set-based UPDATE of a key range (params: lo..., hi...)."""
    binder = _Binder(style)
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = (\n{}\n)").format(sql.Identifier(column), binder.fragment(expression))
        for column, expression in target.set
    )
    return sql.SQL("UPDATE {table} SET {assignments}{from_clause} WHERE {range}{joins}{where}").format(
        table=target.table_identifier,
        assignments=assignments,
        from_clause=_from_clause(target),
        range=_range(target, binder, has_lower),
        joins=_joins(target, binder),
        where=_where(target, binder),
    )


def delete_batch(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """One set-based DELETE of a key range's rows matching ``where`` (params: lo..., hi...)."""
    binder = _Binder(style)
    return sql.SQL("DELETE FROM {table} WHERE {range}{where}").format(
        table=target.table_identifier, range=_range(target, binder, has_lower), where=_where(target, binder)
    )


def _copy_select(target: Target, copy: CopyInto, binder: _Binder, has_lower: bool) -> sql.Composable:
    """``SELECT (e1), (e2) FROM source WHERE range AND (where)``: the range's rows in target shape."""
    expressions = sql.SQL(", ").join(_copy_value(binder, column, expression) for column, expression in copy.columns)
    return sql.SQL("SELECT {} FROM {} WHERE {}{}").format(
        expressions, target.table_identifier, _range(target, binder, has_lower), _where(target, binder)
    )


def _copy_value(binder: _Binder, column: str, expression: str | None) -> sql.Composable:
    if expression is None:
        return sql.Identifier(column)
    return sql.SQL("(\n{}\n)").format(binder.fragment(expression))


def copy_batch(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """``INSERT INTO copy (...) SELECT ... FROM source WHERE range AND (where) ON CONFLICT ...`` (params: lo..., hi...)."""
    copy = target.copy
    assert copy is not None, "copy_batch needs a resolved spec.copy"
    binder = _Binder(style)
    columns = sql.SQL(", ").join(sql.Identifier(column) for column, _ in copy.columns)
    conflict_key = sql.SQL(", ").join(sql.Identifier(column) for column in copy.conflict_key)
    updated = [column for column, _ in copy.columns if column not in copy.conflict_key]
    action: sql.Composable
    if copy.update and updated:
        action = sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(column)) for column in updated)
        )
    else:
        action = sql.SQL("DO NOTHING")
    return sql.SQL("INSERT INTO {table} ({columns}) {select} ON CONFLICT ({conflict_key}) {action}").format(
        table=copy.table_identifier,
        columns=columns,
        select=_copy_select(target, copy, binder, has_lower),
        conflict_key=conflict_key,
        action=action,
    )


def count_missing_copies(target: Target, *, has_lower: bool) -> sql.Composed:
    """Rows of a range (matching ``where``) whose conflict key is not in the copy target (params: lo..., hi...).

    The expressions are evaluated in a derived table over the source alone, so a source column
    name can never bind to a same-named target column; the target is matched by its conflict key.
    """
    copy = target.copy
    assert copy is not None, "count_missing_copies needs a resolved spec.copy"
    binder = _Binder(Style.PSYCOPG)
    names = [sql.Identifier(f"c{number}") for number in range(len(copy.columns))]
    position = {column: number for number, (column, _) in enumerate(copy.columns)}
    source, copied = sql.Identifier("backfill_source"), sql.Identifier("backfill_copied")
    matches = sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(copied, sql.Identifier(column), source, names[position[column]])
        for column in copy.conflict_key
    )
    return sql.SQL("SELECT count(*) FROM ({select}) AS {source}({names}) WHERE NOT EXISTS "
                   "(SELECT 1 FROM {table} AS {copied} WHERE {matches})").format(
        select=_copy_select(target, copy, binder, has_lower),
        source=source,
        names=sql.SQL(", ").join(names),
        table=copy.table_identifier,
        copied=copied,
        matches=matches,
    )


def count_duplicate_matches(target: Target, *, has_lower: bool) -> sql.Composed:
    """Target rows of a range that the ``from`` join matches more than once (params: lo..., hi...).

    ``UPDATE ... FROM`` updates such a row once, with an arbitrary one of its matches: the
    result would depend on the plan. Grouped by the (unique) key.
    """
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL(
        "SELECT count(*) FROM (SELECT 1 FROM {table}, {from_list} WHERE {range}{joins}{where} "
        "GROUP BY {key} HAVING count(*) > 1) AS backfill_duplicates"
    ).format(
        table=target.table_identifier,
        from_list=_from_list(target),
        range=_range(target, binder, has_lower),
        joins=_joins(target, binder),
        where=_where(target, binder),
        key=sql.SQL(", ").join(_key_columns(target)),
    )


def update_batch_checked(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """:func:`update_batch` that also evaluates ``where`` on every new row version (params: lo..., hi...).

    Returns one row ``(rows changed, rows still matching where)``: under ``walk: ctid`` a row that
    still matches after its update could be met again in the block it moved to, so the batch
    proves the change made ``where`` false for each of its rows before it commits.
    """
    assert target.where is not None
    update = update_batch(target, has_lower=has_lower, style=style)
    binder = _Binder(style)
    return sql.SQL("WITH changed AS ({update} RETURNING (\n{where}\n) AS still) "
                   "SELECT count(*), count(*) FILTER (WHERE still) FROM changed").format(
        update=update, where=binder.fragment(target.where)
    )


def batch_predicate(target: Target, *, has_lower: bool) -> sql.Composed:
    """``key > lo AND key <= hi AND (where)``: the rows of one batch (params: lo..., hi...)."""
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL("{}{}").format(_range(target, binder, has_lower), _where(target, binder))


def lock_batch_rows(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """The rows of a range still matching ``where``, in key order, locked (params: lo..., hi...).

    ``FOR NO KEY UPDATE`` is the lock an ``UPDATE`` of non-key columns takes: it does not block
    inserts into tables whose foreign keys reference these rows (``FOR UPDATE`` would).
    """
    binder = _Binder(style)
    return sql.SQL("SELECT * FROM {table} WHERE {range}{where} ORDER BY {order} FOR NO KEY UPDATE").format(
        table=target.table_identifier,
        range=_range(target, binder, has_lower),
        where=_where(target, binder),
        order=_order_by(target),
    )


def batch_statement(target: Target, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
    """The statement of one batch of ``target.kind`` (params: lo..., hi...): the ``UPDATE``,
    ``DELETE`` or ``INSERT ... SELECT``, or for a handler the locking ``SELECT`` its ``rows()`` runs."""
    build = {
        ChangeKind.SET: update_batch, ChangeKind.DELETE: delete_batch, ChangeKind.COPY: copy_batch,
        ChangeKind.HANDLER: lock_batch_rows,
    }[target.kind]
    return build(target, has_lower=has_lower, style=style)


def typed_keys(target: Target, count: int) -> sql.Composed:
    """``SELECT CAST(%s AS <type>), ...`` for ``count`` keys: text key values as the column's own type."""
    binder = _Binder(Style.PSYCOPG)
    casts = [
        sql.SQL("CAST({} AS {})").format(binder.param(), sql.SQL(key_type))  # format_type() output from the catalog
        for _ in range(count)
        for key_type in target.key_types
    ]
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(casts))


def count_keys(target: Target, *, has_lower: bool) -> sql.Composed:
    """Keys in a range (params: lo..., hi...): sizes the last, short batch."""
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        target.table_identifier, _range(target, binder, has_lower)
    )


def count_remaining(target: Target, *, has_lower: bool) -> sql.Composed:
    """Rows of a range that still match ``where`` (and the ``from`` join) (params: lo..., hi...): the verification."""
    binder = _Binder(Style.PSYCOPG)
    if target.joins:
        # Distinct target rows: a row the join matches twice is still one row that needs the change.
        return sql.SQL(
            "SELECT count(DISTINCT {key}) FROM {table}, {from_list} WHERE {range}{joins}{where}"
        ).format(
            key=_key_expr(target), table=target.table_identifier, from_list=_from_list(target), range=_range(target, binder, has_lower),
            joins=_joins(target, binder), where=_where(target, binder),
        )
    return sql.SQL("SELECT count(*) FROM {} WHERE {}{}").format(
        target.table_identifier, _range(target, binder, has_lower), _where(target, binder)
    )


# -- validation probes: each fragment alone, wrapped and unwrapped ---------------------------


def _sources(target: Target) -> sql.Composable:
    """``t`` or ``t, x AS a, ...``: what a fragment may reference (validation probes only)."""
    if not target.joins:
        return target.table_identifier
    return sql.SQL("{}, {}").format(target.table_identifier, _from_list(target))


def select_expression(target: Target, expression: str, *, wrapped: bool) -> sql.Composed:
    """``SELECT <expr> FROM t LIMIT %s``: the unwrapped form must yield exactly one column."""
    binder = _Binder(Style.PSYCOPG)
    template = "SELECT (\n{}\n) FROM {} LIMIT {}" if wrapped else "SELECT \n{}\n FROM {} LIMIT {}"
    return sql.SQL(template).format(binder.fragment(expression), _sources(target), binder.param())


def update_one_column(target: Target, column: str, expression: str, *, wrapped: bool) -> sql.Composed:
    """``EXPLAIN UPDATE t SET c = <expr> WHERE key <= %s``: type-checks the assignment."""
    binder = _Binder(Style.PSYCOPG)
    template = "EXPLAIN UPDATE {} SET {} = (\n{}\n){} WHERE {}" if wrapped else "EXPLAIN UPDATE {} SET {} = \n{}\n{} WHERE {}"
    return sql.SQL(template).format(
        target.table_identifier,
        sql.Identifier(column),
        binder.fragment(expression),
        _from_clause(target),
        _range(target, binder, has_lower=False),
    )


def insert_one_column(target: Target, column: str, expression: str | None) -> sql.Composed:
    """``EXPLAIN INSERT INTO copy (c) SELECT (<expr>) FROM t LIMIT %s``: the value is assignable to the column."""
    assert target.copy is not None
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL("EXPLAIN INSERT INTO {} ({}) SELECT {} FROM {} LIMIT {}").format(
        target.copy.table_identifier, sql.Identifier(column), _copy_value(binder, column, expression),
        target.table_identifier, binder.param(),
    )


def select_where(target: Target, predicate: str, *, wrapped: bool) -> sql.Composed:
    """``SELECT 1 FROM t WHERE <where> LIMIT %s``: compiles, and is boolean."""
    binder = _Binder(Style.PSYCOPG)
    template = "SELECT 1 FROM {} WHERE (\n{}\n) LIMIT {}" if wrapped else "SELECT 1 FROM {} WHERE \n{}\n LIMIT {}"
    return sql.SQL(template).format(_sources(target), binder.fragment(predicate), binder.param())


def explain(statement: sql.Composable, *, json: bool = False) -> sql.Composed:
    return sql.SQL("EXPLAIN (FORMAT JSON) {}" if json else "EXPLAIN {}").format(statement)


def count_all(target: Target) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {}").format(target.table_identifier)

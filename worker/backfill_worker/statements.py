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


class Style(Enum):
    PSYCOPG = "psycopg"
    DOLLAR = "dollar"


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
    by_ctid: bool = False
    """``walk: ctid``: ranges of physical blocks instead of key ranges (``key`` is empty)."""

    @property
    def table_identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def display_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def bound_width(self) -> int:
        """Values in one range bound: the key's columns, or the block number."""
        return 1 if self.by_ctid else len(self.key)


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
    return [sql.Identifier(column) for column in target.key]


def _key_expr(target: Target) -> sql.Composable:
    """``k`` for one column, ``(a, b)`` for a composite key (row comparison); ``walk: ctid``: the table's ``ctid``."""
    if target.by_ctid:  # table-qualified: a joined table has a ctid too
        return sql.Identifier(target.schema, target.table, "ctid")
    columns = _key_columns(target)
    if len(columns) == 1:
        return columns[0]
    return sql.SQL("({})").format(sql.SQL(", ").join(columns))


def _key_params(target: Target, binder: _Binder) -> sql.Composable:
    if target.by_ctid:
        return _block(binder)
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


def _range(target: Target, binder: _Binder, has_lower: bool) -> sql.Composable:
    """``key > lo AND key <= hi`` (``lo`` omitted for the first batch of the first shard).

    ``walk: ctid``: ``ctid >= (lo,0) AND ctid < (hi,0)``, the blocks ``lo .. hi-1``.
    """
    key = _key_expr(target)
    if target.by_ctid:
        blocks: list[sql.Composable] = []
        if has_lower:
            blocks.append(sql.SQL("{} >= {}").format(key, _key_params(target, binder)))
        blocks.append(sql.SQL("{} < {}").format(key, _key_params(target, binder)))
        return sql.SQL(" AND ").join(blocks)
    parts: list[sql.Composable] = []
    if has_lower:
        parts.append(sql.SQL("{} > {}").format(key, _key_params(target, binder)))
    parts.append(sql.SQL("{} <= {}").format(key, _key_params(target, binder)))
    return sql.SQL(" AND ").join(parts)


def _where(target: Target, binder: _Binder) -> sql.Composable:
    if target.where is None:
        return sql.SQL("")
    return sql.SQL(" AND (\n{}\n)").format(binder.fragment(target.where))


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
    return sql.SQL("UPDATE {table} SET {assignments} WHERE {range}{where}").format(
        table=target.table_identifier,
        assignments=assignments,
        range=_range(target, binder, has_lower),
        where=_where(target, binder),
    )


def count_keys(target: Target, *, has_lower: bool) -> sql.Composed:
    """Keys in a range (params: lo..., hi...): sizes the last, short batch."""
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        target.table_identifier, _range(target, binder, has_lower)
    )


def count_remaining(target: Target, *, has_lower: bool) -> sql.Composed:
    """Rows of a range that still match ``where`` (params: lo..., hi...): the verification."""
    binder = _Binder(Style.PSYCOPG)
    return sql.SQL("SELECT count(*) FROM {} WHERE {}{}").format(
        target.table_identifier, _range(target, binder, has_lower), _where(target, binder)
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


# -- validation probes: each fragment alone, wrapped and unwrapped ---------------------------


def select_expression(target: Target, expression: str, *, wrapped: bool) -> sql.Composed:
    """``SELECT <expr> FROM t LIMIT %s``: the unwrapped form must yield exactly one column."""
    binder = _Binder(Style.PSYCOPG)
    template = "SELECT (\n{}\n) FROM {} LIMIT {}" if wrapped else "SELECT \n{}\n FROM {} LIMIT {}"
    return sql.SQL(template).format(binder.fragment(expression), target.table_identifier, binder.param())


def update_one_column(target: Target, column: str, expression: str, *, wrapped: bool) -> sql.Composed:
    """``EXPLAIN UPDATE t SET c = <expr> WHERE false AND key <= %s``: type-checks the assignment."""
    binder = _Binder(Style.PSYCOPG)
    template = "EXPLAIN UPDATE {} SET {} = (\n{}\n) WHERE {}" if wrapped else "EXPLAIN UPDATE {} SET {} = \n{}\n WHERE {}"
    return sql.SQL(template).format(
        target.table_identifier,
        sql.Identifier(column),
        binder.fragment(expression),
        sql.SQL("{} <= {}").format(_key_expr(target), _key_params(target, binder)),
    )


def select_where(target: Target, predicate: str, *, wrapped: bool) -> sql.Composed:
    """``SELECT 1 FROM t WHERE <where> LIMIT %s``: compiles, and is boolean."""
    binder = _Binder(Style.PSYCOPG)
    template = "SELECT 1 FROM {} WHERE (\n{}\n) LIMIT {}" if wrapped else "SELECT 1 FROM {} WHERE \n{}\n LIMIT {}"
    return sql.SQL(template).format(target.table_identifier, binder.fragment(predicate), binder.param())


def explain(statement: sql.Composable, *, json: bool = False) -> sql.Composed:
    return sql.SQL("EXPLAIN (FORMAT JSON) {}" if json else "EXPLAIN {}").format(statement)


def count_all(target: Target) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {}").format(target.table_identifier)

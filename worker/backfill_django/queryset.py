"""The declarative path: a Backfill's ``where`` and ``set`` compiled from a QuerySet and ``update()`` values.

``manifest_from_queryset(Customer.objects.filter(status__isnull=True), update={"status": "inactive"},
name="deactivate")`` gives the same change as ``queryset.update(status="inactive")``, but as a
resumable, throttled, batched backfill at plain-SQL speed. Django's own compiler writes the SQL
(``query.get_compiler().compile(where)``, and the ``UPDATE`` compiler for each value, so
``F()`` expressions, functions and field preparation behave as in ``update()``); the parameters
are inlined as SQL literals by psycopg (``sql.Literal`` with the connection's adapters), never
by string formatting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg import sql

from backfill_api.errors import ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import API_GROUP, API_VERSION, KIND, Backfill

_PLACEHOLDER = re.compile(r"%%|%s")


def inline(statement: str, params: Sequence[Any], conn: Any) -> str:
    """Django's ``%s`` SQL with its parameters as literals (``%%`` is a literal ``%``)."""
    values = iter(params)

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        try:
            value = next(values)
        except StopIteration:
            raise ValueError("more placeholders than parameters in Django's SQL") from None
        return sql.Literal(value).as_string(conn)

    text = _PLACEHOLDER.sub(replace, statement)
    if next(values, _END) is not _END:
        raise ValueError("more parameters than placeholders in Django's SQL")
    return text


_END = object()


def compile_where(queryset: Any) -> str | None:
    """The QuerySet's filter as one SQL predicate over its table (None: every row)."""
    from django.core.exceptions import EmptyResultSet, FullResultSet
    from django.db import connections

    query = queryset.query
    if query.is_sliced or query.combinator or query.distinct or query.group_by is not None:
        raise ValidationFailed("queryset", "slices, union/intersection, distinct() and aggregation cannot be a backfill: use filter() only")
    compiler = query.get_compiler(using=queryset.db)
    try:
        where, params = compiler.compile(query.where)
    except FullResultSet:
        return None
    except EmptyResultSet:
        raise ValidationFailed("queryset", "the filter matches no row at all (e.g. pk__in=[]): nothing to backfill") from None
    joined = [alias for alias, join in query.alias_map.items() if alias != query.base_table and query.alias_refcount.get(alias)]
    if joined:
        raise ValidationFailed(
            "queryset", f"the filter joins other tables ({', '.join(sorted(joined))}): a batch walks one table; filter on a "
            "subquery instead, e.g. filter(account__in=Account.objects.filter(active=False))",
        )
    if not where:
        return None
    return inline(where, params, _connection(connections, queryset.db))


def compile_set(model: Any, update: Mapping[str, Any], using: str) -> dict[str, str]:
    """``column -> SQL expression`` for each ``update()`` value, as Django's UPDATE compiler writes it."""
    from django.core.exceptions import FieldDoesNotExist, FieldError
    from django.db import connections
    from django.db.models.sql.subqueries import UpdateQuery

    if not update:
        raise ValidationFailed("update", "no values: give the fields to set, e.g. update={'status': 'inactive'}")
    connection = connections[using]
    quote = connection.ops.quote_name
    compiled: dict[str, str] = {}
    for name, value in update.items():
        query = UpdateQuery(model)
        try:
            query.add_update_values({name: value})
            field = model._meta.get_field(name)
            statement, params = query.get_compiler(using=using).as_sql()
        except (FieldError, FieldDoesNotExist, TypeError) as error:
            raise ValidationFailed(f"update.{name}", str(error)) from None
        prefix = f"UPDATE {quote(model._meta.db_table)} SET {quote(field.column)} = "
        if not statement.startswith(prefix):
            raise ValidationFailed(f"update.{name}", f"unexpected SQL from Django's compiler for this value: {statement[:80]!r}")
        compiled[field.column] = inline(statement[len(prefix):], params, _connection(connections, using))
    return compiled


def manifest_from_queryset(
    queryset: Any, update: Mapping[str, Any], *, name: str, namespace: str = "default", **spec: Any
) -> Backfill:
    """A Backfill doing ``queryset.update(**update)`` in batches; ``spec`` adds other fields (``batch``, ``limits``...)."""
    model = queryset.model
    body: dict[str, Any] = {"table": model._meta.db_table, "set": compile_set(model, update, queryset.db)}
    where = compile_where(queryset)
    if where is not None:
        body["where"] = where
    body.update(spec)
    document = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
        "metadata": {"name": name, "namespace": namespace}, "spec": body,
    }
    return parse_backfill(document, source=f"queryset of {model._meta.label}")


def manifest_document(backfill: Backfill) -> dict[str, Any]:
    """The manifest as a YAML-ready mapping (only what was given: defaults stay implicit)."""
    document: dict[str, Any] = backfill.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"status"})
    return document


def _connection(connections: Any, using: str) -> Any:
    """The psycopg connection Django uses for ``using`` (its adapters quote the literals)."""
    wrapper = connections[using]
    wrapper.ensure_connection()
    return wrapper.connection

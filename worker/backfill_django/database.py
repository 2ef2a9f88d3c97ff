"""The engine's DSN from Django's ``settings.DATABASES`` (when no ``--dsn``/``$BACKFILL_DSN`` is given).

The engine opens its own sessions (the key walk's probe, checkpoints, planning, verification):
it needs a libpq connection string. Django already knows one per alias; its backend's
``get_connection_params()`` also carries Python objects for psycopg (cursor factory, adapters),
which are not connection-string keywords: only libpq's own keywords are kept. The DSN is
registered with the redactor before it is returned, so it never shows in logs or errors.
"""

from __future__ import annotations

from functools import cache

from psycopg import conninfo, pq

from backfill_api.errors import ValidationFailed
from backfill_worker.secrets import register_dsn


@cache
def libpq_keywords() -> frozenset[str]:
    """The connection-string keywords this libpq understands (``dbname``, ``sslmode``, ...)."""
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


def conninfo_from_params(params: dict[str, object]) -> str:
    """A libpq connection string from Django's connection parameters (PURE)."""
    keywords = libpq_keywords()
    kept = {name: str(value) for name, value in params.items() if name in keywords and value is not None and value != ""}
    return conninfo.make_conninfo("", **kept)


def dsn_for(alias: str = "default") -> str:
    """The DSN of ``settings.DATABASES[alias]`` (a PostgreSQL database), registered as a secret."""
    from django.db import connections

    if alias not in connections.settings:
        raise ValidationFailed("database", f"settings.DATABASES has no alias {alias!r} (known: {', '.join(connections.settings)})")
    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise ValidationFailed(
            "database", f"settings.DATABASES[{alias!r}] is {connection.vendor}: backfills run on PostgreSQL only"
        )
    dsn = conninfo_from_params(connection.get_connection_params())
    register_dsn(dsn)
    return dsn

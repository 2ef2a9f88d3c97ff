"""The engine's DSN for a ``settings.DATABASES`` alias (when no ``--dsn``/``$BACKFILL_DSN`` is given).

The migration operations and ``manage.py backfill`` name an alias (the migration's database,
``--database``); the DSN itself is the runtime's (``runtime.dsn_from_settings``: the libpq keywords
of Django's connection parameters). Here: the alias and the backend are checked with a message
naming the fix, and the DSN is registered with the redactor, so it never shows in logs or errors.
"""

from __future__ import annotations

from backfill_api.errors import ValidationFailed
from backfill_worker.sql.secrets import register_dsn

from .runtime import dsn_from_settings


def dsn_for(alias: str = "default") -> str:
    """The DSN of ``settings.DATABASES[alias]`` (a PostgreSQL database), registered as a secret."""
    from django.db import connections

    if alias not in connections.settings:
        raise ValidationFailed("database", f"settings.DATABASES has no alias {alias!r} (known: {', '.join(connections.settings)})")
    if connections[alias].vendor != "postgresql":
        raise ValidationFailed(
            "database", f"settings.DATABASES[{alias!r}] is {connections[alias].vendor}: backfills run on PostgreSQL only"
        )
    dsn = dsn_from_settings(alias)
    register_dsn(dsn)
    return dsn

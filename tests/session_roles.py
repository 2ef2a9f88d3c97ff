"""A login role whose own settings (``ALTER ROLE ... SET``) change how values print as text.

The engine must give the same result under any such role: it pins every setting that affects
text I/O on its sessions. Roles are cluster-wide, so each gets a unique name and is dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg
from psycopg import sql

HOSTILE_SETTINGS: dict[str, str] = {
    "extra_float_digits": "0",
    "DateStyle": "SQL, DMY",
    "IntervalStyle": "sql_standard",
    "TimeZone": "Pacific/Chatham",
    "bytea_output": "escape",
    "lc_monetary": "C",
}
"""Settings under which text forms differ from the defaults (floats round at 15 digits,
dates print day-first, timestamptz in a +13:45 zone)."""


@contextmanager
def role_with_settings(superuser_dsn: str, settings: Mapping[str, str]) -> Iterator[str]:
    """Yield the DSN of a new superuser role carrying ``settings`` as its role defaults."""
    params = psycopg.conninfo.conninfo_to_dict(superuser_dsn)
    role = f"r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(str(params["password"]))
            )
        )
        for name, value in settings.items():
            conn.execute(sql.SQL("ALTER ROLE {} SET {} TO {}").format(sql.Identifier(role), sql.Identifier(name.lower()), sql.Literal(value)))
    try:
        yield psycopg.conninfo.make_conninfo(superuser_dsn, user=role)
    finally:
        with psycopg.connect(superuser_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

"""Settings pinned on every session the engine opens, so key values round-trip exactly as text.

Key values travel as text parameters and are stored as ``text[]`` in the checkpoint. Whatever a
role or database has set (``ALTER ROLE ... SET extra_float_digits = 0`` rounds a float8 to 15
digits, ``DateStyle``/``TimeZone`` change how dates and timestamps print, ``bytea_output``...),
the engine's sessions print every key the same, exact way. Applied once per connection, right
after connecting, with ``set_config(..., false)`` (session scope), before any key is read.

The TCP settings make the server notice a vanished client in bounded time too (its side of a
silent network partition); ``connection.py`` sets the client's side through libpq options.
"""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

TEXT_IO_SETTINGS: dict[str, str] = {
    # PostgreSQL 12+: any value > 0 prints the shortest text that reads back to the same float;
    # 3 also makes 11 and older print 17 significant digits (also exact).
    "extra_float_digits": "3",
    # ISO output is unambiguous; YMD makes input ordering agree with it.
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    # timestamptz prints in the session zone: fixed, so stored bounds read the same in any run.
    "TimeZone": "UTC",
    "bytea_output": "hex",
    # money prints with the locale's symbol and separators.
    "lc_monetary": "C",
    "lc_numeric": "C",
    "xmloption": "content",
    # Backslashes in text literals are data, never escapes (libpq's default; pinned anyway).
    "standard_conforming_strings": "on",
}
"""Every user-settable setting that changes the text form of a value (output or input)."""

SERVER_KEEPALIVE_SETTINGS: dict[str, str] = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "20000",
}
"""The server side of the session's TCP connection: a backend whose client vanished silently
ends (and releases its advisory lock and row locks) within about 20 s."""


def pin(conn: psycopg.Connection) -> None:
    """Pin :data:`TEXT_IO_SETTINGS` (and the server keepalives) for the session of ``conn``."""
    names = list(TEXT_IO_SETTINGS)
    values = [TEXT_IO_SETTINGS[name] for name in names]
    conn.execute(
        "SELECT set_config(name, value, false) FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
        [names, values],
    )
    # Not available over a Unix socket (the setting then reads 0 and cannot be changed) or on
    # servers older than 12 (tcp_user_timeout): set only those the server knows and applies.
    conn.execute(
        "SELECT set_config(name, %s::jsonb ->> name, false) FROM pg_settings "
        "WHERE name = ANY(%s::text[]) AND inet_client_addr() IS NOT NULL",
        [Jsonb(SERVER_KEEPALIVE_SETTINGS), list(SERVER_KEEPALIVE_SETTINGS)],
    )


def current(conn: psycopg.Connection) -> dict[str, str]:
    """The session's values of :data:`TEXT_IO_SETTINGS` (for tests and diagnostics)."""
    rows = conn.execute(
        "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name", [list(TEXT_IO_SETTINGS)]
    ).fetchall()
    return {name: value for name, value in rows}

"""Opening connections without ever leaking the DSN, and turning stray driver errors into
user-facing errors with redacted messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from . import session_settings
from .errors import BackfillError, ConnectionFailed
from .secrets import describe_dsn, redact, register_dsn, secrets_of

CONNECT_TIMEOUT_SECONDS = 10


def first_line(error: BaseException) -> str:
    if isinstance(error, psycopg.Error) and error.diag.message_primary:
        return error.diag.message_primary
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_connection(dsn: str, application_name: str = "backfill") -> psycopg.Connection:
    """An autocommit session (transactions are always explicit); raises psycopg errors."""
    conn = psycopg.connect(
        dsn, autocommit=True, application_name=application_name[:63], connect_timeout=CONNECT_TIMEOUT_SECONDS
    )
    try:
        session_settings.pin(conn)  # keys travel as text: their text form must not depend on the role
    except BaseException:
        conn.close()
        raise
    return conn


def connect(dsn: str, application_name: str = "backfill") -> psycopg.Connection:
    """Like :func:`open_connection` but failures become :class:`ConnectionFailed` (redacted)."""
    register_dsn(dsn)
    try:
        return open_connection(dsn, application_name)
    except psycopg.Error as error:
        raise ConnectionFailed(
            f"cannot connect to {describe_dsn(dsn)}: {redact(first_line(error), secrets_of(dsn))}"
        ) from None


@contextmanager
def database_errors(dsn: str) -> Iterator[None]:
    """Unexpected driver errors leave as BackfillError without the DSN or password in them."""
    try:
        yield
    except psycopg.OperationalError as error:
        raise ConnectionFailed(
            f"lost the connection to {describe_dsn(dsn)}: {redact(first_line(error), secrets_of(dsn))}"
        ) from None
    except psycopg.Error as error:
        raise BackfillError(f"database error: {redact(first_line(error), secrets_of(dsn))}") from None

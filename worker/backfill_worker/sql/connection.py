"""Opening connections without ever leaking the DSN, and turning stray driver errors into
user-facing errors with redacted messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import psycopg

from backfill_api.errors import BackfillError, ConnectionFailed
from backfill_worker.sql import session_settings
from backfill_worker.sql.secrets import describe_dsn, redact, register_dsn, secrets_of

CONNECT_TIMEOUT_SECONDS = 10


def first_line(error: BaseException) -> str:
    if isinstance(error, psycopg.Error) and error.diag.message_primary:
        return error.diag.message_primary
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


TCP_DEFAULTS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
}
"""libpq TCP options the engine sets unless the DSN gives its own: a silent network partition
(packets dropped, no reset) is noticed within about 25 s, whether the session waits for a result
(keepalive probes unanswered: first after 5 s idle, the socket is closed once nothing was acked
for 20 s) or has data in flight (``tcp_user_timeout``). Without them libpq inherits the OS's
keepalive time, often 2 hours. Ignored over Unix sockets."""


def tcp_options(dsn: str) -> dict[str, str]:
    """The :data:`TCP_DEFAULTS` the DSN does not set itself (PURE apart from parsing the DSN)."""
    given = psycopg.conninfo.conninfo_to_dict(dsn)
    return {name: value for name, value in TCP_DEFAULTS.items() if name not in given}


def open_connection(dsn: str, application_name: str = "backfill") -> psycopg.Connection:
    """An autocommit session (transactions are always explicit); raises psycopg errors."""
    conn = psycopg.connect(
        psycopg.conninfo.make_conninfo(dsn, **tcp_options(dsn)), autocommit=True,
        application_name=application_name[:63], connect_timeout=CONNECT_TIMEOUT_SECONDS,
    )
    try:
        session_settings.pin(conn)  # keys travel as text: their text form must not depend on the role
    except BaseException:
        conn.close()
        raise
    return conn


class Connections(Protocol):
    """Where the engine's validation and shard connections come from (the batch's connection)."""

    def open(self, application_name: str) -> psycopg.Connection:
        """An autocommit session with the text settings pinned; raises psycopg errors."""
        ...

    def close(self, conn: psycopg.Connection) -> None: ...


@dataclass(frozen=True)
class DsnConnections:
    """The default: a new session of ``dsn`` each time."""

    dsn: str

    def open(self, application_name: str) -> psycopg.Connection:
        return open_connection(self.dsn, application_name)

    def close(self, conn: psycopg.Connection) -> None:
        conn.close()


def connect(dsn: str, application_name: str = "backfill", connections: Connections | None = None) -> psycopg.Connection:
    """Like :func:`open_connection` (or ``connections.open``) but failures become :class:`ConnectionFailed` (redacted)."""
    register_dsn(dsn)
    try:
        return (connections or DsnConnections(dsn)).open(application_name)
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

"""Which database errors are worth retrying, and how long to back off (tenacity's waits)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from tenacity import RetryCallState, wait_exponential, wait_random

LOCK_TIMEOUT = "lockTimeout"
STATEMENT_TIMEOUT = "statementTimeout"
DEADLOCK = "deadlock"
SERIALIZATION = "serialization"
CONNECTION = "connection"

_BY_SQLSTATE = {
    "55P03": LOCK_TIMEOUT,
    "57014": STATEMENT_TIMEOUT,
    "40P01": DEADLOCK,
    "40001": SERIALIZATION,
    "57P01": CONNECTION,  # admin_shutdown
    "57P02": CONNECTION,  # crash_shutdown
    "57P03": CONNECTION,  # cannot_connect_now
}

BACKOFF = wait_exponential(multiplier=0.1, max=10.0, exp_base=2) + wait_random(0, 0.1)
"""Delay before attempt n+1: 0.1 s, 0.2 s, 0.4 s ... capped at 10 s, plus up to 0.1 s jitter."""


@dataclass(frozen=True)
class Transient:
    kind: str
    timeout: bool
    """Lock or statement timeout: repeated ones halve the batch."""
    reconnect: bool
    """The connection is gone (or unusable): reconnect and re-take the advisory lock."""


def classify(error: BaseException, connection_closed: bool = False) -> Transient | None:
    """The transient kind of ``error``, or None when retrying cannot help."""
    if not isinstance(error, psycopg.Error):
        return None
    state = error.sqlstate or ""
    kind = _BY_SQLSTATE.get(state)
    if kind is None and (state.startswith("08") or (not state and isinstance(error, psycopg.OperationalError))):
        kind = CONNECTION
    if kind is None and connection_closed and isinstance(error, psycopg.OperationalError):
        kind = CONNECTION
    if kind is None:
        return None
    return Transient(kind, timeout=kind in (LOCK_TIMEOUT, STATEMENT_TIMEOUT), reconnect=kind == CONNECTION or connection_closed)


def backoff_seconds(attempt: int) -> float:
    """tenacity's exponential-with-jitter wait for the ``attempt``-th failure (1-based)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(BACKOFF(state))

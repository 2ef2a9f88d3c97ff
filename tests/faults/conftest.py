"""Fixtures of the fault tests: a PostgreSQL server of their own, so restarting it (or loading
it) never disturbs the rest of the suite, and the same canary password as every other DSN."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Same value as tests/conftest.py's CANARY_PASSWORD: the suite-wide hook fails a test whose
# output shows it, and support_faults asserts its absence in everything a run produces.
from support_faults.secrets import CANARY_PASSWORD

from backfill_cli.localpg import LocalPostgres


@pytest.fixture
def own_server() -> Iterator[LocalPostgres]:
    """A private server for one test (about 1 s to start): safe to restart, stop, overload."""
    server = LocalPostgres(settings={"max_connections": "50"}, password=CANARY_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()

"""Shared fixtures: a real PostgreSQL server started by the suite itself (never a mock)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from backfill_cli.localpg import LocalPostgres

# Every DSN the suite hands out carries this password. A hook below fails any test whose
# captured output, logs or failure report contains it: secrets must never leak anywhere.
CANARY_PASSWORD = "canary-Pw-7f3a9Q"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """One throwaway server per test session (about 1 s to start), password-protected over TCP."""
    server = LocalPostgres(settings={"max_connections": "200"}, password=CANARY_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def database(pg_server: LocalPostgres) -> Iterator[str]:
    """A fresh, empty database for one test; yields its superuser DSN."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_server.dsn(dbname=name)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn any leak of the canary password into a test failure (stdout, stderr, logs, errors)."""
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("allow_secret_output"):
        return
    texts = [content for name, content in report.sections if name.endswith(f" {report.when}")]
    if report.longrepr is not None:
        texts.append(str(report.longrepr))
    leaked = [text for text in texts if CANARY_PASSWORD in text]
    if leaked and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = f"the database password leaked into test output ({report.when}): secrets must be redacted"

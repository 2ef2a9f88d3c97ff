"""Shared fixtures: a real PostgreSQL server started by the suite itself (never a mock)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from backfill_worker.localpg import LocalPostgres


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """One throwaway server per test session (about 1 s to start)."""
    server = LocalPostgres(settings={"max_connections": "200"})
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

"""Exact keys whatever the role's or database's settings (issue 10, item 1).

Key values travel and are stored as text; a setting that changes a type's text form (floats
rounded by ``extra_float_digits = 0``, ``DateStyle``, ``TimeZone``...) would move a stored
bound and skip or repeat rows. These tests run the engine as a role whose defaults are hostile.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from session_roles import HOSTILE_SETTINGS, role_with_settings

from backfill_api.errors import ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill
from backfill_worker.run.engine import read_checkpoints, run_backfill


def make(**spec: Any) -> Backfill:
    return parse_backfill(
        {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "bf", "namespace": "t"}, "spec": spec}
    )


def _run_and_count(dsn: str, key_sql: str, values_sql: str, rows: int, parallelism: int = 1) -> tuple[int, int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE t (id {key_sql} PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)")
        conn.execute(f"INSERT INTO t (id, grp) SELECT {values_sql}, i % 4 FROM generate_series(1, {rows}) AS i")
    backfill = make(
        table="t", set={"counter": "counter + 1"}, where="grp < 2 AND counter = 0", parallelism=parallelism,
        batch={"size": 3, "minSize": 1, "maxSize": 3, "targetDuration": "0"},
    )
    report = run_backfill(backfill, dsn)
    assert report.state == "done"
    with psycopg.connect(dsn, autocommit=True) as conn:
        once, wrong = conn.execute(
            "SELECT count(*) FILTER (WHERE grp < 2 AND counter = 1), "
            "count(*) FILTER (WHERE (grp < 2) <> (counter = 1) OR counter NOT IN (0, 1)) FROM t"
        ).fetchone()  # type: ignore[misc]
        matching = conn.execute("SELECT count(*) FROM t WHERE grp < 2").fetchone()[0]  # type: ignore[index]
    assert report.remaining_matches == 0
    return once, wrong, matching


@pytest.mark.parametrize(
    ("key_sql", "values_sql"),
    [
        # 1/3 + i prints as 15 significant digits under extra_float_digits = 0: a smaller value than stored.
        ("float8", "i + 1.0 / 3"),
        ("float4", "(i + 1.0 / 3)::float4"),
        ("timestamptz", "timestamptz '2024-03-01 00:00:00.123456+00' + i * interval '1 day 1 microsecond'"),
        ("timestamp", "timestamp '2024-01-05 10:00:00.5' + i * interval '1 month 1 microsecond'"),
        ("date", "date '2024-01-01' + i * 3"),
        ("interval", "i * interval '1 day 3 hours 0.000001 seconds'"),
        ("bytea", "decode(lpad(to_hex(i * 7919), 8, '0'), 'hex')"),
        ("money", "(i * 1.37)::numeric::money"),
    ],
)
def test_role_settings_change_no_key(database: str, key_sql: str, values_sql: str) -> None:
    with role_with_settings(database, HOSTILE_SETTINGS) as dsn:
        once, wrong, matching = _run_and_count(dsn, key_sql, values_sql, rows=40)
    assert (once, wrong) == (matching, 0)


def test_database_settings_change_no_key(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        dbname = conn.info.dbname
        for name, value in HOSTILE_SETTINGS.items():
            conn.execute(f"ALTER DATABASE {dbname} SET {name} TO '{value}'")
    once, wrong, matching = _run_and_count(database, "float8", "i + 1.0 / 3", rows=40, parallelism=3)
    assert (once, wrong) == (matching, 0)


def test_stored_bound_is_the_exact_largest_key(database: str) -> None:
    with role_with_settings(database, {"extra_float_digits": "0"}) as dsn:
        _run_and_count(dsn, "float8", "i + 1.0 / 3", rows=10)
        [cp] = read_checkpoints(make(table="t", set={"counter": "counter + 1"}, where="grp < 2 AND counter = 0"), dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            exact = conn.execute("SELECT max(id) = %s::float8 FROM t", [cp.upper_key[0]]).fetchone()[0]  # type: ignore[index]
    assert exact, f"stored upper bound {cp.upper_key} is not the table's largest key"


@pytest.mark.parametrize(
    ("setup", "type_name"),
    [
        ("CREATE EXTENSION cube; CREATE TABLE t (id cube PRIMARY KEY, grp int NOT NULL)", "cube"),
        ("CREATE EXTENSION cube; CREATE TYPE pair AS (a int, c cube); CREATE TABLE t (id pair PRIMARY KEY, grp int NOT NULL)",
         "cube"),
        ("CREATE EXTENSION cube; CREATE DOMAIN dcube AS cube; CREATE TABLE t (id dcube[] PRIMARY KEY, grp int NOT NULL)", "cube"),
    ],
)
def test_key_of_a_type_that_may_not_round_trip_is_refused(database: str, setup: str, type_name: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'cube'").fetchone():
            pytest.skip("the cube extension (postgresql-contrib) is not installed on this server")
        for statement in setup.split("; "):
            conn.execute(statement)
    with pytest.raises(ValidationFailed) as caught:
        run_backfill(make(table="t", set={"grp": "0"}), database)
    assert caught.value.field == "spec.key"
    assert f"type {type_name} are not known to read back exactly" in str(caught.value)


@pytest.mark.parametrize(
    "column_sql",
    [
        "id citext PRIMARY KEY", "id mood PRIMARY KEY", "id pair2 PRIMARY KEY", "id int4range PRIMARY KEY",
        "id dint PRIMARY KEY", "id text[] PRIMARY KEY",
    ],
)
def test_exact_key_types_are_accepted(database: str, column_sql: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citext")
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
        conn.execute("CREATE TYPE pair2 AS (a int, b float8)")
        conn.execute("CREATE DOMAIN dint AS int CHECK (VALUE > 0)")
        conn.execute(f"CREATE TABLE t ({column_sql}, grp int NOT NULL)")
    assert run_backfill(make(table="t", set={"grp": "0"}), database).state == "done"


def test_tcp_keepalives_are_set_unless_the_dsn_sets_them() -> None:
    from backfill_worker.sql.connection import TCP_DEFAULTS, tcp_options

    assert tcp_options("host=db dbname=x") == TCP_DEFAULTS
    assert tcp_options("host=db keepalives_idle=60 tcp_user_timeout=0") == {
        k: v for k, v in TCP_DEFAULTS.items() if k not in ("keepalives_idle", "tcp_user_timeout")
    }
    assert "keepalives_count" not in tcp_options("postgresql://db/x?keepalives_count=9")


def test_engine_sessions_carry_the_pinned_settings(database: str) -> None:
    from backfill_worker.sql.connection import open_connection
    from backfill_worker.sql.session_settings import (
        SERVER_KEEPALIVE_SETTINGS,
        TEXT_IO_SETTINGS,
        current,
    )

    with role_with_settings(database, HOSTILE_SETTINGS) as dsn, open_connection(dsn) as conn:
        pinned = current(conn)
        keepalives = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", [list(SERVER_KEEPALIVE_SETTINGS)]
        ).fetchall())
    assert pinned["extra_float_digits"] == TEXT_IO_SETTINGS["extra_float_digits"]
    assert pinned["DateStyle"] == "ISO, YMD" and pinned["TimeZone"] == "UTC" and pinned["bytea_output"] == "hex"
    assert keepalives == SERVER_KEEPALIVE_SETTINGS

"""Validation catalogue: every bad spec fails before the first write, naming the field; no row changes."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from manifests import backfill_document

from backfill_api.errors import ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_worker.run.engine import run_backfill

SETUP = [
    "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL, status text, n int NOT NULL DEFAULT 0, "
    "last_login timestamptz NOT NULL DEFAULT now(), doubled int GENERATED ALWAYS AS (n * 2) STORED)",
    "INSERT INTO customers (id, email) SELECT i, 'c' || i || '@example.com' FROM generate_series(1, 50) i",
    "CREATE TABLE nokey (a int, b text)",
    "INSERT INTO nokey SELECT i, 'x' FROM generate_series(1, 5) i",
    "CREATE TABLE dupkey (id int NOT NULL, code int NOT NULL, b text)",
    "CREATE INDEX dupkey_code ON dupkey (code)",
    "CREATE UNIQUE INDEX dupkey_id ON dupkey (id)",
    "INSERT INTO dupkey SELECT i, i % 3, 'x' FROM generate_series(1, 5) i",
    "CREATE TABLE nullkey (id int, b text)",
    "CREATE UNIQUE INDEX nullkey_id ON nullkey (id)",
    "CREATE VIEW customers_view AS SELECT * FROM customers",
]


@pytest.fixture
def db(database: str) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        for command in SETUP:
            conn.execute(command)
    return database


def make(**spec: Any) -> Any:
    return parse_backfill(backfill_document("v", **spec))


def untouched(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        changed = conn.execute("SELECT count(*) FROM customers WHERE status IS NOT NULL OR n <> 0").fetchone()
        other = conn.execute("SELECT count(*) FROM nokey WHERE b <> 'x'").fetchone()
        checkpoints = conn.execute("SELECT to_regclass('backfill.checkpoints')").fetchone()
    return changed == (0,) and other == (0,) and checkpoints == (None,)


CATALOGUE = [
    ("unknown table", {"table": "nope", "set": {"status": "'x'"}}, "spec.table", "not found"),
    ("unknown schema", {"table": "nope.customers", "set": {"status": "'x'"}}, "spec.table", "not found"),
    ("a view", {"table": "customers_view", "set": {"status": "'x'"}}, "spec.table", "is a view"),
    ("unknown set column", {"table": "customers", "set": {"stauts": "'x'"}}, "spec.set.stauts", "does not exist"),
    ("unknown key column", {"table": "customers", "key": "idd", "set": {"status": "'x'"}}, "spec.key", "does not exist"),
    ("set on the key", {"table": "customers", "set": {"id": "id + 1"}}, "spec.set.id", "part of the key"),
    ("generated column", {"table": "customers", "set": {"doubled": "1"}}, "spec.set.doubled", "generated"),
    ("syntax error in set", {"table": "customers", "set": {"status": "'x' ||"}}, "spec.set.status", "syntax error"),
    ("unknown column in set", {"table": "customers", "set": {"status": "nosuch"}}, "spec.set.status", "does not exist"),
    ("wrong type", {"table": "customers", "set": {"last_login": "42"}}, "spec.set.last_login", "type"),
    ("bad literal for type", {"table": "customers", "set": {"n": "'abc'"}}, "spec.set.n", "invalid input syntax"),
    ("several values", {"table": "customers", "set": {"status": "'a', email = 'b'"}}, "spec.set.status", ""),
    ("paren escape in set", {"table": "customers", "set": {"status": "'a') , email = ('b'"}}, "spec.set.status", ""),
    ("semicolon in set", {"table": "customers", "set": {"status": "'a'; DELETE FROM customers"}}, "spec.set.status", ""),
    ("syntax error in where", {"table": "customers", "set": {"status": "'x'"}, "where": "status IS"}, "spec.where", "syntax error"),
    ("where not boolean", {"table": "customers", "set": {"status": "'x'"}, "where": "n + 1"}, "spec.where", "boolean"),
    ("paren escape in where", {"table": "customers", "set": {"status": "'x'"}, "where": "n = 1) OR (true"}, "spec.where", ""),
    ("no primary key", {"table": "nokey", "set": {"b": "'y'"}}, "spec.key", "no primary key"),
    ("non-unique key", {"table": "dupkey", "key": "code", "set": {"b": "'y'"}}, "spec.key", "no unique index"),
    ("nullable key", {"table": "nullkey", "key": "id", "set": {"b": "'y'"}}, "spec.key", "nullable"),
]


@pytest.mark.parametrize("name,spec,field,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_spec_fails_validation_and_changes_nothing(db: str, name: str, spec: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        run_backfill(make(**spec), db)
    assert caught.value.field == field, str(caught.value)
    assert message in caught.value.message
    assert "canary" not in str(caught.value)
    assert untouched(db)


def test_quoted_unicode_and_semicolon_identifiers_work(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Odd.Schema"')
        conn.execute('CREATE TABLE "Odd.Schema"."Tä;ble ""x""" ("Ключ" int PRIMARY KEY, "new; value" text, "Mixed" int)')
        conn.execute('INSERT INTO "Odd.Schema"."Tä;ble ""x""" SELECT i, NULL, i FROM generate_series(1, 30) i')
    backfill = make(
        table='"Odd.Schema"."Tä;ble ""x"""',
        set={"new; value": "'v' || \"Mixed\""},
        where='"Mixed" % 3 = 0 AND "new; value" IS NULL',
        batch={"size": 4, "minSize": 1, "maxSize": 4},
        checkpoint={"schema": "Check; Points"},
    )
    report = run_backfill(backfill, database)
    assert report.state == "done" and report.rows_updated == 10 and report.remaining_matches == 0
    with psycopg.connect(database, autocommit=True) as conn:
        rows = conn.execute('SELECT count(*) FROM "Odd.Schema"."Tä;ble ""x""" WHERE "new; value" = \'v\' || "Mixed"').fetchone()
        checkpoint = conn.execute('SELECT state FROM "Check; Points".checkpoints').fetchone()
    assert rows == (10,) and checkpoint == ("done",)


def test_percent_signs_and_comments_in_fragments(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, email text, tag text)")
        conn.execute("INSERT INTO t SELECT i, CASE WHEN i % 2 = 0 THEN 'a@corp.example' ELSE 'b@x.example' END FROM generate_series(1, 20) i")
    report = run_backfill(
        make(table="t", set={"tag": "'100%' -- a comment"}, where="email LIKE '%@corp.%' -- staff only"), database
    )
    assert report.rows_updated == 10
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE tag = '100%'").fetchone() == (10,)


def test_non_primary_unique_key_and_composite_key_in_any_order(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int NOT NULL, b text NOT NULL, v int)")
        conn.execute("CREATE UNIQUE INDEX t_ab ON t (a, b)")
        conn.execute("INSERT INTO t SELECT i, i % 4, 'k' || i, 0 FROM generate_series(1, 40) i")
    report = run_backfill(make(table="t", key=["b", "a"], set={"v": "v + 1"}, batch={"size": 3, "minSize": 1}), database)
    assert report.rows_updated == 40
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT min(v), max(v) FROM t").fetchone() == (1, 1)
        assert conn.execute("SELECT last_key FROM backfill.checkpoints").fetchone() == (["3", "k7"],)  # (a, b) order, b compared as text


def test_missing_privilege_and_read_only_session_fail_before_any_write(db: str) -> None:
    password = str(psycopg.conninfo.conninfo_to_dict(db)["password"])
    role = f"reader_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: unique per test run
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(psycopg.sql.Identifier(role), psycopg.sql.Literal(password)))
        conn.execute(f"GRANT SELECT ON customers TO {role}")
        conn.execute(f"GRANT UPDATE (status) ON customers TO {role}")
    dsn = db.replace("user=postgres", f"user={role}")
    try:
        with pytest.raises(ValidationFailed) as caught:
            run_backfill(make(table="customers", set={"n": "n + 1"}), dsn)
        assert caught.value.field == "spec.set.n" and "lacks UPDATE" in caught.value.message
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        with pytest.raises(ValidationFailed) as caught:
            run_backfill(make(table="customers", set={"status": "'x'"}), dsn)
        assert caught.value.field == "spec.database" and "read-only" in caught.value.message
        assert untouched(db)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")

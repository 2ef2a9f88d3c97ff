"""The kinds of change beside ``set`` (issue 12): batched DELETE, copy into another table, joined
updates. Each runs through the one engine loop against a real PostgreSQL; ``plan`` checks the
kind's own statement; refusals name the field. (Bad inputs through the CLI are in
test_bad_input_catalogue.py; SIGKILLs in tests/faults/test_fault_kinds.py.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document, write_manifest
from pydantic import ValidationError
from typer.testing import CliRunner

from backfill_api.errors import ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill, BackfillSpec
from backfill_cli.app import app
from backfill_worker.changes import changes
from backfill_worker.plan.planner import plan_backfill
from backfill_worker.plan.validation import resolve_target
from backfill_worker.run.engine import run_backfill
from backfill_worker.sql import statements
from backfill_worker.sql.statements import CopyInto, Join, Target


def make(name: str = "kinds", **spec: Any) -> Backfill:
    return parse_backfill(backfill_document(name, "t", **spec))


BATCHES = {"size": 37, "minSize": 1, "maxSize": 37, "targetDuration": "0"}


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def execute(dsn: str, *commands: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for command in commands:
            conn.execute(command)


EVENTS = (
    "CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, created date NOT NULL, payload text)",
    "INSERT INTO events SELECT g, CASE WHEN g % 3 = 0 THEN 'debug' ELSE 'order' END, date '2024-01-01' + g % 400, 'p' || g"
    " FROM generate_series(1, 3000) g",
    "ANALYZE events",
)

# -- the model: exactly one kind, and a delete says which rows ----------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"set": {"v": "1"}, "delete": {}}, "spec.set and spec.delete are both given: give exactly one of spec.set, spec.delete, spec.copy, spec.handler"),
        ({}, "nothing to change: give exactly one of"),
        ({"delete": {}}, "spec.where is required with delete"),
        ({"delete": {"allRows": True}, "where": "v = 1"}, "allRows: true deletes every row, but spec.where is given"),
        ({"copy": {"table": "u"}}, "onConflict"),
        ({"copy": {"table": "u", "onConflict": "replace"}}, "doNothing"),
        ({"delete": {}, "where": "v = 1", "from": [{"table": "u", "condition": "true"}]}, "spec.from joins tables into an update"),
    ],
)
def test_the_model_refuses_ambiguous_kinds(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackfillSpec.model_validate({"table": "t", **spec})


def test_a_delete_of_every_row_is_said_explicitly() -> None:
    spec = BackfillSpec.model_validate({"table": "t", "delete": {"allRows": True}})
    assert spec.kind == "delete" and spec.where is None


def test_fingerprint_of_an_update_is_unchanged_by_the_new_fields() -> None:
    """Checkpoints written before the new kinds existed still resume (their fingerprint did not move)."""
    spec = BackfillSpec.model_validate({"table": "t", "set": {"v": "1"}})
    legacy = {"table": "t", "key": None, "set": {"v": "1"}, "where": None, "parallelism": 1}
    assert spec.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]


# -- pure statements ------------------------------------------------------------------------------

TARGET = Target("public", "events", ("id",), "events_pkey", (), where="kind = 'debug'")


def test_delete_statement_is_the_range_and_the_where() -> None:
    text = statements.delete_batch(TARGET, has_lower=True, style=statements.Style.DOLLAR).as_string(None)
    assert text == 'DELETE FROM "public"."events" WHERE "id" > $1 AND "id" <= $2 AND (\nkind = \'debug\'\n)'


def test_copy_statement_names_the_conflict_key_and_updates_the_rest() -> None:
    copy = CopyInto("archive", "events", (("id", None), ("kind", "upper(kind)")), ("id",), update=True)
    text = statements.copy_batch(Target(**{**TARGET.__dict__, "copy": copy, "kind": "copy"}), has_lower=False).as_string(None)
    assert text == (
        'INSERT INTO "archive"."events" ("id", "kind") SELECT "id", (\nupper(kind)\n) FROM "public"."events" '
        'WHERE "id" <= %s AND (\nkind = \'debug\'\n) ON CONFLICT ("id") DO UPDATE SET "kind" = EXCLUDED."kind"'
    )


def test_join_statement_qualifies_the_target_key() -> None:
    joined = Target("public", "orders", ("id",), "orders_pkey", (("total", "a.rate * orders.qty"),),
                    joins=(Join("public", "accounts", "a", "a.id = orders.account_id"),))
    text = statements.update_batch(joined, has_lower=True).as_string(None)
    assert text == (
        'UPDATE "public"."orders" SET "total" = (\na.rate * orders.qty\n) FROM "public"."accounts" AS "a" '
        'WHERE "public"."orders"."id" > %s AND "public"."orders"."id" <= %s AND (\na.id = orders.account_id\n)'
    )


def test_for_spec_picks_the_kind() -> None:
    assert isinstance(changes.for_spec(make(delete={}, where="true", table="t").spec, TARGET), changes.SqlDelete)
    assert isinstance(changes.for_spec(make(set={"v": "1"}, table="t").spec, TARGET), changes.SqlUpdate)


# -- batched DELETE ---------------------------------------------------------------------------------


def test_delete_removes_exactly_the_matching_rows_over_two_shards(database: str) -> None:
    execute(database, *EVENTS)
    backfill = make(table="events", delete={}, where="kind = 'debug' AND created < date '2024-06-01'",
                    batch=BATCHES, parallelism=2)
    expected = rows(database, "SELECT id FROM events WHERE NOT (kind = 'debug' AND created < date '2024-06-01') ORDER BY id")
    deleted = 3000 - len(expected)

    plan = plan_backfill(backfill, database)
    assert plan.ok and "delete" in plan.statements and plan.statements["delete"].startswith("DELETE FROM")
    assert {check.statement for check in plan.index_checks} == {"probe", "delete"}
    assert plan.sample is not None and plan.sample.rows > 0
    assert rows(database, "SELECT count(*) FROM events") == [(3000,)]  # the sample was rolled back

    report = run_backfill(backfill, database)
    assert report.state == "done" and report.rows_updated == deleted and report.remaining_matches == 0
    assert rows(database, "SELECT id FROM events ORDER BY id") == expected
    assert run_backfill(backfill, database).rows_updated == deleted  # a rerun: done, nothing more


def test_delete_all_rows_verifies_an_empty_table(database: str) -> None:
    execute(database, *EVENTS)
    report = run_backfill(make(table="events", delete={"allRows": True}, batch=BATCHES), database)
    assert report.state == "done" and report.rows_updated == 3000 and report.remaining_matches == 0
    assert rows(database, "SELECT count(*) FROM events") == [(0,)]


# -- copy -------------------------------------------------------------------------------------------

ARCHIVE = (
    "CREATE SCHEMA archive",
    # Partitioned by range of created: the unique key includes the partition key.
    "CREATE TABLE archive.events (id bigint NOT NULL, created date NOT NULL, kind text NOT NULL, note text,"
    " PRIMARY KEY (id, created)) PARTITION BY RANGE (created)",
    "CREATE TABLE archive.events_2024 PARTITION OF archive.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    "CREATE TABLE archive.events_2025 PARTITION OF archive.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
)


@pytest.mark.parametrize("policy", ["doNothing", "update"])
def test_copy_into_a_partitioned_table_in_another_schema(database: str, policy: str) -> None:
    execute(database, *EVENTS, *ARCHIVE,
            # A row already there: doNothing keeps it, update overwrites the copied columns (note is not copied).
            "INSERT INTO archive.events VALUES (2, date '2024-01-03', 'stale', 'kept')")
    backfill = make(table="events", copy={"table": "archive.events", "onConflict": policy}, where="kind = 'order'",
                    batch=BATCHES, parallelism=2)
    plan = plan_backfill(backfill, database)
    assert plan.ok and plan.statements["copy"].startswith('INSERT INTO "archive"."events" ("id", "created", "kind")')

    report = run_backfill(backfill, database)
    orders = rows(database, "SELECT count(*) FROM events WHERE kind = 'order'")[0][0]
    assert report.state == "done" and report.remaining_matches == 0
    assert report.rows_updated == (orders if policy == "update" else orders - 1)
    assert rows(database, "SELECT kind, note FROM archive.events WHERE id = 2") == [
        ("stale", "kept") if policy == "doNothing" else ("order", "kept")
    ]
    missing_or_extra = rows(
        database,
        "SELECT count(*) FROM events e FULL JOIN archive.events a USING (id, created)"
        " WHERE (e.kind = 'order') IS DISTINCT FROM (a.id IS NOT NULL)",
    )
    assert missing_or_extra == [(0,)]
    assert rows(database, "SELECT count(*) FROM ONLY archive.events") == [(0,)]  # the rows live in the partitions


def test_copy_verification_counts_rows_missing_from_the_target(database: str) -> None:
    """After a done copy, a deleted target row shows up as one missing row (the count is real)."""
    execute(database, *EVENTS, "CREATE TABLE copy_of (id bigint PRIMARY KEY, label text NOT NULL)")
    backfill = make(table="events", copy={"table": "copy_of", "columns": {"id": "id", "label": "kind || ':' || payload"},
                                          "onConflict": "doNothing"}, batch=BATCHES)
    assert run_backfill(backfill, database).remaining_matches == 0
    assert rows(database, "SELECT label FROM copy_of WHERE id = 3") == [("debug:p3",)]
    execute(database, "DELETE FROM copy_of WHERE id IN (5, 2999)")
    change = changes.SqlCopy(_resolved(database, backfill))
    with psycopg.connect(database, autocommit=True) as conn:
        assert change.remaining(conn, None, ("3000",)) == 2


def _resolved(dsn: str, backfill: Backfill) -> Target:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return resolve_target(conn, backfill.spec)


# -- joined updates ---------------------------------------------------------------------------------

ORDERS = (
    "CREATE TABLE accounts (id int PRIMARY KEY, region text NOT NULL)",
    "INSERT INTO accounts SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END FROM generate_series(1, 100) g",
    "CREATE TABLE orders (id bigint PRIMARY KEY, account_id int NOT NULL, region text, touched int NOT NULL DEFAULT 0)",
    "INSERT INTO orders (id, account_id) SELECT g, 1 + g % 100 FROM generate_series(1, 4000) g",
    "ANALYZE accounts", "ANALYZE orders",
)


def test_join_update_sets_each_row_once_from_the_other_table(database: str) -> None:
    execute(database, *ORDERS)
    backfill = make(table="orders", set={"region": "a.region", "touched": "touched + 1"},
                    **{"from": [{"table": "accounts", "alias": "a", "condition": "a.id = orders.account_id"}]},
                    where="orders.region IS NULL", batch=BATCHES, parallelism=2)
    plan = plan_backfill(backfill, database)
    assert plan.index_ok, plan.index_checks
    assert plan.duplicate_matches == 0 and plan.ok
    report = run_backfill(backfill, database)
    assert report.state == "done" and report.rows_updated == 4000 and report.remaining_matches == 0
    assert rows(database, "SELECT count(*) FROM orders o JOIN accounts a ON a.id = o.account_id"
                          " WHERE o.region = a.region AND o.touched = 1") == [(4000,)]


def test_plan_finds_target_rows_the_join_matches_twice(database: str) -> None:
    execute(database, *ORDERS, "CREATE TABLE regions (account_id int NOT NULL, region text NOT NULL)",
            "INSERT INTO regions SELECT id, region FROM accounts",
            "INSERT INTO regions VALUES (2, 'apac')")  # account 2 now has two regions
    backfill = make(table="orders", set={"region": "r.region"},
                    **{"from": [{"table": "regions", "alias": "r", "condition": "r.account_id = orders.account_id"}]},
                    batch={"size": 500, "minSize": 1})
    plan = plan_backfill(backfill, database)
    assert plan.duplicate_matches == 5  # orders 101, 201, ... 401 of the first 500 have account 2
    assert not plan.ok


def test_join_refusals_name_the_field(database: str) -> None:
    execute(database, *ORDERS)
    cases = [
        ({"from": [{"table": "no_such", "condition": "true"}]}, "spec.from[0].table", "not found"),
        ({"from": [{"table": "accounts", "alias": "orders", "condition": "true"}]}, "spec.from[0].alias", "another alias"),
        ({"from": [{"table": "accounts", "alias": "a", "condition": "a.nope = orders.account_id"}]}, "spec.from[0].condition", "nope"),
    ]
    for extra, field, message in cases:
        with pytest.raises(ValidationFailed) as error:
            run_backfill(make(table="orders", set={"touched": "1"}, **extra), database)
        assert error.value.field == field and message in str(error.value), (field, str(error.value))
    assert rows(database, "SELECT sum(touched) FROM orders") == [(0,)]


def test_cli_plan_fails_on_a_join_with_several_matches(database: str, tmp_path: Path) -> None:
    execute(database, *ORDERS, "CREATE TABLE regions (account_id int NOT NULL, region text NOT NULL)",
            "INSERT INTO regions SELECT id, region FROM accounts UNION ALL SELECT 2, 'apac'")
    document = backfill_document("dup", "t", table="orders", set={"region": "r.region"},
                                 **{"from": [{"table": "regions", "alias": "r", "condition": "r.account_id = orders.account_id"}]})
    path = write_manifest(tmp_path, document)
    result = CliRunner().invoke(app, ["plan", str(path)], env={"BACKFILL_DSN": database, "COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "JOIN MATCHES SEVERAL ROWS" in result.output and "plan_ok=false" in result.output
    assert 'FROM "public"."regions" AS "r"' in result.output  # the rendered update statement


def test_hostile_identifiers_in_copy_and_join(database: str) -> None:
    """Quotes, dots, semicolons and unicode in the target's, the joined table's and the alias's names just work."""
    execute(
        database,
        'CREATE SCHEMA "dot.schema"',
        'CREATE TABLE "we""ird" ("k;ey" bigint PRIMARY KEY, "Größe" int NOT NULL, note text)',
        'INSERT INTO "we""ird" SELECT g, g % 7, NULL FROM generate_series(1, 500) g',
        'CREATE TABLE "dot.schema"."tä.ble" ("k;ey" bigint PRIMARY KEY, "Größe" int NOT NULL)',
        'CREATE TABLE "x; DROP TABLE y" (g int PRIMARY KEY, label text NOT NULL)',
        'INSERT INTO "x; DROP TABLE y" SELECT g, \'L\' || g FROM generate_series(0, 6) g',
    )
    copy = make("hostile-copy", table='"we""ird"', copy={"table": '"dot.schema"."tä.ble"', "onConflict": "update"}, batch=BATCHES)
    assert run_backfill(copy, database).remaining_matches == 0
    assert rows(database, 'SELECT count(*), sum("Größe") FROM "dot.schema"."tä.ble"') == [(500, sum(g % 7 for g in range(1, 501)))]
    join = make("hostile-join", table='"we""ird"', set={"note": '"a.l""ias".label'}, where="note IS NULL", batch=BATCHES,
                **{"from": [{"table": '"x; DROP TABLE y"', "alias": 'a.l"ias', "condition": '"a.l""ias".g = "we""ird"."Größe"'}]})
    assert plan_backfill(join, database).ok
    assert run_backfill(join, database).remaining_matches == 0
    assert rows(database, 'SELECT count(*) FROM "we""ird" WHERE note = \'L\' || "Größe"') == [(500,)]

"""Plan warnings (issue 19, part 2): each on a real PostgreSQL schema that triggers it, and one that does not.

The decisions are pure (``plan_warnings``); these tests run the whole ``plan_backfill`` on real
tables, so the catalog queries, the sample batch's measurements and the judgement meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import yaml
from typer.testing import CliRunner

from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill
from backfill_cli.app import PLAN_WARNINGS_EXIT, app
from backfill_worker.plan.plan_warnings import WarningKind
from backfill_worker.plan.planner import Plan, plan_backfill

ROWS = 20_000


def document(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "warn", "namespace": "t"},
            "spec": {"table": "customers", **spec}}


def make(**spec: Any) -> Backfill:
    return parse_backfill(document(**spec))


def setup(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, grp int NOT NULL, n int NOT NULL DEFAULT 0, code int UNIQUE)")
        conn.execute("INSERT INTO customers (id, grp, code) SELECT i, i %% 100, i FROM generate_series(1, %s) i", [ROWS])
        for statement in statements:
            conn.execute(statement)
        conn.execute("ANALYZE")


def kinds(plan: Plan) -> list[WarningKind]:
    return [w.kind for w in plan.warnings]


def only(plan: Plan, kind: WarningKind) -> Any:
    found = [w for w in plan.warnings if w.kind is kind]
    assert len(found) == 1, plan.warnings
    return found[0]


ORDERS = (
    "CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers ON DELETE CASCADE)",
    f"INSERT INTO orders SELECT i, 1 + i % {ROWS} FROM generate_series(1, 30000) i",
)


def test_a_cascade_child_without_an_index_on_its_key_is_named_with_the_ddl(database: str) -> None:
    setup(database, *ORDERS)
    plan = plan_backfill(make(delete={}, where="grp = 1"), database)
    warning = only(plan, WarningKind.UNINDEXED_FOREIGN_KEY)
    assert "public.orders (customer_id)" in warning.message and "ON DELETE CASCADE" in warning.message
    assert 'CREATE INDEX CONCURRENTLY ON "public"."orders" ("customer_id");' in warning.fix
    with psycopg.connect(database) as conn:
        blocks = conn.execute("SELECT pg_relation_size('orders') / 8192").fetchone()
    assert blocks is not None and blocks[0] > 0
    assert f"~30,000 rows, {blocks[0]:,} blocks, scanned once per changed row" in warning.measurement
    assert "ms a row" in warning.measurement


def test_an_indexed_cascade_child_is_not_warned_about(database: str) -> None:
    setup(database, *ORDERS, "CREATE INDEX ON orders (customer_id, id)")
    assert WarningKind.UNINDEXED_FOREIGN_KEY not in kinds(plan_backfill(make(delete={}, where="grp = 1"), database))


def test_a_no_action_key_is_checked_on_update_of_the_referenced_column_only(database: str) -> None:
    setup(database, "CREATE TABLE refs (id int PRIMARY KEY, code int REFERENCES customers (code))",
          "INSERT INTO refs SELECT i, i FROM generate_series(1, 100) i")
    warned = plan_backfill(make(set={"code": "code + 0"}, where="grp = 1"), database)
    assert "ON UPDATE NO ACTION" in only(warned, WarningKind.UNINDEXED_FOREIGN_KEY).message
    assert WarningKind.UNINDEXED_FOREIGN_KEY not in kinds(plan_backfill(make(set={"n": "n + 1"}), database))


TRIGGER = (
    "CREATE TABLE audit (id int, at timestamptz DEFAULT now())",
    "CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$",
)


def test_row_triggers_are_named_with_timing_and_event(database: str) -> None:
    setup(database, *TRIGGER, "CREATE TRIGGER customers_audit AFTER UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION audit_row()")
    warning = only(plan_backfill(make(set={"n": "n + 1"}), database), WarningKind.ROW_TRIGGERS)
    assert "customers_audit (AFTER UPDATE FOR EACH ROW, audit_row)" in warning.message
    assert "ms a row" in warning.measurement


def test_triggers_that_do_not_fire_for_the_change_are_not_warned_about(database: str) -> None:
    setup(database, *TRIGGER,
          "CREATE TRIGGER on_insert AFTER INSERT ON customers FOR EACH ROW EXECUTE FUNCTION audit_row()",
          "CREATE TRIGGER on_code BEFORE UPDATE OF code ON customers FOR EACH ROW EXECUTE FUNCTION audit_row()",
          "CREATE TRIGGER per_statement AFTER UPDATE ON customers FOR EACH STATEMENT EXECUTE FUNCTION audit_row()",
          "CREATE TRIGGER disabled AFTER UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION audit_row()",
          "ALTER TABLE customers DISABLE TRIGGER disabled")
    assert WarningKind.ROW_TRIGGERS not in kinds(plan_backfill(make(set={"n": "n + 1"}), database))


def test_a_sparse_where_says_how_many_rows_a_batch_reads_per_row_it_changes(database: str) -> None:
    setup(database)
    warning = only(plan_backfill(make(set={"n": "n + 1"}, where="grp = 7", batch={"size": 1000}), database),
                   WarningKind.SPARSE_WHERE)
    assert "100.0 rows read per row changed" in warning.measurement  # 1 in 100 rows matches
    assert "changed 10 rows of 1,000 keys" in warning.measurement


def test_a_where_matching_most_rows_is_not_sparse(database: str) -> None:
    setup(database)
    assert WarningKind.SPARSE_WHERE not in kinds(plan_backfill(make(set={"n": "n + 1"}, where="grp <> 7"), database))


def test_autovacuum_off_for_the_table_is_warned_about(database: str) -> None:
    setup(database, "ALTER TABLE customers SET (autovacuum_enabled = false)")
    warning = only(plan_backfill(make(set={"n": "n + 1"}), database), WarningKind.AUTOVACUUM_OFF)
    assert f"~{ROWS:,}" in warning.measurement and "VACUUM" in warning.fix


def test_autovacuum_that_cannot_keep_up_is_warned_about_and_a_fast_one_is_not(database: str) -> None:
    # 1 cost point per 100 ms: ~0.5 pages/s; the table's ~100 blocks take minutes per pass, and
    # the run (200 batches, 2 s apart) lasts longer than that and leaves ~50 dead tuples a second.
    slow = {"size": 100, "minSize": 100, "maxSize": 100, "pause": "2s"}
    setup(database, "ALTER TABLE customers SET (autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1, "
                    "autovacuum_vacuum_threshold = 50, autovacuum_vacuum_scale_factor = 0)")
    warning = only(plan_backfill(make(set={"n": "n + 1"}, batch=slow), database), WarningKind.AUTOVACUUM_BEHIND)
    assert "dead tuples/s" in warning.measurement and "autovacuum_vacuum_cost_delay = 0" in warning.fix
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE customers RESET (autovacuum_vacuum_cost_delay, autovacuum_vacuum_cost_limit)")
    plan = plan_backfill(make(set={"n": "n + 1"}, batch=slow), database)
    assert kinds(plan) == []
    assert plan.estimate is not None and plan.estimate.dead_tuples == ROWS and plan.estimate.rows == ROWS


def test_the_estimate_scales_the_sample_batchs_wal_and_time(database: str) -> None:
    setup(database)
    plan = plan_backfill(make(set={"n": "n + 1"}, batch={"size": 1000}), database)
    assert plan.sample is not None and plan.sample.wal_bytes is not None and plan.sample.wal_bytes > 1000 * 20
    estimate = plan.estimate
    assert estimate is not None and estimate.batches == ROWS // 1000
    assert estimate.wal_bytes == round(plan.sample.wal_bytes * ROWS / plan.sample.rows)
    assert estimate.seconds is not None and estimate.seconds > 0 and "timed sample batch" in estimate.basis
    with psycopg.connect(database, autocommit=True) as conn:  # the sample never commits
        assert conn.execute("SELECT count(*) FROM customers WHERE n <> 0").fetchone() == (0,)


def test_the_cli_prints_warnings_and_fails_only_when_strict(database: str, tmp_path: Path) -> None:
    setup(database, *ORDERS)
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(document(delete={}, where="grp = 1")))
    runner = CliRunner()
    plain = runner.invoke(app, ["plan", str(path), "--dsn", database])
    assert plain.exit_code == 0, plain.output
    assert "unindexed-foreign-key" in plain.output and "CREATE INDEX CONCURRENTLY" in plain.output
    assert "plan_warnings=unindexed-foreign-key,sparse-where" in plain.output
    assert "WAL, the whole run: ~" in plain.output and "an estimate" in plain.output
    strict = runner.invoke(app, ["plan", str(path), "--dsn", database, "--strict"])
    assert strict.exit_code == PLAN_WARNINGS_EXIT
    path.write_text(yaml.safe_dump(document(set={"n": "n + 1"})))
    clean = runner.invoke(app, ["plan", str(path), "--dsn", database, "--strict"])
    assert clean.exit_code == 0 and "warnings: none" in clean.output and "plan_warnings=-" in clean.output


def test_a_partitioned_child_counts_its_partitions_and_its_partitioned_index(database: str) -> None:
    setup(database,
          "CREATE TABLE lines (id int, customer_id int REFERENCES customers ON DELETE SET NULL) PARTITION BY RANGE (id)",
          "CREATE TABLE lines_1 PARTITION OF lines FOR VALUES FROM (0) TO (5000)",
          "CREATE TABLE lines_2 PARTITION OF lines FOR VALUES FROM (5000) TO (10000)",
          "INSERT INTO lines SELECT i, 1 + i FROM generate_series(0, 9999) i")
    warning = only(plan_backfill(make(delete={}, where="grp = 1"), database), WarningKind.UNINDEXED_FOREIGN_KEY)
    assert "public.lines (customer_id)" in warning.message and "ON DELETE SET NULL" in warning.message
    assert "~10,000 rows" in warning.measurement  # one foreign key (not one per partition), rows of both
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE INDEX ON lines (customer_id)")
    assert WarningKind.UNINDEXED_FOREIGN_KEY not in kinds(plan_backfill(make(delete={}, where="grp = 1"), database))

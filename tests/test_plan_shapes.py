"""The plan check over table shapes (issue 10, item 4): right both ways.

Accepted: partitioned tables (each partition's own key index is used), subqueries in set/where
that scan other tables' indexes, triggers, inheritance children with their own key index.
Refused at validation (before any write, not only in ``plan``): a unique key index whose
collation or operator class cannot serve the key's ordering.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from backfill_api.errors import ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill
from backfill_worker.plan.planner import plan_backfill
from backfill_worker.run.engine import run_backfill

ROWS = 30_000


def make(**spec: Any) -> Backfill:
    return parse_backfill(
        {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "shape", "namespace": "t"}, "spec": spec}
    )


def seed(conn: psycopg.Connection, table: str = "t") -> None:
    conn.execute(f"INSERT INTO {table} (id, grp) SELECT i, i % 10 FROM generate_series(1, {ROWS}) AS i")


SHAPES: dict[str, list[str]] = {
    "plain": ["CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)"],
    "partitioned-range": [
        "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0) PARTITION BY RANGE (id)",
        "CREATE TABLE t_1 PARTITION OF t FOR VALUES FROM (MINVALUE) TO (10000)",
        "CREATE TABLE t_2 PARTITION OF t FOR VALUES FROM (10000) TO (20000)",
        "CREATE TABLE t_3 PARTITION OF t FOR VALUES FROM (20000) TO (MAXVALUE)",
    ],
    "partitioned-list": [
        "CREATE TABLE t (id int NOT NULL, grp int NOT NULL, counter int NOT NULL DEFAULT 0, PRIMARY KEY (id, grp)) PARTITION BY LIST (grp)",
        "CREATE TABLE t_low PARTITION OF t FOR VALUES IN (0, 1, 2, 3, 4)",
        "CREATE TABLE t_high PARTITION OF t FOR VALUES IN (5, 6, 7, 8, 9)",
    ],
    "partitioned-hash": [
        "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0) PARTITION BY HASH (id)",
        *[f"CREATE TABLE t_h{i} PARTITION OF t FOR VALUES WITH (MODULUS 3, REMAINDER {i})" for i in range(3)],
    ],
    "subquery": [
        "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)",
        "CREATE TABLE groups (grp int PRIMARY KEY, active bool NOT NULL)",
        "INSERT INTO groups SELECT g, g < 5 FROM generate_series(0, 9) g",
    ],
    "trigger": [
        "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)",
        "CREATE TABLE audit (id int PRIMARY KEY, n int NOT NULL)",
        ("CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO audit VALUES (NEW.id, 1) ON CONFLICT (id) DO UPDATE SET n = audit.n + 1; RETURN NEW; END $$"),
        "CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION audit_row()",
    ],
    "inheritance": [
        "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)",
        "CREATE TABLE t_child (PRIMARY KEY (id)) INHERITS (t)",
    ],
}
WHERE = {"subquery": "grp IN (SELECT g.grp FROM groups g WHERE g.active) AND counter = 0"}
SET = {"subquery": "counter + (SELECT count(*) FROM groups g WHERE g.grp = t.grp AND g.active)::int"}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_check_and_run_over_table_shapes(database: str, shape: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        for statement in SHAPES[shape]:
            conn.execute(statement)
        if shape == "inheritance":
            conn.execute(f"INSERT INTO t (id, grp) SELECT i, i % 10 FROM generate_series(1, {ROWS // 2}) AS i")
            conn.execute(f"INSERT INTO t_child (id, grp) SELECT i, i % 10 FROM generate_series({ROWS // 2 + 1}, {ROWS}) AS i")
        else:
            seed(conn)
        conn.execute("ANALYZE")
    key = ["id", "grp"] if shape == "partitioned-list" else None
    backfill = make(
        table="t", key=key, set={"counter": SET.get(shape, "counter + 1")}, where=WHERE.get(shape, "grp < 5 AND counter = 0"),
        batch={"size": 500, "minSize": 100, "maxSize": 500, "targetDuration": "0"},
    )
    plan = plan_backfill(backfill, database)
    assert plan.index_ok, [(c.statement, c.generic, c.scans) for c in plan.index_checks]
    report = run_backfill(backfill, database)
    assert report.state == "done" and report.remaining_matches == 0
    with psycopg.connect(database, autocommit=True) as conn:
        wrong = conn.execute("SELECT count(*) FROM t WHERE counter <> (grp < 5)::int").fetchone()[0]  # type: ignore[index]
        if shape == "trigger":
            assert conn.execute("SELECT count(*), max(n) FROM audit").fetchone() == (ROWS // 2, 1)
    assert wrong == 0


@pytest.mark.parametrize(
    ("index_sql", "fix"),
    [
        ('CREATE UNIQUE INDEX t_code_key ON t (code COLLATE "C")', "collation"),
        ("CREATE UNIQUE INDEX t_code_key ON t (code text_pattern_ops)", "operator class"),
    ],
)
def test_key_index_that_cannot_serve_the_key_order_is_refused_at_validation(database: str, index_sql: str, fix: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute('CREATE TABLE t (code text COLLATE "en-US-x-icu" NOT NULL, counter int NOT NULL DEFAULT 0)')
        conn.execute(index_sql)
        conn.execute("INSERT INTO t (code) SELECT 'c' || i FROM generate_series(1, 100) AS i")
    with pytest.raises(ValidationFailed) as caught:
        run_backfill(make(table="t", key="code", set={"counter": "counter + 1"}), database)
    message = str(caught.value)
    assert caught.value.field == "spec.key" and "t_code_key" in message and fix in message, message
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT max(counter) FROM t").fetchone() == (0,)


def test_a_bitmap_scan_of_another_tables_index_is_not_the_batch_walk() -> None:
    """PURE: a semi-join whose inner side bitmap-scans another table's index (as a where
    subquery can plan) leaves the target's own walk through its key index acceptable."""
    from backfill_worker.plan.planner import reads_only_through

    plan = [{"Plan": {"Node Type": "ModifyTable", "Relation Name": "t", "Plans": [{
        "Node Type": "Nested Loop", "Plans": [
            {"Node Type": "Index Scan", "Relation Name": "t", "Index Name": "t_pkey"},
            {"Node Type": "Bitmap Heap Scan", "Relation Name": "tags", "Plans": [
                {"Node Type": "Bitmap Index Scan", "Index Name": "tags_flag_idx"}]},
        ]}]}}]
    assert reads_only_through(plan, {"t": ["t_pkey"]})
    seq = [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t_2"}}]
    assert not reads_only_through(seq, {"t": ["t_pkey"], "t_2": ["t_2_pkey"]})
    subplan = [{"Plan": {"Node Type": "Index Scan", "Relation Name": "t", "Index Name": "t_pkey", "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "t", "Parent Relationship": "SubPlan"}]}}]
    assert reads_only_through(subplan, {"t": ["t_pkey"]})


def _seq_scanned(plan: Any) -> list[tuple[str, bool]]:
    return [(c.statement, c.generic) for c in plan.index_checks if not c.uses_index]


def test_a_tiny_analyzed_table_read_whole_is_not_a_failed_plan_check(database: str) -> None:
    """120 rows in one block: with statistics the planner rightly prefers a sequential scan for
    a batch of 10 keys; ``backfill plan`` must not fail on that (it did, once autovacuum had
    analyzed the table)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(SHAPES["plain"][0])
        conn.execute("INSERT INTO t (id, grp) SELECT i, i % 10 FROM generate_series(1, 120) AS i")
        conn.execute("ANALYZE t")
    plan = plan_backfill(make(table="t", set={"counter": "1"}, where="grp < 5", batch={"size": 10, "minSize": 10, "maxSize": 10}), database)
    assert _seq_scanned(plan), "precondition: the planner reads this tiny table whole"
    assert plan.index_ok and all(not c.required for c in plan.index_checks), plan.index_checks


def test_a_table_read_whole_is_still_a_failed_plan_check_once_it_is_not_tiny(database: str) -> None:
    """The other side: 30,000 rows with the planner kept off the indexes (a setting of the
    database, as a misconfigured one might have) fail the check."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(SHAPES["plain"][0])
        seed(conn)
        conn.execute("ANALYZE t")
        name = sql.Identifier(conn.info.dbname)
        for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = off").format(name, sql.Identifier(setting)))
    plan = plan_backfill(make(table="t", set={"counter": "1"}, where="grp < 5", batch={"size": 500}), database)
    assert _seq_scanned(plan) and not plan.index_ok, plan.index_checks

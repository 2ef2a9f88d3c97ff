"""The engine against a real PostgreSQL: key types, where, resume, shards, locks, retries, plan shape."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document

from backfill_api.errors import AlreadyRunning, CheckpointMismatch, CheckpointUnavailable, RetriesExhausted
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill, BatchSpec
from backfill_worker.changes import changes
from backfill_worker.checkpoints.checkpoint import JsonFileStore
from backfill_worker.observe.events import BatchCommitted, RetryScheduled, RunFinished, StaticControl, Throttled, Tuning
from backfill_worker.plan.planner import check_index_use, plan_backfill
from backfill_worker.plan.validation import resolve_target
from backfill_worker.run.engine import read_checkpoints, reset_checkpoints, run_backfill
from backfill_worker.sql import statements
from backfill_worker.sql.statements import Style


def make(name: str = "bf", **spec: Any) -> Backfill:
    return parse_backfill(backfill_document(name, "t", **spec))


def small_batches(size: int = 7) -> dict[str, Any]:
    return {"size": size, "minSize": 1, "maxSize": size, "targetDuration": "0"}


def sql_rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def setup_sql(dsn: str, *commands: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for command in commands:
            conn.execute(command)


KEY_TABLES = {
    "integer": ("id integer PRIMARY KEY", "i"),
    "bigint": ("id bigint PRIMARY KEY", "i * 10000000000"),
    "uuid": ("id uuid PRIMARY KEY", "md5(i::text)::uuid"),
    "text": ("id text PRIMARY KEY", "'k-' || i"),
    "timestamptz": ("id timestamptz PRIMARY KEY", "timestamptz '2024-01-01 00:00:00.123456+00' + i * interval '1 second 1 microsecond'"),
    "numeric": ("id numeric PRIMARY KEY", "i / 7.0"),
    "composite": ("tenant int, id text, PRIMARY KEY (tenant, id)", "i % 3, 'x' || i"),
}


@pytest.mark.parametrize("kind", list(KEY_TABLES))
def test_every_key_type_updates_exactly_the_matching_rows(database: str, kind: str) -> None:
    columns, key_expr = KEY_TABLES[kind]
    key_cols = "tenant, id" if kind == "composite" else "id"
    setup_sql(
        database,
        f"CREATE TABLE items ({columns}, n int NOT NULL, flag text)",
        f"INSERT INTO items ({key_cols}, n) SELECT {key_expr}, i FROM generate_series(1, 200) AS i",
    )
    events: list[Any] = []
    report = run_backfill(
        make(table="items", set={"flag": "'x' || n"}, where="n % 2 = 0 AND flag IS NULL", batch=small_batches(), parallelism=2),
        database, listeners=[events.append],
    )
    assert report.state == "done"
    assert report.rows_updated == 100
    assert report.remaining_matches == 0
    assert sql_rows(database, "SELECT count(*) FROM items WHERE flag = 'x' || n AND n % 2 = 0") == [(100,)]
    assert sql_rows(database, "SELECT count(*) FROM items WHERE flag IS NOT NULL") == [(100,)]
    batches = [e for e in events if isinstance(e, BatchCommitted)]
    assert sum(e.keys_scanned for e in batches) == 200  # every key visited exactly once across both shards


def test_resume_after_stop_continues_from_checkpoint(database: str) -> None:
    setup_sql(
        database,
        "CREATE TABLE t (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0)",
        "INSERT INTO t (id) SELECT generate_series(1, 100)",
    )
    backfill = make(table="t", set={"counter": "counter + 1"}, batch=small_batches(10))
    control = StaticControl()

    def stop_after_three(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 3:
            control.request_stop("test")

    first = run_backfill(backfill, database, listeners=[stop_after_three], control=control)
    assert first.state == "paused" and first.rows_updated == 30
    assert sql_rows(database, "SELECT count(*) FROM t WHERE counter = 1") == [(30,)]
    [cp] = read_checkpoints(backfill, database)
    assert cp.state == "paused" and cp.last_key == ("30",) and cp.batches == 3
    second = run_backfill(backfill, database)
    assert second.state == "done" and second.rows_updated == 100
    assert sql_rows(database, "SELECT min(counter), max(counter) FROM t") == [(1, 1)]
    third = run_backfill(backfill, database)  # already done: no batch, nothing changes
    assert third.state == "done" and third.batches == 10
    assert sql_rows(database, "SELECT max(counter) FROM t") == [(1,)]
    assert reset_checkpoints(backfill, database) == 1
    assert read_checkpoints(backfill, database) == []


def test_changed_spec_is_refused_until_reset(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 20), 0")
    run_backfill(make(table="t", set={"v": "1"}), database)
    with pytest.raises(CheckpointMismatch, match="backfill reset"):
        run_backfill(make(table="t", set={"v": "2"}), database)
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(20,)]


def test_rows_inserted_after_start_are_outside_the_run(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 50), 0")
    backfill = make(table="t", set={"v": "1"}, batch=small_batches(10))

    def insert_late(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 1:
            setup_sql(database, "INSERT INTO t VALUES (51, 0), (52, 0)")

    run_backfill(backfill, database, listeners=[insert_late])
    assert sql_rows(database, "SELECT id FROM t WHERE v = 0 ORDER BY id") == [(51,), (52,)]


def test_parallel_shards_split_the_range_and_all_finish(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 1000), 0")
    backfill = make(table="t", set={"v": "v + 1"}, parallelism=4, batch=small_batches(50))
    report = run_backfill(backfill, database)
    assert [s.state for s in report.shards] == ["done"] * 4
    assert all(s.rows_updated > 0 for s in report.shards)
    assert sql_rows(database, "SELECT min(v), max(v) FROM t") == [(1, 1)]
    checkpoints = read_checkpoints(backfill, database)
    assert [cp.upper_key for cp in checkpoints][-1] == ("1000",)
    for left, right in itertools.pairwise(checkpoints):
        assert right.lower_key == left.upper_key  # contiguous, non-overlapping ranges


def test_running_one_shard_of_several(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 100), 0")
    backfill = make(table="t", set={"v": "1"}, parallelism=2)
    report = run_backfill(backfill, database, shards=[1])
    assert [s.shard for s in report.shards] == [1]
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(50,)]
    assert sql_rows(database, "SELECT max(id) FROM t WHERE v = 0") == [(50,)]


def test_second_runner_gets_already_running_and_touches_nothing(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 10), 0")
    backfill = make(table="t", set={"v": "1"})
    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('backfill:' || %s), 0)", [backfill.identity])
        with pytest.raises(AlreadyRunning, match="already being run"):
            run_backfill(backfill, database)
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(0,)]
    assert sql_rows(database, "SELECT to_regclass('backfill.checkpoints') IS NULL") == [(True,)]


def test_lock_timeout_is_retried_until_the_row_is_free(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 20), 0")
    backfill = make(table="t", set={"v": "1"}, limits={"lockTimeout": "50ms", "maxRetries": 20})
    events: list[Any] = []
    holder = psycopg.connect(database)
    holder.execute("SELECT * FROM t WHERE id = 5 FOR UPDATE")
    releaser = threading.Timer(0.4, holder.rollback)
    releaser.start()
    try:
        report = run_backfill(backfill, database, listeners=[events.append])
    finally:
        releaser.join()
        holder.close()
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    assert retries and all(e.error_kind == "lockTimeout" for e in retries)
    assert report.state == "done"
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(20,)]


def test_retries_exhausted_leaves_checkpoint_consistent(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 20), 0")
    backfill = make(table="t", set={"v": "1"}, batch=small_batches(5), limits={"lockTimeout": "20ms", "maxRetries": 2})
    with psycopg.connect(database) as holder:
        holder.execute("SELECT * FROM t WHERE id = 12 FOR UPDATE")
        with pytest.raises(RetriesExhausted, match="maxRetries"):
            run_backfill(backfill, database)
        holder.rollback()
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(10,)]
    assert run_backfill(backfill, database).state == "done"
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(20,)]


def test_lost_connection_reconnects_and_resumes(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)", "INSERT INTO t (id) SELECT generate_series(1, 60)")
    backfill = make(table="t", set={"v": "v + 1"}, batch=small_batches(10))
    events: list[Any] = []

    def kill_backend(event: Any) -> None:
        events.append(event)
        if isinstance(event, BatchCommitted) and event.total_batches == 2:
            setup_sql(database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'backfill t/bf%'")

    report = run_backfill(backfill, database, listeners=[kill_backend])
    assert report.state == "done"
    assert any(isinstance(e, RetryScheduled) and e.error_kind == "connection" for e in events)
    assert sql_rows(database, "SELECT min(v), max(v), count(*) FROM t") == [(1, 1, 60)]


def test_throttles_pause_and_rate_limit(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 40), 0")
    events: list[Any] = []
    started = time.monotonic()
    run_backfill(
        make(table="t", set={"v": "1"}, batch={**small_batches(10), "pause": "50ms"}, limits={"maxRowsPerSecond": 50}),
        database, listeners=[events.append],
    )
    elapsed = time.monotonic() - started
    reasons = {e.reason for e in events if isinstance(e, Throttled)}
    assert reasons == {"maxRowsPerSecond"}  # 10 rows at 50/s = 200 ms, longer than the 50 ms pause -> rate wins
    assert elapsed >= 3 * 0.19
    batches = [e for e in events if isinstance(e, BatchCommitted)]
    assert [b.throttle_reason for b in batches] == ["", "maxRowsPerSecond", "maxRowsPerSecond", "maxRowsPerSecond"]


def test_at_least_once_mode_keeps_progress_in_the_store(database: str, tmp_path: Any) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 30), 0")
    backfill = make(table="t", set={"v": "1"}, checkpoint={"mode": "atLeastOnce"}, batch=small_batches(10))
    store = JsonFileStore(tmp_path, backfill.identity)
    report = run_backfill(backfill, database, at_least_once_store=store)
    assert report.state == "done"
    saved = store.load(0)
    assert saved is not None and saved.state == "done" and saved.rows_updated == 30
    assert sql_rows(database, "SELECT to_regclass('backfill.checkpoints') IS NULL") == [(True,)]


def test_role_without_create_gets_checkpoint_unavailable(database: str) -> None:
    role = f"writer_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: unique per test run
    setup_sql(
        database,
        "CREATE TABLE t (id int PRIMARY KEY, v int)",
        "INSERT INTO t SELECT generate_series(1, 10), 0",
        f"CREATE ROLE {role} LOGIN PASSWORD '" + str(psycopg.conninfo.conninfo_to_dict(database)["password"]) + "'",
        f"GRANT SELECT, UPDATE ON t TO {role}",
        "REVOKE CREATE ON DATABASE " + psycopg.conninfo.conninfo_to_dict(database)["dbname"] + " FROM PUBLIC",
    )
    dsn = database.replace("user=postgres", f"user={role}")
    try:
        with pytest.raises(CheckpointUnavailable, match="atLeastOnce"):
            run_backfill(make(table="t", set={"v": "1"}), dsn)
        assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(0,)]
    finally:
        setup_sql(database, f"REVOKE ALL ON t FROM {role}", f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_verification_reports_rows_still_matching(database: str) -> None:
    # The set expression does not clear the where condition on every row: verification says how many remain.
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 10), NULL")
    events: list[Any] = []
    run_backfill(make(table="t", set={"v": "CASE WHEN id <= 3 THEN NULL ELSE 1 END"}, where="v IS NULL"), database, listeners=[events.append])
    [finished] = [e for e in events if isinstance(e, RunFinished)]
    assert finished.remaining_matches == 3


@pytest.fixture
def big_table(database: str) -> str:
    setup_sql(
        database,
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text, last_login timestamptz, status text)",
        "INSERT INTO customers SELECT i, 'c' || i, now() - (i % 730) * interval '1 day', NULL FROM generate_series(1, 50000) i",
        "VACUUM ANALYZE customers",
    )
    return database


@pytest.mark.parametrize("size", [1000, 20000])
def test_batch_statements_use_the_key_index_custom_and_generic(big_table: str, size: int) -> None:
    backfill = make(table="customers", set={"status": "'inactive'"}, where="last_login < now() - interval '365 days' AND status IS NULL")
    with psycopg.connect(big_table, autocommit=True) as conn:
        target = resolve_target(conn, backfill.spec)
        checks = check_index_use(conn, changes.SqlUpdate(target), ("100",), ("50000",), size)
        # The same check by hand for the UPDATE's generic plan, independent of the planner's helper.
        with conn.transaction(force_rollback=True):
            update = statements.update_batch(target, has_lower=True, style=Style.DOLLAR)
            conn.execute(psycopg.sql.SQL("PREPARE q AS {}").format(update))
            conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE q('100', '20100')"))
            conn.execute("DEALLOCATE q")
    assert {(c.statement, c.generic) for c in checks} == {("probe", False), ("probe", True), ("update", False), ("update", True)}
    assert all(c.uses_index for c in checks), checks
    assert "customers_pkey" in plan and "Seq Scan" not in plan


def test_plan_backfill_reports_and_changes_nothing(big_table: str) -> None:
    backfill = make(table="customers", set={"status": "'inactive'"}, where="last_login < now() - interval '365 days' AND status IS NULL")
    plan = plan_backfill(backfill, big_table)
    assert plan.key == ("id",) and plan.key_index == "customers_pkey"
    assert plan.index_ok
    assert plan.estimated_keys == 50000
    assert 15000 < plan.estimated_rows_to_change < 35000
    assert plan.sample is not None and plan.sample.keys == 1000 and plan.sample.rows > 0
    assert plan.projected_seconds is not None and plan.projected_seconds > 0
    assert "UPDATE \"public\".\"customers\"" in plan.statements["update"]
    assert sql_rows(big_table, "SELECT count(*) FROM customers WHERE status IS NOT NULL") == [(0,)]
    assert sql_rows(big_table, "SELECT to_regclass('backfill.checkpoints') IS NULL") == [(True,)]


class RetuningControl:
    """Raises the fixed batch size after the second batch (what a live spec edit does in-cluster)."""

    def __init__(self, tuning: Tuning) -> None:
        self.batches = 0
        self.next = tuning

    def __call__(self, event: Any) -> None:
        if isinstance(event, BatchCommitted):
            self.batches += 1

    def stop_reason(self) -> str | None:
        return None

    def tuning(self) -> Tuning | None:
        return self.next if self.batches >= 2 else None


def test_live_tuning_changes_the_batch_size_between_batches(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 100), 0")
    backfill = make(table="t", set={"v": "1"}, batch=small_batches(10))
    control = RetuningControl(Tuning(batch=BatchSpec(size=30, min_size=1, max_size=30, target_duration=timedelta(0))))
    events: list[Any] = []
    run_backfill(backfill, database, listeners=[control, events.append], control=control)
    sizes = [e.keys_scanned for e in events if isinstance(e, BatchCommitted)]
    assert sizes == [10, 10, 30, 30, 20]


def test_statement_timeout_halves_the_batch_and_succeeds(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 60), 0")
    slow_set = "v + 1 + 0 * length(pg_sleep(0.002)::text)"  # 2 ms per row: 40 rows = 80 ms > 60 ms timeout
    backfill = make(
        table="t", set={"v": slow_set}, batch={"size": 40, "minSize": 5, "maxSize": 40, "targetDuration": "0"},
        limits={"statementTimeout": "60ms", "maxRetries": 5},
    )
    events: list[Any] = []
    report = run_backfill(backfill, database, listeners=[events.append])
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    assert retries and retries[0].error_kind == "statementTimeout" and retries[0].next_batch_size == 20
    assert report.state == "done"
    assert sql_rows(database, "SELECT min(v), max(v) FROM t") == [(1, 1)]


def test_checkpoint_row_deleted_mid_run_rolls_the_batch_back(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 50), 0")
    backfill = make(table="t", set={"v": "v + 1"}, batch=small_batches(10))

    def delete_checkpoint(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 2:
            setup_sql(database, "DELETE FROM backfill.checkpoints")

    with pytest.raises(CheckpointUnavailable, match="disappeared"):
        run_backfill(backfill, database, listeners=[delete_checkpoint])
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(20,)]


def test_empty_table_is_done_at_once(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    report = run_backfill(make(table="t", set={"v": "1"}, where="v IS NULL", parallelism=3), database)
    assert report.state == "done" and report.rows_updated == 0 and report.batches == 0
    assert report.remaining_matches == 0
    assert [cp.state for cp in read_checkpoints(make(table="t", set={"v": "1"}, where="v IS NULL", parallelism=3), database)] == ["done"] * 3
    plan = plan_backfill(make(table="t", set={"v": "1"}), database)
    assert plan.estimated_keys == 0 and plan.index_ok and plan.sample is None


def test_incomplete_checkpoint_is_refused(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int)", "INSERT INTO t SELECT generate_series(1, 40), 0")
    backfill = make(table="t", set={"v": "v + 1"}, parallelism=2, batch=small_batches(5))
    control = StaticControl()
    control.request_stop("test")
    assert run_backfill(backfill, database, control=control).state == "paused"  # planned, nothing written
    setup_sql(database, "DELETE FROM backfill.checkpoints WHERE shard = 1")
    with pytest.raises(CheckpointMismatch, match=r"incomplete \(shards \[1\] missing\)"):
        run_backfill(backfill, database)
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v <> 0") == [(0,)]


def test_lock_lost_during_reconnect_stops_the_runner(database: str) -> None:
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)", "INSERT INTO t (id) SELECT generate_series(1, 60)")
    backfill = make(name="lost", table="t", set={"v": "v + 1"}, batch=small_batches(10))
    thief = psycopg.connect(database, autocommit=True)

    def steal_lock(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 2:
            # The runner's session dies; another runner takes the shard before it can reconnect.
            thief.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'backfill t/lost%'")
            thief.execute("SELECT pg_advisory_lock(hashtext('backfill:' || %s), 0)", [backfill.identity])

    try:
        with pytest.raises(AlreadyRunning, match="took over"):
            run_backfill(backfill, database, listeners=[steal_lock])
    finally:
        thief.close()
    assert sql_rows(database, "SELECT count(*) FROM t WHERE v = 1") == [(20,)]
    assert sql_rows(database, "SELECT max(v) FROM t") == [(1,)]


def test_readme_checkpoint_ddl_lets_a_restricted_role_run_transactionally(database: str) -> None:
    manual = (Path(__file__).parent.parent / "docs" / "engine.md").read_text()
    ddl = re.search(r"\*\*Restricted roles\.\*\*.*?```sql\n(.*?)```", manual, re.S)
    assert ddl, "docs/engine.md lost the checkpoint DDL"
    role = f"app_{uuid.uuid4().hex[:8]}"
    password = str(psycopg.conninfo.conninfo_to_dict(database)["password"])
    dbname = str(psycopg.conninfo.conninfo_to_dict(database)["dbname"])
    setup_sql(
        database,
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
        ddl.group(1).replace(" TO app;", f" TO {role};"),
        "CREATE TABLE t (id int PRIMARY KEY, v int)",
        "INSERT INTO t SELECT generate_series(1, 10), 0",
        f"GRANT SELECT, UPDATE ON t TO {role}",
        f"REVOKE CREATE ON DATABASE {dbname} FROM PUBLIC",
    )
    try:
        report = run_backfill(make(table="t", set={"v": "1"}), database.replace("user=postgres", f"user={role}"))
        assert report.state == "done" and report.rows_updated == 10
    finally:
        setup_sql(database, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_composite_uuid_key_batches_use_the_index(database: str) -> None:
    setup_sql(
        database,
        "CREATE TABLE t (tenant int, id uuid, v text, PRIMARY KEY (tenant, id))",
        "INSERT INTO t SELECT i % 10, md5(i::text)::uuid, NULL FROM generate_series(1, 30000) i",
        "VACUUM ANALYZE t",
    )
    plan = plan_backfill(make(table="t", set={"v": "'x'"}, where="v IS NULL", batch={"size": 500}), database)
    assert {(c.statement, c.generic) for c in plan.index_checks if c.uses_index} == {
        ("probe", False), ("probe", True), ("update", False), ("update", True)
    }, plan.index_checks
    assert all("t_pkey" in " ".join(c.scans) for c in plan.index_checks)


def test_concurrent_first_runs_of_separate_shards_create_the_checkpoint_table_once(database: str) -> None:
    # What several shard workers of one Backfill do when they start at the same moment.
    setup_sql(database, "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)", "INSERT INTO t (id) SELECT generate_series(1, 400)")
    backfill = make(table="t", set={"v": "v + 1"}, parallelism=4, batch=small_batches(20))
    start = threading.Barrier(4)
    outcomes: dict[int, Any] = {}

    def run_shard(shard: int) -> None:
        start.wait()
        try:
            outcomes[shard] = run_backfill(backfill, database, shards=[shard]).state
        except Exception as error:
            outcomes[shard] = repr(error)

    threads = [threading.Thread(target=run_shard, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes == {0: "done", 1: "done", 2: "done", 3: "done"}
    assert sql_rows(database, "SELECT min(v), max(v) FROM t") == [(1, 1)]

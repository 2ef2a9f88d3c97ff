"""A concurrent application workload (multi-row updates in the opposite key order, deletes,
inserts) on the same table during the run: every pre-existing row ends exactly as the where
predicate and the recorded application changes demand, and nothing waits forever."""

from __future__ import annotations

import random
import time
from typing import Any

import psycopg
import pytest
from support_faults import ledger
from support_faults.app_threads import AppThreads
from support_faults.engine_run import EngineThread
from support_faults.seeds import random_seed
from support_faults.workload import Workload

from backfill_worker.sql.retry import DEADLOCK, LOCK_TIMEOUT

ROWS = 300_000
STEP = 2
BATCH = 1_000
TEST_BUDGET_SECONDS = 120


@pytest.mark.slow
def test_concurrent_inserts_updates_deletes_keep_the_result_exact(database: str) -> None:
    ledger.seed(database, ROWS, step=STEP)
    max_key = ROWS * STEP
    document = ledger.manifest(
        "concurrent-app",
        batch={"size": BATCH, "minSize": 100, "maxSize": BATCH, "targetDuration": "0s", "pause": "10ms"},
        limits={"lockTimeout": "500ms", "maxRetries": 30},
    )
    started = time.monotonic()
    engine = EngineThread(document, database)

    def position() -> int:
        batches = engine.batches()
        return int(batches[-1].last_key[0]) if batches else STEP

    workload = Workload(database, position, step=STEP, max_key=max_key, spread=BATCH * STEP * 2)
    engine.start()
    # The run's upper bound is fixed when it plans (before its first batch): only then may the
    # application insert beyond it, else those rows would legitimately be part of the run.
    engine.wait_for_batches(1)
    workload.start()
    try:
        report = engine.join(timeout=TEST_BUDGET_SECONDS)
    finally:
        workload.stop()
    elapsed = time.monotonic() - started

    assert report.state == "done"
    assert elapsed < TEST_BUDGET_SECONDS
    assert workload.commits >= 200, "the application workload hardly ran"
    assert workload.deleted and workload.inserted_inside and workload.inserted_beyond and workload.increments
    result = ledger.check(database, deleted=workload.deleted, app_increments=workload.increments)
    result.assert_exact()

    with psycopg.connect(database, autocommit=True) as conn:
        # Rows inserted above the run's upper bound are the application's job: never touched.
        beyond = dict(conn.execute("SELECT id, counter FROM items WHERE id > %s", [max_key]).fetchall())
        assert beyond == workload.inserted_beyond
        # Rows inserted into gaps inside the range were touched at most once (once if the
        # backfill had not yet passed them).
        inside = dict(conn.execute("SELECT id, counter FROM items WHERE mod(id, 2) = 1 AND id <= %s", [max_key]).fetchall())
    assert set(inside) == set(workload.inserted_inside)
    offsets = {key: inside[key] - counter for key, counter in workload.inserted_inside.items()}
    assert set(offsets.values()) <= {0, 1}, offsets

    retries = engine.retries()
    ledger.report(
        "concurrent application: updates (reverse key order), deletes, inserts",
        faults_injected=workload.commits,
        runs=1,
        ledger=result,
        app_transactions_committed=workload.commits,
        app_deletes=len(workload.deleted),
        app_inserts=len(workload.inserted_inside) + len(workload.inserted_beyond),
        deadlocks_seen_by_app=workload.deadlocks,
        deadlock_retries_by_engine=sum(r.error_kind == DEADLOCK for r in retries),
        lock_timeout_retries_by_engine=sum(r.error_kind == LOCK_TIMEOUT for r in retries),
        seconds=round(elapsed, 1),
    )


# -- the predicate case: the application changes what the where selects --------------------------

CUSTOMERS = 200_000


def _seed_customers(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text, last_login int NOT NULL)")
        conn.execute(
            "INSERT INTO customers SELECT g, CASE WHEN g %% 10 = 0 THEN 'vip' END, (g * 7919) %% 1000"
            " FROM generate_series(1::bigint, %s) g",
            [CUSTOMERS],
        )
        conn.execute("VACUUM ANALYZE customers")
        conn.execute("CREATE TABLE customers_snapshot AS SELECT * FROM customers")


class Reactivator(AppThreads):
    """Application threads marking customers 'active' (the where then no longer selects them),
    in 2-row transactions in reverse key order just ahead of the backfill, and deleting some."""

    def __init__(self, dsn: str, position: Any, threads: int = 3) -> None:
        self.dsn, self.position = dsn, position
        self.activated: set[int] = set()
        self.deleted: set[int] = set()
        self.deadlocks = 0
        self._seed = random_seed("concurrent_app reactivator")  # thread i draws from seed + i
        super().__init__()
        for number in range(threads):
            self.spawn(self._run, number)

    def _run(self, number: int) -> None:
        rng = random.Random(self._seed + number)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '5s'")
            conn.execute("SET deadlock_timeout = '50ms'")
            while not self._stop.is_set():
                high = min(CUSTOMERS, max(2, self.position() + rng.randrange(-500, 3_000)))
                keys = [high, max(1, high - rng.randrange(1, 50))]
                try:
                    if rng.random() < 0.15:
                        if conn.execute("DELETE FROM customers WHERE id = %s", [keys[0]]).rowcount:
                            with self._lock:
                                self.deleted.add(keys[0])
                        continue
                    with conn.transaction():
                        changed = [k for k in keys if conn.execute(
                            "UPDATE customers SET status = 'active' WHERE id = %s", [k]).rowcount]
                        time.sleep(0.002)
                    with self._lock:
                        self.activated.update(changed)
                except psycopg.errors.DeadlockDetected:
                    with self._lock:
                        self.deadlocks += 1


@pytest.mark.slow
def test_application_changing_the_where_columns_wins_and_the_rest_matches_the_predicate(database: str) -> None:
    _seed_customers(database)
    document = ledger.manifest(
        "reactivate",
        table="customers",
        set={"status": "'inactive'"},
        where="status IS NULL AND last_login < 500",
        batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "10ms"},
        limits={"lockTimeout": "500ms", "maxRetries": 30},
    )
    engine = EngineThread(document, database)

    def position() -> int:
        batches = engine.batches()
        return int(batches[-1].last_key[0]) if batches else 1

    started = time.monotonic()
    engine.start()
    with Reactivator(database, position) as app:
        report = engine.join(timeout=TEST_BUDGET_SECONDS)
    assert report.state == "done"
    assert app.activated and app.deleted

    with psycopg.connect(database, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TEMP TABLE activated (id bigint PRIMARY KEY) ON COMMIT DROP")
        conn.execute("CREATE TEMP TABLE deleted (id bigint PRIMARY KEY) ON COMMIT DROP")
        for table, keys in (("activated", app.activated - app.deleted), ("deleted", app.deleted)):
            with conn.cursor().copy(f"COPY {table} (id) FROM STDIN") as copy:
                for key in keys:
                    copy.write_row((key,))
        # Expected per pre-existing row: deleted -> gone; activated by the app -> 'active' (the
        # app's write wins whether it came before the batch, which then skips the row, or after);
        # otherwise 'inactive' exactly where the predicate held at the start, else unchanged.
        wrong, checked, changed = conn.execute(
            """
            SELECT count(*) FILTER (WHERE
                     CASE WHEN d.id IS NOT NULL THEN c.id IS NOT NULL
                          WHEN a.id IS NOT NULL THEN c.status IS DISTINCT FROM 'active'
                          WHEN s.status IS NULL AND s.last_login < 500 THEN c.status IS DISTINCT FROM 'inactive'
                          ELSE c.status IS DISTINCT FROM s.status OR c.id IS NULL END),
                   count(*),
                   count(*) FILTER (WHERE c.status = 'inactive')
            FROM customers_snapshot s
            LEFT JOIN customers c USING (id)
            LEFT JOIN activated a USING (id)
            LEFT JOIN deleted d USING (id)
            """
        ).fetchone()
    assert wrong == 0
    # The engine's count also holds rows the application re-activated or deleted afterwards.
    assert changed <= report.rows_updated <= changed + len(app.activated | app.deleted)
    assert report.remaining_matches == 0, "rows still match the where after the run"
    ledger.figures(
        "concurrent application changing the where's columns (marks rows active, deletes)",
        faults_injected=len(app.activated) + len(app.deleted), runs=1, rows_checked=checked,
        lost_or_doubled=wrong, app_activated=len(app.activated), app_deleted=len(app.deleted),
        deadlocks_seen_by_app=app.deadlocks, seconds=round(time.monotonic() - started, 1),
    )

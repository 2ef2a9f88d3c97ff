"""A concurrent application workload (multi-row updates in the opposite key order, deletes,
inserts) on the same table during the run: every pre-existing row ends exactly as the where
predicate and the recorded application changes demand, and nothing waits forever."""

from __future__ import annotations

import time

import psycopg
import pytest

from backfill_worker.retry import DEADLOCK, LOCK_TIMEOUT
from support_faults import ledger
from support_faults.engine_run import EngineThread
from support_faults.workload import Workload

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

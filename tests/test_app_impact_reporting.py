"""What the application-impact throttle reports: shard status, the aggregated progress, metrics, CRD."""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from dataclasses import replace

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from backfill_api.crd import PRINTER_COLUMNS, build_crd
from backfill_api.serving import serve
from backfill_api.status import ImpactLimit, aggregate_progress
from backfill_worker.kube.worker import shard_status
from backfill_worker.observe.events import ImpactObserved
from backfill_worker.observe.run_progress import ShardProgress
from backfill_worker.observe.worker_metrics import WorkerMetrics
from backfill_worker.sql.connection import open_connection
from backfill_worker.throttles.impact_signals import Sampler, lock_waiters

IDENTITY = "shop/customers-inactive"
LABELS = {"namespace": "shop", "name": "customers-inactive", "shard": "0"}
IMPACT = ImpactObserved(
    identity=IDENTITY, shard=0, present=True, duty=0.35, pressure=1.1, limited_by=ImpactLimit.THROUGHPUT,
    batch_target_seconds=0.01, pause_seconds=0.0186, throughput_ratio=0.78, app_write_rate=3120.0,
    baseline_write_rate=4000.0, active_sessions=3.25, lock_waiters=2, wal_bytes_per_second=2.5e7,
    statement_ms=None, summary="duty 35% (throughput 1.10)", lock_wait_seconds=0.0025, lock_yields=3,
)


def test_shard_status_and_progress_show_what_the_throttle_does() -> None:
    progress = ShardProgress(0)
    progress.apply(IMPACT, now=1.0)
    status = shard_status(progress, run=1).to_wire()
    assert status["impact"] == {
        "summary": "duty 35% (throughput 1.10)", "applicationPresent": True, "dutyPercent": 35.0, "pressure": 1.1,
        "limitedBy": "throughput", "pauseMs": 18.6, "batchTargetMs": 10.0, "throughputRatio": 0.78,
        "appTransactionsPerSecond": 3120.0, "baselineTransactionsPerSecond": 4000.0, "activeSessions": 3.25,
        "lockWaiters": 2, "walBytesPerSecond": 25_000_000, "statementMs": None, "lockWaitMs": 2.5, "lockYields": 3,
    }
    running = {"0": {**status, "state": "running"}}
    assert aggregate_progress(running, 1).to_wire()["impact"]["summary"] == "duty 35% (throughput 1.10)"
    assert shard_status(ShardProgress(0), run=1).to_wire()["impact"] is None  # mode fast: nothing to show


def test_crd_keeps_the_impact_status_and_shows_it_in_wide_output() -> None:
    crd = build_crd()
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    impact = status["progress"]["properties"]["impact"]["properties"]
    assert set(impact) >= {"summary", "dutyPercent", "limitedBy", "lockWaiters", "throughputRatio", "lockWaitMs", "lockYields"}
    assert impact["limitedBy"]["enum"] == [limit.value for limit in ImpactLimit]  # typed: what limits the speed
    shard_impact = status["shards"]["additionalProperties"]["properties"]["impact"]["properties"]
    assert shard_impact == impact
    column = next(c for c in PRINTER_COLUMNS if c["name"] == "Impact")
    assert column["jsonPath"] == ".status.progress.impact.summary" and column["priority"] == 1


def test_impact_gauges_follow_the_events() -> None:
    metrics = WorkerMetrics(process_metrics=False)
    server = serve(0, metrics.registry, addr="127.0.0.1")
    try:
        metrics(IMPACT)
        metrics(replace(IMPACT, throughput_ratio=None, duty=1.0))
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples if s.labels == LABELS
    }
    assert samples["backfill_app_impact_duty_ratio"] == 1.0
    assert samples["backfill_app_impact_pressure"] == 1.1
    assert samples["backfill_app_impact_pause_seconds"] == 0.0186
    assert math.isnan(samples["backfill_app_throughput_ratio"])
    assert samples["backfill_app_lock_waiters"] == 2
    assert samples["backfill_app_active_sessions"] == 3.25
    assert samples["backfill_wal_bytes_per_second"] == 2.5e7


def test_sampler_sees_other_sessions_and_who_waits_for_our_row_locks(database: str) -> None:
    setup = psycopg.connect(database, autocommit=True)
    setup.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    setup.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g")
    ours = open_connection(database, f"backfill {IDENTITY} shard 0")
    sampler_conn = open_connection(database, f"backfill {IDENTITY} shard 0 sampler")
    app = psycopg.connect(database, autocommit=True, application_name="shop-app")
    sampler = Sampler(f"backfill {IDENTITY}", ("public", "t"), "backfill")
    try:
        first = sampler.sample(sampler_conn, 0.0)
        assert (first.active_others, first.lock_waiters) == (0, 0)
        assert first.statement_calls is None  # pg_stat_statements is not installed here
        with ours.transaction():
            ours.execute("UPDATE t SET v = 1 WHERE id = 3")
            waiter = threading.Thread(target=lambda: app.execute("UPDATE t SET v = 2 WHERE id = 3"))
            waiter.start()
            deadline = time.monotonic() + 10
            while lock_waiters(ours) == 0:
                assert time.monotonic() < deadline, "the application's lock wait was never seen"
                time.sleep(0.02)
            during = sampler.sample(sampler_conn, 1.0)
            assert during.lock_waiters == 1 and during.active_others == 1  # the waiting application session
            assert during.wal_bytes > first.wal_bytes
        waiter.join(timeout=10)
        after = sampler.sample(sampler_conn, 2.0)
        assert (after.active_others, after.lock_waiters) == (0, 0)
        assert after.next_xid == first.next_xid + 2  # two write transactions completed: ours and the app's
    finally:
        for conn in (app, sampler_conn, ours, setup):
            conn.close()

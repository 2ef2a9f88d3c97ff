"""Worker metrics after a real small backfill against PostgreSQL, scraped over HTTP."""

from __future__ import annotations

import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict

from backfill_api.manifest import parse_backfill
from backfill_api.serving import serve
from backfill_worker.observe.worker_metrics import WorkerMetrics
from backfill_worker.run.engine import run_backfill

ROWS = 2_000


def test_a_real_run_is_counted_exactly(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text)")
        conn.execute(f"INSERT INTO customers SELECT i, CASE WHEN i % 4 = 0 THEN 'x' END FROM generate_series(1, {ROWS}) i")
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
        "metadata": {"name": "customers-inactive", "namespace": "shop"},
        "spec": {"table": "customers", "set": {"status": "'inactive'"}, "where": "status IS NULL",
                 "batch": {"size": 250, "minSize": 250, "maxSize": 250, "targetDuration": "0", "pause": "1ms"}},
    })
    metrics = WorkerMetrics()
    server = serve(0, metrics.registry, addr="127.0.0.1")
    try:
        report = run_backfill(backfill, database, listeners=[metrics])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()

    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("namespace", "name", "shard")))): s.value
        for family in text_string_to_metric_families(body) for s in family.samples
        if s.labels.get("name") == "customers-inactive"
    }
    assert report.state == "done" and report.rows_updated == ROWS * 3 // 4
    assert samples[("backfill_rows_updated_total", ())] == ROWS * 3 // 4
    assert samples[("backfill_batches_total", ())] == report.batches >= ROWS // 250
    assert samples[("backfill_keys_scanned_total", ())] == ROWS
    assert samples[("backfill_batch_duration_seconds_count", ())] == report.batches
    assert samples[("backfill_batch_size", ())] == 250
    assert samples[("backfill_throttled_seconds_total", (("reason", "pause"),))] > 0
    assert samples[("backfill_progress_ratio", ())] == 1.0
    assert samples[("backfill_shard_state", (("state", "done"),))] == 1
    password = conninfo_to_dict(database)["password"]
    assert password and password not in body  # no DSN or password in any label

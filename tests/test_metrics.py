"""Worker metrics: fed real engine events, read back by scraping the real HTTP endpoint."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backfill_api.serving import MetricsServer, serve
from backfill_worker.observe.events import (
    BatchCommitted,
    ReplicationLagObserved,
    RetryScheduled,
    RunFinished,
    RunStarted,
    Throttled,
)
from backfill_worker.observe.worker_metrics import WorkerMetrics

IDENTITY = "shop/customers-inactive"
LABELS = {"namespace": "shop", "name": "customers-inactive", "shard": "0"}


@pytest.fixture
def served() -> Iterator[tuple[WorkerMetrics, MetricsServer]]:
    metrics = WorkerMetrics()
    server = serve(0, metrics.registry, addr="127.0.0.1")
    try:
        yield metrics, server
    finally:
        server.close()


def scrape(server: MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """All samples on ``/metrics`` keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        assert response.status == 200
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **extra: str) -> float:
    return samples[(name, frozenset({**LABELS, **extra}.items()))]


def batch(number: int, rows: int, keys: int, duration: float, next_size: int, total_rows: int) -> BatchCommitted:
    return BatchCommitted(
        identity=IDENTITY, shard=0, batch_number=number, rows_updated=rows, keys_scanned=keys,
        batch_size=keys, next_batch_size=next_size, duration_seconds=duration, last_key=(str(number * keys),),
        total_rows_updated=total_rows, total_batches=number,
    )


def test_every_documented_metric_follows_the_events(served):
    metrics, server = served
    metrics(RunStarted(IDENTITY, 0, 1, resumed=False, rows_updated=0, estimated_keys=4000, keys_done=0))
    metrics(batch(1, rows=600, keys=1000, duration=0.03, next_size=1500, total_rows=600))
    metrics(Throttled(IDENTITY, 0, "pause", 0.25))
    metrics(Throttled(IDENTITY, 0, "maxRowsPerSecond", 1.5))
    metrics(Throttled(IDENTITY, 0, "pause", 0.25))
    metrics(ReplicationLagObserved(IDENTITY, 0, 3.5))
    metrics(RetryScheduled(IDENTITY, 0, "lockTimeout", attempt=1, delay_seconds=0.1, next_batch_size=750, message="x"))
    metrics(RetryScheduled(IDENTITY, 0, "lockTimeout", attempt=2, delay_seconds=0.2, next_batch_size=375, message="x"))
    metrics(RetryScheduled(IDENTITY, 0, "deadlock", attempt=1, delay_seconds=0.1, next_batch_size=375, message="x"))
    metrics(batch(2, rows=200, keys=1000, duration=0.7, next_size=400, total_rows=800))

    samples = scrape(server)
    assert value(samples, "backfill_rows_updated_total") == 800
    assert value(samples, "backfill_keys_scanned_total") == 2000
    assert value(samples, "backfill_batches_total") == 2
    assert value(samples, "backfill_batch_duration_seconds_count") == 2
    assert value(samples, "backfill_batch_duration_seconds_sum") == pytest.approx(0.73)
    assert value(samples, "backfill_batch_duration_seconds_bucket", le="0.05") == 1
    assert value(samples, "backfill_batch_duration_seconds_bucket", le="1.0") == 2
    assert value(samples, "backfill_batch_size") == 400
    assert value(samples, "backfill_throttled_seconds_total", reason="pause") == pytest.approx(0.5)
    assert value(samples, "backfill_throttled_seconds_total", reason="maxRowsPerSecond") == pytest.approx(1.5)
    assert value(samples, "backfill_replication_lag_seconds") == 3.5
    assert value(samples, "backfill_retries_total", kind="lockTimeout") == 2
    assert value(samples, "backfill_retries_total", kind="deadlock") == 1
    assert value(samples, "backfill_progress_ratio") == pytest.approx(0.5)
    assert value(samples, "backfill_shard_state", state="running") == 1
    assert value(samples, "backfill_shard_state", state="done") == 0
    assert ("process_cpu_seconds_total", frozenset()) in samples

    metrics(ReplicationLagObserved(IDENTITY, 0, None))
    metrics(RunFinished(IDENTITY, 0, "done", rows_updated=800, batches=2, remaining_matches=0))
    samples = scrape(server)
    assert math.isnan(value(samples, "backfill_replication_lag_seconds"))
    assert value(samples, "backfill_shard_state", state="done") == 1
    assert value(samples, "backfill_shard_state", state="running") == 0
    assert value(samples, "backfill_progress_ratio") == 1.0


def test_a_resumed_run_starts_progress_at_its_checkpoint(served):
    metrics, server = served
    metrics(RunStarted(IDENTITY, 0, 2, resumed=True, rows_updated=5000, estimated_keys=10_000, keys_done=7000))
    samples = scrape(server)
    assert value(samples, "backfill_progress_ratio") == pytest.approx(0.7)
    # Counters count this process's work only: Prometheus' rate() needs them to start at 0.
    assert ("backfill_rows_updated_total", frozenset(LABELS.items())) not in samples


def test_shards_and_backfills_are_separate_series(served):
    metrics, server = served
    metrics(batch(1, rows=10, keys=10, duration=0.01, next_size=10, total_rows=10))
    metrics(BatchCommitted("other/bf", 3, 1, 7, 7, 7, 7, 0.01, ("7",), 7, 1))
    samples = scrape(server)
    assert value(samples, "backfill_rows_updated_total") == 10
    other = frozenset({"namespace": "other", "name": "bf", "shard": "3"}.items())
    assert samples[("backfill_rows_updated_total", other)] == 7


def test_a_broken_event_never_escapes_the_listener(served, caplog):
    metrics, server = served
    metrics(Throttled(IDENTITY, 0, "pause", None))  # type: ignore[arg-type]  # not a number: raises inside
    metrics(batch(1, rows=1, keys=1, duration=0.01, next_size=1, total_rows=1))
    assert value(scrape(server), "backfill_batches_total") == 1
    assert "metrics listener failed on Throttled" in caplog.text

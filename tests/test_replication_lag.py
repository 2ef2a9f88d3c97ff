"""The replication-lag throttle against a real streaming replica that lags on purpose."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from backfill_api.manifest import parse_backfill
from backfill_cli.localpg import LocalPostgres
from backfill_worker.observe.events import BatchCommitted, ReplicationLagObserved, RunFinished, Throttled
from backfill_worker.run.engine import run_backfill
from backfill_worker.throttles.throttle import REPLICATION_LAG, read_replication_lag

APPLY_DELAY_SECONDS = 2.0


@pytest.fixture
def primary_with_lagging_replica(pg_server: LocalPostgres) -> Iterator[LocalPostgres]:
    # Its own primary (the shared server is not touched); same canary password as every test DSN.
    primary = LocalPostgres(password=pg_server.password).start()
    standby = primary.make_standby({"recovery_min_apply_delay": f"{int(APPLY_DELAY_SECONDS * 1000)}ms"})
    try:
        standby.start()
        yield primary
    finally:
        standby.cleanup()
        primary.cleanup()


def test_engine_waits_while_the_replica_lags_and_resumes_once_it_caught_up(primary_with_lagging_replica):
    primary = primary_with_lagging_replica
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, 1000)")
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone() != (1,):
            assert time.monotonic() < deadline, "the replica never started streaming"
            time.sleep(0.1)
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "lag", "namespace": "t"},
        "spec": {"table": "items", "set": {"n": "n + 1"},
                 "batch": {"size": 100, "minSize": 1, "maxSize": 100, "targetDuration": "0", "pause": "300ms"},
                 "limits": {"maxReplicationLag": "1s"}},
    })
    events: list[Any] = []
    started = time.monotonic()
    report = run_backfill(backfill, primary.dsn(), listeners=[events.append])
    elapsed = time.monotonic() - started

    assert report.state == "done" and report.rows_updated == 1000
    lags = [e.lag_seconds for e in events if isinstance(e, ReplicationLagObserved) and e.lag_seconds is not None]
    assert max(lags) > 1.0, f"the replica's lag was never seen above the limit: {lags}"
    waits = [e for e in events if isinstance(e, Throttled) and e.reason == REPLICATION_LAG]
    assert waits, "the engine never waited for the replica"
    # Caught up means caught up: each wait ends within about one apply delay, not after the
    # 10-20 s it takes PostgreSQL to clear a stale replay_lag sample.
    episodes, current = [], 0.0
    for event in events:
        if isinstance(event, Throttled) and event.reason == REPLICATION_LAG:
            current += event.seconds
        elif isinstance(event, BatchCommitted) and current:
            episodes.append(current)
            current = 0.0
    episodes += [current] if current else []
    assert max(episodes) <= APPLY_DELAY_SECONDS + 2.0, (episodes, elapsed)
    assert [e.state for e in events if isinstance(e, RunFinished)] == ["done"]
    with psycopg.connect(primary.dsn()) as conn:
        assert conn.execute("SELECT n, count(*) FROM items GROUP BY n").fetchall() == [(1, 1000)]
        assert read_replication_lag(conn) is not None  # the query sees the replica

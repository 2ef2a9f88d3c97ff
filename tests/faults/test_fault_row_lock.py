"""The application holds a row lock inside the next batch's range for 10 s.

Expected: each attempt of the blocked batch gives up at ``lockTimeout`` (the backfill never
queues behind the application for longer), the batch is retried with back-off and halved after
repeated timeouts, the application's own UPDATEs on rows the backfill is about to touch never
wait much longer than ``lockTimeout``, and the run finishes with the exact result.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time

import psycopg
import pytest
from support_faults import ledger
from support_faults.app_threads import AppThreads
from support_faults.engine_run import EngineThread
from support_faults.seeds import random_seed

from backfill_worker.observe.events import BatchCommitted, RetryScheduled
from backfill_worker.sql.retry import LOCK_TIMEOUT

ROWS = 200_000
BATCH = 2_000
LOCK_TIMEOUT_SECONDS = 0.3
HOLD_SECONDS = 10.0
SCHEDULING_SLACK = 0.25
"""Allowance for a loaded 2-core machine on top of lockTimeout (the batch's own work, scheduling)."""


class Prober(AppThreads):
    """Application threads updating rows just ahead of the backfill, timing every UPDATE."""

    def __init__(self, dsn: str, engine: EngineThread, skip: int, threads: int = 2) -> None:
        self.dsn, self.engine, self.skip = dsn, engine, skip
        self.latencies: list[float] = []
        self.increments: dict[int, int] = {}
        self._seed = random_seed("row_lock prober")  # thread i draws from seed + i
        super().__init__()
        for number in range(threads):
            self.spawn(self._run, number)

    def _next_key(self, rng: random.Random) -> int:
        batches = self.engine.batches()
        position = int(batches[-1].last_key[0]) if batches else 0
        return min(ROWS, max(1, position + rng.randrange(0, 2 * BATCH)))

    def _run(self, number: int) -> None:
        rng = random.Random(self._seed + number)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                key = self._next_key(rng)
                if key == self.skip:
                    continue
                started = time.monotonic()
                changed = conn.execute(
                    "UPDATE items SET app_counter = app_counter + 1 WHERE id = %s AND grp < 50", [key]
                ).rowcount
                elapsed = time.monotonic() - started
                with self._lock:
                    if changed:
                        self.latencies.append(elapsed)
                        self.increments[key] = self.increments.get(key, 0) + 1
                time.sleep(0.002)


@pytest.mark.slow
def test_row_lock_held_10s_times_out_retries_smaller_and_never_blocks_the_app(database: str) -> None:
    ledger.seed(database, ROWS)
    with psycopg.connect(database, autocommit=True) as conn:
        locked = conn.execute("SELECT min(id) FROM items WHERE id >= %s AND grp < 50", [ROWS // 2]).fetchone()[0]
    document = ledger.manifest(
        "row-lock",
        batch={"size": BATCH, "minSize": 100, "maxSize": BATCH, "targetDuration": "0s"},
        limits={"lockTimeout": f"{int(LOCK_TIMEOUT_SECONDS * 1000)}ms", "maxRetries": 20},
    )
    holder = psycopg.connect(database)
    try:
        holder.execute("UPDATE items SET app_counter = app_counter + 1 WHERE id = %s", [locked])
        held_since = time.monotonic()
        engine = EngineThread(document, database).start()
        with Prober(database, engine, skip=locked) as prober:
            time.sleep(max(0.0, HOLD_SECONDS - (time.monotonic() - held_since)))
            holder.commit()
            released = time.monotonic()
            report = engine.join(timeout=120)
    finally:
        holder.close()

    assert report.state == "done"
    retries = [(t, r) for t, r in engine.timed(RetryScheduled) if isinstance(r, RetryScheduled)]
    lock_retries = [(t, r) for t, r in retries if r.error_kind == LOCK_TIMEOUT]
    assert len(lock_retries) >= 3, retries
    assert all(r.error_kind == LOCK_TIMEOUT for _, r in retries), retries
    # Repeated timeouts halve the batch.
    assert min(r.next_batch_size for _, r in lock_retries) <= BATCH // 4
    # Each attempt gave up after lockTimeout: between two retry events with no commit in between,
    # the gap is the back-off delay plus exactly one attempt (the index probe is a few ms).
    timeline = sorted(engine.timed(RetryScheduled) + engine.timed(BatchCommitted), key=lambda pair: pair[0])
    attempts = [
        later - earlier - first.delay_seconds
        for (earlier, first), (later, second) in itertools.pairwise(timeline)
        if isinstance(first, RetryScheduled) and isinstance(second, RetryScheduled)
    ]
    assert attempts and all(LOCK_TIMEOUT_SECONDS * 0.9 <= a <= LOCK_TIMEOUT_SECONDS + SCHEDULING_SLACK for a in attempts), attempts
    # The blocked batch only committed after the application released its lock.
    first_after = next(t for t, b in engine.timed(BatchCommitted) if int(b.last_key[0]) >= locked)
    assert first_after >= released

    latencies = prober.latencies
    assert len(latencies) >= 100, "the application probe hardly ran"
    worst = max(latencies)
    assert worst <= LOCK_TIMEOUT_SECONDS + SCHEDULING_SLACK, f"the application waited {worst:.3f} s for the backfill"
    result = ledger.check(database, app_increments=_with_holder(prober.increments, locked))
    result.assert_exact()
    p99 = statistics.quantiles(latencies, n=100)[98]
    ledger.report(
        f"application holds a row lock {HOLD_SECONDS:.0f} s (lockTimeout {int(LOCK_TIMEOUT_SECONDS * 1000)} ms)",
        faults_injected=1,
        runs=1,
        ledger=result,
        lock_timeouts=len(lock_retries),
        smallest_batch_after_halving=min(r.next_batch_size for _, r in lock_retries),
        longest_attempt_ms=round(max(attempts) * 1000),
        app_updates=len(latencies),
        app_update_p99_ms=round(p99 * 1000, 1),
        app_update_max_ms=round(worst * 1000, 1),
    )


def _with_holder(increments: dict[int, int], locked: int) -> dict[int, int]:
    """The probes' increments plus the lock holder's own one."""
    merged = dict(increments)
    merged[locked] = merged.get(locked, 0) + 1
    return merged

"""Health throttles and run windows against a real PostgreSQL under real load.

Mechanisms, not timings: a batch can only commit after the signal said go, so each test records
when the load was lifted (before lifting it) and checks that no batch committed earlier; the
WAL-rate test checks that pauses with reason ``maxWalBytesPerSecond`` happened and that the
rate over the run stayed within a loose bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from backfill_api.errors import RetriesExhausted, ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill, BatchSpec, LimitsSpec
from backfill_api.status import ThrottleReason
from backfill_cli.localpg import LocalPostgres
from backfill_worker.observe.events import BatchCommitted, Event, HealthObserved, RunStarted, Throttled, Tuning
from backfill_worker.observe.worker_metrics import WorkerMetrics
from backfill_worker.run.engine import run_backfill
from backfill_worker.throttles import health_probe

ROWS = 2000


def make_table(dsn: str, rows: int = ROWS, pad: int = 0) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, pad text)")
        conn.execute("INSERT INTO items (id, pad) SELECT g, repeat('x', %s) FROM generate_series(1, %s) g", [pad, rows])
        conn.execute("CREATE TABLE gate (v int NOT NULL, flag bool NOT NULL)")
        conn.execute("INSERT INTO gate VALUES (1, true)")


def manifest(name: str, **spec: Any) -> Backfill:
    body: dict[str, Any] = {"table": "items", "set": {"counter": "counter + 1"}, "where": "counter = 0",
                            "batch": {"size": 200, "minSize": 50, "maxSize": 200}}
    body.update(spec)
    return parse_backfill({"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
                           "metadata": {"name": name, "namespace": "health"}, "spec": body})


def assert_exactly_once(dsn: str, rows: int = ROWS) -> None:
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FILTER (WHERE counter = 1), count(*) FROM items").fetchone() == (rows, rows)


@dataclass
class Recorder:
    """Engine listener: every event with the monotonic and wall time it arrived."""

    events: list[tuple[float, datetime, Event]] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        self.events.append((time.monotonic(), datetime.now(UTC), event))

    def batches(self) -> list[tuple[float, datetime, BatchCommitted]]:
        return [(m, w, e) for m, w, e in self.events if isinstance(e, BatchCommitted)]

    def throttles(self, reason: str) -> list[tuple[float, datetime, Throttled]]:
        return [(m, w, e) for m, w, e in self.events if isinstance(e, Throttled) and e.reason == reason]


class LiftAfterWaits:
    """Engine listener: once every shard reported ``waits`` throttles of ``reason``, run ``lift``
    (once, in a thread of its own), recording the time just before it. A fallback lifts after
    ``FALLBACK_SECONDS`` so a throttle that never waits fails the assertions instead of hanging.
    Event-driven, so a slow start on a loaded machine cannot lift the load before it was seen."""

    FALLBACK_SECONDS = 30.0

    def __init__(self, reason: str, lift: Any, *, shards: int = 1, waits: int = 2) -> None:
        self.reason, self._lift, self.shards, self.waits = reason, lift, shards, waits
        self.recorder = Recorder()
        self.lifted: list[float] = []
        self._once = threading.Lock()
        self._fallback = threading.Timer(self.FALLBACK_SECONDS, self.fire)
        self._fallback.daemon = True
        self._fallback.start()

    def __call__(self, event: Event) -> None:
        self.recorder(event)
        seen = [e.shard for _, _, e in self.recorder.throttles(self.reason)]
        if all(seen.count(shard) >= self.waits for shard in range(self.shards)):
            threading.Thread(target=self.fire, daemon=True).start()

    def fire(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        self._fallback.cancel()
        self.lifted.append(time.monotonic())  # before the change: no batch may come earlier
        self._lift()

    def check(self) -> None:
        """The mechanism: every shard waited, and no batch committed before the load was lifted."""
        waits = self.recorder.throttles(self.reason)
        assert self.lifted, "never lifted"
        assert {e.shard for _, _, e in waits} == set(range(self.shards)), f"not every shard waited for {self.reason}"
        assert len(waits) >= self.waits * self.shards
        assert self.recorder.batches()[0][0] > self.lifted[0], "a batch committed before the load was lifted"


# -- spec.limits.health.query -------------------------------------------------------------------


@pytest.mark.parametrize("health,lift,parallelism", [
    ({"query": "SELECT flag FROM gate", "interval": "100ms"}, "UPDATE gate SET flag = false", 1),
    ({"query": "SELECT v * 50 FROM gate", "maxValue": 10, "interval": "100ms"}, "UPDATE gate SET v = 0", 2),
])
def test_health_query_holds_the_run_until_it_says_healthy(
    database: str, health: dict[str, Any], lift: str, parallelism: int
) -> None:
    make_table(database)

    def lift_it() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(lift)

    gate = LiftAfterWaits(ThrottleReason.HEALTH_QUERY, lift_it, shards=parallelism)
    backfill = manifest("query", limits={"health": health}, parallelism=parallelism)
    report = run_backfill(backfill, database, listeners=[gate])

    assert report.state == "done"
    gate.check()
    for shard in range(parallelism):  # healthy afterwards: a shard that ran waits no more
        first = min(m for m, _, e in gate.recorder.batches() if e.shard == shard)
        assert all(m < first for m, _, e in gate.recorder.throttles(ThrottleReason.HEALTH_QUERY) if e.shard == shard)
    assert_exactly_once(database)
    # Each shard's health session is closed with the run (its backend exits a moment later).
    deadline = time.monotonic() + 10
    with psycopg.connect(database, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%health'").fetchone() != (0,):
            assert time.monotonic() < deadline, "a health session outlived the run"
            time.sleep(0.05)


def test_failing_health_query_counts_as_unhealthy_then_recovers(database: str) -> None:
    make_table(database)
    spec = {"query": "SELECT 10 / (SELECT v FROM gate) > 100", "interval": "100ms"}  # valid while v = 1

    def break_it(event: Event) -> None:
        if isinstance(event, RunStarted):  # after validation, before the first check
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("UPDATE gate SET v = 0")  # division by zero from now on

    def restore() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("UPDATE gate SET v = 1")

    gate = LiftAfterWaits(ThrottleReason.HEALTH_QUERY, restore)
    report = run_backfill(manifest("failing", limits={"health": spec, "maxRetries": 1000}), database,
                          listeners=[break_it, gate])
    assert report.state == "done"
    gate.check()
    assert_exactly_once(database)


def test_health_query_failing_for_good_ends_the_run_with_nothing_written(database: str) -> None:
    make_table(database)
    spec = {"query": "SELECT 10 / (SELECT v FROM gate) > 100", "interval": "50ms"}

    def break_it(event: Event) -> None:
        if isinstance(event, RunStarted):
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("UPDATE gate SET v = 0")

    with pytest.raises(RetriesExhausted, match=r"health check failed 3 times in a row \(division by zero\)"):
        run_backfill(manifest("broken", limits={"health": spec, "maxRetries": 2}), database, listeners=[break_it])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE counter <> 0").fetchone() == (0,)


# -- maxActiveBackends / maxLockWaits ---------------------------------------------------------


def wait_until(dsn: str, query: str, expected: int) -> None:
    deadline = time.monotonic() + 20
    with psycopg.connect(dsn, autocommit=True) as conn:
        while (row := conn.execute(query).fetchone()) is None or row[0] < expected:
            assert time.monotonic() < deadline, f"never reached {expected}: {query}"
            time.sleep(0.02)


def test_active_backends_bound_waits_for_the_application(database: str) -> None:
    make_table(database)

    def busy() -> None:
        with psycopg.connect(database, autocommit=True, application_name="app") as conn:
            try:
                conn.execute("SELECT pg_sleep(120)")
            except psycopg.errors.QueryCanceled:  # the test ends the load
                pass

    sleepers = [threading.Thread(target=busy) for _ in range(3)]
    for sleeper in sleepers:
        sleeper.start()
    wait_until(database, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'app' AND state = 'active'", 3)

    def cancel() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'app'")

    gate = LiftAfterWaits(ThrottleReason.ACTIVE_BACKENDS, cancel)
    report = run_backfill(manifest("backends", limits={"maxActiveBackends": 2}), database, listeners=[gate])
    for sleeper in sleepers:
        sleeper.join()

    assert report.state == "done"
    gate.check()
    looks = [e for _, _, e in gate.recorder.events if isinstance(e, HealthObserved)]
    assert max(e.active_backends or 0 for e in looks) == 3  # the backfill's own sessions are not counted
    assert_exactly_once(database)


def test_lock_waits_bound_waits_until_the_lock_queue_drains(database: str) -> None:
    make_table(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE side (id int)")
    holder = psycopg.connect(database, application_name="app-holder")
    holder.execute("LOCK TABLE side IN ACCESS EXCLUSIVE MODE")  # in a transaction until commit

    def blocked() -> None:
        with psycopg.connect(database, autocommit=True, application_name="app") as conn:
            conn.execute("SELECT count(*) FROM side").fetchone()

    waiters = [threading.Thread(target=blocked) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    wait_until(database, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'app'", 2)
    gate = LiftAfterWaits(ThrottleReason.LOCK_WAITS, holder.commit)
    report = run_backfill(manifest("locks", limits={"maxLockWaits": 1}), database, listeners=[gate])
    for waiter in waiters:
        waiter.join()
    holder.close()

    assert report.state == "done"
    gate.check()
    assert_exactly_once(database)


# -- maxWalBytesPerSecond under an application writing too ------------------------------------


def current_wal(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def test_wal_rate_bound_is_honoured_with_an_application_writing(database: str) -> None:
    rows, bound = 3000, 500_000  # far below what even a loaded machine writes unthrottled
    make_table(database, rows=rows, pad=200)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE app_log (id bigserial PRIMARY KEY, body text)")
        conn.execute("CHECKPOINT")  # full-page images from here on are the run's own
    stop = threading.Event()

    def application() -> None:  # ~100 small write transactions per second
        with psycopg.connect(database, autocommit=True, application_name="app") as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO app_log (body) VALUES (repeat('a', 100))")
                time.sleep(0.01)

    app = threading.Thread(target=application)
    app.start()
    metrics = WorkerMetrics(process_metrics=False)
    recorder = Recorder()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            before, started = current_wal(conn), time.monotonic()
            report = run_backfill(manifest("wal", limits={"maxWalBytesPerSecond": bound}), database,
                                  listeners=[recorder, metrics])
            after, elapsed = current_wal(conn), time.monotonic() - started
    finally:
        stop.set()
        app.join()

    assert report.state == "done"
    waits = recorder.throttles(ThrottleReason.WAL_RATE)
    assert len(waits) >= 3, "the WAL bound never held the run back"
    rate = (after - before) / elapsed
    print(f"WAL {after - before} bytes in {elapsed:.2f}s = {rate:.0f} B/s (bound {bound}), {len(waits)} waits")
    # Loose: the first batch and the last one are not paced, and the run's own start-up is counted.
    assert rate <= bound * 1.5
    assert after - before > 2 * bound, "too little WAL to tell: make the table bigger"
    waited = metrics.registry.get_sample_value(
        "backfill_throttled_seconds_total", {"namespace": "health", "name": "wal", "shard": "0", "reason": "maxWalBytesPerSecond"})
    assert waited is not None and waited > 0.5
    assert metrics.registry.get_sample_value(
        "backfill_health_wal_bytes_per_second", {"namespace": "health", "name": "wal", "shard": "0"}) is not None
    assert_exactly_once(database, rows)


# -- spec.schedule across real window edges ---------------------------------------------------


class FlipControl:
    """A RunControl whose tuning the test replaces mid-run (what KubeControl does on a spec edit)."""

    def __init__(self) -> None:
        self.current: Tuning | None = None

    def stop_reason(self) -> str | None:
        return None

    def tuning(self) -> Tuning | None:
        return self.current


def clock_text(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%H:%M:%S")


def test_window_opens_then_closes_mid_run_and_a_live_edit_reopens_it(database: str) -> None:
    rows = 6000  # 120 batches of 50 with a 50 ms pause: more than the 3 s the window is open
    make_table(database, rows=rows)
    zone = ZoneInfo("Europe/Berlin")
    now = datetime.now(UTC)
    opens = now.replace(microsecond=0) + timedelta(seconds=3)
    closes = opens + timedelta(seconds=3)
    backfill = manifest(
        "window", batch={"size": 50, "minSize": 50, "maxSize": 50, "targetDuration": "0", "pause": "50ms"},
        schedule={"timeZone": "Europe/Berlin",
                  "windows": [{"start": clock_text(opens, zone), "end": clock_text(closes, zone)}]},
    )
    control = FlipControl()
    flipped: list[float] = []
    closing: list[Throttled] = []
    recorder = Recorder()

    def on_event(event: Event) -> None:
        recorder(event)
        # Closed mid-run: a window wait after batches. Edit the spec live: no schedule any more.
        if isinstance(event, Throttled) and event.reason == ThrottleReason.WINDOW and recorder.batches() and not flipped:
            closing.append(event)
            flipped.append(time.monotonic())
            # ... and finish quickly: bigger batches, no pause (live tuning too).
            control.current = Tuning(batch=BatchSpec(size=1000, max_size=1000), limits=LimitsSpec(), schedule=None)

    report = run_backfill(backfill, database, listeners=[on_event], control=control)

    assert report.state == "done"
    batches = recorder.batches()
    assert batches[0][1] >= opens, "a batch ran before the window opened"
    before_open = [e for _, wall, e in recorder.throttles(ThrottleReason.WINDOW) if wall < opens]
    assert before_open and all(e.next_window_start == opens for e in before_open)
    local_open = opens.astimezone(zone)
    tomorrow = datetime.combine(local_open.date() + timedelta(days=1), local_open.time(), tzinfo=zone)
    assert closing and closing[0].next_window_start == tomorrow.astimezone(UTC)  # the next one is tomorrow's
    during = [wall for _, wall, _ in batches if wall < closes]
    after_close = [m for m, wall, _ in batches if wall >= closes]
    assert during, "nothing ran inside the window"
    # Paused at a batch boundary: at most the batch in flight at the close ends after it; the rest
    # waited for the live edit.
    assert all(m > flipped[0] for m in after_close[1:])
    assert_exactly_once(database, rows)


# -- validation before the first write --------------------------------------------------------


@pytest.fixture
def standby(pg_server: LocalPostgres) -> Iterator[LocalPostgres]:
    primary = LocalPostgres(password=pg_server.password).start()
    replica = primary.make_standby()
    try:
        replica.start()
        yield replica
    finally:
        replica.cleanup()
        primary.cleanup()


def test_wal_bound_on_a_standby_is_refused_clearly(standby: LocalPostgres) -> None:
    with psycopg.connect(standby.dsn(), autocommit=True) as conn, pytest.raises(ValidationFailed) as caught:
        health_probe.validate(conn, LimitsSpec(max_wal_bytes_per_second=1000), str)
    assert caught.value.field == "spec.limits.maxWalBytesPerSecond"
    assert "standby" in caught.value.message


def test_own_sessions_are_recognised_by_application_name() -> None:
    names = health_probe.own_names("ns/name_1")
    assert names["own"] == "backfill ns/name_1"
    assert names["own_sessions"] == "backfill ns/name\\_1 %"  # LIKE-escaped: ns/nameX1 is someone else
    long = health_probe.own_names("n/" + "x" * 80)
    assert len(long["own"]) == 63  # application_name keeps 63 bytes: match what the server stored
    assert long["own_sessions"] == long["own"] + "%"


def test_plan_checks_the_health_query_too(database: str) -> None:
    from backfill_worker.plan.planner import plan_backfill

    make_table(database)
    with pytest.raises(ValidationFailed) as caught:
        plan_backfill(manifest("plan", limits={"health": {"query": "SELECT 'busy'"}}), database)
    assert caught.value.field == "spec.limits.health.query" and "returned a str" in caught.value.message
    assert plan_backfill(manifest("plan", limits={"health": {"query": "SELECT false"}}), database).index_ok

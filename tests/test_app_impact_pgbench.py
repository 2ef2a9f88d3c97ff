"""The application-impact throttle against a real application: pgbench on the suite's PostgreSQL.

Direction, not timings: while pgbench runs the throttle must see it and back off (pauses, short
batches); once pgbench is gone it must speed up again; and the data must come out exactly once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backfill_api.manifest import parse_backfill
from backfill_api.status import ImpactLimit
from backfill_worker.observe.events import BatchCommitted, Event, ImpactObserved, Throttled
from backfill_worker.run.engine import run_backfill
from backfill_worker.throttles import app_impact

pytestmark = pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench (postgresql-client) not installed")

SCALE = 2
ROWS = 100_000 * SCALE


def pgbench_env(dsn: str) -> dict[str, str]:
    """libpq environment for pgbench: the password never appears on a command line."""
    params = conninfo_to_dict(dsn)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE"}
    return {**os.environ, **{env: str(params[key]) for key, env in names.items() if key in params}}


def stop_pgbench(dsn: str, process: subprocess.Popen[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgbench'")
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pgbench_init(database: str) -> dict[str, str]:
    env = pgbench_env(database)
    subprocess.run(["pgbench", "-i", "-q", "-I", "dtGvp", "-s", str(SCALE)], env=env, check=True, capture_output=True)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_accounts ADD COLUMN migrated boolean")
    return env


def start_backfill(database: str, name: str, batch_size: int,
                   ) -> tuple[threading.Thread, list[tuple[float, Event]], dict[str, Any]]:
    """``migrated = true`` on every account, in a thread; its events timestamped (monotonic)."""
    events: list[tuple[float, Event]] = []
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": name},
        "spec": {"table": "pgbench_accounts", "set": {"migrated": "true"}, "where": "migrated IS NOT TRUE",
                 "batch": {"size": batch_size, "minSize": 50, "maxSize": batch_size}},
    })
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = run_backfill(backfill, database, listeners=[lambda e: events.append((time.monotonic(), e))])
        except BaseException as error:
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    return runner, events, outcome


def test_throttle_backs_off_under_pgbench_and_speeds_up_when_it_stops(database: str) -> None:
    env = pgbench_init(database)
    app = subprocess.Popen(["pgbench", "-n", "-c", "4", "-j", "2", "-T", "120"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    stopped_at: list[float] = []
    try:
        time.sleep(1.0)  # the application is at work before the backfill starts
        # Small batches so the run lasts long enough to see both halves on any machine.
        runner, events, outcome = start_backfill(database, "impact", 200)
        deadline = time.monotonic() + 90
        while sum(isinstance(e, ImpactObserved) and e.present for _, e in events) < 4 and runner.is_alive():
            assert time.monotonic() < deadline, "the throttle never reported the application"
            time.sleep(0.05)
    finally:
        stop_pgbench(database, app)
    stopped_at.append(time.monotonic())
    runner.join(timeout=180)
    assert not runner.is_alive() and "error" not in outcome, outcome

    decisions = [(t, e) for t, e in events if isinstance(e, ImpactObserved)]
    busy = [e for t, e in decisions if t < stopped_at[0]]
    after = [e for t, e in decisions if t > stopped_at[0] + 0.5]
    trace = [(round(t - decisions[0][0], 2), e.summary, round(e.batch_target_seconds * 1000, 1)) for t, e in decisions]
    print("decisions (s, summary, batch target ms):", trace)
    # Busy: the application is seen, the duty is below 1, batches are held to the lock budget,
    # and the engine actually paused for it.
    # Seen (on a loaded machine maybe only at the first decision, as an arriving application), then never lost.
    seen = next(i for i, e in enumerate(busy) if e.present)
    busy = busy[seen:]
    assert busy and all(e.present for e in busy), trace
    assert min(e.duty for e in busy) < 1.0, trace
    # Status says what limits the speed, typed, never "nobody there" while pgbench runs.
    assert all(isinstance(e.limited_by, ImpactLimit) and e.limited_by != ImpactLimit.NO_APPLICATION for e in busy), trace
    assert max(e.batch_target_seconds for e in busy) <= 0.02 + 1e-9, trace
    paused = [e for t, e in events if isinstance(e, Throttled) and e.reason == "applicationImpact" and t < stopped_at[0]]
    assert paused and all(e.seconds > 0 for e in paused)
    # Idle again: it notices, and runs faster than it was allowed to while pgbench ran.
    assert after, f"the backfill ended before the throttle re-measured; trace: {trace}"
    assert any(not e.present and e.limited_by == ImpactLimit.NO_APPLICATION for e in after), trace
    assert max(e.duty for e in after) > min(e.duty for e in busy), trace
    assert max(e.batch_target_seconds for e in after) > 0.02, trace
    # Exactly once, whatever the throttle did.
    report = outcome["report"]
    batches = [e for _, e in events if isinstance(e, BatchCommitted)]
    assert report.rows_updated == sum(b.rows_updated for b in batches) == ROWS
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FILTER (WHERE migrated), count(*) FROM pgbench_accounts").fetchone() == (ROWS, ROWS)


def test_an_arriving_application_is_met_within_one_window_and_its_headroom_is_taken(database: str) -> None:
    """No application, then a light one (pgbench at a fixed 200 tps: plenty of headroom) arrives:
    the first decision that sees it has already cut the duty, and the duty then grows again past
    the careful start, because the application does not suffer from it."""
    env = pgbench_init(database)
    runner, events, outcome = start_backfill(database, "arrival", 100)
    deadline = time.monotonic() + 60
    while sum(isinstance(e, ImpactObserved) for _, e in events) < 2:  # running flat out, nobody else there
        assert runner.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.02)
    arrived = time.monotonic()
    app = subprocess.Popen(["pgbench", "-n", "-c", "2", "-j", "2", "-R", "200", "-T", "120"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        while runner.is_alive() and time.monotonic() < arrived + 90 and not any(
            isinstance(e, ImpactObserved) and e.present and e.duty > app_impact.START_DUTY_BUSY for t, e in events if t > arrived
        ):
            time.sleep(0.05)
    finally:
        stop_pgbench(database, app)
    runner.join(timeout=300)
    assert not runner.is_alive() and "error" not in outcome, outcome
    decisions = [(t, e) for t, e in events if isinstance(e, ImpactObserved)]
    trace = [(round(t - arrived, 2), e.summary) for t, e in decisions]
    print("decisions (s after pgbench started, summary):", trace)
    before = [e for t, e in decisions if t < arrived]
    assert before and not any(e.present for e in before), trace
    seen = [e for t, e in decisions if t > arrived and e.present]
    assert seen, trace
    # Backed off in the first decision that saw it (it is then measured alone)...
    assert seen[0].duty <= app_impact.START_DUTY_BUSY, trace
    # ...and then took the headroom the light application leaves.
    assert max(e.duty for e in seen) > app_impact.START_DUTY_BUSY, trace
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FILTER (WHERE migrated), count(*) FROM pgbench_accounts").fetchone() == (ROWS, ROWS)

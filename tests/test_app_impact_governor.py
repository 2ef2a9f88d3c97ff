"""The governor's sampling on a real database: which moments its active-session signal is made of.

Other sessions are real (``pg_sleep`` on their own connections, so ``pg_stat_activity`` shows them
active); the clock is the governor's injectable one, so the windows are exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest

from backfill_api.model import ApplicationImpactSpec
from backfill_worker.observe.events import ImpactObserved
from backfill_worker.throttles import impact_governor, impact_signals

IDENTITY = "shop/governor"


@contextmanager
def active_sessions(dsn: str, count: int) -> Iterator[None]:
    """``count`` other sessions running a statement until the block ends."""
    conns = [psycopg.connect(dsn, autocommit=True, application_name="application") for _ in range(count)]
    pids = [c.info.backend_pid for c in conns]
    threads = [threading.Thread(target=_sleep_until_cancelled, args=(c,)) for c in conns]
    for thread in threads:
        thread.start()
    with psycopg.connect(dsn, autocommit=True) as watcher:
        _wait_for(watcher, pids, active=True)
        try:
            yield
        finally:
            for pid in pids:
                watcher.execute("SELECT pg_cancel_backend(%s)", [pid])
            for thread in threads:
                thread.join(timeout=10)
            _wait_for(watcher, pids, active=False)
    for conn in conns:
        conn.close()


def _sleep_until_cancelled(conn: psycopg.Connection) -> None:
    try:
        conn.execute("SELECT pg_sleep(60)")
    except psycopg.errors.QueryCanceled:
        pass


def _wait_for(watcher: psycopg.Connection, pids: list[int], *, active: bool) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active'", [pids]).fetchone()
        if row is not None and (row[0] == len(pids)) == active:
            return
        time.sleep(0.02)
    raise AssertionError(f"sessions {pids} never became {'active' if active else 'idle'}")


@dataclass
class ManualClock:
    now: float = 100.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


def governed() -> tuple[impact_governor.Governor, Callable[[float], None], list[ImpactObserved]]:
    """A governor on a manual clock: (it, the clock's advance, what it reported)."""
    clock, reports = ManualClock(), list[ImpactObserved]()
    governor = impact_governor.Governor(
        ApplicationImpactSpec(), identity=IDENTITY, shard=0, table=("public", "t"), checkpoint_schema="backfill",
        own=impact_governor.OwnActivity(), emit=reports.append, clock=lambda: clock.now,
    )
    return governor, clock.advance, reports


def test_time_weighted_active_weighs_each_sample_by_the_time_it_stands_for() -> None:
    assert impact_signals.time_weighted_active([(0.01, 4), (0.09, 0)]) == pytest.approx(0.4)
    assert impact_signals.time_weighted_active([(1.0, 2), (1.0, 4)]) == pytest.approx(3.0)
    assert impact_signals.time_weighted_active([]) is None


def test_sessions_seen_only_right_after_short_batches_weigh_as_little_as_the_batches(database: str) -> None:
    """At a low duty the post-batch samples (when waiters catch up) are a small share of the
    window; counted one sample one vote, they held a 2 %-duty run near the budget for ever."""
    governor, advance, reports = governed()
    with psycopg.connect(database, autocommit=True, application_name=f"backfill {IDENTITY} shard 0") as conn, \
            active_sessions(database, 1):  # the application: one session always at work
        governor.begin(conn, advance, 0.03)
        assert governor.controller is not None and governor.controller.present
        batch, pause = 0.01, 0.12
        for _ in range(6):  # until a decision window (0.5 s) closes
            advance(batch)
            with active_sessions(database, 2):  # right after each batch: 2 more, catching up
                governor.pause_after(conn, batch)
            governor.measure_pause(conn, pause, lambda: advance(pause))  # then the application alone
        decided = reports[1:]  # the first report is the pre-run baseline
    assert decided and decided[0].present, reports
    # 1 session all the time, 2 more for 0.01 s in every 0.13 s: about 1.15, not the 3.0 an
    # unweighted mean of the post-batch samples gives.
    assert decided[0].active_sessions == pytest.approx(1 + 2 * batch / (batch + pause), abs=0.1), decided

def test_long_pauses_after_short_batches_still_reach_decisions(database: str) -> None:
    """At a low duty every pause is long enough to be measured (two samples around it) and every
    batch short; the post-batch sampling must not wait for 0.1 s since *those* samples, or no
    decision window ever closes and the duty stays where it fell (a 2 %-duty run took 10 min)."""
    governor, advance, reports = governed()
    with psycopg.connect(database, autocommit=True, application_name=f"backfill {IDENTITY} shard 0") as conn, \
            active_sessions(database, 1):
        governor.begin(conn, advance, 0.03)
        before = len(reports)
        for _ in range(8):  # 8 cycles of 0.01 s batch + 0.4 s measured pause: 3.3 s
            advance(0.01)
            governor.pause_after(conn, 0.01)
            governor.measure_pause(conn, 0.4, lambda: advance(0.4))
    assert len(reports) - before >= 3, f"{len(reports) - before} decisions in 3.3 s"

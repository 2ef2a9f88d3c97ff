"""Per-shard glue between the engine, the signal queries and the pure controller.

The engine calls :meth:`Governor.begin` before the first batch (the baseline), records lock
waiters seen inside each batch transaction, and asks :meth:`Governor.after_batch` for the wait
after each batch. The governor decides when to sample (at most every ``SAMPLE_SECONDS``, between
batches, on the shard's idle connection), when to decide (every ``DECISION_SECONDS``), and when a
pause is long enough to be a clean measurement of the application alone (a new baseline).
The decisions themselves are :class:`app_impact.Controller`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psycopg

from backfill_api.model import ApplicationImpactSpec
from backfill_api.status import ThrottleReason
from backfill_worker.observe.events import ImpactObserved
from backfill_worker.throttles import app_impact, impact_signals

SAMPLE_SECONDS = 0.1
DECISION_SECONDS = 0.5
IDLE_CHECK_SECONDS = 0.1
"""Pre-run look: if nothing else happens on the server for this long, start flat out."""
BASELINE_SECONDS = 0.6
"""Pre-run measurement when an application is there."""
CLEAN_MIN_SECONDS = 0.15
"""A pause at least this long measures the application alone (a baseline refresh)."""
CLEAN_SECONDS = 0.3
REBASELINE_SECONDS = 15.0
"""While an application is present, re-measure it alone at least this often."""
SYNCHRONOUS_COMMIT = False
"""Batches commit asynchronously under ``protect`` too (as under ``fast``); the application-impact
benchmark flips this to measure whether our WAL flushes queue the application's commits."""
APPLICATION_IMPACT = ThrottleReason.APPLICATION_IMPACT
"""``throttleReason`` of a pause the controller asked for."""


@dataclass
class OwnActivity:
    """The backfill's own transactions, counted across all its shards (thread-safe)."""

    writes: int = 0
    commits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, writes: int, commits: int) -> None:
        with self._lock:
            self.writes += writes
            self.commits += commits

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.writes, self.commits


@dataclass(frozen=True)
class _Mark:
    sample: impact_signals.Sample
    own: tuple[int, int]


class Governor:
    def __init__(
        self, spec: ApplicationImpactSpec, *, identity: str, shard: int, table: tuple[str, str],
        checkpoint_schema: str, own: OwnActivity, emit: Callable[[ImpactObserved], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spec = spec
        self._identity, self._shard = identity, shard
        self._sampler = impact_signals.Sampler(f"backfill {identity}", table, checkpoint_schema)
        self._own = own
        self._emit = emit
        self._clock = clock
        self.controller: app_impact.Controller | None = None
        self._window: _Mark | None = None
        self._last_batch_sample_at = 0.0
        """When ``pause_after`` last sampled: its own clock, so pause samples never starve decisions."""
        self._last_pause_sample_at = 0.0
        self._active: list[tuple[float, int]] = []
        """This window's active-session samples: (seconds each stands for, count)."""
        self._lock_waiters = 0
        self._work = 0.0
        """Seconds spent in batches since the window began: the duty actually spent."""
        self.yields_in_a_row = 0
        self.lock_yields = 0
        """Batches that yielded to an application's row lock (this run)."""
        self._last_clean = 0.0
        self.last_pause = 0.0
        self.synchronous_commit = SYNCHRONOUS_COMMIT

    @property
    def budget(self) -> app_impact.Budget:
        return app_impact.Budget(
            min_throughput_ratio=self._spec.min_throughput_ratio,
            max_latency_ratio=self._spec.max_latency_ratio,
            max_lock_hold_seconds=self._spec.max_lock_hold.total_seconds(),
        )

    def _mark(self, conn: psycopg.Connection, *, statements: bool = True) -> _Mark:
        # Our sample queries are transactions too (autocommit): count them as our own.
        self._own.add(0, 2 if statements else 1)
        at = self._clock()
        return _Mark(self._sampler.sample(conn, at), self._own.totals())

    def _activity(self, first: _Mark, last: _Mark, active: list[tuple[float, int]], lock_waiters: int) -> app_impact.Activity:
        mean_active = impact_signals.time_weighted_active(active)
        if mean_active is None:
            mean_active = float(last.sample.active_others)
        return impact_signals.activity_between(
            first.sample, last.sample, own_writes=last.own[0] - first.own[0], own_commits=last.own[1] - first.own[1],
            active=mean_active, lock_waiters=max(lock_waiters, last.sample.lock_waiters),
        )

    def _alone(self, first: _Mark, last: _Mark) -> app_impact.Activity:
        """The application by itself before the first batch: the two samples weigh the same."""
        return self._activity(first, last, [(1.0, first.sample.active_others), (1.0, last.sample.active_others)], 0)

    # -- engine hooks -----------------------------------------------------------------------

    def begin(
        self, conn: psycopg.Connection, sleep: Callable[[float], None], max_batch_seconds: float,
        look: app_impact.Activity | None = None,
    ) -> None:
        """The baseline: the application alone, before the first batch.

        ``look``: an idle check already made (over the run's validation, see :class:`PreRunLook`);
        when it saw nobody, the run starts flat out without looking again."""
        first = self._mark(conn)
        if look is not None and not look.present:
            activity, last = look, first
        else:
            sleep(IDLE_CHECK_SECONDS)
            last = self._mark(conn)
            activity = self._alone(first, last)
        if activity.present:
            sleep(max(0.0, BASELINE_SECONDS - (self._clock() - first.sample.at)))
            last = self._mark(conn)
            activity = self._alone(first, last)
        self.controller = app_impact.Controller.start(self.budget, max_batch_seconds, activity)
        self._window = last
        self._last_clean = self._last_batch_sample_at = self._last_pause_sample_at = self._clock()
        self._report()

    def retune(self, spec: ApplicationImpactSpec, max_batch_seconds: float) -> None:
        self._spec = spec
        if self.controller is not None:
            self.controller = replace_budget(self.controller, self.budget, max_batch_seconds)

    def note_lock_waiters(self, count: int) -> None:
        self._lock_waiters = max(self._lock_waiters, count)

    def batch_lock_timeout(self, spec_timeout: float) -> tuple[float, bool]:
        """The next batch attempt's lock_timeout, and whether its expiry is a yield (see app_impact)."""
        wait = self.controller.lock_wait_seconds() if self.controller is not None else None
        return app_impact.batch_lock_timeout(spec_timeout, wait, self.yields_in_a_row)

    def note_yield(self) -> float:
        """A batch gave way to an application's row lock: the pause before it is tried again."""
        self.yields_in_a_row += 1
        self.lock_yields += 1
        if self.yields_in_a_row == 1:
            self._report()  # status says so now, not at the next decision
        return app_impact.yield_pause(self.yields_in_a_row)

    def note_locked(self) -> None:
        """A batch got all its row locks."""
        self.yields_in_a_row = 0

    def note_batch(self) -> None:
        """One committed (or failed) batch transaction of ours: one transaction id, one commit."""
        self._own.add(1, 2)  # the batch, and its bound probe on the prefetch connection

    def pause_after(self, conn: psycopg.Connection, work_seconds: float) -> float:
        """Sample/decide as due; the pause the controller wants after this batch."""
        assert self.controller is not None and self._window is not None
        now = self._clock()
        self._work += max(work_seconds, 0.0)
        if now - self._last_batch_sample_at >= SAMPLE_SECONDS:
            self._last_batch_sample_at = now
            if now - self._window.sample.at >= DECISION_SECONDS:
                last = self._mark(conn)
                self._active.append((max(work_seconds, 1e-3), last.sample.active_others))
                activity = self._activity(self._window, last, self._active, self._lock_waiters)
                spent = self._work / max(last.sample.at - self._window.sample.at, 1e-3)
                self.controller = self.controller.observe(activity, duty=spent)
                self._window, self._active, self._lock_waiters, self._work = last, [], 0, 0.0
                self._report()
            else:
                self._active.append((max(work_seconds, 1e-3), self._mark(conn, statements=False).sample.active_others))
        pause = self.controller.pause_after(work_seconds)
        if self.controller.present and (
            self.controller.needs_baseline or self._clock() - self._last_clean >= REBASELINE_SECONDS
        ):
            pause = max(pause, CLEAN_SECONDS)
        self.last_pause = pause
        return pause

    def measure_pause(self, conn: psycopg.Connection, seconds: float, pause: Callable[[], None]) -> None:
        """Run the pause (``seconds`` long); a long one is measured as the application alone."""
        if seconds < CLEAN_MIN_SECONDS:
            pause()
            if seconds > 0 and self._clock() - self._last_pause_sample_at >= SAMPLE_SECONDS:
                self._last_pause_sample_at = self._clock()
                # The application between our batches: weighs against the post-batch samples.
                self._active.append((seconds, self._mark(conn, statements=False).sample.active_others))
            return
        first = self._mark(conn, statements=self.controller is not None and self.controller.needs_baseline)
        pause()
        last = self._mark(conn, statements=first.sample.statement_calls is not None)
        assert self.controller is not None
        self._active.append((seconds, last.sample.active_others))  # the application alone, for this window too
        self.controller = self.controller.rebaseline(self._activity(first, last, [(1.0, last.sample.active_others)], 0))
        self._last_clean = self._clock()

    def batch_target_seconds(self) -> float:
        assert self.controller is not None
        return self.controller.batch_target_seconds()

    def _report(self) -> None:
        c = self.controller
        assert c is not None
        last, base = c.last, c.baseline
        ratio = None
        if last is not None and base is not None and base.write_rate >= app_impact.BUSY_RATE:
            ratio = last.write_rate / base.write_rate
        self._emit(ImpactObserved(
            identity=self._identity, shard=self._shard, present=c.present, duty=c.duty, pressure=c.pressure,
            limited_by=c.limited_by, batch_target_seconds=c.batch_target_seconds(),
            pause_seconds=self.last_pause,
            throughput_ratio=ratio, app_write_rate=last.write_rate if last else 0.0,
            baseline_write_rate=base.write_rate if base else 0.0, active_sessions=last.active if last else 0.0,
            lock_waiters=last.lock_waiters if last else 0, wal_bytes_per_second=last.wal_rate if last else 0.0,
            statement_ms=last.statement_ms if last else None, summary=c.summary(),
            lock_wait_seconds=c.lock_wait_seconds(), lock_yields=self.lock_yields,
        ))


class PreRunLook:
    """The pre-run "is anybody there?" look, spread over the run's validation instead of a sleep.

    Started before validation (read-only queries: no transaction ids of ours), finished after it,
    waiting only for what is left of ``IDLE_CHECK_SECONDS``."""

    def __init__(self, conn: psycopg.Connection, identity: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._sampler = impact_signals.Sampler(f"backfill {identity}", ("", ""), "")
        self._clock = clock
        self._first = self._sampler.sample(conn, clock(), statements=False)

    def finish(self, conn: psycopg.Connection, sleep: Callable[[float], None]) -> app_impact.Activity:
        sleep(max(0.0, IDLE_CHECK_SECONDS - (self._clock() - self._first.at)))
        last = self._sampler.sample(conn, self._clock(), statements=False)
        return impact_signals.activity_between(  # validation is read-only: no write transaction is ours
            self._first, last, own_writes=0, own_commits=0, lock_waiters=0,
            active=impact_signals.time_weighted_active([(1.0, self._first.active_others), (1.0, last.active_others)]) or 0.0,
        )


def replace_budget(controller: app_impact.Controller, budget: app_impact.Budget, max_batch_seconds: float) -> app_impact.Controller:
    """Live tuning: a new budget applies from the next decision, the learned state stays."""
    return replace(
        controller, budget=budget, max_batch_seconds=max_batch_seconds,
        lock_hold_seconds=min(controller.lock_hold_seconds, budget.max_lock_hold_seconds) or budget.max_lock_hold_seconds,
    )

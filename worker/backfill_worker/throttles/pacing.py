"""How fast one shard runs: batch size, live re-tuning, waits between batches, replica lag, the
application-impact governor's hooks, the health throttles and the run windows. The decisions are
in ``throttle.py``, ``batching.py``, ``app_impact.py``, ``health.py`` and ``schedule.py`` (pure);
this module holds the shard's pacing state and does the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import psycopg

from backfill_api.model import ImpactMode
from backfill_worker.observe.events import Event, ReplicationLagObserved, RunControl, Throttled, Tuning
from backfill_worker.throttles import app_impact, health, health_probe, impact_governor, schedule, throttle
from backfill_worker.throttles.batching import BatchSizer

T = TypeVar("T")

SLEEP_SLICE_SECONDS = 0.05
"""Waits are sliced so a stop request is honoured within this time."""


class StopRequested(Exception):
    """Raised out of a wait when the control asks to stop."""


class Session(Protocol):
    """The shard's database session, as the pacing needs it (measurements with retries)."""

    def connection(self) -> psycopg.Connection: ...

    def with_retries(self, attempt: Callable[[], T]) -> T: ...


@dataclass
class Pacer:
    """One shard's pace; used by the shard's thread only."""

    identity: str
    shard: int
    table: tuple[str, str]
    checkpoint_schema: str
    control: RunControl
    emit: Callable[[Event], None]
    tuning: Tuning
    own: impact_governor.OwnActivity
    """The backfill's own transactions over all shards (the application-impact throttle's input)."""
    _sizer: BatchSizer = field(init=False)
    """Owned: the engine reads :attr:`batch_size` and reports through :meth:`observe` and :meth:`halve`."""
    throttle_reason: str = ""
    """Why the wait before the current batch happened ('' = none); reported with the batch."""
    governor: impact_governor.Governor | None = field(init=False, default=None)
    next_lag_check: float = 0.0
    open_health_session: Callable[[], psycopg.Connection] | None = None
    """Opens the health throttles' own session (None: they cannot run, e.g. in unit tests)."""
    redact: Callable[[str], str] = str
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    """The run windows' clock (a test may shift it)."""
    gate: health_probe.HealthGate | None = field(init=False, default=None)
    pre_run_look: app_impact.Activity | None = None
    """The run's "is anybody there?" look, taken over validation (used by the first baseline only)."""

    def __post_init__(self) -> None:
        batch = self.tuning.batch
        self._sizer = BatchSizer(batch.size, batch.min_size, batch.max_size, batch.target_duration.total_seconds())
        self._set_governor()

    def _set_governor(self) -> None:
        """``applicationImpact.mode: protect`` gets a governor (kept across live re-tuning)."""
        spec = self.tuning.limits.application_impact
        if spec.mode != ImpactMode.PROTECT:
            self.governor = None
        elif self.governor is None:
            self.governor = impact_governor.Governor(
                spec, identity=self.identity, shard=self.shard, table=self.table,
                checkpoint_schema=self.checkpoint_schema, own=self.own, emit=self.emit,
            )
        else:
            self.governor.retune(spec, self.tuning.batch.target_duration.total_seconds())

    @property
    def batch_size(self) -> int:
        """Keys (ctid: blocks) in the next batch."""
        return self._sizer.size

    def observe(self, keys: int, seconds: float) -> None:
        """A committed batch of ``keys`` keys took ``seconds``: the sizer steers the next size."""
        self._sizer = self._sizer.observe(keys, seconds)

    def halve(self) -> None:
        """After repeated timeouts: the batch was too big for the current contention."""
        self._sizer = self._sizer.halve()

    def retune(self) -> None:
        """Apply a changed spec (``batch``, ``limits``) from the control."""
        tuning = self.control.tuning()
        if tuning is None or tuning == self.tuning:
            return
        old, new = self.tuning.batch, tuning.batch
        self._sizer = self._sizer.retune(
            min_size=new.min_size, max_size=new.max_size, target_seconds=new.target_duration.total_seconds(),
            # A new starting size, or a switch to a fixed size, applies at once.
            size=new.size if new.size != old.size or new.target_duration.total_seconds() <= 0 else None,
        )
        self.tuning = tuning
        self._set_governor()

    def before_batch(self, session: Session) -> None:
        """The run window, the governor's first measurement, the replica-lag wait when it is due,
        and the health throttles: each waits (re-reading the live spec) until it says go."""
        self._wait_for_window()
        self._begin_impact_control(session)
        if self.tuning.limits.max_replication_lag.total_seconds() > 0 and time.monotonic() >= self.next_lag_check:
            self._wait_for_replicas(session)
            self.next_lag_check = time.monotonic() + throttle.LAG_POLL_SECONDS
        self._wait_for_health()

    def _wait_for_window(self) -> None:
        """Outside ``spec.schedule``'s windows: wait at this batch boundary until one opens."""
        while True:
            now = self.wall_clock()
            state = schedule.window_state(self.tuning.schedule, now)
            wait = schedule.window_wait(state, now)
            if wait is None:
                return
            self.throttle(wait, next_window_start=state.next_start, until_retuned=True)
            self.retune()  # a changed schedule applies while waiting

    def _wait_for_health(self) -> None:
        while health.enabled(self.tuning.limits) and self.open_health_session is not None:
            if self.gate is None:
                self.gate = health_probe.HealthGate(
                    self.identity, self.shard, self.open_health_session, self.emit, self.redact,
                )
            wait = self.gate.check(self.tuning.limits)
            if wait is None:
                return
            self.throttle(wait, until_retuned=True)
            self.retune()

    def close(self) -> None:
        """The end of the shard's run: the health session goes."""
        if self.gate is not None:
            self.gate.close()
            self.gate = None

    def after_batch(self, session: Session, rows: int, work_seconds: float, shard_count: int) -> None:
        """Wait as the spec's pause and rate limit say, or as the governor says when it is on."""
        limits, batch = self.tuning.limits, self.tuning.batch
        wait = throttle.after_batch(
            rows, work_seconds, batch.pause.total_seconds(), throttle.per_runner_rate(limits.max_rows_per_second, shard_count)
        )
        if self.governor is not None:
            self._impact_throttle(session, self.governor, wait, work_seconds)
        elif wait is not None:
            self.throttle(wait)

    def _begin_impact_control(self, session: Session) -> None:
        """Before the first batch (or when re-tuned to ``protect``): measure the application alone."""
        governor = self.governor
        if governor is None or governor.controller is not None:
            return
        target = self.tuning.batch.target_duration.total_seconds()
        look, self.pre_run_look = self.pre_run_look, None
        session.with_retries(lambda: governor.begin(session.connection(), self.sleep, target, look))
        self._impact_batch_target(governor)

    def batch_lock_timeout(self) -> tuple[float, bool]:
        """The next batch attempt's lock_timeout in seconds, and whether its expiry is a yield."""
        spec = self.tuning.limits.lock_timeout.total_seconds()
        return (spec, False) if self.governor is None else self.governor.batch_lock_timeout(spec)

    def lock_yielded(self) -> None:
        """A batch gave way to an application's row lock: retry it halved, after a short pause."""
        assert self.governor is not None
        self.halve()
        self.throttle(throttle.Wait(impact_governor.APPLICATION_IMPACT, self.governor.note_yield()))

    def locked(self) -> None:
        if self.governor is not None:
            self.governor.note_locked()

    def _impact_throttle(
        self, session: Session, governor: impact_governor.Governor, wait: throttle.Wait | None, work_seconds: float
    ) -> None:
        """The longer of the spec's wait and the controller's pause; a long one measures the app alone."""
        pause = session.with_retries(lambda: governor.pause_after(session.connection(), work_seconds))
        self._impact_batch_target(governor)
        if wait is None or pause > wait.seconds:
            wait = throttle.Wait(impact_governor.APPLICATION_IMPACT, pause) if pause > 0 else None
        chosen = wait
        session.with_retries(
            lambda: governor.measure_pause(
                session.connection(), chosen.seconds if chosen else 0.0, lambda: self.throttle(chosen) if chosen else None
            )
        )

    def _impact_batch_target(self, governor: impact_governor.Governor) -> None:
        batch = self.tuning.batch
        self._sizer = self._sizer.retune(
            min_size=batch.min_size, max_size=batch.max_size, target_seconds=governor.batch_target_seconds()
        )

    def _wait_for_replicas(self, session: Session) -> None:
        while True:
            lag = session.with_retries(lambda: throttle.read_replication_lag(session.connection()))
            self.emit(ReplicationLagObserved(self.identity, self.shard, lag))
            wait = throttle.lag_wait(lag, self.tuning.limits.max_replication_lag.total_seconds())
            if wait is None:
                return
            self.throttle(wait)

    def throttle(
        self, wait: throttle.Wait, *, next_window_start: datetime | None = None, until_retuned: bool = False
    ) -> None:
        self.throttle_reason = wait.reason
        self.emit(Throttled(self.identity, self.shard, wait.reason, wait.seconds, next_window_start))
        self.sleep(wait.seconds, until_retuned=until_retuned)

    def sleep(self, seconds: float, *, until_retuned: bool = False) -> None:
        """Sleep in slices; raises :class:`StopRequested` as soon as the control asks to stop.

        ``until_retuned``: also end early when the live spec changed (a long window or health
        wait re-decides at once with the new spec)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.control.stop_reason():
                raise StopRequested
            if until_retuned and self.control.tuning() not in (None, self.tuning):
                return
            time.sleep(min(SLEEP_SLICE_SECONDS, left))

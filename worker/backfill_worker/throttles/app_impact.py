"""Pure application-impact controller: how fast the backfill may go without hurting the application.

Input: what the *other* sessions did over a window of time (their write-transaction and commit
rates, active sessions, sessions waiting for a row lock the backfill holds, the WAL rate, and
their mean statement latency where ``pg_stat_statements`` is installed), and a baseline of the
same measured while the backfill did nothing (before the first batch and during long pauses).

Output: a *duty cycle* (the fraction of wall time the backfill spends in batches; the pause after
a batch of ``t`` seconds is ``t * (1 - duty) / duty``) and the batch duration to aim for.

Decision: each signal becomes a pressure, 1.0 meaning "exactly at the budget"
(``spec.limits.applicationImpact``); the largest one is the run's pressure. AIMD on it, as TCP
does on congestion: above the budget the duty is cut multiplicatively (at once, so a hurt
application recovers within a window), well below it the duty grows additively (slowly, so it
probes for the speed the budget allows). A lock wait on one of the backfill's rows halves the
batch duration instead (down to ``MIN_LOCK_HOLD_SECONDS``), because that duration is what the
waiting application transaction pays; what the waits cost overall shows in the other signals. Measurements are smoothed over windows (``SMOOTHING``) so one
noisy half-second on a busy machine does not whipsaw the duty.
With no application at all (no write transactions, no active sessions) the duty is 1 and the
batches use the spec's ``targetDuration``: the backfill runs as fast as ``mode: fast``. An
application that arrives mid-run cuts the duty to ``START_DUTY_BUSY`` and is measured alone in
the next pause; one that leaves doubles the duty per window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MIN_DUTY = 0.02
"""Never stop completely: a backfill at 2 % still finishes, and keeps measuring."""
START_DUTY_BUSY = 0.25
"""Duty of the first batches when the baseline shows an application at work."""
ADDITIVE_STEP = 0.1
DECREASE_FACTOR = 0.7
"""Duty multiplier when the pressure exceeds the budget; ``SEVERE_FACTOR`` when it doubles it."""
SEVERE_FACTOR = 0.5
HOLD_BELOW = 0.75
"""Between this pressure and 1.0 the duty is held: close enough to the budget."""
BUSY_RATE = 20.0
"""Transactions per second of other sessions above which the application counts as present."""
BUSY_ACTIVE = 0.5
"""Mean number of other active sessions above which the application counts as present."""
MIN_LOCK_HOLD_SECONDS = 0.008
"""Floor of the batch duration after lock waits (the per-batch overhead dominates below it)."""
LOCK_HOLD_RECOVERY = 1.25
"""Growth per lock-free window of the batch duration, back up to ``maxLockHold``."""
MAX_PAUSE_SECONDS = 2.0
"""Longest pause after one batch: the controller re-measures at least this often."""
BASELINE_WEIGHT = 0.3
"""Weight of a new clean window (a long pause) in the baseline average."""
SMOOTHING = 0.5
"""Weight of the newest window in the smoothed activity the pressures are computed from."""

LOCK_WAIT_PRESSURE = 0.5
"""Pressure reported for lock waits: below ``HOLD_BELOW`` (the duty may still grow)."""

THROUGHPUT = "throughput"
LATENCY = "latency"
ACTIVE_SESSIONS = "activeSessions"
LOCK_WAITS = "lockWaits"


@dataclass(frozen=True)
class Budget:
    """``spec.limits.applicationImpact`` in seconds and ratios."""

    min_throughput_ratio: float = 0.75
    """Other sessions' transaction rate must stay >= this fraction of the baseline."""
    max_latency_ratio: float = 1.5
    """Their mean statement latency (and active-session count) must stay <= this multiple."""
    max_lock_hold_seconds: float = 0.02
    """Batch duration while an application is present: the longest it can wait for our rows."""


@dataclass(frozen=True)
class Activity:
    """What the other sessions did over ``seconds`` (the backfill's own transactions removed)."""

    seconds: float
    write_rate: float
    """Write transactions completed per second (server-wide, from transaction ids)."""
    commit_rate: float
    """Commits + rollbacks per second in this database (``pg_stat_database``): reported, not used
    for decisions (backends publish these counters about once a second: too coarse)."""
    active: float
    """Mean number of other sessions running a statement."""
    lock_waiters: int = 0
    """Most sessions seen waiting for a row lock held by the backfill."""
    wal_rate: float = 0.0
    """WAL bytes per second, everyone's (the backfill's included)."""
    statement_ms: float | None = None
    """Mean execution time of the other sessions' statements (``pg_stat_statements``)."""

    @property
    def present(self) -> bool:
        """Is there an application to protect?"""
        return self.write_rate >= BUSY_RATE or self.active >= BUSY_ACTIVE or self.lock_waiters > 0


def blend(old: Activity, new: Activity, weight: float) -> Activity:
    """Weighted average of two measurements (lock waits are never part of a baseline)."""

    def mix(a: float, b: float) -> float:
        return (1 - weight) * a + weight * b

    statement_ms = new.statement_ms if old.statement_ms is None else (
        old.statement_ms if new.statement_ms is None else mix(old.statement_ms, new.statement_ms)
    )
    return Activity(
        seconds=old.seconds + new.seconds, write_rate=mix(old.write_rate, new.write_rate),
        commit_rate=mix(old.commit_rate, new.commit_rate), active=mix(old.active, new.active),
        lock_waiters=0, wal_rate=mix(old.wal_rate, new.wal_rate), statement_ms=statement_ms,
    )


def pressures(budget: Budget, baseline: Activity, now: Activity) -> dict[str, float]:
    """Each signal's pressure: 0 = no impact, 1 = exactly at the budget, > 1 = over it."""
    found: dict[str, float] = {}
    waiting = now.active >= BUSY_ACTIVE or now.lock_waiters > 0
    if waiting and baseline.write_rate >= BUSY_RATE:
        # Only while its sessions are busy: a drop with idle sessions is the application asking
        # for less (it went quiet), not the backfill slowing it down. Only the write rate: it is
        # exact and immediate, while pg_stat_database's commit counters reach the view in lumps
        # (each backend publishes them about once a second), too coarse to subtract our own
        # commits from in a half-second window. Read-only traffic is covered by the
        # active-session and statement-latency signals.
        drop = max(0.0, 1.0 - now.write_rate / baseline.write_rate)
        found[THROUGHPUT] = drop / max(1.0 - budget.min_throughput_ratio, 1e-3)
    allowed = max(budget.max_latency_ratio - 1.0, 1e-3)
    if baseline.statement_ms is not None and now.statement_ms is not None and baseline.statement_ms > 0:
        found[LATENCY] = max(0.0, now.statement_ms / baseline.statement_ms - 1.0) / allowed
    if now.active >= BUSY_ACTIVE:
        # Little's law: at a steady arrival rate, more sessions in flight means longer statements.
        # A floor of one session keeps a nearly idle baseline from turning noise into pressure.
        found[ACTIVE_SESSIONS] = max(0.0, now.active / max(baseline.active, 1.0) - 1.0) / allowed
    if now.lock_waiters > 0:
        # What a waiter pays is the rest of our batch: the answer is a shorter batch (halved in
        # ``observe``), not fewer batches; whether the waits cost the application throughput
        # or latency, the other signals tell. So lock waits alone never cut the duty.
        found[LOCK_WAITS] = LOCK_WAIT_PRESSURE
    return found


@dataclass(frozen=True)
class Controller:
    """The controller's whole state; every method returns a new one."""

    budget: Budget
    max_batch_seconds: float
    """The spec's ``batch.targetDuration`` (0: fixed size, the controller then only pauses)."""
    baseline: Activity | None = None
    duty: float = 1.0
    lock_hold_seconds: float = 0.0
    pressure: float = 0.0
    limited_by: str = ""
    """The signal with the largest pressure when it is near or over the budget, else ``""``."""
    present: bool = False
    """An application was seen in the last window (or the baseline)."""
    needs_baseline: bool = False
    """An application arrived after the baseline was taken: measure a clean window next."""
    last: Activity | None = None

    @staticmethod
    def start(budget: Budget, max_batch_seconds: float, baseline: Activity) -> Controller:
        """The controller after the pre-run measurement: careful if someone is there, else flat out."""
        present = baseline.present
        return Controller(
            budget=budget, max_batch_seconds=max_batch_seconds, baseline=baseline,
            duty=START_DUTY_BUSY if present else 1.0, lock_hold_seconds=budget.max_lock_hold_seconds,
            present=present,
        )

    def rebaseline(self, clean: Activity) -> Controller:
        """Fold in a window during which the backfill did nothing (a long pause)."""
        if self.baseline is None or not self.baseline.present or self.needs_baseline:
            baseline = replace(clean, lock_waiters=0)
        else:
            baseline = blend(self.baseline, clean, BASELINE_WEIGHT)
        return replace(self, baseline=baseline, needs_baseline=False, present=self.present or baseline.present)

    def observe(self, now: Activity) -> Controller:
        """AIMD step after a measurement window that included the backfill's batches."""
        if self.baseline is None:
            return self.rebaseline(now)
        baseline = self.baseline
        if not baseline.present and now.present:
            # An application arrived after an idle baseline: slow down at once and ask for a clean
            # measurement (a pause) before judging its rate; comparing it with "idle" says nothing.
            return replace(
                self, duty=min(self.duty, START_DUTY_BUSY), needs_baseline=True, present=True, last=now,
                lock_hold_seconds=self.lock_hold_seconds or self.budget.max_lock_hold_seconds,
            )
        if not now.present:
            # Nobody there (no writes, no session running a statement), or the application went
            # quiet: nothing to protect until it returns, which the arrival rule above catches.
            return replace(
                self, baseline=replace(now, lock_waiters=0) if baseline.present else baseline,
                duty=min(1.0, self.duty * 2 + ADDITIVE_STEP), pressure=0.0, limited_by="", present=False, last=None,
            )
        smoothed = now if self.last is None else blend(self.last, now, SMOOTHING)
        smoothed = replace(smoothed, seconds=now.seconds, lock_waiters=now.lock_waiters)
        found = pressures(self.budget, baseline, smoothed)
        pressure = max(found.values(), default=0.0)
        limited_by = max(found, key=lambda k: found[k]) if pressure >= HOLD_BELOW else ""
        if not limited_by and now.lock_waiters > 0:
            limited_by = LOCK_WAITS  # the batch duration is what is being limited
        if pressure > 2.0:
            duty = self.duty * SEVERE_FACTOR
        elif pressure > 1.0:
            duty = self.duty * DECREASE_FACTOR
        elif pressure >= HOLD_BELOW:
            duty = self.duty
        else:
            duty = self.duty + ADDITIVE_STEP
        lock_hold = self.lock_hold_seconds or self.budget.max_lock_hold_seconds
        if now.lock_waiters > 0:
            lock_hold = max(MIN_LOCK_HOLD_SECONDS, lock_hold / 2)
        else:
            lock_hold = min(self.budget.max_lock_hold_seconds, lock_hold * LOCK_HOLD_RECOVERY)
        return replace(
            self, baseline=baseline, duty=max(MIN_DUTY, min(1.0, duty)), lock_hold_seconds=lock_hold,
            pressure=pressure, limited_by=limited_by, present=now.present or baseline.present, last=smoothed,
        )

    def pause_after(self, batch_seconds: float) -> float:
        """Seconds to wait after a batch whose probe and write took ``batch_seconds``."""
        if self.duty >= 1.0:
            return 0.0
        return min(MAX_PAUSE_SECONDS, max(batch_seconds, 0.0) * (1.0 - self.duty) / self.duty)

    def batch_target_seconds(self) -> float:
        """Batch duration to aim for: the spec's, capped at the lock budget while someone is there."""
        if not self.present or self.max_batch_seconds <= 0:
            return self.max_batch_seconds
        return min(self.max_batch_seconds, self.lock_hold_seconds or self.budget.max_lock_hold_seconds)

    def summary(self) -> str:
        """One line for ``kubectl get bf -o wide``: e.g. ``duty 35% (throughput 1.12)``."""
        if not self.present:
            return "no application seen: full speed"
        reason = f" ({self.limited_by} {self.pressure:.2f})" if self.limited_by else ""
        return f"duty {round(self.duty * 100)}%{reason}"

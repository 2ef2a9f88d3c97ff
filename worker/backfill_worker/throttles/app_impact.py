"""Pure application-impact controller: how fast the backfill may go without hurting the application.

Input: what the *other* sessions did over a window of time (their write-transaction and commit
rates, active sessions, sessions waiting for a row lock the backfill holds, the WAL rate, and
their mean statement latency where ``pg_stat_statements`` is installed), and a baseline of the
same measured while the backfill did nothing (before the first batch and during long pauses).

Output: a *duty cycle* (the fraction of wall time the backfill spends in batches; the pause after
a batch of ``t`` seconds is ``t * (1 - duty) / duty``) and the batch duration to aim for.

Decision: each signal becomes a pressure, 1.0 meaning "exactly at the budget"
(``spec.limits.applicationImpact``); the largest one is the run's pressure. The controller
estimates the application's *marginal cost of backfill speed*, the pressure one unit of duty
costs, from the windows it already measured: by construction the pressure is 0 at duty 0 (the
baseline is the application alone), so the slope is a least-squares fit through the origin of
recent ``(duty, pressure)`` windows, newer ones weighing more. It then sets the duty where that
slope puts the pressure at ``TARGET_PRESSURE`` (just under the budget, so measurement noise does not
cross it): up by at most ``MAX_GROWTH`` per window (one noisy window cannot jump to full speed), and
over the budget *down at once* to where the latest window's own slope puts the target (at least a
``DECREASE_FACTOR`` cut), so a hurt application recovers within one decision window; the duty
of that cut is remembered as a ceiling growth slows down under (``next_duty``). Between
``HOLD_BELOW`` and 1.0 the duty is held. A lock wait on one of the backfill's rows halves the
batch duration instead (down to ``MIN_LOCK_HOLD_SECONDS``), because that duration is what the
waiting application transaction pays. Measurements are smoothed over windows (``SMOOTHING``)
so one noisy half-second on a busy machine does not whipsaw the duty.

Row locks (``lock_wait_seconds``): while an application is present a batch may wait for an
application's row lock only ``LOCK_WAIT_SHARE`` of the lock-hold budget (its ``lock_timeout``),
and its own duration is aimed at the rest, so the whole time it holds rows, waits included, stays
within ``maxLockHold``. A batch that times out yields: it is rolled back (nothing of it stays),
halved and retried after a short pause (``yield_pause``); after ``MAX_LOCK_YIELDS`` yields in a
row it waits with the spec's ``lockTimeout`` (a hot row must not starve the backfill).
With no application at all (no write transactions, no active sessions) the duty is 1 and the
batches use the spec's ``targetDuration``: the backfill runs as fast as ``mode: fast``. An
application that arrives mid-run cuts the duty to ``START_DUTY_BUSY`` and is measured alone in
the next pause; one that leaves doubles the duty per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from backfill_api.status import ImpactLimit

MIN_DUTY = 0.02
"""Never stop completely: a backfill at 2 % still finishes, and keeps measuring."""
START_DUTY_BUSY = 0.25
"""Duty of the first batches when the baseline shows an application at work."""
ADDITIVE_STEP = 0.1
"""Duty added per window when the application leaves (after doubling)."""
TARGET_PRESSURE = 0.85
"""Where the marginal-cost estimate aims the pressure: under 1.0 by about two noise deviations of
the throughput signal (a 2,500 tps application measured over half a second)."""
MAX_GROWTH = 1.25
"""Largest duty increase per window (times the duty, plus ``MIN_GROWTH``)."""
MIN_GROWTH = 0.05
DECREASE_FACTOR = 0.7
"""Over the budget the duty is cut at least to this multiple (more when the estimate says so)."""
SEVERE_RAW_PRESSURE = 1.5
"""An unsmoothed window this far over the budget cuts at once, without waiting for the smoothing."""
HOLD_BELOW = 0.8
"""Between this pressure and 1.0 the duty is held: close enough to the budget."""
HISTORY = 8
"""Windows the marginal-cost estimate is fitted on."""
HISTORY_DECAY = 0.7
"""Weight of a window in the fit, per window of age."""
CEILING_APPROACH = 0.9
"""After a cut, fast growth stops at this fraction of the duty that was cut (the knee it found)..."""
CEILING_PROBE = 0.02
"""...and the duty then probes upward by this much per window, until past it without a cut."""
MIN_SLOPE = 0.05
"""Slopes below this (pressure per unit of duty) are noise around "no cost"."""
LOCK_WAIT_SHARE = 0.25
"""Share of the lock-hold budget a batch may wait for an application's row lock (its lock_timeout)."""
MIN_LOCK_WAIT_SECONDS = 0.002
MAX_LOCK_YIELDS = 4
"""Yields in a row after which a batch waits with the spec's lockTimeout (progress on a hot row)."""
YIELD_PAUSE_SECONDS = 0.01
"""Pause after the first yield, doubled per yield in a row (an application transaction holding a
row lock usually ends within a few ms)."""
MAX_YIELD_PAUSE_SECONDS = 0.16
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

THROUGHPUT = ImpactLimit.THROUGHPUT
LATENCY = ImpactLimit.LATENCY
ACTIVE_SESSIONS = ImpactLimit.ACTIVE_SESSIONS
LOCK_WAITS = ImpactLimit.LOCK_WAITS


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


def pressures(budget: Budget, baseline: Activity, now: Activity) -> dict[ImpactLimit, float]:
    """Each signal's pressure: 0 = no impact, 1 = exactly at the budget, > 1 = over it."""
    found: dict[ImpactLimit, float] = {}
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


def marginal_cost(history: Sequence[tuple[float, float]]) -> float | None:
    """PURE: pressure per unit of duty, fitted through the origin on ``(duty, pressure)`` windows
    (oldest first; newer ones weigh more): the pressure is 0 at duty 0 by construction (the
    baseline is the application alone). None when there is nothing to fit on."""
    weights = [HISTORY_DECAY ** age for age in range(len(history))][::-1]
    denominator = sum(w * d * d for w, (d, _) in zip(weights, history, strict=True))
    if denominator <= 0:
        return None
    return sum(w * d * p for w, (d, p) in zip(weights, history, strict=True)) / denominator


CUT, HOLD, ESTIMATE, CAPPED = "cut", "hold", "estimate", "capped"
"""How :func:`next_duty` decided: over the budget, near it, by the marginal-cost estimate, or by
the growth cap (the estimate allowed more)."""


def next_duty(
    duty: float, pressure: float, raw_pressure: float, slope: float | None, ceiling: float | None = None,
) -> tuple[float, str]:
    """PURE: the duty for the next window, and how it was decided (``CUT`` ... ``CAPPED``).

    ``pressure`` is the smoothed window's, ``raw_pressure`` the latest window's alone, ``slope``
    the fitted marginal cost (``marginal_cost``), ``ceiling`` the duty of the last cut (if not
    passed since): an application may feel nothing until the machine saturates and then a lot
    (a knee); growing by the cap from "no cost" would jump over it again and again.
    """
    cut = max(pressure if pressure > 1.0 else 0.0, raw_pressure if raw_pressure > SEVERE_RAW_PRESSURE else 0.0)
    if cut:
        # Over the budget: the latest window's own slope (``cut / duty``) says where the target is.
        return duty * min(DECREASE_FACTOR, TARGET_PRESSURE / cut), CUT
    if max(pressure, raw_pressure) >= HOLD_BELOW:
        # Grow only when the latest window agrees: the smoothed pressure lags a step up.
        return duty, HOLD
    cap = duty * MAX_GROWTH + MIN_GROWTH
    if ceiling is not None:
        cap = max(min(cap, CEILING_APPROACH * ceiling), duty + CEILING_PROBE)
    if slope is None or slope < MIN_SLOPE:
        return cap, CAPPED
    wanted = duty + (TARGET_PRESSURE - pressure) / slope  # along the fitted slope, from where we are
    return (cap, CAPPED) if wanted >= cap else (max(duty, wanted), ESTIMATE)


def lock_wait_seconds(lock_hold_seconds: float) -> float:
    """PURE: how long a batch may wait for an application's row lock while one is present."""
    return max(MIN_LOCK_WAIT_SECONDS, LOCK_WAIT_SHARE * lock_hold_seconds)


def batch_lock_timeout(spec_timeout: float, lock_wait: float | None, yields_in_a_row: int) -> tuple[float, bool]:
    """PURE: the ``lock_timeout`` of the next batch attempt, and whether a timeout is a *yield*.

    ``lock_wait``: the controller's allowance (None: no application, the spec's timeout). After
    ``MAX_LOCK_YIELDS`` yields in a row the spec's timeout applies, and its expiry is a plain
    lock timeout again (retried and counted as the spec says).
    """
    if lock_wait is None or yields_in_a_row >= MAX_LOCK_YIELDS or lock_wait >= spec_timeout > 0:
        return spec_timeout, False
    return lock_wait, True


def yield_pause(yields_in_a_row: int) -> float:
    """PURE: the pause after the ``n``-th yield in a row (1-based): 10 ms, 20 ms, 40 ms ..."""
    return min(MAX_YIELD_PAUSE_SECONDS, YIELD_PAUSE_SECONDS * 2.0 ** max(0, yields_in_a_row - 1))


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
    limited_by: ImpactLimit = ImpactLimit.NO_APPLICATION
    """What limits the speed now: a signal at or over the budget, the growth cap, or nothing."""
    present: bool = False
    """An application was seen in the last window (or the baseline)."""
    needs_baseline: bool = False
    """An application arrived after the baseline was taken: measure a clean window next."""
    last: Activity | None = None
    history: tuple[tuple[float, float], ...] = ()
    """Recent ``(duty, pressure)`` windows with the application present: the marginal-cost fit."""
    ceiling: float | None = None
    """The duty of the last cut, until the duty passes it without one (see ``next_duty``)."""

    @staticmethod
    def start(budget: Budget, max_batch_seconds: float, baseline: Activity) -> Controller:
        """The controller after the pre-run measurement: careful if someone is there, else flat out."""
        present = baseline.present
        return Controller(
            budget=budget, max_batch_seconds=max_batch_seconds, baseline=baseline,
            duty=START_DUTY_BUSY if present else 1.0, lock_hold_seconds=budget.max_lock_hold_seconds,
            present=present, limited_by=ImpactLimit.RAMP_UP if present else ImpactLimit.NO_APPLICATION,
        )

    def rebaseline(self, clean: Activity) -> Controller:
        """Fold in a window during which the backfill did nothing (a long pause)."""
        if self.baseline is None or not self.baseline.present or self.needs_baseline:
            baseline = replace(clean, lock_waiters=0)
        else:
            baseline = blend(self.baseline, clean, BASELINE_WEIGHT)
        return replace(self, baseline=baseline, needs_baseline=False, present=self.present or baseline.present)

    @property
    def slope(self) -> float | None:
        """The fitted marginal cost of duty (pressure per unit of duty), if any."""
        return marginal_cost(self.history)

    def observe(self, now: Activity, duty: float | None = None) -> Controller:
        """One decision after a measurement window that included the backfill's batches.

        ``duty``: the share of the window actually spent in batches (default: the one asked for).
        """
        if self.baseline is None:
            return self.rebaseline(now)
        baseline = self.baseline
        if not baseline.present and now.present:
            # An application arrived after an idle baseline: slow down at once and ask for a clean
            # measurement (a pause) before judging its rate; comparing it with "idle" says nothing.
            return replace(
                self, duty=min(self.duty, START_DUTY_BUSY), needs_baseline=True, present=True, last=now,
                lock_hold_seconds=self.lock_hold_seconds or self.budget.max_lock_hold_seconds,
                limited_by=ImpactLimit.MEASURING, history=(), ceiling=None,
            )
        if not now.present:
            # Nobody there (no writes, no session running a statement), or the application went
            # quiet: nothing to protect until it returns, which the arrival rule above catches.
            return replace(
                self, baseline=replace(now, lock_waiters=0) if baseline.present else baseline,
                duty=min(1.0, self.duty * 2 + ADDITIVE_STEP), pressure=0.0, limited_by=ImpactLimit.NO_APPLICATION,
                present=False, last=None, history=(), ceiling=None,
            )
        smoothed = now if self.last is None else blend(self.last, now, SMOOTHING)
        smoothed = replace(smoothed, seconds=now.seconds, lock_waiters=now.lock_waiters)
        found = pressures(self.budget, baseline, smoothed)
        pressure = max(found.values(), default=0.0)
        # Lock waits shorten batches; they are not a cost of duty, so they stay out of the fit.
        costs = {k: v for k, v in found.items() if k != LOCK_WAITS}
        cost = max(costs.values(), default=0.0)
        raw_pressure = max((v for k, v in pressures(self.budget, baseline, now).items() if k != LOCK_WAITS), default=0.0)
        spent = min(1.0, max(MIN_DUTY, self.duty if duty is None else duty))
        history = (*self.history, (spent, cost))[-HISTORY:]
        new_duty, how = next_duty(self.duty, cost, raw_pressure, marginal_cost(history), self.ceiling)
        new_duty = max(MIN_DUTY, min(1.0, new_duty))
        ceiling = self.duty if how == CUT else (None if self.ceiling is not None and new_duty > self.ceiling else self.ceiling)
        limited_by = max(costs, key=lambda k: costs[k]) if costs and how != CAPPED else ImpactLimit.RAMP_UP
        if limited_by == ImpactLimit.RAMP_UP and new_duty >= 1.0:
            limited_by = ImpactLimit.FULL_SPEED
        if now.lock_waiters > 0 and limited_by in (ImpactLimit.RAMP_UP, ImpactLimit.FULL_SPEED):
            limited_by = LOCK_WAITS  # the batch duration is what is being limited
        lock_hold = self.lock_hold_seconds or self.budget.max_lock_hold_seconds
        if now.lock_waiters > 0:
            lock_hold = max(MIN_LOCK_HOLD_SECONDS, lock_hold / 2)
        else:
            lock_hold = min(self.budget.max_lock_hold_seconds, lock_hold * LOCK_HOLD_RECOVERY)
        return replace(
            self, baseline=baseline, duty=new_duty, lock_hold_seconds=lock_hold, pressure=pressure,
            limited_by=limited_by, present=now.present or baseline.present, last=smoothed, history=history,
            ceiling=ceiling,
        )

    def pause_after(self, batch_seconds: float) -> float:
        """Seconds to wait after a batch whose probe and write took ``batch_seconds``."""
        if self.duty >= 1.0:
            return 0.0
        return min(MAX_PAUSE_SECONDS, max(batch_seconds, 0.0) * (1.0 - self.duty) / self.duty)

    def lock_wait_seconds(self) -> float | None:
        """The ``lock_timeout`` a batch gets while an application is present (None: the spec's)."""
        if not self.present:
            return None
        return lock_wait_seconds(self.lock_hold_seconds or self.budget.max_lock_hold_seconds)

    def batch_target_seconds(self) -> float:
        """Batch duration to aim for: the spec's, capped while someone is there at the lock budget
        less the lock wait a batch is allowed (so the whole hold stays within ``maxLockHold``)."""
        if not self.present or self.max_batch_seconds <= 0:
            return self.max_batch_seconds
        hold = self.lock_hold_seconds or self.budget.max_lock_hold_seconds
        return min(self.max_batch_seconds, max(hold - lock_wait_seconds(hold), MIN_LOCK_WAIT_SECONDS))

    def summary(self) -> str:
        """One line for ``kubectl get bf -o wide``: e.g. ``duty 35% (throughput 1.12)``."""
        if not self.present:
            return "no application seen: full speed"
        return f"duty {round(self.duty * 100)}% ({self.limited_by} {self.pressure:.2f})"

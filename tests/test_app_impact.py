"""The application-impact controller (pure) and the signal arithmetic, without a database."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from pydantic import ValidationError

from backfill_api.model import ApplicationImpactSpec, ImpactMode, LimitsSpec
from backfill_worker.throttles import app_impact as ai
from backfill_worker.throttles.app_impact import Activity, Budget, Controller
from backfill_worker.throttles.impact_signals import Sample, activity_between, like_prefix, quoted

BUDGET = Budget(min_throughput_ratio=0.8, max_latency_ratio=1.5, max_lock_hold_seconds=0.02)
IDLE = Activity(seconds=0.5, write_rate=0.0, commit_rate=0.0, active=0.0)
BUSY = Activity(seconds=0.6, write_rate=4000.0, commit_rate=4000.0, active=3.0)


def busy(ratio: float = 1.0, **changes: float) -> Activity:
    """The busy application at ``ratio`` x its baseline write rate."""
    return replace(BUSY, seconds=0.5, write_rate=BUSY.write_rate * ratio, **changes)  # type: ignore[arg-type]


def started(baseline: Activity = BUSY, target: float = 0.2) -> Controller:
    return Controller.start(BUDGET, target, baseline)


# -- start ----------------------------------------------------------------------------------


def test_idle_database_starts_flat_out_with_the_spec_batch_duration() -> None:
    c = started(IDLE)
    assert (c.duty, c.present, c.pause_after(0.2), c.batch_target_seconds()) == (1.0, False, 0.0, 0.2)
    assert c.summary() == "no application seen: full speed"


def test_busy_database_starts_careful_with_short_batches_and_a_short_lock_wait() -> None:
    c = started(BUSY)
    assert c.present and c.duty == ai.START_DUTY_BUSY
    # The whole lock hold, waits included, within maxLockHold: 15 ms of batch + 5 ms of lock wait.
    assert c.batch_target_seconds() == pytest.approx(0.015)
    assert c.lock_wait_seconds() == pytest.approx(0.005)
    assert c.batch_target_seconds() + (c.lock_wait_seconds() or 0) == pytest.approx(BUDGET.max_lock_hold_seconds)
    assert c.pause_after(0.02) == pytest.approx(0.06)  # 25 % duty: three times the batch
    assert started(IDLE).lock_wait_seconds() is None  # nobody there: the spec's lockTimeout


def test_fixed_batch_size_spec_keeps_target_zero() -> None:
    assert started(BUSY, target=0.0).batch_target_seconds() == 0.0


def test_spec_target_below_the_lock_budget_is_kept() -> None:
    assert started(BUSY, target=0.01).batch_target_seconds() == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("activity", "present"),
    [
        (IDLE, False),
        (replace(IDLE, write_rate=ai.BUSY_RATE), True),
        (replace(IDLE, write_rate=ai.BUSY_RATE - 1), False),
        (replace(IDLE, active=ai.BUSY_ACTIVE), True),
        (replace(IDLE, lock_waiters=1), True),
        (replace(IDLE, commit_rate=10_000), False),  # commit counters alone are too coarse to count
    ],
)
def test_presence(activity: Activity, present: bool) -> None:
    assert activity.present is present


# -- the marginal-cost controller -------------------------------------------------------------


def test_throughput_over_budget_cuts_the_duty_to_where_the_window_says_the_target_is() -> None:
    c = replace(started(), duty=0.5)
    after = c.observe(busy(0.7))  # a 30 % drop against a 20 % budget: pressure 1.5
    assert after.duty == pytest.approx(0.5 * ai.TARGET_PRESSURE / 1.5)  # more than DECREASE_FACTOR
    assert after.limited_by == ai.THROUGHPUT and after.pressure == pytest.approx(1.5)
    assert after.summary() == "duty 28% (throughput 1.50)"


def test_a_cut_is_at_least_the_decrease_factor() -> None:
    after = replace(started(), duty=0.5).observe(busy(0.78))  # pressure 1.1: the target is 0.77x away
    assert after.duty == pytest.approx(0.5 * ai.DECREASE_FACTOR)


def test_severe_overload_cuts_harder() -> None:
    after = replace(started(), duty=0.5).observe(busy(0.4))  # pressure 3
    assert after.duty == pytest.approx(0.5 * ai.TARGET_PRESSURE / 3)


def test_without_measurable_cost_the_duty_grows_by_the_cap_up_to_one() -> None:
    c = replace(started(), duty=0.5)
    c = c.observe(busy(1.0))
    assert c.duty == pytest.approx(0.5 * ai.MAX_GROWTH + ai.MIN_GROWTH) and c.limited_by == ai.ImpactLimit.RAMP_UP
    for _ in range(3):
        c = c.observe(busy(1.0))
    assert c.duty == 1.0 and c.pause_after(0.02) == 0.0
    assert c.limited_by == ai.ImpactLimit.FULL_SPEED and c.summary() == "duty 100% (fullSpeed 0.00)"


def test_with_a_measured_cost_the_duty_goes_where_the_estimate_puts_the_target() -> None:
    c = replace(started(), duty=0.4)
    after = c.observe(busy(0.9))  # pressure 0.5 at duty 0.4: slope 1.25, the target at 0.68 > the cap 0.55
    assert after.duty == pytest.approx(0.4 * ai.MAX_GROWTH + ai.MIN_GROWTH) and after.limited_by == ai.ImpactLimit.RAMP_UP
    c = replace(started(), duty=0.4)
    after = c.observe(busy(0.86))  # pressure 0.7: slope 1.75, the target at 0.4 + 0.15 / 1.75 < the cap
    assert after.duty == pytest.approx(0.4 + 0.15 / 1.75) and after.limited_by == ai.THROUGHPUT


def test_after_a_cut_growth_slows_below_the_duty_that_hurt_and_probes_past_it() -> None:
    c = replace(started(), duty=0.8).observe(busy(0.6))  # pressure 2: cut, and 0.8 is remembered
    assert c.ceiling == 0.8 and c.duty == pytest.approx(0.8 * ai.TARGET_PRESSURE / 2)
    duties = []
    for _ in range(12):
        c = c.observe(busy(1.0))  # no cost at all now: grow
        duties.append(c.duty)
    assert max(d for d in duties if d <= 0.8) <= 0.8  # no jump past the knee
    assert ai.CEILING_APPROACH * 0.8 in [pytest.approx(d) for d in duties]  # fast up to 0.72...
    probing = [b - a for a, b in itertools.pairwise(duties) if ai.CEILING_APPROACH * 0.8 - 1e-9 <= a < 0.8]
    assert probing and all(step == pytest.approx(ai.CEILING_PROBE) for step in probing)  # ...then 0.02 a window
    assert c.ceiling is None and c.duty > 0.8  # past it without a cut: forgotten, fast growth again


def test_marginal_cost_fits_through_the_origin_newer_windows_weighing_more() -> None:
    assert ai.marginal_cost([]) is None
    assert ai.marginal_cost([(0.5, 0.5)]) == pytest.approx(1.0)
    assert ai.marginal_cost([(0.2, 0.2), (0.4, 0.4), (0.8, 0.8)]) == pytest.approx(1.0)
    mixed = ai.marginal_cost([(0.5, 0.25), (0.5, 1.0)])  # cost doubled lately: nearer the new slope
    assert mixed is not None and 1.0 < mixed < 2.0 and mixed > 1.25


@pytest.mark.parametrize(
    ("duty", "pressure", "raw", "slope", "expected", "how"),
    [
        (0.5, 1.2, 1.2, 1.0, 0.35, ai.CUT),  # 0.85/1.2 = 0.708 > 0.7: the decrease factor
        (0.5, 0.9, 0.9, 1.0, 0.5, ai.HOLD),
        (0.5, 0.5, 0.5, 1.0, 0.675, ai.CAPPED),  # wanted 0.85, the cap 0.675
        (0.5, 0.5, 0.5, 3.5, 0.6, ai.ESTIMATE),  # 0.5 + 0.35 / 3.5
        (0.5, 0.5, 0.5, None, 0.675, ai.CAPPED),
        (0.5, 0.7, 2.0, 1.0, 0.5 * 0.85 / 2.0, ai.CUT),  # a severe raw window cuts through the smoothing
        (0.5, 0.7, 1.4, 2.0, 0.5, ai.HOLD),  # ...a milder one holds the growth (the smoothing lags), no cut
        (0.5, 0.7, 0.7, 0.5, 0.675, ai.CAPPED),  # a flat estimate grows by the cap
    ],
)
def test_next_duty(duty: float, pressure: float, raw: float, slope: float | None, expected: float, how: str) -> None:
    got, decided = ai.next_duty(duty, pressure, raw, slope)
    assert got == pytest.approx(expected) and decided == how


def test_near_the_budget_the_duty_is_held() -> None:
    c = replace(started(), duty=0.4)
    after = c.observe(busy(0.82))  # pressure 0.9
    assert after.duty == pytest.approx(0.4) and after.limited_by == ai.THROUGHPUT


def test_duty_never_drops_below_the_floor() -> None:
    c = started()
    for _ in range(40):
        c = c.observe(busy(0.05))
    assert c.duty == ai.MIN_DUTY
    assert c.pause_after(10.0) == ai.MAX_PAUSE_SECONDS


def test_the_duty_spent_not_the_duty_asked_is_what_the_fit_learns_from() -> None:
    c = replace(started(), duty=0.5).observe(busy(0.9), duty=0.25)  # pressure 0.5 at 25 % really spent
    assert c.history[-1] == (0.25, pytest.approx(0.5)) and c.slope == pytest.approx(2.0)


def test_one_bad_window_is_smoothed() -> None:
    c = replace(started(), duty=0.5).observe(busy(1.0))
    after = c.observe(busy(0.75))  # pressure 1.25 alone, smoothed with the good window: 0.875 -> 0.625
    assert after.pressure == pytest.approx(0.625) and after.duty >= c.duty


def test_statement_latency_over_budget_cuts_the_duty() -> None:
    base = replace(BUSY, statement_ms=1.0)
    c = replace(started(base), duty=0.5)
    after = c.observe(busy(1.0, statement_ms=1.8))  # +80 % against +50 %: pressure 1.6
    assert after.limited_by == ai.LATENCY and after.pressure == pytest.approx(1.6)
    assert after.duty == pytest.approx(0.5 * ai.TARGET_PRESSURE / 1.6)


def test_more_active_sessions_at_the_same_rate_means_longer_statements() -> None:
    c = replace(started(), duty=0.5)
    after = c.observe(busy(1.0, active=6.0))  # twice the sessions in flight: pressure 2
    assert after.limited_by == ai.ACTIVE_SESSIONS and after.duty < 0.5


def test_a_nearly_idle_baseline_does_not_turn_one_active_session_into_pressure() -> None:
    base = replace(BUSY, active=0.1)
    assert ai.pressures(BUDGET, base, busy(1.0, active=1.0)).get(ai.ACTIVE_SESSIONS) == 0.0


def test_lock_waits_halve_the_batch_duration_but_do_not_cut_the_duty() -> None:
    c = replace(started(), duty=0.5)
    c = c.observe(busy(1.0, lock_waiters=2))
    assert c.duty == pytest.approx(0.5 * ai.MAX_GROWTH + ai.MIN_GROWTH) and c.limited_by == ai.LOCK_WAITS
    assert c.batch_target_seconds() == pytest.approx(0.01 - ai.lock_wait_seconds(0.01))
    assert replace(c, duty=0.5).observe(busy(0.5, lock_waiters=1)).duty < 0.5  # ...the throughput signal does
    for _ in range(10):
        c = c.observe(busy(1.0, lock_waiters=1))
    assert c.batch_target_seconds() + (c.lock_wait_seconds() or 0) == pytest.approx(ai.MIN_LOCK_HOLD_SECONDS)
    for _ in range(30):
        c = c.observe(busy(1.0))
    assert c.limited_by == ai.ImpactLimit.FULL_SPEED
    assert c.batch_target_seconds() == pytest.approx(0.015)  # recovered, but never above the budget


def test_a_throughput_drop_with_idle_sessions_is_the_application_asking_for_less() -> None:
    c = replace(started(), duty=0.5)
    after = c.observe(busy(0.5, active=0.2))  # half the rate, but nobody is waiting for anything
    assert ai.THROUGHPUT not in ai.pressures(BUDGET, BUSY, busy(0.5, active=0.2))
    assert after.duty > 0.5


def test_application_leaving_doubles_the_duty_and_restores_big_batches() -> None:
    c = replace(started(), duty=0.2)
    after = c.observe(IDLE)
    assert after.duty == pytest.approx(0.4 + ai.ADDITIVE_STEP) and not after.present
    assert after.batch_target_seconds() == 0.2
    assert after.observe(IDLE).observe(IDLE).duty == 1.0


def test_application_arriving_mid_run_slows_down_and_asks_for_a_clean_measurement() -> None:
    c = started(IDLE)
    arrived = c.observe(busy(0.6))
    assert arrived.present and arrived.needs_baseline and arrived.duty == ai.START_DUTY_BUSY
    assert arrived.limited_by == ai.ImpactLimit.MEASURING
    assert arrived.batch_target_seconds() == pytest.approx(0.015)
    measured = arrived.rebaseline(replace(BUSY, write_rate=3000.0))
    assert not measured.needs_baseline and measured.baseline is not None
    assert measured.baseline.write_rate == 3000.0  # replaced, not blended with "idle"
    assert measured.observe(busy(0.5)).duty < arrived.duty  # 2,000 tps against 3,000: pressure 1.67


def test_clean_windows_are_blended_into_a_busy_baseline() -> None:
    c = started().rebaseline(replace(BUSY, write_rate=2000.0))
    assert c.baseline is not None
    assert c.baseline.write_rate == pytest.approx((1 - ai.BASELINE_WEIGHT) * 4000 + ai.BASELINE_WEIGHT * 2000)
    assert c.baseline.lock_waiters == 0


def test_pause_follows_the_duty() -> None:
    c = replace(started(), duty=0.5)
    assert c.pause_after(0.02) == pytest.approx(0.02)
    assert replace(c, duty=0.1).pause_after(0.02) == pytest.approx(0.18)
    assert c.pause_after(-1.0) == 0.0


# -- whole runs, simulated ------------------------------------------------------------------


Plant = Callable[[float], float]
"""A synthetic application: its throughput ratio (vs. alone) as a function of the backfill's duty."""


def linear(cost: float) -> Plant:
    return lambda duty: 1.0 - cost * duty


def convex(cost: float) -> Plant:
    """Cheap at low duty, expensive near saturation (queueing: the cost grows with the load)."""
    return lambda duty: 1.0 - cost * duty * duty


def seeded() -> random.Random:
    seed = int(os.environ.get("IMPACT_SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (replay: IMPACT_SEED={seed})")
    return random.Random(seed)


def simulate(plant: Plant, windows: int, rng: random.Random, noise: float, c: Controller | None = None,
             ) -> tuple[Controller, list[tuple[float, float]]]:
    """Closed loop: each window the application runs at ``plant(duty)`` (+ noise); (duty, ratio) per window."""
    c = c or started()
    trace = []
    for _ in range(windows):
        ratio = max(0.0, plant(c.duty) + rng.gauss(0, noise))
        trace.append((c.duty, ratio))
        c = c.observe(busy(ratio))
    return c, trace


AIM = 1 - ai.TARGET_PRESSURE * (1 - BUDGET.min_throughput_ratio)
"""The throughput ratio the controller aims at: just above the budget (0.83 for a 0.8 budget)."""


@pytest.mark.parametrize("plant", [linear(0.3), linear(0.55), linear(0.9), convex(0.4), convex(1.5)],
                         ids=["linear0.3", "linear0.55", "linear0.9", "convex0.4", "convex1.5"])
def test_converges_to_its_budget_within_ten_windows(plant: Plant) -> None:
    rng = seeded()
    _, trace = simulate(plant, 200, rng, noise=0.02)
    # Noise-free, the duty where the application sits exactly at the aim:
    on_aim = next((d / 1000 for d in range(1000, 0, -1) if plant(d / 1000) >= AIM), 0.0)
    settled = trace[10:]
    mean_ratio = sum(r for _, r in settled) / len(settled)
    mean_duty = sum(d for d, _ in settled) / len(settled)
    # Within 0.03 of the aim (the budget is 0.8, the aim 0.83): it takes the headroom, and keeps the budget.
    assert abs(mean_ratio - AIM) <= 0.03, (mean_ratio, mean_duty, on_aim)
    assert mean_ratio >= BUDGET.min_throughput_ratio, (mean_ratio, mean_duty)
    assert mean_duty >= 0.8 * on_aim, (mean_ratio, mean_duty, on_aim)
    # ...and it got there fast: over windows 8-15 the duty is within 30 % of the duty on the aim on
    # average (one noisy window over the budget may cut it once on the way: that is the design).
    early = sum(d for d, _ in trace[8:16]) / 8
    assert abs(early - on_aim) <= 0.3 * on_aim, (trace[:16], on_aim)


def knee(cost: float, at: float) -> Plant:
    """Nothing until the machine saturates, then a lot."""
    return lambda duty: 1.0 - cost * max(0.0, duty - at)


@pytest.mark.parametrize("plant", [knee(4, 0.5), knee(8, 0.6), knee(3, 0.3)], ids=["knee4@0.5", "knee8@0.6", "knee3@0.3"])
def test_an_application_with_a_knee_is_not_driven_over_it_again_and_again(plant: Plant) -> None:
    _, trace = simulate(plant, 200, seeded(), noise=0.02)
    on_aim = next((d / 1000 for d in range(1000, 0, -1) if plant(d / 1000) >= AIM), 0.0)
    settled = trace[20:]
    mean_ratio = sum(r for _, r in settled) / len(settled)
    mean_duty = sum(d for d, _ in settled) / len(settled)
    assert mean_ratio >= BUDGET.min_throughput_ratio, (mean_ratio, mean_duty)
    # Not driven over the knee again and again: few windows far below the budget.
    assert sum(r < BUDGET.min_throughput_ratio - 0.1 for _, r in settled) <= 0.08 * len(settled), settled
    assert mean_duty >= 0.8 * on_aim, (mean_ratio, mean_duty, on_aim)


def test_takes_all_the_headroom_when_the_application_barely_notices() -> None:
    _, trace = simulate(linear(0.1), 12, seeded(), noise=0.01)
    assert trace[-1][0] == 1.0  # 0.9x at full duty is within the 0.8 budget: full speed
    assert [d for d, _ in trace].index(1.0) <= 6


def test_backs_off_within_one_window_when_the_headroom_goes() -> None:
    rng = seeded()
    c, _ = simulate(linear(0.25), 40, rng, noise=0.01)
    before = c.duty
    assert before >= 0.5
    # The application's cost of backfill triples (say, it starts touching the backfill's rows).
    steeper = linear(0.75)
    c, trace = simulate(steeper, 4, rng, noise=0.01, c=c)
    assert trace[1][0] < 0.75 * before, trace  # the first decision after the step already cut the duty
    assert trace[1][1] < trace[0][1] or steeper(trace[1][0]) > steeper(trace[0][0]), trace
    assert min(r for _, r in trace[2:]) >= BUDGET.min_throughput_ratio - 0.03, trace  # back within the budget


def test_no_impact_at_all_runs_flat_out() -> None:
    _, trace = simulate(linear(0.0), 40, random.Random(1), noise=0.0)
    assert trace[-1][0] == 1.0


def test_random_sequences_keep_the_state_in_bounds() -> None:
    seed = int(os.environ.get("IMPACT_SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (replay: IMPACT_SEED={seed})")
    rng = random.Random(seed)
    c = started(rng.choice([IDLE, BUSY]))
    for _ in range(2000):
        activity = Activity(
            seconds=rng.uniform(0.01, 2), write_rate=rng.choice([0.0, rng.uniform(0, 10_000)]),
            commit_rate=rng.uniform(0, 10_000), active=rng.choice([0.0, rng.uniform(0, 20)]),
            lock_waiters=rng.choice([0, 0, 0, rng.randrange(1, 9)]), wal_rate=rng.uniform(0, 1e8),
            statement_ms=rng.choice([None, rng.uniform(0.01, 50)]),
        )
        c = c.rebaseline(activity) if rng.random() < 0.2 else c.observe(activity)
        assert ai.MIN_DUTY <= c.duty <= 1.0
        assert 0.0 <= c.pause_after(rng.uniform(0, 1)) <= ai.MAX_PAUSE_SECONDS
        target, wait = c.batch_target_seconds(), c.lock_wait_seconds()
        assert (target, wait) == (0.2, None) or (
            wait is not None and ai.MIN_LOCK_HOLD_SECONDS <= target + wait <= BUDGET.max_lock_hold_seconds + 1e-12
        )


# -- signal arithmetic ------------------------------------------------------------------------


def test_activity_between_samples_removes_our_own_transactions() -> None:
    first = Sample(at=10.0, commits=1000, next_xid=500, wal_bytes=1_000_000, active_others=2, lock_waiters=0,
                   statement_calls=100, statement_ms=50.0)
    last = Sample(at=10.5, commits=1600, next_xid=800, wal_bytes=6_000_000, active_others=4, lock_waiters=1,
                  statement_calls=300, statement_ms=250.0)
    a = activity_between(first, last, own_writes=50, own_commits=100, active=3.0, lock_waiters=2)
    assert a.write_rate == pytest.approx(500.0) and a.commit_rate == pytest.approx(1000.0)
    assert a.wal_rate == pytest.approx(10_000_000.0) and a.statement_ms == pytest.approx(1.0)
    assert (a.active, a.lock_waiters, a.seconds) == (3.0, 2, pytest.approx(0.5))


def test_activity_without_statements_or_with_no_new_calls() -> None:
    first = Sample(1.0, 0, 10, 0, 0, 0)
    assert activity_between(first, replace(first, at=2.0), own_writes=5, own_commits=0, active=0, lock_waiters=0) == Activity(
        seconds=1.0, write_rate=0.0, commit_rate=0.0, active=0, lock_waiters=0, wal_rate=0.0, statement_ms=None
    )
    with_calls = replace(first, statement_calls=7, statement_ms=3.0)
    assert activity_between(with_calls, replace(with_calls, at=2.0), own_writes=0, own_commits=0, active=0,
                            lock_waiters=0).statement_ms is None


def test_patterns_for_our_own_sessions_and_statements() -> None:
    assert like_prefix("backfill shop/a_b%c") == "backfill shop/a\\_b\\%c%"
    assert quoted("public", 'we"ird') == '"public"."we""ird"'


# -- the spec -------------------------------------------------------------------------------


def test_protect_is_the_default_and_fast_is_a_choice() -> None:
    assert LimitsSpec().application_impact == ApplicationImpactSpec(mode=ImpactMode.PROTECT)
    spec = LimitsSpec.model_validate({"applicationImpact": {"mode": "fast"}})
    assert spec.application_impact.mode is ImpactMode.FAST


@pytest.mark.parametrize(
    ("field", "value"),
    [("minThroughputRatio", 1.0), ("minThroughputRatio", 0), ("maxLatencyRatio", 1.0), ("maxLockHold", "0s"),
     ("mode", "gentle")],
)
def test_bad_budget_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as error:
        LimitsSpec.model_validate({"applicationImpact": {field: value}})
    assert field in str(error.value)

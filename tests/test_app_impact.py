"""The application-impact controller (pure) and the signal arithmetic, without a database."""

from __future__ import annotations

import os
import random
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


def test_busy_database_starts_careful_with_short_batches() -> None:
    c = started(BUSY)
    assert c.present and c.duty == ai.START_DUTY_BUSY
    assert c.batch_target_seconds() == pytest.approx(0.02)
    assert c.pause_after(0.02) == pytest.approx(0.06)  # 25 % duty: three times the batch


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


# -- AIMD -----------------------------------------------------------------------------------


def test_throughput_over_budget_cuts_the_duty_multiplicatively() -> None:
    c = replace(started(), duty=0.5)
    after = c.observe(busy(0.7))  # a 30 % drop against a 20 % budget: pressure 1.5
    assert after.duty == pytest.approx(0.5 * ai.DECREASE_FACTOR)
    assert after.limited_by == ai.THROUGHPUT and after.pressure == pytest.approx(1.5)
    assert after.summary() == "duty 35% (throughput 1.50)"


def test_severe_overload_cuts_harder() -> None:
    after = replace(started(), duty=0.5).observe(busy(0.4))  # pressure 3
    assert after.duty == pytest.approx(0.5 * ai.SEVERE_FACTOR)


def test_low_pressure_grows_the_duty_additively_up_to_one() -> None:
    c = replace(started(), duty=0.5)
    c = c.observe(busy(0.99))
    assert c.duty == pytest.approx(0.5 + ai.ADDITIVE_STEP) and c.limited_by == ""
    for _ in range(round(0.5 / ai.ADDITIVE_STEP)):
        c = c.observe(busy(0.99))
    assert c.duty == 1.0 and c.pause_after(0.02) == 0.0


def test_near_the_budget_the_duty_is_held() -> None:
    c = replace(started(), duty=0.4)
    after = c.observe(busy(0.83))  # pressure 0.85
    assert after.duty == pytest.approx(0.4) and after.limited_by == ai.THROUGHPUT


def test_duty_never_drops_below_the_floor() -> None:
    c = started()
    for _ in range(40):
        c = c.observe(busy(0.05))
    assert c.duty == ai.MIN_DUTY
    assert c.pause_after(10.0) == ai.MAX_PAUSE_SECONDS


def test_one_bad_window_is_smoothed() -> None:
    c = replace(started(), duty=0.5).observe(busy(1.0))
    after = c.observe(busy(0.7))  # smoothed with the previous good window: 0.85 -> pressure 0.75
    assert after.pressure == pytest.approx(0.75) and after.duty == pytest.approx(c.duty)


def test_statement_latency_over_budget_cuts_the_duty() -> None:
    base = replace(BUSY, statement_ms=1.0)
    c = replace(started(base), duty=0.5)
    after = c.observe(busy(1.0, statement_ms=1.8))  # +80 % against +50 %: pressure 1.6
    assert after.limited_by == ai.LATENCY and after.pressure == pytest.approx(1.6)
    assert after.duty == pytest.approx(0.5 * ai.DECREASE_FACTOR)


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
    assert c.duty == pytest.approx(0.5 + ai.ADDITIVE_STEP) and c.limited_by == ai.LOCK_WAITS
    assert c.batch_target_seconds() == pytest.approx(0.01)
    assert replace(c, duty=0.5).observe(busy(0.5, lock_waiters=1)).duty < 0.5  # ...the throughput signal does
    for _ in range(10):
        c = c.observe(busy(1.0, lock_waiters=1))
    assert c.batch_target_seconds() == pytest.approx(ai.MIN_LOCK_HOLD_SECONDS)
    for _ in range(30):
        c = c.observe(busy(1.0))
    assert c.limited_by == ""
    assert c.batch_target_seconds() == pytest.approx(0.02)  # recovered, but never above the budget


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
    assert arrived.batch_target_seconds() == pytest.approx(0.02)
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


def simulate(cost_at_full_duty: float, steps: int, seed: int, noise: float) -> list[tuple[float, float]]:
    """A closed-loop application losing ``cost x duty`` of its throughput; (duty, ratio) per step."""
    rng = random.Random(seed)
    c = started()
    trace = []
    for _ in range(steps):
        ratio = max(0.0, 1.0 - cost_at_full_duty * c.duty + rng.gauss(0, noise))
        trace.append((c.duty, ratio))
        c = c.observe(busy(ratio))
    return trace


@pytest.mark.parametrize("cost", [0.3, 0.55, 0.9])
def test_simulated_application_stays_near_its_budget(cost: float) -> None:
    seed = int(os.environ.get("IMPACT_SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (replay: IMPACT_SEED={seed})")
    trace = simulate(cost, 400, seed, noise=0.03)[100:]
    mean_ratio = sum(r for _, r in trace) / len(trace)
    mean_duty = sum(d for d, _ in trace) / len(trace)
    assert mean_ratio >= BUDGET.min_throughput_ratio - 0.03, (mean_ratio, mean_duty)
    # ...and does not give away speed: the duty that would sit exactly on the budget is 0.2 / cost.
    assert mean_duty >= 0.5 * min(1.0, (1 - BUDGET.min_throughput_ratio) / cost), (mean_ratio, mean_duty)


def test_no_impact_at_all_runs_flat_out() -> None:
    trace = simulate(0.0, 40, seed=1, noise=0.0)
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
        target = c.batch_target_seconds()
        assert target == 0.2 or ai.MIN_LOCK_HOLD_SECONDS <= target <= BUDGET.max_lock_hold_seconds


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
